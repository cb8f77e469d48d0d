//! OpenSSF Model Signing (OMS v1.0) signatures: who vouches for a model, not only that its bytes
//! arrived intact.
//!
//! A signature is a Sigstore bundle (`application/vnd.dev.sigstore.bundle.v0.3+json`) holding a
//! DSSE envelope over an in-toto Statement v1. The statement's predicate
//! (`https://model_signing/signature/v1.0`) lists every file's digest (`method: files`), or
//! every shard's (`method: shards`, `name` being `PATH:START:END`), with the hash used and the
//! paths the signer ignored; its one subject carries the SHA-256 over those digests, in order.
//!
//! This module parses a bundle (bounded: [`MAX_BUNDLE`] bytes, [`MAX_RESOURCES`] entries, every
//! name a plain relative path), checks the envelope's signature against the public keys the
//! operator trusts, checks the subject against the digests, and returns what was signed. It
//! reads no file and decides nothing about the model's files: the caller compares.

use std::ops::Range;

use aws_lc_rs::signature::{self, VerificationAlgorithm};
use base64::Engine as _;

use crate::fetch::journal::{hex, parse_hex};
use serde::Deserialize;

/// The largest bundle read: a statement listing ten thousand files is well under 2 MiB.
pub const MAX_BUNDLE: usize = 4 << 20;

/// The most files or shards a statement may list.
pub const MAX_RESOURCES: usize = 100_000;

const BUNDLE_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
];
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

/// Why a signature was not accepted, naming what in it is wrong.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// Larger than [`MAX_BUNDLE`].
    #[error("the signature is {size} bytes, more than the {limit} a model signature may have")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Not a bundle of the expected shape.
    #[error("the signature is not an OpenSSF Model Signing bundle: {0}")]
    Malformed(String),
    /// Signed with material this verifier does not take yet.
    #[error("the signature is signed with {0}, which modelcache cannot verify (sign with a key)")]
    Unsupported(&'static str),
    /// No trusted key verifies it.
    #[error(
        "the signature is not from a trusted signer: none of the {trusted} trusted keys verifies it (its key hint is {hint})"
    )]
    Untrusted {
        /// How many keys were tried.
        trusted: usize,
        /// The bundle's key hint, or `none`.
        hint: String,
    },
    /// The subject's digest does not match the listed digests.
    #[error(
        "the signed statement is inconsistent: its subject digest is {expected}, its files hash to {computed}"
    )]
    Inconsistent {
        /// The subject's.
        expected: String,
        /// Over the resources.
        computed: String,
    },
    /// A trusted key that cannot be used.
    #[error("the trusted key {name} cannot be used: {reason}")]
    BadKey {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// A public key the operator trusts, PEM `SubjectPublicKeyInfo` (ECDSA P-256, P-384 or P-521,
/// as `model_signing sign key` uses).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    name: String,
    spki: Vec<u8>,
}

impl TrustedKey {
    /// Reads `pem` (a `-----BEGIN PUBLIC KEY-----` block) as the key called `name`.
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, SignatureError> {
        let bad = |reason: &str| SignatureError::BadKey {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let body: String = pem
            .lines()
            .map(str::trim)
            .skip_while(|l| *l != "-----BEGIN PUBLIC KEY-----")
            .skip(1)
            .take_while(|l| *l != "-----END PUBLIC KEY-----")
            .collect();
        if body.is_empty() {
            return Err(bad("expected a PEM block -----BEGIN PUBLIC KEY-----"));
        }
        let spki = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| bad(&format!("its PEM body is not base64: {e}")))?;
        let key = Self {
            name: name.to_string(),
            spki,
        };
        if key.algorithm().is_none() {
            return Err(bad("it is not an ECDSA P-256, P-384 or P-521 public key"));
        }
        Ok(key)
    }

    /// The key's name, as the operator gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sha256:` and the hex SHA-256 of the key's DER encoding.
    pub fn fingerprint(&self) -> String {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &self.spki);
        format!("sha256:{}", hex(d.as_ref()))
    }

    fn signer(&self) -> Signer {
        Signer::Key {
            name: self.name.clone(),
            fingerprint: self.fingerprint(),
        }
    }

    /// The verification algorithm of this key's curve.
    fn algorithm(&self) -> Option<&'static dyn VerificationAlgorithm> {
        let candidates: [&'static dyn VerificationAlgorithm; 3] = [
            &signature::ECDSA_P256_SHA256_ASN1,
            &signature::ECDSA_P384_SHA384_ASN1,
            &signature::ECDSA_P521_SHA512_ASN1,
        ];
        candidates
            .into_iter()
            .find(|alg| signature::ParsedPublicKey::new(*alg, &self.spki).is_ok())
    }

    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        self.algorithm().is_some_and(|alg| {
            signature::UnparsedPublicKey::new(alg, &self.spki)
                .verify(message, sig)
                .is_ok()
        })
    }
}

/// Every signer the operator trusts for a model.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Public keys (`model_signing sign key`).
    pub keys: Vec<TrustedKey>,
}

impl Trust {
    /// Whether nothing is trusted: no signature can verify.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many signers are trusted, for messages.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Reads each PEM file: a `PUBLIC KEY` block is a trusted key, named after its file.
    pub fn load(paths: &[std::path::PathBuf]) -> Result<Self, SignatureError> {
        let mut trust = Self::default();
        for path in paths {
            let name = path.display().to_string();
            let pem = std::fs::read_to_string(path).map_err(|e| SignatureError::BadKey {
                name: name.clone(),
                reason: format!("cannot read it: {e}"),
            })?;
            trust.keys.push(TrustedKey::from_pem(&name, &pem)?);
        }
        Ok(trust)
    }
}

/// Who signed: the trusted key, or the certificate and the root it chains to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Signer {
    /// A trusted public key.
    Key {
        /// The key's name (its file, as configured).
        name: String,
        /// `sha256:` and the hex SHA-256 of its DER `SubjectPublicKeyInfo`.
        fingerprint: String,
    },
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key { name, fingerprint } => write!(f, "key {name} ({fingerprint})"),
        }
    }
}

/// The hash a statement's digests are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashType {
    /// SHA-256 (the tool's default, and NGC's).
    Sha256,
    /// BLAKE3: the digests modelcache computes while downloading.
    Blake3,
}

/// How the signer cut the model into resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One digest per file.
    Files,
    /// One digest per `shard_size` bytes of each file.
    Shards {
        /// Bytes per shard (the last one of a file is shorter).
        shard_size: u64,
    },
}

/// One signed digest: a whole file, or a range of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The file, relative to the model's directory, `/`-separated.
    pub path: String,
    /// For `method: shards`, the bytes it covers.
    pub range: Option<Range<u64>>,
    /// The digest (32 bytes for both hashes).
    pub digest: [u8; 32],
}

/// What a verified signature vouches for.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The model's name as the signer gave it (the directory's name).
    pub model_name: String,
    /// The trusted signer that verified it.
    pub signer: Signer,
    /// The digests' hash.
    pub hash: HashType,
    /// How the model was cut.
    pub method: Method,
    /// Paths the signer left out (prefixes, relative to the model's directory).
    pub ignore_paths: Vec<String>,
    /// Every signed digest, in the statement's order.
    pub resources: Vec<Resource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Bundle {
    media_type: String,
    verification_material: Material,
    dsse_envelope: Option<Envelope>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Material {
    public_key: Option<KeyHint>,
    certificate: Option<serde_json::Value>,
    x509_certificate_chain: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct KeyHint {
    #[serde(default)]
    hint: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload: String,
    payload_type: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Deserialize)]
struct Subject {
    name: String,
    digest: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<PredicateResource>,
}

#[derive(Deserialize)]
struct Serialization {
    method: String,
    hash_type: String,
    #[serde(default)]
    ignore_paths: Vec<String>,
    #[serde(default)]
    shard_size: Option<f64>,
}

#[derive(Deserialize)]
struct PredicateResource {
    name: String,
    algorithm: String,
    digest: String,
}

/// DSSE's pre-authentication encoding: what the signature covers.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Verifies `bundle` against `trusted` and returns what it signs.
pub fn verify(bundle: &[u8], trust: &Trust) -> Result<Signed, SignatureError> {
    let trusted = &trust.keys;
    if bundle.len() > MAX_BUNDLE {
        return Err(SignatureError::TooLarge {
            size: bundle.len(),
            limit: MAX_BUNDLE,
        });
    }
    let malformed = |what: String| SignatureError::Malformed(what);
    let parsed: Bundle = serde_json::from_slice(bundle)
        .map_err(|e| malformed(format!("not the bundle's JSON: {e}")))?;
    if !BUNDLE_MEDIA_TYPES.contains(&parsed.media_type.as_str()) {
        return Err(malformed(format!(
            "its mediaType is {:?}, not a Sigstore bundle v0.3",
            parsed.media_type
        )));
    }
    let material = &parsed.verification_material;
    if material.certificate.is_some() || material.x509_certificate_chain.is_some() {
        return Err(SignatureError::Unsupported("a certificate"));
    }
    let hint = material
        .public_key
        .as_ref()
        .map(|k| k.hint.clone())
        .ok_or_else(|| malformed("it names no verification key".to_string()))?;
    let envelope = parsed
        .dsse_envelope
        .ok_or_else(|| malformed("it holds no DSSE envelope".to_string()))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(malformed(format!(
            "its payloadType is {:?}, not {PAYLOAD_TYPE}",
            envelope.payload_type
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let payload = b64
        .decode(&envelope.payload)
        .map_err(|e| malformed(format!("its payload is not base64: {e}")))?;
    let message = pae(&envelope.payload_type, &payload);
    let signer = envelope
        .signatures
        .iter()
        .filter_map(|s| b64.decode(&s.sig).ok())
        .find_map(|sig| trusted.iter().find(|k| k.verifies(&message, &sig)))
        .map(TrustedKey::signer)
        .ok_or_else(|| SignatureError::Untrusted {
            trusted: trust.len(),
            hint: if hint.is_empty() {
                "none".into()
            } else {
                hint.clone()
            },
        })?;
    // Only now, signed by a trusted key, is the statement worth parsing.
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| malformed(format!("its statement is not in-toto JSON: {e}")))?;
    signed_statement(statement, signer)
}

fn signed_statement(statement: Statement, signer: Signer) -> Result<Signed, SignatureError> {
    let malformed = |what: String| SignatureError::Malformed(what);
    if statement.kind != STATEMENT_TYPE {
        return Err(malformed(format!(
            "its statement type is {:?}, not {STATEMENT_TYPE}",
            statement.kind
        )));
    }
    if statement.predicate_type != PREDICATE_TYPE {
        return Err(malformed(format!(
            "its predicate type is {:?}, not {PREDICATE_TYPE}",
            statement.predicate_type
        )));
    }
    let [subject] = statement.subject.as_slice() else {
        return Err(malformed(format!(
            "it has {} subjects, not one",
            statement.subject.len()
        )));
    };
    let serialization = &statement.predicate.serialization;
    let hash = match serialization.hash_type.as_str() {
        "sha256" => HashType::Sha256,
        "blake3" => HashType::Blake3,
        other => {
            return Err(malformed(format!(
                "its hash_type {other:?} is not sha256 or blake3"
            )));
        }
    };
    let method = match serialization.method.as_str() {
        "files" => Method::Files,
        "shards" => {
            let size = serialization.shard_size.unwrap_or(0.0);
            if !((1.0..=1e15).contains(&size) && size.fract() == 0.0) {
                return Err(malformed(format!(
                    "its shard_size {size} is not a whole number of bytes"
                )));
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "checked above"
            )]
            Method::Shards {
                shard_size: size as u64,
            }
        }
        other => {
            return Err(malformed(format!(
                "its method {other:?} is not files or shards"
            )));
        }
    };
    let resources = &statement.predicate.resources;
    if resources.len() > MAX_RESOURCES {
        return Err(malformed(format!(
            "it lists {} files or shards, more than {MAX_RESOURCES}",
            resources.len()
        )));
    }
    let mut root = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut out = Vec::with_capacity(resources.len());
    for r in resources {
        let digest = parse_hex(&r.digest)
            .ok_or_else(|| malformed(format!("the digest of {:?} is not 64 hex digits", r.name)))?;
        root.update(&digest);
        let expected_algorithm = match (method, hash) {
            (Method::Files, HashType::Sha256) => "sha256".to_string(),
            (Method::Files, HashType::Blake3) => "blake3".to_string(),
            (Method::Shards { shard_size }, h) => format!(
                "{}-sharded-{shard_size}",
                if h == HashType::Sha256 {
                    "sha256"
                } else {
                    "blake3"
                }
            ),
        };
        if r.algorithm != expected_algorithm {
            return Err(malformed(format!(
                "{:?} is hashed with {:?}, not the statement's {expected_algorithm}",
                r.name, r.algorithm
            )));
        }
        let (path, range) = match method {
            Method::Files => (r.name.as_str(), None),
            Method::Shards { .. } => {
                let (path, range) = shard_name(&r.name).ok_or_else(|| {
                    malformed(format!("the shard {:?} is not PATH:START:END", r.name))
                })?;
                (path, Some(range))
            }
        };
        if let Err(e) = crate::source::validate_name(path) {
            return Err(malformed(format!("it lists an unsafe name: {e}")));
        }
        out.push(Resource {
            path: path.to_string(),
            range,
            digest,
        });
    }
    let computed = hex(root.finish().as_ref());
    let expected = subject.digest.get("sha256").cloned().unwrap_or_default();
    if computed != expected.to_ascii_lowercase() {
        return Err(SignatureError::Inconsistent { expected, computed });
    }
    Ok(Signed {
        model_name: subject.name.clone(),
        signer,
        hash,
        method,
        ignore_paths: serialization.ignore_paths.clone(),
        resources: out,
    })
}

/// `PATH:START:END`, the path possibly holding colons itself.
fn shard_name(name: &str) -> Option<(&str, Range<u64>)> {
    let (rest, end) = name.rsplit_once(':')?;
    let (path, start) = rest.rsplit_once(':')?;
    let (start, end) = (start.parse().ok()?, end.parse().ok()?);
    (start < end).then_some((path, start..end))
}

#[cfg(test)]
mod tests {
    //! Against bundles the OMS reference signer (`model_signing` 1.1.1) made for the model in
    //! `fixtures/oms/model` with the key whose public half is `fixtures/oms/key.pub.pem`.

    use super::*;

    const SHA256: &[u8] = include_bytes!("fixtures/oms/sha256.sig");
    const BLAKE3: &[u8] = include_bytes!("fixtures/oms/blake3.sig");
    const SHARDS: &[u8] = include_bytes!("fixtures/oms/shards.sig");
    const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/verify/fixtures/oms/model");

    fn key(name: &str) -> TrustedKey {
        let pem = match name {
            "publisher" => include_str!("fixtures/oms/key.pub.pem"),
            _ => include_str!("fixtures/oms/other.pub.pem"),
        };
        TrustedKey::from_pem(name, pem).unwrap()
    }

    fn trust(keys: Vec<TrustedKey>) -> Trust {
        Trust { keys }
    }

    fn file_digest(path: &str, hash: HashType) -> [u8; 32] {
        let bytes = std::fs::read(format!("{MODEL}/{path}")).unwrap();
        match hash {
            HashType::Blake3 => *blake3::hash(&bytes).as_bytes(),
            HashType::Sha256 => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
                .as_ref()
                .try_into()
                .unwrap(),
        }
    }

    #[test]
    fn the_reference_signers_bundles_verify_and_list_the_files_digests() {
        for (bundle, hash) in [(SHA256, HashType::Sha256), (BLAKE3, HashType::Blake3)] {
            let signed = verify(bundle, &trust(vec![key("other"), key("publisher")])).unwrap();
            assert!(
                matches!(&signed.signer, Signer::Key { name, fingerprint } if name == "publisher" && fingerprint.starts_with("sha256:")),
                "{}",
                signed.signer
            );
            assert_eq!(signed.model_name, "model");
            assert_eq!(signed.hash, hash);
            assert_eq!(signed.method, Method::Files);
            assert!(signed.ignore_paths.iter().any(|p| p == ".git"));
            let paths: Vec<&str> = signed.resources.iter().map(|r| r.path.as_str()).collect();
            assert_eq!(paths, ["config.json", "model-00001-of-00001.safetensors"]);
            for r in &signed.resources {
                assert_eq!(r.digest, file_digest(&r.path, hash), "{}", r.path);
            }
        }
    }

    #[test]
    fn a_sharded_bundle_lists_each_range() {
        let signed = verify(SHARDS, &trust(vec![key("publisher")])).unwrap();
        assert_eq!(signed.method, Method::Shards { shard_size: 1000 });
        let shards: Vec<(&str, Range<u64>)> = signed
            .resources
            .iter()
            .map(|r| (r.path.as_str(), r.range.clone().unwrap()))
            .collect();
        assert_eq!(
            shards,
            [
                ("config.json", 0..40),
                ("model-00001-of-00001.safetensors", 0..1000),
                ("model-00001-of-00001.safetensors", 1000..2000),
                ("model-00001-of-00001.safetensors", 2000..2048),
            ]
        );
        let bytes = std::fs::read(format!("{MODEL}/model-00001-of-00001.safetensors")).unwrap();
        let second = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes[1000..2000]);
        assert_eq!(signed.resources[2].digest.as_slice(), second.as_ref());
    }

    #[test]
    fn an_untrusted_key_a_changed_statement_and_hostile_bytes_are_refused() {
        assert!(matches!(
            verify(SHA256, &trust(vec![key("other")])),
            Err(SignatureError::Untrusted { trusted: 1, .. })
        ));
        assert!(matches!(
            verify(SHA256, &trust(vec![])),
            Err(SignatureError::Untrusted { .. })
        ));
        // One digest changed in the payload: the signature no longer covers it.
        let mut bundle: serde_json::Value = serde_json::from_slice(SHA256).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64
            .decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let text = String::from_utf8(payload).unwrap();
        let real = hex(&file_digest("config.json", HashType::Sha256));
        let forged = text.replace(&real, &"0".repeat(64));
        assert_ne!(forged, text);
        bundle["dsseEnvelope"]["payload"] = b64.encode(forged).into();
        let forged = serde_json::to_vec(&bundle).unwrap();
        assert!(matches!(
            verify(&forged, &trust(vec![key("publisher")])),
            Err(SignatureError::Untrusted { .. })
        ));
        // Another payload type, even with the same bytes.
        let mut other: serde_json::Value = serde_json::from_slice(SHA256).unwrap();
        other["dsseEnvelope"]["payloadType"] = "application/json".into();
        let e = verify(
            &serde_json::to_vec(&other).unwrap(),
            &trust(vec![key("publisher")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("payloadType"), "{e}");
        // Truncated, oversized, not JSON.
        assert!(matches!(
            verify(&SHA256[..SHA256.len() / 2], &trust(vec![key("publisher")])),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(&vec![b' '; MAX_BUNDLE + 1], &trust(vec![key("publisher")])),
            Err(SignatureError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_signed_statement_is_checked_before_it_is_believed() {
        let statement = |resources: serde_json::Value, root: &str| -> Statement {
            serde_json::from_value(serde_json::json!({
                "_type": STATEMENT_TYPE,
                "subject": [{"name": "m", "digest": {"sha256": root}}],
                "predicateType": PREDICATE_TYPE,
                "predicate": {
                    "serialization": {"method": "files", "hash_type": "sha256", "ignore_paths": []},
                    "resources": resources,
                },
            }))
            .unwrap()
        };
        let digest = "ab".repeat(32);
        let root = hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &[0xab; 32]).as_ref());
        for (name, says) in [
            ("../etc/passwd", "../etc/passwd"),
            ("/etc/passwd", "/etc/passwd"),
            ("a/../../b", "a/../../b"),
        ] {
            let e = signed_statement(
                statement(
                    serde_json::json!([{"name": name, "algorithm": "sha256", "digest": digest}]),
                    &root,
                ),
                key("publisher").signer(),
            )
            .unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let e = signed_statement(
            statement(
                serde_json::json!([{"name": "a", "algorithm": "sha256", "digest": digest}]),
                &"00".repeat(32),
            ),
            key("publisher").signer(),
        )
        .unwrap_err();
        assert!(matches!(e, SignatureError::Inconsistent { .. }), "{e}");
        let ok = signed_statement(
            statement(
                serde_json::json!([{"name": "a", "algorithm": "sha256", "digest": digest}]),
                &root,
            ),
            key("publisher").signer(),
        )
        .unwrap();
        assert_eq!(ok.resources[0].path, "a");
    }

    #[test]
    fn shard_names_and_keys_are_parsed_strictly() {
        assert_eq!(shard_name("a:b.bin:0:10"), Some(("a:b.bin", 0..10)));
        assert_eq!(shard_name("x:10:10"), None);
        assert_eq!(shard_name("x:1"), None);
        assert!(TrustedKey::from_pem("k", "not a key").is_err());
        assert!(
            TrustedKey::from_pem(
                "k",
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"
            )
            .is_err()
        );
    }
}
