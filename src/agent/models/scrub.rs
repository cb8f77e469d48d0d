//! Background scrub: re-hashes published models at a bounded rate against the hashes recorded
//! at publish (the manifest's, or those computed while downloading), because a flipped byte
//! whose modification time was kept passes every cheap check. It covers the linked revision of
//! each model and every older revision that pods still lease.
//!
//! A mismatch in the linked revision marks it damaged (so `wait` and `/readyz` stop calling it
//! ready), stages its intact files for the repair, and starts a job that fetches just the bad
//! files and publishes a new revision directory atomically. A mismatch in a leased older
//! revision is marked and reported: it cannot be rewritten under the pods that read it.
//!
//! Files whose bytes match but whose modification time changed (a `touch`, a backup tool) get
//! the new time recorded, so the cheap check passes again. The same pass, at full speed, is the
//! re-verification a reader or the readiness probe starts when a model marked ready is no
//! longer intact ([`Models::recheck`]).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Models, State};
use crate::config::agent::ScrubPolicy;
use crate::config::human_bytes;
use crate::fetch::error_chain;
use crate::fetch::journal::{Journal, JournalLine, hex};
use crate::store::lock::{TryLock, try_lock};
use crate::store::{Layout, ModelName, ReadyFile, ReadyMarker, StoreError, Verification};
use crate::verify::cached::{expected_blake3, read_manifest_copy};
use crate::verify::hash::{PieceDigest, PieceHasher, combine, piece_count};

/// Why one model's scrub stopped.
#[derive(Debug, thiserror::Error)]
enum ScrubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("stopped")]
    Stopped,
}

/// One file's fresh hash: its piece digests (for the repair's journal), their root, and its
/// modification time before and after the read.
struct Hashed {
    digests: Vec<PieceDigest>,
    hex: String,
    mtime_before: Option<u64>,
    mtime_after: Option<u64>,
}

/// How often a pass tries again a model someone held, and how long it waits between tries.
const BUSY_RETRIES: u32 = 10;
const BUSY_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(3);

/// What a scrub of one revision found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scrubbed {
    /// Every file matches.
    Intact,
    /// Some do not: marked damaged (and, when linked, being repaired).
    Damaged,
    /// Someone holds the model: not checked now.
    Busy,
}

impl Models {
    /// Scrubs every ready model, one at a time, then again `policy.interval` after the start
    /// of each pass, until `stop` fires.
    pub async fn scrub(self: Arc<Self>, policy: ScrubPolicy, stop: CancellationToken) {
        loop {
            let started = Instant::now();
            let ready: Vec<ModelName> = self
                .lock()
                .values()
                .filter(|e| e.state == State::Ready && e.revision.is_some() && e.job.is_none())
                .map(|e| e.spec.name.clone())
                .collect();
            // A model someone holds (a lease pass removing an old revision, a recheck, a
            // hand-run prefetch) is tried again shortly, not a whole interval later.
            let mut pending = ready;
            for round in 0..=BUSY_RETRIES {
                let mut busy = Vec::new();
                for name in pending {
                    match self.scrub_model(&name, policy.rate, &stop).await {
                        Ok(Scrubbed::Busy) => busy.push(name),
                        Ok(_) => {}
                        Err(ScrubError::Stopped) => return,
                        Err(e) => {
                            warn!(model.name = %name, "{name}: scrub failed: {}", error_chain(&e));
                        }
                    }
                }
                if busy.is_empty() || round == BUSY_RETRIES {
                    break;
                }
                pending = busy;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(BUSY_RETRY_DELAY) => {}
                }
            }
            let pause = policy.interval.saturating_sub(started.elapsed());
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Scrubs `name`'s linked revision and every other revision pods lease; `Busy` when
    /// someone held the model.
    async fn scrub_model(
        self: &Arc<Self>,
        name: &ModelName,
        rate: u64,
        stop: &CancellationToken,
    ) -> Result<Scrubbed, ScrubError> {
        let linked = self.layout.published_revision(name);
        if let Some(revision) = &linked {
            if let Scrubbed::Busy = self
                .scrub_revision(name, revision, true, rate, stop)
                .await?
            {
                return Ok(Scrubbed::Busy);
            }
        }
        let mut leased: Vec<String> = self
            .readers(name)
            .into_iter()
            .map(|h| h.revision)
            .filter(|r| Some(r) != linked.as_ref())
            .collect();
        leased.sort();
        leased.dedup();
        for revision in leased {
            if let Scrubbed::Busy = self
                .scrub_revision(name, &revision, false, rate, stop)
                .await?
            {
                return Ok(Scrubbed::Busy);
            }
        }
        Ok(Scrubbed::Intact)
    }

    /// A model marked ready has no intact revision (a reader or the readiness probe found a
    /// file changed since publish): re-hash the revision it serves now, at full speed. Matching
    /// bytes are ready again with their new times recorded (when that revision still is what
    /// the model's configuration asks for); changed ones are repaired or fetched again. One at
    /// a time per model; the model reads `verifying` meanwhile, also while someone else holds
    /// the model (the background scrub, a `modelcache prefetch`), which is waited for.
    pub(super) fn recheck(self: &Arc<Self>, name: &ModelName) {
        let revision = {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(name.as_str()) else {
                return;
            };
            if entry.rechecking || entry.job.is_some() {
                return;
            }
            entry.rechecking = true;
            entry.state = State::Verifying;
            entry
                .revision
                .clone()
                .or_else(|| self.layout.published_revision(name))
        };
        warn!(model.name = %name, "{name}: marked ready, but a file of its revision changed since publish (size or modification time): verifying it again before anyone reads it");
        let models = Arc::clone(self);
        let name = name.clone();
        tokio::spawn(async move {
            let outcome = loop {
                let Some(revision) = &revision else {
                    break Ok(Scrubbed::Damaged);
                };
                let linked = models.layout.published_revision(&name).as_ref() == Some(revision);
                let outcome = models
                    .scrub_revision(&name, revision, linked, u64::MAX, &CancellationToken::new())
                    .await;
                if !matches!(outcome, Ok(Scrubbed::Busy)) {
                    break outcome;
                }
                // Held by a job, a scrub or a `modelcache prefetch`: asked again shortly.
                tokio::time::sleep(Duration::from_secs(2)).await;
                if !models.lock().contains_key(name.as_str()) {
                    return;
                }
            };
            let mut entries = models.lock();
            let Some(entry) = entries.get_mut(name.as_str()) else {
                return;
            };
            entry.rechecking = false;
            if entry.state != State::Verifying {
                // The repair took over (state pending, a job fetching the changed files).
                return;
            }
            let serves = revision.as_ref().is_some_and(|r| {
                let dir = models.layout.revision_dir(&name, r);
                ReadyMarker::read(&dir).is_ok_and(|m| {
                    m.files_present(&dir)
                        && super::why_not_handed_out(entry.configured, &entry.spec, &m).is_none()
                })
            });
            match outcome {
                Ok(Scrubbed::Intact) if serves => {
                    entry.state = State::Ready;
                    entry.revision = revision;
                    info!(model.name = %name, "{name}: every byte matches what was published: ready");
                }
                _ => {
                    if let Err(e) = &outcome {
                        error!(model.name = %name, "{name}: could not verify it again: {}; fetching it again", error_chain(e));
                    }
                    entry.state = State::Pending;
                    entry.revision = None;
                    if entry.job.is_none() {
                        models.spawn_job_locked(&mut entries, name.as_str());
                    }
                }
            }
        });
    }

    /// Re-hashes one revision directory at `rate` bytes a second. `linked`: a mismatch starts
    /// a repair; otherwise it is marked and reported.
    async fn scrub_revision(
        self: &Arc<Self>,
        name: &ModelName,
        dir_name: &str,
        linked: bool,
        rate: u64,
        stop: &CancellationToken,
    ) -> Result<Scrubbed, ScrubError> {
        // A model someone works on is skipped this pass: its files are changing anyway.
        let TryLock::Held(held) = try_lock(&self.layout, name, "modelcache agent, scrubbing")?
        else {
            return Ok(Scrubbed::Busy);
        };
        let dir = self.layout.revision_dir(name, dir_name);
        // Gone, unreadable, or already found damaged (a repair is under way): nothing to check.
        let Ok(mut marker) = ReadyMarker::read(&dir) else {
            return Ok(Scrubbed::Damaged);
        };
        if !marker.damaged.is_empty() {
            return Ok(Scrubbed::Damaged);
        }
        let manifest = read_manifest_copy(&dir)?;
        let chunk = self.config.fetch.chunk_size;
        let started = Instant::now();
        let mut bytes = 0;
        let mut intact: Vec<(ReadyFile, Hashed)> = Vec::new();
        let mut bad: Vec<String> = Vec::new();
        let mut retimed = 0;
        for file in &mut marker.files {
            let path = dir.join(&file.path);
            let Some(expected) = expected_blake3(manifest.as_ref(), file) else {
                // Nothing to hash it against: only the cheap check can speak for it.
                let same = std::fs::metadata(&path).is_ok_and(|m| {
                    m.is_file()
                        && m.len() == file.size
                        && (file.mtime_ns.is_none() || file.mtime_ns == crate::store::mtime_ns(&m))
                });
                if !same {
                    bad.push(file.path.clone());
                }
                continue;
            };
            let stop_reading = stop.clone();
            let size = file.size;
            let want = expected.clone();
            let hashed = tokio::task::spawn_blocking(move || {
                // A published file with another name (dfdaemon's task file, from an agent that
                // published dfdaemon's inode as it was) is taken into an inode of the agent's
                // own first, and that is what is hashed and kept.
                match private_copy(&path, size)? {
                    Some(copy) => {
                        let hashed = hash_at_rate(&copy, chunk, rate, &stop_reading);
                        if hashed.as_ref().is_ok_and(|h| h.hex == want) {
                            std::fs::rename(&copy, &path)?;
                            if let Some(parent) = path.parent() {
                                std::fs::File::open(parent)?.sync_all()?;
                            }
                        } else {
                            let _ = std::fs::remove_file(&copy);
                        }
                        hashed.map(|h| (h, true))
                    }
                    None => hash_at_rate(&path, chunk, rate, &stop_reading).map(|h| (h, false)),
                }
            })
            .await
            .map_err(|_| ScrubError::Stopped)?;
            let (hashed, taken) = match hashed {
                Ok(h) => h,
                Err(_) if stop.is_cancelled() => return Err(ScrubError::Stopped),
                // Gone, shorter, unreadable: not what was published.
                Err(_) => {
                    bad.push(file.path.clone());
                    continue;
                }
            };
            bytes += file.size;
            self.metrics.scrubbed(file.size);
            if hashed.hex != expected {
                bad.push(file.path.clone());
                continue;
            }
            if taken {
                info!(model.name = %name, revision = %dir_name, blob.path = %file.path, "{name}: {} shared its inode with another name (dfdaemon's task file); it is now a copy of the agent's own", file.path);
            }
            // Its bytes are the published ones: a new time (a `touch`) is recorded, unless the
            // file changed while it was read.
            if hashed.mtime_before == hashed.mtime_after
                && hashed.mtime_before.is_some()
                && file.mtime_ns.is_some()
                && file.mtime_ns != hashed.mtime_before
            {
                file.mtime_ns = hashed.mtime_before;
                retimed += 1;
            }
            intact.push((file.clone(), hashed));
        }
        if bad.is_empty() {
            if retimed > 0 {
                marker.write(&dir)?;
                warn!(model.name = %name, revision = %dir_name, "{name}: revision {dir_name}: {retimed} file(s) had a new modification time but the published bytes; recorded the new times");
            }
            info!(model.name = %name, revision = %dir_name, phase = "scrub", size_bytes = bytes, "{name}: scrubbed revision {dir_name}, {} in {:.1} s, every file intact", human_bytes(bytes), started.elapsed().as_secs_f64());
            return Ok(Scrubbed::Intact);
        }
        self.metrics
            .scrub_mismatches(u64::try_from(bad.len()).unwrap_or(u64::MAX));
        if !linked {
            error!(model.name = %name, revision = %dir_name, "{name}: revision {dir_name}, which pods still read, has {} file(s) changed since publish ({}); it is marked damaged (it cannot be repaired under its readers: restart them to read the current revision)", bad.len(), bad.join(", "));
            marker.damaged.clone_from(&bad);
            marker.write(&dir)?;
            return Ok(Scrubbed::Damaged);
        }
        error!(model.name = %name, "{name}: the scrub found {} file(s) changed since publish ({}); fetching just those again", bad.len(), bad.join(", "));
        let checked = marker.verification == Verification::Md5;
        stage_repair(&self.layout, name, &dir, &intact, chunk, checked)?;
        marker.damaged.clone_from(&bad);
        marker.write(&dir)?;
        drop(held);
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(name.as_str()) {
            // Its bytes are wrong: not ready until repaired.
            entry.state = State::Pending;
            entry.revision = None;
            entry.last_error = Some(format!(
                "the scrub found {} file(s) changed since publish ({}); re-fetching them",
                bad.len(),
                bad.join(", ")
            ));
            if entry.job.is_none() {
                self.spawn_job_locked(&mut entries, name.as_str());
            }
        }
        Ok(Scrubbed::Damaged)
    }
}

/// A copy of `path` in an inode of the agent's own (a reflink where the filesystem can), beside
/// it under a hidden name, when `path` has another name; `None` when it has none.
fn private_copy(path: &Path, size: u64) -> std::io::Result<Option<std::path::PathBuf>> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.nlink() <= 1 {
        return Ok(None);
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let copy = path.with_file_name(format!(".{file_name}.private-{}", std::process::id()));
    let from = std::fs::File::open(path)?;
    let to = crate::store::take::create_own(&copy, size).map_err(std::io::Error::other)?;
    crate::store::take::clone_range(&from, &to, 0, size)?;
    to.sync_all()?;
    Ok(Some(copy))
}

/// Hashes a file piece by piece, reading at most `rate` bytes a second (the scrub must not
/// compete with vLLM reading the same disks); fails with `Interrupted` when `stop` fires.
fn hash_at_rate(
    path: &Path,
    chunk: u64,
    rate: u64,
    stop: &CancellationToken,
) -> std::io::Result<Hashed> {
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let size = meta.len();
    let mtime_before = crate::store::mtime_ns(&meta);
    let count = piece_count(size, chunk);
    let started = Instant::now();
    let mut read_total: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut digests = Vec::new();
    for index in 0..count {
        let mut hasher = PieceHasher::new(index * chunk, count <= 1);
        let mut left = chunk.min(size - index * chunk);
        while left > 0 {
            if stop.is_cancelled() {
                return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
            }
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
            read_total += n as u64;
            if rate < u64::MAX {
                #[expect(clippy::cast_precision_loss, reason = "a pacing delay")]
                let due = Duration::from_secs_f64(read_total as f64 / rate.max(1) as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        digests.push(hasher.finish());
    }
    let hex = combine(&digests).to_hex().to_string();
    let mtime_after = crate::store::mtime_ns(&file.metadata()?);
    Ok(Hashed {
        digests,
        hex,
        mtime_before,
        mtime_after,
    })
}

/// Links the intact files of a damaged revision into `staging/NAME` and journals their ranges,
/// so the repair's resume keeps them and fetches only the others. The links share inodes with
/// the published files, which nothing ever writes; the resume drops such a partial rather than
/// write into it (see `fetch::resume`).
fn stage_repair(
    layout: &Layout,
    name: &ModelName,
    dir: &Path,
    intact: &[(ReadyFile, Hashed)],
    chunk: u64,
    checked: bool,
) -> Result<(), StoreError> {
    let staging = layout.staging_dir(name);
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StoreError::Io {
                action: "remove",
                path: staging,
                source: e,
            });
        }
    }
    let mut lines = Vec::new();
    for (file, hashed) in intact {
        // A marker from before ETags were recorded cannot be matched to a listing: fetched.
        let Some(etag) = &file.etag else { continue };
        let partial = layout.partial_path(name, &file.path);
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
        }
        let published = dir.join(&file.path);
        std::fs::hard_link(&published, &partial).map_err(StoreError::io("link", &published))?;
        for (index, digest) in hashed.digests.iter().enumerate() {
            lines.push(JournalLine {
                path: file.path.clone(),
                size: file.size,
                etag: etag.clone(),
                chunk,
                index: index as u64,
                digest: hex(digest),
                checked,
            });
        }
    }
    std::fs::create_dir_all(&staging).map_err(StoreError::io("create", &staging))?;
    Journal::rewrite(&layout.journal_path(name), &lines)?;
    Ok(())
}
