//! Readers' leases: which pod reads which revision of a model.
//!
//! ```text
//! leases/NAME/POD_UID    {"revision": "9b45b9d87cc1b043", "since": "2026-12-04T16:35:41Z"}
//! ```
//!
//! A consumer resolves `models/NAME` once and reads that revision directory for its whole life
//! (vLLM opens shards one at a time, by path, in each tensor-parallel worker, so following the
//! link would mix two revisions across a refresh). A lease records that a pod does so. A leased
//! revision is never removed or rewritten in place: eviction, old-revision cleanup and a
//! repair's removal of a damaged copy all look here first. One lease per pod and model; a pod
//! that resolves again moves its lease.
//!
//! This module owns the records; whether a pod still exists is the agent's business (it drops
//! the lease when the pod is gone). The records live on the cache filesystem, so they survive
//! an agent restart, as the pods reading the cache do.

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

/// One lease: the revision directory a pod reads, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// The revision directory under `store/NAME/` (a repaired copy is `REVISION-N`).
    pub revision: String,
    /// When the pod resolved it, RFC 3339.
    pub since: String,
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
}

fn dir(layout: &Layout, name: &ModelName) -> PathBuf {
    layout.root().join("leases").join(name.as_str())
}

/// Every lease on `name`, sorted by pod. Records that cannot be read are skipped: a lease is
/// only ever written whole (a rename), so such a file is not one of ours.
pub fn of_model(layout: &Layout, name: &ModelName) -> Vec<Held> {
    let Ok(entries) = std::fs::read_dir(dir(layout, name)) else {
        return Vec::new();
    };
    let mut held: Vec<Held> = entries
        .flatten()
        .filter_map(|e| {
            let pod = PodUid::new(&e.file_name().to_string_lossy()).ok()?;
            let bytes = std::fs::read(e.path()).ok()?;
            let lease: Lease = serde_json::from_slice(&bytes).ok()?;
            Some(Held {
                pod,
                revision: lease.revision,
                since: lease.since,
            })
        })
        .collect();
    held.sort_by(|a, b| a.pod.cmp(&b.pod));
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

/// Every model with leases.
pub fn models(layout: &Layout) -> Vec<ModelName> {
    let Ok(entries) = std::fs::read_dir(layout.root().join("leases")) else {
        return Vec::new();
    };
    let mut names: Vec<ModelName> = entries
        .flatten()
        .filter_map(|e| ModelName::new(&e.file_name().to_string_lossy()).ok())
        .collect();
    names.sort();
    names
}

/// Records that `pod` reads revision directory `revision` of `name` (replacing its earlier
/// lease on `name`), durably: the record must outlive an agent restart.
pub fn record(
    layout: &Layout,
    name: &ModelName,
    pod: &PodUid,
    revision: &str,
) -> Result<(), StoreError> {
    let dir = dir(layout, name);
    std::fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
    let lease = Lease {
        revision: revision.to_string(),
        since: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let path = dir.join(pod.as_str());
    let json = serde_json::to_vec(&lease).map_err(|source| StoreError::Marker {
        path: path.clone(),
        source,
    })?;
    let tmp = dir.join(format!(".{pod}.tmp-{}", std::process::id()));
    super::write_synced(&tmp, &json)?;
    std::fs::rename(&tmp, &path).map_err(StoreError::io("rename", &tmp))?;
    fsync_dir(&dir)
}

/// Ends `pod`'s lease on `name`, if it has one.
pub fn end(layout: &Layout, name: &ModelName, pod: &PodUid) -> Result<(), StoreError> {
    let dir = dir(layout, name);
    let path = dir.join(pod.as_str());
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("remove", &path)(e)),
    }
    // The model's directory goes with its last lease (it is made again by the next one).
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_holds_one_lease_per_model_and_moves_it() {
        let root = tempfile::tempdir().unwrap();
        let layout = Layout::new(root.path());
        let m = ModelName::new("m").unwrap();
        let (a, b) = (PodUid::new("pod-a").unwrap(), PodUid::new("pod-b").unwrap());
        record(&layout, &m, &a, "r1").unwrap();
        record(&layout, &m, &b, "r1").unwrap();
        assert_eq!(readers_of(&layout, &m, "r1"), [a.clone(), b.clone()]);
        record(&layout, &m, &a, "r2").unwrap();
        assert_eq!(readers_of(&layout, &m, "r1"), std::slice::from_ref(&b));
        assert_eq!(readers_of(&layout, &m, "r2"), std::slice::from_ref(&a));
        end(&layout, &m, &b).unwrap();
        end(&layout, &m, &b).unwrap();
        assert!(readers_of(&layout, &m, "r1").is_empty());
        assert_eq!(models(&layout), std::slice::from_ref(&m));
        end(&layout, &m, &a).unwrap();
        assert!(models(&layout).is_empty());
    }

    #[test]
    fn pod_uids_are_single_safe_segments() {
        PodUid::new("4b0c2a36-9f5e-4b8e-8a63-1f2d3c4b5a69").unwrap();
        for bad in ["", "..", "a/b", "x y", &"a".repeat(65), "uid\0"] {
            assert!(PodUid::new(bad).is_err(), "{bad:?}");
        }
    }
}
