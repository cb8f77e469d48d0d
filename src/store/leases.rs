//! Readers' leases: which pod reads which revisions of a model.
//!
//! ```text
//! leases/NAME/POD_UID    {"leases": [{"revision": "9b45b9d87cc1b043", "since": "2026-12-04T16:35:41Z", "proved": true}]}
//! ```
//!
//! A consumer resolves `models/NAME` once and reads that revision directory for its whole life
//! (vLLM opens shards one at a time, by path, in each tensor-parallel worker, so following the
//! link would mix two revisions across a refresh). A lease records that a pod does so. A leased
//! revision is never removed or rewritten in place: eviction, old-revision cleanup and a
//! repair's removal of a damaged copy all look here first.
//!
//! A lease is the pod's: recording only ever adds (a pod that resolves twice holds both
//! revisions, since either may still be open in one of its processes), and only [`end`] takes
//! a pod's leases away, which the agent calls when the pod stops running or the operator
//! asks on the admin socket. No reader's request can move, shorten or end a lease.
//!
//! This module owns the records; whether a pod still runs is the agent's business. The records
//! live on the cache filesystem, so they survive an agent restart, as the pods reading the
//! cache do.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Layout, ModelName, StoreError, fsync_dir};

/// A pod's UID as the downward API gives it (`metadata.uid`): checked to be one safe path
/// segment before it names a file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PodUid(String);

impl PodUid {
    /// Validates a UID: 1 to 64 of `[A-Za-z0-9-]` (Kubernetes UIDs are RFC 4122 UUIDs).
    pub fn new(uid: &str) -> Result<Self, StoreError> {
        let ok = !uid.is_empty()
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(Self(uid.to_string()))
        } else {
            Err(StoreError::InvalidPod {
                uid: uid.chars().take(80).collect(),
            })
        }
    }

    /// The UID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One lease: a revision directory a pod reads, since when, and how the pod was known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The revision directory under `store/NAME/` (a repaired copy is `REVISION-N`).
    pub revision: String,
    /// When the pod resolved it, RFC 3339.
    pub since: String,
    /// The agent identified the pod itself (its process's cgroup, over the readers' socket);
    /// false when the reader named it (the read listener).
    #[serde(default)]
    pub proved: bool,
}

/// A pod's record: every revision of the model it holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    leases: Vec<Lease>,
}

/// The record of an agent before leases were add-only: one revision per pod.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneLease {
    revision: String,
    since: String,
}

impl Record {
    fn parse(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok().or_else(|| {
            let one: OneLease = serde_json::from_slice(bytes).ok()?;
            Some(Self {
                leases: vec![Lease {
                    revision: one.revision,
                    since: one.since,
                    proved: false,
                }],
            })
        })
    }
}

/// A lease with its pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// The pod.
    pub pod: PodUid,
    /// The revision directory it reads.
    pub revision: String,
    /// Since when, RFC 3339.
    pub since: String,
    /// Whether the agent identified the pod itself.
    pub proved: bool,
}

/// Largest lease record read: a pod holding a few hundred revisions of one model.
const RECORD_LIMIT: u64 = 64 * 1024;

fn dir(layout: &Layout, name: &ModelName) -> PathBuf {
    layout.root().join("leases").join(name.as_str())
}

fn read_record(path: &std::path::Path) -> Option<Record> {
    read_existing(path).ok().flatten()
}

/// The record at `path`: `None` when there is none; an error when one is there but cannot be
/// read whole (a write must never replace it with less than it holds).
fn read_existing(path: &std::path::Path) -> Result<Option<Record>, StoreError> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    let meta = file.metadata().map_err(StoreError::io("stat", path))?;
    if !meta.is_file() || meta.len() > RECORD_LIMIT {
        return Err(StoreError::io("read", path)(std::io::Error::other(
            format!("not a lease record of at most {RECORD_LIMIT} bytes"),
        )));
    }
    let mut bytes = Vec::new();
    file.take(RECORD_LIMIT)
        .read_to_end(&mut bytes)
        .map_err(StoreError::io("read", path))?;
    Record::parse(&bytes)
        .map(Some)
        .ok_or_else(|| StoreError::io("parse", path)(std::io::Error::other("not a lease record")))
}

/// Every lease on `name`, sorted by pod and then revision. Records that cannot be read are
/// skipped: a record is only ever written whole (a rename), so such a file is not one of ours
/// (the temporary files of a write cut short are never valid pod UIDs; [`sweep`] removes
/// them).
pub fn of_model(layout: &Layout, name: &ModelName) -> Vec<Held> {
    let Ok(entries) = std::fs::read_dir(dir(layout, name)) else {
        return Vec::new();
    };
    let mut held: Vec<Held> = entries
        .flatten()
        .filter_map(|e| {
            let pod = PodUid::new(&e.file_name().to_string_lossy()).ok()?;
            let record = read_record(&e.path())?;
            Some(
                record
                    .leases
                    .into_iter()
                    .map(|l| Held {
                        pod: pod.clone(),
                        revision: l.revision,
                        since: l.since,
                        proved: l.proved,
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect();
    held.sort_by(|a, b| (&a.pod, &a.revision).cmp(&(&b.pod, &b.revision)));
    held
}

/// The pods reading revision directory `revision` of `name`.
pub fn readers_of(layout: &Layout, name: &ModelName, revision: &str) -> Vec<PodUid> {
    of_model(layout, name)
        .into_iter()
        .filter(|h| h.revision == revision)
        .map(|h| h.pod)
        .collect()
}

/// Every model with at least one lease.
pub fn models(layout: &Layout) -> Vec<ModelName> {
    let Ok(entries) = std::fs::read_dir(layout.root().join("leases")) else {
        return Vec::new();
    };
    let mut names: Vec<ModelName> = entries
        .flatten()
        .filter_map(|e| ModelName::new(&e.file_name().to_string_lossy()).ok())
        .filter(|name| !of_model(layout, name).is_empty())
        .collect();
    names.sort();
    names
}

/// Records that `pod` reads revision directory `revision` of `name`, beside any revision it
/// already holds, durably: the record must outlive an agent restart. Recording a revision the
/// pod already holds keeps its first `since`; a proof, once made, stays.
pub fn record(
    layout: &Layout,
    name: &ModelName,
    pod: &PodUid,
    revision: &str,
    proved: bool,
) -> Result<(), StoreError> {
    let dir = dir(layout, name);
    std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
    let path = dir.join(pod.as_str());
    let mut record = read_existing(&path)?.unwrap_or_default();
    match record.leases.iter_mut().find(|l| l.revision == revision) {
        Some(lease) if lease.proved || !proved => return Ok(()),
        Some(lease) => lease.proved = true,
        None => record.leases.push(Lease {
            revision: revision.to_string(),
            since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            proved,
        }),
    }
    let json = serde_json::to_vec(&record).map_err(|source| StoreError::Marker {
        path: path.clone(),
        source,
    })?;
    let tmp = dir.join(format!(".{pod}.tmp-{}", std::process::id()));
    let written = super::write_synced(&tmp, &json)
        .and_then(|()| std::fs::rename(&tmp, &path).map_err(StoreError::io("rename", &tmp)));
    if let Err(e) = written {
        // A full disk must not leave a file behind that outlives this write.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    fsync_dir(&dir)
}

/// Ends every lease `pod` holds on `name`, if it has any. Returns whether it had.
pub fn end(layout: &Layout, name: &ModelName, pod: &PodUid) -> Result<bool, StoreError> {
    let dir = dir(layout, name);
    let path = dir.join(pod.as_str());
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(StoreError::io("remove", &path)(e)),
    }
    // The model's directory goes with its last lease (it is made again by the next one).
    let _ = std::fs::remove_dir(&dir);
    Ok(true)
}

/// Removes what writes cut short left under `leases/` (temporary files, which never count as
/// leases) and the directories of models left with no lease. The caller holds the agent's
/// lease guard, so no write is in flight. Returns the files removed.
pub fn sweep(layout: &Layout) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(models) = std::fs::read_dir(layout.root().join("leases")) else {
        return removed;
    };
    for model in models.flatten() {
        let Ok(entries) = std::fs::read_dir(model.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if file_name.starts_with('.')
                && file_name.contains(".tmp-")
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed.push(entry.path());
            }
        }
        let _ = std::fs::remove_dir(model.path());
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_holds_every_revision_it_resolved_until_its_leases_end() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let m = ModelName::new("m").unwrap();
        let (a, b) = (PodUid::new("pod-a").unwrap(), PodUid::new("pod-b").unwrap());
        record(&layout, &m, &a, "r1", false).unwrap();
        record(&layout, &m, &b, "r1", true).unwrap();
        assert_eq!(readers_of(&layout, &m, "r1"), [a.clone(), b.clone()]);
        // Resolving again adds: r1 is still a's (one of its processes may have it open).
        record(&layout, &m, &a, "r2", false).unwrap();
        assert_eq!(readers_of(&layout, &m, "r1"), [a.clone(), b.clone()]);
        assert_eq!(readers_of(&layout, &m, "r2"), std::slice::from_ref(&a));
        // A claim never weakens a proof.
        record(&layout, &m, &b, "r1", false).unwrap();
        assert!(of_model(&layout, &m).iter().any(|h| h.pod == b && h.proved));
        assert!(end(&layout, &m, &b).unwrap());
        assert!(!end(&layout, &m, &b).unwrap());
        assert_eq!(readers_of(&layout, &m, "r1"), std::slice::from_ref(&a));
        assert_eq!(models(&layout), std::slice::from_ref(&m));
        end(&layout, &m, &a).unwrap();
        assert!(models(&layout).is_empty());
    }

    #[test]
    fn records_of_the_one_lease_format_are_still_read() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let m = ModelName::new("m").unwrap();
        let d = dir(&layout, &m);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("pod-a"),
            r#"{"revision": "r1", "since": "2026-12-04T16:35:41Z"}"#,
        )
        .unwrap();
        let held = of_model(&layout, &m);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].revision, "r1");
        assert!(!held[0].proved);
        record(&layout, &m, &PodUid::new("pod-a").unwrap(), "r2", true).unwrap();
        assert_eq!(of_model(&layout, &m).len(), 2);
    }

    /// Issue 25: a write cut short (ENOSPC) leaves `.UID.tmp-PID`; it is no lease, the model
    /// counts as unread, and a sweep removes it.
    #[test]
    fn issue25_a_stray_temporary_file_is_no_lease_and_is_swept() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let m = ModelName::new("m").unwrap();
        let d = dir(&layout, &m);
        std::fs::create_dir_all(&d).unwrap();
        let stray = d.join(".pod-a.tmp-4242");
        std::fs::write(&stray, "{\"leases\": [").unwrap();
        assert!(of_model(&layout, &m).is_empty());
        assert!(models(&layout).is_empty());
        assert_eq!(sweep(&layout), std::slice::from_ref(&stray));
        assert!(!stray.exists());
        assert!(!d.exists());
    }

    #[test]
    fn pod_uids_are_single_safe_segments() {
        PodUid::new("4b0c2a36-9f5e-4b8e-8a63-1f2d3c4b5a69").unwrap();
        for bad in ["", "..", "a/b", "x y", &"a".repeat(65), "uid\0"] {
            assert!(PodUid::new(bad).is_err(), "{bad:?}");
        }
    }
}
