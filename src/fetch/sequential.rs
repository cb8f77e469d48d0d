//! Digests that must be computed over a file's bytes in order (SHA-256 of a signed file, or of
//! each signed shard), while the ranges land in any order.
//!
//! Each file has a cursor: when a range ends and the bytes from the cursor on are all written,
//! a blocking task reads them back (from the page cache: they were just written, or from the
//! disk under direct I/O) and feeds them to the digest, finishing one signed digest at each
//! shard's end. So the check follows the download instead of re-reading the model after it,
//! and what is left at the end (ranges kept from an earlier run, files taken from Dragonfly) is
//! read in [`Sequential::finish`]. One read buffer per file being hashed, at most one file per
//! core at a time.

use std::collections::BTreeMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::PrefetchError;
use super::signed::SignedModelError;
use crate::fetch::journal::hex;
use crate::verify::signature::HashType;

/// Bytes read back at a time.
const READ: usize = 4 << 20;

/// Files read back at once, at most: each holds one [`READ`] buffer, so memory stays bounded on
/// a node with a hundred cores and no CPU limit.
const MAX_READERS: usize = 8;

/// One signed digest of a file: the whole file, or one shard.
#[derive(Debug, Clone)]
pub(crate) struct Expected {
    pub(crate) range: Range<u64>,
    pub(crate) digest: [u8; 32],
    /// Whether the signature names a range (shards) rather than the file.
    pub(crate) is_shard: bool,
}

/// One file to check.
#[derive(Debug)]
pub(crate) struct FileToCheck {
    /// Its name in the model, for messages.
    pub(crate) path: String,
    /// The partial file the ranges are written to.
    pub(crate) partial: PathBuf,
    /// Its size.
    pub(crate) size: u64,
    /// Its signed digests, in order, covering `0..size`.
    pub(crate) expected: Vec<Expected>,
}

/// The running digest.
enum Digest {
    Sha256(Box<aws_lc_rs::digest::Context>),
    Blake3(Box<blake3::Hasher>),
}

impl Digest {
    fn new(hash: HashType) -> Self {
        match hash {
            HashType::Sha256 => Self::Sha256(Box::new(aws_lc_rs::digest::Context::new(
                &aws_lc_rs::digest::SHA256,
            ))),
            HashType::Blake3 => Self::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(c) => c.update(data),
            Self::Blake3(h) => {
                h.update(data);
            }
        }
    }

    fn finish(self) -> [u8; 32] {
        match self {
            Self::Sha256(c) => {
                let mut out = [0u8; 32];
                out.copy_from_slice(c.finish().as_ref());
                out
            }
            Self::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// A file's progress.
struct Cursor {
    /// Written ranges not yet hashed, by start (merged when adjacent).
    written: BTreeMap<u64, u64>,
    /// Bytes hashed so far.
    pos: u64,
    /// The expected digest being computed.
    next: usize,
    digest: Option<Digest>,
    /// The first digest that did not match.
    mismatch: Option<SignedModelError>,
}

struct FileState {
    file: FileToCheck,
    cursor: Mutex<Cursor>,
    /// Held by whoever is reading the file back, so one reader advances the cursor at a time.
    reader: Mutex<()>,
}

/// The sequential digests of a model's files, advanced as ranges land.
pub(crate) struct Sequential {
    hash: HashType,
    files: Vec<FileState>,
    readers: Arc<Semaphore>,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Sequential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequential")
            .field("hash", &self.hash)
            .field("files", &self.files.len())
            .finish_non_exhaustive()
    }
}

impl Sequential {
    /// One entry per engine file, in the engine's order (`None`: nothing to check there).
    pub(crate) fn new(hash: HashType, files: Vec<FileToCheck>) -> Self {
        let readers = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .min(MAX_READERS);
        Self {
            hash,
            files: files
                .into_iter()
                .map(|file| FileState {
                    file,
                    cursor: Mutex::new(Cursor::new(hash)),
                    reader: Mutex::new(()),
                })
                .collect(),
            readers: Arc::new(Semaphore::new(readers)),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Records that `range` of file `index` was written before this run (read in
    /// [`Sequential::finish`], or when the ranges before it land).
    fn note(&self, index: usize, range: Range<u64>) {
        if let Some(state) = self.files.get(index) {
            lock(&state.cursor).add(range);
        }
    }

    /// Starts file `index` over: its bytes are about to be fetched again (they did not match
    /// the manifest), so what was hashed of them no longer stands for what is published.
    pub(crate) fn reset(&self, index: usize) {
        if let Some(state) = self.files.get(index) {
            let _reader = state.reader.lock().unwrap_or_else(|p| p.into_inner());
            *lock(&state.cursor) = Cursor::new(self.hash);
        }
    }

    /// Records that file `index` was checked whole against its digests elsewhere (a file from
    /// Dragonfly, checked before it was adopted): not read again.
    pub(crate) fn verified(&self, index: usize) {
        if let Some(state) = self.files.get(index) {
            let _reader = state.reader.lock().unwrap_or_else(|p| p.into_inner());
            let mut cursor = lock(&state.cursor);
            cursor.written.clear();
            cursor.pos = state.file.size;
            cursor.next = state.file.expected.len();
            cursor.digest = Some(Digest::new(self.hash));
        }
    }

    /// Records that `range` of file `index` is written (durably or not: the bytes are there),
    /// and reads on from the cursor when it can.
    pub(crate) fn written(self: &Arc<Self>, index: usize, range: Range<u64>) {
        let Some(state) = self.files.get(index) else {
            return;
        };
        let ready = {
            let mut cursor = lock(&state.cursor);
            cursor.add(range);
            cursor.written.contains_key(&cursor.pos)
        };
        if ready {
            let this = Arc::clone(self);
            self.tasks.spawn(async move {
                let Ok(_permit) = this.readers.acquire().await else {
                    return;
                };
                let task = Arc::clone(&this);
                // A reader already at work on this file takes these bytes too.
                let _ = tokio::task::spawn_blocking(move || task.advance(index, false)).await;
            });
        }
    }

    /// Marks every file wholly written and hashes what is left; the first mismatch is the
    /// error. Call once every range is in.
    pub(crate) async fn finish(self: &Arc<Self>) -> Result<(), PrefetchError> {
        self.tasks.close();
        self.tasks.wait().await;
        for state in &self.files {
            lock(&state.cursor).add(0..state.file.size);
        }
        let mut set = tokio::task::JoinSet::new();
        for index in 0..self.files.len() {
            let this = Arc::clone(self);
            let readers = Arc::clone(&self.readers);
            set.spawn(async move {
                let _permit = readers.acquire_owned().await.ok();
                tokio::task::spawn_blocking(move || this.advance(index, true))
                    .await
                    .map_err(|e| PrefetchError::Internal(format!("a digest task failed: {e}")))?
            });
        }
        let mut first: Option<PrefetchError> = None;
        while let Some(done) = set.join_next().await {
            let result = done
                .map_err(|e| PrefetchError::Internal(format!("a digest task failed: {e}")))
                .and_then(|r| r);
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        for state in &self.files {
            let mut cursor = lock(&state.cursor);
            if let Some(e) = cursor.mismatch.take() {
                return Err(e.into());
            }
            if cursor.pos != state.file.size || cursor.next != state.file.expected.len() {
                return Err(PrefetchError::Internal(format!(
                    "{}: hashed {} of {} bytes for its signature",
                    state.file.path, cursor.pos, state.file.size
                )));
            }
        }
        Ok(())
    }

    /// Hashes file `index` from its cursor as far as its bytes are written. With `wait`, waits
    /// for a reader already at work; without, leaves the bytes to it.
    fn advance(&self, index: usize, wait: bool) -> Result<(), PrefetchError> {
        let Some(state) = self.files.get(index) else {
            return Ok(());
        };
        loop {
            let reader = if wait {
                state.reader.lock().unwrap_or_else(|p| p.into_inner())
            } else {
                match state.reader.try_lock() {
                    Ok(guard) => guard,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
                }
            };
            self.read_on(state)?;
            drop(reader);
            // A range that landed while this reader was finishing found the lock taken and left
            // its bytes to it: look once more now that the lock is free.
            let more = {
                let cursor = lock(&state.cursor);
                cursor.written.contains_key(&cursor.pos)
            };
            if wait || !more {
                return Ok(());
            }
        }
    }

    /// Reads file `state` from its cursor while its bytes are written; the caller holds the
    /// file's reader lock.
    fn read_on(&self, state: &FileState) -> Result<(), PrefetchError> {
        let file = &state.file;
        // Digests of empty ranges (an empty file, signed whole) need no read.
        self.finish_digests(state);
        let mut opened: Option<std::fs::File> = None;
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let span = {
                let cursor = lock(&state.cursor);
                let Some(&end) = cursor.written.get(&cursor.pos) else {
                    return Ok(());
                };
                let boundary = file
                    .expected
                    .get(cursor.next)
                    .map_or(file.size, |e| e.range.end);
                let len = (end.min(boundary) - cursor.pos).min(READ as u64);
                cursor.pos..cursor.pos + len
            };
            if span.is_empty() {
                return Ok(());
            }
            if opened.is_none() {
                opened = Some(
                    std::fs::File::open(&file.partial)
                        .map_err(|e| PrefetchError::local("read back", file.partial.clone(), e))?,
                );
            }
            let Some(reading) = opened.as_ref() else {
                return Ok(());
            };
            let len = usize::try_from(span.end - span.start).unwrap_or(READ);
            buf.resize(len, 0);
            reading
                .read_exact_at(&mut buf, span.start)
                .map_err(|e| PrefetchError::local("read back", file.partial.clone(), e))?;
            {
                let mut cursor = lock(&state.cursor);
                if let Some(d) = cursor.digest.as_mut() {
                    d.update(&buf);
                }
                let start = cursor.pos;
                consume(&mut cursor.written, start, span.end);
                cursor.pos = span.end;
            }
            self.finish_digests(state);
        }
    }

    /// Completes every expected digest whose range ends at the cursor.
    fn finish_digests(&self, state: &FileState) {
        let mut cursor = lock(&state.cursor);
        while let Some(expected) = state.file.expected.get(cursor.next) {
            if expected.range.end != cursor.pos {
                break;
            }
            let actual = cursor
                .digest
                .replace(Digest::new(self.hash))
                .map(Digest::finish)
                .unwrap_or_default();
            if actual != expected.digest && cursor.mismatch.is_none() {
                cursor.mismatch = Some(SignedModelError::DigestMismatch {
                    path: state.file.path.clone(),
                    range: expected.is_shard.then(|| expected.range.clone()),
                    hash: match self.hash {
                        HashType::Sha256 => "SHA-256",
                        HashType::Blake3 => "BLAKE3",
                    },
                    expected: hex(&expected.digest),
                    actual: hex(&actual),
                });
            }
            cursor.next += 1;
        }
    }
}

impl Cursor {
    fn new(hash: HashType) -> Self {
        Self {
            written: BTreeMap::new(),
            pos: 0,
            next: 0,
            digest: Some(Digest::new(hash)),
            mismatch: None,
        }
    }

    /// Records written bytes; those before the cursor were hashed already (a range reported
    /// twice), and a span must never start behind it, where the reader would not look.
    fn add(&mut self, range: Range<u64>) {
        let start = range.start.max(self.pos);
        insert(&mut self.written, start..range.end.max(start));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds `range` to the set of written ranges, merging it with its neighbours.
fn insert(set: &mut BTreeMap<u64, u64>, range: Range<u64>) {
    if range.is_empty() {
        return;
    }
    let (mut start, mut end) = (range.start, range.end);
    let overlapping: Vec<(u64, u64)> = set
        .range(..=end)
        .rev()
        .take_while(|(_, e)| **e >= start)
        .map(|(s, e)| (*s, *e))
        .collect();
    for (s, e) in overlapping {
        set.remove(&s);
        start = start.min(s);
        end = end.max(e);
    }
    set.insert(start, end);
}

/// Removes `start..to` from the front of the span starting at `start`.
fn consume(set: &mut BTreeMap<u64, u64>, start: u64, to: u64) {
    if let Some(end) = set.remove(&start) {
        if end > to {
            set.insert(to, end);
        }
    }
}

/// The sequential check a plan needs: none unsigned, none for a BLAKE3 bundle of whole files
/// that the download's own BLAKE3 is compared with (see [`super::signed`]); otherwise one over
/// every file, starting from the ranges `slots` already hold.
pub(super) fn for_plan(
    plan: &super::plan::Plan,
    layout: &crate::store::Layout,
    name: &crate::store::ModelName,
    options: &crate::config::FetchOptions,
    slots: &[super::pieces::FileSlot],
) -> Option<Arc<Sequential>> {
    let signed = plan.signature.as_ref()?;
    if signed.stands_in_for_manifest() && options.hash {
        return None;
    }
    let by_path = super::signed::resources_by_path(&signed.signed.resources);
    let files = plan
        .files
        .iter()
        .map(|f| FileToCheck {
            path: f.path.clone(),
            partial: layout.partial_path(name, &f.path),
            size: f.size,
            expected: by_path
                .get(f.path.as_str())
                .map(|list| {
                    list.iter()
                        .map(|r| Expected {
                            range: r.range.clone().unwrap_or(0..f.size),
                            digest: r.digest,
                            is_shard: r.range.is_some(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let sequential = Arc::new(Sequential::new(signed.signed.hash, files));
    let chunk = options.chunk_size;
    for (index, slot) in slots.iter().enumerate() {
        for (piece, digest) in slot.digests().iter().enumerate() {
            if digest.is_some() {
                let start = piece as u64 * chunk;
                let end = (start + chunk).min(slot.remote.size);
                sequential.note(index, start..end);
            }
        }
    }
    Some(sequential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_merge_whatever_their_order() {
        let mut set = BTreeMap::new();
        insert(&mut set, 10..20);
        insert(&mut set, 30..40);
        insert(&mut set, 0..10);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), [(0, 20), (30, 40)]);
        let mut set = BTreeMap::new();
        insert(&mut set, 30..40);
        insert(&mut set, 0..5);
        insert(&mut set, 5..30);
        assert_eq!(set.clone().into_iter().collect::<Vec<_>>(), [(0, 40)]);
        consume(&mut set, 0, 12);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), [(12, 40)]);
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref());
        out
    }

    /// Ranges written out of order, a file's shards and an empty file: each digest is computed
    /// over the bytes in order and a changed byte is named with its shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn digests_follow_ranges_written_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, &bytes).unwrap();
        std::fs::write(&b, b"").unwrap();
        let shards = |content: &[u8]| -> Vec<Expected> {
            [0..4000usize, 4000..8000, 8000..10_000]
                .into_iter()
                .map(|r| Expected {
                    digest: sha256(&content[r.clone()]),
                    range: r.start as u64..r.end as u64,
                    is_shard: true,
                })
                .collect()
        };
        let make = |expected: Vec<Expected>| {
            Arc::new(Sequential::new(
                HashType::Sha256,
                vec![
                    FileToCheck {
                        path: "a".into(),
                        partial: a.clone(),
                        size: 10_000,
                        expected,
                    },
                    FileToCheck {
                        path: "b".into(),
                        partial: b.clone(),
                        size: 0,
                        expected: vec![Expected {
                            range: 0..0,
                            digest: sha256(b""),
                            is_shard: false,
                        }],
                    },
                ],
            ))
        };
        let seq = make(shards(&bytes));
        for r in [6000..10_000, 0..3000, 3000..6000] {
            seq.written(0, r);
        }
        seq.finish().await.unwrap();

        let mut changed = bytes.clone();
        changed[5000] ^= 1;
        let seq = make(shards(&changed));
        seq.written(0, 0..10_000);
        let e = seq.finish().await.unwrap_err().to_string();
        assert!(e.contains("a bytes 4000..8000: SHA-256"), "{e}");

        // Bytes fetched again after the manifest refused them are hashed again: what was
        // hashed of the first copy does not stand for the second.
        std::fs::write(&a, &bytes).unwrap();
        let seq = make(shards(&bytes));
        seq.written(0, 0..10_000);
        seq.tasks.close();
        seq.tasks.wait().await;
        std::fs::write(&a, &changed).unwrap();
        seq.reset(0);
        seq.written(0, 0..10_000);
        let e = seq.finish().await.unwrap_err().to_string();
        assert!(e.contains("a bytes 4000..8000: SHA-256"), "{e}");

        // A range reported again behind the cursor does not hide the bytes after it.
        std::fs::write(&a, &bytes).unwrap();
        let seq = make(shards(&bytes));
        seq.note(0, 0..6000);
        seq.advance(0, true).unwrap();
        seq.note(0, 2000..10_000);
        seq.finish().await.unwrap();
    }
}
