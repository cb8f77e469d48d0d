//! Checks before the first byte: every shard's safetensors header and every index, read from
//! the source with small ranged reads and judged by the same rules as the final structure check,
//! so a model vLLM could not load is refused in seconds, not after its whole download.
//!
//! The final check on the downloaded bytes still runs: this one judges what the source claims
//! (header against listed size, index against headers), the manifest and the final check judge
//! what arrived.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::PrefetchError;
use super::pieces::FailedAttempt;
use super::plan::Plan;
use super::progress::Progress;
use crate::config::FetchOptions;
use crate::source::{RemoteFile, RetryCause, Source, SourceError};
use crate::verify::VerifyError;
use crate::verify::structure::{
    MAX_INDEX_BYTES, ParseBudget, ShardTensors, add_header, check_index, check_safetensors_header,
    header_end, is_index, is_safetensors,
};

/// First read of each shard: most headers fit (GPT-OSS-120B's largest is about 60 KiB); a
/// longer one takes a second read. Kept small because every node reads these bytes from the
/// source even when the shards themselves come from peers (Dragonfly).
const FIRST_READ: u64 = 64 << 10;

/// The largest read Blob's transactional MD5 covers.
const MAX_CHECKED_READ: u64 = 4 << 20;

/// Shards whose headers are read at once.
const PARALLEL_HEADERS: usize = 16;

/// What the preflight read and found.
#[derive(Debug, Default)]
pub(super) struct Preflight {
    /// Shards whose headers were checked.
    pub(super) shards: usize,
    /// Indexes checked.
    pub(super) indexes: usize,
    /// Bytes read to check them.
    pub(super) bytes_read: u64,
    /// What is odd but loads (the final check reports the same).
    pub(super) warnings: Vec<String>,
}

/// Reads and checks every shard header and index of the plan.
pub(super) async fn check_before_download(
    source: &Arc<dyn Source>,
    plan: &Plan,
    options: &FetchOptions,
    cancel: &CancellationToken,
    progress: &Progress,
    budget: &ParseBudget,
) -> Result<Preflight, PrefetchError> {
    let reader = Reader {
        source: source.as_ref(),
        check_transfers: plan.manifest.is_none(),
        options,
        cancel,
        progress,
        budget,
    };
    // Indexes over the limit are refused before any header is read.
    for index in plan.files.iter().filter(|f| is_index(&f.path)) {
        if index.size > MAX_INDEX_BYTES {
            return Err(VerifyError::TooLarge {
                path: index.path.clone(),
                what: "index",
                size: index.size,
                limit: MAX_INDEX_BYTES,
            }
            .into());
        }
    }
    let checks: Vec<_> = plan
        .files
        .iter()
        .filter(|f| is_safetensors(&f.path))
        .map(|file| reader.shard(file))
        .collect();
    let mut report = Preflight::default();
    let mut headers: HashMap<String, ShardTensors> = HashMap::new();
    let mut header_total = 0;
    let mut checked = futures::stream::iter(checks).buffer_unordered(PARALLEL_HEADERS);
    while let Some((path, tensors, header_len)) = checked.try_next().await? {
        add_header(&mut header_total, header_len, &path)?;
        report.shards += 1;
        report.bytes_read += header_len;
        headers.insert(path, tensors);
    }
    drop(checked);
    for index in plan.files.iter().filter(|f| is_index(&f.path)) {
        let _held = budget.hold(index.size).await;
        let bytes = reader.read(index, 0..index.size).await?;
        report.bytes_read += bytes.len() as u64;
        report.indexes += 1;
        let warnings = match check_index(&index.path, &bytes, &headers) {
            Ok(w) => w,
            Err(first) => {
                // As for headers: refused only when a second read brings the same bytes.
                let seen = blake3::hash(&bytes);
                drop(bytes);
                let again = reader.read(index, 0..index.size).await?;
                if blake3::hash(&again) == seen {
                    return Err(first.into());
                }
                check_index(&index.path, &again, &headers)?
            }
        };
        report.warnings.extend(warnings);
    }
    Ok(report)
}

/// Small retried reads from the source.
struct Reader<'a> {
    source: &'a dyn Source,
    check_transfers: bool,
    options: &'a FetchOptions,
    cancel: &'a CancellationToken,
    progress: &'a Progress,
    /// Bounds the header and index bytes parsed at once, across prefetches.
    budget: &'a ParseBudget,
}

impl Reader<'_> {
    /// Reads one shard's header (two reads when it is longer than [`FIRST_READ`]) and checks it.
    /// A header that fails is read once more and refused only if the same bytes come back: a bit
    /// flipped in transit must cost a retry, not a verdict on a good model.
    async fn shard(&self, file: &RemoteFile) -> Result<(String, ShardTensors, u64), PrefetchError> {
        let (head, _held) = self.header(file).await?;
        let header_len = head.len() as u64;
        let tensors = match check_safetensors_header(&head, file.size, &file.path) {
            Ok(t) => t,
            Err(first) => {
                // Only the first copy's hash is kept while the second is read.
                let seen = blake3::hash(&head);
                drop((head, _held));
                let (again, _held) = self.header(file).await?;
                if blake3::hash(&again) == seen {
                    return Err(first.into());
                }
                check_safetensors_header(&again, file.size, &file.path)?
            }
        };
        Ok((file.path.clone(), tensors, header_len))
    }

    /// Reads a shard's header; the permit returned covers its bytes and is held until the
    /// caller has parsed them.
    async fn header(
        &self,
        file: &RemoteFile,
    ) -> Result<(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>), PrefetchError> {
        if file.size < 8 {
            // Too short to hold a header: refused without asking the source for an empty range.
            header_end(&[], file.size, &file.path)?;
        }
        let mut head = self.read(file, 0..file.size.min(FIRST_READ)).await?;
        // The length field is checked against the limit before any more is read.
        let end = header_end(&head, file.size, &file.path)?;
        let have = head.len() as u64;
        // Held while the header is read and parsed, so what the preflight holds is bounded
        // whatever the number of shards.
        let held = self.budget.hold(end).await;
        if end > have {
            head.extend_from_slice(&self.read(file, have..end).await?);
        }
        Ok((head, held))
    }

    /// Reads `range` of `file` with the download's retries, stall timeout and errors (a range
    /// that runs out of attempts names its bytes, attempts and last cause); a file that changed
    /// restarts the prefetch from a fresh listing, as during the download. Without a manifest,
    /// ranges Blob can checksum (up to 4 MiB) are checked in transit, as the download's are.
    async fn read(
        &self,
        file: &RemoteFile,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>, PrefetchError> {
        let began = Instant::now();
        let checked = self.check_transfers && range.end - range.start <= MAX_CHECKED_READ;
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let answer = tokio::select! {
                () = self.cancel.cancelled() => return Err(PrefetchError::Cancelled),
                answer = tokio::time::timeout(
                    self.options.stall_timeout,
                    read_all(self.source, file, range.clone(), checked),
                ) => answer,
            };
            let err = match answer {
                Ok(Ok(bytes)) => return Ok(bytes),
                Ok(Err(e)) => e,
                Err(_) => SourceError::transient(
                    &file.path,
                    RetryCause::Stalled,
                    format!(
                        "no answer within {}s",
                        self.options.stall_timeout.as_secs_f32()
                    ),
                ),
            };
            let failed = FailedAttempt {
                path: &file.path,
                range: range.clone(),
                resume_at: range.start,
                attempts,
                began,
            };
            let delay = failed.retry_or_give_up(self.options, self.progress, err)?;
            tokio::select! {
                () = self.cancel.cancelled() => return Err(PrefetchError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Reads `range` of `file` whole; a body that is not exactly the range is an error.
async fn read_all(
    source: &dyn Source,
    file: &RemoteFile,
    range: std::ops::Range<u64>,
    checked: bool,
) -> Result<Vec<u8>, SourceError> {
    let want = range.end - range.start;
    let mut stream = if checked {
        source.read_range_checked(file, range.clone()).await?
    } else {
        source.read_range(file, range.clone()).await?
    };
    let mut out = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
    while let Some(bytes) = stream.next().await {
        let bytes = bytes?;
        if (out.len() + bytes.len()) as u64 > want {
            return Err(SourceError::UnexpectedRange {
                path: file.path.clone(),
                want: range.clone(),
                got: range.start..range.start + (out.len() + bytes.len()) as u64,
            });
        }
        out.extend_from_slice(&bytes);
    }
    if (out.len() as u64) < want {
        return Err(SourceError::transient(
            &file.path,
            RetryCause::ShortBody,
            format!(
                "the body ended at byte {} of {}",
                range.start + out.len() as u64,
                range.end
            ),
        ));
    }
    Ok(out)
}
