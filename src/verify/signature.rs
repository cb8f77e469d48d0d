//! OpenSSF Model Signing (OMS v1.0) signatures: who vouches for a model, not only that its bytes
//! arrived intact.
//!
//! A signature is a Sigstore bundle (`application/vnd.dev.sigstore.bundle.v0.3+json`) holding a
//! DSSE envelope over an in-toto Statement v1. The statement's predicate
//! (`https://model_signing/signature/v1.0`) lists every file's digest (`method: files`), or
//! every shard's (`method: shards`, `name` being `PATH:START:END`), with the hash used and the
//! paths the signer ignored; its one subject carries the SHA-256 over those digests, in order.
//!
//! This module parses a bundle (bounded: [`MAX_BUNDLE`] bytes, [`MAX_RESOURCES`] entries,
//! [`MAX_CHAIN`] certificates, [`MAX_SIGNATURES`] signatures, every name a plain relative path), checks the envelope's
//! signature against what the operator trusts ([`Trust`]: public keys, as `model_signing sign
//! key` uses, and root CA certificates, for bundles `model_signing sign certificate` makes with
//! a certificate chain), checks the subject against the digests, and returns what was signed and
//! by whom. It reads no file but the trust it is given to load, and decides nothing about the
//! model's files: the caller compares. Sigstore keyless bundles (a Fulcio certificate logged in
//! Rekor) are refused: they need Sigstore's own trust root and transparency log.

use std::ops::Range;
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{self, VerificationAlgorithm};
use base64::Engine as _;
use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};

use crate::fetch::journal::{hex, parse_hex};
use serde::Deserialize;

/// The largest bundle read: a statement listing ten thousand files is well under 2 MiB.
pub const MAX_BUNDLE: usize = 4 << 20;

/// The most files or shards a statement may list.
pub const MAX_RESOURCES: usize = 100_000;

/// The most certificates a bundle's chain may hold, the signing certificate included.
pub const MAX_CHAIN: usize = 16;

/// The most signatures an envelope may hold: each costs an ECDSA verification per trusted key.
pub const MAX_SIGNATURES: usize = 16;

const BUNDLE_MEDIA_TYPES: [&str; 2] = [
    "application/vnd.dev.sigstore.bundle.v0.3+json",
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
];
const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
const PREDICATE_TYPE: &str = "https://model_signing/signature/v1.0";

/// Why Sigstore keyless bundles are refused, with what to do instead.
const KEYLESS: &str = "checking it needs the Sigstore trusted root, a Rekor inclusion proof and \
    an identity policy, none of which modelcache has (hint: sign with a key, `model_signing sign \
    key`, or with a certificate chain, `model_signing sign certificate`)";

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
    /// Signed with material this verifier cannot check, such as a Sigstore keyless certificate.
    #[error("the signature is signed with {material}, which modelcache cannot verify: {reason}")]
    Unsupported {
        /// What it is signed with.
        material: &'static str,
        /// Why that cannot be checked, and what to sign with instead.
        reason: &'static str,
    },
    /// No trusted key verifies a bundle that names a public key.
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
    /// A certificate of the bundle's chain is not X.509 DER that can be read.
    #[error(
        "certificate {index} of the signature's chain (0 is the signing certificate) is malformed: {reason}"
    )]
    MalformedCertificate {
        /// Its position in the bundle's chain.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The signing certificate does not chain to a trusted root through the bundle's
    /// intermediate certificates, and no trusted key verifies the signature either.
    #[error("the signing certificate {subject} is outside the configured chain: {reason}")]
    OutsideChain {
        /// The signing certificate's subject.
        subject: String,
        /// Why no path to a trusted root verifies.
        reason: String,
    },
    /// A certificate of the chain, or the trusted root it ends in, has expired.
    #[error(
        "the certificate {certificate} in the signature's chain expired at {}, and it is now {}",
        rfc3339(not_after),
        rfc3339(now)
    )]
    CertificateExpired {
        /// Its subject (and, for a trusted root, its name).
        certificate: String,
        /// When it stopped being valid.
        not_after: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// A certificate of the chain, or the trusted root it ends in, is not valid yet.
    #[error(
        "the certificate {certificate} in the signature's chain is valid only from {}, and it is now {}",
        rfc3339(not_before),
        rfc3339(now)
    )]
    CertificateNotYetValid {
        /// Its subject (and, for a trusted root, its name).
        certificate: String,
        /// When it starts being valid.
        not_before: SystemTime,
        /// The time it was checked at.
        now: SystemTime,
    },
    /// The signing certificate chains to a trusted root but may not sign: see
    /// [`verify`] for the rule.
    #[error(
        "the signing certificate {subject} is not for code signing: its key usage lacks digitalSignature and its extended key usage lacks codeSigning"
    )]
    NotForCodeSigning {
        /// The signing certificate's subject.
        subject: String,
    },
    /// The signing certificate chains to a trusted root, but the envelope's signature does not
    /// verify with its key: the statement was changed, or another key signed it.
    #[error(
        "the signature does not verify with the key of its signing certificate {subject} ({fingerprint})"
    )]
    NotSignedByCertificate {
        /// The signing certificate's subject.
        subject: String,
        /// `sha256:` and the hex SHA-256 of its DER encoding.
        fingerprint: String,
    },
    /// A trusted key or root certificate that cannot be used.
    #[error("the trusted key {name} cannot be used: {reason}")]
    BadKey {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
}

fn rfc3339(t: &SystemTime) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(*t)
}

/// `sha256:` and the hex SHA-256 of `der`.
fn fingerprint(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    format!("sha256:{}", hex(d.as_ref()))
}

/// The verification algorithm of an ECDSA P-256, P-384 or P-521 `SubjectPublicKeyInfo`, each
/// curve with its own hash, as the reference signer and verifier use them.
fn ecdsa_algorithm(spki: &[u8]) -> Option<&'static dyn VerificationAlgorithm> {
    let candidates: [&'static dyn VerificationAlgorithm; 3] = [
        &signature::ECDSA_P256_SHA256_ASN1,
        &signature::ECDSA_P384_SHA384_ASN1,
        &signature::ECDSA_P521_SHA512_ASN1,
    ];
    candidates
        .into_iter()
        .find(|alg| signature::ParsedPublicKey::new(*alg, spki).is_ok())
}

/// Whether `sig` is an ECDSA signature of `message` by the key `spki`.
fn ecdsa_verifies(spki: &[u8], message: &[u8], sig: &[u8]) -> bool {
    ecdsa_algorithm(spki).is_some_and(|alg| {
        signature::UnparsedPublicKey::new(alg, spki)
            .verify(message, sig)
            .is_ok()
    })
}

/// The DER of the first `-----BEGIN {label}-----` block in `pem`, the trusted signer `name`.
fn first_pem_block(name: &str, pem: &str, label: &str) -> Result<Vec<u8>, SignatureError> {
    let bad = |reason: String| SignatureError::BadKey {
        name: name.to_string(),
        reason,
    };
    pem_blocks(pem)
        .map_err(bad)?
        .into_iter()
        .find_map(|(found, der)| (found == label).then_some(der))
        .ok_or_else(|| bad(format!("expected a PEM block -----BEGIN {label}-----")))
}

/// The PEM blocks of `text`, label and decoded body, in order; text around them is ignored.
fn pem_blocks(text: &str) -> Result<Vec<(&str, Vec<u8>)>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end {
                closed = true;
                break;
            }
            body.push_str(line);
        }
        if !closed {
            return Err(format!("its PEM block {label} has no line {end}"));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("the body of its PEM block {label} is not base64: {e}"))?;
        blocks.push((label, der));
    }
    Ok(blocks)
}

/// A public key the operator trusts, PEM `SubjectPublicKeyInfo` (ECDSA P-256, P-384 or P-521,
/// as `model_signing sign key` uses).
#[derive(Debug, Clone)]
pub struct TrustedKey {
    name: String,
    spki: Vec<u8>,
}

impl TrustedKey {
    /// Reads `pem` (its first `-----BEGIN PUBLIC KEY-----` block) as the key called `name`.
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, SignatureError> {
        Self::from_der(name, first_pem_block(name, pem, "PUBLIC KEY")?)
    }

    /// Takes `spki`, a DER `SubjectPublicKeyInfo`, as the key called `name`.
    pub fn from_der(name: &str, spki: Vec<u8>) -> Result<Self, SignatureError> {
        if ecdsa_algorithm(&spki).is_none() {
            return Err(SignatureError::BadKey {
                name: name.to_string(),
                reason: "it is not an ECDSA P-256, P-384 or P-521 public key".to_string(),
            });
        }
        Ok(Self {
            name: name.to_string(),
            spki,
        })
    }

    /// The key's name, as the operator gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `sha256:` and the hex SHA-256 of the key's DER encoding.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.spki)
    }

    fn signer(&self) -> Signer {
        Signer::Key {
            name: self.name.clone(),
            fingerprint: self.fingerprint(),
        }
    }

    fn verifies(&self, message: &[u8], sig: &[u8]) -> bool {
        ecdsa_verifies(&self.spki, message, sig)
    }
}

/// A CA certificate the operator trusts: a bundle's signing certificate that chains to it,
/// through the bundle's intermediate certificates, may sign models.
///
/// It is trusted as it is, self-signed or not (a trusted intermediate ends a chain as well as
/// its root would), but only within its own validity.
#[derive(Clone)]
pub struct TrustedRoot {
    name: String,
    der: Vec<u8>,
    anchor: TrustAnchor<'static>,
    subject: String,
    not_before: u64,
    not_after: u64,
}

impl std::fmt::Debug for TrustedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedRoot")
            .field("name", &self.name)
            .field("subject", &self.subject)
            .field("fingerprint", &self.fingerprint())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl TrustedRoot {
    /// Reads `pem` (its first `-----BEGIN CERTIFICATE-----` block) as the root called `name`.
    pub fn from_pem(name: &str, pem: &str) -> Result<Self, SignatureError> {
        Self::from_der(name, first_pem_block(name, pem, "CERTIFICATE")?)
    }

    /// Takes `der`, a DER X.509 certificate, as the root called `name`.
    pub fn from_der(name: &str, der: Vec<u8>) -> Result<Self, SignatureError> {
        let bad = |reason: String| SignatureError::BadKey {
            name: name.to_string(),
            reason,
        };
        let anchor = webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice()))
            .map_err(|e| {
                bad(format!(
                    "it is not an X.509 certificate: {}",
                    unreadable(&e)
                ))
            })?
            .to_owned();
        let (not_before, not_after) = x509::fields(&der)
            .map(|f| (f.not_before, f.not_after))
            .ok_or_else(|| bad("its validity dates cannot be read".to_string()))?;
        Ok(Self {
            name: name.to_string(),
            subject: x509::name(&anchor.subject),
            anchor,
            der,
            not_before,
            not_after,
        })
    }

    /// The root's name, as the operator gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root's subject, RFC 4514 style (`CN=…,O=…`).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// `sha256:` and the hex SHA-256 of the certificate's DER encoding.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    /// The trust anchor, borrowed, for one verification.
    fn anchor(&self) -> TrustAnchor<'_> {
        TrustAnchor {
            subject: self.anchor.subject.as_ref().into(),
            subject_public_key_info: self.anchor.subject_public_key_info.as_ref().into(),
            name_constraints: self
                .anchor
                .name_constraints
                .as_ref()
                .map(|n| n.as_ref().into()),
        }
    }

    /// Why the root is not valid at `now`, as webpki says it of the chain's certificates.
    fn validity_error(&self, now: UnixTime) -> Option<webpki::Error> {
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        if now.as_secs() < self.not_before {
            Some(webpki::Error::CertNotValidYet {
                time: now,
                not_before: at(self.not_before),
            })
        } else if now.as_secs() > self.not_after {
            Some(webpki::Error::CertExpired {
                time: now,
                not_after: at(self.not_after),
            })
        } else {
            None
        }
    }
}

/// Every signer the operator trusts for a model.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// Public keys (`model_signing sign key`).
    pub keys: Vec<TrustedKey>,
    /// CA certificates (`model_signing sign certificate`).
    pub roots: Vec<TrustedRoot>,
}

impl Trust {
    /// Whether nothing is trusted: no signature can verify.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.roots.is_empty()
    }

    /// How many signers (keys and roots) are trusted, for messages.
    pub fn len(&self) -> usize {
        self.keys.len() + self.roots.len()
    }

    /// Reads each PEM file: every `PUBLIC KEY` block is a trusted key and every `CERTIFICATE`
    /// block a trusted root; other blocks are ignored, and a file with neither is an error.
    ///
    /// Each is named after its file, `FILE`, or `FILE#N` (from 1, counting keys and
    /// certificates apart) where the file holds several of its kind.
    pub fn load(paths: &[std::path::PathBuf]) -> Result<Self, SignatureError> {
        let mut trust = Self::default();
        for path in paths {
            let name = path.display().to_string();
            let bad = |reason: String| SignatureError::BadKey {
                name: name.clone(),
                reason,
            };
            let pem =
                std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
            let blocks = pem_blocks(&pem).map_err(bad)?;
            let of_kind = |kind: &str| -> Vec<Vec<u8>> {
                blocks
                    .iter()
                    .filter(|(label, _)| *label == kind)
                    .map(|(_, der)| der.clone())
                    .collect()
            };
            let (keys, certs) = (of_kind("PUBLIC KEY"), of_kind("CERTIFICATE"));
            if keys.is_empty() && certs.is_empty() {
                return Err(bad(
                    "it holds no PEM block -----BEGIN PUBLIC KEY----- or -----BEGIN CERTIFICATE-----"
                        .to_string(),
                ));
            }
            let numbered = |i: usize, of: usize| {
                if of == 1 {
                    name.clone()
                } else {
                    format!("{name}#{}", i + 1)
                }
            };
            let key_count = keys.len();
            for (i, der) in keys.into_iter().enumerate() {
                trust
                    .keys
                    .push(TrustedKey::from_der(&numbered(i, key_count), der)?);
            }
            let cert_count = certs.len();
            for (i, der) in certs.into_iter().enumerate() {
                trust
                    .roots
                    .push(TrustedRoot::from_der(&numbered(i, cert_count), der)?);
            }
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
    /// A certificate that chains to a trusted root.
    Certificate {
        /// The signing certificate's subject, RFC 4514 style (`CN=…,OU=…,O=…`).
        subject: String,
        /// The name of the trusted root it chains to (its file, as configured).
        root: String,
        /// `sha256:` and the hex SHA-256 of that root's DER encoding: what stays trusted is
        /// this root, not whatever its file holds later.
        root_fingerprint: String,
        /// `sha256:` and the hex SHA-256 of the signing certificate's DER encoding.
        fingerprint: String,
    },
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key { name, fingerprint } => write!(f, "key {name} ({fingerprint})"),
            Self::Certificate {
                subject,
                root,
                fingerprint,
                ..
            } => write!(f, "certificate {subject} ({fingerprint}) under {root}"),
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
    certificate: Option<serde::de::IgnoredAny>,
    x509_certificate_chain: Option<CertificateChain>,
    tlog_entries: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct KeyHint {
    #[serde(default)]
    hint: String,
}

#[derive(Deserialize)]
struct CertificateChain {
    certificates: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCertificate {
    raw_bytes: String,
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

/// Verifies `bundle` against `trust` and returns what it signs.
///
/// A signature is accepted when a trusted key verifies it, whatever the bundle names, or when
/// the bundle holds a certificate chain (`verificationMaterial.x509CertificateChain`, the
/// signing certificate first, as `model_signing sign certificate` writes it) and:
///
/// - the signing certificate chains to one of `trust.roots` through the bundle's other
///   certificates, checked by webpki at the current time: every certificate of the path, the
///   trusted root included, must be valid now, every issuer a CA within its path length and
///   name constraints, and no certificate may carry a critical extension webpki does not know.
///   A certificate in the bundle is never trusted for being there, even self-signed;
/// - the signing certificate may sign, by the reference verifier's rule (`model_signing` 1.1.1,
///   `sign_certificate.Verifier._verify_certificates`): its key usage has `digitalSignature`,
///   or its extended key usage has `codeSigning` (1.3.6.1.5.5.7.3.3). Like the reference, no
///   extended key usage is required of the chain (it asks OpenSSL for no purpose), so webpki is
///   asked for none either;
/// - its ECDSA P-256, P-384 or P-521 key verifies the envelope's signature.
///
/// Where this differs from the reference verifier:
///
/// - time: the reference checks the chain at the signing certificate's `notBefore`, so an
///   expired certificate verifies there for ever. A bundle holds no timestamp that proves when
///   it was signed, so here the chain must be valid now, and a model signed with a certificate
///   that has since expired must be signed again;
/// - webpki refuses a CA certificate as the signing certificate, and X.509 v1 or v2
///   intermediates, which OpenSSL accepts;
/// - webpki ends a chain at any trusted certificate (a trusted intermediate will do), where
///   OpenSSL wants a self-signed one: trust goes no further than the operator put it;
/// - every signature of the envelope is tried, where the reference tries the first.
///
/// Sigstore keyless bundles (a Fulcio `certificate`, or a chain with transparency log entries)
/// are refused as [`SignatureError::Unsupported`].
pub fn verify(bundle: &[u8], trust: &Trust) -> Result<Signed, SignatureError> {
    verify_at(bundle, trust, SystemTime::now())
}

/// How a bundle says it was signed.
enum Claim {
    /// A public key, with the bundle's hint for it.
    Key(String),
    /// A certificate chain, the signing certificate first, each certificate DER.
    Chain(Vec<Vec<u8>>),
}

/// [`verify`], with certificates checked at `now`.
fn verify_at(bundle: &[u8], trust: &Trust, now: SystemTime) -> Result<Signed, SignatureError> {
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
    let b64 = base64::engine::general_purpose::STANDARD;
    let material = parsed.verification_material;
    let logged = material.tlog_entries.is_some_and(|t| !t.is_empty());
    if material.certificate.is_some() {
        return Err(SignatureError::Unsupported {
            material: "a Sigstore keyless certificate (Fulcio)",
            reason: KEYLESS,
        });
    }
    let material = match (material.public_key, material.x509_certificate_chain) {
        (Some(_), Some(_)) => {
            return Err(malformed(
                "it names both a public key and a certificate chain".to_string(),
            ));
        }
        (None, None) => {
            return Err(malformed(
                "it names no verification key or certificate chain".to_string(),
            ));
        }
        (Some(key), None) => Claim::Key(key.hint),
        (None, Some(_)) if logged => {
            return Err(SignatureError::Unsupported {
                material: "a certificate chain logged in a transparency log (Sigstore keyless)",
                reason: KEYLESS,
            });
        }
        (None, Some(chain)) => {
            if chain.certificates.is_empty() || chain.certificates.len() > MAX_CHAIN {
                return Err(malformed(format!(
                    "its certificate chain holds {} certificates, not 1 to {MAX_CHAIN}",
                    chain.certificates.len()
                )));
            }
            let ders = chain
                .certificates
                .iter()
                .enumerate()
                .map(|(index, c)| {
                    b64.decode(&c.raw_bytes)
                        .map_err(|e| SignatureError::MalformedCertificate {
                            index,
                            reason: format!("its rawBytes are not base64: {e}"),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Claim::Chain(ders)
        }
    };
    let envelope = parsed
        .dsse_envelope
        .ok_or_else(|| malformed("it holds no DSSE envelope".to_string()))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(malformed(format!(
            "its payloadType is {:?}, not {PAYLOAD_TYPE}",
            envelope.payload_type
        )));
    }
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(malformed(format!(
            "its envelope holds {} signatures, more than {MAX_SIGNATURES}",
            envelope.signatures.len()
        )));
    }
    let payload = b64
        .decode(&envelope.payload)
        .map_err(|e| malformed(format!("its payload is not base64: {e}")))?;
    let message = pae(&envelope.payload_type, &payload);
    let sigs: Vec<Vec<u8>> = envelope
        .signatures
        .iter()
        .filter_map(|s| b64.decode(&s.sig).ok())
        .collect();
    let by_key = sigs
        .iter()
        .find_map(|sig| trust.keys.iter().find(|k| k.verifies(&message, sig)))
        .map(TrustedKey::signer);
    let signer = match (by_key, material) {
        (Some(signer), _) => signer,
        (None, Claim::Key(hint)) => {
            return Err(SignatureError::Untrusted {
                trusted: trust.keys.len(),
                hint: if hint.is_empty() { "none".into() } else { hint },
            });
        }
        (None, Claim::Chain(ders)) => {
            certificate_signer(&ders, &trust.roots, now, &message, &sigs)?
        }
    };
    // Only now, signed by a trusted signer, is the statement worth parsing.
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| malformed(format!("its statement is not in-toto JSON: {e}")))?;
    signed_statement(statement, signer)
}

/// No extended key usage asked of any certificate of the path (see [`verify`]); webpki still
/// checks each certificate's extension is well formed.
#[derive(Debug, Clone, Copy)]
struct AnyPurpose;

impl webpki::ExtendedKeyUsageValidator for AnyPurpose {
    fn validate(&self, purposes: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in purposes {
            purpose?;
        }
        Ok(())
    }
}

/// One certificate of a bundle's chain, read.
struct ChainCertificate<'a> {
    cert: webpki::EndEntityCert<'a>,
    subject: String,
    fields: x509::Fields<'a>,
}

/// The signer of `message` by the certificate chain `ders` (see [`verify`] for the rules), or
/// why there is none.
fn certificate_signer(
    ders: &[Vec<u8>],
    roots: &[TrustedRoot],
    now: SystemTime,
    message: &[u8],
    sigs: &[Vec<u8>],
) -> Result<Signer, SignatureError> {
    let ders: Vec<CertificateDer<'_>> = ders
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let mut chain = Vec::with_capacity(ders.len());
    for (index, der) in ders.iter().enumerate() {
        let bad = |reason: String| SignatureError::MalformedCertificate { index, reason };
        let cert = webpki::EndEntityCert::try_from(der).map_err(|e| bad(unreadable(&e)))?;
        let fields = x509::fields(der)
            .ok_or_else(|| bad("its validity or extensions cannot be read".to_string()))?;
        chain.push(ChainCertificate {
            subject: x509::name(cert.subject()),
            cert,
            fields,
        });
    }
    let [leaf, ..] = chain.as_slice() else {
        return Err(SignatureError::Malformed(
            "its certificate chain is empty".to_string(),
        ));
    };
    let anchors: Vec<TrustAnchor<'_>> = roots.iter().map(TrustedRoot::anchor).collect();
    let root_of = |anchor: &TrustAnchor<'_>| {
        anchors
            .iter()
            .position(|a| std::ptr::addr_eq(a, anchor))
            .and_then(|i| roots.get(i))
    };
    let unix_now = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    // webpki does not check the trust anchor's own dates; OpenSSL, the reference's, does.
    let root_is_valid = |path: &webpki::VerifiedPath<'_>| match root_of(path.anchor()) {
        Some(root) => root.validity_error(unix_now).map_or(Ok(()), Err),
        None => Err(webpki::Error::UnknownIssuer),
    };
    let path = leaf
        .cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            ders.get(1..).unwrap_or_default(),
            unix_now,
            AnyPurpose,
            None,
            Some(&root_is_valid),
        )
        .map_err(|e| chain_error(&e, &chain, roots, now))?;
    let root = root_of(path.anchor()).ok_or_else(|| SignatureError::OutsideChain {
        subject: leaf.subject.clone(),
        reason: "webpki ended its chain at a root that is not configured".to_string(),
    })?;
    if !leaf.fields.may_sign() {
        return Err(SignatureError::NotForCodeSigning {
            subject: leaf.subject.clone(),
        });
    }
    let spki = leaf.cert.subject_public_key_info();
    if ecdsa_algorithm(spki.as_ref()).is_none() {
        return Err(SignatureError::Unsupported {
            material: "a certificate whose key is not ECDSA P-256, P-384 or P-521",
            reason: "model signatures are ECDSA signatures, as the reference signer makes them",
        });
    }
    let fingerprint = fingerprint(leaf.cert.der().as_ref());
    if !sigs
        .iter()
        .any(|sig| ecdsa_verifies(spki.as_ref(), message, sig))
    {
        return Err(SignatureError::NotSignedByCertificate {
            subject: leaf.subject.clone(),
            fingerprint,
        });
    }
    Ok(Signer::Certificate {
        subject: leaf.subject.clone(),
        root: root.name.clone(),
        root_fingerprint: root.fingerprint(),
        fingerprint,
    })
}

/// Why webpki cannot read a certificate.
fn unreadable(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::MalformedExtensions => {
            "it is not valid DER X.509".to_string()
        }
        E::UnsupportedCertVersion => "it is not an X.509 v3 certificate".to_string(),
        E::UnsupportedCriticalExtension => {
            "it has a critical extension modelcache cannot check".to_string()
        }
        other => format!("webpki cannot read it ({other:?})"),
    }
}

/// The error webpki's `e`, found building the path of `chain` to `roots`, stands for.
fn chain_error(
    e: &webpki::Error,
    chain: &[ChainCertificate<'_>],
    roots: &[TrustedRoot],
    now: SystemTime,
) -> SignatureError {
    use webpki::Error as E;
    let at = |t: UnixTime| SystemTime::UNIX_EPOCH + Duration::from_secs(t.as_secs());
    // webpki says when, not which: the certificate with that date.
    let which =
        |date: UnixTime, of: fn(&x509::Fields<'_>) -> u64, of_root: fn(&TrustedRoot) -> u64| {
            chain
                .iter()
                .find(|c| of(&c.fields) == date.as_secs())
                .map(|c| c.subject.clone())
                .or_else(|| {
                    roots
                        .iter()
                        .find(|r| of_root(r) == date.as_secs())
                        .map(|r| format!("{} (the trusted root {})", r.subject, r.name))
                })
                .unwrap_or_else(|| "(unidentified)".to_string())
        };
    let roots_count = roots.len();
    let reason = match e {
        E::CertExpired { not_after, .. } => {
            return SignatureError::CertificateExpired {
                certificate: which(*not_after, |f| f.not_after, |r| r.not_after),
                not_after: at(*not_after),
                now,
            };
        }
        E::CertNotValidYet { not_before, .. } => {
            return SignatureError::CertificateNotYetValid {
                certificate: which(*not_before, |f| f.not_before, |r| r.not_before),
                not_before: at(*not_before),
                now,
            };
        }
        E::UnknownIssuer => format!(
            "none of the {roots_count} trusted roots issued it or an intermediate certificate of the bundle"
        ),
        E::InvalidSignatureForPublicKey => {
            "a signature in its chain does not verify: a certificate \
            was changed, or another CA of the same name issued it"
                .to_string()
        }
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | E::SignatureAlgorithmMismatch => {
            "a certificate of its chain is signed with an algorithm webpki does not take"
                .to_string()
        }
        E::CaUsedAsEndEntity => "it is a CA certificate, not a signer's".to_string(),
        E::EndEntityUsedAsCa => "a certificate that is not a CA's issued another".to_string(),
        E::PathLenConstraintViolated => {
            "its chain is longer than a CA's path length constraint allows".to_string()
        }
        E::NameConstraintViolation => "a CA's name constraints exclude it".to_string(),
        E::UnsupportedCriticalExtension => {
            "a certificate of its chain has a critical extension modelcache cannot check"
                .to_string()
        }
        E::MaximumPathDepthExceeded
        | E::MaximumSignatureChecksExceeded
        | E::MaximumPathBuildCallsExceeded
        | E::MaximumNameConstraintComparisonsExceeded => {
            "building its chain takes more steps than webpki allows".to_string()
        }
        other => format!("webpki refuses its chain ({other:?})"),
    };
    SignatureError::OutsideChain {
        subject: chain
            .first()
            .map_or_else(String::new, |c| c.subject.clone()),
        reason,
    }
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
    // A name listed twice has two digests, and which one a reader believes is a choice an
    // attacker would like to make: refused.
    let mut seen = std::collections::HashSet::with_capacity(out.len());
    if let Some(twice) = out
        .iter()
        .find(|r| !seen.insert((r.path.as_str(), r.range.clone().map(|x| (x.start, x.end)))))
    {
        return Err(malformed(format!("it lists {:?} twice", twice.path)));
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

/// The few certificate fields webpki keeps to itself: validity dates, key usage, extended key
/// usage, and the subject's attributes as text.
///
/// Only ever given certificates webpki has parsed, but every read is bounds-checked all the
/// same: anything unexpected is `None`, never a panic.
mod x509 {
    use std::fmt::Write as _;

    const BOOLEAN: u8 = 0x01;
    const INTEGER: u8 = 0x02;
    const BIT_STRING: u8 = 0x03;
    const OCTET_STRING: u8 = 0x04;
    const OID: u8 = 0x06;
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const TELETEX_STRING: u8 = 0x14;
    const IA5_STRING: u8 = 0x16;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    const VISIBLE_STRING: u8 = 0x1a;
    const UNIVERSAL_STRING: u8 = 0x1c;
    const BMP_STRING: u8 = 0x1e;
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const VERSION: u8 = 0xa0;
    const EXTENSIONS: u8 = 0xa3;

    /// 2.5.29.15 and 2.5.29.37.
    const KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x0f];
    const EXTENDED_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];
    /// 1.3.6.1.5.5.7.3.3, id-kp-codeSigning.
    const CODE_SIGNING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x03];

    /// The most characters of a name shown; a longer one ends in `…`.
    const MAX_NAME: usize = 256;

    /// Splits the next element off `input`: its tag and its contents.
    fn next<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = input.split_first()?;
        if tag & 0x1f == 0x1f {
            return None; // A multi-byte tag: none in what is read here.
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(count)?;
            rest = after;
            bytes.iter().try_fold(0usize, |len, b| {
                len.checked_mul(256)?.checked_add(usize::from(*b))
            })?
        };
        let (contents, after) = rest.split_at_checked(len)?;
        *input = after;
        Some((tag, contents))
    }

    /// The contents of the next element of `input`, if it has tag `tag`.
    fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
        match next(input)? {
            (t, contents) if t == tag => Some(contents),
            _ => None,
        }
    }

    /// What is read of a certificate.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Fields<'a> {
        /// `notBefore`, in seconds since the Unix epoch (0 for earlier).
        pub(super) not_before: u64,
        /// `notAfter`, likewise.
        pub(super) not_after: u64,
        /// The key usage extension's BIT STRING contents.
        key_usage: Option<&'a [u8]>,
        /// The extended key usage extension's SEQUENCE contents.
        extended_key_usage: Option<&'a [u8]>,
    }

    impl Fields<'_> {
        /// Whether the certificate may sign a model, by the reference verifier's rule: its key
        /// usage has digitalSignature, or its extended key usage has codeSigning.
        pub(super) fn may_sign(&self) -> bool {
            // The first byte counts the unused bits; digitalSignature is bit 0, the high bit.
            let digital_signature = self
                .key_usage
                .and_then(|bits| bits.get(1))
                .is_some_and(|b| b & 0x80 != 0);
            let code_signing = self.extended_key_usage.is_some_and(|mut purposes| {
                std::iter::from_fn(|| expect(&mut purposes, OID)).any(|oid| oid == CODE_SIGNING)
            });
            digital_signature || code_signing
        }
    }

    /// Reads the validity and key usages of the DER certificate `der`.
    pub(super) fn fields(der: &[u8]) -> Option<Fields<'_>> {
        let mut input = der;
        let mut cert = expect(&mut input, SEQUENCE)?;
        let mut tbs = expect(&mut cert, SEQUENCE)?;
        if tbs.first() == Some(&VERSION) {
            next(&mut tbs)?;
        }
        expect(&mut tbs, INTEGER)?; // serialNumber
        expect(&mut tbs, SEQUENCE)?; // signature
        expect(&mut tbs, SEQUENCE)?; // issuer
        let mut validity = expect(&mut tbs, SEQUENCE)?;
        let not_before = time(next(&mut validity)?)?;
        let not_after = time(next(&mut validity)?)?;
        expect(&mut tbs, SEQUENCE)?; // subject
        expect(&mut tbs, SEQUENCE)?; // subjectPublicKeyInfo
        let mut fields = Fields {
            not_before,
            not_after,
            key_usage: None,
            extended_key_usage: None,
        };
        while let Some((tag, mut contents)) = next(&mut tbs) {
            if tag != EXTENSIONS {
                continue; // issuerUniqueID, subjectUniqueID
            }
            let mut extensions = expect(&mut contents, SEQUENCE)?;
            while !extensions.is_empty() {
                let mut extension = expect(&mut extensions, SEQUENCE)?;
                let oid = expect(&mut extension, OID)?;
                if extension.first() == Some(&BOOLEAN) {
                    next(&mut extension)?; // critical
                }
                let mut value = expect(&mut extension, OCTET_STRING)?;
                if oid == KEY_USAGE {
                    fields.key_usage = Some(expect(&mut value, BIT_STRING)?);
                } else if oid == EXTENDED_KEY_USAGE {
                    fields.extended_key_usage = Some(expect(&mut value, SEQUENCE)?);
                }
            }
        }
        tbs.is_empty().then_some(fields)
    }

    /// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), as RFC 5280 has them,
    /// in seconds since the Unix epoch (0 for earlier).
    fn time((tag, text): (u8, &[u8])) -> Option<u64> {
        let number = |digits: &[u8]| -> Option<i64> {
            digits.iter().try_fold(0i64, |n, d| {
                d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
            })
        };
        let (year, rest) = match (tag, text.len()) {
            (UTC_TIME, 13) => {
                let (yy, rest) = text.split_at_checked(2)?;
                let yy = number(yy)?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, rest)
            }
            (GENERALIZED_TIME, 15) => {
                let (yyyy, rest) = text.split_at_checked(4)?;
                (number(yyyy)?, rest)
            }
            _ => return None,
        };
        let (digits, zulu) = rest.split_at_checked(10)?;
        if zulu != b"Z" {
            return None;
        }
        let mut pairs = digits.chunks(2).map(number);
        let mut field = || pairs.next().flatten();
        let (month, day, hour, minute, second) = (field()?, field()?, field()?, field()?, field()?);
        if !((1..=12).contains(&month)
            && (1..=31).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60)
        {
            return None;
        }
        // Days from the civil date, after Howard Hinnant's `days_from_civil`.
        let y = if month <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let year_of_era = y - era * 400;
        let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        let days = era * 146_097 + day_of_era - 719_468;
        Some(u64::try_from(days * 86_400 + hour * 3_600 + minute * 60 + second).unwrap_or(0))
    }

    /// A DER Name's contents (its RDNs, without the outer SEQUENCE) as RFC 4514 text, most
    /// specific first (`CN=…,OU=…,O=…`), escaped so that no character of it can hide or fake
    /// another part, and at most [`MAX_NAME`] characters long.
    pub(super) fn name(rdns: &[u8]) -> String {
        let text =
            rdn_text(rdns).unwrap_or_else(|| format!("#{}", crate::fetch::journal::hex(rdns)));
        let text = if text.is_empty() {
            "(no subject)".to_string()
        } else {
            text
        };
        if text.chars().count() > MAX_NAME {
            let mut short: String = text.chars().take(MAX_NAME).collect();
            short.push('…');
            short
        } else {
            text
        }
    }

    fn rdn_text(mut input: &[u8]) -> Option<String> {
        let mut rdns = Vec::new();
        while !input.is_empty() {
            let mut set = expect(&mut input, SET)?;
            let mut attributes = Vec::new();
            while !set.is_empty() {
                let mut attribute = expect(&mut set, SEQUENCE)?;
                let oid = expect(&mut attribute, OID)?;
                let whole = attribute;
                let (tag, value) = next(&mut attribute)?;
                let mut text = attribute_type(oid);
                text.push('=');
                match string_value(tag, value) {
                    Some(value) => escape(&value, &mut text),
                    // RFC 4514: `#` and the hex of the value's whole DER encoding.
                    None => write!(text, "#{}", crate::fetch::journal::hex(whole)).ok()?,
                }
                attributes.push(text);
            }
            rdns.push(attributes.join("+"));
        }
        rdns.reverse();
        Some(rdns.join(","))
    }

    /// The short name of a common attribute type, or its dotted OID.
    fn attribute_type(oid: &[u8]) -> String {
        let short = match oid {
            [0x55, 0x04, 0x03] => "CN",
            [0x55, 0x04, 0x05] => "serialNumber",
            [0x55, 0x04, 0x06] => "C",
            [0x55, 0x04, 0x07] => "L",
            [0x55, 0x04, 0x08] => "ST",
            [0x55, 0x04, 0x09] => "STREET",
            [0x55, 0x04, 0x0a] => "O",
            [0x55, 0x04, 0x0b] => "OU",
            [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID",
            [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC",
            [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress",
            _ => return dotted(oid).unwrap_or_else(|| "#malformed-oid".to_string()),
        };
        short.to_string()
    }

    /// An OID's contents in dotted decimal.
    fn dotted(oid: &[u8]) -> Option<String> {
        let mut arcs = Vec::new();
        let mut arc = 0u64;
        for (i, b) in oid.iter().enumerate() {
            arc = arc.checked_mul(128)? | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                arcs.push(arc);
                arc = 0;
            } else if i + 1 == oid.len() {
                return None;
            }
        }
        let (&first, rest) = arcs.split_first()?;
        let (a, b) = match first {
            0..40 => (0, first),
            40..80 => (1, first - 40),
            _ => (2, first - 80),
        };
        let mut text = format!("{a}.{b}");
        for arc in rest {
            write!(text, ".{arc}").ok()?;
        }
        Some(text)
    }

    /// A directory string's characters, if `tag` is one and `value` decodes.
    fn string_value(tag: u8, value: &[u8]) -> Option<String> {
        match tag {
            UTF8_STRING => std::str::from_utf8(value).ok().map(str::to_string),
            PRINTABLE_STRING | IA5_STRING | VISIBLE_STRING => value
                .is_ascii()
                .then(|| value.iter().map(|b| char::from(*b)).collect()),
            // T.61 in theory, Latin-1 in practice.
            TELETEX_STRING => Some(value.iter().map(|b| char::from(*b)).collect()),
            BMP_STRING if value.len() % 2 == 0 => char::decode_utf16(
                value
                    .chunks_exact(2)
                    .map(|p| u16::from_be_bytes([p[0], p[1]])),
            )
            .collect::<Result<String, _>>()
            .ok(),
            UNIVERSAL_STRING if value.len() % 4 == 0 => value
                .chunks_exact(4)
                .map(|q| char::from_u32(u32::from_be_bytes([q[0], q[1], q[2], q[3]])))
                .collect(),
            _ => None,
        }
    }

    /// Appends `value`, RFC 4514 escaped, and every control or invisible formatting character
    /// as `\XX` hex of its UTF-8 bytes, so the text reads as what it is.
    fn escape(value: &str, out: &mut String) {
        let last = value.chars().count().saturating_sub(1);
        for (i, c) in value.chars().enumerate() {
            let invisible = c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}');
            match c {
                '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                '#' if i == 0 => out.push_str("\\#"),
                ' ' if i == 0 || i == last => out.push_str("\\ "),
                c if invisible => {
                    let mut utf8 = [0; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        // Writing to a String cannot fail.
                        let _ = write!(out, "\\{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn times_are_read_as_rfc_5280_writes_them() {
            for (tag, text, rfc3339) in [
                (UTC_TIME, "700101000000Z", "1970-01-01T00:00:00Z"),
                (UTC_TIME, "491231235959Z", "2049-12-31T23:59:59Z"),
                (UTC_TIME, "000229120000Z", "2000-02-29T12:00:00Z"),
                (GENERALIZED_TIME, "20461202110940Z", "2046-12-02T11:09:40Z"),
                (GENERALIZED_TIME, "21000301000000Z", "2100-03-01T00:00:00Z"),
            ] {
                let expected = humantime::parse_rfc3339(rfc3339)
                    .unwrap()
                    .duration_since(std::time::SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                assert_eq!(time((tag, text.as_bytes())), Some(expected), "{text}");
            }
            assert_eq!(
                time((UTC_TIME, b"500101000000Z")),
                Some(0),
                "1950 is before the epoch"
            );
            for bad in [
                "7001010000Z",
                "700101000000",
                "701301000000Z",
                "70010100000xZ",
                "",
            ] {
                assert_eq!(time((UTC_TIME, bad.as_bytes())), None, "{bad}");
            }
            assert_eq!(time((OCTET_STRING, b"700101000000Z")), None);
        }

        #[test]
        fn names_read_as_rfc_4514_and_hide_nothing() {
            let attribute = |oid: &[u8], tag: u8, value: &[u8]| -> Vec<u8> {
                let mut atv = vec![OID, u8::try_from(oid.len()).unwrap()];
                atv.extend_from_slice(oid);
                atv.extend_from_slice(&[tag, u8::try_from(value.len()).unwrap()]);
                atv.extend_from_slice(value);
                let mut seq = vec![SEQUENCE, u8::try_from(atv.len()).unwrap()];
                seq.extend(atv);
                let mut set = vec![SET, u8::try_from(seq.len()).unwrap()];
                set.extend(seq);
                set
            };
            let mut rdns = attribute(&[0x55, 0x04, 0x0a], PRINTABLE_STRING, b"Acme, Inc");
            rdns.extend(attribute(
                &[0x55, 0x04, 0x03],
                UTF8_STRING,
                " \u{202e}evil\n".as_bytes(),
            ));
            rdns.extend(attribute(
                &[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37],
                UTF8_STRING,
                b"x",
            ));
            rdns.extend(attribute(&[0x55, 0x04, 0x0b], 0x02, b"\x01"));
            assert_eq!(
                name(&rdns),
                "OU=#020101,1.3.6.1.4.1.311=x,CN=\\ \\e2\\80\\aeevil\\0a,O=Acme\\, Inc"
            );
            assert_eq!(name(&[]), "(no subject)");
            assert_eq!(name(&[SET, 5, 1]), "#310501");
            let long = attribute(&[0x55, 0x04, 0x03], UTF8_STRING, &[b'a'; 120]);
            assert!(name(&[long.clone(), long.clone(), long].concat()).ends_with('…'));
        }

        #[test]
        fn hostile_der_is_none_never_a_panic() {
            for input in [
                &[][..],
                &[SEQUENCE],
                &[SEQUENCE, 0x85, 1, 1, 1, 1, 1],
                &[SEQUENCE, 0x84, 0xff, 0xff, 0xff, 0xff],
                &[SEQUENCE, 0x80, 0, 0],
                &[0x1f, 1, 0],
                &[SEQUENCE, 3, SEQUENCE, 1, 0],
            ] {
                assert!(fields(input).is_none(), "{input:?}");
                let _ = name(input);
            }
            assert_eq!(dotted(&[0x2a, 0x86]), None);
            assert_eq!(dotted(&[0xff; 12]), None);
        }
    }
}
#[cfg(test)]
mod tests {
    //! Against bundles the OMS reference signer (`model_signing` 1.1.1) made for the model in
    //! `fixtures/oms/model` with the key whose public half is `fixtures/oms/key.pub.pem`, and
    //! with certificates under `fixtures/oms/root.pem` (see `fixtures/oms/README.md`).

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
        Trust {
            keys,
            ..Trust::default()
        }
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

    const CERTIFICATE: &[u8] = include_bytes!("fixtures/oms/certificate.sig");
    const TLS_CERTIFICATE: &[u8] = include_bytes!("fixtures/oms/tls-certificate.sig");
    const PUBLISHER: &str = "CN=model publisher,OU=publishing,O=modelcache tests";

    fn root(name: &str) -> TrustedRoot {
        let pem = match name {
            "root" => include_str!("fixtures/oms/root.pem"),
            "intermediate" => include_str!("fixtures/oms/intermediate.pem"),
            _ => include_str!("fixtures/oms/other-root.pem"),
        };
        TrustedRoot::from_pem(name, pem).unwrap()
    }

    fn roots(roots: Vec<TrustedRoot>) -> Trust {
        Trust {
            roots,
            ..Trust::default()
        }
    }

    /// `bundle` with its certificate chain (DER, signing certificate first) changed by `edit`.
    fn with_chain(bundle: &[u8], edit: impl FnOnce(&mut Vec<Vec<u8>>)) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut json: serde_json::Value = serde_json::from_slice(bundle).unwrap();
        let certificates =
            &mut json["verificationMaterial"]["x509CertificateChain"]["certificates"];
        let mut chain: Vec<Vec<u8>> = certificates
            .as_array()
            .unwrap()
            .iter()
            .map(|c| b64.decode(c["rawBytes"].as_str().unwrap()).unwrap())
            .collect();
        edit(&mut chain);
        *certificates = chain
            .iter()
            .map(|der| serde_json::json!({"rawBytes": b64.encode(der)}))
            .collect();
        serde_json::to_vec(&json).unwrap()
    }

    fn leaf_der() -> Vec<u8> {
        let mut leaf = Vec::new();
        with_chain(CERTIFICATE, |chain| leaf = chain[0].clone());
        leaf
    }

    fn root_der(name: &str) -> Vec<u8> {
        root(name).der
    }

    #[test]
    fn a_certificate_chain_to_a_configured_root_verifies_and_names_the_signer() {
        let signed = verify(CERTIFICATE, &roots(vec![root("other-root"), root("root")])).unwrap();
        let expected = Signer::Certificate {
            subject: PUBLISHER.to_string(),
            root: "root".to_string(),
            root_fingerprint: fingerprint(&root_der("root")),
            fingerprint: fingerprint(&leaf_der()),
        };
        assert_eq!(signed.signer, expected);
        assert_eq!(
            signed.signer.to_string(),
            format!(
                "certificate {PUBLISHER} ({}) under root",
                fingerprint(&leaf_der())
            )
        );
        let json = serde_json::to_value(&signed.signer).unwrap();
        assert_eq!(json["kind"], "certificate");
        assert_eq!(serde_json::from_value::<Signer>(json).unwrap(), expected);
        assert_eq!(signed.model_name, "model");
        assert_eq!(
            (signed.hash, signed.method),
            (HashType::Sha256, Method::Files)
        );
        for r in &signed.resources {
            assert_eq!(
                r.digest,
                file_digest(&r.path, HashType::Sha256),
                "{}",
                r.path
            );
        }
        // A trusted intermediate ends the chain as well as its root; the root may also travel
        // in the bundle, as some signers put it there.
        let signed = verify(CERTIFICATE, &roots(vec![root("intermediate")])).unwrap();
        assert!(
            matches!(&signed.signer, Signer::Certificate { root, .. } if root == "intermediate")
        );
        let with_root = with_chain(CERTIFICATE, |chain| chain.push(root_der("root")));
        assert!(verify(&with_root, &roots(vec![root("root")])).is_ok());
        // A trusted key and roots side by side: each verifies its own bundles.
        let both = Trust {
            keys: vec![key("publisher")],
            roots: vec![root("root")],
        };
        assert!(matches!(
            verify(CERTIFICATE, &both).unwrap().signer,
            Signer::Certificate { .. }
        ));
        assert!(matches!(
            verify(SHA256, &both).unwrap().signer,
            Signer::Key { .. }
        ));
    }

    #[test]
    fn a_chain_to_another_root_is_outside_the_configured_chain() {
        for trust in [
            roots(vec![root("other-root")]),
            Trust::default(),
            trust(vec![key("publisher")]),
        ] {
            let e = verify(CERTIFICATE, &trust).unwrap_err();
            assert!(
                matches!(&e, SignatureError::OutsideChain { subject, .. } if subject == PUBLISHER),
                "{e}"
            );
            assert!(
                e.to_string().contains("outside the configured chain"),
                "{e}"
            );
        }
        // A root in the bundle is not trusted for being there.
        let with_root = with_chain(CERTIFICATE, |chain| chain.push(root_der("root")));
        let e = verify(&with_root, &roots(vec![root("other-root")])).unwrap_err();
        assert!(matches!(e, SignatureError::OutsideChain { .. }), "{e}");
        // Nor is the bundle's signing certificate signed by itself, as it were.
        let leaf_only = with_chain(CERTIFICATE, |chain| chain.truncate(1));
        let e = verify(&leaf_only, &roots(vec![root("root")])).unwrap_err();
        assert!(matches!(e, SignatureError::OutsideChain { .. }), "{e}");
        // And roots do not vouch for bundles signed with a bare key.
        assert!(matches!(
            verify(SHA256, &roots(vec![root("root")])),
            Err(SignatureError::Untrusted { trusted: 0, .. })
        ));
    }

    #[test]
    fn a_chain_is_valid_only_within_every_certificates_dates() {
        let trust = roots(vec![root("root")]);
        let year = Duration::from_secs(365 * 86_400);
        let later = SystemTime::now() + 30 * year;
        let e = verify_at(CERTIFICATE, &trust, later).unwrap_err();
        assert!(
            matches!(&e, SignatureError::CertificateExpired { certificate, now, .. } if certificate == PUBLISHER && *now == later),
            "{e}"
        );
        assert!(e.to_string().contains("expired at 20"), "{e}");
        let e = verify_at(CERTIFICATE, &trust, SystemTime::UNIX_EPOCH + year).unwrap_err();
        assert!(
            matches!(e, SignatureError::CertificateNotYetValid { .. }),
            "{e}"
        );
        // The trusted root's own dates count too, though webpki does not check them.
        let mut expired = root("root");
        expired.not_after = 1_000_000;
        let e = verify(CERTIFICATE, &roots(vec![expired])).unwrap_err();
        assert!(
            matches!(&e, SignatureError::CertificateExpired { certificate, .. } if certificate.contains("(the trusted root root)")),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_not_for_code_signing_is_refused() {
        // Key usage keyAgreement, extended key usage serverAuth: the reference verifier
        // refuses it too ("Signing certificate cannot be used for signing").
        let e = verify(TLS_CERTIFICATE, &roots(vec![root("root")])).unwrap_err();
        assert!(
            matches!(&e, SignatureError::NotForCodeSigning { subject } if subject == "CN=tls server,O=modelcache tests"),
            "{e}"
        );
        let leaf = leaf_der();
        assert!(x509::fields(&leaf).unwrap().may_sign());
    }

    #[test]
    fn a_tampered_certificate_or_statement_is_refused_cleanly() {
        let trust = roots(vec![root("root")]);
        let leaf = leaf_der();
        // Every bit of the signing certificate is covered by its issuer's signature.
        for at in 0..leaf.len() {
            for bit in [0x01, 0x80] {
                let bundle = with_chain(CERTIFICATE, |chain| chain[0][at] ^= bit);
                let e = verify(&bundle, &trust).expect_err("a changed certificate verified");
                assert!(
                    matches!(
                        e,
                        SignatureError::OutsideChain { .. }
                            | SignatureError::MalformedCertificate { index: 0, .. }
                            | SignatureError::NotForCodeSigning { .. }
                            | SignatureError::CertificateExpired { .. }
                            | SignatureError::CertificateNotYetValid { .. }
                    ),
                    "byte {at}: {e}"
                );
            }
        }
        let e = verify(&with_chain(CERTIFICATE, |c| c[0].truncate(100)), &trust).unwrap_err();
        assert!(
            matches!(e, SignatureError::MalformedCertificate { index: 0, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("not valid DER"), "{e}");
        let e = verify(
            &with_chain(CERTIFICATE, |c| c[1] = b"junk".to_vec()),
            &trust,
        )
        .unwrap_err();
        assert!(
            matches!(e, SignatureError::MalformedCertificate { index: 1, .. }),
            "{e}"
        );
        let e = verify(&with_chain(CERTIFICATE, |c| c.clear()), &trust).unwrap_err();
        assert!(matches!(e, SignatureError::Malformed(_)), "{e}");
        let long = with_chain(CERTIFICATE, |c| c.resize(MAX_CHAIN + 1, root_der("root")));
        assert!(matches!(
            verify(&long, &trust),
            Err(SignatureError::Malformed(_))
        ));
        let mut json: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        json["verificationMaterial"]["x509CertificateChain"]["certificates"][0]["rawBytes"] =
            "not base64!".into();
        let e = verify(&serde_json::to_vec(&json).unwrap(), &trust).unwrap_err();
        assert!(
            matches!(e, SignatureError::MalformedCertificate { index: 0, .. }),
            "{e}"
        );
        // Another statement under a good chain: the certificate's key did not sign it.
        let mut json: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD;
        let payload = b64
            .decode(json["dsseEnvelope"]["payload"].as_str().unwrap())
            .unwrap();
        let forged = String::from_utf8(payload).unwrap().replace(
            &hex(&file_digest("config.json", HashType::Sha256)),
            &"0".repeat(64),
        );
        json["dsseEnvelope"]["payload"] = b64.encode(forged).into();
        let e = verify(&serde_json::to_vec(&json).unwrap(), &trust).unwrap_err();
        assert!(
            matches!(&e, SignatureError::NotSignedByCertificate { subject, .. } if subject == PUBLISHER),
            "{e}"
        );
        // Signatures by the thousand, each to be tried with every trusted key.
        let mut json: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        let sig = json["dsseEnvelope"]["signatures"][0].clone();
        json["dsseEnvelope"]["signatures"] = vec![sig; MAX_SIGNATURES + 1].into();
        let e = verify(&serde_json::to_vec(&json).unwrap(), &trust).unwrap_err();
        assert!(matches!(e, SignatureError::Malformed(_)), "{e}");
        // Both a key and a chain: which one is meant?
        let mut json: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        json["verificationMaterial"]["publicKey"] = serde_json::json!({"hint": "x"});
        let e = verify(&serde_json::to_vec(&json).unwrap(), &trust).unwrap_err();
        assert!(matches!(e, SignatureError::Malformed(_)), "{e}");
    }

    #[test]
    fn sigstore_keyless_bundles_are_refused_with_the_reason() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let trust = roots(vec![root("root")]);
        let mut keyless: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        keyless["verificationMaterial"] = serde_json::json!({
            "certificate": {"rawBytes": b64.encode(leaf_der())},
            "tlogEntries": [{"logIndex": "1", "kindVersion": {"kind": "dsse", "version": "0.0.1"}}],
        });
        let mut logged_chain: serde_json::Value = serde_json::from_slice(CERTIFICATE).unwrap();
        logged_chain["verificationMaterial"]["tlogEntries"] =
            serde_json::json!([{"logIndex": "1"}]);
        for bundle in [keyless, logged_chain] {
            let e = verify(&serde_json::to_vec(&bundle).unwrap(), &trust).unwrap_err();
            assert!(matches!(e, SignatureError::Unsupported { .. }), "{e}");
            for says in [
                "Sigstore",
                "Rekor inclusion proof",
                "identity policy",
                "certificate chain",
            ] {
                assert!(e.to_string().contains(says), "{e}");
            }
        }
    }

    #[test]
    fn trust_is_loaded_from_pem_files_of_keys_and_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, parts: &[&str]| {
            let path = dir.path().join(name);
            std::fs::write(&path, parts.concat()).unwrap();
            path
        };
        let mixed = write(
            "mixed.pem",
            &[
                "the publisher's key and CA\n",
                include_str!("fixtures/oms/key.pub.pem"),
                include_str!("fixtures/oms/root.pem"),
            ],
        );
        let cas = write(
            "cas.pem",
            &[
                include_str!("fixtures/oms/root.pem"),
                include_str!("fixtures/oms/other-root.pem"),
            ],
        );
        let trust = Trust::load(&[mixed.clone(), cas.clone()]).unwrap();
        let (mixed, cas) = (mixed.display().to_string(), cas.display().to_string());
        assert_eq!((trust.len(), trust.is_empty()), (4, false));
        let keys: Vec<&str> = trust.keys.iter().map(TrustedKey::name).collect();
        assert_eq!(keys, [mixed.as_str()]);
        let names: Vec<&str> = trust.roots.iter().map(TrustedRoot::name).collect();
        assert_eq!(
            names,
            [mixed.clone(), format!("{cas}#1"), format!("{cas}#2")]
        );
        assert_eq!(
            trust.roots[0].subject(),
            "CN=modelcache test root,O=modelcache tests"
        );
        assert_eq!(trust.roots[0].fingerprint(), fingerprint(&root_der("root")));
        assert!(
            matches!(verify(SHA256, &trust).unwrap().signer, Signer::Key { name, .. } if name == mixed)
        );
        assert!(
            matches!(verify(CERTIFICATE, &trust).unwrap().signer, Signer::Certificate { root, .. } if root == mixed)
        );
        assert!(Trust::default().is_empty());

        let neither = write(
            "neither.pem",
            &["-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
        );
        let e = Trust::load(std::slice::from_ref(&neither)).unwrap_err();
        assert!(
            matches!(&e, SignatureError::BadKey { name, .. } if *name == neither.display().to_string()),
            "{e}"
        );
        assert!(
            e.to_string().contains("PUBLIC KEY") && e.to_string().contains("CERTIFICATE"),
            "{e}"
        );
        let unterminated = write("cut.pem", &["-----BEGIN CERTIFICATE-----\nAAAA\n"]);
        assert!(matches!(
            Trust::load(&[unterminated]),
            Err(SignatureError::BadKey { .. })
        ));
        let junk = write(
            "junk.pem",
            &["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
        );
        let e = Trust::load(&[junk]).unwrap_err();
        assert!(e.to_string().contains("not an X.509 certificate"), "{e}");
        let missing = dir.path().join("missing.pem");
        assert!(matches!(
            Trust::load(&[missing]),
            Err(SignatureError::BadKey { .. })
        ));
        assert!(TrustedRoot::from_pem("r", include_str!("fixtures/oms/key.pub.pem")).is_err());
    }
}
