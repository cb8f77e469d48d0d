//! The publisher's signature on a model (OpenSSF Model Signing): read beside the model's files,
//! verified against the operator's trusted signers, and compared with what is about to be
//! published before any byte is fetched.
//!
//! The rule that combines the signature with modelcache's selection: **every file modelcache
//! publishes must be listed by the signature**, and **every file the signature lists that the
//! selection selects must be in the source**. A signed file the selection leaves out (the
//! publisher signed `original/`, vLLM never loads it) is not fetched and not needed. The
//! signature's own `ignore_paths` only say what the signer skipped: a selected file under one of
//! them is not signed, so it is refused like any other unsigned file.
//!
//! The bytes are compared later: a BLAKE3 bundle of whole files stands in for the manifest (the
//! BLAKE3 computed while downloading is compared with it); SHA-256 bundles, and BLAKE3 bundles
//! of shards, are checked by [`super::sequential`] as each file's ranges land.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::Selection;
use crate::source::{MANIFEST_NAME, RemoteFile};
use crate::verify::manifest::{Manifest, ManifestEntry};
use crate::verify::signature::{
    HashType, Method, Resource, SignatureError, Signed, Signer, Trust, TrustedKey, verify,
};

/// The signature's file name in the model's directory when none is configured: what
/// `model_signing sign` writes by default.
pub const DEFAULT_SIGNATURE_FILE: &str = "model.sig";

/// Whether a model's signature is read and what its absence means.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SignatureMode {
    /// Not read: the model is published as unsigned.
    Off,
    /// Verified when present (and then it must verify), published as unsigned when absent.
    #[default]
    Optional,
    /// Must be present and verify, or the model is never published.
    Required,
}

impl SignatureMode {
    /// Parses `off`, `optional` or `required`.
    pub fn parse(key: &str, value: &str) -> Result<Self, crate::config::InvalidValue> {
        match value {
            "off" => Ok(Self::Off),
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(crate::config::InvalidValue::new(
                key,
                other,
                "off, optional or required",
            )),
        }
    }

    /// The word as configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Optional => "optional",
            Self::Required => "required",
        }
    }
}

/// A model's signature policy: where the signature is, whom to trust, whether it is required.
#[derive(Debug, Clone)]
pub struct SignaturePolicy {
    /// Off, optional or required.
    pub mode: SignatureMode,
    /// The signature's name in the model's directory.
    pub file: String,
    /// The signers the operator trusts.
    pub trust: Arc<Trust>,
}

impl Default for SignaturePolicy {
    fn default() -> Self {
        Self {
            mode: SignatureMode::Optional,
            file: DEFAULT_SIGNATURE_FILE.to_string(),
            trust: Arc::new(Trust::default()),
        }
    }
}

impl SignaturePolicy {
    /// The file name to leave out of the model's files (it is not a model file).
    pub(crate) fn excluded_name(&self) -> Option<&str> {
        (self.mode != SignatureMode::Off).then_some(self.file.as_str())
    }
}

/// Why a model's signature stopped it, naming the file or the reason.
#[derive(Debug, thiserror::Error)]
pub enum SignedModelError {
    /// Required and absent.
    #[error(
        "the model's signature {file} is missing and a signature is required (hint: sign the model with `model_signing sign` and upload the signature as {file}, or set signature = \"optional\")"
    )]
    Missing {
        /// Where it was looked for.
        file: String,
    },
    /// Present but not acceptable.
    #[error("the model's signature {file} is not accepted")]
    Invalid {
        /// The signature's location.
        file: String,
        /// Why.
        #[source]
        source: SignatureError,
    },
    /// Present, with no trusted signer configured to check it, and required.
    #[error(
        "the model's signature {file} cannot be checked: no trusted signer is configured (hint: list the publisher's public key or CA certificate under [signing] trusted, or pass --trusted)"
    )]
    NoTrust {
        /// The signature's location.
        file: String,
    },
    /// A file about to be published is not signed.
    #[error(
        "{path} is in the source and selected but the signature does not list it (hint: exclude it, or have the publisher sign it)"
    )]
    NotSigned {
        /// The file.
        path: String,
    },
    /// A signed, selected file is not in the source.
    #[error("{path} is signed but missing from the source")]
    SignedMissing {
        /// The file.
        path: String,
    },
    /// The signature's shards of a file do not cover it exactly.
    #[error("{path}: the signature's shards cover {covered}, not the file's {size} bytes")]
    ShardsDoNotCover {
        /// The file.
        path: String,
        /// What they cover, for the message.
        covered: String,
        /// The listed size.
        size: u64,
    },
    /// The signature and the manifest name different bytes for a file.
    #[error(
        "{path}: the signature's BLAKE3 {signed} and {MANIFEST_NAME}'s {manifest} differ: one of them was changed"
    )]
    DisagreesWithManifest {
        /// The file.
        path: String,
        /// From the signature.
        signed: String,
        /// From the manifest.
        manifest: String,
    },
    /// The bytes fetched are not the bytes signed.
    #[error("{path}{}: {hash} is {actual} but the signature says {expected}", shard(range.as_ref()))]
    DigestMismatch {
        /// The file.
        path: String,
        /// For a sharded signature, the shard's bytes.
        range: Option<Range<u64>>,
        /// `SHA-256` or `BLAKE3`.
        hash: &'static str,
        /// Signed.
        expected: String,
        /// Computed.
        actual: String,
    },
}

fn shard(range: Option<&Range<u64>>) -> String {
    range.map_or_else(String::new, |r| format!(" bytes {}..{}", r.start, r.end))
}

/// A verified signature and its bytes (kept with the revision for `modelcache verify`).
#[derive(Debug, Clone)]
pub struct SignedPlan {
    /// What it signs.
    pub signed: Signed,
    /// The bundle as read.
    pub bundle: Bytes,
    /// Where it was read from.
    pub file: String,
}

/// What a published revision records about its signature.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureRecord {
    /// Who signed.
    pub signer: Signer,
    /// `sha256` or `blake3`.
    pub hash: String,
    /// `files` or `shards`.
    pub method: String,
    /// The signature's file name in the source (its copy is `.modelcache/signature.sig`).
    pub file: String,
    /// The model's name in the signed statement.
    pub signed_name: String,
}

impl SignedPlan {
    /// What the revision's ready marker records.
    pub fn record(&self, file_name: &str) -> SignatureRecord {
        SignatureRecord {
            signer: self.signed.signer.clone(),
            hash: hash_name(self.signed.hash).to_string(),
            method: match self.signed.method {
                Method::Files => "files".into(),
                Method::Shards { .. } => "shards".into(),
            },
            file: file_name.to_string(),
            signed_name: self.signed.model_name.clone(),
        }
    }

    /// Whether the signature's digests are the BLAKE3 of whole files: then it is the manifest.
    pub fn stands_in_for_manifest(&self) -> bool {
        self.signed.hash == HashType::Blake3 && self.signed.method == Method::Files
    }
}

/// `sha256` or `blake3`, as a statement names them.
pub fn hash_name(hash: HashType) -> &'static str {
    match hash {
        HashType::Sha256 => "sha256",
        HashType::Blake3 => "blake3",
    }
}

/// Verifies `bundle` (read from `file`; `None` when the source has none) under `policy`.
/// Returns `None` when the model is to be published unsigned (off, or optional and absent, or
/// optional with nobody trusted: said in a warning by the caller).
pub fn check_bundle(
    policy: &SignaturePolicy,
    file: &str,
    bundle: Option<Bytes>,
) -> Result<Option<SignedPlan>, SignedModelError> {
    let bundle = match (policy.mode, bundle) {
        (SignatureMode::Off, _) | (SignatureMode::Optional, None) => return Ok(None),
        (SignatureMode::Required, None) => {
            return Err(SignedModelError::Missing {
                file: file.to_string(),
            });
        }
        (_, Some(bundle)) => bundle,
    };
    if policy.trust.is_empty() {
        return match policy.mode {
            SignatureMode::Required => Err(SignedModelError::NoTrust {
                file: file.to_string(),
            }),
            _ => Ok(None),
        };
    }
    let signed = verify(&bundle, &policy.trust).map_err(|source| SignedModelError::Invalid {
        file: file.to_string(),
        source,
    })?;
    Ok(Some(SignedPlan {
        signed,
        bundle,
        file: file.to_string(),
    }))
}

/// Checks the rule in the module's documentation: every selected, listed file is signed (for
/// shards, its shards cover it exactly), and every selected signed file is listed.
pub fn check_coverage(
    files: &[RemoteFile],
    signed: &Signed,
    selection: &Selection,
    signature_file: &str,
) -> Result<(), SignedModelError> {
    check_files_signed(files, signed)?;
    let by_path = resources_by_path(&signed.resources);
    for path in by_path.keys() {
        let published = files.iter().any(|f| f.path == *path);
        let ours = *path == MANIFEST_NAME || *path == signature_file;
        if !published && !ours && selection.is_selected(path) {
            return Err(SignedModelError::SignedMissing {
                path: (*path).to_string(),
            });
        }
    }
    Ok(())
}

/// Checks every file is signed, and for shards that its shards cover it exactly.
fn check_files_signed(files: &[RemoteFile], signed: &Signed) -> Result<(), SignedModelError> {
    let by_path = resources_by_path(&signed.resources);
    for f in files {
        let Some(resources) = by_path.get(f.path.as_str()) else {
            // model_signing cuts an empty file into no shard at all: nothing to list.
            if f.size == 0 && matches!(signed.method, Method::Shards { .. }) {
                continue;
            }
            return Err(SignedModelError::NotSigned {
                path: f.path.clone(),
            });
        };
        if let Method::Shards { .. } = signed.method {
            let mut at = 0u64;
            let mut tiles = true;
            for r in resources {
                match &r.range {
                    Some(range) if range.start == at => at = range.end,
                    _ => tiles = false,
                }
            }
            if !tiles || at != f.size {
                let covered = resources
                    .iter()
                    .filter_map(|r| r.range.as_ref())
                    .map(|r| format!("{}..{}", r.start, r.end))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(SignedModelError::ShardsDoNotCover {
                    path: f.path.clone(),
                    covered: if covered.is_empty() {
                        "nothing".into()
                    } else {
                        covered
                    },
                    size: f.size,
                });
            }
        }
    }
    Ok(())
}

/// Each path's resources, shards in order of their start.
pub fn resources_by_path(resources: &[Resource]) -> BTreeMap<&str, Vec<&Resource>> {
    let mut by_path: BTreeMap<&str, Vec<&Resource>> = BTreeMap::new();
    for r in resources {
        by_path.entry(r.path.as_str()).or_default().push(r);
    }
    for list in by_path.values_mut() {
        list.sort_by_key(|r| r.range.as_ref().map_or(0, |range| range.start));
    }
    by_path
}

/// The manifest a BLAKE3 bundle of whole files stands for, sizes from the listing.
pub fn manifest_from_signature(
    files: &[RemoteFile],
    signed: &Signed,
) -> Result<Manifest, crate::verify::VerifyError> {
    let by_path = resources_by_path(&signed.resources);
    let mut entries = Vec::with_capacity(files.len());
    for f in files {
        if let Some(r) = by_path.get(f.path.as_str()).and_then(|list| list.first()) {
            entries.push(ManifestEntry {
                path: f.path.clone(),
                size: f.size,
                blake3: crate::fetch::journal::hex(&r.digest),
            });
        }
    }
    Manifest::from_entries(entries)
}

/// Where a BLAKE3 bundle and the source's manifest disagree about a selected file.
pub fn disagreement(signed: &Manifest, manifest: &Manifest) -> Option<SignedModelError> {
    signed.entries().find_map(|s| {
        let m = manifest.get(&s.path)?;
        (m.blake3 != s.blake3).then(|| SignedModelError::DisagreesWithManifest {
            path: s.path.clone(),
            signed: s.blake3.clone(),
            manifest: m.blake3.clone(),
        })
    })
}

/// Why a published revision's signature no longer serves under `mode` and `trust`: required
/// and unsigned, or signed by someone no longer trusted (a key or CA the operator removed).
pub fn why_not_trusted(
    mode: SignatureMode,
    trust: &Trust,
    record: Option<&SignatureRecord>,
) -> Option<String> {
    match (mode, record) {
        (SignatureMode::Off, _) | (SignatureMode::Optional, None) => None,
        (SignatureMode::Required, None) => {
            Some("it is not signed and the model requires a signature".into())
        }
        (_, Some(record)) if !trusts(trust, &record.signer) => Some(format!(
            "it was signed by {}, which is no longer trusted",
            record.signer
        )),
        (_, Some(_)) => None,
    }
}

/// Whether `signer` is still among the trusted: the same key, or a root of that name.
fn trusts(trust: &Trust, signer: &Signer) -> bool {
    match signer {
        Signer::Key { fingerprint, .. } => {
            trust.keys.iter().any(|k| k.fingerprint() == *fingerprint)
        }
        Signer::Certificate {
            root_fingerprint, ..
        } => trust
            .roots
            .iter()
            .any(|r| r.fingerprint() == *root_fingerprint),
    }
}

/// Whether two trust lists hold the same signers.
pub fn same_trust(a: &Trust, b: &Trust) -> bool {
    let keys = |t: &Trust| -> Vec<String> {
        let mut v: Vec<String> = t.keys.iter().map(TrustedKey::fingerprint).collect();
        v.extend(
            t.roots
                .iter()
                .map(|r| format!("{}={}", r.name(), r.fingerprint())),
        );
        v.sort();
        v
    };
    keys(a) == keys(b)
}

/// What checking a published revision's signature offline found.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum PublishedSignature {
    /// The revision was published without a signature.
    Unsigned,
    /// It has one, and no trusted signer was given to check it against.
    NotChecked {
        /// What the ready marker records.
        recorded: Option<SignatureRecord>,
    },
    /// Verified: a trusted signer, and every published file's bytes are the signed ones.
    Verified {
        /// Who signed.
        signer: Signer,
        /// `sha256` or `blake3`.
        hash: String,
        /// Files checked.
        files: usize,
    },
}

/// Checks a published revision's kept signature (`.modelcache/signature.sig`) offline: the
/// bundle against `trust`, then every file the revision holds against the digests it signs,
/// read from the disk in order. The revision's files come from its ready marker.
pub async fn verify_published(
    dir: &std::path::Path,
    trust: &Trust,
) -> Result<PublishedSignature, super::PrefetchError> {
    use crate::store::{RECORDS_DIR, ReadyMarker, SIGNATURE_COPY};
    let marker = ReadyMarker::read(dir)?;
    let path = dir.join(RECORDS_DIR).join(SIGNATURE_COPY);
    let bundle = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(PublishedSignature::Unsigned);
        }
        Err(e) => return Err(super::PrefetchError::local("read", path, e)),
    };
    if trust.is_empty() {
        return Ok(PublishedSignature::NotChecked {
            recorded: marker.signature,
        });
    }
    let location = path.display().to_string();
    let signed = verify(&bundle, trust).map_err(|source| SignedModelError::Invalid {
        file: location,
        source,
    })?;
    let files: Vec<RemoteFile> = marker
        .files
        .iter()
        .map(|f| RemoteFile {
            path: f.path.clone(),
            size: f.size,
            etag: String::new(),
        })
        .collect();
    // The selection the revision was published under is not kept, so a signed file left out
    // of it is not an error here: only that every file it holds is signed.
    check_files_signed(&files, &signed)?;
    let by_path = resources_by_path(&signed.resources);
    let mut to_check = Vec::with_capacity(files.len());
    for f in &files {
        to_check.push(super::sequential::FileToCheck {
            path: f.path.clone(),
            partial: dir.join(&f.path),
            size: f.size,
            expected: by_path
                .get(f.path.as_str())
                .map(|list| {
                    list.iter()
                        .map(|r| super::sequential::Expected {
                            range: r.range.clone().unwrap_or(0..f.size),
                            digest: r.digest,
                            is_shard: r.range.is_some(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        });
    }
    let count = to_check.len();
    let sequential = Arc::new(super::sequential::Sequential::new(signed.hash, to_check));
    sequential.finish().await?;
    Ok(PublishedSignature::Verified {
        signer: signed.signer,
        hash: hash_name(signed.hash).to_string(),
        files: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> RemoteFile {
        RemoteFile {
            path: path.into(),
            size,
            etag: String::new(),
        }
    }

    fn shards(list: &[(&str, Range<u64>)]) -> Signed {
        Signed {
            model_name: "m".into(),
            signer: Signer::Key {
                name: "k".into(),
                fingerprint: "sha256:00".into(),
            },
            hash: HashType::Sha256,
            method: Method::Shards { shard_size: 10 },
            ignore_paths: Vec::new(),
            resources: list
                .iter()
                .map(|(path, range)| Resource {
                    path: (*path).into(),
                    range: Some(range.clone()),
                    digest: [0; 32],
                })
                .collect(),
        }
    }

    /// The rule: every published file signed (shards covering it exactly; an empty file has
    /// none, as the reference signer cuts it), every selected signed file in the source, signed
    /// files the selection leaves out not needed.
    #[test]
    fn every_published_file_is_signed_and_every_selected_signed_file_is_there() {
        let all = Selection::vllm_default();
        let signed = shards(&[
            ("a.safetensors", 0..10),
            ("a.safetensors", 10..15),
            ("original/x.bin", 0..3),
        ]);
        let files = [file("a.safetensors", 15), file("empty.json", 0)];
        check_coverage(&files, &signed, &all, "model.sig").unwrap();
        let gap = shards(&[("a.safetensors", 0..10), ("a.safetensors", 11..15)]);
        assert!(matches!(
            check_coverage(&files[..1], &gap, &all, "model.sig"),
            Err(SignedModelError::ShardsDoNotCover { .. })
        ));
        let short = shards(&[("a.safetensors", 0..10)]);
        assert!(matches!(
            check_coverage(&files[..1], &short, &all, "model.sig"),
            Err(SignedModelError::ShardsDoNotCover { .. })
        ));
        assert!(matches!(
            check_coverage(&[file("b.json", 2)], &signed, &all, "model.sig"),
            Err(SignedModelError::NotSigned { .. })
        ));
        let more = shards(&[("a.safetensors", 0..15), ("config.json", 0..2)]);
        assert!(matches!(
            check_coverage(&files[..1], &more, &all, "model.sig"),
            Err(SignedModelError::SignedMissing { path }) if path == "config.json"
        ));
    }
}
