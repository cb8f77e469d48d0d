//! The disk budget: a pure decision ([`decide`]) from a snapshot of the cache to what must be
//! removed before a model may write more, and the shell that takes the snapshot, carries the
//! decision out under each victim's file lock, and keeps the reservations of running jobs.
//!
//! A job reserves what it will still write before its first byte, so two models starting
//! together cannot each fit alone and overflow together.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::SystemTime;

use tracing::info;

use super::lifecycle::{self, AfterRemoval, Keep};
use super::{ModelError, Models, State, dir_bytes, remove_dir};
use crate::config::agent::Budget;
use crate::fetch::{PrefetchError, error_chain};
use crate::store::lock::{TryLock, try_lock};
use crate::store::{ModelName, fsync_dir};

/// Something the budget may remove, cheapest loss first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Reclaim {
    /// `staging/NAME` of a model no job works on: partial downloads no one is finishing.
    Partials(ModelName),
    /// `store/NAME/REVISION` that `models/NAME` does not link: an old revision.
    Revision(ModelName, String),
    /// A whole published model: its link, store and staging.
    Model(ModelName),
}

impl Reclaim {
    fn model(&self) -> &ModelName {
        match self {
            Reclaim::Partials(m) | Reclaim::Revision(m, _) | Reclaim::Model(m) => m,
        }
    }
}

/// One removable thing in the snapshot.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    /// What it is.
    pub what: Reclaim,
    /// Bytes it frees.
    pub bytes: u64,
    /// Least recently used goes first among models.
    pub last_used: SystemTime,
    /// Pinned models are never evicted.
    pub pinned: bool,
    /// A job or another process works on the model: never touched.
    pub busy: bool,
}

/// The cache as the budget sees it when a model asks for room.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    /// The budget in bytes.
    pub limit: u64,
    /// Bytes on disk in `store/` and `staging/`.
    pub used: u64,
    /// Bytes other running jobs reserved and have not written yet.
    pub reserved: u64,
    /// Bytes the asking model will still write.
    pub needed: u64,
    /// What could be removed (the asking model's own partials and link are never listed).
    pub candidates: Vec<Candidate>,
}

/// The budget's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    /// It fits: reserve `needed` and go.
    Fits,
    /// Remove these, in this order, then it fits.
    Reclaim(Vec<Reclaim>),
    /// It cannot fit even after removing everything removable: remove nothing.
    OverBudget {
        /// Bytes needed.
        needed: u64,
        /// Bytes the budget would leave after removing everything removable.
        available: u64,
    },
}

/// Decides what to remove so that `needed` more bytes fit in the budget beside what is on disk
/// and what other jobs reserved: abandoned partials first, then unlinked revisions, then idle
/// unpinned models, least recently used first. Nothing pinned or busy is ever chosen, and
/// nothing at all when even removing every candidate would not be enough.
pub(super) fn decide(s: &Snapshot) -> Decision {
    let committed = s.used.saturating_add(s.reserved);
    if committed.saturating_add(s.needed) <= s.limit {
        return Decision::Fits;
    }
    let mut usable: Vec<&Candidate> = s
        .candidates
        .iter()
        .filter(|c| !c.pinned && !c.busy)
        .collect();
    usable.sort_by(|a, b| {
        let class = |c: &Candidate| match c.what {
            Reclaim::Partials(_) => 0,
            Reclaim::Revision(..) => 1,
            Reclaim::Model(_) => 2,
        };
        (class(a), a.last_used, &a.what).cmp(&(class(b), b.last_used, &b.what))
    });
    let reclaimable: u64 = usable.iter().map(|c| c.bytes).sum();
    let floor = committed.saturating_sub(reclaimable);
    if floor.saturating_add(s.needed) > s.limit {
        return Decision::OverBudget {
            needed: s.needed,
            available: s.limit.saturating_sub(floor),
        };
    }
    let mut chosen = Vec::new();
    let mut after = committed;
    for c in usable {
        if after.saturating_add(s.needed) <= s.limit {
            break;
        }
        after = after.saturating_sub(c.bytes);
        chosen.push(c.what.clone());
    }
    Decision::Reclaim(chosen)
}

/// What a running job reserved.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reservation {
    /// Bytes it said it would write.
    bytes: u64,
    /// Bytes its staging held when it reserved them.
    staged_then: u64,
}

/// How a removal went.
enum Removed {
    Done,
    /// Someone holds the model: it is left alone.
    Busy,
}

impl Models {
    /// The budget in bytes, or `None` when unlimited.
    fn budget_limit(&self) -> Result<Option<u64>, PrefetchError> {
        match self.config.budget {
            Budget::Unlimited => Ok(None),
            Budget::Bytes(b) => Ok(Some(b)),
            Budget::Fraction(f) => {
                let stat = nix::sys::statvfs::statvfs(self.layout.root()).map_err(|e| {
                    PrefetchError::local(
                        "check the size of",
                        self.layout.root().to_path_buf(),
                        e.into(),
                    )
                })?;
                #[expect(
                    clippy::useless_conversion,
                    reason = "statvfs field types vary by platform"
                )]
                let size = u64::from(stat.blocks()).saturating_mul(u64::from(stat.fragment_size()));
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "a budget, rounded down"
                )]
                let limit = (size as f64 * f) as u64;
                Ok(Some(limit))
            }
        }
    }

    /// Keeps the cache within its budget before `for_model` writes `needed` more bytes, and
    /// reserves them: decides with [`decide`], removes under each victim's lock (a victim
    /// found busy is left alone and the decision taken again), and never runs two decisions at
    /// once. The caller holds `for_model`'s lock.
    pub(super) fn make_room(
        &self,
        for_model: &ModelName,
        needed: u64,
    ) -> Result<(), PrefetchError> {
        let Some(limit) = self.budget_limit()? else {
            return Ok(());
        };
        let _one_decision_at_a_time = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        let mut busy: BTreeSet<ModelName> = BTreeSet::new();
        loop {
            let snapshot = self.budget_snapshot(for_model, needed, limit, &busy);
            match decide(&snapshot) {
                Decision::Fits => {
                    let staged_then = dir_bytes(&self.layout.staging_dir(for_model));
                    self.reservations().insert(
                        for_model.clone(),
                        Reservation {
                            bytes: needed,
                            staged_then,
                        },
                    );
                    return Ok(());
                }
                Decision::OverBudget { needed, available } => {
                    let kept: Vec<String> = snapshot
                        .candidates
                        .iter()
                        .filter(|c| c.pinned || c.busy)
                        .map(|c| {
                            format!(
                                "{:?} ({})",
                                c.what,
                                if c.pinned { "pinned" } else { "in use or read" }
                            )
                        })
                        .collect();
                    info!(model.name = %for_model, "{for_model} does not fit: kept {}", kept.join(", "));
                    return Err(PrefetchError::OverBudget { needed, available });
                }
                Decision::Reclaim(items) => {
                    for item in items {
                        if let Removed::Busy = self.reclaim(for_model, &item)? {
                            busy.insert(item.model().clone());
                            break;
                        }
                    }
                }
            }
        }
    }

    fn reservations(&self) -> std::sync::MutexGuard<'_, BTreeMap<ModelName, Reservation>> {
        self.reservations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends `name`'s reservation (its job ended, whatever the outcome).
    pub(super) fn release_reservation(&self, name: &ModelName) {
        self.reservations().remove(name);
    }

    fn budget_snapshot(
        &self,
        for_model: &ModelName,
        needed: u64,
        limit: u64,
        busy: &BTreeSet<ModelName>,
    ) -> Snapshot {
        let root = self.layout.root();
        // What dfdaemon keeps on the cache filesystem (its storage, shown to it from
        // `dragonfly/`) fills the same disk: counted, never removed by the budget (dfdaemon
        // evicts its own by its GC thresholds).
        let used =
            dir_bytes(&root.join("store")) + dir_bytes(&root.join("staging")) + foreign_bytes(root);
        let reserved = self
            .reservations()
            .iter()
            .filter(|(name, _)| *name != for_model)
            .map(|(name, r)| {
                let written =
                    dir_bytes(&self.layout.staging_dir(name)).saturating_sub(r.staged_then);
                r.bytes.saturating_sub(written)
            })
            .sum();
        // Revisions pods read: never removed, nor their models.
        let read: BTreeMap<ModelName, BTreeSet<String>> =
            crate::store::leases::models(&self.layout)
                .into_iter()
                .map(|name| {
                    let revisions = self
                        .readers(&name)
                        .into_iter()
                        .map(|h| h.revision)
                        .collect();
                    (name, revisions)
                })
                .collect();
        let entries = self.lock();
        // (pinned, has a job, is held or is read, last used) of a model other than `for_model`.
        let facts = |name: &ModelName| {
            let entry = entries.get(name.as_str());
            let pinned = entry.is_some_and(|e| e.spec.pin);
            let taken = busy.contains(name)
                || entry.is_some_and(|e| e.job.is_some())
                || read.contains_key(name);
            let used = entry.map_or_else(|| self.link_mtime(name), |e| e.last_used);
            (pinned, taken, used)
        };
        let mut candidates = Vec::new();
        for name in model_dirs(&root.join("staging")) {
            if &name == for_model {
                continue;
            }
            let (pinned, taken, last_used) = facts(&name);
            candidates.push(Candidate {
                bytes: dir_bytes(&self.layout.staging_dir(&name)),
                what: Reclaim::Partials(name),
                last_used,
                pinned,
                busy: taken,
            });
        }
        for name in model_dirs(&root.join("store")) {
            let linked = self.layout.published_revision(&name);
            let (pinned, taken, last_used) = if &name == for_model {
                // Its own old revisions: the caller holds its lock and publishes only later.
                (false, false, SystemTime::UNIX_EPOCH)
            } else {
                facts(&name)
            };
            let model_store = root.join("store").join(name.as_str());
            for revision in visible_entries(&model_store) {
                if linked.as_deref() == Some(revision.as_str()) {
                    continue;
                }
                let is_read = read.get(&name).is_some_and(|r| r.contains(&revision));
                candidates.push(Candidate {
                    bytes: dir_bytes(&model_store.join(&revision)),
                    what: Reclaim::Revision(name.clone(), revision),
                    last_used,
                    pinned: false,
                    busy: is_read || (taken && &name != for_model),
                });
            }
            if let Some(revision) = linked.filter(|_| &name != for_model) {
                candidates.push(Candidate {
                    bytes: dir_bytes(&model_store.join(revision)),
                    what: Reclaim::Model(name),
                    last_used,
                    pinned,
                    busy: taken,
                });
            }
        }
        Snapshot {
            limit,
            used,
            reserved,
            needed,
            candidates,
        }
    }

    /// Removes one thing the budget chose, holding its model's lock (`for_model`'s is already
    /// held by the caller).
    fn reclaim(&self, for_model: &ModelName, item: &Reclaim) -> Result<Removed, PrefetchError> {
        let name = item.model();
        let _held = if name == for_model {
            None
        } else {
            match try_lock(&self.layout, name, "modelcache agent, making room")? {
                TryLock::Held(lock) => Some(lock),
                TryLock::Busy(_) => return Ok(Removed::Busy),
            }
        };
        if name != for_model
            && self
                .lock()
                .get(name.as_str())
                .is_some_and(|e| e.job.is_some())
        {
            return Ok(Removed::Busy);
        }
        match item {
            Reclaim::Partials(_) => {
                let dir = self.layout.staging_dir(name);
                info!(model.name = %name, path = %dir.display(), "removing the partial download of {name} ({}) to make room for {for_model}: no job is finishing it", dir.display());
                remove_dir(&dir)?;
                self.layout.remove_progress(name);
            }
            Reclaim::Revision(_, revision) => {
                let store = self.layout.root().join("store").join(name.as_str());
                let aside = {
                    let _guard = self.lease_guard();
                    if !crate::store::leases::readers_of(&self.layout, name, revision).is_empty() {
                        return Ok(Removed::Busy);
                    }
                    self.set_aside(&store, revision)?
                };
                info!(model.name = %name, path = %store.join(revision).display(), "removing unlinked revision {} to stay within the cache budget", store.join(revision).display());
                remove_dir(&aside)?;
            }
            Reclaim::Model(_) => {
                let Some(aside) = self.unlink_unless_read(name)? else {
                    return Ok(Removed::Busy);
                };
                info!(model.name = %name, "evicting {name} (least recently used, unpinned) to make room for {for_model}");
                self.remove_unlinked(name, &aside)?;
                self.forget_files(name);
                self.metrics.evicted();
            }
        }
        Ok(Removed::Done)
    }

    /// Under the lease guard, unless a pod reads the model (then `None`): removes its link,
    /// sets its store directory aside and marks its entry as having no revision, so no lease
    /// can be recorded on it any more and a reader asking for it has it fetched again. The
    /// caller holds the model's lock.
    fn unlink_unless_read(&self, name: &ModelName) -> Result<Option<Unlinked>, PrefetchError> {
        let _guard = self.lease_guard();
        if !self.readers(name).is_empty() {
            return Ok(None);
        }
        let link = self.layout.model_link(name);
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PrefetchError::local("remove", link, e)),
        }
        fsync_dir(&self.layout.root().join("models"))?;
        if let Some(entry) = self.lock().get_mut(name.as_str()) {
            entry.revision = None;
        }
        let store_root = self.layout.root().join("store");
        let store = store_root.join(name.as_str());
        let aside = store_root.join(format!(".{name}.removing-{}", std::process::id()));
        match std::fs::rename(&store, &aside) {
            Ok(()) => {
                fsync_dir(&store_root)?;
                Ok(Some(Unlinked(Some(aside))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(Unlinked(None))),
            Err(e) => Err(PrefetchError::local("rename", store, e)),
        }
    }

    /// Removes what [`Models::unlink_unless_read`] set aside, and the model's staging.
    fn remove_unlinked(&self, name: &ModelName, unlinked: &Unlinked) -> Result<(), PrefetchError> {
        if let Some(aside) = &unlinked.0 {
            remove_dir(aside)?;
        }
        self.layout.remove_progress(name);
        remove_dir(&self.layout.staging_dir(name))
    }

    /// Updates the registry after a model's files were removed.
    fn forget_files(&self, name: &ModelName) {
        let mut entries = self.lock();
        let Some(entry) = entries.get_mut(name.as_str()) else {
            return;
        };
        match lifecycle::after_removal(entry.facts()) {
            AfterRemoval::Forget => {
                entries.remove(name.as_str());
            }
            AfterRemoval::Reset => {
                entry.state = State::Pending;
                entry.revision = None;
                entry.verification = None;
                entry.signature = None;
                entry.warm = None;
            }
        }
    }

    /// `DELETE /v1/models/NAME`: removes an unpinned, idle model, holding its lock so no job,
    /// eviction or `modelcache prefetch` touches its files meanwhile.
    pub fn evict(&self, name: &str) -> Result<(), ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason}); nothing is removed until they are"
            )));
        }
        let check = |models: &Self| -> Result<(), ModelError> {
            let readers = models.readers(&model);
            let entries = models.lock();
            let facts = entries.get(name).map(|entry| {
                let mut facts = entry.facts();
                facts.leased = !readers.is_empty();
                facts
            });
            match facts {
                None if !models.layout.model_link(&model).exists() && readers.is_empty() => {
                    Err(ModelError::NotFound(name.to_string()))
                }
                None if readers.is_empty() => Ok(()),
                None => Err(read_by(name, &readers)),
                Some(facts) => lifecycle::may_remove(facts).map_err(|keep| match keep {
                    Keep::Pinned => ModelError::Conflict(format!(
                        "{name} is pinned and is never evicted (hint: unpin it in the configuration)"
                    )),
                    Keep::Busy(job) => ModelError::Conflict(format!(
                        "{name} has a prefetch in flight (job {job}); try again when it ends"
                    )),
                    Keep::Leased => read_by(name, &readers),
                }),
            }
        };
        check(self)?;
        let _held = match try_lock(&self.layout, &model, "modelcache agent, DELETE")
            .map_err(|e| ModelError::Internal(error_chain(&e)))?
        {
            TryLock::Held(lock) => lock,
            TryLock::Busy(who) => {
                return Err(ModelError::Conflict(format!(
                    "{name} is in use by {who}; try again when it finishes"
                )));
            }
        };
        // Again under the lock: a job may have started and finished in between.
        check(self)?;
        let unlinked = self
            .unlink_unless_read(&model)
            .map_err(|e| ModelError::Internal(error_chain(&e)))?
            .ok_or_else(|| read_by(name, &self.readers(&model)))?;
        self.remove_unlinked(&model, &unlinked)
            .map_err(|e| ModelError::Internal(error_chain(&e)))?;
        self.forget_files(&model);
        info!(model.name = %name, "evicted {name}");
        self.metrics.evicted();
        Ok(())
    }
}

/// What [`Models::unlink_unless_read`] set aside for removal: the model's store directory
/// under a hidden name, if it had one.
struct Unlinked(Option<std::path::PathBuf>);

/// `DELETE` of a model pods read: 409 naming them.
fn read_by(name: &str, readers: &[crate::store::leases::Held]) -> ModelError {
    let pods: Vec<String> = readers
        .iter()
        .map(|h| format!("{} (revision {})", h.pod, h.revision))
        .collect();
    ModelError::Conflict(format!(
        "{name} is read by pods on this node: {}; it is removed only when they are gone",
        pods.join(", ")
    ))
}

/// Bytes another principal (dfdaemon) holds under `root/dragonfly`: blocks really allocated
/// (a sparse file's holes hold nothing, so a hostile one cannot make every decision come out
/// over budget), each inode once, and none that is also a file of the cache's (an agent before
/// published dfdaemon's inodes as they were). Reflinked clones are counted on both sides: the
/// estimate errs toward evicting early, never toward a full disk.
pub(super) fn foreign_bytes(root: &Path) -> u64 {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt as _;
    fn walk(dir: &Path, each: &mut dyn FnMut(&std::fs::Metadata)) {
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in read.flatten() {
            // Not following links: only what is under the directory counts.
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() {
                walk(&entry.path(), each);
            } else if meta.is_file() {
                each(&meta);
            }
        }
    }
    let mut ours: HashSet<(u64, u64)> = HashSet::new();
    for dir in ["store", "staging"] {
        walk(&root.join(dir), &mut |m| {
            if m.nlink() > 1 {
                ours.insert((m.dev(), m.ino()));
            }
        });
    }
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut bytes = 0u64;
    walk(&root.join("dragonfly"), &mut |m| {
        let key = (m.dev(), m.ino());
        if !ours.contains(&key) && seen.insert(key) {
            bytes = bytes.saturating_add(m.blocks().saturating_mul(512));
        }
    });
    bytes
}

/// The model names of the directories under `dir` (hidden and invalid names skipped).
pub(super) fn model_dirs(dir: &Path) -> Vec<ModelName> {
    visible_entries(dir)
        .iter()
        .filter_map(|n| ModelName::new(n).ok())
        .collect()
}

/// The names of the directories under `dir` that do not start with `.`, sorted.
pub(super) fn visible_entries(dir: &Path) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn name(n: &str) -> ModelName {
        ModelName::new(n).unwrap()
    }

    fn model(n: &str, bytes: u64, age: u64) -> Candidate {
        Candidate {
            what: Reclaim::Model(name(n)),
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 - age),
            pinned: false,
            busy: false,
        }
    }

    fn snapshot(used: u64, reserved: u64, needed: u64, candidates: Vec<Candidate>) -> Snapshot {
        Snapshot {
            limit: 100,
            used,
            reserved,
            needed,
            candidates,
        }
    }

    /// Issue 25: dfdaemon's storage counts by what it really holds: a sparse file counts
    /// nothing for its holes, a file with two names once, and an inode the cache shares none.
    #[test]
    fn issue25_dfdaemon_storage_counts_by_allocated_blocks_once() {
        let root = tempfile::tempdir().unwrap();
        let df = root.path().join("dragonfly/storage/content");
        std::fs::create_dir_all(&df).unwrap();
        let store = root.path().join("store/m/r1");
        std::fs::create_dir_all(&store).unwrap();
        let sparse = std::fs::File::create(df.join("sparse")).unwrap();
        sparse.set_len(1 << 40).unwrap();
        assert!(foreign_bytes(root.path()) < 1 << 20);
        std::fs::write(df.join("task"), vec![1u8; 1 << 20]).unwrap();
        std::fs::hard_link(df.join("task"), df.join("task-link")).unwrap();
        let counted = foreign_bytes(root.path());
        assert!((1 << 20..2 << 20).contains(&counted), "{counted}");
        std::fs::hard_link(df.join("task"), store.join("shard")).unwrap();
        assert!(foreign_bytes(root.path()) < 1 << 20);
    }

    #[test]
    fn what_fits_removes_nothing() {
        assert_eq!(
            decide(&snapshot(40, 0, 60, vec![model("a", 40, 1)])),
            Decision::Fits
        );
    }

    #[test]
    fn the_least_recently_used_idle_model_goes_first_and_only_as_many_as_needed() {
        let decision = decide(&snapshot(
            90,
            0,
            30,
            vec![
                model("new", 30, 1),
                model("old", 30, 9),
                model("mid", 30, 5),
            ],
        ));
        assert_eq!(
            decision,
            Decision::Reclaim(vec![Reclaim::Model(name("old"))])
        );
    }

    #[test]
    fn partials_and_old_revisions_go_before_any_published_model() {
        let partials = Candidate {
            what: Reclaim::Partials(name("gone")),
            ..model("gone", 10, 0)
        };
        let revision = Candidate {
            what: Reclaim::Revision(name("b"), "r1".into()),
            ..model("b", 10, 0)
        };
        let decision = decide(&snapshot(
            100,
            0,
            20,
            vec![model("a", 50, 99), revision, partials],
        ));
        assert_eq!(
            decision,
            Decision::Reclaim(vec![
                Reclaim::Partials(name("gone")),
                Reclaim::Revision(name("b"), "r1".into())
            ])
        );
    }

    #[test]
    fn pinned_and_busy_models_are_never_chosen_and_nothing_goes_when_it_cannot_fit() {
        let mut pinned = model("pinned", 50, 9);
        pinned.pinned = true;
        let mut busy = model("busy", 40, 9);
        busy.busy = true;
        let decision = decide(&snapshot(100, 0, 20, vec![pinned.clone(), busy.clone()]));
        assert_eq!(
            decision,
            Decision::OverBudget {
                needed: 20,
                available: 0
            }
        );
        // One idle model is not enough either: nothing is removed for a lost cause.
        let decision = decide(&snapshot(
            100,
            0,
            30,
            vec![pinned, busy, model("idle", 10, 1)],
        ));
        assert_eq!(
            decision,
            Decision::OverBudget {
                needed: 30,
                available: 10
            }
        );
    }

    /// Two models that each fit alone, starting together: the second sees the first's
    /// reservation and is refused instead of both overflowing the budget.
    #[test]
    fn a_reservation_counts_like_bytes_on_disk() {
        assert_eq!(decide(&snapshot(0, 0, 60, Vec::new())), Decision::Fits);
        assert_eq!(
            decide(&snapshot(0, 60, 60, Vec::new())),
            Decision::OverBudget {
                needed: 60,
                available: 40
            }
        );
        // And what can be reclaimed is reclaimed for it.
        assert_eq!(
            decide(&snapshot(30, 60, 40, vec![model("idle", 30, 1)])),
            Decision::Reclaim(vec![Reclaim::Model(name("idle"))])
        );
    }
}
