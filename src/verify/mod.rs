//! Everything that decides whether bytes are the model: piecewise BLAKE3 ([`hash`]), the
//! manifest ([`manifest`]), and safetensors and index structure ([`structure`]).
//!
//! This module reads files and compares; it never downloads, renames or publishes.

pub mod cached;
pub mod hash;
pub mod manifest;
pub mod signature;
pub mod structure;

use std::path::PathBuf;

/// A check that failed: the bytes are not the model they claim to be.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file's BLAKE3 differs from the manifest.
    #[error("{path}: BLAKE3 {actual} does not match the manifest's {expected}")]
    HashMismatch {
        /// The file, relative to the model.
        path: String,
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// A file's size differs from the manifest.
    #[error("{path}: size {actual} does not match the manifest's {expected}")]
    SizeMismatch {
        /// The file, relative to the model.
        path: String,
        /// From the manifest.
        expected: u64,
        /// Listed or on disk.
        actual: u64,
    },
    /// The manifest lists a selected file the source does not have.
    #[error("{path} is in the manifest but missing from the source")]
    MissingFromSource {
        /// The file, relative to the model.
        path: String,
    },
    /// A selected file is not covered by the manifest.
    #[error(
        "{path} is in the source but not in its manifest (hint: regenerate it with `modelcache manifest --upload`, or exclude the file)"
    )]
    NotInManifest {
        /// The file, relative to the model.
        path: String,
    },
    /// The manifest could not be used.
    #[error("invalid manifest {path}: {reason}")]
    Manifest {
        /// Where it was read from.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The source has no manifest but one is required.
    #[error(
        "the source has no modelcache.manifest.json and a manifest is required (hint: publish one with `modelcache manifest --source URL --upload`, or drop --require-manifest)"
    )]
    ManifestRequired,
    /// A `.safetensors` file is malformed.
    #[error("{path} is not a valid safetensors file")]
    Safetensors {
        /// The file, relative to the model.
        path: String,
        /// What the parser found.
        #[source]
        source: safetensors::SafeTensorError,
    },
    /// A `*.safetensors.index.json` is malformed or disagrees with the shards.
    #[error("{path}: {reason}")]
    Index {
        /// The index file, relative to the model.
        path: String,
        /// What disagrees.
        reason: String,
    },
    /// A header or index is larger than any real model's, so it is refused before it is read.
    #[error(
        "{path}: its {what} is {size} bytes, over the {limit}-byte limit (real models stay far below it; this is not a model vLLM should load)"
    )]
    TooLarge {
        /// The file, relative to the model.
        path: String,
        /// What is too large (`safetensors header`, `index`, `shard headers in all`).
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A published model's files changed on disk.
    #[error("{path} is missing or has the wrong size in the cache (expected {expected} bytes)")]
    CachedFile {
        /// The file on disk.
        path: PathBuf,
        /// From the ready marker.
        expected: u64,
    },
    /// Reading a local file failed.
    #[error("failed to read {path}")]
    Io {
        /// The file on disk.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
