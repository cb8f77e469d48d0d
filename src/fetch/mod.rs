//! The prefetch engine: list a source, select the model's files, plan them as ranges, download
//! them in parallel into staging while hashing, verify, and publish.
//!
//! This module owns the order of those steps, the resume journal ([`journal`]), the range engine
//! ([`pieces`]) and live counters ([`progress`]). It calls `source` for bytes, `verify` for
//! judgements and `store` for paths and publishing; it knows nothing of HTTP servers, terminals
//! or Kubernetes.

pub mod journal;
mod pieces;
pub mod progress;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::config::{FetchOptions, Selection, human_bytes};
use crate::source::{MANIFEST_NAME, RemoteFile, Source, SourceError, validate_name};
use crate::store::{
    Layout, ModelName, ReadyFile, ReadyMarker, StagedModel, StoreError, Verification,
    link_revision, publish,
};
use crate::verify::VerifyError;
use crate::verify::hash::combine;
use crate::verify::manifest::{Manifest, ManifestEntry};
use crate::verify::structure::{
    ShardTensors, check_index, check_safetensors, is_index, is_safetensors,
};
use journal::{Journal, JournalLine, index_lines};
pub use pieces::error_chain;
use pieces::{Engine, FileSlot, Sink};
use progress::{Phase, Progress};

/// What a caller can do about a failed prefetch; the command line maps these to exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request itself is wrong (URL, name, selection).
    InvalidInput,
    /// The source cannot be read: missing, credentials, permissions.
    SourceUnavailable,
    /// Downloading failed after retries, or the source kept changing.
    DownloadFailed,
    /// The bytes are not the model (hash, size, structure).
    VerifyFailed,
    /// The cache filesystem is too small.
    NoSpace,
    /// The local cache failed (I/O).
    Cache,
    /// The caller cancelled the prefetch (shutdown).
    Cancelled,
}

/// A failed prefetch, with the file, range or path involved.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// Listing or reading the manifest failed.
    #[error("cannot read the source {url}")]
    Source {
        /// The source, redacted.
        url: String,
        /// Why.
        #[source]
        source: SourceError,
    },
    /// A listed name is unsafe.
    #[error(transparent)]
    UnsafeName(SourceError),
    /// Nothing under the prefix matches the selection.
    #[error(
        "no file under {url} matches the selection (include {include:?}, exclude {exclude:?}; {listed} files listed)"
    )]
    NothingSelected {
        /// The source, redacted.
        url: String,
        /// Include globs.
        include: Vec<String>,
        /// Exclude globs.
        exclude: Vec<String>,
        /// How many files the source listed.
        listed: usize,
    },
    /// A range failed on every attempt.
    #[error(
        "{path} bytes {start}..{end}: gave up after {attempts} attempts over {:.1}s (hint: raise --max-attempts or --stall-timeout if the source is slow)",
        elapsed.as_secs_f64()
    )]
    RangeFailed {
        /// The file.
        path: String,
        /// First byte of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// Attempts made.
        attempts: u32,
        /// Time spent on the range.
        elapsed: Duration,
        /// The last failure.
        #[source]
        source: SourceError,
    },
    /// A file changed during the download (handled by restarting from a new listing).
    #[error("{path} changed in the source during the download")]
    SourceChanged {
        /// The file.
        path: String,
    },
    /// Files kept changing across fresh listings.
    #[error(
        "{path} kept changing in the source: {restarts} fresh listings did not settle (hint: wait until the upload has finished)"
    )]
    SourceKeptChanging {
        /// The last file that changed.
        path: String,
        /// Restarts made.
        restarts: u32,
    },
    /// The disk budget cannot hold the model even after evicting every unpinned model.
    #[error(
        "the model needs {} but the cache budget leaves {} after evicting every unpinned model (hint: raise cache.budget or unpin a model)",
        human_bytes(*needed), human_bytes(*available)
    )]
    OverBudget {
        /// Bytes needed.
        needed: u64,
        /// Bytes the budget leaves.
        available: u64,
    },
    /// The free-space check failed before downloading.
    #[error(
        "not enough space in {dir}: the model needs {} more ({needed} bytes with headroom) but {} ({available} bytes) are free (hint: free space, or narrow the model with --include/--exclude)",
        human_bytes(*needed), human_bytes(*available)
    )]
    NoSpace {
        /// The staging directory.
        dir: PathBuf,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        available: u64,
    },
    /// A local file operation failed.
    #[error("failed to {action} {path}")]
    Local {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Verification failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller cancelled the prefetch; finished ranges are journaled for the next run.
    #[error("the prefetch was cancelled; finished ranges are kept for the next run")]
    Cancelled,
    /// A bug or a panicked task.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PrefetchError {
    pub(crate) fn local(action: &'static str, path: PathBuf, source: std::io::Error) -> Self {
        PrefetchError::Local {
            action,
            path,
            source,
        }
    }

    /// The group this error belongs to.
    pub fn kind(&self) -> ErrorKind {
        let io_kind = |e: &std::io::Error| {
            if e.kind() == std::io::ErrorKind::StorageFull {
                ErrorKind::NoSpace
            } else {
                ErrorKind::Cache
            }
        };
        match self {
            PrefetchError::Source { source, .. } => match source {
                SourceError::InvalidUrl { .. }
                | SourceError::Config { .. }
                | SourceError::UnsafeName { .. } => ErrorKind::InvalidInput,
                SourceError::Transient { .. } => ErrorKind::DownloadFailed,
                _ => ErrorKind::SourceUnavailable,
            },
            PrefetchError::UnsafeName(_) | PrefetchError::NothingSelected { .. } => {
                ErrorKind::InvalidInput
            }
            PrefetchError::RangeFailed { source, .. } => match source {
                SourceError::NotFound { .. }
                | SourceError::Unauthenticated { .. }
                | SourceError::PermissionDenied { .. } => ErrorKind::SourceUnavailable,
                _ => ErrorKind::DownloadFailed,
            },
            PrefetchError::SourceChanged { .. } | PrefetchError::SourceKeptChanging { .. } => {
                ErrorKind::DownloadFailed
            }
            PrefetchError::NoSpace { .. } | PrefetchError::OverBudget { .. } => ErrorKind::NoSpace,
            PrefetchError::Local { source, .. } => io_kind(source),
            PrefetchError::Verify(VerifyError::ManifestRequired) => ErrorKind::SourceUnavailable,
            PrefetchError::Verify(_) => ErrorKind::VerifyFailed,
            PrefetchError::Store(e) => match e {
                StoreError::InvalidName { .. } => ErrorKind::InvalidInput,
                other => other.io_error().map_or(ErrorKind::Cache, io_kind),
            },
            PrefetchError::Cancelled => ErrorKind::Cancelled,
            PrefetchError::Internal(_) => ErrorKind::Cache,
        }
    }
}

/// What to prefetch and how.
#[derive(Clone)]
pub struct PrefetchRequest {
    /// The model's name in the cache.
    pub model: ModelName,
    /// Which files of the source.
    pub selection: Selection,
    /// Download tuning.
    pub options: FetchOptions,
    /// Refuse a source without a manifest.
    pub require_manifest: bool,
    /// Cancels the prefetch (shutdown); finished ranges stay journaled.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Called with the bytes still to be written before the free-space check, so a caller
    /// with a disk budget can evict other models first (or refuse with an error).
    pub make_room: Option<MakeRoom>,
}

/// See [`PrefetchRequest::make_room`].
pub type MakeRoom = Arc<dyn Fn(u64) -> Result<(), PrefetchError> + Send + Sync>;

impl std::fmt::Debug for PrefetchRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchRequest")
            .field("model", &self.model)
            .field("selection", &self.selection)
            .field("options", &self.options)
            .field("require_manifest", &self.require_manifest)
            .field("make_room", &self.make_room.is_some())
            .finish_non_exhaustive()
    }
}

/// The outcome of a successful prefetch.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The model.
    pub model: String,
    /// The published revision.
    pub revision: String,
    /// `models/NAME`, the path to give vLLM.
    pub path: PathBuf,
    /// Files in the model.
    pub files: usize,
    /// Bytes in the model.
    pub bytes_total: u64,
    /// Bytes received from the source in this run.
    pub bytes_fetched: u64,
    /// Bytes reused from an earlier run or an already published revision.
    pub bytes_reused: u64,
    /// Wall time.
    pub seconds: f64,
    /// Bytes fetched per second, in GB/s.
    pub gb_per_s: f64,
    /// How the model was verified.
    pub verification: Verification,
    /// The revision was already published: nothing was downloaded.
    pub already_published: bool,
    /// Range retries by cause.
    pub retries: BTreeMap<String, u64>,
    /// Fresh listings after a file changed during the download.
    pub source_restarts: u32,
    /// Files fetched a second time after a hash mismatch.
    pub refetched_files: Vec<String>,
}

/// Fills the cache with a model from `source`, resuming earlier work, and publishes it at
/// `models/NAME` when every file is verified.
pub async fn prefetch(
    source: Arc<dyn Source>,
    layout: &Layout,
    request: &PrefetchRequest,
    progress: Arc<Progress>,
) -> Result<Summary, PrefetchError> {
    request
        .options
        .validate()
        .map_err(|e| PrefetchError::Internal(e.to_string()))?;
    let started = Instant::now();
    layout.ensure()?;
    let mut restarts = 0;
    loop {
        match attempt(&source, layout, request, &progress, started, restarts).await {
            Err(PrefetchError::SourceChanged { path }) => {
                if restarts >= request.options.max_source_changes {
                    return Err(PrefetchError::SourceKeptChanging { path, restarts });
                }
                restarts += 1;
                warn!(
                    model.name = %request.model,
                    blob.path = %path,
                    restart = restarts,
                    "{path} changed in the source during the download; listing again (restart {restarts})"
                );
            }
            other => return other,
        }
    }
}

/// What the listing and manifest say the model is.
struct Plan {
    files: Vec<RemoteFile>,
    manifest: Option<(Manifest, bytes::Bytes)>,
    revision: String,
}

async fn plan(source: &Arc<dyn Source>, request: &PrefetchRequest) -> Result<Plan, PrefetchError> {
    let url = source.describe();
    let source_err = |source| PrefetchError::Source {
        url: url.clone(),
        source,
    };
    let options = &request.options;
    let listed = retried(options, "listing", || source.list())
        .await
        .map_err(source_err)?;
    if listed.is_empty() {
        return Err(source_err(SourceError::NotFound { path: url.clone() }));
    }
    let listed_count = listed.len();
    let files: Vec<RemoteFile> = listed
        .into_iter()
        .filter(|f| f.path != MANIFEST_NAME && request.selection.is_selected(&f.path))
        .collect();
    for f in &files {
        validate_name(&f.path).map_err(PrefetchError::UnsafeName)?;
    }
    if files.is_empty() {
        let (include, exclude) = request.selection.patterns();
        return Err(PrefetchError::NothingSelected {
            url,
            include: include.to_vec(),
            exclude: exclude.to_vec(),
            listed: listed_count,
        });
    }
    let manifest = match retried(options, MANIFEST_NAME, || source.read_small(MANIFEST_NAME))
        .await
        .map_err(source_err)?
    {
        Some(bytes) => {
            let m = Manifest::parse(&bytes, &format!("{url}/{MANIFEST_NAME}"))?;
            Some((m, bytes))
        }
        None if request.require_manifest => return Err(VerifyError::ManifestRequired.into()),
        None => None,
    };
    if let Some((m, _)) = &manifest {
        for f in &files {
            let entry = m.get(&f.path).ok_or_else(|| VerifyError::NotInManifest {
                path: f.path.clone(),
            })?;
            if entry.size != f.size {
                return Err(VerifyError::SizeMismatch {
                    path: f.path.clone(),
                    expected: entry.size,
                    actual: f.size,
                }
                .into());
            }
        }
        for entry in m.entries() {
            let listed = files.iter().any(|f| f.path == entry.path);
            if !listed && request.selection.is_selected(&entry.path) {
                return Err(VerifyError::MissingFromSource {
                    path: entry.path.clone(),
                }
                .into());
            }
        }
    }
    let revision = revision_of(&files, manifest.as_ref().map(|(m, _)| m));
    Ok(Plan {
        files,
        manifest,
        revision,
    })
}

/// Retries a whole-object source call (a listing, the manifest) like a range: transient
/// failures up to `max_attempts`, honouring `Retry-After`.
async fn retried<T, F, Fut>(
    options: &FetchOptions,
    what: &str,
    mut call: F,
) -> Result<T, SourceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SourceError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match call().await {
            Err(e) if e.retry_cause().is_some() && attempt < options.max_attempts => {
                let delay = options.backoff(attempt, e.retry_after());
                warn!(
                    attempt,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "retrying {what} after: {}",
                    error_chain(&e)
                );
                tokio::time::sleep(delay).await;
            }
            other => return other,
        }
    }
}

/// A revision names the exact content: with a manifest, the files' hashes; without, their ETags.
fn revision_of(files: &[RemoteFile], manifest: Option<&Manifest>) -> String {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        let id = manifest
            .and_then(|m| m.get(&f.path))
            .map_or(f.etag.as_str(), |e| e.blake3.as_str());
        hasher.update(format!("{}\t{}\t{}\n", f.path, f.size, id).as_bytes());
    }
    hasher.finalize().to_hex()[..16].to_string()
}

async fn attempt(
    source: &Arc<dyn Source>,
    layout: &Layout,
    request: &PrefetchRequest,
    progress: &Arc<Progress>,
    started: Instant,
    restarts: u32,
) -> Result<Summary, PrefetchError> {
    let name = &request.model;
    let options = &request.options;
    enter_phase(progress, name, Phase::Listing);
    let plan = plan(source, request).await?;
    let total: u64 = plan.files.iter().map(|f| f.size).sum();
    progress.set_total(total);
    let verification = if plan.manifest.is_some() && options.hash {
        Verification::Blake3
    } else {
        Verification::Structural
    };
    let summary = |fetched: u64, reused: u64, already: bool, refetched: Vec<String>| {
        let seconds = started.elapsed().as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let gb_per_s = if seconds > 0.0 {
            fetched as f64 / seconds / 1e9
        } else {
            0.0
        };
        Summary {
            model: name.to_string(),
            revision: plan.revision.clone(),
            path: layout.model_link(name),
            files: plan.files.len(),
            bytes_total: total,
            bytes_fetched: fetched,
            bytes_reused: reused,
            seconds,
            gb_per_s,
            verification,
            already_published: already,
            retries: progress
                .retries()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| (c.as_str().to_string(), n))
                .collect(),
            source_restarts: restarts,
            refetched_files: refetched,
        }
    };

    // Already published and intact: link it (again) and stop.
    let revision_dir = layout.revision_dir(name, &plan.revision);
    if let Ok(marker) = ReadyMarker::read(&revision_dir) {
        if marker.files_present(&revision_dir) {
            link_revision(layout, name, &plan.revision)?;
            progress.add_reused(total.saturating_sub(progress.reused()));
            enter_phase(progress, name, Phase::Done);
            info!(model.name = %name, revision = %plan.revision, "{name} revision {} is already published", plan.revision);
            return Ok(summary(progress.fetched(), total, true, Vec::new()));
        }
    }

    // Resume: keep journal lines that match this plan and whose partial file is intact.
    let journal_path = layout.journal_path(name);
    let lines = Journal::load(&journal_path)?;
    let by_file = index_lines(&lines);
    let chunk = options.chunk_size;
    let mut kept: Vec<JournalLine> = Vec::new();
    let mut slots = Vec::with_capacity(plan.files.len());
    let mut needed_space: u64 = 0;
    for f in &plan.files {
        let partial = layout.partial_path(name, &f.path);
        let partial_len = std::fs::metadata(&partial).map(|m| m.len()).ok();
        let slot = FileSlot::new(f.clone(), Some(Sink::new(partial)), chunk);
        if partial_len == Some(f.size) {
            if let Some(done) = by_file.get(&(f.path.clone(), f.size, f.etag.clone(), chunk)) {
                let mut digests = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
                for line in done {
                    let digest = if options.hash {
                        line.digest_bytes()
                    } else {
                        Some([0; 32])
                    };
                    let Some(digest) = digest else { continue };
                    if let Some(d) = usize::try_from(line.index)
                        .ok()
                        .and_then(|i| digests.get_mut(i))
                    {
                        if d.is_none() {
                            *d = Some(digest);
                            kept.push(line.clone());
                        }
                    }
                }
            }
        } else {
            needed_space += f.size;
        }
        slots.push(slot);
    }
    let reused: u64 = kept
        .iter()
        .map(|l| (l.index * chunk + chunk).min(l.size) - l.index * chunk)
        .sum();
    progress.add_reused(reused.saturating_sub(progress.reused()));
    let journal = Arc::new(Mutex::new(Journal::rewrite(&journal_path, &kept)?));

    if let Some(make_room) = &request.make_room {
        make_room(needed_space)?;
    }
    check_space(&layout.staging_dir(name), needed_space)?;

    let engine = Arc::new(Engine {
        source: Arc::clone(source),
        options: options.clone(),
        progress: Arc::clone(progress),
        files: slots,
        pending: Mutex::new(Vec::new()),
        cancel: request.cancel.clone(),
    });

    info!(
        model.name = %name,
        revision = %plan.revision,
        files = plan.files.len(),
        size_bytes = total,
        reused_bytes = reused,
        "prefetching {name} ({} in {} files, {} already on disk) from {}",
        human_bytes(total),
        plan.files.len(),
        human_bytes(reused),
        source.describe()
    );
    enter_phase(progress, name, Phase::Downloading);
    let mut refetched: Vec<String> = Vec::new();
    let expected: HashMap<&str, &ManifestEntry> = plan
        .manifest
        .as_ref()
        .map(|(m, _)| m.entries().map(|e| (e.path.as_str(), e)).collect())
        .unwrap_or_default();

    for pass in 0..2 {
        let jobs: Vec<(usize, u64)> = engine
            .files
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.missing().into_iter().map(move |r| (i, r)))
            .collect();
        run_with_checkpoints(&engine, jobs, &journal, &layout.progress_path(name)).await?;

        // Every range is in: combine each file's digests and compare with the manifest.
        enter_phase(progress, name, Phase::Verifying);
        if !options.hash {
            break;
        }
        let mut mismatched = Vec::new();
        for slot in &engine.files {
            let digests: Vec<_> = slot.digests().into_iter().flatten().collect();
            let actual = combine(&digests).to_hex().to_string();
            if let Some(entry) = expected.get(slot.remote.path.as_str()) {
                if entry.blake3 != actual {
                    if pass == 1 {
                        return Err(VerifyError::HashMismatch {
                            path: slot.remote.path.clone(),
                            expected: entry.blake3.clone(),
                            actual,
                        }
                        .into());
                    }
                    warn!(model.name = %name, blob.path = %slot.remote.path, "{}: BLAKE3 does not match the manifest; fetching it once more", slot.remote.path);
                    mismatched.push(slot.remote.path.clone());
                    let mut d = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
                    d.iter_mut().for_each(|x| *x = None);
                }
            }
        }
        if mismatched.is_empty() {
            break;
        }
        // Lines journaled during the first pass for those files must go too.
        let mut still: Vec<JournalLine> = Journal::load(&journal_path)?;
        still.retain(|l| !mismatched.contains(&l.path));
        *journal.lock().unwrap_or_else(|p| p.into_inner()) =
            Journal::rewrite(&journal_path, &still)?;
        refetched.extend(mismatched);
        enter_phase(progress, name, Phase::Downloading);
    }

    // Structure: every safetensors header, then every index against them.
    let structure_files: Vec<(String, PathBuf)> = plan
        .files
        .iter()
        .filter(|f| is_safetensors(&f.path) || is_index(&f.path))
        .map(|f| (f.path.clone(), layout.partial_path(name, &f.path)))
        .collect();
    tokio::task::spawn_blocking(move || check_structure(&structure_files))
        .await
        .map_err(|e| PrefetchError::Internal(e.to_string()))??;

    enter_phase(progress, name, Phase::Publishing);
    let files: Vec<ReadyFile> = engine
        .files
        .iter()
        .map(|s| ReadyFile {
            path: s.remote.path.clone(),
            size: s.remote.size,
            blake3: options.hash.then(|| {
                let digests: Vec<_> = s.digests().into_iter().flatten().collect();
                combine(&digests).to_hex().to_string()
            }),
            mtime_ns: None,
        })
        .collect();
    let marker = ReadyMarker {
        name: name.to_string(),
        source: source.describe(),
        revision: plan.revision.clone(),
        files,
        bytes: total,
        verification,
        verified_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    let manifest_bytes = plan.manifest.as_ref().map(|(_, b)| b.to_vec());
    let staged_layout = layout.clone();
    let staged_name = name.clone();
    let revision = plan.revision.clone();
    tokio::task::spawn_blocking(move || {
        publish(
            &staged_layout,
            &StagedModel {
                name: &staged_name,
                revision: &revision,
                marker: &marker,
                manifest: manifest_bytes.as_deref(),
            },
        )
    })
    .await
    .map_err(|e| PrefetchError::Internal(e.to_string()))??;
    drop(journal);
    let staging = layout.staging_dir(name);
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        warn!(path = %staging.display(), "could not remove the staging directory {}: {e}", staging.display());
    }
    enter_phase(progress, name, Phase::Done);
    info!(model.name = %name, revision = %plan.revision, "published {name} revision {}", plan.revision);
    Ok(summary(
        progress.fetched(),
        progress.reused(),
        false,
        refetched,
    ))
}

/// Enters a phase, logging the one that ended with its duration.
fn enter_phase(progress: &Progress, name: &ModelName, phase: Phase) {
    if let Some((ended, took)) = progress.set_phase(phase) {
        info!(
            model.name = %name,
            phase = ended.as_str(),
            next_phase = phase.as_str(),
            duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "{name}: {} took {:.1} s; now {}",
            ended.as_str(),
            took.as_secs_f64(),
            phase.as_str()
        );
    }
}

/// Runs the engine while a checkpoint task makes finished ranges durable every two seconds;
/// whatever the outcome, a last checkpoint runs, so a failed or cancelled run keeps its work.
async fn run_with_checkpoints(
    engine: &Arc<Engine>,
    jobs: Vec<(usize, u64)>,
    journal: &Arc<Mutex<Journal>>,
    progress_file: &std::path::Path,
) -> Result<(), PrefetchError> {
    let ticker = {
        let engine = Arc::clone(engine);
        let journal = Arc::clone(journal);
        let progress_file = progress_file.to_path_buf();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(2));
            interval.tick().await;
            loop {
                interval.tick().await;
                if let Err(e) = checkpoint(&engine, &journal).await {
                    warn!("checkpoint of the resume journal failed: {e}");
                }
                write_progress(&progress_file, &engine.progress);
            }
        })
    };
    let result = engine.run(jobs).await;
    ticker.abort();
    let _ = ticker.await;
    let flushed = checkpoint(engine, journal).await;
    result?;
    flushed.map_err(PrefetchError::from)
}

/// Best effort: progress is for people watching, so a failure to write it is not an error.
fn write_progress(path: &std::path::Path, progress: &Progress) {
    let Ok(json) = serde_json::to_vec(&progress.snapshot()) else {
        return;
    };
    let tmp = path.with_extension("json.tmp");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Makes finished ranges durable: fdatasync each partial file they wrote, then append their lines
/// to the journal and fsync it.
async fn checkpoint(engine: &Arc<Engine>, journal: &Arc<Mutex<Journal>>) -> Result<(), StoreError> {
    let finished = engine.take_finished();
    if finished.is_empty() {
        return Ok(());
    }
    let journal = Arc::clone(journal);
    tokio::task::spawn_blocking(move || {
        let mut synced: Vec<*const std::fs::File> = Vec::new();
        for f in &finished {
            let ptr = Arc::as_ptr(&f.file);
            if !synced.contains(&ptr) {
                f.file
                    .sync_data()
                    .map_err(StoreError::io("fsync", std::path::Path::new(&f.line.path)))?;
                synced.push(ptr);
            }
        }
        let lines: Vec<JournalLine> = finished.into_iter().map(|f| f.line).collect();
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&lines)
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::Io {
            action: "checkpoint",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Fails before the first byte when the staging filesystem cannot hold what is still missing.
fn check_space(staging: &std::path::Path, needed: u64) -> Result<(), PrefetchError> {
    if needed == 0 {
        return Ok(());
    }
    std::fs::create_dir_all(staging)
        .map_err(|e| PrefetchError::local("create", staging.to_path_buf(), e))?;
    let stat = nix::sys::statvfs::statvfs(staging).map_err(|e| {
        PrefetchError::local("check free space of", staging.to_path_buf(), e.into())
    })?;
    #[expect(
        clippy::useless_conversion,
        reason = "statvfs field types differ between platforms"
    )]
    let available =
        u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
    // Headroom for the journal, the records and filesystem metadata.
    let with_headroom = needed.saturating_add(needed / 100).saturating_add(4 << 20);
    if with_headroom > available {
        return Err(PrefetchError::NoSpace {
            dir: staging.to_path_buf(),
            needed: with_headroom,
            available,
        });
    }
    Ok(())
}

/// Checks every safetensors header, then every index against the headers.
fn check_structure(files: &[(String, PathBuf)]) -> Result<(), VerifyError> {
    let mut shards: HashMap<String, ShardTensors> = HashMap::new();
    for (rel, path) in files.iter().filter(|(rel, _)| is_safetensors(rel)) {
        shards.insert(rel.clone(), check_safetensors(path, rel)?);
    }
    for (rel, path) in files.iter().filter(|(rel, _)| is_index(rel)) {
        let bytes = std::fs::read(path).map_err(|source| VerifyError::Io {
            path: path.clone(),
            source,
        })?;
        check_index(rel, &bytes, &shards)?;
    }
    Ok(())
}

/// Computes the manifest of a source's selected files by reading them through the same range
/// engine (parallel, retried), without writing anything.
pub async fn compute_manifest(
    source: Arc<dyn Source>,
    selection: &Selection,
    options: &FetchOptions,
    progress: Arc<Progress>,
) -> Result<Manifest, PrefetchError> {
    let url = source.describe();
    let listed = retried(options, "listing", || source.list())
        .await
        .map_err(|source| PrefetchError::Source {
            url: url.clone(),
            source,
        })?;
    let files: Vec<RemoteFile> = listed
        .into_iter()
        .filter(|f| f.path != MANIFEST_NAME && selection.is_selected(&f.path))
        .collect();
    for f in &files {
        validate_name(&f.path).map_err(PrefetchError::UnsafeName)?;
    }
    if files.is_empty() {
        let (include, exclude) = selection.patterns();
        return Err(PrefetchError::NothingSelected {
            url,
            include: include.to_vec(),
            exclude: exclude.to_vec(),
            listed: 0,
        });
    }
    progress.set_total(files.iter().map(|f| f.size).sum());
    let _ = progress.set_phase(Phase::Downloading);
    let mut options = options.clone();
    options.hash = true;
    let chunk = options.chunk_size;
    let engine = Arc::new(Engine {
        source,
        options,
        progress: Arc::clone(&progress),
        files: files
            .into_iter()
            .map(|f| FileSlot::new(f, None, chunk))
            .collect(),
        pending: Mutex::new(Vec::new()),
        cancel: tokio_util::sync::CancellationToken::new(),
    });
    let jobs: Vec<(usize, u64)> = engine
        .files
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.missing().into_iter().map(move |r| (i, r)))
        .collect();
    engine.run(jobs).await?;
    let _ = progress.set_phase(Phase::Done);
    let entries = engine
        .files
        .iter()
        .map(|s| {
            let digests: Vec<_> = s.digests().into_iter().flatten().collect();
            ManifestEntry {
                path: s.remote.path.clone(),
                size: s.remote.size,
                blake3: combine(&digests).to_hex().to_string(),
            }
        })
        .collect();
    Ok(Manifest::from_entries(entries)?)
}
