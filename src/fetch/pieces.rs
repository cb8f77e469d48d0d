//! The parallel range engine: every range of every file, under one concurrency limit, each
//! retried on its own, hashed as it arrives and (when the file has a sink) written with
//! positional writes into its preallocated partial file.
//!
//! Memory is bounded by `concurrency × WRITE_BUFFER` plus the HTTP client's own buffers,
//! whatever the size of the files.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::PrefetchError;
use super::adaptive::{self, Controller};
use super::hedge::{Tail, Ticket};
use super::journal::{JournalLine, hex};
use super::progress::Progress;
use crate::config::FetchOptions;
use crate::source::{RemoteFile, RetryCause, Source, SourceError};
use crate::verify::hash::{PieceDigest, PieceHasher, piece_count};

/// Bytes gathered from the network before one hash-and-write call.
const WRITE_BUFFER: usize = 1 << 20;

/// How often the tail of a run is looked at for ranges to hedge.
const TAIL_WATCH: std::time::Duration = std::time::Duration::from_millis(200);

/// Where a file's bytes go: a partial file, created and preallocated on first use.
#[derive(Debug)]
pub(crate) struct Sink {
    path: PathBuf,
    handle: OnceCell<Partial>,
}

/// An open partial file: the descriptor every write can use and that checkpoints sync, and, with
/// direct I/O on and a filesystem that takes it, a second one opened with `O_DIRECT` for
/// block-aligned writes that bypass the page cache.
#[derive(Debug, Clone)]
struct Partial {
    file: Arc<File>,
    direct: Option<Arc<File>>,
}

impl Sink {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            handle: OnceCell::new(),
        }
    }

    async fn open(&self, size: u64, direct_io: bool) -> Result<Partial, PrefetchError> {
        self.handle
            .get_or_try_init(|| async {
                let path = self.path.clone();
                tokio::task::spawn_blocking(move || {
                    let file = Arc::new(open_partial(&path, size)?);
                    let direct = if direct_io { open_direct(&path) } else { None };
                    Ok(Partial { file, direct })
                })
                .await
                .map_err(|e| PrefetchError::Internal(e.to_string()))?
            })
            .await
            .cloned()
    }
}

/// Alignment of direct writes: in memory, in the file and in length. 4 KiB covers devices
/// with 512-byte and 4 KiB logical blocks.
const DIRECT_ALIGN: usize = 4096;

/// A second descriptor with `O_DIRECT`, or `None` where the filesystem refuses it (the writes
/// then all go through the page cache).
fn open_direct(path: &std::path::Path) -> Option<Arc<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    // On tmpfs the page cache is the file: a direct write is the same copy, measured no faster.
    if nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    {
        return None;
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
    {
        Ok(f) => Some(Arc::new(f)),
        Err(e) => {
            debug!(path = %path.display(), "direct I/O unavailable, writing through the page cache: {e}");
            None
        }
    }
}

/// Writes `bytes` at `pos`: the block-aligned part through the `O_DIRECT` descriptor when
/// there is one and `bytes` and `pos` are aligned, the rest (a file's last partial block, or a
/// range resumed mid-block after a failed attempt) through the page cache. A direct write the
/// kernel refuses (`EINVAL`: the filesystem wants another alignment) is redone buffered.
fn write_at(partial: &Partial, bytes: &[u8], pos: u64) -> std::io::Result<()> {
    let mut done = 0usize;
    if let Some(direct) = &partial.direct {
        let aligned =
            pos % DIRECT_ALIGN as u64 == 0 && (bytes.as_ptr() as usize) % DIRECT_ALIGN == 0;
        let end = if aligned {
            bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN
        } else {
            0
        };
        while done < end {
            match direct.write_at(&bytes[done..end], pos + done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
            if done % DIRECT_ALIGN != 0 {
                break;
            }
        }
    }
    partial.file.write_all_at(&bytes[done..], pos + done as u64)
}

/// A write buffer whose bytes start at a [`DIRECT_ALIGN`]ed address, so that a full buffer can
/// go straight to the device. Moving it (into a blocking task and back) moves only the `Vec`'s
/// pointer, never the bytes, so the alignment holds.
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    cap: usize,
}

impl AlignedBuf {
    fn new(cap: usize) -> Self {
        let raw = vec![0u8; cap + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self {
            raw,
            start,
            len: 0,
            cap,
        }
    }

    /// Copies as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.cap - self.len);
        let at = self.start + self.len;
        self.raw[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == self.cap
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
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
    /// Digests of a signature computed over each file in order, told of every range written.
    pub(crate) sequential: Option<Arc<super::sequential::Sequential>>,
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
        let ceiling = self.options.concurrency;
        let adaptive = self.options.adaptive && ceiling > 1;
        let first = if adaptive {
            Controller::new(ceiling).limit()
        } else {
            ceiling
        };
        self.progress.set_concurrency(first);
        let limit = Arc::new(AtomicUsize::new(first));
        let changed = Arc::new(tokio::sync::Notify::new());
        let _adapting = adaptive.then(|| {
            AbortOnDrop(tokio::spawn(adapt(
                Arc::clone(&self.progress),
                Arc::clone(&limit),
                Arc::clone(&changed),
                ceiling,
                // Read here, before any range is launched, so no throttling answer is missed.
                self.progress.throttled(),
            )))
        });
        let mut queue = jobs.into_iter();
        let mut set = JoinSet::new();
        let mut tail = Tail::default();
        let mut watch = tokio::time::interval(TAIL_WATCH);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while set.len() < limit.load(Ordering::Relaxed) {
                let Some((file, index)) = queue.next() else {
                    break;
                };
                let engine = Arc::clone(self);
                let ticket = Arc::new(Ticket::new(Instant::now()));
                tail.launched((file, index), Arc::clone(&ticket));
                set.spawn(async move {
                    let result = engine.fetch_range(file, index, ticket).await;
                    ((file, index), result)
                });
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
                // A raised limit launches more ranges at once, not at the next completion.
                () = changed.notified() => continue,
                _ = watch.tick() => {
                    let few = (limit.load(Ordering::Relaxed) / 4).max(2);
                    tail.check(queue.len() == 0, few, Instant::now());
                    continue;
                }
            };
            match next {
                None => return Ok(()),
                Some(Ok((key, Ok(())))) => tail.finished(key, Instant::now()),
                Some(Ok((_, Err(e)))) => {
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

    async fn fetch_range(
        &self,
        file_index: usize,
        index: u64,
        ticket: Arc<Ticket>,
    ) -> Result<(), PrefetchError> {
        let slot = self
            .files
            .get(file_index)
            .ok_or_else(|| PrefetchError::Internal("range of an unknown file".into()))?;
        let chunk = self.options.chunk_size;
        let size = slot.remote.size;
        let start = index * chunk;
        let end = (start + chunk).min(size);
        let handle = match &slot.sink {
            Some(sink) => Some(sink.open(size, self.options.direct_io).await?),
            None => None,
        };
        let writer_at =
            |pos: u64, hasher: Option<PieceHasher>, ticket: Option<Arc<Ticket>>| RangeWriter {
                handle: handle.clone(),
                hasher,
                buf: AlignedBuf::new(WRITE_BUFFER.min(usize::try_from(end - pos).unwrap_or(0))),
                pos,
                sink_path: slot.sink.as_ref().map(|s| s.path.clone()),
                writes: self.writes.clone(),
                ticket,
            };
        let hasher = self
            .options
            .hash
            .then(|| PieceHasher::new(start, size <= chunk));
        ticket.flushed(start, hasher.as_ref());
        let first = self.fetch_into(
            &slot.remote,
            start..end,
            writer_at(start, hasher, Some(Arc::clone(&ticket))),
        );
        tokio::pin!(first);
        let hasher = tokio::select! {
            result = &mut first => result?,
            () = ticket.hedge.notified() => {
                // A slow range in the tail: its remainder again on a second connection, from
                // the first copy's last write and with its hash state there.
                let (pos, hasher) = ticket.resume_point();
                self.progress.hedged();
                warn!(
                    blob.path = %slot.remote.path,
                    range.start = pos,
                    range.end = end,
                    "{} bytes {pos}..{end} is slow at the end of the download: asking for it on a second connection too",
                    slot.remote.path
                );
                let second = self.fetch_into(&slot.remote, start..end, writer_at(pos, hasher, None));
                tokio::pin!(second);
                // The first copy to succeed wins; a copy that fails leaves it to the other.
                tokio::select! {
                    result = &mut first => match result {
                        Ok(h) => h,
                        Err(_) => second.await?,
                    },
                    result = &mut second => match result {
                        Ok(h) => h,
                        Err(_) => first.await?,
                    },
                }
            }
        };
        let digest = hasher.as_ref().map(PieceHasher::finish);
        {
            let mut digests = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(d) = usize::try_from(index).ok().and_then(|i| digests.get_mut(i)) {
                // With hashing off a finished range still needs a mark; zeros stand for it.
                *d = Some(digest.unwrap_or([0; 32]));
            }
        }
        if let Some(Partial { file, .. }) = handle {
            let line = JournalLine {
                checked: self.check_transfers && self.source.transfers_checked(),
                path: slot.remote.path.clone(),
                size,
                etag: slot.remote.etag.clone(),
                chunk,
                index,
                digest: digest.as_ref().map(|d| hex(d)).unwrap_or_default(),
            };
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Finished { line, file });
            if let Some(sequential) = &self.sequential {
                sequential.written(file_index, start..end);
            }
        }
        debug!(blob.path = %slot.remote.path, range.start = start, range.end = end, "range done");
        Ok(())
    }

    /// Fetches `range` from `writer.pos` to its end into the writer, retrying each failure
    /// from the first byte not yet received; returns the hash state over the whole range.
    async fn fetch_into(
        &self,
        remote: &RemoteFile,
        range: std::ops::Range<u64>,
        mut writer: RangeWriter,
    ) -> Result<Option<PieceHasher>, PrefetchError> {
        let began = Instant::now();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let err = match self.stream_into(remote, range.end, &mut writer).await {
                Ok(()) => return Ok(writer.hasher.take()),
                Err(RangeFailure::Local(e)) => return Err(e),
                Err(RangeFailure::Source(e)) => e,
            };
            let failed = FailedAttempt {
                path: &remote.path,
                range: range.clone(),
                resume_at: writer.pos,
                attempts,
                began,
            };
            let delay = failed.retry_or_give_up(&self.options, &self.progress, err)?;
            tokio::time::sleep(delay).await;
        }
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
            let held = writer.buf.len as u64;
            let received_to = writer.pos + held + bytes.len() as u64;
            if received_to > end {
                let asked_from = writer.pos;
                // The bytes held so far were inside the range: written like those before any
                // other failure, so the retry asks from past them (and never appends after them
                // what it receives from their start).
                writer.flush().await?;
                return Err(RangeFailure::Source(SourceError::UnexpectedRange {
                    path: file.path.clone(),
                    want: asked_from..end,
                    got: asked_from..received_to,
                }));
            }
            self.progress.add_fetched(bytes.len() as u64);
            if let Some(ticket) = &writer.ticket {
                ticket.received(bytes.len() as u64, Instant::now());
            }
            // Full buffers only (until the range's end), so every write but a file's last stays
            // block-aligned for direct I/O.
            let mut rest: &[u8] = &bytes;
            while !rest.is_empty() {
                let taken = writer.buf.fill(rest);
                rest = &rest[taken..];
                if writer.buf.is_full() {
                    writer.flush().await?;
                }
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

/// Aborts a background task when dropped, so no controller outlives its run.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Measures throughput window by window and sets the limit the controller chooses (see
/// [`adaptive`](super::adaptive)).
async fn adapt(
    progress: Arc<Progress>,
    limit: Arc<AtomicUsize>,
    changed: Arc<tokio::sync::Notify>,
    ceiling: usize,
    mut throttled: u64,
) {
    let mut controller = Controller::new(ceiling);
    loop {
        tokio::time::sleep(adaptive::SETTLE).await;
        let (bytes, began) = (progress.fetched(), Instant::now());
        tokio::time::sleep(adaptive::WINDOW).await;
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = progress.fetched().saturating_sub(bytes) as f64
            / began.elapsed().as_secs_f64().max(1e-3);
        // Throttling counts over the whole interval, settling time included: the rate needs the
        // new connections settled, a 503 is a 503 whenever it came.
        let now_throttled = progress.throttled();
        let was_throttled = now_throttled > throttled;
        throttled = now_throttled;
        let before = controller.limit();
        let now = controller.observe(rate, was_throttled);
        if now != before {
            debug!(
                from = before,
                to = now,
                rate_mb_s = rate / 1e6,
                "ranges in flight: {before} -> {now}"
            );
            limit.store(now, Ordering::Relaxed);
            progress.set_concurrency(now);
            changed.notify_one();
        }
    }
}

/// A range's attempt that failed, for [`FailedAttempt::retry_or_give_up`].
pub(super) struct FailedAttempt<'a> {
    /// The file.
    pub(super) path: &'a str,
    /// The whole range, named if it fails.
    pub(super) range: std::ops::Range<u64>,
    /// Where the next attempt starts (bytes before it are kept).
    pub(super) resume_at: u64,
    /// Attempts made, this one included.
    pub(super) attempts: u32,
    /// When the first attempt started.
    pub(super) began: Instant,
}

impl FailedAttempt<'_> {
    /// The delay before the next attempt (counted and logged), or the error that ends the
    /// range: a changed file (the prefetch restarts from a fresh listing), a failure not worth
    /// retrying, or the last allowed attempt.
    pub(super) fn retry_or_give_up(
        self,
        options: &FetchOptions,
        progress: &Progress,
        err: SourceError,
    ) -> Result<std::time::Duration, PrefetchError> {
        if let SourceError::Changed { path } = err {
            return Err(PrefetchError::SourceChanged { path });
        }
        match err.retry_cause() {
            Some(cause) if self.attempts < options.max_attempts => {
                progress.retried(cause);
                let delay = options.backoff(self.attempts, err.retry_after());
                warn!(
                    blob.path = %self.path,
                    range.start = self.resume_at,
                    range.end = self.range.end,
                    attempt = self.attempts,
                    retry.cause = cause.as_str(),
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "retrying {} bytes {}..{} after: {}",
                    self.path,
                    self.resume_at,
                    self.range.end,
                    error_chain(&err)
                );
                Ok(delay)
            }
            Some(_) => Err(PrefetchError::RangeFailed {
                path: self.path.to_string(),
                start: self.range.start,
                end: self.range.end,
                attempts: self.attempts,
                elapsed: self.began.elapsed(),
                source: err,
            }),
            // Not worth a retry (refused, not found): said as it is, with its own hint.
            None => Err(PrefetchError::RangeRefused {
                path: self.path.to_string(),
                start: self.range.start,
                end: self.range.end,
                source: err,
            }),
        }
    }
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
    handle: Option<Partial>,
    hasher: Option<PieceHasher>,
    buf: AlignedBuf,
    pos: u64,
    sink_path: Option<PathBuf>,
    writes: tokio_util::task::TaskTracker,
    /// Where the first copy of a range reports each write, for a hedge to start from.
    ticket: Option<Arc<Ticket>>,
}

impl RangeWriter {
    async fn flush(&mut self) -> Result<(), PrefetchError> {
        if self.buf.len == 0 {
            return Ok(());
        }
        let buf = std::mem::replace(
            &mut self.buf,
            AlignedBuf {
                raw: Vec::new(),
                start: 0,
                len: 0,
                cap: 0,
            },
        );
        let mut buf = self.write(buf).await?;
        buf.len = 0;
        self.buf = buf;
        if let Some(ticket) = &self.ticket {
            ticket.flushed(self.pos, self.hasher.as_ref());
        }
        Ok(())
    }

    /// Hashes and writes `buf` at the current position off the async threads, returning it for
    /// reuse.
    async fn write(&mut self, data: AlignedBuf) -> Result<AlignedBuf, PrefetchError> {
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
                    Some(partial) => write_at(partial, bytes, pos),
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

    /// Whole blocks go through `O_DIRECT`, the tail and unaligned positions through the page
    /// cache, and the file reads back exactly as written either way.
    #[test]
    fn direct_and_buffered_writes_together_write_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial");
        let size: u64 = 3 * (1 << 20) + 5000;
        let file = Arc::new(open_partial(&path, size).unwrap());
        let direct = open_direct(&path);
        if direct.is_none() {
            eprintln!(
                "*** O_DIRECT is not available under {}: testing the buffered path only",
                dir.path().display()
            );
        }
        let partial = Partial { file, direct };
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        // An aligned full buffer, an aligned buffer with a tail, then an unaligned position
        // (a range resumed mid-block) and the file's last partial block.
        let mut buf = AlignedBuf::new(1 << 20);
        assert_eq!(buf.fill(&data[..1 << 20]), 1 << 20);
        assert!(buf.is_full());
        write_at(&partial, buf.as_ref(), 0).unwrap();
        let mut buf = AlignedBuf::new(1 << 20);
        buf.fill(&data[(1 << 20)..(1 << 20) + 700_001]);
        write_at(&partial, buf.as_ref(), 1 << 20).unwrap();
        let at = (1 << 20) + 700_001;
        write_at(&partial, &data[at..], at as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn ranges_alternate_between_files_and_none_is_lost() {
        let order = interleave(vec![vec![0, 1, 2], vec![], vec![5], vec![0, 3]]);
        assert_eq!(order, [(0, 0), (2, 5), (3, 0), (0, 1), (3, 3), (0, 2)]);
        assert!(interleave(vec![vec![], vec![]]).is_empty());
    }
}
