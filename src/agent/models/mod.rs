//! The agent's models: the registry of their state (this module), the one job that may run per
//! model ([`jobs`]), the decisions of its lifecycle ([`lifecycle`]), the disk budget and
//! eviction ([`budget`]), the pods that read them ([`readers`]), the background scrub
//! ([`scrub`]) and page-cache warming after publish ([`warm`]).
//!
//! A model's state is derived, not stored twice: a running job reports `downloading` or
//! `verifying` from its live progress; otherwise the entry says `pending`, `ready` or `failed`.
//! Every change to a model's files happens under its file lock ([`crate::store::lock`]).

mod budget;
mod jobs;
mod lifecycle;
mod readers;
mod reconcile;
mod scrub;
pub mod timeline;
mod warm;

pub use readers::{Reader, Reading};
pub use reconcile::Reconciled;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::metrics::Metrics;
use crate::config::Environment;
use crate::config::agent::{AgentConfig, ModelSpec};
use crate::fetch::progress::{Phase, Progress};
use crate::fetch::{PrefetchError, error_chain};
use crate::source::redact_url;
use crate::store::{Layout, ModelName, ReadyMarker, Verification, lock};

/// A model's state, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Known, not started (or stopped by shutdown).
    Pending,
    /// Listing and downloading.
    Downloading,
    /// Checking hashes and structure, publishing.
    Verifying,
    /// Published and intact.
    Ready,
    /// The last attempt failed; configured models are retried with backoff.
    Failed,
}

impl State {
    /// Every state, for metrics.
    pub const ALL: [State; 5] = [
        State::Pending,
        State::Downloading,
        State::Verifying,
        State::Ready,
        State::Failed,
    ];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Downloading => "downloading",
            State::Verifying => "verifying",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }
}

/// Page-cache warming of a published model.
#[derive(Debug, Clone, Serialize)]
pub struct WarmReport {
    /// Bytes read into the page cache.
    pub bytes: u64,
    /// Time taken.
    pub seconds: f64,
}

/// A model as `GET /v1/models/NAME` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// Name.
    pub name: String,
    /// State.
    pub state: State,
    /// Source, secrets redacted.
    pub source: String,
    /// Pinned models are never evicted and gate `/readyz`.
    pub pinned: bool,
    /// Published revision, if any.
    pub revision: Option<String>,
    /// How the published revision was verified.
    pub verification: Option<Verification>,
    /// Who signed the published revision (OpenSSF Model Signing); `null`: unsigned.
    pub signature: Option<crate::fetch::signed::SignatureRecord>,
    /// Bytes present (fetched + reused) in the current or last run.
    pub bytes_done: u64,
    /// Bytes in the model (0 until listed).
    pub bytes_total: u64,
    /// Bytes fetched in the current or last run.
    pub bytes_fetched: u64,
    /// Bytes reused in the current or last run.
    pub bytes_reused: u64,
    /// `bytes_fetched` by origin: direct, from Dragonfly peers, through Dragonfly from the source.
    pub bytes_by_origin: crate::fetch::progress::BytesByOrigin,
    /// The Dragonfly path's file counts in the current or last run.
    pub dragonfly: crate::fetch::progress::DragonflyCounts,
    /// Fetch rate of the current run.
    pub rate_bytes_per_second: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// The job currently working on the model.
    pub job: Option<u64>,
    /// The last error, on one line.
    pub last_error: Option<String>,
    /// What verification found odd in the published revision but vLLM loads anyway.
    pub warnings: Vec<String>,
    /// Page-cache warming after publish.
    pub page_cache: Option<WarmReport>,
    /// How many leases pods hold on its revisions.
    pub leases: usize,
    /// When each step of its fill happened on this node, after the agent's start.
    pub timeline: timeline::Timeline,
    /// The pods reading it, and which revision each reads: on the admin socket only (a pod's
    /// UID is not for anyone on the node network).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub readers: Vec<crate::store::leases::Held>,
}

impl ModelStatus {
    /// The status without the readers' pod UIDs, for the read listener.
    pub fn without_pods(mut self) -> Self {
        self.readers = Vec::new();
        self
    }
}

/// What a prefetch request asked for, when it is not the configured spec.
#[derive(Debug, Clone, Default)]
pub struct PrefetchOverride {
    /// Source URL.
    pub source: Option<String>,
    /// Storage account.
    pub account: Option<String>,
    /// Include globs.
    pub include: Option<Vec<String>>,
    /// Exclude globs.
    pub exclude: Option<Vec<String>>,
    /// Pin.
    pub pin: Option<bool>,
    /// Require a manifest.
    pub require_manifest: Option<bool>,
    /// The signature policy (never weaker than the agent's default).
    pub signature: Option<crate::fetch::signed::SignatureMode>,
}

/// Why a request about a model was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// No such model.
    #[error("no model named {0} is known to this agent")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The model is pinned or busy.
    #[error("{0}")]
    Conflict(String),
    /// The request is not allowed (a source outside the allowed prefixes).
    #[error("{0}")]
    Forbidden(String),
    /// The cache failed.
    #[error("{0}")]
    Internal(String),
    /// The agent cannot do it yet (its disks are not set up).
    #[error("{0}")]
    Unavailable(String),
}

struct Job {
    id: u64,
    cancel: CancellationToken,
    wake: Arc<Notify>,
    handle: tokio::task::JoinHandle<()>,
}

struct Entry {
    spec: ModelSpec,
    configured: bool,
    /// `spec.source` is the whole URL; false when adopted from a ready marker, which keeps the
    /// source with its query (a SAS token) redacted.
    source_kept: bool,
    state: State,
    in_backoff: bool,
    job: Option<Job>,
    progress: Arc<Progress>,
    started: Option<Instant>,
    revision: Option<String>,
    verification: Option<Verification>,
    signature: Option<crate::fetch::signed::SignatureRecord>,
    last_error: Option<String>,
    warnings: Vec<String>,
    last_used: SystemTime,
    warm: Option<WarmReport>,
    /// When a reader last had it fetched: at most once per backoff interval.
    reader_asked: Option<Instant>,
    /// A re-verification of its published revision runs (a reader found it not intact).
    rechecking: bool,
    /// The steps of the fill that published the revision it serves (`None`: found published).
    published_run: Option<crate::fetch::progress::Steps>,
    /// When the revision it serves became ready in this agent's life.
    served_since: Option<Instant>,
    /// It was ready before in this agent's life (its boot steps are counted).
    was_ready: bool,
    /// Configured when the agent started: its first fill is part of the node's boot.
    at_start: bool,
}

impl Entry {
    fn new(spec: ModelSpec, configured: bool) -> Self {
        Self {
            spec,
            configured,
            source_kept: true,
            state: State::Pending,
            in_backoff: false,
            job: None,
            progress: Arc::new(Progress::new()),
            started: None,
            revision: None,
            verification: None,
            signature: None,
            last_error: None,
            warnings: Vec::new(),
            last_used: SystemTime::now(),
            warm: None,
            reader_asked: None,
            rechecking: false,
            published_run: None,
            served_since: None,
            was_ready: false,
            at_start: false,
        }
    }

    fn facts(&self) -> lifecycle::Facts {
        lifecycle::Facts {
            configured: self.configured,
            state: self.state,
            serving: self.revision.is_some(),
            job: self.job.as_ref().map(|j| j.id),
            pinned: self.spec.pin,
            leased: false,
        }
    }

    fn state(&self) -> State {
        // A published revision keeps serving while a refresh runs, and after one fails: the
        // link still points at verified files, so readers are told the truth, `ready`. The
        // refresh shows in `job`, the byte counts and `last_error`.
        if self.state == State::Ready && self.revision.is_some() {
            return State::Ready;
        }
        if self.job.is_some() && !self.in_backoff {
            return match self.progress.phase() {
                Phase::Listing | Phase::Downloading => State::Downloading,
                Phase::Verifying | Phase::Publishing => State::Verifying,
                Phase::Done => State::Verifying,
            };
        }
        self.state
    }

    fn status(&self, boot: &timeline::Boot) -> ModelStatus {
        let p = &self.progress;
        // The fill under way until a revision serves; then the one that published it.
        let (run, ready) = if self.job.is_some() && self.state() != State::Ready {
            (Some(p.steps(boot.started())), None)
        } else {
            (self.published_run, self.served_since)
        };
        let total = p.total();
        let done = (p.fetched() + p.reused()).min(total);
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        #[expect(clippy::cast_precision_loss, reason = "rates for display")]
        let rate = if secs > 0.0 && self.job.is_some() {
            p.fetched() as f64 / secs
        } else {
            0.0
        };
        #[expect(clippy::cast_precision_loss, reason = "rates for display")]
        let eta = (rate > 0.0).then(|| (total - done) as f64 / rate);
        ModelStatus {
            name: self.spec.name.to_string(),
            state: self.state(),
            source: redact_url(&self.spec.source),
            pinned: self.spec.pin,
            revision: self.revision.clone(),
            verification: self.verification,
            signature: self.signature.clone(),
            bytes_done: done,
            bytes_total: total,
            bytes_fetched: p.fetched(),
            bytes_reused: p.reused(),
            bytes_by_origin: p.by_origin(),
            dragonfly: p.dragonfly(),
            rate_bytes_per_second: rate,
            eta_seconds: eta,
            job: self.job.as_ref().map(|j| j.id),
            last_error: self.last_error.clone(),
            warnings: self.warnings.clone(),
            page_cache: self.warm.clone(),
            leases: 0,
            timeline: boot.timeline(run, ready),
            readers: Vec::new(),
        }
    }

    /// Counts a revision found published at start as this life's run: every byte there,
    /// none fetched.
    fn found_published(&mut self, bytes: u64) {
        let progress = Progress::new();
        progress.set_total(bytes);
        progress.add_reused(bytes);
        self.progress = Arc::new(progress);
    }

    /// A revision serves from now: published by the fill whose steps are `fill`, or found
    /// published (`None`). The first time in this agent's life, a model configured at its start
    /// that had to be filled adds its steps to the boot histogram; one found published (a
    /// restart) or added later does not.
    fn serving_from_now(
        &mut self,
        fill: Option<crate::fetch::progress::Steps>,
        boot: &timeline::Boot,
        metrics: &Metrics,
    ) {
        let now = Instant::now();
        self.published_run = fill;
        self.served_since = Some(now);
        if std::mem::replace(&mut self.was_ready, true) {
            return;
        }
        if let (true, Some(steps)) = (self.at_start, fill) {
            for (step, at) in steps.reached() {
                metrics.boot_step(step, at);
            }
            metrics.boot_step("ready", boot.seconds(now));
        }
    }
}

/// The agent's model registry: the composition of config, cache layout and jobs.
pub struct Models {
    config: Arc<AgentConfig>,
    env: Environment,
    layout: Layout,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Why no job may write to the cache root yet (its disks are being set up, or failed);
    /// `None` once they are settled.
    blocked: Mutex<Option<String>>,
    next_job: AtomicU64,
    /// Held while the budget decides and removes, so two decisions never interleave.
    budget: Mutex<()>,
    /// Held while a lease is recorded and while a revision directory is set aside for
    /// removal, so a lease is only recorded on a revision that stays (see [`readers`]).
    leases: Mutex<()>,
    /// Which pods run on this node (for leases and readers' claims).
    pods: crate::agent::pods::Pods,
    /// What running jobs reserved and have not written yet.
    reservations: Mutex<BTreeMap<ModelName, budget::Reservation>>,
    /// Header and index bytes parsed at once, shared by every job so that models fetched
    /// together stay within the agent's memory limit whatever their sources hold.
    parse_budget: crate::verify::structure::ParseBudget,
    /// Metrics, updated as jobs finish and on scrape.
    pub metrics: Metrics,
    /// The agent's start and its disks' settling, which every model's timeline counts from.
    boot: timeline::Boot,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Models {
    /// Builds the registry: configured models already published and intact are ready at once
    /// (no network, no re-hash: sizes and modification times against the ready marker); the
    /// others get a job.
    ///
    /// `blocked` (the disk setup's error) keeps every model pending with that error and writes
    /// nothing: without its disks the cache root is on the OS disk.
    pub fn start(
        config: Arc<AgentConfig>,
        env: Environment,
        blocked: Option<String>,
    ) -> Result<Arc<Self>, ModelError> {
        let models = Self::waiting(config, env, "setting up");
        models.activate(blocked)?;
        Ok(models)
    }

    /// Builds the registry with every configured model pending, touching nothing on disk:
    /// the state while the cache disks are being set up (`why` says so in each model's status).
    pub fn waiting(config: Arc<AgentConfig>, env: Environment, why: &str) -> Arc<Self> {
        let models = Arc::new(Self {
            // With a read-only view for consumers, the agent's own writable mount.
            layout: Layout::new(config.writable_root()),
            env,
            entries: Mutex::new(BTreeMap::new()),
            blocked: Mutex::new(Some(why.to_string())),
            next_job: AtomicU64::new(1),
            budget: Mutex::new(()),
            leases: Mutex::new(()),
            reservations: Mutex::new(BTreeMap::new()),
            parse_budget: crate::verify::structure::ParseBudget::default(),
            metrics: Metrics::new(),
            boot: timeline::Boot::now(),
            pods: crate::agent::pods::Pods::new(
                &config.leases.cgroup_root,
                &config.proc_root,
                &config.leases.pods_dir,
            ),
            config: Arc::clone(&config),
        });
        {
            let mut entries = models.lock();
            for spec in &config.models {
                let mut entry = Entry::new(spec.clone(), true);
                entry.at_start = true;
                entry.last_error = Some(format!("waiting for the cache disks: {why}"));
                entries.insert(spec.name.to_string(), entry);
            }
        }
        models
    }

    /// Starts work once the cache disks are settled: `blocked` (the disk setup's error) keeps
    /// every model pending with that error and writes nothing, since without its disks the
    /// cache root is on the OS disk. Otherwise ready models are marked so and the others get
    /// a job.
    pub fn activate(self: &Arc<Self>, blocked: Option<String>) -> Result<(), ModelError> {
        if let Some(at) = self.boot.disks_settled() {
            self.metrics.boot_step("disks_settled", at);
        }
        if let Some(reason) = &blocked {
            for entry in self.lock().values_mut() {
                entry.last_error = Some(format!("waiting for the cache disks: {reason}"));
            }
            *self.blocked_reason() = blocked;
            return Ok(());
        }
        self.layout
            .ensure()
            .map_err(|e| ModelError::Internal(error_chain(&e)))?;
        // Before any budget decision counts them: what killed publishes and abandoned
        // downloads left.
        self.clean_leftovers();
        // Published models are marked ready before the disks count as settled: a reader that
        // arrives in between must find them ready, not pending with nothing fetching them
        // (which would start a job that asks the source for a model already here).
        let mut to_fetch = Vec::new();
        for spec in &self.config.models {
            let published = self
                .intact(&spec.name)
                .filter(|(revision, marker)| serves_spec(spec, revision, marker));
            let last_used = self.link_mtime(&spec.name);
            let mut entries = self.lock();
            let Some(entry) = entries.get_mut(spec.name.as_str()) else {
                continue;
            };
            entry.last_error = None;
            if let Some((revision, marker)) = published {
                info!(model.name = %spec.name, revision = %revision, state = "ready", "{} revision {revision} is published and intact: ready", spec.name);
                entry.state = State::Ready;
                entry.revision = Some(revision);
                entry.verification = Some(marker.verification);
                entry.signature = marker.signature;
                entry.warnings = marker.warnings;
                entry.last_used = last_used;
                entry.found_published(marker.bytes);
                entry.serving_from_now(None, &self.boot, &self.metrics);
            } else {
                to_fetch.push(spec.name.to_string());
            }
        }
        *self.blocked_reason() = None;
        for name in to_fetch {
            let mut entries = self.lock();
            // A reader may have started it since the disks settled.
            if entries.get(&name).is_some_and(|e| e.job.is_none()) {
                self.spawn_job_locked(&mut entries, &name);
            }
        }
        self.adopt_published();
        Ok(())
    }

    /// Recovers what interrupted publishes left (their files go back to staging, see
    /// [`crate::store::recover_publish_leftovers`]) and removes the partial downloads of models
    /// no one asks for any more (not configured: requested before a restart, whose requests
    /// died with it). Each under the model's lock; a model someone holds is left alone.
    fn clean_leftovers(&self) {
        let root = self.layout.root();
        let mut names: Vec<ModelName> = Vec::new();
        for dir in [root.join("store"), root.join("staging")] {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            names.extend(
                read.flatten()
                    .filter_map(|e| ModelName::new(&e.file_name().to_string_lossy()).ok()),
            );
        }
        names.sort();
        names.dedup();
        // Whole models set aside for removal by an eviction that was cut short.
        if let Ok(read) = std::fs::read_dir(root.join("store")) {
            for entry in read.flatten() {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if file_name.starts_with('.') && file_name.contains(".removing-") {
                    match remove_dir(&entry.path()) {
                        Ok(()) => {
                            info!(path = %entry.path().display(), "removed {}, left by an eviction that was cut short", entry.path().display())
                        }
                        Err(e) => warn!("{}", error_chain(&e)),
                    }
                }
            }
        }
        for name in names {
            let held = match lock::try_lock(&self.layout, &name, "modelcache agent, cleaning up") {
                Ok(lock::TryLock::Held(held)) => held,
                Ok(lock::TryLock::Busy(who)) => {
                    info!(model.name = %name, "{name} is in use by {who}: its leftovers are not checked now");
                    continue;
                }
                Err(e) => {
                    warn!(model.name = %name, "{}", error_chain(&e));
                    continue;
                }
            };
            match crate::store::recover_publish_leftovers(&self.layout, &held) {
                Ok(removed) => {
                    for path in removed {
                        info!(model.name = %name, path = %path.display(), "recovered the files of an interrupted publish of {name} from {}", path.display());
                    }
                }
                Err(e) => {
                    warn!(model.name = %name, "could not recover what an interrupted publish of {name} left: {}", error_chain(&e))
                }
            }
            let configured = self.config.models.iter().any(|m| m.name == name);
            let staging = self.layout.staging_dir(&name);
            if !configured && staging.exists() {
                self.layout.remove_progress(&name);
                match remove_dir(&staging) {
                    Ok(()) => {
                        info!(model.name = %name, path = %staging.display(), "removed {} (a download of {name}, which is not configured, left by an earlier run)", staging.display())
                    }
                    Err(e) => warn!(model.name = %name, "{}", error_chain(&e)),
                }
            }
        }
    }

    /// Registers models published earlier but not configured (by `modelcache prefetch`, or a
    /// `POST` before a restart) as ready and unpinned, so the API reports them and the budget
    /// can evict them.
    fn adopt_published(&self) {
        let Ok(links) = std::fs::read_dir(self.layout.root().join("models")) else {
            return;
        };
        for link in links.flatten() {
            let Ok(name) = ModelName::new(&link.file_name().to_string_lossy()) else {
                continue;
            };
            if self.lock().contains_key(name.as_str()) {
                continue;
            }
            let Some((revision, marker)) = self.intact(&name) else {
                continue;
            };
            if let Some(why) = crate::fetch::signed::why_not_trusted(
                self.config.signature_default,
                &self.config.trust,
                marker.signature.as_ref(),
            ) {
                info!(model.name = %name, revision = %revision, "{name} revision {revision} is published but not served: {why} (signing.default, signing.trusted)");
                continue;
            }
            let spec = ModelSpec {
                name: name.clone(),
                source: marker.source.clone(),
                account: None,
                selection: crate::config::Selection::vllm_default(),
                pin: false,
                require_manifest: false,
                signature: self.config.signature_default,
                signature_file: crate::fetch::signed::DEFAULT_SIGNATURE_FILE.to_string(),
                trust: Arc::clone(&self.config.trust),
            };
            let mut entry = Entry::new(spec, false);
            // Markers record sources redacted: a query there was a SAS token, now lost.
            entry.source_kept = !marker.source.contains('?');
            entry.state = State::Ready;
            entry.revision = Some(revision.clone());
            entry.verification = Some(marker.verification);
            entry.signature = marker.signature;
            entry.warnings = marker.warnings;
            entry.last_used = self.link_mtime(&name);
            entry.found_published(marker.bytes);
            entry.serving_from_now(None, &self.boot, &self.metrics);
            info!(model.name = %name, revision = %revision, "{name} revision {revision} was published earlier: ready (unpinned)");
            self.lock().insert(name.to_string(), entry);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease guard; taken before the registry's lock when both are held.
    fn lease_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blocked_reason(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.blocked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The published revision and marker of a model, if its files are intact.
    fn intact(&self, name: &ModelName) -> Option<(String, ReadyMarker)> {
        self.layout.linked_intact(name)
    }

    fn link_mtime(&self, name: &ModelName) -> SystemTime {
        std::fs::symlink_metadata(self.layout.model_link(name))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Every model's status.
    pub fn list(&self) -> Vec<ModelStatus> {
        let statuses: Vec<ModelStatus> =
            self.lock().values().map(|e| e.status(&self.boot)).collect();
        statuses.into_iter().map(|s| self.with_readers(s)).collect()
    }

    /// One model's status.
    pub fn get(&self, name: &str) -> Option<ModelStatus> {
        let status = self.lock().get(name).map(|e| e.status(&self.boot))?;
        Some(self.with_readers(status))
    }

    /// Who signed the revision each model serves (`unsigned` when no one did).
    pub fn signed_by(&self) -> BTreeMap<String, String> {
        signers(&self.lock()).into_iter().collect()
    }

    /// Whether every pinned model is ready, by the check a reader meets: a pinned model marked
    /// ready whose revision is no longer intact is not, and is re-verified.
    pub fn pinned_ready(self: &Arc<Self>) -> (bool, BTreeMap<String, State>) {
        let (pinned, states) = {
            let entries = self.lock();
            let pinned: Vec<(ModelName, State, Option<String>)> = entries
                .values()
                .filter(|e| e.spec.pin)
                .map(|e| (e.spec.name.clone(), e.state(), e.revision.clone()))
                .collect();
            let states: BTreeMap<String, State> = entries
                .iter()
                .map(|(k, e)| (k.clone(), e.state()))
                .collect();
            (pinned, states)
        };
        let mut ready = true;
        for (name, state, revision) in pinned {
            if state != State::Ready || !self.still_intact(&name, revision.as_deref()) {
                ready = false;
            }
        }
        (ready, states)
    }

    /// Whether a model marked ready still is: its revision's files have the sizes and times
    /// recorded at publish. One that does not is re-verified (see [`Models::recheck`]).
    fn still_intact(self: &Arc<Self>, name: &ModelName, revision: Option<&str>) -> bool {
        let intact = revision.is_some_and(|r| {
            let dir = self.layout.revision_dir(name, r);
            ReadyMarker::read(&dir).is_ok_and(|m| m.files_present(&dir))
        });
        if !intact {
            self.recheck(name);
        }
        intact
    }

    /// `GET /v1/models/NAME/ready`: the status, and whether the model is ready by the check a
    /// reader meets (marked ready, and its files intact).
    pub fn ready_now(self: &Arc<Self>, name: &str) -> Option<(bool, ModelStatus)> {
        let status = self.get(name)?;
        let ready = status.state == State::Ready
            && ModelName::new(name)
                .is_ok_and(|n| self.still_intact(&n, status.revision.as_deref()));
        // The re-check may have changed the state already.
        let status = if ready { status } else { self.get(name)? };
        Some((ready, status))
    }

    /// Counters and gauges for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let gauges = self.lease_gauges();
        let names: Vec<String> = self.lock().keys().cloned().collect();
        for name in names {
            let (count, oldest) = gauges
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or((0, 0), |(_, c, o)| (*c, *o));
            self.metrics.leases(&name, count, oldest);
        }
        let entries = self.lock();
        let live: Vec<(String, State, Arc<Progress>)> = entries
            .iter()
            .map(|(k, e)| (k.clone(), e.state(), Arc::clone(&e.progress)))
            .collect();
        let signers = signers(&entries);
        drop(entries);
        let stat = nix::sys::statvfs::statvfs(self.layout.root()).ok();
        #[expect(
            clippy::useless_conversion,
            reason = "statvfs field types vary by platform"
        )]
        let free = stat.map_or(0, |s| {
            u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()))
        });
        let root = self.layout.root();
        let used = dir_bytes(&root.join("store")) + dir_bytes(&root.join("staging"));
        self.metrics.render(&live, &signers, free, used)
    }
}

/// Each model serving a revision, with who signed it, or `unsigned`.
fn signers(entries: &BTreeMap<String, Entry>) -> Vec<(String, String)> {
    entries
        .iter()
        .filter(|(_, e)| e.revision.is_some())
        .map(|(k, e)| {
            let signer = e
                .signature
                .as_ref()
                .map_or_else(|| "unsigned".to_string(), |s| s.signer.to_string());
            (k.clone(), signer)
        })
        .collect()
}

/// Whether a published revision is what a configured spec asks for: from its source, every
/// file one the selection picks, and verified against a manifest when the spec requires one.
/// Anything else is fetched again rather than served (an operator who turns on
/// `require_manifest` must not keep serving a revision that was only checked structurally).
fn serves_spec(spec: &ModelSpec, revision: &str, marker: &ReadyMarker) -> bool {
    let why_not = why_not_served(spec, marker);
    if let Some(why) = &why_not {
        info!(model.name = %spec.name, revision = %revision, "{} revision {revision} is published but not served: {why}; fetching it again", spec.name);
    }
    why_not.is_none()
}

/// Why a published revision is not handed to new readers, if it is not: for a configured model,
/// anything its configuration asks for that the revision is not; for any other, a signature the
/// policy requires, or a signer no longer trusted.
pub(super) fn why_not_handed_out(
    configured: bool,
    spec: &ModelSpec,
    marker: &ReadyMarker,
) -> Option<String> {
    if configured {
        why_not_served(spec, marker)
    } else {
        crate::fetch::signed::why_not_trusted(
            spec.signature,
            &spec.trust,
            marker.signature.as_ref(),
        )
    }
}

/// Why a published revision is not what `spec` asks for, if it is not.
fn why_not_served(spec: &ModelSpec, marker: &ReadyMarker) -> Option<String> {
    if marker.source != redact_url(&spec.source) {
        Some("it came from another source".to_string())
    } else if spec.require_manifest
        && marker.verification != Verification::Blake3
        && marker.signature.is_none()
    {
        Some(format!(
            "it was verified {} and the model requires a manifest (require_manifest = true)",
            marker.verification
        ))
    } else if let Some(why) = crate::fetch::signed::why_not_trusted(
        spec.signature,
        &spec.trust,
        marker.signature.as_ref(),
    ) {
        Some(why)
    } else {
        marker
            .files
            .iter()
            .find(|f| !spec.selection.is_selected(&f.path))
            .map(|f| {
                format!(
                    "it holds {}, which the configured selection leaves out",
                    f.path
                )
            })
    }
}

/// Milliseconds for logs.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Total bytes of regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(read) = std::fs::read_dir(dir) else {
        return 0;
    };
    read.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn remove_dir(dir: &Path) -> Result<(), PrefetchError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PrefetchError::local("remove", dir.to_path_buf(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A started registry for `toml`, on a current-thread runtime that is not driven (so no job
    /// it spawns makes progress unless a test drives it).
    fn registry(toml: &str) -> (tokio::runtime::Runtime, Arc<Models>) {
        let env = Environment::from_pairs(Vec::new());
        let config = Arc::new(AgentConfig::from_toml(toml, "test", &env, &[]).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let models = {
            let _in_runtime = rt.enter();
            Models::start(config, env, None).unwrap()
        };
        (rt, models)
    }

    /// Publishes a one-file model `name` under `cache` whose ready marker records `source`.
    fn publish_fake(cache: &Path, name: &str, source: &str) {
        let layout = Layout::new(cache);
        layout.ensure().unwrap();
        let model = ModelName::new(name).unwrap();
        let partial = layout.partial_path(&model, "config.json");
        std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
        std::fs::write(&partial, "{}").unwrap();
        let marker = ReadyMarker::of_one_file(name, source, "r1", "config.json", 2);
        crate::store::publish(
            &layout,
            &crate::store::StagedModel {
                name: &model,
                revision: "r1",
                marker: &marker,
                manifest: None,
                signature: None,
            },
        )
        .unwrap();
    }

    /// Issue 18: a model adopted after a restart keeps only the redacted source of its ready
    /// marker; a bodiless request must not fetch with `?REDACTED` as its SAS.
    #[test]
    fn issue18_an_adopted_model_whose_source_was_redacted_needs_the_source_named() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        publish_fake(
            &cache,
            "sas",
            "https://acct.blob.core.windows.net/models/sas?REDACTED",
        );
        let toml = format!(
            "cache_root = \"{}\"\n[disk]\nenabled = false\n[api]\nallowed_sources = [\"https://acct.blob.core.windows.net/models/\"]\n",
            cache.display()
        );
        let (rt, models) = registry(&toml);
        let _in_runtime = rt.enter();
        assert_eq!(models.get("sas").unwrap().state, State::Ready);
        let err = models
            .request_prefetch("sas", PrefetchOverride::default())
            .unwrap_err();
        assert!(
            matches!(&err, ModelError::Invalid(m) if m.contains("name the source in the request body")),
            "{err}"
        );
        // Named again in the body (under the allowed prefix), it is fetched.
        let named = PrefetchOverride {
            source: Some("https://acct.blob.core.windows.net/models/sas?sv=1&sig=x".into()),
            ..PrefetchOverride::default()
        };
        let (_, joined) = models.request_prefetch("sas", named).unwrap();
        assert!(!joined);
    }

    /// Six simultaneous requests for a new model start exactly one job (issue: two jobs for one
    /// model). The runtime is not driven while they race, so no job can finish and make room for
    /// a legitimate second one: the only way to get two is the race itself.
    #[test]
    fn concurrent_requests_for_a_new_model_start_exactly_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir(&source).unwrap();
        let toml = format!(
            "cache_root = \"{}\"\n[disk]\nenabled = false\n[api]\nallowed_sources = [\"file://{}/\"]\n",
            dir.path().join("cache").display(),
            dir.path().display()
        );
        let (rt, models) = registry(&toml);
        let url = format!("file://{}", source.display());
        for round in 0..100 {
            let name = format!("m{round}");
            let start = std::sync::Barrier::new(6);
            let answers: Vec<(u64, bool)> = std::thread::scope(|s| {
                let posts: Vec<_> = (0..6)
                    .map(|_| {
                        s.spawn(|| {
                            let _in_runtime = rt.enter();
                            start.wait();
                            let request = PrefetchOverride {
                                source: Some(url.clone()),
                                ..PrefetchOverride::default()
                            };
                            models.request_prefetch(&name, request).unwrap()
                        })
                    })
                    .collect();
                posts.into_iter().map(|p| p.join().unwrap()).collect()
            });
            let started = answers.iter().filter(|(_, joined)| !joined).count();
            assert_eq!(started, 1, "round {round}: {answers:?}");
            assert!(
                answers.iter().all(|(id, _)| *id == answers[0].0),
                "round {round}: {answers:?}"
            );
        }
    }
}
