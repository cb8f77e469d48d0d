//! Readers: the pods that load a model from the cache, and what the agent owes them.
//!
//! A reader asks for a model ([`Models::reader`]); when it is ready, it gets the revision
//! directory to read for its whole life and, when its pod is known, a lease on it
//! ([`crate::store::leases`]). A reader on the readers' socket is identified by the agent (its
//! process's pod cgroup); one on the read listener may only name its pod, which must be running
//! on this node. Leases only ever grow: a pod that resolves again holds both revisions, and no
//! request ends or moves a lease. [`Models::maintain`] ends the leases of pods that stopped
//! running and then removes the old revisions no one reads.
//!
//! Asking is also how a pod that restarts after its model was evicted gets it back: a
//! configured model that is not being fetched is fetched again, when the reader's pod runs on
//! this node, and at most once per `fetch.failed_retry_delay` for each model (anyone on the
//! node network can reach the read listener: asking must not become a way to spend egress or
//! churn the cache).
//!
//! Every removal of a revision directory by the agent, and every new lease, happens under one
//! guard ([`Models::lease_guard`]): a lease is only ever recorded on a revision that is there
//! and intact, and a revision is only ever removed when no lease names it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ModelError, ModelStatus, Models, State, why_not_handed_out};
use crate::agent::pods::Liveness;
use crate::fetch::error_chain;
use crate::store::leases::{self, PodUid};
use crate::store::lock::{TryLock, try_lock};
use crate::store::{ModelName, ReadyMarker, fsync_dir};

/// Who asks for a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reader {
    /// A caller on the read listener that names no pod.
    Anonymous,
    /// A caller on the read listener that names its pod's UID (checked to run on this node,
    /// not proved to be the caller's).
    Claimed(String),
    /// A process the agent identified over the readers' socket: in this pod.
    Proved(PodUid),
    /// A process on the readers' socket that is in no pod (root on the node, say).
    NotInPod,
}

/// What a reader is told.
#[derive(Debug, Clone)]
pub enum Reading {
    /// Ready: read this revision directory (`store/NAME/REVISION`) and nothing else.
    Ready {
        /// The revision directory.
        revision: String,
        /// The model's status.
        status: ModelStatus,
        /// The pod whose lease was recorded on it, if any.
        leased: Option<PodUid>,
        /// Whether the agent identified that pod itself.
        proved: bool,
    },
    /// Not ready yet; asked for if nothing was fetching it and the reader may ask.
    Waiting(ModelStatus),
}

impl Models {
    /// When the kubelet started `pod` on this node, if it can be told.
    pub fn pod_started(&self, pod: &PodUid) -> Option<SystemTime> {
        self.pods.started(pod)
    }

    /// A reader asks for `name`.
    ///
    /// Ready: the revision to serve (intact, and what the model's configuration asks for) is
    /// returned, and the reader's pod, when known, gets a lease on it (a use, for LRU; an
    /// anonymous look is not). Marked ready but no longer intact (a file changed since publish):
    /// it is re-verified now, and repaired if its bytes changed. Not ready and not being
    /// fetched: a configured model is fetched for a reader whose pod runs here, at most once
    /// per backoff; the caller polls again.
    pub fn reader(self: &Arc<Self>, name: &str, who: Reader) -> Result<Reading, ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let pod = match &who {
            Reader::Claimed(uid) => {
                let pod = PodUid::new(uid).map_err(|e| ModelError::Invalid(e.to_string()))?;
                self.check_running(&pod)?;
                Some((pod, false))
            }
            Reader::Proved(pod) => Some((pod.clone(), true)),
            Reader::Anonymous | Reader::NotInPod => None,
        };
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason})"
            )));
        }
        let recheck = {
            let _guard = self.lease_guard();
            let (state, revision, job, spec, configured) = {
                let entries = self.lock();
                let Some(entry) = entries.get(name) else {
                    return Err(ModelError::NotFound(name.to_string()));
                };
                (
                    entry.state(),
                    entry.revision.clone(),
                    entry.job.is_some(),
                    entry.spec.clone(),
                    entry.configured,
                )
            };
            // The entry's revision, or the one the link points to when a `modelcache prefetch`
            // beside the agent published another; either only when intact and, for a
            // configured model, what its configuration asks for now.
            let servable = |revision: &str| {
                let dir = self.layout.revision_dir(&model, revision);
                ReadyMarker::read(&dir).is_ok_and(|m| {
                    m.files_present(&dir) && why_not_handed_out(configured, &spec, &m).is_none()
                })
            };
            let serving = match (state, &revision) {
                (State::Ready, Some(r)) if servable(r) => Some(r.clone()),
                (State::Ready, Some(_)) => self
                    .layout
                    .published_revision(&model)
                    .filter(|r| servable(r)),
                _ => None,
            };
            if let Some(revision) = serving {
                // Under the guard: no removal can take the revision between this and the
                // reader's first open.
                if let Some((pod, proved)) = &pod {
                    leases::record(&self.layout, &model, pod, &revision, *proved)
                        .map_err(|e| ModelError::Internal(error_chain(&e)))?;
                    info!(model.name = %name, revision = %revision, pod = %pod, proved = *proved, "{name}: pod {pod} reads revision {revision}");
                }
                let status = {
                    let mut entries = self.lock();
                    let entry = entries
                        .get_mut(name)
                        .ok_or_else(|| ModelError::NotFound(name.to_string()))?;
                    entry.revision = Some(revision.clone());
                    if pod.is_some() {
                        entry.last_used = SystemTime::now();
                    }
                    entry.status(&self.boot)
                };
                return Ok(Reading::Ready {
                    revision,
                    status: self.with_readers(status),
                    proved: pod.as_ref().is_some_and(|(_, proved)| *proved),
                    leased: pod.map(|(p, _)| p),
                });
            }
            // Ready, but no revision it may serve is intact: see why before anyone waits on it.
            state == State::Ready && !job
        };
        if recheck {
            self.recheck(&model);
            return Ok(Reading::Waiting(self.status_of(name)?));
        }
        self.ask_for(&model, pod.is_some())?;
        Ok(Reading::Waiting(self.status_of(name)?))
    }

    /// Waiting for a model is asking for it: a configured model that nothing fetches is fetched
    /// for a reader whose pod runs here, once per backoff interval.
    fn ask_for(self: &Arc<Self>, model: &ModelName, has_pod: bool) -> Result<(), ModelError> {
        let name = model.as_str();
        let delay = self.config.failed_retry_delay;
        let refused = |why: &str| {
            self.metrics.reader_fetch("refused");
            info!(model.name = %name, "{name}: a reader waits for it and nothing is fetching it; not fetched: {why}");
        };
        {
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(name) else {
                return Err(ModelError::NotFound(name.to_string()));
            };
            if entry.job.is_some() || entry.state() != State::Pending {
                return Ok(());
            }
            if !entry.configured {
                refused("it is not configured (a request on the admin socket may fetch it)");
                return Ok(());
            }
            if !has_pod {
                refused("the reader names no pod running on this node");
                return Ok(());
            }
            if entry.reader_asked.is_some_and(|at| at.elapsed() < delay) {
                refused("a reader asked for it less than fetch.failed_retry_delay ago");
                return Ok(());
            }
            entry.reader_asked = Some(Instant::now());
        }
        info!(model.name = %name, "{name}: a reader waits for it and nothing is fetching it: fetching it");
        self.metrics.reader_fetch("started");
        self.request_prefetch(name, super::PrefetchOverride::default())?;
        Ok(())
    }

    fn status_of(&self, name: &str) -> Result<ModelStatus, ModelError> {
        self.get(name)
            .ok_or_else(|| ModelError::NotFound(name.to_string()))
    }

    /// The pod process `pid` (as the agent sees it) belongs to, if any.
    pub fn pod_of_process(
        &self,
        pid: i32,
    ) -> Result<Option<PodUid>, crate::agent::pods::PeerError> {
        self.pods.pod_of_process(pid)
    }

    /// How the agent tells which pods run, for the log.
    pub fn describe_pods(&self) -> String {
        self.pods.describe()
    }

    /// Refuses a pod that does not run on this node.
    fn check_running(&self, pod: &PodUid) -> Result<(), ModelError> {
        match self.pods.liveness(pod) {
            Liveness::Running => Ok(()),
            Liveness::Gone => Err(ModelError::Forbidden(format!(
                "no pod with UID {pod} runs on this node: a reader names its own pod's UID (metadata.uid, from the downward API)"
            ))),
            Liveness::Unknown => Err(ModelError::Unavailable(format!(
                "the agent cannot tell which pods run on this node: {} (mount the host's /sys and the kubelet's pod directory read-only into the agent, as the DaemonSet does)",
                self.pods.describe()
            ))),
        }
    }

    /// The pods reading each revision of `name`.
    pub(super) fn readers(&self, name: &ModelName) -> Vec<leases::Held> {
        leases::of_model(&self.layout, name)
    }

    /// Adds the readers to a status.
    pub(super) fn with_readers(&self, mut status: ModelStatus) -> ModelStatus {
        if let Ok(name) = ModelName::new(&status.name) {
            status.readers = self.readers(&name);
            status.leases = status.readers.len();
        }
        status
    }

    /// Ends the leases of pods that stopped running, then removes the old revisions no one reads,
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
        {
            let _guard = self.lease_guard();
            for path in leases::sweep(&self.layout) {
                info!(path = %path.display(), "removed {}, left by a lease record's write that was cut short", path.display());
            }
        }
        self.drop_ended_leases();
        // One budget decision or this pass at a time: this pass holds each model's lock for a
        // moment, and a decision must not take that for a model in use and give up on it.
        // The removal itself waits until the decision lock is released: a set-aside directory
        // is out of everyone's way, and a large one takes a while to delete.
        let mut aside = Vec::new();
        {
            let _no_budget_decision = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            for name in super::budget::model_dirs(&self.layout.root().join("store")) {
                match self.set_aside_unread_revisions(&name) {
                    Ok(dirs) => aside.extend(dirs.into_iter().map(|(r, d)| (name.clone(), r, d))),
                    Err(e) => {
                        warn!(model.name = %name, "{name}: could not remove its old revisions: {}", error_chain(&e));
                    }
                }
            }
        }
        for (name, revision, dir) in aside {
            match super::remove_dir(&dir) {
                Ok(()) => {
                    info!(model.name = %name, revision = %revision, "{name}: removed revision {revision}: no longer linked, and no pod reads it");
                }
                Err(e) => {
                    warn!(model.name = %name, "{name}: could not remove its old revisions: {}", error_chain(&e));
                }
            }
        }
    }

    fn drop_ended_leases(&self) {
        for name in leases::models(&self.layout) {
            let mut pods: Vec<PodUid> = leases::of_model(&self.layout, &name)
                .into_iter()
                .map(|h| h.pod)
                .collect();
            pods.dedup();
            for pod in pods {
                // Unknown (nothing visible to judge by): every lease is kept.
                if self.pods.liveness(&pod) != Liveness::Gone {
                    continue;
                }
                let _guard = self.lease_guard();
                match leases::end(&self.layout, &name, &pod) {
                    Ok(_) => {
                        info!(model.name = %name, pod = %pod, "{name}: pod {pod} no longer runs on this node; its leases end");
                    }
                    Err(e) => warn!(model.name = %name, "{}", error_chain(&e)),
                }
            }
        }
    }

    /// The operator ends `pod`'s leases on `name` (the admin API): returns whether it held any.
    pub fn drop_lease(&self, name: &str, pod: &str) -> Result<bool, ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let pod = PodUid::new(pod).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let _guard = self.lease_guard();
        let ended = leases::end(&self.layout, &model, &pod)
            .map_err(|e| ModelError::Internal(error_chain(&e)))?;
        if ended {
            warn!(model.name = %name, pod = %pod, "{name}: the operator ended pod {pod}'s leases; its revisions may be removed");
        }
        Ok(ended)
    }

    /// Lease counts and the oldest lease's age, per model, for the metrics.
    pub(super) fn lease_gauges(&self) -> Vec<(String, u64, u64)> {
        let now = SystemTime::now();
        leases::models(&self.layout)
            .into_iter()
            .map(|name| {
                let held = leases::of_model(&self.layout, &name);
                let oldest = held
                    .iter()
                    .filter_map(|h| humantime::parse_rfc3339(&h.since).ok())
                    .filter_map(|t| now.duration_since(t).ok())
                    .max()
                    .map_or(0, |d| d.as_secs());
                (name.to_string(), held.len() as u64, oldest)
            })
            .collect()
    }

    /// Sets aside (for removal) the revision directories of `name` that the link does not
    /// point to and no lease names, under the model's lock (skipped when someone holds it: a
    /// job, an eviction, a `modelcache prefetch`). Returns each revision and where it went.
    fn set_aside_unread_revisions(
        &self,
        name: &ModelName,
    ) -> Result<Vec<(String, PathBuf)>, crate::store::StoreError> {
        let TryLock::Held(_held) = try_lock(
            &self.layout,
            name,
            "modelcache agent, removing old revisions",
        )?
        else {
            return Ok(Vec::new());
        };
        let store = self.layout.root().join("store").join(name.as_str());
        let _guard = self.lease_guard();
        // Kept: the linked revision, those pods read, and the one the registry serves
        // (readers are given it; it is the linked one but for a moment after a publish).
        let mut keep: Vec<String> = self.readers(name).into_iter().map(|h| h.revision).collect();
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
        Ok(aside)
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
