//! BLAKE3 over independent pieces of a file, combined into the whole file's hash.
//!
//! A file is cut into pieces of `chunk` bytes (a power of two, at least 1 KiB) at offsets that are
//! multiples of `chunk`; every piece, including a shorter last one, is then a complete subtree of
//! the file's BLAKE3 tree. Each piece is hashed on its own as its bytes arrive (in any order, on
//! any thread) into a 32-byte chaining value, which the resume journal can store; [`combine`]
//! merges them into the root hash without reading the file again.

use std::os::unix::fs::FileExt;
use std::path::Path;

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// The 32 bytes a finished piece leaves behind: a chaining value, or for a file that is a single
/// piece, the root hash itself.
pub type PieceDigest = [u8; 32];

/// Hashes one piece of a file.
#[derive(Debug, Clone)]
pub struct PieceHasher {
    inner: blake3::Hasher,
    whole_file: bool,
}

impl PieceHasher {
    /// A hasher for the piece starting at `offset`. `whole_file` is true when the piece is the
    /// entire file, whose digest is then the root hash.
    pub fn new(offset: u64, whole_file: bool) -> Self {
        let mut inner = blake3::Hasher::new();
        if !whole_file {
            inner.set_input_offset(offset);
        }
        Self { inner, whole_file }
    }

    /// Feeds the next bytes of the piece, in order.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }

    /// The piece's digest.
    pub fn finish(&self) -> PieceDigest {
        if self.whole_file {
            *self.inner.finalize().as_bytes()
        } else {
            self.inner.finalize_non_root()
        }
    }
}

/// Number of pieces a file of `size` bytes has with pieces of `chunk` bytes.
pub fn piece_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

/// Combines the digests of all pieces of a file, in order, into its BLAKE3 hash.
pub fn combine(pieces: &[PieceDigest]) -> blake3::Hash {
    match pieces {
        [] => blake3::hash(b""),
        [only] => blake3::Hash::from_bytes(*only),
        _ => {
            let split = left_pieces(pieces.len());
            let (l, r) = pieces.split_at(split);
            merge_subtrees_root(&merge(l), &merge(r), Mode::Hash)
        }
    }
}

fn merge(pieces: &[ChainingValue]) -> ChainingValue {
    if let [only] = pieces {
        return *only;
    }
    let split = left_pieces(pieces.len());
    let (l, r) = pieces.split_at(split);
    merge_subtrees_non_root(&merge(l), &merge(r), Mode::Hash)
}

/// BLAKE3's left subtree holds the largest power of two of pieces below the total, because every
/// piece but the last is full and the chunk size is a power of two.
fn left_pieces(n: usize) -> usize {
    debug_assert!(n > 1);
    let as_chunks = u64::try_from(n).unwrap_or(u64::MAX).saturating_mul(1024);
    usize::try_from(left_subtree_len(as_chunks) / 1024).unwrap_or(1)
}

/// Hashes a local file piece by piece on `threads` threads (the `verify` and `manifest`
/// commands), returning the same hash as [`blake3::hash`] of its contents.
pub fn hash_local_file(path: &Path, chunk: u64, threads: usize) -> std::io::Result<blake3::Hash> {
    let size = std::fs::metadata(path)?.len();
    let all: Vec<u64> = (0..piece_count(size, chunk)).collect();
    let mut digests = hash_file_pieces(path, &all, chunk, size, threads)?;
    digests.sort_unstable_by_key(|(index, _)| *index);
    let digests: Vec<PieceDigest> = digests.into_iter().map(|(_, d)| d).collect();
    Ok(combine(&digests))
}

/// Hashes the pieces numbered `indices` of the file at `path`, which must hold at least `size`
/// bytes, on `threads` threads; each digest with its piece's number, in no particular order.
pub fn hash_file_pieces(
    path: &Path,
    indices: &[u64],
    chunk: u64,
    size: u64,
    threads: usize,
) -> std::io::Result<Vec<(u64, PieceDigest)>> {
    let file = std::fs::File::open(path)?;
    if file.metadata()?.len() < size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file is shorter than expected",
        ));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads.clamp(1, indices.len().max(1)))
            .map(|_| {
                scope.spawn(|| -> std::io::Result<Vec<(u64, PieceDigest)>> {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&index) = indices.get(i) else {
                            return Ok(out);
                        };
                        let start = index * chunk;
                        let end = (start + chunk).min(size);
                        out.push((index, hash_piece_at(&file, start, end, size, &mut buf)?));
                    }
                })
            })
            .collect();
        let mut all = Vec::with_capacity(indices.len());
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| std::io::Error::other("a hashing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// The digest of the piece `start..end` of `file`, a file of `size` bytes, read through `buf`.
pub fn hash_piece_at(
    file: &std::fs::File,
    start: u64,
    end: u64,
    size: u64,
    buf: &mut [u8],
) -> std::io::Result<PieceDigest> {
    let mut hasher = PieceHasher::new(start, start == 0 && end == size);
    let mut pos = start;
    while pos < end {
        let want = usize::try_from((end - pos).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = file.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being hashed",
            ));
        }
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces_of(data: &[u8], chunk: usize) -> Vec<PieceDigest> {
        let whole = data.len() <= chunk;
        data.chunks(chunk)
            .enumerate()
            .map(|(i, piece)| {
                let mut h = PieceHasher::new((i * chunk) as u64, whole);
                // Feed in uneven slices, as network reads arrive.
                for part in piece.chunks(777) {
                    h.update(part);
                }
                h.finish()
            })
            .collect()
    }

    #[test]
    fn combined_pieces_equal_the_plain_hash_for_every_shape() {
        let data: Vec<u8> = (0..(70 * 1024 + 13))
            .map(|i| u8::try_from(i * 31 % 251).unwrap())
            .collect();
        for chunk in [1024usize, 2048, 4096, 16384, 65536, 131072] {
            for len in [
                0usize,
                1,
                1023,
                1024,
                1025,
                2048,
                3 * 1024 + 5,
                5 * 4096,
                70 * 1024 + 13,
            ] {
                let slice = &data[..len];
                let got = combine(&pieces_of(slice, chunk));
                assert_eq!(got, blake3::hash(slice), "chunk {chunk} len {len}");
            }
        }
    }

    #[test]
    fn a_flipped_byte_changes_the_combined_hash() {
        let mut data = vec![7u8; 9 * 1024];
        let before = combine(&pieces_of(&data, 2048));
        data[5000] ^= 1;
        assert_ne!(before, combine(&pieces_of(&data, 2048)));
    }

    #[test]
    fn local_file_hash_matches_in_parallel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        for (chunk, threads) in [(65536u64, 3usize), (1 << 20, 2)] {
            assert_eq!(
                hash_local_file(&path, chunk, threads).unwrap(),
                blake3::hash(&data)
            );
        }
    }
}
