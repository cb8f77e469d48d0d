//! The prefetch engine: list a source, select the model's files, plan them as ranges, download
//! them in parallel into staging while hashing, verify, and publish.
//!
//! This module owns the order of those steps, the resume journal ([`journal`]), the range engine
//! ([`pieces`]) and live counters ([`progress`]). It calls `source` for bytes, `verify` for
//! judgements and `store` for paths and publishing; it knows nothing of HTTP servers, terminals
//! or Kubernetes.

mod adaptive;
mod download;
mod dragonfly;
mod finish;
mod hedge;
pub mod journal;
mod pieces;
mod plan;
mod preflight;
pub mod progress;
mod resume;
mod sequential;
pub mod signed;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{info, warn};

use crate::config::{FetchOptions, Selection, human_bytes};
use crate::source::{Source, SourceError};
use crate::store::{
    Layout, ModelName, StoreError, Verification, link_revision, lock, recover_publish_leftovers,
};
use crate::verify::VerifyError;
use crate::verify::hash::combine;
use crate::verify::manifest::{Manifest, ManifestEntry};
pub use pieces::error_chain;
use pieces::{Engine, FileSlot};
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
    /// The selection holds a file and files under a directory of the same name.
    #[error(
        "the source holds both a file {file} and a file under {file}/ ({under}); a directory cannot hold both (hint: exclude one of them with --exclude or the model's exclude list)"
    )]
    FileIsDirectory {
        /// The name that is both.
        file: String,
        /// A file under it.
        under: String,
    },
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
    /// A range's read was refused in a way no retry changes (not found, no permission).
    #[error("cannot read {path} bytes {start}..{end}")]
    RangeRefused {
        /// The file.
        path: String,
        /// First byte of the range.
        start: u64,
        /// End of the range (exclusive).
        end: u64,
        /// Why.
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
    /// The Dragonfly path is on but the source has no manifest to check peers' bytes against.
    #[error(
        "fetch.dragonfly is on but {url} has no modelcache.manifest.json (nor a verified signature): bytes from peers can only be trusted against a manifest or the publisher's signature (hint: write one with `modelcache manifest`, sign the model (docs/signing.md), or turn fetch.dragonfly off)"
    )]
    DragonflyNeedsManifest {
        /// The source, redacted.
        url: String,
    },
    /// Verification failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The model's signature stopped it.
    #[error(transparent)]
    Signature(#[from] signed::SignedModelError),
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
                | SourceError::UnsafeName { .. }
                | SourceError::Outside { .. }
                | SourceError::LinkLoop { .. }
                | SourceError::TooManyFiles { .. } => ErrorKind::InvalidInput,
                SourceError::TooLarge { .. } => ErrorKind::VerifyFailed,
                SourceError::Transient { .. } => ErrorKind::DownloadFailed,
                _ => ErrorKind::SourceUnavailable,
            },
            PrefetchError::UnsafeName(_)
            | PrefetchError::FileIsDirectory { .. }
            | PrefetchError::NothingSelected { .. }
            | PrefetchError::DragonflyNeedsManifest { .. } => ErrorKind::InvalidInput,
            PrefetchError::RangeFailed { source, .. }
            | PrefetchError::RangeRefused { source, .. } => match source {
                SourceError::NotFound { .. }
                | SourceError::Unauthenticated { .. }
                | SourceError::PermissionDenied { .. }
                | SourceError::Unreadable { .. } => ErrorKind::SourceUnavailable,
                _ => ErrorKind::DownloadFailed,
            },
            PrefetchError::SourceChanged { .. } | PrefetchError::SourceKeptChanging { .. } => {
                ErrorKind::DownloadFailed
            }
            PrefetchError::NoSpace { .. } | PrefetchError::OverBudget { .. } => ErrorKind::NoSpace,
            PrefetchError::Local { source, .. } => io_kind(source),
            PrefetchError::Verify(VerifyError::ManifestRequired) => ErrorKind::SourceUnavailable,
            PrefetchError::Verify(_) | PrefetchError::Signature(_) => ErrorKind::VerifyFailed,
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
    /// Refuse a source without a manifest (a verified signature counts as one).
    pub require_manifest: bool,
    /// The publisher's signature: where, whom to trust, whether required.
    pub signature: signed::SignaturePolicy,
    /// Who asks, for whoever waits for the model's lock (`modelcache prefetch`, `agent job 3`).
    pub owner: String,
    /// Cancels the prefetch (shutdown); finished ranges stay journaled.
    pub cancel: tokio_util::sync::CancellationToken,
    /// Bounds the header and index bytes parsed at once; share one between prefetches that
    /// run together (the agent's models do) to bound them all.
    pub parse_budget: crate::verify::structure::ParseBudget,
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
            .field("signature", &self.signature.mode)
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
    /// `bytes_fetched` by where the bytes came from: modelcache's own GETs, or dfdaemon (from a
    /// peer, or from the source on the fleet's behalf).
    pub bytes_by_origin: progress::BytesByOrigin,
    /// What the Dragonfly path did (all zero when it is off).
    pub dragonfly: progress::DragonflyCounts,
    /// Wall time.
    pub seconds: f64,
    /// Bytes fetched per second, in GB/s.
    pub gb_per_s: f64,
    /// How the model was verified.
    pub verification: Verification,
    /// The revision was already published: nothing was downloaded.
    pub already_published: bool,
    /// Ranges in flight at the end of the download: the adaptive controller's choice, or the
    /// fixed `--concurrency` (0 when nothing was downloaded).
    pub concurrency: usize,
    /// Slow ranges at the end of the download asked for again on a second connection.
    pub hedged_ranges: u64,
    /// Range retries by cause.
    pub retries: BTreeMap<String, u64>,
    /// Fresh listings after a file changed during the download.
    pub source_restarts: u32,
    /// Files fetched a second time after a hash mismatch.
    pub refetched_files: Vec<String>,
    /// What the structure checks found odd but vLLM loads anyway (also in `ready.json`).
    pub warnings: Vec<String>,
    /// When each step happened, in seconds after the prefetch began.
    pub steps: progress::Steps,
    /// Who signed the published revision; absent: unsigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<signed::SignatureRecord>,
}

/// Fills the cache with a model from `source`, resuming earlier work, and publishes it at
/// `models/NAME` when every file is verified.
///
/// It first takes the model's lock ([`crate::store::lock`]), waiting while another process or
/// job works on the same model, so no two writers ever touch one model's files; under it,
/// what an interrupted publish left is recovered before anything else looks at the files.
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
    let name = &request.model;
    let Some(owner) = lock::lock(layout, name, &request.owner, &request.cancel, |who| {
        info!(model.name = %name, "{name}: waiting for {who}, which is working on it");
    })
    .await?
    else {
        return Err(PrefetchError::Cancelled);
    };
    for path in recover_publish_leftovers(layout, &owner)? {
        info!(model.name = %name, path = %path.display(), "{name}: recovered the files of an interrupted publish from {}", path.display());
    }
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

/// One pass from a fresh listing to a published model: plan, resume, make room, download and
/// hash, check structure, publish. A file that changes in the source ends it with
/// [`PrefetchError::SourceChanged`] and the caller starts another.
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
    let plan = plan::plan(source, request, progress).await?;
    let total: u64 = plan.files.iter().map(|f| f.size).sum();
    progress.set_total(total);
    let summary = |already: bool, verification: Verification, refetched: Vec<String>| Summary {
        model: name.to_string(),
        revision: plan.revision.clone(),
        path: layout.model_link(name),
        files: plan.files.len(),
        bytes_total: total,
        bytes_fetched: progress.fetched(),
        bytes_reused: progress.reused(),
        bytes_by_origin: progress.by_origin(),
        dragonfly: progress.dragonfly(),
        seconds: started.elapsed().as_secs_f64(),
        gb_per_s: rate(progress.fetched(), started.elapsed()),
        verification,
        already_published: already,
        concurrency: progress.concurrency(),
        hedged_ranges: progress.hedged_ranges(),
        retries: progress
            .retries()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(c, n)| (c.as_str().to_string(), n))
            .collect(),
        source_restarts: restarts,
        refetched_files: refetched,
        warnings: Vec::new(),
        steps: progress.steps(started),
        signature: plan
            .signature
            .as_ref()
            .map(|sig| sig.record(&request.signature.file)),
    };

    // Already published and intact: link it (again), drop what a publish killed after its
    // link swap left in staging, and stop.
    if let Some((dir_name, marker)) = layout.intact_revision(name, &plan.revision) {
        link_revision(layout, name, &dir_name)?;
        finish::remove_staging(layout, name);
        progress.add_reused(total.saturating_sub(progress.reused()));
        enter_phase(progress, name, Phase::Done);
        info!(model.name = %name, revision = %plan.revision, "{name} revision {} is already published", plan.revision);
        let signature = match &plan.signature {
            // The revision names the signed digests, so only the signer can differ (a key the
            // operator rotated in): record the one that verified now.
            Some(sig) => Some(finish::record_signature(
                layout,
                name,
                &dir_name,
                marker.clone(),
                sig,
                &request.signature.file,
            )?),
            None => marker.signature.clone(),
        };
        return Ok(Summary {
            warnings: marker.warnings,
            revision: dir_name,
            signature,
            ..summary(true, marker.verification, Vec::new())
        });
    }

    if options.dragonfly.is_some() && plan.manifest.is_none() && plan.signature.is_none() {
        return Err(PrefetchError::DragonflyNeedsManifest {
            url: source.describe(),
        });
    }
    let checked = preflight::check_before_download(
        source,
        &plan,
        options,
        &request.cancel,
        progress,
        &request.parse_budget,
    )
    .await?;
    info!(
        model.name = %name,
        shards = checked.shards,
        indexes = checked.indexes,
        bytes_read = checked.bytes_read,
        "{name}: {} shard headers and {} index(es) checked before downloading ({} read)",
        checked.shards,
        checked.indexes,
        human_bytes(checked.bytes_read)
    );
    let resumed = resume::resume(layout, name, &plan, options)?;
    progress.add_reused(resumed.reused.saturating_sub(progress.reused()));
    if let Some(make_room) = &request.make_room {
        make_room(resumed.needed_space)?;
    }
    download::check_space(&layout.staging_dir(name), resumed.needed_space)?;
    let sequential = sequential::for_plan(&plan, layout, name, options, &resumed.slots);
    let engine = Arc::new(Engine {
        source: Arc::clone(source),
        options: options.clone(),
        progress: Arc::clone(progress),
        files: resumed.slots,
        pending: Mutex::new(Vec::new()),
        cancel: request.cancel.clone(),
        writes: tokio_util::task::TaskTracker::new(),
        // Without a manifest nothing catches a bit flipped in transit afterwards: check each
        // range against the server's checksum as it arrives.
        check_transfers: plan.manifest.is_none(),
        sequential,
    });
    info!(
        model.name = %name,
        revision = %plan.revision,
        files = plan.files.len(),
        size_bytes = total,
        reused_bytes = resumed.reused,
        "prefetching {name} ({} in {} files, {} already on disk) from {}",
        human_bytes(total),
        plan.files.len(),
        human_bytes(resumed.reused),
        source.describe()
    );
    enter_phase(progress, name, Phase::Downloading);
    if let Some(dragonfly) = &options.dragonfly {
        dragonfly::fetch_through_dragonfly(&engine, &plan, layout, name, dragonfly).await?;
    }
    let refetched = download::download_verified(&engine, &resumed.journal, &plan, layout, name)
        .await
        .map_err(|e| match e {
            // The BLAKE3 compared was the signature's: say so.
            PrefetchError::Verify(VerifyError::HashMismatch {
                path,
                expected,
                actual,
            }) if plan
                .signature
                .as_ref()
                .is_some_and(signed::SignedPlan::stands_in_for_manifest) =>
            {
                signed::SignedModelError::DigestMismatch {
                    path,
                    range: None,
                    hash: "BLAKE3",
                    expected,
                    actual,
                }
                .into()
            }
            other => other,
        })?;
    if let Some(sequential) = &engine.sequential {
        if let Err(e) = sequential.finish().await {
            if let PrefetchError::Signature(signed::SignedModelError::DigestMismatch {
                path, ..
            }) = &e
            {
                // Not what was signed: fetched afresh by the next run, not hashed again as is
                // (a retry may find the source fixed, or the bytes were damaged on the way).
                download::forget(
                    &resumed.journal,
                    &layout.journal_path(name),
                    std::slice::from_ref(path),
                )?;
            }
            return Err(e);
        }
    }
    let warnings = finish::check_structure(layout, name, &plan, &request.parse_budget).await?;
    let verification = if plan.manifest.is_some() && options.hash {
        Verification::Blake3
    } else if engine.sequential.is_some() {
        Verification::Signature
    } else if every_range_checked(&plan, layout, name, options.chunk_size)? {
        Verification::Md5
    } else {
        Verification::Structural
    };
    if request.cancel.is_cancelled() {
        return Err(PrefetchError::Cancelled);
    }
    enter_phase(progress, name, Phase::Publishing);
    let linked = finish::publish_staged(
        layout,
        name,
        &plan,
        &engine,
        finish::Outcome {
            source: source.describe(),
            verification,
            warnings: warnings.clone(),
            signature_file: &request.signature.file,
        },
    )
    .await?;
    enter_phase(progress, name, Phase::Done);
    info!(model.name = %name, revision = %plan.revision, "published {name} revision {}", plan.revision);
    Ok(Summary {
        warnings,
        revision: linked,
        ..summary(false, verification, refetched)
    })
}

/// Whether the journal holds a range checked in transit for every range of every file, this
/// run's and those resumed from earlier ones alike.
fn every_range_checked(
    plan: &plan::Plan,
    layout: &Layout,
    name: &ModelName,
    chunk: u64,
) -> Result<bool, PrefetchError> {
    let lines = journal::Journal::load(&layout.journal_path(name))?;
    let checked: std::collections::HashSet<(&str, &str, u64)> = lines
        .iter()
        .filter(|l| l.checked && l.chunk == chunk)
        .map(|l| (l.path.as_str(), l.etag.as_str(), l.index))
        .collect();
    Ok(plan.files.iter().all(|f| {
        (0..f.size.div_ceil(chunk))
            .all(|i| checked.contains(&(f.path.as_str(), f.etag.as_str(), i)))
    }))
}

/// Gigabytes per second, for display.
fn rate(bytes: u64, took: Duration) -> f64 {
    let seconds = took.as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let gb = bytes as f64 / 1e9;
    if seconds > 0.0 { gb / seconds } else { 0.0 }
}

/// Enters a phase, logging the one that ended with its duration.
pub(super) fn enter_phase(progress: &Progress, name: &ModelName, phase: Phase) {
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

/// Computes the manifest of a source's selected files by reading them through the same range
/// engine (parallel, retried), without writing anything.
pub async fn compute_manifest(
    source: Arc<dyn Source>,
    selection: &Selection,
    options: &FetchOptions,
    progress: Arc<Progress>,
) -> Result<Manifest, PrefetchError> {
    let cancel = tokio_util::sync::CancellationToken::new();
    let files = plan::list_selected(
        &source,
        selection,
        options,
        Some(signed::DEFAULT_SIGNATURE_FILE),
        &cancel,
        &progress,
    )
    .await?;
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
        cancel,
        writes: tokio_util::task::TaskTracker::new(),
        check_transfers: true,
        sequential: None,
    });
    engine.run(engine.missing_ranges()).await?;
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
