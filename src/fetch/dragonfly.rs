//! The Dragonfly pass: before the range engine runs, each file still wholly missing is asked of
//! the node's dfdaemon, which takes it from a peer that has it or, failing that, from the
//! source. modelcache keeps the judgement, on bytes only it can write: each piece dfdaemon
//! reports written is cloned (a reflink where the filesystem can, a copy otherwise) from
//! dfdaemon's file, opened without following links, into a file of modelcache's own, and
//! hashed there; the file's BLAKE3 must match the manifest, and only then does that file become
//! the model's partial. dfdaemon's inode is never published (see [`crate::store::take`]). Whatever goes wrong with a file (no dfdaemon, an error, silence, a slow
//! transfer, a mismatch) leaves it missing, with the reason logged, and the range engine that
//! runs next fetches it directly.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::PrefetchError;
use super::journal::{JournalLine, hex};
use super::pieces::{Engine, Finished};
use super::plan::Plan;
use super::signed::SignedModelError;
use crate::config::{DragonflyOptions, human_bytes};
use crate::dragonfly::{Dfdaemon, DragonflyError, Event, Origin, TaskRequest};
use crate::store::take::{ForeignDir, Method};
use crate::store::{Layout, ModelName};
use crate::verify::hash::{PieceDigest, combine, hash_file_pieces, hash_piece_at, piece_count};
use crate::verify::manifest::ManifestEntry;

/// How long the SAS handed to dfdaemon for one file stays valid.
const URL_VALIDITY: Duration = Duration::from_secs(6 * 3600);

/// How long dfdaemon may take for one file, end to end.
const TASK_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Why one file is fetched directly after all.
#[derive(Debug, thiserror::Error)]
enum Fallback {
    #[error(transparent)]
    Dragonfly(#[from] DragonflyError),
    #[error("dfdaemon reports {reported} bytes where the manifest says {expected}")]
    Length { reported: u64, expected: u64 },
    #[error("dfdaemon reported a piece outside the file: bytes {offset}..{end} of {size}")]
    PieceOutside { offset: u64, end: u64, size: u64 },
    #[error("dfdaemon ended the download with {got} of {size} bytes written")]
    Incomplete { got: u64, size: u64 },
    #[error(
        "the transfer is too slow: {rate}/s after {seconds} s, under fetch.dragonfly.min_rate ({floor}/s)"
    )]
    Slow {
        rate: String,
        seconds: u64,
        floor: String,
    },
    #[error("cannot read what dfdaemon wrote at {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("refused what dfdaemon left: {0}")]
    Take(#[from] crate::store::take::TakeError),
    #[error("{hash} {actual} does not match the {against}'s {expected}: discarded")]
    Mismatch {
        /// `BLAKE3` or `SHA-256`.
        hash: &'static str,
        /// `manifest` or `signature`.
        against: &'static str,
        expected: String,
        actual: String,
        task_id: String,
    },
    /// Verified bytes that could not be moved into staging (another mount, a full disk).
    #[error("{0}")]
    Adopt(String),
    #[error("the prefetch was cancelled")]
    Cancelled,
}

/// Asks dfdaemon for every file the engine still misses entirely, verifying each; files it
/// could not deliver stay missing for the direct path. Fails only on a cancel, a missing
/// manifest or a local file error.
pub(super) async fn fetch_through_dragonfly(
    engine: &Arc<Engine>,
    plan: &Plan,
    layout: &Layout,
    name: &ModelName,
    options: &DragonflyOptions,
) -> Result<(), PrefetchError> {
    // A signature's own digests when they are not the BLAKE3 the manifest holds: a file is
    // adopted only when it is what the publisher signed (the manifest is still compared at
    // the end, for every file).
    let signed_digests = plan
        .signature
        .as_ref()
        .filter(|s| !s.stands_in_for_manifest());
    let expected: HashMap<&str, Expected> = match (&plan.manifest, signed_digests) {
        (Some((manifest, _)), None) => manifest
            .entries()
            .map(|e| (e.path.as_str(), Expected::Blake3(e.clone())))
            .collect(),
        (_, Some(signed)) => {
            let by_path = super::signed::resources_by_path(&signed.signed.resources);
            plan.files
                .iter()
                .filter_map(|f| {
                    let list = by_path.get(f.path.as_str())?;
                    let digests = list
                        .iter()
                        .map(|r| super::sequential::Expected {
                            range: r.range.clone().unwrap_or(0..f.size),
                            digest: r.digest,
                            is_shard: r.range.is_some(),
                        })
                        .collect();
                    Some((
                        f.path.as_str(),
                        Expected::Signed {
                            path: f.path.clone(),
                            size: f.size,
                            hash: signed.signed.hash,
                            digests,
                        },
                    ))
                })
                .collect()
        }
        (None, None) => {
            return Err(PrefetchError::DragonflyNeedsManifest {
                url: engine.source.describe(),
            });
        }
    };
    let chunk = engine.options.chunk_size;
    let wanted: Vec<(usize, Expected)> = engine
        .files
        .iter()
        .enumerate()
        .filter(|(_, slot)| {
            slot.sink.is_some()
                && slot.remote.size > 0
                && slot.digests().iter().all(Option::is_none)
        })
        .filter_map(|(i, slot)| {
            expected
                .get(slot.remote.path.as_str())
                .map(|e| (i, e.clone()))
        })
        .collect();
    let Some((first, _)) = wanted.first() else {
        return Ok(());
    };
    let all_direct = |reason: String| {
        warn!(model.name = %name, "{name}: {reason}; fetching all {} files directly", wanted.len());
        for _ in &wanted {
            engine.progress.dragonfly_fallback();
        }
    };
    let client = match Dfdaemon::connect(&options.socket, Duration::from_secs(5)).await {
        Ok(c) => c,
        Err(e) => {
            all_direct(format!("Dragonfly is not available: {e}"));
            return Ok(());
        }
    };
    if let Some(slot) = engine.files.get(*first) {
        match engine
            .source
            .shareable_url(&slot.remote, URL_VALIDITY)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => {
                all_direct(format!(
                    "dfdaemon cannot read {} on its own (Dragonfly needs an Azure Blob source)",
                    engine.source.describe()
                ));
                return Ok(());
            }
            Err(e) => {
                all_direct(format!(
                    "no URL for dfdaemon could be signed: {}",
                    super::error_chain(&e)
                ));
                return Ok(());
            }
        }
    }

    // Where dfdaemon writes: a directory it can write (its own storage's `modelcache/`, or
    // one in the model's staging), so it is reached without following a link and used only
    // through its descriptor.
    let opened = match &options.exchange {
        Some(x) => match x.local_dir.strip_prefix(layout.root()) {
            Ok(relative) => ForeignDir::open(layout.root(), relative)
                .map(|d| (d, x.dfdaemon_dir.clone()))
                .map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "the exchange directory {} is not on the cache filesystem under {}",
                x.local_dir.display(),
                layout.root().display()
            )),
        },
        None => {
            let staging = layout.staging_dir(name);
            std::fs::create_dir_all(&staging)
                .map_err(|e| PrefetchError::local("create", staging.clone(), e))?;
            ForeignDir::open(&staging, Path::new("dragonfly"))
                .map(|d| (d, staging.join("dragonfly")))
                .map_err(|e| e.to_string())
        }
    };
    let (theirs, dfdaemon_dir) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            all_direct(format!("dfdaemon's output directory cannot be used: {e}"));
            return Ok(());
        }
    };
    let theirs = Arc::new(theirs);
    info!(
        model.name = %name,
        files = wanted.len(),
        socket = %options.socket.display(),
        "{name}: asking dfdaemon at {} for {} files",
        options.socket.display(),
        wanted.len()
    );

    // Progress for `wait --cache-root` readers while files come through dfdaemon, as during
    // the range engine's downloads.
    let progress_file = layout.progress_path(name);
    let ticker = {
        let (progress, path) = (Arc::clone(&engine.progress), progress_file.clone());
        super::download::Periodic::start(Duration::from_secs(2), move || {
            super::download::write_progress(&path, &progress);
            std::future::ready(())
        })
    };
    let results: Vec<Result<(), PrefetchError>> = futures::stream::iter(wanted.iter().cloned())
        .map(|(index, entry)| {
            let (engine, client) = (Arc::clone(engine), client.clone());
            // Named after the model too: one exchange directory serves every model.
            let theirs_name = format!("{name}.{index}.part");
            let output = dfdaemon_dir.join(&theirs_name);
            let theirs = Arc::clone(&theirs);
            async move {
                let Some(slot) = engine.files.get(index) else {
                    return Err(PrefetchError::Internal("dragonfly: unknown file".into()));
                };
                let partial = layout.partial_path(name, &slot.remote.path);
                let ours = partial.with_file_name(format!(
                    ".{}.dragonfly",
                    partial
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ));
                if let Some(parent) = partial.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| PrefetchError::local("create", parent.to_path_buf(), e))?;
                }
                let paths = Paths {
                    theirs: Arc::clone(&theirs),
                    theirs_name: theirs_name.clone(),
                    output,
                    ours: ours.clone(),
                };
                let outcome =
                    fetch_one(&engine, &client, index, &entry, &paths, chunk, options).await;
                let adopted = match outcome {
                    Ok((digests, took, taken)) => adopt(&engine, index, digests, &partial, &ours, chunk)
                        .await
                        .map(|()| (took, taken))
                        .map_err(|e| Fallback::Adopt(super::error_chain(&e))),
                    Err(reason) => Err(reason),
                };
                if adopted.is_ok() {
                    if let (Some(sequential), Expected::Signed { .. }) =
                        (&engine.sequential, &entry)
                    {
                        // Its signed digests were just checked on the same bytes.
                        sequential.verified(index);
                    }
                }
                let result = match adopted {
                    Ok((took, taken)) => {
                        engine.progress.dragonfly_file();
                        info!(
                            model.name = %name,
                            blob.path = %entry.path(),
                            cloned_bytes = taken.cloned,
                            copied_bytes = taken.copied,
                            "{name}: {} came through dfdaemon, {} into modelcache's own file, and matches the {} ({} in {:.1} s)",
                            entry.path(), taken.describe(), entry.against(), human_bytes(entry.size()), took.as_secs_f64()
                        );
                        Ok(())
                    }
                    Err(Fallback::Cancelled) => Err(PrefetchError::Cancelled),
                    Err(reason) => {
                        if let Fallback::Mismatch { task_id, .. } = &reason {
                            engine.progress.dragonfly_rejected();
                            // This node's daemon holds bytes that are not the model: drop them,
                            // so it does not serve them on to other nodes.
                            if let Err(e) = client.delete_local_task(task_id).await {
                                warn!(model.name = %name, "{name}: could not make dfdaemon drop task {task_id}: {e}");
                            }
                        }
                        engine.progress.dragonfly_fallback();
                        warn!(
                            model.name = %name,
                            blob.path = %entry.path(),
                            "{name}: {}: {}; fetching it directly",
                            entry.path(),
                            reason
                        );
                        Ok(())
                    }
                };
                // Neither is left behind (adopted, ours was renamed): dfdaemon keeps the task
                // in its own storage, and an unverified clone must not outlive this pass.
                theirs.remove(&theirs_name);
                let _ = std::fs::remove_file(&ours);
                result
            }
        })
        .buffer_unordered(options.concurrent_files.max(1))
        .collect()
        .await;
    ticker.stop().await;
    super::download::write_progress(&progress_file, &engine.progress);
    results.into_iter().collect()
}

/// What a file from dfdaemon must be: the manifest's BLAKE3, or the digests a signature lists
/// for it (SHA-256, or BLAKE3 of shards), computed over the clone before it is adopted.
#[derive(Debug, Clone)]
enum Expected {
    Blake3(ManifestEntry),
    Signed {
        path: String,
        size: u64,
        hash: crate::verify::signature::HashType,
        digests: Vec<super::sequential::Expected>,
    },
}

impl Expected {
    fn path(&self) -> &str {
        match self {
            Self::Blake3(e) => &e.path,
            Self::Signed { path, .. } => path,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Self::Blake3(e) => e.size,
            Self::Signed { size, .. } => *size,
        }
    }

    fn against(&self) -> &'static str {
        match self {
            Self::Blake3(_) => "manifest",
            Self::Signed { .. } => "signature",
        }
    }

    /// The task's identity in Dragonfly: the same content gets the same id on every node.
    fn content_id(&self) -> String {
        match self {
            Self::Blake3(e) => format!("modelcache-blake3:{}", e.blake3),
            Self::Signed { hash, digests, .. } => {
                let mut all = blake3::Hasher::new();
                for d in digests {
                    all.update(&d.range.start.to_le_bytes());
                    all.update(&d.digest);
                }
                format!(
                    "modelcache-{}-signed:{}",
                    super::signed::hash_name(*hash),
                    all.finalize().to_hex()
                )
            }
        }
    }
}

/// Where one file goes on its way in: dfdaemon's output (a name in a directory dfdaemon can
/// write) and modelcache's own file (in staging, only modelcache writes there).
struct Paths {
    /// The directory dfdaemon writes into, as modelcache reaches it.
    theirs: Arc<ForeignDir>,
    /// The file's name there.
    theirs_name: String,
    /// The same file as dfdaemon sees it (its `output_path`).
    output: PathBuf,
    /// modelcache's own file, the clone that is hashed and becomes the partial.
    ours: PathBuf,
}

/// Downloads one file through dfdaemon and takes it into modelcache's own file piece by piece,
/// hashing the clone; that file and the digests of its pieces when its BLAKE3 matches the
/// manifest.
async fn fetch_one(
    engine: &Arc<Engine>,
    client: &Dfdaemon,
    index: usize,
    entry: &Expected,
    paths: &Paths,
    chunk: u64,
    options: &DragonflyOptions,
) -> Result<(Vec<PieceDigest>, Duration, Taken), Fallback> {
    let began = Instant::now();
    let slot = engine.files.get(index).ok_or(Fallback::Cancelled)?;
    let size = slot.remote.size;
    if entry.size() != size {
        return Err(Fallback::Length {
            reported: size,
            expected: entry.size(),
        });
    }
    let url = engine
        .source
        .shareable_url(&slot.remote, URL_VALIDITY)
        .await
        .ok()
        .flatten()
        .ok_or(DragonflyError::Protocol("no URL for this file".into()))?;
    paths.theirs.remove(&paths.theirs_name);
    let ours = {
        let (path, size) = (paths.ours.clone(), size);
        tokio::task::spawn_blocking(move || crate::store::take::create_own(&path, size))
            .await
            .map_err(|e| Fallback::Adopt(e.to_string()))??
    };
    let ours = Arc::new(ours);
    let task = TaskRequest {
        url,
        content_id: entry.content_id(),
        output_path: paths.output.clone(),
        timeout: TASK_TIMEOUT,
    };
    let mut stream = client.download(&task).await?;

    let pieces = usize::try_from(piece_count(size, chunk)).unwrap_or(0);
    let chunk_len = |c: usize| {
        let start = c as u64 * chunk;
        (start + chunk).min(size) - start
    };
    let mut covered = vec![0u64; pieces];
    let mut digests: Vec<Option<PieceDigest>> = vec![None; pieces];
    let mut taken = Taken::default();
    let mut hashing: JoinSet<(usize, Option<(PieceDigest, Method)>)> = JoinSet::new();
    let mut seen: HashSet<u32> = HashSet::new();
    let (mut peer, mut back_to_source) = (0u64, 0u64);
    let result: Result<(), Fallback> = async {
        loop {
            let event = tokio::select! {
                () = engine.cancel.cancelled() => return Err(Fallback::Cancelled),
                event = stream.next(options.stall_timeout) => event?,
            };
            match event {
                None => return Ok(()),
                Some(Event::Started { content_length, .. }) if content_length != size => {
                    return Err(Fallback::Length {
                        reported: content_length,
                        expected: size,
                    });
                }
                Some(Event::Started { .. }) => {}
                Some(Event::Piece {
                    number,
                    offset,
                    length,
                    origin,
                }) => {
                    let end = offset.saturating_add(length);
                    if length == 0 || end > size {
                        return Err(Fallback::PieceOutside { offset, end, size });
                    }
                    if !seen.insert(number) {
                        continue;
                    }
                    engine
                        .progress
                        .add_via_dragonfly(length, origin == Origin::Peer);
                    match origin {
                        Origin::Peer => peer += length,
                        Origin::BackToSource => back_to_source += length,
                    }
                    let first = usize::try_from(offset / chunk).unwrap_or(usize::MAX);
                    let last = usize::try_from((end - 1) / chunk).unwrap_or(usize::MAX);
                    let last = last.min(pieces.saturating_sub(1));
                    for (c, got) in covered.iter_mut().enumerate().take(last + 1).skip(first) {
                        let c_start = c as u64 * chunk;
                        let c_end = c_start + chunk_len(c);
                        *got += end.min(c_end) - offset.max(c_start);
                        // Overlapping reports (a confused or hostile daemon) overshoot and are
                        // left to the pass at the end; the file's BLAKE3 decides either way.
                        if *got == chunk_len(c) && options.hash_pieces {
                            let (dir, name, ours) = (
                                Arc::clone(&paths.theirs),
                                paths.theirs_name.clone(),
                                Arc::clone(&ours),
                            );
                            hashing.spawn_blocking(move || {
                                (c, take_piece(&dir, &name, &ours, c_start, c_end, size).ok())
                            });
                        }
                    }
                    if began.elapsed() > options.grace {
                        let rate = per_second(peer + back_to_source, began.elapsed());
                        if rate < options.min_rate {
                            return Err(Fallback::Slow {
                                rate: human_bytes(rate),
                                seconds: began.elapsed().as_secs(),
                                floor: human_bytes(options.min_rate),
                            });
                        }
                    }
                }
            }
        }
    }
    .await;
    while let Some(done) = hashing.join_next().await {
        if let Ok((c, Some((d, method)))) = done {
            if let Some(slot) = digests.get_mut(c) {
                *slot = Some(d);
                taken.count(method, chunk_len(c));
            }
        }
    }
    result?;
    let got: u64 = covered.iter().sum();
    if got != size {
        return Err(Fallback::Incomplete { got, size });
    }
    // Pieces not taken as they landed (hashing after the download, or a file dfdaemon only
    // links into place at the end): taken now, then hashed in one read of the clone.
    let missing: Vec<u64> = (0..pieces)
        .filter(|c| digests[*c].is_none())
        .map(|c| c as u64)
        .collect();
    if !missing.is_empty() {
        let (dir, name, ours_file, ours_path) = (
            Arc::clone(&paths.theirs),
            paths.theirs_name.clone(),
            Arc::clone(&ours),
            paths.ours.clone(),
        );
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        let (hashed, late) = tokio::task::spawn_blocking(move || -> Result<_, Fallback> {
            let theirs = dir.open_regular(&name)?;
            crate::store::take::holds(&theirs, &dir.path().join(&name), size)?;
            let mut late = Taken::default();
            for &c in &missing {
                let start = c * chunk;
                let len = chunk.min(size - start);
                let method = crate::store::take::clone_range(&theirs, &ours_file, start, len)
                    .map_err(|source| Fallback::Read {
                        path: dir.path().join(&name),
                        source,
                    })?;
                late.count(method, len);
            }
            drop(theirs);
            let hashed =
                hash_file_pieces(&ours_path, &missing, chunk, size, threads).map_err(|source| {
                    Fallback::Read {
                        path: ours_path.clone(),
                        source,
                    }
                })?;
            Ok((hashed, late))
        })
        .await
        .map_err(|e| Fallback::Adopt(e.to_string()))??;
        taken.add(late);
        for (c, d) in hashed {
            if let Some(slot) = usize::try_from(c).ok().and_then(|c| digests.get_mut(c)) {
                *slot = Some(d);
            }
        }
    }
    let digests: Vec<PieceDigest> = digests.into_iter().flatten().collect();
    match entry {
        Expected::Blake3(e) => {
            let actual = combine(&digests).to_hex().to_string();
            if actual != e.blake3 {
                return Err(Fallback::Mismatch {
                    hash: "BLAKE3",
                    against: "manifest",
                    expected: e.blake3.clone(),
                    actual,
                    task_id: stream.task_id().to_string(),
                });
            }
        }
        Expected::Signed {
            path,
            size,
            hash,
            digests: signed,
        } => {
            let check = Arc::new(super::sequential::Sequential::new(
                *hash,
                vec![super::sequential::FileToCheck {
                    path: path.clone(),
                    partial: paths.ours.clone(),
                    size: *size,
                    expected: signed.clone(),
                }],
            ));
            match check.finish().await {
                Ok(()) => {}
                Err(PrefetchError::Signature(SignedModelError::DigestMismatch {
                    hash,
                    expected,
                    actual,
                    ..
                })) => {
                    return Err(Fallback::Mismatch {
                        hash,
                        against: "signature",
                        expected,
                        actual,
                        task_id: stream.task_id().to_string(),
                    });
                }
                Err(e) => return Err(Fallback::Adopt(super::error_chain(&e))),
            }
        }
    }
    Ok((digests, began.elapsed(), taken))
}

/// Bytes taken from dfdaemon's files by reflink and by copy.
#[derive(Debug, Default, Clone, Copy)]
struct Taken {
    cloned: u64,
    copied: u64,
}

impl Taken {
    fn count(&mut self, method: Method, bytes: u64) {
        match method {
            Method::Cloned => self.cloned += bytes,
            Method::Copied => self.copied += bytes,
        }
    }

    fn add(&mut self, other: Taken) {
        self.cloned += other.cloned;
        self.copied += other.copied;
    }

    fn describe(self) -> &'static str {
        match (self.cloned > 0, self.copied > 0) {
            (true, false) => "cloned",
            (false, _) => "copied",
            (true, true) => "cloned and copied",
        }
    }
}

/// Takes piece `start..end` of dfdaemon's file into modelcache's own and hashes it there.
fn take_piece(
    dir: &ForeignDir,
    name: &str,
    ours: &std::fs::File,
    start: u64,
    end: u64,
    size: u64,
) -> Result<(PieceDigest, Method), Fallback> {
    let path = || dir.path().join(name);
    let theirs = dir.open_regular(name)?;
    crate::store::take::holds(&theirs, &path(), end)?;
    let method =
        crate::store::take::clone_range(&theirs, ours, start, end - start).map_err(|source| {
            Fallback::Read {
                path: path(),
                source,
            }
        })?;
    drop(theirs);
    let mut buf = vec![0u8; (1 << 20).min(usize::try_from(end - start).unwrap_or(1 << 20))];
    let digest =
        hash_piece_at(ours, start, end, size, &mut buf).map_err(|source| Fallback::Read {
            path: path(),
            source,
        })?;
    Ok((digest, method))
}

/// Bytes per second over `took`.
fn per_second(bytes: u64, took: Duration) -> u64 {
    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1);
    bytes.saturating_mul(1000) / ms
}

/// Makes the verified clone the model's partial: durable, renamed into place (both in the
/// model's staging, which only modelcache writes), and its pieces marked done for the
/// journal's next checkpoint.
async fn adopt(
    engine: &Arc<Engine>,
    index: usize,
    digests: Vec<PieceDigest>,
    partial: &Path,
    ours: &Path,
    chunk: u64,
) -> Result<(), PrefetchError> {
    let slot = engine
        .files
        .get(index)
        .ok_or_else(|| PrefetchError::Internal("dragonfly: unknown file".into()))?;
    let (partial, ours) = (partial.to_path_buf(), ours.to_path_buf());
    let file = tokio::task::spawn_blocking(move || -> Result<std::fs::File, PrefetchError> {
        let file = std::fs::File::open(&ours)
            .map_err(|e| PrefetchError::local("open", ours.clone(), e))?;
        file.sync_all()
            .map_err(|e| PrefetchError::local("fsync", ours.clone(), e))?;
        std::fs::rename(&ours, &partial)
            .map_err(|e| PrefetchError::local("move into place", partial.clone(), e))?;
        if let Some(parent) = partial.parent() {
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
        }
        Ok(file)
    })
    .await
    .map_err(|e| PrefetchError::Internal(e.to_string()))??;
    let file = Arc::new(file);
    let mut lines = Vec::with_capacity(digests.len());
    {
        let mut slots = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (d, s)) in digests.iter().zip(slots.iter_mut()).enumerate() {
            *s = Some(*d);
            lines.push(Finished {
                line: JournalLine {
                    path: slot.remote.path.clone(),
                    size: slot.remote.size,
                    etag: slot.remote.etag.clone(),
                    chunk,
                    index: i as u64,
                    digest: hex(d),
                    checked: false,
                },
                file: Arc::clone(&file),
            });
        }
    }
    engine
        .pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(lines);
    Ok(())
}
