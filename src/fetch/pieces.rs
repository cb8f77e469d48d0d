//! The parallel range engine: every range of every file, under one concurrency limit, each
//! retried on its own, hashed as it arrives and (when the file has a sink) written with
//! positional writes into its preallocated partial file.
//!
//! Memory is bounded by `concurrency × WRITE_BUFFER` plus the HTTP client's own buffers,
//! whatever the size of the files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::PrefetchError;
use super::journal::{JournalLine, hex};
use super::progress::Progress;
use crate::config::FetchOptions;
use crate::source::{RemoteFile, RetryCause, Source, SourceError};
use crate::verify::hash::{PieceDigest, PieceHasher, piece_count};

/// Bytes gathered from the network before one hash-and-write call.
const WRITE_BUFFER: usize = 1 << 20;

/// Where a file's bytes go: a partial file, created and preallocated on first use.
#[derive(Debug)]
pub(crate) struct Sink {
    path: PathBuf,
    handle: OnceCell<Arc<File>>,
}

impl Sink {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            handle: OnceCell::new(),
        }
    }

    async fn open(&self, size: u64) -> Result<Arc<File>, PrefetchError> {
        self.handle
            .get_or_try_init(|| async {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || open_partial(&path, size))
                    .await
                    .map_err(|e| PrefetchError::Internal(e.to_string()))?
                    .map(Arc::new)
            })
            .await
            .cloned()
    }
}

/// Opens (or creates) a partial file and makes sure it has its full size allocated. An existing
/// partial of the right size keeps its bytes: its finished ranges are in the journal.
fn open_partial(path: &std::path::Path, size: u64) -> Result<File, PrefetchError> {
    let io = |action: &'static str| {
        let path = path.to_path_buf();
        move |source: std::io::Error| PrefetchError::local(action, path, source)
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create"))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io("create"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    if len != size {
        file.set_len(0).map_err(io("truncate"))?;
        preallocate(&file, size).map_err(io("preallocate"))?;
    }
    Ok(file)
}

/// Reserves the file's blocks so a full disk fails here, before any byte is fetched for it,
/// rather than in the middle of a write. Falls back to a sparse file where the filesystem has no
/// `fallocate`.
fn preallocate(file: &File, size: u64) -> std::io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    let len = i64::try_from(size).map_err(std::io::Error::other)?;
    match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(size),
        Err(e) => Err(std::io::Error::from(e)),
    }
}

/// One file in the engine.
#[derive(Debug)]
pub(crate) struct FileSlot {
    pub(crate) remote: RemoteFile,
    pub(crate) sink: Option<Sink>,
    /// Digest of each range once finished (from the journal or this run).
    pub(crate) digests: Mutex<Vec<Option<PieceDigest>>>,
}

impl FileSlot {
    pub(crate) fn new(remote: RemoteFile, sink: Option<Sink>, chunk: u64) -> Self {
        let n = usize::try_from(piece_count(remote.size, chunk)).unwrap_or(0);
        Self {
            remote,
            sink,
            digests: Mutex::new(vec![None; n]),
        }
    }

    pub(crate) fn digests(&self) -> Vec<Option<PieceDigest>> {
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn missing(&self) -> Vec<u64> {
        self.digests()
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_none())
            .map(|(i, _)| i as u64)
            .collect()
    }
}

/// A finished range waiting for the next checkpoint to make it durable in the journal.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) line: JournalLine,
    pub(crate) file: Arc<File>,
}

/// Shared state of one run of the engine.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) source: Arc<dyn Source>,
    pub(crate) options: FetchOptions,
    pub(crate) progress: Arc<Progress>,
    pub(crate) files: Vec<FileSlot>,
    pub(crate) pending: Mutex<Vec<Finished>>,
    /// Cancelled by the caller (shutdown): stop launching ranges and abandon those in flight.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Every write to a partial file runs on a blocking thread that aborting its range does not
    /// stop; [`Engine::run`] waits for all of them before it returns, so no write of an abandoned
    /// range can land after the next run (a retry after a changed blob, a resume) wrote and
    /// hashed the same bytes.
    pub(crate) writes: tokio_util::task::TaskTracker,
    /// Read ranges with [`Source::read_range_checked`] (each checked in transit).
    pub(crate) check_transfers: bool,
}

impl Engine {
    /// Runs the given (file, range) jobs with the concurrency limit; the first hard failure
    /// cancels the rest (their partial bytes stay, unjournaled) and is returned.
    pub(crate) async fn run(
        self: &Arc<Self>,
        jobs: Vec<(usize, u64)>,
    ) -> Result<(), PrefetchError> {
        let result = self.run_ranges(jobs).await;
        self.writes.close();
        self.writes.wait().await;
        self.writes.reopen();
        result
    }

    async fn run_ranges(self: &Arc<Self>, jobs: Vec<(usize, u64)>) -> Result<(), PrefetchError> {
        let mut queue = jobs.into_iter();
        let mut set = JoinSet::new();
        loop {
            while set.len() < self.options.concurrency {
                let Some((file, index)) = queue.next() else {
                    break;
                };
                let engine = Arc::clone(self);
                set.spawn(async move { engine.fetch_range(file, index).await });
            }
            let next = tokio::select! {
                biased;
                () = self.cancel.cancelled() => {
                    // In-flight ranges are dropped unjournaled; finished ones are checkpointed
                    // by the caller, so the journal stays consistent.
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    return Err(PrefetchError::Cancelled);
                }
                next = set.join_next() => next,
            };
            match next {
                None => return Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    return Err(e);
                }
                Some(Err(join)) => {
                    set.abort_all();
                    while set.join_next().await.is_some() {}
                    return Err(PrefetchError::Internal(format!(
                        "a range task failed: {join}"
                    )));
                }
            }
        }
    }

    /// Every (file, range) not finished yet, interleaved across files (see [`interleave`]).
    pub(crate) fn missing_ranges(&self) -> Vec<(usize, u64)> {
        interleave(self.files.iter().map(FileSlot::missing).collect())
    }

    /// Takes the ranges finished since the last call.
    pub(crate) fn take_finished(&self) -> Vec<Finished> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn fetch_range(&self, file_index: usize, index: u64) -> Result<(), PrefetchError> {
        let slot = self
            .files
            .get(file_index)
            .ok_or_else(|| PrefetchError::Internal("range of an unknown file".into()))?;
        let chunk = self.options.chunk_size;
        let size = slot.remote.size;
        let start = index * chunk;
        let end = (start + chunk).min(size);
        let handle = match &slot.sink {
            Some(sink) => Some(sink.open(size).await?),
            None => None,
        };
        let mut writer = RangeWriter {
            handle: handle.clone(),
            hasher: self
                .options
                .hash
                .then(|| PieceHasher::new(start, size <= chunk)),
            buf: Vec::with_capacity(WRITE_BUFFER.min(usize::try_from(end - start).unwrap_or(0))),
            pos: start,
            sink_path: slot.sink.as_ref().map(|s| s.path.clone()),
            writes: self.writes.clone(),
        };
        let began = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let err = match self.stream_into(&slot.remote, end, &mut writer).await {
                Ok(()) => break,
                Err(RangeFailure::Local(e)) => return Err(e),
                Err(RangeFailure::Source(e)) => e,
            };
            if let SourceError::Changed { path } = err {
                return Err(PrefetchError::SourceChanged { path });
            }
            match err.retry_cause() {
                Some(cause) if attempts < self.options.max_attempts => {
                    self.progress.retried(cause);
                    let delay = self.options.backoff(attempts, err.retry_after());
                    warn!(
                        blob.path = %slot.remote.path,
                        range.start = writer.pos,
                        range.end = end,
                        attempt = attempts,
                        retry.cause = cause.as_str(),
                        delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "retrying {} bytes {}..{} after: {}",
                        slot.remote.path,
                        writer.pos,
                        end,
                        error_chain(&err)
                    );
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    return Err(PrefetchError::RangeFailed {
                        path: slot.remote.path.clone(),
                        start,
                        end,
                        attempts,
                        elapsed: began.elapsed(),
                        source: err,
                    });
                }
            }
        }
        let digest = writer.hasher.as_ref().map(PieceHasher::finish);
        {
            let mut digests = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = usize::try_from(index).ok().and_then(|i| digests.get_mut(i)) {
                // With hashing off a finished range still needs a mark; zeros stand for it.
                *d = Some(digest.unwrap_or([0; 32]));
            }
        }
        if let Some(file) = handle {
            let line = JournalLine {
                checked: self.check_transfers && self.source.transfers_checked(),
                path: slot.remote.path.clone(),
                size,
                etag: slot.remote.etag.clone(),
                chunk,
                index,
                digest: digest.as_ref().map(hex).unwrap_or_default(),
            };
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Finished { line, file });
        }
        debug!(blob.path = %slot.remote.path, range.start = start, range.end = end, "range done");
        Ok(())
    }

    /// Streams `writer.pos..end` of the file into the writer, which keeps every byte received
    /// even when the stream then fails, so a retry resumes where this one stopped.
    async fn stream_into(
        &self,
        file: &RemoteFile,
        end: u64,
        writer: &mut RangeWriter,
    ) -> Result<(), RangeFailure> {
        if writer.pos >= end {
            return Ok(());
        }
        // The stall timeout covers the wait for the response headers too: a connection that is
        // accepted but never answers is retried, not waited on forever.
        let range = writer.pos..end;
        let read = async {
            if self.check_transfers {
                self.source.read_range_checked(file, range).await
            } else {
                self.source.read_range(file, range).await
            }
        };
        let answer = tokio::time::timeout(self.options.stall_timeout, read).await;
        let stalled = |waiting_for: &str| {
            RangeFailure::Source(SourceError::transient(
                &file.path,
                RetryCause::Stalled,
                format!(
                    "no {waiting_for} within {}s",
                    self.options.stall_timeout.as_secs_f32()
                ),
            ))
        };
        let mut stream = match answer {
            Ok(result) => result.map_err(RangeFailure::Source)?,
            Err(_) => return Err(stalled("response headers")),
        };
        loop {
            let next = tokio::time::timeout(self.options.stall_timeout, stream.next()).await;
            let bytes = match next {
                Err(_) => {
                    writer.flush().await?;
                    return Err(stalled("byte of the body"));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    writer.flush().await?;
                    return Err(RangeFailure::Source(e));
                }
                Ok(Some(Ok(bytes))) => bytes,
            };
            if writer.pos + writer.buf.len() as u64 + bytes.len() as u64 > end {
                return Err(RangeFailure::Source(SourceError::UnexpectedRange {
                    path: file.path.clone(),
                    want: writer.pos..end,
                    got: writer.pos..writer.pos + writer.buf.len() as u64 + bytes.len() as u64,
                }));
            }
            self.progress.add_fetched(bytes.len() as u64);
            if writer.buf.is_empty() && bytes.len() >= WRITE_BUFFER {
                // A large read (the directory source's) is hashed and written as it is.
                writer.write(bytes).await?;
                continue;
            }
            writer.buf.extend_from_slice(&bytes);
            if writer.buf.len() >= WRITE_BUFFER {
                writer.flush().await?;
            }
        }
        writer.flush().await?;
        if writer.pos < end {
            return Err(RangeFailure::Source(SourceError::transient(
                &file.path,
                RetryCause::ShortBody,
                format!("the body ended at byte {} of {}", writer.pos, end),
            )));
        }
        Ok(())
    }
}

/// Orders ranges round-robin across files (the first missing range of every file, then the
/// second, …), so the connections in flight spread over many blobs instead of queueing on one:
/// Blob Storage limits requests per blob (500/s), and a slow or throttled blob then holds back
/// a few ranges, not all of them.
fn interleave(per_file: Vec<Vec<u64>>) -> Vec<(usize, u64)> {
    let total = per_file.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(total);
    let mut iters: Vec<_> = per_file.into_iter().map(Vec::into_iter).collect();
    while out.len() < total {
        for (file, ranges) in iters.iter_mut().enumerate() {
            if let Some(range) = ranges.next() {
                out.push((file, range));
            }
        }
    }
    out
}

/// Renders an error and its causes on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

enum RangeFailure {
    /// The source failed: maybe worth a retry.
    Source(SourceError),
    /// Our own disk failed: never retried.
    Local(PrefetchError),
}

impl From<PrefetchError> for RangeFailure {
    fn from(e: PrefetchError) -> Self {
        RangeFailure::Local(e)
    }
}

/// Gathers a range's bytes, then hashes and writes them off the async threads.
///
/// The copy into one reused buffer is deliberate: holding the HTTP client's own buffers until
/// the write (hash in place, one `pwritev`) was measured slower, with more CPU per GB and about
/// 40% more peak memory, because the client can then not reuse its warm read buffers and
/// allocates fresh ones (see BENCHMARKS.md).
struct RangeWriter {
    handle: Option<Arc<File>>,
    hasher: Option<PieceHasher>,
    buf: Vec<u8>,
    pos: u64,
    sink_path: Option<PathBuf>,
    writes: tokio_util::task::TaskTracker,
}

impl RangeWriter {
    async fn flush(&mut self) -> Result<(), PrefetchError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let mut buf = self.write(buf).await?;
        buf.clear();
        self.buf = buf;
        Ok(())
    }

    /// Hashes and writes `data` at the current position off the async threads, returning the
    /// buffer for reuse.
    async fn write<B: AsRef<[u8]> + Send + 'static>(
        &mut self,
        data: B,
    ) -> Result<B, PrefetchError> {
        let mut hasher = self.hasher.take();
        let handle = self.handle.clone();
        let pos = self.pos;
        let (data, hasher, written) = self
            .writes
            .spawn_blocking(move || {
                let bytes = data.as_ref();
                if let Some(h) = hasher.as_mut() {
                    h.update(bytes);
                }
                let written = match &handle {
                    Some(f) => f.write_all_at(bytes, pos),
                    None => Ok(()),
                };
                (data, hasher, written)
            })
            .await
            .map_err(|e| PrefetchError::Internal(e.to_string()))?;
        if let Err(e) = written {
            let path = self.sink_path.clone().unwrap_or_default();
            return Err(PrefetchError::local("write", path, e));
        }
        self.pos += data.as_ref().len() as u64;
        self.hasher = hasher;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_alternate_between_files_and_none_is_lost() {
        let order = interleave(vec![vec![0, 1, 2], vec![], vec![5], vec![0, 3]]);
        assert_eq!(order, [(0, 0), (2, 5), (3, 0), (0, 1), (3, 3), (0, 2)]);
        assert!(interleave(vec![vec![], vec![]]).is_empty());
    }
}
