//! The model manifest, `modelcache.manifest.json`: every file's relative path, size and BLAKE3.
//!
//! The manifest is untrusted input read from the source: it is parsed strictly (unknown fields,
//! unsafe paths, malformed hashes and duplicates are errors that name the entry).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::VerifyError;
use crate::source::validate_name;

/// The value of the `format` field this version reads and writes.
pub const FORMAT: &str = "modelcache.manifest/v1";

/// One file of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Relative, `/`-separated path.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 hash, 64 lowercase hex digits.
    pub blake3: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestFile {
    format: String,
    algorithm: String,
    files: Vec<ManifestEntry>,
}

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    files: BTreeMap<String, ManifestEntry>,
}

impl Manifest {
    /// Builds a manifest from entries, checking them as [`Manifest::parse`] does.
    pub fn from_entries(entries: Vec<ManifestEntry>) -> Result<Self, VerifyError> {
        Self::checked(entries, "<generated>")
    }

    /// Parses and validates manifest bytes read from `origin` (named in errors).
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, VerifyError> {
        let invalid = |reason: String| VerifyError::Manifest {
            path: origin.to_string(),
            reason,
        };
        let file: ManifestFile =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
        if file.format != FORMAT {
            return Err(invalid(format!(
                "format {:?} is not {FORMAT:?} (hint: a newer modelcache may have written it)",
                file.format
            )));
        }
        if file.algorithm != "blake3" {
            return Err(invalid(format!(
                "algorithm {:?} is not supported (only \"blake3\")",
                file.algorithm
            )));
        }
        Self::checked(file.files, origin)
    }

    fn checked(entries: Vec<ManifestEntry>, origin: &str) -> Result<Self, VerifyError> {
        let invalid = |reason: String| VerifyError::Manifest {
            path: origin.to_string(),
            reason,
        };
        let mut files = BTreeMap::new();
        for entry in entries {
            validate_name(&entry.path).map_err(|e| invalid(e.to_string()))?;
            let hex_ok = entry.blake3.len() == 64
                && entry
                    .blake3
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(invalid(format!(
                    "{}: blake3 must be 64 lowercase hex digits",
                    entry.path
                )));
            }
            if let Some(dup) = files.insert(entry.path.clone(), entry) {
                return Err(invalid(format!("{} is listed twice", dup.path)));
            }
        }
        Ok(Self { files })
    }

    /// The entry for a relative path.
    pub fn get(&self, path: &str) -> Option<&ManifestEntry> {
        self.files.get(path)
    }

    /// All entries, sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = &ManifestEntry> {
        self.files.values()
    }

    /// The manifest as pretty JSON, entries sorted by path.
    pub fn to_json(&self) -> String {
        let file = ManifestFile {
            format: FORMAT.to_string(),
            algorithm: "blake3".to_string(),
            files: self.files.values().cloned().collect(),
        };
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    fn doc(path: &str, hash: &str) -> String {
        format!(
            r#"{{"format":"modelcache.manifest/v1","algorithm":"blake3","files":[{{"path":"{path}","size":1,"blake3":"{hash}"}}]}}"#
        )
    }

    #[test]
    fn round_trips() {
        let m = Manifest::parse(doc("a/b.safetensors", HASH).as_bytes(), "m").unwrap();
        assert_eq!(m.get("a/b.safetensors").unwrap().size, 1);
        assert_eq!(Manifest::parse(m.to_json().as_bytes(), "m").unwrap(), m);
    }

    #[test]
    fn hostile_manifests_are_refused_with_the_entry() {
        for (path, hash, needle) in [
            ("../etc/passwd", HASH, "../etc/passwd"),
            ("/abs", HASH, "/abs"),
            ("ok", "XYZ", "64 lowercase hex"),
        ] {
            let err = Manifest::parse(doc(path, hash).as_bytes(), "m").unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let err = Manifest::parse(b"{\"format\":1}", "src/m.json").unwrap_err();
        assert!(err.to_string().contains("src/m.json"), "{err}");
        let extra = doc("a", HASH).replace("\"files\"", "\"extra\":1,\"files\"");
        assert!(Manifest::parse(extra.as_bytes(), "m").is_err());
        let dup = format!(
            r#"{{"format":"modelcache.manifest/v1","algorithm":"blake3","files":[{{"path":"a","size":1,"blake3":"{HASH}"}},{{"path":"a","size":1,"blake3":"{HASH}"}}]}}"#
        );
        assert!(
            Manifest::parse(dup.as_bytes(), "m")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }
}
