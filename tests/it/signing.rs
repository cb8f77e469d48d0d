//! OpenSSF Model Signing: models signed with the reference signer (`model_signing` from PyPI,
//! installed by `scripts/test` into `.tools/py`) with a key and with a certificate chain, SHA-256
//! and BLAKE3, whole files and shards, fetched through Azurite and `file://`; then every way a
//! signed model can be wrong, each refused before publish with its reason; then the agent's view
//! (a required signature missing never becomes ready, an optional one publishes unsigned).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::*;

/// Keys and certificates made once with openssl: the publisher's EC key (P-256), a root CA, an
/// intermediate and a code-signing leaf under them, and an unrelated key and root.
pub(crate) struct Keys {
    _dir: tempfile::TempDir,
    pub(crate) key: PathBuf,
    pub(crate) public: PathBuf,
    pub(crate) other_public: PathBuf,
    pub(crate) leaf_key: PathBuf,
    pub(crate) leaf: PathBuf,
    pub(crate) intermediate: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) other_root: PathBuf,
}

/// A CA (`ca = true`) or a code-signing leaf, signed by `issuer` (self-signed without one).
fn certificate(dir: &Path, name: &str, subject: &str, ca: bool, issuer: Option<&str>) {
    ec_key(dir, name);
    let ext = if ca {
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n"
    } else {
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,codeSigning\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid:always\n"
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let (key, csr, pem, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", subject, "-out", &csr],
    );
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-days", "7300", "-sha256", "-extfile", &extfile, "-out", &pem,
    ];
    let (issuer_pem, issuer_key);
    match issuer {
        Some(issuer) => {
            issuer_pem = format!("{issuer}.pem");
            issuer_key = format!("{issuer}.key");
            args.extend([
                "-CA",
                issuer_pem.as_str(),
                "-CAkey",
                issuer_key.as_str(),
                "-CAcreateserial",
            ]);
        }
        None => args.extend(["-signkey", key.as_str()]),
    }
    openssl(dir, &args);
}

pub(crate) fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for name in ["publisher", "other"] {
            ec_key(d, name);
            openssl(
                d,
                &[
                    "ec",
                    "-in",
                    &format!("{name}.key"),
                    "-pubout",
                    "-out",
                    &format!("{name}.pub.pem"),
                ],
            );
        }
        certificate(d, "root", "/O=Publisher/CN=Publisher Root CA", true, None);
        certificate(
            d,
            "intermediate",
            "/O=Publisher/CN=Publisher Signing CA",
            true,
            Some("root"),
        );
        certificate(
            d,
            "leaf",
            "/O=Publisher/CN=model-release",
            false,
            Some("intermediate"),
        );
        certificate(
            d,
            "other-root",
            "/O=Someone Else/CN=Other Root CA",
            true,
            None,
        );
        Keys {
            key: d.join("publisher.key"),
            public: d.join("publisher.pub.pem"),
            other_public: d.join("other.pub.pem"),
            leaf_key: d.join("leaf.key"),
            leaf: d.join("leaf.pem"),
            intermediate: d.join("intermediate.pem"),
            root: d.join("root.pem"),
            other_root: d.join("other-root.pem"),
            _dir: dir,
        }
    })
}

/// The Python with `model_signing` installed, or `None` (skipped outside CI, failed in it).
pub(crate) fn oms_python() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/py/bin/python");
    let ok = Command::new(&python)
        .args(["-c", "import model_signing"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        Some(python)
    } else {
        skip_or_fail("model_signing is not installed in .tools/py (scripts/test installs it)");
        None
    }
}

/// How a model is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    Key,
    Certificate,
}

/// Signs `model` with the reference library into `model/model.sig`; `shard` = `Some(bytes)`
/// for `method: shards`.
pub(crate) fn sign(python: &Path, model: &Path, by: By, hash: &str, shard: Option<u64>) {
    let k = keys();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/oms_sign.py");
    let serialization = shard.map_or_else(|| "files".to_string(), |s| s.to_string());
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg(if by == By::Key { "key" } else { "certificate" })
        .arg(hash)
        .arg(&serialization)
        .arg(model)
        .arg(model.join("model.sig"));
    match by {
        By::Key => {
            cmd.arg(&k.key);
        }
        By::Certificate => {
            cmd.arg(&k.leaf_key)
                .arg(&k.leaf)
                .arg(&k.intermediate)
                .arg(&k.root);
        }
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "signing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What to trust for a model signed `by`.
fn trusted(by: By) -> &'static Path {
    match by {
        By::Key => &keys().public,
        By::Certificate => &keys().root,
    }
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn signed_prefetch(url: &str, endpoint: Option<&str>, cache: &Path, trust: &Path) -> Command {
    prefetch_cmd(
        endpoint,
        url,
        cache,
        &[
            "--signature",
            "required",
            "--trusted",
            trust.to_str().unwrap(),
        ],
    )
}

/// Every way the reference signer signs verifies, through `file://` and Azurite, without a
/// manifest: published with who signed in the summary, `ready.json` and the signature kept,
/// and `modelcache verify --trusted` checks it again offline. A BLAKE3 bundle of whole files is
/// the manifest (the model is verified `blake3`); the others are checked as SHA-256 (or BLAKE3
/// of shards) while the ranges land (verified `signature`).
#[test]
fn every_signing_method_verifies_through_azurite_and_file() {
    let Some(python) = oms_python() else { return };
    let Some(az) = azurite() else { return };
    let cases = [
        (By::Key, "sha256", None),
        (By::Key, "sha256", Some(50_000)),
        (By::Key, "blake3", None),
        (By::Certificate, "sha256", None),
        (By::Certificate, "sha256", Some(50_000)),
        (By::Certificate, "blake3", None),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (by, hash, shard) in cases {
        let case = format!("{by:?} {hash} {shard:?}");
        let model = small_model(120_000, 61);
        sign(&python, model.path(), by, hash, shard);
        let container = unique("signed");
        create_container(az, &container);
        let store = store(az, &container);
        runtime.block_on(upload_dir(&store, model.path(), "m"));
        for (url, endpoint) in [
            (file_url(model.path()), None),
            (format!("az://{container}/m"), Some(az.endpoint())),
        ] {
            let cache = tempfile::tempdir().unwrap();
            let mut cmd = signed_prefetch(&url, endpoint.as_deref(), cache.path(), trusted(by));
            if endpoint.is_some() {
                cmd.env("AZURE_STORAGE_SAS_KEY", account_sas());
            }
            let s = summary(&run(&mut cmd, Duration::from_secs(180)));
            let signer = &s["signature"]["signer"];
            let kind = if by == By::Key { "key" } else { "certificate" };
            assert_eq!(signer["kind"], kind, "{case} {url}: {s}");
            assert_eq!(s["signature"]["hash"], hash, "{case}: {s}");
            if by == By::Certificate {
                assert!(
                    signer["subject"]
                        .as_str()
                        .is_some_and(|x| x.contains("model-release")),
                    "{case}: {s}"
                );
            }
            let expected = if hash == "blake3" && shard.is_none() {
                "blake3"
            } else {
                "signature"
            };
            assert_eq!(s["verification"], expected, "{case} {url}: {s}");
            let published = cache.path().join("models/gpt-oss-120b");
            assert_published_identical(model.path(), &published);
            let ready = std::fs::read_to_string(published.join(".modelcache/ready.json")).unwrap();
            assert!(ready.contains("\"signature\""), "{ready}");
            assert!(published.join(".modelcache/signature.sig").is_file());
            let out = run(
                modelcache()
                    .arg("verify")
                    .arg(&published)
                    .arg("--require-signature")
                    .arg("--trusted")
                    .arg(trusted(by)),
                Duration::from_secs(60),
            );
            assert!(out.status.success(), "{case}: {}", stderr(&out));
            assert!(
                stdout(&out).contains("signature verified: signed by"),
                "{case}: {}",
                stdout(&out)
            );
        }
        report(&format!(
            "signed {case}: verified through file:// and Azurite"
        ));
    }
}

/// A signed model changed after signing, or signed by someone else, or with a broken signature:
/// each refused before anything is published, the error naming the file or the reason.
#[test]
fn tampered_signed_models_are_refused_before_publish() {
    let Some(python) = oms_python() else { return };
    /// What, signed how, changed how, refused saying what.
    type Case = (
        &'static str,
        By,
        &'static str,
        Option<u64>,
        fn(&Path, &Path),
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "one byte of one shard changed (SHA-256)",
            By::Key,
            "sha256",
            None,
            |m, _| flip(&m.join("model-00003-of-00014.safetensors"), 60_000),
            "model-00003-of-00014.safetensors: SHA-256 is",
        ),
        (
            "one byte of one shard changed (SHA-256 shards)",
            By::Key,
            "sha256",
            Some(50_000),
            |m, _| flip(&m.join("model-00003-of-00014.safetensors"), 60_000),
            "model-00003-of-00014.safetensors bytes 50000..",
        ),
        (
            "one byte of one shard changed (BLAKE3)",
            By::Certificate,
            "blake3",
            None,
            |m, _| flip(&m.join("model-00003-of-00014.safetensors"), 60_000),
            "model-00003-of-00014.safetensors: BLAKE3 is",
        ),
        (
            "config.json changed",
            By::Key,
            "sha256",
            None,
            |m, _| {
                let p = m.join("config.json");
                let text = std::fs::read_to_string(&p).unwrap();
                std::fs::write(&p, text.replacen('{', "{\"evil\": 1, ", 1)).unwrap();
            },
            "config.json: SHA-256 is",
        ),
        (
            "a file added to the selection",
            By::Key,
            "sha256",
            None,
            |m, _| std::fs::write(m.join("extra.json"), b"{}").unwrap(),
            "extra.json is in the source and selected but the signature does not list it",
        ),
        (
            "a signed file missing",
            By::Key,
            "sha256",
            None,
            |m, _| std::fs::remove_file(m.join("model-00007-of-00014.safetensors")).unwrap(),
            "model-00007-of-00014.safetensors is signed but missing from the source",
        ),
        (
            "a signature from an untrusted key",
            By::Key,
            "sha256",
            None,
            |_, trust| {
                std::fs::copy(&keys().other_public, trust)
                    .map(drop)
                    .unwrap()
            },
            "not from a trusted signer",
        ),
        (
            "a certificate outside the configured chain",
            By::Certificate,
            "sha256",
            None,
            |_, trust| std::fs::copy(&keys().other_root, trust).map(drop).unwrap(),
            "outside the configured",
        ),
        (
            "a bundle of another model",
            By::Key,
            "sha256",
            None,
            |m, _| {
                let other = small_model(120_000, 99);
                sign(
                    &oms_python().unwrap(),
                    other.path(),
                    By::Key,
                    "sha256",
                    None,
                );
                std::fs::copy(other.path().join("model.sig"), m.join("model.sig")).unwrap();
            },
            "SHA-256 is",
        ),
        (
            "a truncated bundle",
            By::Key,
            "sha256",
            None,
            |m, _| {
                let p = m.join("model.sig");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            },
            "is not an OpenSSF Model Signing bundle",
        ),
        (
            "an oversized bundle",
            By::Key,
            "sha256",
            None,
            |m, _| {
                let p = m.join("model.sig");
                let mut bytes = std::fs::read(&p).unwrap();
                bytes.extend(std::iter::repeat_n(b' ', 5 << 20));
                std::fs::write(&p, bytes).unwrap();
            },
            "more than the 4194304 a model signature may have",
        ),
        (
            "a statement with a different payloadType",
            By::Key,
            "sha256",
            None,
            |m, _| {
                let p = m.join("model.sig");
                let mut bundle: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                bundle["dsseEnvelope"]["payloadType"] = "application/json".into();
                std::fs::write(&p, serde_json::to_vec(&bundle).unwrap()).unwrap();
            },
            "payloadType",
        ),
    ];
    for (what, by, hash, shard, tamper, says) in cases {
        let model = small_model(120_000, 63);
        sign(&python, model.path(), by, hash, shard);
        let trust_dir = tempfile::tempdir().unwrap();
        let trust = trust_dir.path().join("trusted.pem");
        std::fs::copy(trusted(by), &trust).unwrap();
        tamper(model.path(), &trust);
        let cache = tempfile::tempdir().unwrap();
        let out = run(
            &mut signed_prefetch(&file_url(model.path()), None, cache.path(), &trust),
            Duration::from_secs(120),
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(5), "{what}: {err}");
        assert!(err.contains(says), "{what}: expected {says:?} in: {err}");
        assert!(
            !cache.path().join("models/gpt-oss-120b").exists(),
            "{what}: something was published"
        );
        report(&format!(
            "signature tamper: {what}: refused ({})",
            err.lines().last().unwrap_or("").trim()
        ));
    }
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = usize::try_from(at).unwrap();
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

/// In the agent: a configured model whose signature is required and absent never becomes
/// ready (`/readyz` 503, the reason in `last_error`); one where it is optional is published and
/// shown as unsigned (`/v1/models`, `/readyz`'s `signed_by`, the `modelcache_model_signer`
/// metric); a signed one shows its signer in the same three places.
#[test]
fn the_agent_serves_only_what_the_signature_policy_allows_and_says_who_signed() {
    use crate::agent::{Agent, config, http, metric, model_entry};
    let Some(python) = oms_python() else { return };
    let k = keys();
    let unsigned = small_model(20_000, 65);
    let signed = small_model(20_000, 66);
    sign(&python, signed.path(), By::Key, "sha256", None);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let models = model_entry("required", &file_url(unsigned.path()), true)
        + "signature = \"required\"\n"
        + &model_entry("optional", &file_url(unsigned.path()), false)
        + &model_entry("signed", &file_url(signed.path()), false)
        + "signature = \"required\"\n";
    // The trusted key in a file of its own, as a ConfigMap of its own would hold it.
    let trust_file = dir.path().join("trusted.pem");
    std::fs::copy(&k.public, &trust_file).unwrap();
    let signing = format!("[signing]\ntrusted = [\"{}\"]\n", trust_file.display());
    let agent = Agent::start(
        dir.path(),
        &config(&cache, &models, &signing),
        "http://127.0.0.1:9",
        &[],
    );
    let failed = agent.until("/v1/models/required", Duration::from_secs(60), |_, j| {
        j["state"] == "failed"
    });
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("model.sig is missing and a signature is required")),
        "{failed}"
    );
    let optional = agent.until_ready("optional");
    assert!(optional["signature"].is_null(), "{optional}");
    let ok = agent.until_ready("signed");
    assert_eq!(ok["signature"]["signer"]["kind"], "key", "{ok}");
    let fingerprint = ok["signature"]["signer"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(
        status, 503,
        "the required model is pinned and not ready: {body}"
    );
    let readyz: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(readyz["signed_by"]["optional"], "unsigned", "{body}");
    assert!(
        readyz["signed_by"]["signed"]
            .as_str()
            .is_some_and(|s| s.contains(&fingerprint)),
        "{body}"
    );
    assert!(readyz["signed_by"]["required"].is_null(), "{body}");
    let (_, metrics) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(
            &metrics,
            "modelcache_model_signer",
            Some(("signer", "unsigned"))
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "modelcache_model_signer",
            Some(("model", "signed"))
        ),
        1.0,
        "{metrics}"
    );
    let status = run(
        modelcache().arg("status").arg("--api").arg(&agent.admin),
        Duration::from_secs(30),
    );
    let text = stdout(&status);
    assert!(text.contains("optional: unsigned"), "{text}");
    assert!(text.contains("signed: signed by key"), "{text}");

    // The operator replaces the trusted key in its file, live (the configuration itself does
    // not change): the signed revision is no longer handed out, and fetching it again fails on
    // the signature.
    std::fs::copy(&k.other_public, &trust_file).unwrap();
    agent.until_logged("configuration: ");
    let failed = agent.until("/v1/models/signed", Duration::from_secs(60), |_, j| {
        j["state"] == "failed"
    });
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not from a trusted signer")),
        "{failed}"
    );
    assert!(failed["revision"].is_null(), "{failed}");
    agent.until_logged("which is no longer trusted");
}
