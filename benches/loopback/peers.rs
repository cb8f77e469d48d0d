//! Every client the benchmark compares runs as its own process and is measured the same way from
//! outside: wall time from spawn to exit plus a `syncfs` of the destination (so a client that
//! leaves its writes in the page cache pays for them like one that fsyncs), CPU seconds from
//! `RUSAGE_CHILDREN` around the run, and peak RSS from the child's own `VmHWM`, sampled until it
//! exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

/// One measured run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figure {
    /// Bytes of the model per second of wall time, in GB/s.
    pub gb_per_s: f64,
    /// User + system CPU seconds per GB.
    pub cpu_s_per_gb: f64,
    /// Peak resident memory of the client's process.
    pub peak_rss_mib: f64,
}

fn children_cpu() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cmd` to completion, then `syncfs` on `dest`; panics with its stderr if it fails.
pub fn measure(label: &str, cmd: &mut Command, dest: &Path, bytes: u64) -> Figure {
    measure_with_output(label, cmd, dest, bytes).0
}

/// [`measure`], also returning what the client printed on stdout.
pub fn measure_with_output(
    label: &str,
    cmd: &mut Command,
    dest: &Path,
    bytes: u64,
) -> (Figure, String) {
    let log = tempfile::NamedTempFile::new().expect("temp file");
    let stdout = tempfile::NamedTempFile::new().expect("temp file");
    cmd.stdin(Stdio::null())
        .stdout(stdout.reopen().expect("stdout"))
        .stderr(log.reopen().expect("log"));
    let cpu0 = children_cpu();
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{label}: cannot start: {e}"));
    let pid = child.id();
    let mut peak_kib = 0;
    let status = loop {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let dir = std::fs::File::open(dest).expect("open the destination");
    nix::unistd::syncfs(&dir).expect("syncfs");
    let secs = start.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    if !status.success() {
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        panic!("{label} failed ({status}):\n{}", tail(&text, 3000));
    }
    let gb = bytes as f64 / 1e9;
    let figure = Figure {
        gb_per_s: gb / secs,
        cpu_s_per_gb: cpu / gb,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    };
    (
        figure,
        std::fs::read_to_string(stdout.path()).unwrap_or_default(),
    )
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

/// Bytes of every file under `dir`, and the files.
pub fn files(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                let len = e.metadata().expect("stat").len();
                out.push((
                    p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                    len,
                ));
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The Python SDK as an init-container script would use it: list the prefix, then
/// `download_blob(max_concurrency=…).readinto(file)` for each blob in turn.
pub const SDK_SCRIPT: &str = r#"
import os, sys
from azure.storage.blob import ContainerClient
endpoint, key, container, prefix, dest, conc = sys.argv[1:7]
client = ContainerClient(endpoint, container, credential={"account_name": "devstoreaccount1", "account_key": key})
for blob in client.list_blobs(name_starts_with=prefix):
    path = os.path.join(dest, blob.name[len(prefix):])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        client.download_blob(blob.name, max_concurrency=int(conc)).readinto(f)
"#;

/// The Python interpreter of a venv with `azure-storage-blob`, installed on first use.
pub fn sdk_python(tools: &Path) -> Option<PathBuf> {
    venv_python(
        &tools.join("bench-py"),
        "azure.storage.blob",
        &["azure-storage-blob"],
    )
}

/// The Python interpreter of the venv `venv` once `import` works there, installing `packages`
/// into it with pip first when it does not.
fn venv_python(venv: &Path, import: &str, packages: &[&str]) -> Option<PathBuf> {
    let python = venv.join("bin/python");
    let ok = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {import}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&python) {
        return Some(python);
    }
    eprintln!("installing {} into {}", packages.join(" "), venv.display());
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv)
        .status();
    let installed = made.is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
    (installed && ok(&python)).then_some(python)
}

/// `rclone`, installed from Debian's packages on first use when running as root.
pub fn rclone() -> Option<PathBuf> {
    let found = || {
        Command::new("rclone")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !found() && nix::unistd::geteuid().is_root() {
        eprintln!("installing rclone from apt");
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "rclone"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    found().then(|| PathBuf::from("rclone"))
}

/// The `name size` lines of a file list.
fn read_list(list: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(list).expect("read the file list");
    text.lines()
        .map(|line| {
            let (name, size) = line.rsplit_once(' ').expect("name size");
            (name.to_string(), size.parse().expect("size"))
        })
        .collect()
}

/// `[start, end)` of each `chunk`-sized range of a file of `size` bytes, in order.
fn ranges(size: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..size)
        .step_by(usize::try_from(chunk).expect("chunk fits usize"))
        .map(move |start| (start, (start + chunk).min(size)))
}

/// The plain client the prefetch is held against: parallel ranged GETs over the same HTTP stack
/// (reqwest on tokio), each body chunk written with `pwrite` where it arrived (or discarded),
/// no hashing, no journal, no checks. `list` holds `name size` lines.
pub fn plain_get(endpoint: &str, list: &Path, dest: Option<&Path>, concurrency: usize, chunk: u64) {
    use futures::StreamExt;
    use std::os::unix::fs::FileExt;
    let mut jobs = Vec::new();
    for (name, size) in read_list(list) {
        let file = dest.map(|d| {
            let p = d.join(&name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(size).unwrap();
            std::sync::Arc::new(f)
        });
        for (start, end) in ranges(size, chunk) {
            jobs.push((format!("{endpoint}/{name}"), start, end, file.clone()));
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    rt.block_on(
        futures::stream::iter(jobs)
            .map(|(url, start, end, file)| {
                let client = client.clone();
                async move {
                    let mut resp = client
                        .get(url)
                        .header("Range", format!("bytes={start}-{}", end - 1))
                        .send()
                        .await
                        .unwrap()
                        .error_for_status()
                        .unwrap();
                    let mut pos = start;
                    while let Some(chunk) = resp.chunk().await.unwrap() {
                        if let Some(f) = &file {
                            f.write_all_at(&chunk, pos).unwrap();
                        }
                        pos += chunk.len() as u64;
                    }
                    assert_eq!(pos, end, "short body");
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>(),
    );
    if let Some(d) = dest {
        let dir = std::fs::File::open(d).unwrap();
        nix::unistd::syncfs(&dir).unwrap();
    }
}

/// Run:ai's Model Streamer as vLLM's `--load-format runai_streamer` drives it: every
/// `*.safetensors` file given (`az://CONTAINER/PATH` or a local path) streamed into memory with
/// `SafetensorsStreamer.stream_files` and its defaults, each tensor taken as it is yielded.
/// Prints its own timing as JSON (import time excluded): seconds and CPU seconds from the first
/// request to the last tensor, tensor bytes and file bytes. `--drop` first evicts the local
/// files from the page cache (`POSIX_FADV_DONTNEED`).
pub const STREAMER_SCRIPT: &str = r#"
import json, os, resource, sys, time
from runai_model_streamer import SafetensorsStreamer
args = sys.argv[1:]
drop = args[0] == "--drop"
paths = args[1:] if drop else args
if drop:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.monotonic(), cpu()
tensor_bytes = tensors = 0
with SafetensorsStreamer() as s:
    s.stream_files(paths)
    for name, t in s.get_tensors():
        tensor_bytes += t.nbytes
        tensors += 1
print(json.dumps({"seconds": time.monotonic() - t0, "cpu_seconds": cpu() - c0,
                  "tensor_bytes": tensor_bytes, "tensors": tensors}))
"#;

/// The Python interpreter of a venv with Run:ai's Model Streamer and its Azure backend
/// (`runai-model-streamer`, `runai-model-streamer-azure`; they bring torch), installed on first
/// use.
pub fn streamer_python(tools: &Path) -> Option<PathBuf> {
    venv_python(
        &tools.join("bench-streamer"),
        "runai_model_streamer, runai_model_streamer_azure",
        &[
            "runai-model-streamer==0.17.1",
            "runai-model-streamer-azure==0.17.0",
        ],
    )
}

/// The experiment beside [`plain_get`]: the same ranged GETs with bodies discarded, on hyper's
/// HTTP/1 client over tokio-rustls (what reqwest uses), one connection per worker, with the TLS
/// layer reading the socket directly (`read_block` 0: one `recv` per record or less) or through a
/// buffer of `read_block` bytes below it (one `recv` per block). Trusts `SSL_CERT_FILE`.
pub fn plain_get_hyper(
    endpoint: &str,
    list: &Path,
    concurrency: usize,
    chunk: u64,
    read_block: usize,
) {
    use http_body_util::BodyExt;
    use hyper::client::conn::http1;
    let url: url::Url = endpoint.parse().expect("endpoint URL");
    let host = url.host_str().expect("host").to_string();
    let port = url.port().expect("port");
    let mut jobs = Vec::new();
    for (name, size) in read_list(list) {
        for (start, end) in ranges(size, chunk) {
            jobs.push((format!("{}/{name}", url.path()), start, end));
        }
    }
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs.into_iter()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut workers = Vec::new();
        for _ in 0..concurrency {
            let (jobs, config, host) = (jobs.clone(), config.clone(), host.clone());
            workers.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                    .await
                    .expect("connect");
                tcp.set_nodelay(true).expect("nodelay");
                let name = rustls::pki_types::ServerName::try_from(host.clone()).expect("name");
                let connector = tokio_rustls::TlsConnector::from(config);
                // Over the socket itself, or over a buffer below TLS: two stream types, one
                // connection's setup for both.
                async fn open<IO>(
                    connector: tokio_rustls::TlsConnector,
                    name: rustls::pki_types::ServerName<'static>,
                    io: IO,
                ) -> (
                    http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
                    tokio::task::JoinHandle<()>,
                )
                where
                    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
                {
                    let tls = connector.connect(name, io).await.expect("TLS");
                    let (send, conn) = http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await
                        .expect("HTTP/1");
                    (
                        send,
                        tokio::spawn(async move {
                            let _ = conn.await;
                        }),
                    )
                }
                let (mut send, conn) = if read_block == 0 {
                    open(connector, name, tcp).await
                } else {
                    let buffered = tokio::io::BufReader::with_capacity(read_block, tcp);
                    open(connector, name, buffered).await
                };
                loop {
                    let next = jobs.lock().unwrap().next();
                    let Some((path, start, end)) = next else {
                        break;
                    };
                    let req = http::Request::get(path)
                        .header("host", &host)
                        .header("range", format!("bytes={start}-{}", end - 1))
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                        .unwrap();
                    let mut body = send.send_request(req).await.expect("request").into_body();
                    let mut got = 0u64;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.expect("body").into_data() {
                            got += data.len() as u64;
                        }
                    }
                    assert_eq!(got, end - start, "short body");
                }
                drop(send);
                let _ = conn.await;
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    });
}

/// The same ranged GETs with bodies discarded, through modelcache's own source (`object_store`'s
/// Azure client on reqwest, with the status-aware service modelcache wraps it in): what a
/// `prefetch` costs before it writes or hashes a byte. Opens `az://CONTAINER/PREFIX` configured
/// from the environment, as `prefetch` does; `concurrency` ranges of `chunk` bytes in flight.
pub fn source_get(url: &str, concurrency: usize, chunk: u64) {
    use futures::StreamExt;
    let env = modelcache::config::Environment::capture();
    let source = modelcache::source::open(url, &env, &Default::default()).expect("open the source");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let files = source.list().await.expect("list");
        let mut jobs = Vec::new();
        for file in &files {
            for (start, end) in ranges(file.size, chunk) {
                jobs.push((file.clone(), start..end));
            }
        }
        futures::stream::iter(jobs)
            .map(|(file, range)| {
                let source = source.clone();
                async move {
                    let want = range.end - range.start;
                    let mut body = source.read_range(&file, range).await.expect("read");
                    let mut got = 0u64;
                    while let Some(chunk) = body.next().await {
                        got += chunk.expect("body").len() as u64;
                    }
                    assert_eq!(got, want, "short body");
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<()>>()
            .await;
    });
}
