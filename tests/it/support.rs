//! Shared test fixtures: a real Azurite started once per test binary, a signed raw HTTP client
//! for what `object_store` cannot do (create containers, upload hostile names), uploads in
//! blocks, generated models, and the built binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use sha2::Sha256;

pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// True when running in CI, where a missing prerequisite is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips (loudly) outside CI, fails in CI.
pub fn skip_or_fail(reason: &str) {
    if in_ci() {
        panic!("CI=true but a prerequisite is missing: {reason}");
    }
    eprintln!("\n*** SKIPPED: {reason} ***\n");
}

/// Whether we are root (loop devices, mount).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_modelcache"))
}

/// A `modelcache` command with a clean environment (no Azure variables leak in from the host).
pub fn modelcache() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MODELCACHE_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// Adds the emulator settings pointing at `endpoint` (Azurite or the fault proxy).
pub fn with_emulator(cmd: &mut Command, endpoint: &str) {
    cmd.env("AZURE_STORAGE_USE_EMULATOR", "true")
        .env("AZURITE_BLOB_STORAGE_URL", endpoint);
}

/// Runs a command to completion with a time limit, returning its output.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modelcache");
    wait_with_limit(child, limit)
}

pub fn wait_with_limit(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for modelcache"),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("modelcache did not finish within {limit:?}");
        }
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `--json` summary of a successful prefetch.
pub fn summary(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "prefetch failed: {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
    let line = stdout(o).lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {line}"))
}

/// A small GPT-OSS-shaped model in a temp dir: 15 shards of `shard_bytes` plus extras.
pub fn small_model(shard_bytes: usize, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    modelcache::demo::generate_model(
        dir.path(),
        &modelcache::demo::DemoShape {
            shards: 15,
            shard_bytes,
            original_bytes: 300_000,
            seed,
        },
    )
    .unwrap();
    dir
}

/// The prefetch exited 5 (refused by a check) saying `says`, before the download began: no
/// shard, partial or journal was written under `cache`.
pub fn assert_refused_before_download(out: &Output, cache: &Path, says: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(5), "stderr: {err}");
    assert!(err.contains(says), "{err}");
    let started: Vec<String> = files_under(cache)
        .into_iter()
        .filter(|f| f.ends_with(".safetensors") || f.ends_with("journal.jsonl"))
        .collect();
    assert!(started.is_empty(), "the download had begun: {started:?}");
}

/// Every file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Asserts the published model holds exactly the selected source files, byte for byte.
pub fn assert_published_identical(source: &Path, model: &Path) {
    if let Some(difference) = published_difference(source, model) {
        panic!("{difference}");
    }
}

/// How the published model differs from the selected source files, if it does.
pub fn published_difference(source: &Path, model: &Path) -> Option<String> {
    let expected: Vec<String> = files_under(source)
        .into_iter()
        .filter(|f| {
            !f.starts_with("original/")
                && !f.starts_with("metal/")
                && f != "modelcache.manifest.json"
                && f != "model.sig"
        })
        .collect();
    let got: Vec<String> = files_under(model)
        .into_iter()
        .filter(|f| !f.starts_with(".modelcache/"))
        .collect();
    if got != expected {
        return Some(format!(
            "published file set {got:?} is not the source's {expected:?}"
        ));
    }
    expected.iter().find_map(|f| {
        let a = std::fs::read(source.join(f)).ok();
        let b = std::fs::read(model.join(f)).ok();
        (a.is_none() || a != b).then(|| format!("{f} differs after prefetch"))
    })
}

/// A running Azurite, shared by the tests of this binary.
pub struct Azurite {
    pub port: u16,
    _workspace: tempfile::TempDir,
    _guard: Child,
}

impl Azurite {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn azurite_bin() -> Option<PathBuf> {
    let local =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/azurite/node_modules/.bin/azurite-blob");
    if local.exists() {
        return Some(local);
    }
    let which = Command::new("sh")
        .args(["-c", "command -v azurite-blob"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&which.stdout).trim().to_string();
    (!p.is_empty()).then(|| PathBuf::from(p))
}

/// Starts Azurite once (on a free port, disk workspace), or returns None after a loud skip.
pub fn azurite() -> Option<&'static Azurite> {
    static AZURITE: OnceLock<Option<Azurite>> = OnceLock::new();
    let started = AZURITE.get_or_init(|| {
        let bin = azurite_bin()?;
        let workspace = tempfile::tempdir().unwrap();
        Some(start_azurite(&bin, workspace, &[], "http"))
    });
    if started.is_none() {
        skip_or_fail(
            "Azurite is not installed (run the README's test command, which installs it into .tools/)",
        );
    }
    started.as_ref()
}

/// An Azurite that serves HTTPS and accepts Azure AD bearer tokens (`--oauth basic`: it checks
/// a token's issuer, audience and lifetime, not its signature), as Blob Storage does for a
/// workload identity; the only way to ask it for a user delegation key. Its certificate is
/// signed by a CA of its own, at `ca` (give it to the agent as `SSL_CERT_FILE`).
pub struct OAuthAzurite {
    pub azurite: Azurite,
    pub ca: PathBuf,
}

impl OAuthAzurite {
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.azurite.port)
    }
}

/// Starts the HTTPS, OAuth-accepting Azurite once, or returns None after a loud skip.
pub fn azurite_oauth() -> Option<&'static OAuthAzurite> {
    static AZURITE: OnceLock<Option<OAuthAzurite>> = OnceLock::new();
    let started = AZURITE.get_or_init(|| {
        let bin = azurite_bin()?;
        let workspace = tempfile::tempdir().unwrap();
        let certs = workspace.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let sh = |script: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&certs)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        // A CA, and a server certificate for 127.0.0.1 it signs: TLS clients refuse a CA
        // certificate used as the server's own.
        sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=modelcache-test-ca \
              -keyout ca.key -out ca.pem 2>/dev/null");
        sh("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out req.pem 2>/dev/null \
            && printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf \
            && openssl x509 -req -in req.pem -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                 -extfile ext.cnf -out cert.pem 2>/dev/null");
        let args: Vec<String> = vec![
            "--oauth".into(),
            "basic".into(),
            "--cert".into(),
            certs.join("cert.pem").display().to_string(),
            "--key".into(),
            certs.join("key.pem").display().to_string(),
        ];
        let ca = certs.join("ca.pem");
        Some(OAuthAzurite {
            azurite: start_azurite(&bin, workspace, &args, "https"),
            ca,
        })
    });
    if started.is_none() {
        skip_or_fail(
            "Azurite is not installed (run the README's test command, which installs it into .tools/)",
        );
    }
    started.as_ref()
}

/// An unsigned Azure AD access token for Blob Storage, as `--oauth basic` Azurite checks it:
/// valid from `valid_from` to `valid_until` seconds from now (negative: in the past).
pub fn azure_ad_token(valid_from: i64, valid_until: i64) -> String {
    use base64::Engine as _;
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let header = b64(serde_json::json!({"alg": "RS256", "typ": "JWT"}));
    let claims = b64(serde_json::json!({
        "aud": "https://storage.azure.com",
        "iss": "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
        "iat": now + valid_from,
        "nbf": now + valid_from,
        "exp": now + valid_until,
        "oid": "11059fcc-5514-4800-b5f8-49808b9cfab6",
        "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    }));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

/// Starts Azurite with `extra` arguments; `scheme` is what it serves.
fn start_azurite(
    bin: &Path,
    workspace: tempfile::TempDir,
    extra: &[String],
    scheme: &str,
) -> Azurite {
    // The shell ends Azurite when our stdin closes, i.e. when this test process exits.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#""$0" "$@" & pid=$!; read _; kill $pid"#)
        .arg(bin)
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ])
        .args(extra)
        .arg("-l")
        .arg(workspace.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start azurite");
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 512];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let listens = format!("listens on {scheme}://127.0.0.1:");
    let port = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "azurite did not start: {seen}"
        );
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "azurite exited: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(i) = seen.find(&listens) {
            let rest = &seen[i + listens.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if rest.len() > digits.len() {
                break digits.parse::<u16>().unwrap();
            }
        }
    };
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while out.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
    });
    Azurite {
        port,
        _workspace: workspace,
        _guard: child,
    }
}

/// Makes `name` unique to this test.
pub fn unique(name: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A raw request to Azurite signed with the account key (SharedKey).
pub fn signed_request(
    port: u16,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let version = "2021-08-06";
    let mut ms_headers: Vec<(String, String)> = vec![
        ("x-ms-date".into(), date.clone()),
        ("x-ms-version".into(), version.into()),
    ];
    for (k, v) in extra_headers {
        if k.starts_with("x-ms-") {
            ms_headers.push(((*k).to_string(), (*v).to_string()));
        }
    }
    ms_headers.sort();
    let canonical_headers: String = ms_headers
        .iter()
        .map(|(k, v)| format!("{k}:{v}\n"))
        .collect();
    let mut q: Vec<(&str, &str)> = query.to_vec();
    q.sort();
    let canonical_query: String = q.iter().map(|(k, v)| format!("\n{k}:{v}")).collect();
    let content_length = if body.is_empty() {
        String::new()
    } else {
        body.len().to_string()
    };
    let string_to_sign = format!(
        "{method}\n\n\n{content_length}\n\n\n\n\n\n\n\n\n{canonical_headers}/{ACCOUNT}/{ACCOUNT}{path}{canonical_query}"
    );
    let sig = sign(&string_to_sign);
    let query_string: String = query
        .iter()
        .enumerate()
        .map(|(i, (k, v))| format!("{}{k}={v}", if i == 0 { "?" } else { "&" }))
        .collect();
    let mut req = format!(
        "{method} /{ACCOUNT}{path}{query_string} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: SharedKey {ACCOUNT}:{sig}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in &ms_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.write_all(req.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut resp = Vec::new();
    stream.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Base64 of the HMAC-SHA256 of `string_to_sign` under Azurite's account key.
fn sign(string_to_sign: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(string_to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Creates a container.
pub fn create_container(az: &Azurite, container: &str) {
    let (status, text) = signed_request(
        az.port,
        "PUT",
        &format!("/{container}"),
        &[("restype", "container")],
        &[],
        b"",
    );
    assert!(status == 201 || status == 409, "create container: {text}");
}

/// Uploads one blob with a raw Put Blob (any name, even a hostile one).
pub fn put_raw_blob(az: &Azurite, container: &str, name: &str, data: &[u8]) {
    let (status, text) = signed_request(
        az.port,
        "PUT",
        &format!("/{container}/{name}"),
        &[],
        &[("x-ms-blob-type", "BlockBlob")],
        data,
    );
    assert_eq!(status, 201, "put blob {name}: {text}");
}

/// An `object_store` client for a container of the shared Azurite.
pub fn store(az: &Azurite, container: &str) -> Arc<MicrosoftAzure> {
    Arc::new(
        MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(KEY)
            .with_endpoint(format!("{}/{ACCOUNT}", az.endpoint()))
            .with_allow_http(true)
            .with_container_name(container)
            .build()
            .unwrap(),
    )
}

/// Uploads every file of `dir` under `prefix`, each in 256 KiB blocks (Put Block + Put Block
/// List), as large uploads to Blob Storage are made.
pub async fn upload_dir(store: &MicrosoftAzure, dir: &Path, prefix: &str) {
    for rel in files_under(dir) {
        let data = std::fs::read(dir.join(&rel)).unwrap();
        upload_blocks(store, &format!("{prefix}/{rel}"), &data).await;
    }
}

pub async fn upload_blocks(store: &MicrosoftAzure, name: &str, data: &[u8]) {
    let upload = store.put_multipart(&ObjPath::from(name)).await.unwrap();
    let mut writer = WriteMultipart::new_with_chunk_size(upload, 256 * 1024);
    writer.write(data);
    writer.finish().await.unwrap();
}

pub async fn put_small(store: &MicrosoftAzure, name: &str, data: &[u8]) {
    store
        .put(&ObjPath::from(name), PutPayload::from(data.to_vec()))
        .await
        .unwrap();
}

/// A container holding a small model (uploaded in blocks) and its manifest, computed with the
/// binary's own `manifest --upload`.
pub struct AzureModel {
    pub container: String,
    pub source: tempfile::TempDir,
    pub store: Arc<MicrosoftAzure>,
}

impl AzureModel {
    pub fn url(&self) -> String {
        format!("az://{}/gpt-oss-120b", self.container)
    }
}

pub async fn azure_model(az: &Azurite, shard_bytes: usize, with_manifest: bool) -> AzureModel {
    let container = unique("models");
    create_container(az, &container);
    let source = small_model(shard_bytes, 7);
    let store = store(az, &container);
    upload_dir(&store, source.path(), "gpt-oss-120b").await;
    let model = AzureModel {
        container,
        source,
        store,
    };
    if with_manifest {
        let mut cmd = modelcache();
        with_emulator(&mut cmd, &az.endpoint());
        cmd.args([
            "manifest",
            "--upload",
            "--chunk-size",
            "64KiB",
            "--source",
            &model.url(),
        ]);
        let out = run(&mut cmd, Duration::from_secs(120));
        assert!(out.status.success(), "manifest --upload: {}", stderr(&out));
    }
    model
}

/// `modelcache prefetch --json` of `url` into `cache` as the model `gpt-oss-120b`, with 64 KiB
/// ranges unless `extra` sets `--chunk-size` (so small models still have many), through the
/// emulator at `endpoint` when given.
pub fn prefetch_cmd(endpoint: Option<&str>, url: &str, cache: &Path, extra: &[&str]) -> Command {
    let mut cmd = modelcache();
    if let Some(endpoint) = endpoint {
        with_emulator(&mut cmd, endpoint);
    }
    cmd.args(["prefetch", "--json", "--model", "gpt-oss-120b"]);
    if !extra.contains(&"--chunk-size") {
        cmd.args(["--chunk-size", "64KiB"]);
    }
    cmd.arg(format!("--source={url}"))
        .arg("--cache-root")
        .arg(cache)
        .args(extra);
    cmd
}

/// A loop device over a sparse image of `mib` MiB; detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    _image: tempfile::TempDir,
}

impl LoopDevice {
    /// None (after a loud skip, or a failure in CI) when not root or `losetup` fails.
    pub fn new(mib: u64) -> Option<Self> {
        if !is_root() {
            skip_or_fail("loop-device tests need root");
            return None;
        }
        let image_dir = tempfile::tempdir().unwrap();
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self {
                path: PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
                _image: image_dir,
            }),
            other => {
                skip_or_fail(&format!("losetup failed: {other:?}"));
                None
            }
        }
    }

    /// BLAKE3 of the first and last MiB: what "left byte-identical" compares.
    pub fn ends_hash(&self) -> String {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.path).unwrap();
        let size = std::fs::read_to_string(format!(
            "/sys/block/{}/size",
            self.path.file_name().unwrap().to_string_lossy()
        ))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
            * 512;
        let mut head = vec![0u8; 1 << 20];
        let mut tail = vec![0u8; 1 << 20];
        f.read_exact_at(&mut head, 0).unwrap();
        f.read_exact_at(&mut tail, size - (1 << 20)).unwrap();
        let mut h = blake3::Hasher::new();
        h.update(&head);
        h.update(&tail);
        h.finalize().to_hex().to_string()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// Bytes of the ranges a resume journal holds: what the next run must not fetch again.
pub fn journaled_bytes(journal: &Path) -> u64 {
    std::fs::read_to_string(journal)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|l| {
            let (size, chunk, index) = (
                l["size"].as_u64().unwrap(),
                l["chunk"].as_u64().unwrap(),
                l["index"].as_u64().unwrap(),
            );
            (size - index * chunk).min(chunk)
        })
        .sum()
}

/// Prints a measured figure and keeps it for the test command's closing report
/// (`target/tmp/report.txt`, printed by `scripts/test` whatever the outcome): libtest hides
/// what a passing test prints.
pub fn report(line: &str) {
    use std::io::Write as _;
    eprintln!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// `modelcache verify` of the model `gpt-oss-120b` under `cache`.
pub fn verify_model(cache: &Path) -> Output {
    let mut verify = modelcache();
    verify
        .args(["verify", "--model", "gpt-oss-120b", "--cache-root"])
        .arg(cache);
    run(&mut verify, Duration::from_secs(60))
}

/// An account SAS for Azurite's account (read and list on blobs), in the form
/// `AZURE_STORAGE_SAS_KEY` takes. Requests authorised by it carry no Shared Key signature, as
/// with workload identity in production, so the prefetcher may ask for transactional MD5s.
pub fn account_sas() -> String {
    let (version, permissions, expiry) = ("2019-12-12", "rl", "2099-01-01T00:00:00Z");
    let string_to_sign =
        format!("{ACCOUNT}\n{permissions}\nb\nsco\n\n{expiry}\n\nhttps,http\n{version}\n");
    let sig = sign(&string_to_sign)
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    format!("sv={version}&ss=b&srt=sco&sp={permissions}&se={expiry}&spr=https,http&sig={sig}")
}

/// A memory cgroup with a limit (cgroup v2, or v1's memory controller), for running the binary
/// under the DaemonSet's `limits.memory` as the kubelet would; removed on drop.
pub struct MemoryCgroup {
    dir: PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    /// A new group limited to `limit` bytes; None (after a loud skip, or a failure in CI) when
    /// not root or no memory controller can be written.
    pub fn new(limit: u64) -> Option<Self> {
        let made = is_root().then(|| Self::v2(limit).or_else(|| Self::v1(limit)));
        match made.flatten() {
            Some(group) => Some(group),
            None => {
                skip_or_fail(&format!(
                    "a memory cgroup needs root ({}) and a writable cgroup v2 or v1 memory controller under /sys/fs/cgroup",
                    is_root()
                ));
                None
            }
        }
    }

    fn name() -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        format!(
            "modelcache-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    }

    fn v2(limit: u64) -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return None;
        }
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        let dir = root.join(Self::name());
        std::fs::create_dir(&dir).ok()?;
        let group = Self { dir, v2: true };
        std::fs::write(group.dir.join("memory.max"), limit.to_string()).ok()?;
        std::fs::write(group.dir.join("memory.swap.max"), "0").ok();
        Some(group)
    }

    fn v1(limit: u64) -> Option<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.trim_start_matches('/').to_string())
        })?;
        let dir = Path::new("/sys/fs/cgroup/memory")
            .join(path)
            .join(Self::name());
        std::fs::create_dir(&dir).ok()?;
        let group = Self { dir, v2: false };
        std::fs::write(group.dir.join("memory.limit_in_bytes"), limit.to_string()).ok()?;
        Some(group)
    }

    /// `modelcache` (as [`modelcache`] makes it) started inside the group.
    pub fn modelcache(&self) -> Command {
        let mut cmd = Command::new("sh");
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MODELCACHE_LOG", "info")
            .stdin(Stdio::null())
            .args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#])
            .arg(&self.dir)
            .arg(bin());
        cmd
    }

    /// Processes the kernel's OOM killer killed in the group.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Peak resident memory of a running process (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let kib: u64 = l
                .strip_prefix("VmHWM:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// Computes and uploads the manifest of a `file://` source with the binary's own
/// `manifest --upload`.
pub fn upload_manifest(source: &Path) {
    let mut cmd = modelcache();
    cmd.args(["manifest", "--upload", "--chunk-size", "64KiB"])
        .arg(format!("--source=file://{}", source.display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(source.join("modelcache.manifest.json").exists());
}

/// Replaces the files of the model in `dir` with a newly generated one (another revision).
pub fn replace_model(dir: &Path, shard_bytes: usize, seed: u64) {
    let fresh = small_model(shard_bytes, seed);
    for f in files_under(fresh.path()) {
        let to = dir.join(&f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fresh.path().join(&f), to).unwrap();
    }
}

/// `modelcache` started in a mount namespace of its own, as a container runtime starts the
/// agent's container: its mounts start as copies of this one's (a shared cache root stays a
/// peer, so what the agent mounts there reaches this namespace), and an emptyDir (a private
/// tmpfs) is mounted at `private`. Arguments added to the command go to `modelcache`.
pub fn in_agent_pod(private: &Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("MODELCACHE_LOG", "info")
        .stdin(Stdio::null())
        .args(["-m", "--propagation", "unchanged", "sh", "-c"])
        // The bind makes the mount point private before the tmpfs lands on it, so nothing
        // mounted there reaches this namespace, whatever its own propagation.
        .arg(
            r#"mount --bind "$0" "$0" && mount --make-private "$0" &&
            mount -t tmpfs -o size=16m emptydir "$0" && mount --make-private "$0" && exec "$@""#,
        )
        .arg(private)
        .arg(bin());
    cmd
}

/// Makes `dir` what kubelet requires of a Bidirectional hostPath: a shared mount (a bind of
/// itself), so mounts made under it in a pod's namespace reach this one. Target's drop, or
/// `umount -l`, undoes it.
pub fn make_shared_mount(dir: &Path) {
    for args in [
        vec![
            "--bind".into(),
            dir.display().to_string(),
            dir.display().to_string(),
        ],
        vec!["--make-shared".into(), dir.display().to_string()],
    ] {
        let status = Command::new("mount").args(&args).status().unwrap();
        assert!(status.success(), "mount {args:?}");
    }
}

/// A node's pods as the agent judges them: a cgroup tree shaped like the kubelet's (systemd
/// driver) and the kubelet's pod directories, in a temporary directory. A pod runs while its
/// cgroup exists; its directory stays after it stops, until the pod is deleted.
pub struct FakeNode {
    dir: tempfile::TempDir,
}

impl FakeNode {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(
            dir.path()
                .join("cgroup/kubepods.slice/kubepods-besteffort.slice"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("pods")).unwrap();
        Self { dir }
    }

    /// A node with one running pod, and that pod's UID.
    pub fn with_pod(n: u32) -> (Self, String) {
        let node = Self::new();
        let uid = Self::uid(n);
        node.start(&uid);
        (node, uid)
    }

    /// A fresh pod UID (an RFC 4122 UUID, as Kubernetes makes them).
    pub fn uid(n: u32) -> String {
        format!("4b0c2a36-9f5e-4b8e-8a63-{n:012x}")
    }

    fn cgroup(&self, uid: &str) -> PathBuf {
        self.dir.path().join(format!(
            "cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    }

    /// The pod starts: its cgroup and its kubelet directory appear.
    pub fn start(&self, uid: &str) {
        std::fs::create_dir_all(self.cgroup(uid)).unwrap();
        std::fs::create_dir_all(self.dir.path().join("pods").join(uid)).unwrap();
    }

    /// The pod's containers have all stopped (a Job succeeded, an eviction): the kubelet
    /// removes its cgroup and keeps its directory until the pod object is deleted.
    pub fn stop(&self, uid: &str) {
        std::fs::remove_dir(self.cgroup(uid)).unwrap();
    }

    /// The agent's `[leases]` section for this node, checked every second.
    pub fn leases_config(&self) -> String {
        format!(
            "[leases]\ncgroup_root = \"{}\"\npods_dir = \"{}\"\ncheck_interval = \"1s\"\n",
            self.dir.path().join("cgroup").display(),
            self.dir.path().join("pods").display()
        )
    }
}

/// Bytes of the files of a generated model that the default selection fetches (all but
/// `original/` and `metal/`).
pub fn selected_bytes(model: &Path) -> u64 {
    files_under(model)
        .iter()
        .filter(|f| !f.starts_with("original/") && !f.starts_with("metal/"))
        .map(|f| std::fs::metadata(model.join(f)).unwrap().len())
        .sum()
}

/// Runs `openssl ARGS` in `dir`, panicking with its stderr if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An EC P-256 private key, `NAME.key`.
pub fn ec_key(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
    );
}
