//! Readers: the pods that load a model from the cache, and what the agent owes them.
//!
//! A reader asks for a model ([`Models::reader`]); when it is ready, it gets the revision
//! directory to read for its whole life and, when it names its pod, a lease on it
//! ([`crate::store::leases`]). Asking is also how a pod that restarts after its model was
//! evicted gets it back: a model that is known but not being fetched is fetched again. While a
//! lease's pod exists on the node (its kubelet directory, `leases.pods_dir/UID`), nothing
//! removes or rewrites its revision; [`Models::maintain`] drops the leases of pods that are
//! gone and then removes the old revisions no one reads.
//!
//! Every removal of a revision directory by the agent, and every new lease, happens under one
//! guard ([`Models::lease_guard`]): a lease is only ever recorded on a revision that is there
//! and intact, and a revision is only ever removed when no lease names it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ModelError, ModelStatus, Models, State};
use crate::fetch::error_chain;
use crate::store::leases::{self, PodUid};
use crate::store::lock::{TryLock, try_lock};
use crate::store::{ModelName, ReadyMarker, fsync_dir};

/// What a reader is told.
#[derive(Debug, Clone)]
pub enum Reading {
    /// Ready: read this revision directory (`store/NAME/REVISION`) and nothing else.
    Ready {
        /// The revision directory.
        revision: String,
        /// The model's status.
        status: ModelStatus,
        /// Whether a lease was recorded for the pod the reader named.
        leased: bool,
    },
    /// Not ready yet; asked for if nothing was fetching it.
    Waiting(ModelStatus),
}

impl Models {
    /// A reader asks for `name`, naming its pod for a lease (or not).
    ///
    /// Ready: the linked revision, intact, is returned and the pod's lease recorded on it (a
    /// use, for LRU). Not ready and not being fetched (never fetched, or evicted): a prefetch
    /// starts, within what a request may ask (a model the agent knows: configured, or named by
    /// an earlier request); the caller polls again. A lease needs the pod to exist on this
    /// node.
    pub fn reader(self: &Arc<Self>, name: &str, pod: Option<&str>) -> Result<Reading, ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let pod = pod
            .map(|p| PodUid::new(p).map_err(|e| ModelError::Invalid(e.to_string())))
            .transpose()?;
        if let Some(pod) = &pod {
            self.check_pod(pod)?;
        }
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason})"
            )));
        }
        {
            let _guard = self.lease_guard();
            let (state, revision, job) = {
                let entries = self.lock();
                let Some(entry) = entries.get(name) else {
                    return Err(ModelError::NotFound(name.to_string()));
                };
                (entry.state(), entry.revision.clone(), entry.job.is_some())
            };
            // The entry's revision, or the one the link points to when a `modelcache prefetch`
            // beside the agent published another.
            let intact = |revision: &str| {
                let dir = self.layout.revision_dir(&model, revision);
                ReadyMarker::read(&dir).is_ok_and(|m| m.files_present(&dir))
            };
            let serving = match (state, revision) {
                (State::Ready, Some(r)) if intact(&r) => Some(r),
                (State::Ready, Some(_)) => self.layout.linked_intact(&model).map(|(r, _)| r),
                _ => None,
            };
            if let Some(revision) = serving {
                // Under the guard: no removal can take the revision between this and the
                // reader's first open.
                if let Some(pod) = &pod {
                    leases::record(&self.layout, &model, pod, &revision)
                        .map_err(|e| ModelError::Internal(error_chain(&e)))?;
                    info!(model.name = %name, revision = %revision, pod = %pod, "{name}: pod {pod} reads revision {revision}");
                }
                let status = {
                    let mut entries = self.lock();
                    let entry = entries
                        .get_mut(name)
                        .ok_or_else(|| ModelError::NotFound(name.to_string()))?;
                    entry.revision = Some(revision.clone());
                    entry.last_used = SystemTime::now();
                    entry.status()
                };
                return Ok(Reading::Ready {
                    revision,
                    status: self.with_readers(status),
                    leased: pod.is_some(),
                });
            }
            let ask = !job && state == State::Pending;
            if !ask {
                return Ok(Reading::Waiting(self.status_of(name)?));
            }
        }
        // Waiting for a model is asking for it, as a request with no body does.
        info!(model.name = %name, "{name}: a reader waits for it and nothing is fetching it: fetching it");
        self.request_prefetch(name, super::PrefetchOverride::default())?;
        Ok(Reading::Waiting(self.status_of(name)?))
    }

    fn status_of(&self, name: &str) -> Result<ModelStatus, ModelError> {
        self.get(name)
            .ok_or_else(|| ModelError::NotFound(name.to_string()))
    }

    /// Refuses a lease for a pod that is not on this node.
    fn check_pod(&self, pod: &PodUid) -> Result<(), ModelError> {
        let pods = &self.config.leases.pods_dir;
        if !pods.is_dir() {
            return Err(ModelError::Unavailable(format!(
                "the agent cannot see this node's pods: leases.pods_dir {} does not exist (mount the kubelet's pod directory read-only into the agent, as the DaemonSet does)",
                pods.display()
            )));
        }
        if !pods.join(pod.as_str()).is_dir() {
            return Err(ModelError::Forbidden(format!(
                "no pod with UID {pod} runs on this node: a lease names the reading pod's own UID (metadata.uid, from the downward API)"
            )));
        }
        Ok(())
    }

    /// The pods reading each revision of `name`.
    pub(super) fn readers(&self, name: &ModelName) -> Vec<leases::Held> {
        leases::of_model(&self.layout, name)
    }

    /// Adds the readers to a status.
    pub(super) fn with_readers(&self, mut status: ModelStatus) -> ModelStatus {
        if let Ok(name) = ModelName::new(&status.name) {
            status.readers = self.readers(&name);
        }
        status
    }

    /// Drops the leases of pods that are gone, then removes the old revisions no one reads,
    /// every `leases.check_interval` until `stop` fires.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        let interval = self.config.leases.check_interval;
        loop {
            let models = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || models.maintain_once()).await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass of [`Models::maintain`].
    pub(super) fn maintain_once(&self) {
        self.drop_ended_leases();
        for name in super::budget::model_dirs(&self.layout.root().join("store")) {
            if let Err(e) = self.remove_unread_revisions(&name) {
                warn!(model.name = %name, "{name}: could not remove its old revisions: {}", error_chain(&e));
            }
        }
    }

    fn drop_ended_leases(&self) {
        let pods = &self.config.leases.pods_dir;
        if !pods.is_dir() {
            // Without the pods' directories no lease can be judged ended: all are kept.
            return;
        }
        for name in leases::models(&self.layout) {
            for held in leases::of_model(&self.layout, &name) {
                if pods.join(held.pod.as_str()).exists() {
                    continue;
                }
                let _guard = self.lease_guard();
                match leases::end(&self.layout, &name, &held.pod) {
                    Ok(()) => {
                        info!(model.name = %name, pod = %held.pod, revision = %held.revision, "{name}: pod {} is gone from this node; its lease on revision {} ends", held.pod, held.revision);
                    }
                    Err(e) => warn!(model.name = %name, "{}", error_chain(&e)),
                }
            }
        }
    }

    /// Removes the revision directories of `name` that the link does not point to and no lease
    /// names, under the model's lock (skipped when someone holds it: a job, an eviction, a
    /// `modelcache prefetch`).
    fn remove_unread_revisions(&self, name: &ModelName) -> Result<(), crate::store::StoreError> {
        let TryLock::Held(_held) = try_lock(
            &self.layout,
            name,
            "modelcache agent, removing old revisions",
        )?
        else {
            return Ok(());
        };
        let store = self.layout.root().join("store").join(name.as_str());
        let aside = {
            let _guard = self.lease_guard();
            // Kept: the linked revision, those pods read, and the one the registry serves
            // (readers are given it; it is the linked one but for a moment after a publish).
            let mut keep: Vec<String> =
                self.readers(name).into_iter().map(|h| h.revision).collect();
            keep.extend(self.layout.published_revision(name));
            keep.extend(
                self.lock()
                    .get(name.as_str())
                    .and_then(|e| e.revision.clone()),
            );
            let mut aside = Vec::new();
            for revision in super::budget::visible_entries(&store) {
                if keep.contains(&revision) {
                    continue;
                }
                aside.push((revision.clone(), self.set_aside(&store, &revision)?));
            }
            aside
        };
        for (revision, dir) in aside {
            super::remove_dir(&dir).map_err(|e| crate::store::StoreError::Io {
                action: "remove",
                path: dir.clone(),
                source: std::io::Error::other(error_chain(&e)),
            })?;
            info!(model.name = %name, revision = %revision, "{name}: removed revision {revision}: no longer linked, and no pod reads it");
        }
        Ok(())
    }

    /// Renames `store/NAME/REVISION` to a hidden name (instant, and out of every reader's and
    /// lease's way) for removal after the guard is released; the caller holds the guard and
    /// has checked that no lease names it. A crash before the removal leaves a hidden directory
    /// that the next start removes.
    pub(super) fn set_aside(
        &self,
        store: &std::path::Path,
        revision: &str,
    ) -> Result<PathBuf, crate::store::StoreError> {
        let from = store.join(revision);
        let to = store.join(format!(".{revision}.removing-{}", std::process::id()));
        std::fs::rename(&from, &to).map_err(crate::store::StoreError::io("rename", &from))?;
        fsync_dir(store)?;
        Ok(to)
    }
}
