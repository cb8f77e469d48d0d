//! The resume journal, `staging/NAME/journal.jsonl`: one JSON line per finished range with the
//! BLAKE3 digest of its bytes.
//!
//! A line is only appended after the range's bytes were made durable (`fdatasync` of the partial
//! file), and lines are appended in batches every couple of seconds, so after a crash or `kill -9`
//! every line stands for bytes that are on disk, and at most a few seconds of work is redone.
//! A torn last line is ignored. Lines carry the file's path, size and ETag and the chunk size, so
//! a changed blob or a different `--chunk-size` simply finds no matching lines.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::StoreError;
use crate::verify::hash::PieceDigest;

/// One finished range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalLine {
    /// File path relative to the model.
    pub path: String,
    /// The file's size when the range was fetched.
    pub size: u64,
    /// The file's ETag when the range was fetched.
    pub etag: String,
    /// Chunk size of the plan.
    pub chunk: u64,
    /// Range index within the file.
    pub index: u64,
    /// BLAKE3 digest of the range, hex; empty when hashing was off.
    pub digest: String,
    /// Its bytes were checked in transit against the server's checksum (absent in journals of
    /// older versions: unchecked).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checked: bool,
}

impl JournalLine {
    /// The digest as bytes, if it is well-formed.
    pub fn digest_bytes(&self) -> Option<PieceDigest> {
        parse_hex(&self.digest)
    }
}

/// A 32-byte digest from its 64 hex digits, if it is that.
pub fn parse_hex(text: &str) -> Option<PieceDigest> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    use std::fmt::Write as _;
    digest.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Reads the lines of an existing journal (missing → none; torn or foreign lines skipped).
    pub fn load(path: &Path) -> Result<Vec<JournalLine>, StoreError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read", path)(e)),
        };
        // Split on bytes, not text: a crash can tear a line inside a multi-byte character (a
        // file name in any script), and that one line must not make the rest unreadable.
        let mut lines = Vec::new();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(StoreError::io("read", path))?;
            if let Ok(parsed) = serde_json::from_slice::<JournalLine>(&line) {
                lines.push(parsed);
            }
        }
        Ok(lines)
    }

    /// Rewrites the journal to hold exactly `lines` (dropping stale ones), atomically, and opens
    /// it for appending.
    pub fn rewrite(path: &Path, lines: &[JournalLine]) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(StoreError::io("create", dir))?;
        }
        let tmp = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for l in lines {
            text.push_str(&serde_json::to_string(l).unwrap_or_default());
            text.push('\n');
        }
        crate::store::write_synced(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, path).map_err(StoreError::io("rename", &tmp))?;
        if let Some(dir) = path.parent() {
            crate::store::fsync_dir(dir)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(StoreError::io("open", path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends lines and makes them durable. The caller has already made the ranges' bytes
    /// durable.
    pub fn append(&mut self, lines: &[JournalLine]) -> Result<(), StoreError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for l in lines {
            text.push_str(&serde_json::to_string(l).unwrap_or_default());
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(StoreError::io("append to", &self.path))?;
        self.file
            .sync_data()
            .map_err(StoreError::io("fsync", &self.path))
    }
}

/// Finished ranges by file path, for lines that match a file's current size, ETag and the chunk.
pub fn index_lines(lines: &[JournalLine]) -> HashMap<(String, u64, String, u64), Vec<JournalLine>> {
    let mut map: HashMap<_, Vec<JournalLine>> = HashMap::new();
    for l in lines {
        map.entry((l.path.clone(), l.size, l.etag.clone(), l.chunk))
            .or_default()
            .push(l.clone());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(index: u64) -> JournalLine {
        JournalLine {
            checked: false,
            path: "a".into(),
            size: 10,
            etag: "e".into(),
            chunk: 4,
            index,
            digest: hex(&[u8::try_from(index).unwrap(); 32]),
        }
    }

    #[test]
    fn appended_lines_survive_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut j = Journal::rewrite(&path, &[line(0)]).unwrap();
        j.append(&[line(1), line(2)]).unwrap();
        drop(j);
        // A crash mid-append leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"path\":\"a\",\"si").unwrap();
        let lines = Journal::load(&path).unwrap();
        assert_eq!(lines, vec![line(0), line(1), line(2)]);
        assert_eq!(lines[1].digest_bytes(), Some([1u8; 32]));
        // Rewriting drops what is not kept.
        Journal::rewrite(&path, &lines[..1]).unwrap();
        assert_eq!(Journal::load(&path).unwrap(), vec![line(0)]);
    }

    #[test]
    fn a_line_torn_inside_a_multibyte_character_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut named = line(1);
        named.path = "модель/权重.safetensors".into();
        let mut j = Journal::rewrite(&path, &[line(0)]).unwrap();
        j.append(&[named.clone()]).unwrap();
        drop(j);
        let whole = serde_json::to_vec(&named).unwrap();
        let cut = whole.iter().position(|&b| b >= 0x80).unwrap() + 1;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&whole[..cut]).unwrap();
        f.write_all(b"\n").unwrap();
        // A later run appended after it.
        f.write_all(&serde_json::to_vec(&line(2)).unwrap()).unwrap();
        f.write_all(b"\n").unwrap();
        drop(f);
        assert!(
            std::fs::read_to_string(&path).is_err(),
            "the file is not UTF-8"
        );
        assert_eq!(Journal::load(&path).unwrap(), vec![line(0), named, line(2)]);
    }

    #[test]
    fn missing_journal_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journal::load(&dir.path().join("none")).unwrap().is_empty());
    }
}
