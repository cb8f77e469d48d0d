//! The agent's models: their state, the one job that may run per model, retries of failed
//! models, the disk budget and eviction, and page-cache warming after publish.
//!
//! A model's state is derived, not stored twice: a running job reports `downloading` or
//! `verifying` from its live progress; otherwise the entry says `pending`, `ready` or `failed`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::metrics::Metrics;
use crate::config::agent::{AgentConfig, Budget, ModelSpec, WarmPolicy};
use crate::config::{Environment, human_bytes};
use crate::fetch::progress::{Phase, Progress};
use crate::fetch::{ErrorKind, PrefetchError, PrefetchRequest, error_chain, prefetch};
use crate::source::{self, SourceOptions, redact_url};
use crate::store::{Layout, ModelName, ReadyMarker, Verification, fsync_dir};

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
    /// Bytes present (fetched + reused) in the current or last run.
    pub bytes_done: u64,
    /// Bytes in the model (0 until listed).
    pub bytes_total: u64,
    /// Bytes fetched in the current or last run.
    pub bytes_fetched: u64,
    /// Bytes reused in the current or last run.
    pub bytes_reused: u64,
    /// Fetch rate of the current run.
    pub rate_bytes_per_second: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// The job currently working on the model.
    pub job: Option<u64>,
    /// The last error, on one line.
    pub last_error: Option<String>,
    /// Page-cache warming after publish.
    pub page_cache: Option<WarmReport>,
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
    state: State,
    in_backoff: bool,
    job: Option<Job>,
    progress: Arc<Progress>,
    started: Option<Instant>,
    revision: Option<String>,
    verification: Option<Verification>,
    last_error: Option<String>,
    last_used: SystemTime,
    warm: Option<WarmReport>,
}

impl Entry {
    fn new(spec: ModelSpec, configured: bool) -> Self {
        Self {
            spec,
            configured,
            state: State::Pending,
            in_backoff: false,
            job: None,
            progress: Arc::new(Progress::new()),
            started: None,
            revision: None,
            verification: None,
            last_error: None,
            last_used: SystemTime::now(),
            warm: None,
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

    fn status(&self) -> ModelStatus {
        let p = &self.progress;
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
            bytes_done: done,
            bytes_total: total,
            bytes_fetched: p.fetched(),
            bytes_reused: p.reused(),
            rate_bytes_per_second: rate,
            eta_seconds: eta,
            job: self.job.as_ref().map(|j| j.id),
            last_error: self.last_error.clone(),
            page_cache: self.warm.clone(),
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
    /// Metrics, updated as jobs finish and on scrape.
    pub metrics: Metrics,
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
            layout: Layout::new(&config.cache_root),
            env,
            entries: Mutex::new(BTreeMap::new()),
            blocked: Mutex::new(Some(why.to_string())),
            next_job: AtomicU64::new(1),
            metrics: Metrics::new(),
            config: Arc::clone(&config),
        });
        {
            let mut entries = models.lock();
            for spec in &config.models {
                let mut entry = Entry::new(spec.clone(), true);
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
        // Before any budget decision counts them: copies left by publishes that were killed.
        match crate::store::remove_publish_leftovers(&self.layout) {
            Ok(removed) => {
                for path in removed {
                    info!(path = %path.display(), "removed {} (left by an interrupted publish)", path.display());
                }
            }
            Err(e) => warn!(
                "could not remove what interrupted publishes left: {}",
                error_chain(&e)
            ),
        }
        *self.blocked_reason() = None;
        for spec in &self.config.models {
            let published = self
                .intact(&spec.name)
                .filter(|(_, marker)| marker.source == redact_url(&spec.source));
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
                entry.last_used = last_used;
            } else if entry.job.is_none() {
                self.spawn_job_locked(&mut entries, spec.name.as_str());
            }
        }
        self.adopt_published();
        Ok(())
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
            let spec = ModelSpec {
                name: name.clone(),
                source: marker.source.clone(),
                account: None,
                selection: crate::config::Selection::vllm_default(),
                pin: false,
                require_manifest: false,
            };
            let mut entry = Entry::new(spec, false);
            entry.state = State::Ready;
            entry.revision = Some(revision.clone());
            entry.verification = Some(marker.verification);
            entry.last_used = self.link_mtime(&name);
            info!(model.name = %name, revision = %revision, "{name} revision {revision} was published earlier: ready (unpinned)");
            self.lock().insert(name.to_string(), entry);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
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
        let revision = self.layout.published_revision(name)?;
        let dir = self.layout.revision_dir(name, &revision);
        let marker = ReadyMarker::read(&dir).ok()?;
        marker.files_present(&dir).then_some((revision, marker))
    }

    fn link_mtime(&self, name: &ModelName) -> SystemTime {
        std::fs::symlink_metadata(self.layout.model_link(name))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Every model's status.
    pub fn list(&self) -> Vec<ModelStatus> {
        self.lock().values().map(Entry::status).collect()
    }

    /// One model's status.
    pub fn get(&self, name: &str) -> Option<ModelStatus> {
        self.lock().get(name).map(Entry::status)
    }

    /// Marks a model as used now (its LRU position for eviction).
    pub fn touch(&self, name: &str) {
        if let Some(e) = self.lock().get_mut(name) {
            e.last_used = SystemTime::now();
        }
    }

    /// Whether every pinned model is ready.
    pub fn pinned_ready(&self) -> (bool, BTreeMap<String, State>) {
        let entries = self.lock();
        let states: BTreeMap<String, State> = entries
            .iter()
            .map(|(k, e)| (k.clone(), e.state()))
            .collect();
        let ready = entries
            .values()
            .filter(|e| e.spec.pin)
            .all(|e| e.state() == State::Ready);
        (ready, states)
    }

    /// Starts a prefetch, or joins the one in flight: returns the job id and whether it joined.
    ///
    /// Recording the model and starting its job happen under one lock, so concurrent requests
    /// for a new model see either no entry or an entry that already has its job: exactly one
    /// of them starts it, the others join.
    pub fn request_prefetch(
        self: &Arc<Self>,
        name: &str,
        request: PrefetchOverride,
    ) -> Result<(u64, bool), ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        // Disks only ever go from blocked to settled, so a request that passes this check
        // writes onto the settled cache filesystem, never onto the OS disk beneath it.
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason}); no model can be fetched until they are (see GET /v1/disk)"
            )));
        }
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(name) {
            if let Some(job) = &entry.job {
                // Join the job in flight; a model waiting out a backoff tries again now.
                job.wake.notify_one();
                entry.last_used = SystemTime::now();
                return Ok((job.id, true));
            }
            entry.spec = self.merged_spec(&model, Some(&entry.spec), request)?;
            entry.last_used = SystemTime::now();
        } else {
            let spec = self.merged_spec(&model, None, request)?;
            entries.insert(name.to_string(), Entry::new(spec, false));
        }
        let id = self.spawn_job_locked(&mut entries, name);
        Ok((id, false))
    }

    fn merged_spec(
        &self,
        name: &ModelName,
        base: Option<&ModelSpec>,
        o: PrefetchOverride,
    ) -> Result<ModelSpec, ModelError> {
        let source = match (o.source, base) {
            (Some(s), _) => s,
            (None, Some(b)) => b.source.clone(),
            (None, None) => {
                return Err(ModelError::Invalid(format!(
                    "model {name} is not configured: the request body must name a source"
                )));
            }
        };
        let selection = match (o.include, o.exclude, base) {
            (None, None, Some(b)) => b.selection.clone(),
            (include, exclude, _) => crate::config::Selection::new(
                &include.unwrap_or_default(),
                &exclude.unwrap_or_default(),
                true,
            )
            .map_err(|e| ModelError::Invalid(e.to_string()))?,
        };
        let account = o.account.or_else(|| base.and_then(|b| b.account.clone()));
        // A source that cannot even be opened (bad URL, no account) is the caller's mistake:
        // say so now, not as a failed model later.
        source::open(
            &source,
            &self.env,
            &SourceOptions {
                account: account.clone(),
            },
        )
        .map_err(|e| ModelError::Invalid(error_chain(&e)))?;
        Ok(ModelSpec {
            name: name.clone(),
            account,
            selection,
            pin: o.pin.unwrap_or(base.is_some_and(|b| b.pin)),
            require_manifest: o
                .require_manifest
                .unwrap_or(base.is_some_and(|b| b.require_manifest)),
            source,
        })
    }

    /// Starts the job of `name` and records it in its entry, both while the caller holds the
    /// registry lock: no one can see the entry without its job in between. The task itself
    /// only touches the registry once the caller releases the lock.
    fn spawn_job_locked(
        self: &Arc<Self>,
        entries: &mut BTreeMap<String, Entry>,
        name: &str,
    ) -> u64 {
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let models = Arc::clone(self);
        let (n, c, w) = (name.to_string(), cancel.clone(), Arc::clone(&wake));
        let handle = tokio::spawn(async move { models.run_job(n, id, c, w).await });
        if let Some(entry) = entries.get_mut(name) {
            entry.job = Some(Job {
                id,
                cancel,
                wake,
                handle,
            });
        }
        id
    }

    async fn run_job(
        self: Arc<Self>,
        name: String,
        id: u64,
        cancel: CancellationToken,
        wake: Arc<Notify>,
    ) {
        let mut delay = self.config.failed_retry_delay;
        loop {
            let Some((spec, progress)) = self.begin_attempt(&name) else {
                return;
            };
            let started = Instant::now();
            info!(model.name = %name, job = id, state = "downloading", "{name}: prefetch started (job {id})");
            let result = self
                .prefetch_once(&spec, Arc::clone(&progress), cancel.clone())
                .await;
            self.metrics.record_run(&name, &progress);
            let secs = started.elapsed().as_secs_f64();
            match result {
                Ok(summary) => {
                    info!(
                        model.name = %name, job = id, state = "ready", duration_ms = millis(started.elapsed()),
                        bytes_fetched = summary.bytes_fetched, bytes_reused = summary.bytes_reused,
                        "{name}: ready, revision {} ({} fetched, {} reused) in {secs:.1} s",
                        summary.revision, human_bytes(summary.bytes_fetched), human_bytes(summary.bytes_reused)
                    );
                    let files_bytes = summary.bytes_total;
                    let revision = summary.revision.clone();
                    {
                        let mut entries = self.lock();
                        if let Some(e) = entries.get_mut(&name) {
                            e.state = State::Ready;
                            e.revision = Some(summary.revision);
                            e.verification = Some(summary.verification);
                            e.last_error = None;
                            e.last_used = SystemTime::now();
                            e.job = None;
                        }
                    }
                    self.warm(&spec.name, &revision, files_bytes).await;
                    return;
                }
                Err(PrefetchError::Cancelled) => {
                    info!(model.name = %name, job = id, state = "pending", "{name}: stopped by shutdown; finished ranges are journaled");
                    if let Some(e) = self.lock().get_mut(&name) {
                        if !(e.state == State::Ready && e.revision.is_some()) {
                            e.state = State::Pending;
                        }
                        e.job = None;
                    }
                    return;
                }
                Err(e) => {
                    let line = error_chain(&e);
                    error!(model.name = %name, job = id, state = "failed", duration_ms = millis(started.elapsed()), "{name}: prefetch failed: {line}");
                    if e.kind() == ErrorKind::VerifyFailed {
                        self.metrics.verification_failed();
                    }
                    let retry = {
                        let mut entries = self.lock();
                        let Some(entry) = entries.get_mut(&name) else {
                            return;
                        };
                        // A failed refresh of a published model leaves it ready (see `state`).
                        if !(entry.state == State::Ready && entry.revision.is_some()) {
                            entry.state = State::Failed;
                        }
                        entry.last_error = Some(line);
                        if entry.configured {
                            entry.in_backoff = true;
                        } else {
                            entry.job = None;
                        }
                        entry.configured
                    };
                    if !retry {
                        return;
                    }
                    warn!(model.name = %name, delay_ms = millis(delay), "{name}: trying again in {}s", delay.as_secs());
                    tokio::select! {
                        () = cancel.cancelled() => {
                            if let Some(e) = self.lock().get_mut(&name) { e.job = None; e.in_backoff = false; }
                            return;
                        }
                        () = wake.notified() => {}
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(600));
                }
            }
        }
    }

    fn begin_attempt(&self, name: &str) -> Option<(ModelSpec, Arc<Progress>)> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name)?;
        entry.progress = Arc::new(Progress::new());
        entry.started = Some(Instant::now());
        entry.in_backoff = false;
        Some((entry.spec.clone(), Arc::clone(&entry.progress)))
    }

    async fn prefetch_once(
        self: &Arc<Self>,
        spec: &ModelSpec,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Result<crate::fetch::Summary, PrefetchError> {
        let source = source::open(
            &spec.source,
            &self.env,
            &SourceOptions {
                account: spec.account.clone(),
            },
        )
        .map_err(|source| PrefetchError::Source {
            url: redact_url(&spec.source),
            source,
        })?;
        let models = Arc::clone(self);
        let for_model = spec.name.clone();
        let request = PrefetchRequest {
            model: spec.name.clone(),
            selection: spec.selection.clone(),
            options: self.config.fetch.clone(),
            require_manifest: spec.require_manifest,
            cancel,
            make_room: Some(Arc::new(move |needed| models.make_room(&for_model, needed))),
        };
        prefetch(source, &self.layout, &request, progress).await
    }

    /// Keeps the cache within its budget before `for_model` writes `needed` more bytes:
    /// first removes unlinked old revisions, then evicts unpinned idle models, least recently
    /// used first. A pinned model, a model with a job, and a linked revision are never removed.
    fn make_room(&self, for_model: &ModelName, needed: u64) -> Result<(), PrefetchError> {
        let limit = match self.config.budget {
            Budget::Unlimited => return Ok(()),
            Budget::Bytes(b) => b,
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
                limit
            }
        };
        let used = self.used_bytes();
        if used.saturating_add(needed) <= limit {
            return Ok(());
        }
        // Remove nothing for an attempt that cannot succeed anyway.
        let reclaimable = self.reclaimable_bytes(for_model);
        if used.saturating_sub(reclaimable).saturating_add(needed) > limit {
            return Err(PrefetchError::OverBudget {
                needed,
                available: limit.saturating_sub(used.saturating_sub(reclaimable)),
            });
        }
        loop {
            let used = self.used_bytes();
            if used.saturating_add(needed) <= limit {
                return Ok(());
            }
            if let Some(old) = self.unlinked_revision() {
                info!(path = %old.display(), "removing unlinked revision {} to stay within the cache budget", old.display());
                remove_dir(&old)?;
                continue;
            }
            let Some(victim) = self.eviction_candidate(for_model) else {
                return Err(PrefetchError::OverBudget {
                    needed,
                    available: limit.saturating_sub(used),
                });
            };
            info!(model.name = %victim, "evicting {victim} (least recently used, unpinned) to make room for {for_model}");
            self.remove_model_files(&victim)?;
            let mut entries = self.lock();
            if let Some(e) = entries.get(victim.as_str()) {
                if e.configured {
                    if let Some(e) = entries.get_mut(victim.as_str()) {
                        e.state = State::Pending;
                        e.revision = None;
                    }
                } else {
                    entries.remove(victim.as_str());
                }
            }
            self.metrics.evicted();
        }
    }

    fn used_bytes(&self) -> u64 {
        dir_bytes(&self.layout.root().join("store"))
            + dir_bytes(&self.layout.root().join("staging"))
    }

    /// Bytes that eviction could free for `for_model`: unlinked revisions and idle unpinned
    /// models.
    fn reclaimable_bytes(&self, for_model: &ModelName) -> u64 {
        let store = self.layout.root().join("store");
        let entries = self.lock();
        let Ok(models) = std::fs::read_dir(&store) else {
            return 0;
        };
        let mut total = 0;
        for model in models.flatten() {
            let name = model.file_name().to_string_lossy().into_owned();
            let parsed = ModelName::new(&name).ok();
            let linked = parsed
                .as_ref()
                .and_then(|n| self.layout.published_revision(n));
            let evictable = parsed.as_ref().is_some_and(|n| {
                n != for_model
                    && linked.is_some()
                    && entries
                        .get(name.as_str())
                        .is_none_or(|e| !e.spec.pin && e.job.is_none())
            });
            let Ok(revisions) = std::fs::read_dir(model.path()) else {
                continue;
            };
            for rev in revisions.flatten() {
                let rev_name = rev.file_name().to_string_lossy().into_owned();
                if evictable || linked.as_deref() != Some(rev_name.as_str()) {
                    total += dir_bytes(&rev.path());
                }
            }
        }
        total
    }

    fn unlinked_revision(&self) -> Option<PathBuf> {
        let store = self.layout.root().join("store");
        for model in std::fs::read_dir(&store).ok()?.flatten() {
            let name = model.file_name().to_string_lossy().into_owned();
            let linked = ModelName::new(&name)
                .ok()
                .and_then(|n| self.layout.published_revision(&n));
            for rev in std::fs::read_dir(model.path()).ok()?.flatten() {
                let rev_name = rev.file_name().to_string_lossy().into_owned();
                if rev_name.starts_with('.') || linked.as_deref() == Some(rev_name.as_str()) {
                    continue;
                }
                return Some(rev.path());
            }
        }
        None
    }

    fn eviction_candidate(&self, for_model: &ModelName) -> Option<ModelName> {
        let entries = self.lock();
        let mut candidates: Vec<(SystemTime, ModelName)> = Vec::new();
        for link in std::fs::read_dir(self.layout.root().join("models"))
            .ok()?
            .flatten()
        {
            let Ok(name) = ModelName::new(&link.file_name().to_string_lossy()) else {
                continue;
            };
            if &name == for_model {
                continue;
            }
            let (pinned, busy, used) = match entries.get(name.as_str()) {
                Some(e) => (e.spec.pin, e.job.is_some(), e.last_used),
                None => (false, false, self.link_mtime(&name)),
            };
            if !pinned && !busy {
                candidates.push((used, name));
            }
        }
        candidates.sort();
        candidates.into_iter().next().map(|(_, n)| n)
    }

    fn remove_model_files(&self, name: &ModelName) -> Result<(), PrefetchError> {
        let link = self.layout.model_link(name);
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PrefetchError::local("remove", link, e)),
        }
        fsync_dir(&self.layout.root().join("models"))?;
        remove_dir(&self.layout.root().join("store").join(name.as_str()))?;
        remove_dir(&self.layout.staging_dir(name))
    }

    /// `DELETE /v1/models/NAME`: evicts an unpinned, idle model.
    pub fn evict(&self, name: &str) -> Result<(), ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason}); nothing is removed until they are"
            )));
        }
        {
            let entries = self.lock();
            let entry = entries.get(name);
            let on_disk = self.layout.model_link(&model).exists();
            match entry {
                None if !on_disk => return Err(ModelError::NotFound(name.to_string())),
                Some(e) if e.spec.pin => {
                    return Err(ModelError::Conflict(format!(
                        "{name} is pinned and is never evicted (hint: unpin it in the configuration)"
                    )));
                }
                Some(e) if e.job.is_some() => {
                    return Err(ModelError::Conflict(format!(
                        "{name} has a prefetch in flight (job {}); try again when it ends",
                        e.job.as_ref().map_or(0, |j| j.id)
                    )));
                }
                _ => {}
            }
        }
        self.remove_model_files(&model)
            .map_err(|e| ModelError::Internal(error_chain(&e)))?;
        let mut entries = self.lock();
        let configured = entries.get(name).is_some_and(|e| e.configured);
        if configured {
            if let Some(e) = entries.get_mut(name) {
                e.state = State::Pending;
                e.revision = None;
                e.verification = None;
            }
        } else {
            entries.remove(name);
        }
        info!(model.name = %name, "evicted {name}");
        self.metrics.evicted();
        Ok(())
    }

    /// Reads a newly published model into the page cache when the policy says so.
    async fn warm(&self, name: &ModelName, revision: &str, bytes: u64) {
        let ram = mem_total(&self.config.proc_root);
        let wanted = match self.config.warm {
            WarmPolicy::Off => false,
            WarmPolicy::On => true,
            #[expect(clippy::cast_precision_loss, reason = "a ratio")]
            WarmPolicy::Auto(f) => ram.is_some_and(|r| (bytes as f64) <= r as f64 * f),
        };
        if !wanted {
            info!(model.name = %name, "{name}: page-cache warming skipped (policy {:?}, model {}, RAM {})", self.config.warm, human_bytes(bytes), ram.map_or("unknown".into(), human_bytes));
            return;
        }
        let dir = self.layout.revision_dir(name, revision);
        let started = Instant::now();
        let result =
            tokio::task::spawn_blocking(move || crate::store::read_into_page_cache(&dir)).await;
        match result {
            Ok(Ok(read)) => {
                let seconds = started.elapsed().as_secs_f64();
                #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
                let rate = read as f64 / seconds.max(0.001) / 1e9;
                info!(model.name = %name, phase = "warm", duration_ms = millis(started.elapsed()), size_bytes = read, "{name}: read {} into the page cache in {seconds:.1} s ({rate:.2} GB/s)", human_bytes(read));
                self.metrics.phase("warm", started.elapsed());
                if let Some(e) = self.lock().get_mut(name.as_str()) {
                    e.warm = Some(WarmReport {
                        bytes: read,
                        seconds,
                    });
                }
            }
            Ok(Err(e)) => warn!(model.name = %name, "{name}: page-cache warming failed: {e}"),
            Err(e) => warn!(model.name = %name, "{name}: page-cache warming failed: {e}"),
        }
    }

    /// Cancels every job and waits (bounded) for them to checkpoint and stop.
    pub async fn shutdown(&self, limit: Duration) {
        let handles: Vec<tokio::task::JoinHandle<()>> = {
            let mut entries = self.lock();
            entries
                .values_mut()
                .filter_map(|e| {
                    e.job.take().map(|j| {
                        j.cancel.cancel();
                        j.handle
                    })
                })
                .collect()
        };
        let all = futures::future::join_all(handles);
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!(
                "some prefetch jobs did not stop within {}s",
                limit.as_secs()
            );
        }
    }

    /// Counters and gauges for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let entries = self.lock();
        let live: Vec<(String, State, Arc<Progress>)> = entries
            .iter()
            .map(|(k, e)| (k.clone(), e.state(), Arc::clone(&e.progress)))
            .collect();
        drop(entries);
        let stat = nix::sys::statvfs::statvfs(self.layout.root()).ok();
        #[expect(
            clippy::useless_conversion,
            reason = "statvfs field types vary by platform"
        )]
        let free = stat.map_or(0, |s| {
            u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()))
        });
        self.metrics.render(&live, free, self.used_bytes())
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

/// `MemTotal` from `PROC/meminfo`, in bytes.
fn mem_total(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Six simultaneous requests for a new model start exactly one job (issue: two jobs for one
    /// model). The runtime is not driven while they race, so no job can finish and make room for
    /// a legitimate second one: the only way to get two is the race itself.
    #[test]
    fn concurrent_requests_for_a_new_model_start_exactly_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir(&source).unwrap();
        let toml = format!(
            "cache_root = \"{}\"\n[disk]\nenabled = false\n",
            dir.path().join("cache").display()
        );
        let env = Environment::from_pairs(Vec::new());
        let config = Arc::new(AgentConfig::from_toml(&toml, "test", &env, &[]).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let models = {
            let _in_runtime = rt.enter();
            Models::start(config, env, None).unwrap()
        };
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

    #[test]
    fn meminfo_is_read_from_the_given_proc_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       24684084 kB\nMemFree: 1 kB\n",
        )
        .unwrap();
        assert_eq!(mem_total(dir.path()), Some(24_684_084 * 1024));
        assert_eq!(mem_total(&dir.path().join("none")), None);
    }
}
