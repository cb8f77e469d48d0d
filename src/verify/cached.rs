//! Re-verification of a model already in the cache (`modelcache verify`): every file's size
//! and BLAKE3 against the manifest kept at publish (or the hashes in the ready marker), then the
//! safetensors and index structure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::VerifyError;
use super::hash::hash_local_file;
use super::manifest::Manifest;
use super::structure::{
    ShardTensors, add_header, check_index, check_safetensors, is_index, is_safetensors, read_index,
};
use crate::store::{MANIFEST_COPY, RECORDS_DIR, ReadyFile, ReadyMarker, Verification};

/// What a re-verification found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedReport {
    /// The model directory verified (the revision directory).
    pub dir: PathBuf,
    /// The model name from the marker.
    pub name: String,
    /// The revision.
    pub revision: String,
    /// Files checked.
    pub files: usize,
    /// Bytes hashed.
    pub bytes: u64,
    /// `blake3` when every file was hashed against a recorded hash.
    pub verification: Verification,
    /// What the index checks found odd but vLLM loads anyway.
    pub warnings: Vec<String>,
}

/// The manifest kept beside a published revision, if it has one.
pub fn read_manifest_copy(revision_dir: &Path) -> Result<Option<Manifest>, VerifyError> {
    let path = revision_dir.join(RECORDS_DIR).join(MANIFEST_COPY);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(Manifest::parse(&bytes, &path.display().to_string())?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VerifyError::Io { path, source }),
    }
}

/// The BLAKE3 a published file must have: the manifest's, else the one recorded while it
/// was downloaded; `None` when neither exists.
pub fn expected_blake3(manifest: Option<&Manifest>, file: &ReadyFile) -> Option<String> {
    manifest
        .and_then(|m| m.get(&file.path).map(|e| e.blake3.clone()))
        .or_else(|| file.blake3.clone())
}

/// Re-verifies a published revision directory, hashing on `threads` threads with pieces of
/// `chunk` bytes.
pub fn verify_cached(dir: &Path, chunk: u64, threads: usize) -> Result<CachedReport, VerifyError> {
    let dir = std::fs::canonicalize(dir).map_err(|source| VerifyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let marker = ReadyMarker::read(&dir).map_err(|e| VerifyError::Manifest {
        path: dir.join(RECORDS_DIR).display().to_string(),
        reason: format!("{e} (is this a published model directory?)"),
    })?;
    let manifest = read_manifest_copy(&dir)?;
    let mut hashed_all = true;
    let mut bytes = 0;
    let mut shards: HashMap<String, ShardTensors> = HashMap::new();
    let mut headers = 0;
    for file in &marker.files {
        let path = dir.join(&file.path);
        let size = std::fs::metadata(&path).map(|m| m.len()).ok();
        if size != Some(file.size) {
            return Err(VerifyError::CachedFile {
                path,
                expected: file.size,
            });
        }
        match expected_blake3(manifest.as_ref(), file) {
            Some(expected) => {
                let actual = hash_local_file(&path, chunk, threads)
                    .map_err(|source| VerifyError::Io {
                        path: path.clone(),
                        source,
                    })?
                    .to_hex()
                    .to_string();
                if actual != expected {
                    return Err(VerifyError::HashMismatch {
                        path: file.path.clone(),
                        expected,
                        actual,
                    });
                }
                bytes += file.size;
            }
            None => hashed_all = false,
        }
        if is_safetensors(&file.path) {
            let (tensors, header_len) = check_safetensors(&path, &file.path)?;
            add_header(&mut headers, header_len, &file.path)?;
            shards.insert(file.path.clone(), tensors);
        }
    }
    let mut warnings = Vec::new();
    for file in marker.files.iter().filter(|f| is_index(&f.path)) {
        let data = read_index(&dir.join(&file.path), &file.path)?;
        warnings.extend(check_index(&file.path, &data, &shards)?);
    }
    Ok(CachedReport {
        dir,
        name: marker.name,
        revision: marker.revision,
        files: marker.files.len(),
        bytes,
        // Without a manifest, the hashes recorded at download prove the files are unchanged
        // since; how they were checked against the source stays what the marker says.
        verification: match (hashed_all, manifest.is_some(), marker.verification) {
            (true, true, _) => Verification::Blake3,
            (true, false, Verification::Md5) => Verification::Md5,
            (true, false, Verification::Signature) => Verification::Signature,
            _ => Verification::Structural,
        },
        warnings,
    })
}
