//! `cargo bench --bench prefetch`: prefetch throughput with verification, beside the ceiling for
//! the same bytes and the same prefetch with hashing off, in one run.
//!
//! - `file://` source: the ceiling is a plain parallel read + positional write (then fsync) of the
//!   same files with the same range size and concurrency, into the same RAM-backed directory.
//! - Azurite: the ceiling is the same number of plain parallel ranged GETs, bodies discarded.
//!
//! Each figure is the median of three runs. Sizes: `MODELCACHE_BENCH_SHARD_MB` (default 64, so
//! about 1 GB over 15 shards) and `MODELCACHE_BENCH_AZURITE_SHARD_MB` (default 8; Azurite is a
//! functional emulator, not a fast server). Prints a Markdown report for BENCHMARKS.md.

#[expect(
    dead_code,
    reason = "shared with the integration tests; the benchmark uses part of it"
)]
#[path = "../tests/it/support.rs"]
mod support;

#[path = "loopback/blobserver.rs"]
mod blobserver;
#[expect(
    dead_code,
    reason = "shared with the integration tests; the benchmark uses part of it"
)]
#[path = "../tests/it/dragonfly/daemon.rs"]
mod dfdaemon;
#[path = "loopback/peers.rs"]
mod peers;
#[expect(
    dead_code,
    reason = "shared with the integration tests; the benchmark uses part of it"
)]
#[path = "../tests/it/dragonfly/scheduler.rs"]
mod scheduler;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};

const REPS: usize = 3;

use peers::Figure;

fn median(mut v: Vec<Figure>) -> Figure {
    v.sort_by(|a, b| a.gb_per_s.total_cmp(&b.gb_per_s));
    v[v.len() / 2]
}

/// Each column's own median: when rates tie (a client held at a capped server's rate), the
/// round [`median`] picks by rate would be an arbitrary one for the CPU and memory figures.
fn column_medians(v: &[Figure]) -> Figure {
    let mid = |f: fn(&Figure) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    Figure {
        gb_per_s: mid(|f| f.gb_per_s),
        cpu_s_per_gb: mid(|f| f.cpu_s_per_gb),
        peak_rss_mib: mid(|f| f.peak_rss_mib),
    }
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// A GPT-OSS-shaped model of 15 shards of `shard_mb` MiB.
fn generate(dir: &Path, shard_mb: usize, seed: u64) {
    let shape = modelcache::demo::DemoShape {
        shards: 15,
        shard_bytes: shard_mb << 20,
        original_bytes: 1 << 20,
        seed,
    };
    modelcache::demo::generate_model(dir, &shape).unwrap();
}

/// Files vLLM needs: what the default selection keeps.
fn selected(dir: &Path) -> Vec<(PathBuf, u64, String)> {
    support::files_under(dir)
        .into_iter()
        .filter(|f| {
            !f.starts_with("original/")
                && !f.starts_with("metal/")
                && f != "modelcache.manifest.json"
        })
        .map(|f| {
            let p = dir.join(&f);
            let len = std::fs::metadata(&p).unwrap().len();
            (p, len, f)
        })
        .collect()
}

/// The ceiling for a directory source: parallel pread + pwrite of the same ranges.
fn plain_copy(files: &[(PathBuf, u64, String)], dest: &Path, chunk: u64, threads: usize) -> Figure {
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let mut jobs = Vec::new();
    let mut outs = Vec::new();
    for (i, (src, len, rel)) in files.iter().enumerate() {
        let out = dest.join(rel);
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let f = File::create(&out).unwrap();
        f.set_len(*len).unwrap();
        outs.push((File::open(src).unwrap(), f));
        let mut off = 0;
        while off < *len {
            jobs.push((i, off, (*len - off).min(chunk)));
            off += chunk;
        }
    }
    let next = AtomicUsize::new(0);
    let total: u64 = files.iter().map(|f| f.1).sum();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, off, len)) = jobs.get(j) else {
                        return;
                    };
                    let (src, dst) = &outs[i];
                    let mut pos = off;
                    while pos < off + len {
                        let n = usize::try_from(off + len - pos)
                            .unwrap_or(usize::MAX)
                            .min(buf.len());
                        src.read_exact_at(&mut buf[..n], pos).unwrap();
                        dst.write_all_at(&buf[..n], pos).unwrap();
                        pos += n as u64;
                    }
                }
            });
        }
    });
    // Durable, as a prefetch is: the cache must survive a node reboot.
    for (_, dst) in &outs {
        dst.sync_all().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    Figure {
        gb_per_s: total as f64 / secs / 1e9,
        cpu_s_per_gb: (cpu_seconds() - cpu0) / (total as f64 / 1e9),
        peak_rss_mib: 0.0,
    }
}

/// Runs the built binary's prefetch and reads its JSON summary.
fn prefetch(
    source: &str,
    emulator: Option<&str>,
    cache: &Path,
    concurrency: usize,
    chunk: &str,
    hash: bool,
) -> Figure {
    let concurrency = concurrency.to_string();
    let mut extra = vec!["--chunk-size", chunk, "--concurrency", &concurrency];
    if !hash {
        extra.push("--no-hash");
    }
    let mut cmd = prefetch_cmd(emulator, source, cache, &extra);
    let s = support::summary(&support::run(&mut cmd, Duration::from_secs(1800)));
    let bytes = s["bytes_fetched"].as_f64().unwrap();
    Figure {
        gb_per_s: s["gb_per_s"].as_f64().unwrap(),
        cpu_s_per_gb: s["cpu_seconds"].as_f64().unwrap() / (bytes / 1e9),
        peak_rss_mib: s["peak_rss_bytes"].as_f64().unwrap() / (1 << 20) as f64,
    }
}

fn row(name: &str, f: Figure, ceiling: f64) {
    let rss = if f.peak_rss_mib > 0.0 {
        format!("{:.0}", f.peak_rss_mib)
    } else {
        "-".into()
    };
    println!(
        "| {name} | {:.3} | {:.0}% | {:.2} | {rss} |",
        f.gb_per_s,
        f.gb_per_s / ceiling * 100.0,
        f.cpu_s_per_gb
    );
}

/// The three medians of one configuration, each against the ceiling.
fn report(ceiling_label: &str, ceiling: Vec<Figure>, hashed: Vec<Figure>, unhashed: Vec<Figure>) {
    let c = median(ceiling);
    row(ceiling_label, c, c.gb_per_s);
    row(
        "modelcache prefetch, BLAKE3 verified",
        median(hashed),
        c.gb_per_s,
    );
    row(
        "modelcache prefetch, hashing off",
        median(unhashed),
        c.gb_per_s,
    );
}

fn header(title: &str) {
    println!("\n### {title}\n");
    println!("| run | GB/s | of ceiling | CPU s/GB | peak RSS MiB |");
    println!("|---|---|---|---|---|");
}

fn machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().next().map(str::to_string))
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpu}; {mem}; BLAKE3 SIMD: {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        if std::arch::is_x86_feature_detected!("avx512f") {
            "avx512"
        } else if std::arch::is_x86_feature_detected!("avx2") {
            "avx2"
        } else {
            "sse"
        }
    );
}

/// Where copies land: RAM-backed when possible, standing in for the node's NVMe RAID0 so the
/// destination is not the bottleneck (this VM's disk is; see BENCHMARKS.md).
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        Self { dir }
    }

    /// A fresh empty directory.
    fn fresh(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

fn bench_file(shard_mb: usize) {
    let src = tempfile::tempdir().unwrap();
    generate(src.path(), shard_mb, 1);
    let files = selected(src.path());
    let total: u64 = files.iter().map(|f| f.1).sum();
    let url = format!("file://{}", src.path().display());
    let (chunk, conc) = (8u64 << 20, 16usize);
    header(&format!(
        "file:// source, {:.2} GB, chunk 8 MiB, concurrency {conc} (median of {REPS})",
        total as f64 / 1e9
    ));
    let scratch = Scratch::new();
    let mut ceiling = Vec::new();
    let mut hashed = Vec::new();
    let mut unhashed = Vec::new();
    for _ in 0..REPS {
        ceiling.push(plain_copy(&files, &scratch.fresh("plain"), chunk, conc));
        hashed.push(prefetch(
            &url,
            None,
            &scratch.fresh("hashed"),
            conc,
            "8MiB",
            true,
        ));
        unhashed.push(prefetch(
            &url,
            None,
            &scratch.fresh("unhashed"),
            conc,
            "8MiB",
            false,
        ));
    }
    report(
        "ceiling: plain parallel read + write",
        ceiling,
        hashed,
        unhashed,
    );
}

fn bench_azurite(shard_mb: usize) {
    let Some(az) = support::azurite() else {
        println!("\n(Azurite section skipped: run ./scripts/test once to install it)");
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let container = support::unique("bench");
    support::create_container(az, &container);
    let src = tempfile::tempdir().unwrap();
    generate(src.path(), shard_mb, 2);
    let store = support::store(az, &container);
    rt.block_on(support::upload_dir(&store, src.path(), "m"));
    let files = selected(src.path());
    let total: u64 = files.iter().map(|f| f.1).sum();
    let url = format!("az://{container}/m");
    let endpoint = az.endpoint();
    let chunk = 4u64 << 20;

    let ranged_gets = |concurrency: usize| -> Figure {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        let mut jobs = Vec::new();
        for (_, len, rel) in &files {
            let mut off = 0;
            while off < *len {
                jobs.push((format!("m/{rel}"), off..(off + chunk).min(*len)));
                off += chunk;
            }
        }
        rt.block_on(
            futures::stream::iter(jobs)
                .map(|(path, range)| {
                    let store = store.clone();
                    async move {
                        let opts = GetOptions {
                            range: Some(GetRange::Bounded(range)),
                            ..Default::default()
                        };
                        let r = store
                            .get_opts(&object_store::path::Path::from(path), opts)
                            .await
                            .unwrap();
                        let mut s = r.into_stream();
                        while let Some(b) = s.next().await {
                            std::hint::black_box(b.unwrap());
                        }
                    }
                })
                .buffer_unordered(concurrency)
                .collect::<Vec<()>>(),
        );
        let secs = start.elapsed().as_secs_f64();
        Figure {
            gb_per_s: total as f64 / secs / 1e9,
            cpu_s_per_gb: (cpu_seconds() - cpu0) / (total as f64 / 1e9),
            peak_rss_mib: 0.0,
        }
    };

    let scratch = Scratch::new();
    for conc in [4usize, 16, 64] {
        header(&format!(
            "Azurite source, {:.2} GB uploaded in blocks, chunk 4 MiB, concurrency {conc} (median of {REPS})",
            total as f64 / 1e9
        ));
        let mut ceiling = Vec::new();
        let mut hashed = Vec::new();
        let mut unhashed = Vec::new();
        for _ in 0..REPS {
            ceiling.push(ranged_gets(conc));
            let d = scratch.fresh("hashed");
            hashed.push(prefetch(&url, Some(&endpoint), &d, conc, "4MiB", true));
            let d = scratch.fresh("unhashed");
            unhashed.push(prefetch(&url, Some(&endpoint), &d, conc, "4MiB", false));
        }
        report(
            "ceiling: plain parallel ranged GETs, bodies discarded",
            ceiling,
            hashed,
            unhashed,
        );
    }
}

/// A loop device with an XFS filesystem on a file in RAM, mounted at a fresh directory: the
/// kernel's real filesystem and block paths without this machine's slow disk. Root only.
struct LoopXfs {
    mount: tempfile::TempDir,
    device: String,
    _backing: tempfile::TempDir,
}

impl LoopXfs {
    fn new(size: u64) -> Result<Self, String> {
        let run = |cmd: &mut std::process::Command| -> Result<String, String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        if !nix::unistd::geteuid().is_root() {
            return Err("needs root (losetup, mkfs.xfs, mount)".into());
        }
        let backing = tempfile::tempdir_in("/dev/shm").map_err(|e| e.to_string())?;
        let image = backing.path().join("xfs.img");
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let device = run(std::process::Command::new("losetup")
            .args(["--direct-io=on", "--find", "--show"])
            .arg(&image))
        .or_else(|_| {
            run(std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image))
        })?;
        let made = run(std::process::Command::new("mkfs.xfs").args(["-q", "-f", &device]));
        let mount = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mounted = made.and_then(|_| {
            run(std::process::Command::new("mount")
                .arg(&device)
                .arg(mount.path()))
        });
        if let Err(e) = mounted {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &device])
                .status();
            return Err(e);
        }
        Ok(Self {
            mount,
            device,
            _backing: backing,
        })
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mount.path())
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.device])
            .status();
    }
}

/// Every client against the fast loopback Blob server, to tmpfs and to XFS on a loop device.
/// A GPT-OSS-shaped model of the files vLLM loads, with its manifest, under
/// `{base}/root/bench/m` for the loopback server; returns the files and their total bytes.
fn loopback_model(base: &Path, shard_mb: usize) -> (Vec<(String, u64)>, u64) {
    let model = base.join("root/bench/m");
    generate(&model, shard_mb, 3);
    // Only what vLLM loads, so that every client fetches the same bytes.
    for extra in ["original", "metal"] {
        let _ = std::fs::remove_dir_all(model.join(extra));
    }
    let mut manifest = support::modelcache();
    manifest
        .args(["manifest", "--upload"])
        .arg(format!("--source=file://{}", model.display()));
    let out = support::run(&mut manifest, Duration::from_secs(600));
    assert!(out.status.success(), "{}", support::stderr(&out));
    let files = peers::files(&model);
    let total: u64 = files.iter().map(|f| f.1).sum();
    (files, total)
}

/// A test certificate authority, and a server certificate it signed for `127.0.0.1`,
/// `localhost` and `*.blob.localhost`, made with the `openssl` command. Clients trust it the way
/// a user would make them trust a private CA: `SSL_CERT_FILE` (OpenSSL, Go, rustls' native roots)
/// and `REQUESTS_CA_BUNDLE` (Python's requests); none is patched.
struct TestCa {
    dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    fn new() -> Result<Self, String> {
        let openssl_runs = std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !openssl_runs {
            return Err("the openssl command is not installed".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let at = dir.path();
        support::ec_key(at, "ca");
        support::openssl(
            at,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=modelcache bench CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        support::ec_key(at, "server");
        support::openssl(
            at,
            &[
                "req",
                "-new",
                "-key",
                "server.key",
                "-subj",
                "/CN=localhost",
                "-out",
                "server.csr",
            ],
        );
        std::fs::write(
            at.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:*.blob.localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        )
        .map_err(|e| e.to_string())?;
        support::openssl(
            at,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        Ok(Self {
            ca: at.join("ca.pem"),
            cert: at.join("server.pem"),
            key: at.join("server.key"),
            dir,
        })
    }

    /// Makes `cmd` trust this CA (and only it).
    fn trust(&self, cmd: &mut std::process::Command) {
        cmd.env("SSL_CERT_FILE", &self.ca)
            .env("REQUESTS_CA_BUNDLE", &self.ca);
    }

    /// `program args` in a mount namespace of its own where the system's CA bundle
    /// (`/etc/ssl/certs/ca-certificates.crt`) also holds this CA: for clients that read only the
    /// system store (the streamer's libcurl has that path built in and reads no variable), as an
    /// operator would add a private CA to a node's store, without changing the host's.
    fn in_system_store(&self, program: &Path) -> std::process::Command {
        const SYSTEM: &str = "/etc/ssl/certs/ca-certificates.crt";
        let bundle = self.dir.path().join("system-bundle.pem");
        if !bundle.exists() {
            let mut pem = std::fs::read(SYSTEM).unwrap_or_default();
            pem.extend(std::fs::read(&self.ca).unwrap());
            std::fs::write(&bundle, pem).unwrap();
        }
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("mount --bind \"$0\" {SYSTEM} && exec \"$@\""))
            .arg(&bundle)
            .arg(program);
        cmd
    }
}

/// Starts the loopback Blob server on `{base}/root` (optionally capped per connection, and over
/// TLS with `tls`'s server certificate); returns it and its `http(s)://127.0.0.1:PORT`.
fn loopback_server(
    base: &Path,
    rate_per_connection: Option<u64>,
    tls: Option<&TestCa>,
) -> (ChildGuard, String) {
    loopback_server_on_link(base, rate_per_connection, tls, None)
}

/// [`loopback_server`] whose connections together send at most `link_rate` bytes per second.
fn loopback_server_on_link(
    base: &Path,
    rate_per_connection: Option<u64>,
    tls: Option<&TestCa>,
    link_rate: Option<u64>,
) -> (ChildGuard, String) {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.arg("--serve-blob").arg(base.join("root"));
    cmd.arg(rate_per_connection.map_or_else(|| "-".to_string(), |r| r.to_string()));
    if let Some(rate) = link_rate {
        cmd.arg("--link").arg(rate.to_string());
    }
    if let Some(ca) = tls {
        cmd.arg("--tls").arg(&ca.cert).arg(&ca.key);
    }
    let mut server = ChildGuard(cmd.stdout(std::process::Stdio::piped()).spawn().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.0.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let port: u16 = first.trim().trim_start_matches("port ").parse().unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    (server, format!("{scheme}://127.0.0.1:{port}"))
}

/// A `modelcache prefetch --json` of `az://bench/{model}` from the HTTPS loopback server at
/// `host`, configured as a user points it at a storage account: account name, key and the
/// account's endpoint (`AZURE_STORAGE_ENDPOINT`), with `ca` trusted through `SSL_CERT_FILE`.
fn https_prefetch(
    host: &str,
    ca: &TestCa,
    model: &str,
    dest: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = prefetch_cmd(None, &format!("az://bench/{model}"), dest, extra);
    cmd.env("AZURE_STORAGE_ACCOUNT_NAME", support::ACCOUNT)
        .env("AZURE_STORAGE_ACCOUNT_KEY", support::KEY)
        .env(
            "AZURE_STORAGE_ENDPOINT",
            format!("{host}/{}", support::ACCOUNT),
        );
    ca.trust(&mut cmd);
    cmd
}

/// A `modelcache prefetch --json` of the model at `source` into `cache`, through `emulator`
/// (an Azurite-style endpoint) when given.
fn prefetch_cmd(
    emulator: Option<&str>,
    source: &str,
    cache: &Path,
    extra: &[&str],
) -> std::process::Command {
    let mut cmd = support::modelcache();
    if let Some(e) = emulator {
        support::with_emulator(&mut cmd, e);
    }
    cmd.env("MODELCACHE_LOG", "warn")
        .args(["prefetch", "--json", "--model", "bench", "--source", source])
        .arg("--cache-root")
        .arg(cache)
        .args(extra);
    cmd
}

/// A `modelcache prefetch --json` of the loopback model into `dest`.
fn loopback_prefetch(host: &str, dest: &Path, extra: &[&str]) -> std::process::Command {
    prefetch_cmd(Some(host), "az://bench/m", dest, extra)
}

/// Adaptive concurrency against every fixed setting, at both ends: an endpoint as fast as the
/// host can take (CPU-bound here: few connections are best) and one capped per connection
/// (many connections are best), to tmpfs.
fn bench_adaptive(shard_mb: usize) {
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let (files, total) = loopback_model(base.path(), shard_mb);
    let shapes: [(&str, Option<u64>, &[usize]); 2] = [
        (
            "uncapped (the client's CPU is the limit)",
            None,
            &[4, 8, 16, 32, 64],
        ),
        (
            "capped at 25 MB/s per connection",
            Some(25_000_000),
            &[8, 16, 32, 64],
        ),
    ];
    for (shape, rate, fixed) in shapes {
        let (_server, host) = loopback_server(base.path(), rate, None);
        println!(
            "\n### Adaptive concurrency, loopback endpoint {shape}, {:.2} GB ({} files) to tmpfs (median of {REPS} interleaved rounds)\n",
            total as f64 / 1e9,
            files.len()
        );
        let mut rows: Vec<(String, Vec<String>)> = fixed
            .iter()
            .map(|c| {
                (
                    format!("fixed {c}"),
                    vec![
                        "--concurrency".to_string(),
                        c.to_string(),
                        "--adaptive-concurrency".into(),
                        "false".into(),
                    ],
                )
            })
            .collect();
        rows.push(("adaptive, ceiling 64 (default)".into(), Vec::new()));
        let mut figures: Vec<Vec<(Figure, u64)>> = vec![Vec::new(); rows.len()];
        let dest = base.path().join("dest");
        for _ in 0..REPS {
            for (i, (label, extra)) in rows.iter().enumerate() {
                let _ = std::fs::remove_dir_all(&dest);
                std::fs::create_dir_all(&dest).unwrap();
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let mut cmd = loopback_prefetch(&host, &dest, &extra);
                let (f, out) = peers::measure_with_output(label, &mut cmd, &dest, total);
                let chosen = out
                    .lines()
                    .last()
                    .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .and_then(|v| v["concurrency"].as_u64())
                    .unwrap_or(0);
                figures[i].push((f, chosen));
            }
        }
        let _ = std::fs::remove_dir_all(&dest);
        println!("| concurrency | GB/s | CPU s/GB | peak RSS MiB | in flight at the end |");
        println!("|---|---|---|---|---|");
        let medians: Vec<(Figure, u64)> = figures
            .into_iter()
            .map(|mut v| {
                v.sort_by(|a, b| a.0.gb_per_s.total_cmp(&b.0.gb_per_s));
                v[v.len() / 2]
            })
            .collect();
        for ((label, _), (f, chosen)) in rows.iter().zip(&medians) {
            println!(
                "| {label} | {:.2} | {:.2} | {:.0} | {chosen} |",
                f.gb_per_s, f.cpu_s_per_gb, f.peak_rss_mib
            );
        }
        let best = medians[..medians.len() - 1]
            .iter()
            .map(|m| m.0.gb_per_s)
            .fold(0.0, f64::max);
        let adaptive = medians[medians.len() - 1].0.gb_per_s;
        println!(
            "\nadaptive vs the best fixed setting: {:.2}× ({:.2} vs {:.2} GB/s)",
            adaptive / best,
            adaptive,
            best
        );
    }
}

/// The model's files as `m/NAME SIZE` lines in `base/list.txt`, for the plain clients.
fn file_list(base: &Path, files: &[(String, u64)]) -> PathBuf {
    let list = base.join("list.txt");
    std::fs::write(
        &list,
        files
            .iter()
            .map(|(n, s)| format!("m/{n} {s}\n"))
            .collect::<String>(),
    )
    .unwrap();
    list
}

fn bench_loopback(shard_mb: usize, tls: bool) {
    let ca = match tls.then(TestCa::new).transpose() {
        Ok(ca) => ca,
        Err(e) => {
            println!("\n## Peers over HTTPS\n\nnot run: {e}");
            return;
        }
    };
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let (files, total) = loopback_model(base.path(), shard_mb);
    let list = file_list(base.path(), &files);
    // Blob's shape: one connection carries far less than a node's link (tens of MB/s), so the
    // number of connections a client opens sets its rate. Off unless asked for.
    let per_connection = std::env::var("MODELCACHE_BENCH_CONN_MBPS").ok().map(|v| {
        v.parse::<u64>()
            .expect("MODELCACHE_BENCH_CONN_MBPS: a whole number of MB/s")
            * 1_000_000
    });
    let (_server, host) = loopback_server(base.path(), per_connection, ca.as_ref());
    let account_url = format!("{host}/{}", support::ACCOUNT);

    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools");
    let python = peers::sdk_python(&tools);
    let rclone = peers::rclone();
    let sdk_script = base.path().join("sdk_download.py");
    std::fs::write(&sdk_script, peers::SDK_SCRIPT).unwrap();
    let bench_exe = std::env::current_exe().unwrap();

    type Client<'a> = (
        &'static str,
        Box<dyn Fn(&Path) -> Option<std::process::Command> + 'a>,
    );
    let mut wire = if tls {
        "over HTTPS (TLS 1.3, AES-256-GCM; rustls in the server)".to_string()
    } else {
        "over plain HTTP".to_string()
    };
    if let Some(rate) = per_connection {
        wire.push_str(&format!(
            ", each connection capped at {:.0} MB/s",
            rate as f64 / 1e6
        ));
    }
    let modelcache = |extra: &'static [&'static str]| {
        let host = host.clone();
        let ca = ca.as_ref();
        Box::new(move |dest: &Path| {
            Some(match ca {
                Some(ca) => https_prefetch(&host, ca, "m", dest, extra),
                None => loopback_prefetch(&host, dest, extra),
            })
        }) as Box<dyn Fn(&Path) -> Option<std::process::Command> + '_>
    };
    let plain = |write: bool| {
        let (exe, list, url) = (
            bench_exe.clone(),
            list.clone(),
            format!("{account_url}/bench"),
        );
        Box::new(move |dest: &Path| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--plain-get").arg(&url).arg(&list).arg(if write {
                dest.as_os_str()
            } else {
                "-".as_ref()
            });
            cmd.args([PLAIN_CONCURRENCY.to_string(), PLAIN_CHUNK.to_string()]);
            Some(cmd)
        }) as Box<dyn Fn(&Path) -> Option<std::process::Command>>
    };
    let clients: Vec<Client> = vec![
        (
            "modelcache defaults (c64, 64 MiB), BLAKE3 verified",
            modelcache(&[]),
        ),
        (
            "modelcache defaults, hashing off (`--no-hash`: structure checks only)",
            modelcache(&["--no-hash"]),
        ),
        (
            "modelcache `--concurrency 8`, BLAKE3 verified",
            modelcache(&["--concurrency", "8"]),
        ),
        (
            "modelcache `--concurrency 8 --direct-io false` (page cache), BLAKE3 verified",
            modelcache(&["--concurrency", "8", "--direct-io", "false"]),
        ),
        (
            "Python azure-storage-blob `download_blob(max_concurrency=8)` (no hashing)",
            Box::new(|dest: &Path| {
                let mut cmd = std::process::Command::new(python.as_ref()?);
                cmd.arg(&sdk_script)
                    .arg(&account_url)
                    .arg(support::KEY)
                    .args(["bench", "m/"])
                    .arg(dest)
                    .arg("8");
                Some(cmd)
            }),
        ),
        (
            "rclone azureblob, 4 streams, cutoff 32M (no hashing)",
            Box::new(|dest: &Path| {
                let mut cmd = std::process::Command::new(rclone.as_ref()?);
                // rclone 1.60 builds `https://{account}.{endpoint}` from an endpoint; a
                // container SAS URL is taken as it is (the server does not check signatures).
                cmd.args(["copy", "--config", "/dev/null", ":azureblob:bench/m"])
                    .arg(dest)
                    .arg("--azureblob-sas-url")
                    .arg(format!(
                        "{account_url}/bench?sv=2021-08-06&sr=c&sp=rl&sig=bench"
                    ))
                    .args([
                        "--multi-thread-streams",
                        "4",
                        "--multi-thread-cutoff",
                        "32M",
                        "--ignore-checksum",
                    ]);
                Some(cmd)
            }),
        ),
        (
            "plain parallel ranged GETs + pwrite, no hash (c8, 64 MiB)",
            plain(true),
        ),
        (
            "plain parallel ranged GETs, bodies discarded (c8, 64 MiB)",
            plain(false),
        ),
    ];
    // Over HTTPS, the experiment: the same discarding client on hyper + tokio-rustls, the socket
    // read per record (as reqwest does) and in 256 KiB blocks below TLS.
    let hyper_plain = |read_block: usize| {
        let (exe, list, url) = (
            bench_exe.clone(),
            list.clone(),
            format!("{account_url}/bench"),
        );
        Box::new(move |_: &Path| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--plain-get-hyper").arg(&url).arg(&list);
            cmd.args([
                PLAIN_CONCURRENCY.to_string(),
                PLAIN_CHUNK.to_string(),
                read_block.to_string(),
            ]);
            Some(cmd)
        }) as Box<dyn Fn(&Path) -> Option<std::process::Command>>
    };
    let mut clients = clients;
    if tls {
        clients.push((
            "experiment: plain GETs on hyper + tokio-rustls, socket read per record, discarded",
            hyper_plain(0),
        ));
        clients.push((
            "experiment: the same with 256 KiB socket reads below TLS, discarded",
            hyper_plain(256 << 10),
        ));
    }

    let xfs = LoopXfs::new(total * 3 + (1 << 30));
    let tmpfs = base.path().join("dest");
    std::fs::create_dir_all(&tmpfs).unwrap();
    let mut dests: Vec<(String, PathBuf)> = vec![("tmpfs".into(), tmpfs)];
    match &xfs {
        Ok(x) => dests.push((
            "XFS on a loop device (backed by RAM)".into(),
            x.mount.path().to_path_buf(),
        )),
        Err(e) => println!("\n(XFS destination skipped: {e})"),
    }
    for (name, root) in &dests {
        println!(
            "\n### Loopback Blob endpoint {wire}, {:.2} GB ({} files), destination {name} (each column the median of {REPS} interleaved rounds)\n",
            total as f64 / 1e9,
            files.len()
        );
        let mut figures: Vec<Vec<Figure>> = vec![Vec::new(); clients.len()];
        for _ in 0..REPS {
            for (i, (label, make)) in clients.iter().enumerate() {
                let dest = root.join("run");
                let _ = std::fs::remove_dir_all(&dest);
                std::fs::create_dir_all(&dest).unwrap();
                if let Some(mut cmd) = make(&dest) {
                    if let Some(ca) = &ca {
                        ca.trust(&mut cmd);
                    }
                    figures[i].push(peers::measure(label, &mut cmd, &dest, total));
                }
                let _ = std::fs::remove_dir_all(&dest);
            }
        }
        let medians: Vec<Option<Figure>> = figures
            .iter()
            .map(|f| (!f.is_empty()).then(|| column_medians(f)))
            .collect();
        let plain_write = medians[PLAIN_WRITE];
        println!("| client | GB/s | CPU s/GB | peak RSS MiB | GB/s vs plain GET + pwrite |");
        println!("|---|---|---|---|---|");
        for ((label, _), m) in clients.iter().zip(&medians) {
            match (m, plain_write) {
                (Some(f), Some(p)) => println!(
                    "| {label} | {:.2} | {:.2} | {:.0} | {:.2}× |",
                    f.gb_per_s,
                    f.cpu_s_per_gb,
                    f.peak_rss_mib,
                    f.gb_per_s / p.gb_per_s
                ),
                (Some(f), None) => println!(
                    "| {label} | {:.2} | {:.2} | {:.0} | - |",
                    f.gb_per_s, f.cpu_s_per_gb, f.peak_rss_mib
                ),
                (None, _) => println!("| {label} | not run: client not installed | | | |"),
            }
        }
        let ratio = |a: usize, b: usize| match (medians[a], medians[b]) {
            (Some(x), Some(y)) => format!("{:.2}×", x.gb_per_s / y.gb_per_s),
            _ => "-".into(),
        };
        println!(
            "\nmodelcache defaults vs: plain GET + pwrite {}, Python SDK {}, rclone {}",
            ratio(0, PLAIN_WRITE),
            ratio(0, SDK),
            ratio(0, RCLONE)
        );
        // What verification costs, against what the plain client spends in all.
        if let (Some(hashed), Some(unhashed), Some(plain)) =
            (medians[0], medians[UNHASHED], medians[PLAIN_WRITE])
        {
            println!(
                "BLAKE3 costs {:.2} CPU s/GB here (verified {:.2} against unhashed {:.2}); unhashed modelcache against plain GET + pwrite: {:.2} against {:.2} CPU s/GB, {:.2}× the GB/s",
                hashed.cpu_s_per_gb - unhashed.cpu_s_per_gb,
                hashed.cpu_s_per_gb,
                unhashed.cpu_s_per_gb,
                unhashed.cpu_s_per_gb,
                plain.cpu_s_per_gb,
                unhashed.gb_per_s / plain.gb_per_s
            );
        }
    }
}

/// Where an HTTPS byte's CPU goes before modelcache writes or hashes it: the same ranged GETs
/// (concurrency 8, 64 MiB), bodies discarded, through modelcache's own source (`object_store`
/// on reqwest), through reqwest alone, and through hyper and tokio-rustls alone, interleaved
/// round by round (`MODELCACHE_BENCH_ROUNDS`, default 7, each client first in turn) so the
/// host's noise falls on all three.
fn bench_client(shard_mb: usize) {
    let ca = match TestCa::new() {
        Ok(ca) => ca,
        Err(e) => {
            println!("\n## HTTPS client layers\n\nnot run: {e}");
            return;
        }
    };
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let (files, total) = loopback_model(base.path(), shard_mb);
    let list = file_list(base.path(), &files);
    let (_server, host) = loopback_server(base.path(), None, Some(&ca));
    let container_url = format!("{host}/{}/bench", support::ACCOUNT);
    let exe = std::env::current_exe().unwrap();
    let (concurrency, chunk) = (PLAIN_CONCURRENCY.to_string(), PLAIN_CHUNK.to_string());
    let rows: Vec<(&str, std::process::Command)> = vec![
        (
            "modelcache's source (`object_store` on reqwest), discarded",
            {
                let mut cmd = std::process::Command::new(&exe);
                cmd.args(["--source-get", "az://bench/m", &concurrency, &chunk])
                    .env("AZURE_STORAGE_ACCOUNT_NAME", support::ACCOUNT)
                    .env("AZURE_STORAGE_ACCOUNT_KEY", support::KEY)
                    .env(
                        "AZURE_STORAGE_ENDPOINT",
                        format!("{host}/{}", support::ACCOUNT),
                    );
                cmd
            },
        ),
        ("reqwest alone, discarded", {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--plain-get")
                .arg(&container_url)
                .arg(&list)
                .args(["-", &concurrency, &chunk]);
            cmd
        }),
        ("hyper + tokio-rustls alone, discarded", {
            let mut cmd = std::process::Command::new(&exe);
            cmd.arg("--plain-get-hyper")
                .arg(&container_url)
                .arg(&list)
                .args([&concurrency, &chunk, "0"]);
            cmd
        }),
    ];
    let rounds = env_usize("MODELCACHE_BENCH_ROUNDS", 7);
    let scratch = base.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut figures: Vec<Vec<Figure>> = vec![Vec::new(); rows.len()];
    let mut rows = rows;
    let n = rows.len();
    for round in 0..rounds {
        // Each client goes first in turn, so no position in the round favours one.
        for k in 0..n {
            let i = (round + k) % n;
            let (label, cmd) = &mut rows[i];
            ca.trust(cmd);
            figures[i].push(peers::measure(label, cmd, &scratch, total));
        }
    }
    println!(
        "\n### HTTPS client layers: {:.2} GB ({} files), c{PLAIN_CONCURRENCY} × {} MiB ranges, bodies discarded ({rounds} interleaved rounds)\n",
        total as f64 / 1e9,
        files.len(),
        PLAIN_CHUNK >> 20
    );
    println!("| client | GB/s median | CPU s/GB median | CPU s/GB every round | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    for ((label, _), f) in rows.iter().zip(&figures) {
        let every: Vec<String> = f.iter().map(|x| format!("{:.2}", x.cpu_s_per_gb)).collect();
        let m = column_medians(f);
        println!(
            "| {label} | {:.2} | {:.2} | {} | {:.0} |",
            m.gb_per_s,
            m.cpu_s_per_gb,
            every.join(" "),
            m.peak_rss_mib
        );
    }
}

/// The three cases the streamer is held to, seconds each: the streamer's read from Blob on
/// every start against a new node's fill and cold load, a restart's cold load, a second pod's
/// warm load.
fn streamer_cases(from_blob: f64, fill: f64, cold: f64, warm: f64) {
    println!(
        "\n| case | the streamer from Blob, s | with modelcache, s | modelcache against the streamer |"
    );
    println!("|---|---|---|---|");
    println!(
        "| a new node's first start | {from_blob:.2} | {:.2} (fill {fill:.2} + load {cold:.2}) | {:.2}× as fast; the fill alone {:.2}× |",
        fill + cold,
        from_blob / (fill + cold),
        from_blob / fill
    );
    for (case, local) in [
        (
            "restart of the server on the node (page cache dropped)",
            cold,
        ),
        (
            "a second pod of the model on the node (page cache warm)",
            warm,
        ),
    ] {
        println!(
            "| {case} | {from_blob:.2} | {local:.2} | {:.2}× as fast |",
            from_blob / local
        );
    }
}

/// One run of the streamer script: its own timing and the process's figure.
#[derive(Clone, Copy, Debug, Default)]
struct Streamed {
    /// From the first request to the last tensor, import time excluded.
    seconds: f64,
    cpu_seconds: f64,
    tensor_bytes: u64,
    peak_rss_mib: f64,
}

/// Run:ai's streamer as the benchmark runs it: its interpreter and script, the CA it trusts,
/// a scratch directory for the measurement's `syncfs`, and the tensor bytes every run must yield.
struct Streamer<'a> {
    python: PathBuf,
    script: PathBuf,
    ca: &'a TestCa,
    scratch: PathBuf,
    tensor_bytes: u64,
}

impl Streamer<'_> {
    /// Runs [`peers::STREAMER_SCRIPT`] on `paths` and checks that it yielded every tensor byte.
    fn run(&self, paths: &[String], drop: bool, env: &[(&str, String)]) -> Streamed {
        let mut cmd = self.ca.in_system_store(&self.python);
        cmd.arg(&self.script);
        if drop {
            cmd.arg("--drop");
        }
        cmd.args(paths).envs(env.iter().map(|(k, v)| (k, v)));
        self.ca.trust(&mut cmd);
        let (f, out) = peers::measure_with_output(
            "runai streamer",
            &mut cmd,
            &self.scratch,
            self.tensor_bytes,
        );
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or("{}"))
            .unwrap_or_else(|e| panic!("streamer output {out:?}: {e}"));
        let got = v["tensor_bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            got, self.tensor_bytes,
            "the streamer yielded {got} tensor bytes: {v}"
        );
        Streamed {
            seconds: v["seconds"].as_f64().unwrap_or(f64::NAN),
            cpu_seconds: v["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            tensor_bytes: got,
            peak_rss_mib: f.peak_rss_mib,
        }
    }
}

/// The tensors' bytes in `files`: a safetensors file is an 8-byte header length, the header,
/// then the tensors' data and nothing else (the format refuses gaps), so only that length is read.
fn tensor_bytes(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|p| {
            let mut len = [0u8; 8];
            std::io::Read::read_exact(&mut File::open(p).unwrap(), &mut len).unwrap();
            std::fs::metadata(p).unwrap().len() - 8 - u64::from_le_bytes(len)
        })
        .sum()
}

/// Run:ai's Model Streamer (what KAITO's vLLM runs: `--load-format runai_streamer` from `az://`
/// on every start, no node cache) against modelcache's node cache, on the same HTTPS loopback
/// Blob server, in three cases: a new node's first start (the streamer's Blob → memory against
/// modelcache's Blob → verified on XFS, then XFS → memory), a restart of the server on the same
/// node (page cache dropped: XFS → memory cold) and a second pod of the same model (page cache
/// warm). Memory reads from local files use the same streamer, so the consumer is the same.
fn bench_streamer(shard_mb: usize) {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools");
    let Some(python) = peers::streamer_python(&tools) else {
        println!(
            "\n## Run:ai Model Streamer\n\nnot run: runai-model-streamer could not be installed"
        );
        return;
    };
    let ca = match TestCa::new() {
        Ok(ca) => ca,
        Err(e) => {
            println!("\n## Run:ai Model Streamer\n\nnot run: {e}");
            return;
        }
    };
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let (files, total) = loopback_model(base.path(), shard_mb);
    let shards: Vec<String> = files
        .iter()
        .map(|f| f.0.clone())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    let source_dir = base.path().join("root/bench/m");
    let tensors = tensor_bytes(
        &shards
            .iter()
            .map(|n| source_dir.join(n))
            .collect::<Vec<_>>(),
    );
    let shard_bytes: u64 = files
        .iter()
        .filter(|f| f.0.ends_with(".safetensors"))
        .map(|f| f.1)
        .sum();
    let (_server, host) = loopback_server(base.path(), None, Some(&ca));
    // The same files behind a link all connections share: the network, not this host's memory,
    // bounds a read from "Blob" there, as the NIC or the account's egress does on a node.
    let link_rate = env_usize("MODELCACHE_BENCH_LINK_MBPS", 200) as u64 * 1_000_000;
    let (_linked, linked_host) =
        loopback_server_on_link(base.path(), None, Some(&ca), Some(link_rate));
    let blob_env_for = |host: &str| {
        let port = host.rsplit(':').next().unwrap_or_default();
        // The streamer's Azure backend builds `https://{account}.{suffix}`; curl resolves any
        // `*.localhost` name to the loopback address itself.
        [
            ("AZURE_STORAGE_ACCOUNT_NAME", support::ACCOUNT.to_string()),
            ("AZURE_STORAGE_ACCOUNT_KEY", support::KEY.to_string()),
            (
                "AZURE_STORAGE_ENDPOINT_SUFFIX",
                format!("blob.localhost:{port}"),
            ),
        ]
    };
    let script = base.path().join("stream.py");
    std::fs::write(&script, peers::STREAMER_SCRIPT).unwrap();
    let xfs = match LoopXfs::new(total * 3 + (1 << 30)) {
        Ok(x) => x,
        Err(e) => {
            println!("\n## Run:ai Model Streamer\n\nnot run: XFS destination: {e}");
            return;
        }
    };
    let cache = xfs.mount.path().join("cache");
    let scratch = base.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let streamer = Streamer {
        python,
        script,
        ca: &ca,
        scratch,
        tensor_bytes: tensors,
    };
    let (blob_env, linked_env) = (blob_env_for(&host), blob_env_for(&linked_host));
    let remote: Vec<String> = shards.iter().map(|n| format!("az://bench/m/{n}")).collect();
    let mut from_blob = Vec::new();
    let mut fill = Vec::new();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut from_linked = Vec::new();
    let mut fill_linked = Vec::new();
    let fill_from = |host: &str| {
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::create_dir_all(&cache).unwrap();
        let mut cmd = https_prefetch(host, &ca, "m", &cache, &[]);
        let (f, out) = peers::measure_with_output("modelcache", &mut cmd, &cache, total);
        let summary: serde_json::Value =
            serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default();
        assert_eq!(summary["verification"], "blake3", "{summary}");
        (f, summary)
    };
    for _ in 0..REPS {
        from_linked.push(streamer.run(&remote, false, &linked_env));
        fill_linked.push(fill_from(&linked_host).0);
        from_blob.push(streamer.run(&remote, false, &blob_env));
        let (f, summary) = fill_from(&host);
        fill.push(f);
        let published = std::path::PathBuf::from(summary["path"].as_str().unwrap());
        let local: Vec<String> = shards
            .iter()
            .map(|n| published.join(n).display().to_string())
            .collect();
        cold.push(streamer.run(&local, true, &[]));
        warm.push(streamer.run(&local, false, &[]));
    }
    let med = |v: &[Streamed]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        v[v.len() / 2]
    };
    let (cold_runs, warm_runs, fill_runs) = (cold.clone(), warm.clone(), fill.clone());
    let (linked_runs, fill_linked_runs) = (from_linked.clone(), fill_linked.clone());
    let (blob, cold, warm) = (med(&from_blob), med(&cold), med(&warm));
    let linked = med(&from_linked);
    let fill = median(fill);
    let fill_linked = median(fill_linked);
    let gb = |b: u64| b as f64 / 1e9;
    let fill_s = gb(total) / fill.gb_per_s;
    println!(
        "\n## Run:ai Model Streamer against the node cache\n\n### HTTPS loopback Blob endpoint, {:.2} GB of safetensors ({} shards, {:.2} GB of tensors; {:.2} GB with the other files modelcache fetches), XFS on a loop device backed by RAM (median of {REPS} interleaved rounds)\n",
        gb(shard_bytes),
        shards.len(),
        gb(tensors),
        gb(total)
    );
    println!("| step | s | GB/s | CPU s | CPU s/GB | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let row = |label: &str, s: &Streamed| {
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            s.seconds,
            gb(s.tensor_bytes) / s.seconds,
            s.cpu_seconds,
            s.cpu_seconds / gb(s.tensor_bytes),
            s.peak_rss_mib
        );
    };
    row("streamer: Blob → memory (KAITO's every start)", &blob);
    println!(
        "| modelcache: Blob → verified on XFS (BLAKE3, defaults) | {fill_s:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
        fill.gb_per_s,
        fill.cpu_s_per_gb * gb(total),
        fill.cpu_s_per_gb,
        fill.peak_rss_mib
    );
    row("streamer: XFS → memory, page cache dropped", &cold);
    row("streamer: XFS → memory, page cache warm", &warm);
    streamer_cases(blob.seconds, fill_s, cold.seconds, warm.seconds);
    println!("\nEvery run, s (streamer from Blob / modelcache fill / cold load / warm load):\n");
    for i in 0..from_blob.len() {
        println!(
            "- round {}: {:.2} / {:.2} / {:.2} / {:.2}",
            i + 1,
            from_blob[i].seconds,
            gb(total) / fill_runs[i].gb_per_s,
            cold_runs[i].seconds,
            warm_runs[i].seconds
        );
    }
    let linked_fill_s = gb(total) / fill_linked.gb_per_s;
    println!(
        "\n### The same, \"Blob\" behind a {:.2} GB/s link all connections share (the network is the bound)\n",
        link_rate as f64 / 1e9
    );
    println!("| step | s | GB/s | CPU s | CPU s/GB | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    row("streamer: Blob → memory over the link", &linked);
    println!(
        "| modelcache: Blob → verified on XFS over the link | {linked_fill_s:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
        fill_linked.gb_per_s,
        fill_linked.cpu_s_per_gb * gb(total),
        fill_linked.cpu_s_per_gb,
        fill_linked.peak_rss_mib
    );
    streamer_cases(linked.seconds, linked_fill_s, cold.seconds, warm.seconds);
    println!("\nEvery run over the link, s (streamer from Blob / modelcache fill):\n");
    for i in 0..linked_runs.len() {
        println!(
            "- round {}: {:.2} / {:.2}",
            i + 1,
            linked_runs[i].seconds,
            gb(total) / fill_linked_runs[i].gb_per_s
        );
    }
}

/// The Dragonfly path against the direct one, on loopback: modelcache's own ranged GETs;
/// through dfdaemon A, which reads the source (back to source); through dfdaemon B, which takes
/// every piece from A (a peer), with each piece hashed as it lands; through dfdaemon C from a
/// peer, with one read after; and through B again, which then holds the model itself.
/// Every round starts two fresh daemons and a fresh scheduler, so each task is new. CPU is
/// modelcache's and, separately, the daemons' (both of them for the peer path: A uploads, B
/// downloads).
fn bench_dragonfly(shard_mb: usize) {
    let Some(bin) = dfdaemon::dfdaemon_bin() else {
        println!("\n## Dragonfly\n\nnot run: dfdaemon is not built (see scripts/test)");
        return;
    };
    // One filesystem for the blob server's model, the caches and dfdaemon's storage (hard
    // links), in RAM, so that the network path and the CPU are what is measured.
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    let (files, total) = loopback_model(base.path(), shard_mb);
    let (_server, host) = loopback_server(base.path(), None, None);
    type Run = (&'static str, Option<&'static str>, &'static [&'static str]);
    // A third daemon for the second peer row: a daemon that already holds the task answers
    // from its own storage, which is the last row.
    let runs: [Run; 5] = [
        ("direct: modelcache's ranged GETs", None, &[]),
        (
            "dfdaemon back to the source, pieces hashed as they land",
            Some("a"),
            &[],
        ),
        (
            "dfdaemon from a peer, pieces hashed as they land",
            Some("b"),
            &[],
        ),
        (
            "dfdaemon from a peer, one read after (`--dragonfly-hash after`)",
            Some("c"),
            &["--dragonfly-hash", "after"],
        ),
        (
            "dfdaemon that already holds the model (its own storage), pieces hashed",
            Some("b"),
            &[],
        ),
    ];
    let mut figures: Vec<Vec<(Figure, f64)>> = vec![Vec::new(); runs.len()];
    for round in 0..REPS {
        let scheduler = scheduler::TestScheduler::start();
        let daemons = base.path().join(format!("daemons-{round}"));
        let a =
            dfdaemon::Daemon::start(&bin, "node-a", &daemons.join("a"), scheduler.port, "50GiB");
        let b =
            dfdaemon::Daemon::start(&bin, "node-b", &daemons.join("b"), scheduler.port, "50GiB");
        let c =
            dfdaemon::Daemon::start(&bin, "node-c", &daemons.join("c"), scheduler.port, "50GiB");
        for (i, (label, via, extra)) in runs.iter().enumerate() {
            let dest = base.path().join("run");
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(&dest).unwrap();
            let mut args: Vec<&str> = extra.to_vec();
            let daemon = match via {
                Some("a") => Some(&a),
                Some("b") => Some(&b),
                Some(_) => Some(&c),
                None => None,
            };
            let socket;
            if let Some(d) = daemon {
                socket = d.socket.display().to_string();
                args.extend(["--dragonfly-socket", socket.as_str()]);
            }
            args.extend(["--concurrency", "16"]);
            let before = a.cpu_seconds() + b.cpu_seconds() + c.cpu_seconds();
            let (figure, out) = peers::measure_with_output(
                label,
                &mut loopback_prefetch(&host, &dest, &args),
                &dest,
                total,
            );
            let daemons_cpu = a.cpu_seconds() + b.cpu_seconds() + c.cpu_seconds() - before;
            let summary: serde_json::Value =
                serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default();
            let origin = &summary["bytes_by_origin"];
            let expected = match via {
                None => "direct",
                Some("a") => "back_to_source",
                Some(_) => "peer",
            };
            let share = origin[expected].as_u64().unwrap_or(0) as f64 / total as f64;
            assert!(
                share > 0.95,
                "{label}: only {:.0}% came {expected}: {summary}",
                share * 100.0
            );
            figures[i].push((figure, daemons_cpu / (total as f64 / 1e9)));
            let _ = std::fs::remove_dir_all(&dest);
        }
        drop((a, b, c));
        let _ = std::fs::remove_dir_all(&daemons);
    }
    println!(
        "\n## Dragonfly\n\n### Loopback Blob endpoint, {:.2} GB ({} files), tmpfs, concurrency 16 (median of {REPS} rounds)\n",
        total as f64 / 1e9,
        files.len()
    );
    println!("| path | GB/s | modelcache CPU s/GB | dfdaemon CPU s/GB | GB/s vs direct |");
    println!("|---|---|---|---|---|");
    let medians: Vec<(Figure, f64)> = figures
        .into_iter()
        .map(|mut f| {
            f.sort_by(|x, y| x.0.gb_per_s.total_cmp(&y.0.gb_per_s));
            f[f.len() / 2]
        })
        .collect();
    let direct = medians[0].0.gb_per_s;
    for ((label, _, _), (f, daemon_cpu)) in runs.iter().zip(&medians) {
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2}× |",
            f.gb_per_s,
            f.cpu_s_per_gb,
            daemon_cpu,
            f.gb_per_s / direct
        );
    }
}

/// What taking dfdaemon's files into the agent's own inodes costs: the clone (or copy) and the
/// read of the clone for its hash, against hashing dfdaemon's file in place as before, on XFS
/// with reflinks and ext4 (loop devices, root only) and tmpfs.
fn bench_take(file_mb: usize) {
    use modelcache::store::take;
    use modelcache::verify::hash::{hash_file_pieces, piece_count};
    let size = (file_mb as u64) << 20;
    let chunk: u64 = 64 << 20;
    let pieces: Vec<u64> = (0..piece_count(size, chunk)).collect();
    println!(
        "\n## Taking dfdaemon's files\n\n### {file_mb} MiB file, 64 MiB pieces, hashed on 2 threads (median of {REPS})\n"
    );
    println!(
        "| filesystem | hash dfdaemon's file in place, as written (before) | take: clone or copy into the agent's inode | hash the agent's file (after) | method | after / before |"
    );
    println!("|---|---|---|---|---|---|");
    let mut kinds: Vec<(&str, Option<&str>)> = vec![("tmpfs", None)];
    if support::is_root() {
        kinds.insert(0, ("ext4 (loop device)", Some("ext4")));
        kinds.insert(0, ("XFS, reflink=1 (loop device)", Some("xfs")));
    }
    for (label, mkfs) in kinds {
        let mount = tempfile::tempdir_in(if mkfs.is_some() { "/tmp" } else { "/dev/shm" })
            .unwrap_or_else(|_| tempfile::tempdir().unwrap());
        let device = match mkfs {
            Some(fs) => {
                let Some(device) = support::LoopDevice::new((file_mb as u64) * 3 + 600) else {
                    continue;
                };
                let mut cmd = std::process::Command::new(format!("mkfs.{fs}"));
                if fs == "xfs" {
                    cmd.args(["-q", "-f", "-m", "reflink=1"]);
                } else {
                    cmd.args(["-q", "-F"]);
                }
                assert!(cmd.arg(&device.path).status().unwrap().success());
                let mounted = std::process::Command::new("mount")
                    .arg(&device.path)
                    .arg(mount.path())
                    .status()
                    .unwrap();
                assert!(mounted.success());
                Some(device)
            }
            None => None,
        };
        let (mut before, mut cloning, mut after) = (Vec::new(), Vec::new(), Vec::new());
        let mut method = String::new();
        for round in 0..REPS {
            let theirs_dir =
                take::ForeignDir::open(mount.path(), Path::new(&format!("theirs-{round}")))
                    .unwrap();
            let theirs = theirs_dir.path().join("0.part");
            let mut data = vec![0u8; 1 << 20];
            {
                let f = File::create(&theirs).unwrap();
                for i in 0..file_mb as u64 {
                    data.iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = ((i + j as u64) % 251) as u8);
                    f.write_all_at(&data, i << 20).unwrap();
                }
                f.sync_all().unwrap();
            }
            let started = Instant::now();
            hash_file_pieces(&theirs, &pieces, chunk, size, 2).unwrap();
            before.push(started.elapsed().as_secs_f64());
            let ours_path = mount.path().join(format!("ours-{round}"));
            let started = Instant::now();
            let from = theirs_dir.open_regular("0.part").unwrap();
            let ours = take::create_own(&ours_path, size).unwrap();
            let mut methods = Vec::new();
            for &p in &pieces {
                let start = p * chunk;
                methods
                    .push(take::clone_range(&from, &ours, start, chunk.min(size - start)).unwrap());
            }
            ours.sync_all().unwrap();
            cloning.push(started.elapsed().as_secs_f64());
            method = methods[0].to_string();
            let started = Instant::now();
            hash_file_pieces(&ours_path, &pieces, chunk, size, 2).unwrap();
            after.push(started.elapsed().as_secs_f64());
            let _ = std::fs::remove_dir_all(theirs_dir.path());
            let _ = std::fs::remove_file(&ours_path);
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (b, c, a) = (med(before), med(cloning), med(after));
        let gbs = |t: f64| size as f64 / 1e9 / t;
        println!(
            "| {label} | {b:.2} s ({:.2} GB/s) | {c:.3} s | {a:.2} s ({:.2} GB/s) | {method} | {:.2}× |",
            gbs(b),
            gbs(a),
            (c + a) / b
        );
        if device.is_some() {
            let _ = std::process::Command::new("umount")
                .arg(mount.path())
                .status();
        }
        drop(device);
    }
}

/// Why the signer cannot run here, if it cannot: `model_signing` in `.tools/py` and openssl.
fn signer_missing(python: &Path) -> Option<String> {
    let works = |cmd: &mut std::process::Command| {
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !works(std::process::Command::new(python).args(["-c", "import model_signing"])) {
        return Some(format!(
            "model_signing is not installed in {} (scripts/test installs it)",
            python.display()
        ));
    }
    if !works(std::process::Command::new("openssl").arg("version")) {
        return Some("openssl is not on PATH".into());
    }
    None
}

/// Runs a setup command, panicking with its stderr if it fails.
fn setup(what: &str, cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One way the model is put in the source for [`bench_signed`].
struct Variant {
    label: &'static str,
    /// Its prefix in the loopback container: a model directory of its own, so the signer sees
    /// only this variant's files.
    prefix: &'static str,
    /// With `modelcache.manifest.json`.
    manifest: bool,
    /// Signed by the reference signer with this hash of whole files.
    hash: Option<&'static str>,
    /// The summary's `verification` it must end with.
    verification: &'static str,
}

/// Verifying a signed model end to end: the demo's GPT-OSS-shaped model (`cargo run -- demo`,
/// shards of `shard_mb` MiB) from the loopback Blob endpoint to tmpfs, with its manifest and no
/// signature (the baseline), signed by the reference signer with SHA-256 of whole files (its
/// default: read back in order as the ranges land, besides BLAKE3) and with BLAKE3 of whole
/// files (the signature is the manifest), interleaved round by round.
///
/// `MODELCACHE_BENCH_SIGNED_DIAGNOSE=1` adds two rows that split the SHA-256 row's cost: SHA-256
/// signed with a manifest too (reads unsplit), and neither manifest nor signature (reads split
/// into 4 MiB pieces for Blob's transactional MD5, which this endpoint does not send).
/// `MODELCACHE_BENCH_SIGNED_RATE` caps the endpoint per connection (bytes/s) and
/// `MODELCACHE_BENCH_SIGNED_CHUNK` sets `--chunk-size`, to see whether the read-back keeps up
/// with a download the CPU does not limit.
fn bench_signed(shard_mb: usize) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/py/bin/python");
    if let Some(why) = signer_missing(&python) {
        println!("\n## Signed models end to end\n\nnot run: {why}");
        return;
    }
    let rate = std::env::var("MODELCACHE_BENCH_SIGNED_RATE")
        .ok()
        .and_then(|r| r.parse::<u64>().ok());
    let chunk = std::env::var("MODELCACHE_BENCH_SIGNED_CHUNK").ok();
    let base = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
    support::ec_key(base.path(), "publisher");
    support::openssl(
        base.path(),
        &[
            "ec",
            "-in",
            "publisher.key",
            "-pubout",
            "-out",
            "publisher.pub.pem",
        ],
    );
    let key = base.path().join("publisher.key");
    let public = base.path().join("publisher.pub.pem");
    let trusted = public.display().to_string();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/oms_sign.py");
    let mut variants = vec![
        Variant {
            label: "manifest only (`modelcache.manifest.json`, no signature)",
            prefix: "manifest",
            manifest: true,
            hash: None,
            verification: "blake3",
        },
        Variant {
            label: "signed, SHA-256 of files (the signer's default), no manifest",
            prefix: "sha256",
            manifest: false,
            hash: Some("sha256"),
            verification: "signature",
        },
        Variant {
            label: "signed, BLAKE3 of files, no manifest",
            prefix: "blake3",
            manifest: false,
            hash: Some("blake3"),
            verification: "blake3",
        },
    ];
    if std::env::var("MODELCACHE_BENCH_SIGNED_DIAGNOSE").is_ok_and(|v| v == "1") {
        variants.push(Variant {
            label: "diagnostic: signed, SHA-256 of files, with a manifest too",
            prefix: "sha256-manifest",
            manifest: true,
            hash: Some("sha256"),
            verification: "blake3",
        });
        variants.push(Variant {
            label: "diagnostic: neither manifest nor signature",
            prefix: "bare",
            manifest: false,
            hash: None,
            verification: "structural",
        });
    }
    let shape = modelcache::demo::DemoShape {
        shard_bytes: shard_mb << 20,
        ..modelcache::demo::DemoShape::default()
    };
    for v in &variants {
        let dir = base.path().join("root/bench").join(v.prefix);
        modelcache::demo::generate_model(&dir, &shape).unwrap();
        if v.manifest {
            setup(
                &format!("{}: modelcache manifest", v.prefix),
                support::modelcache()
                    .args(["manifest", "--upload"])
                    .arg(format!("--source=file://{}", dir.display())),
            );
        }
        if let Some(hash) = v.hash {
            setup(
                &format!("{}: oms_sign.py", v.prefix),
                std::process::Command::new(&python)
                    .arg(&script)
                    .args(["key", hash, "files"])
                    .arg(&dir)
                    .arg(dir.join("model.sig"))
                    .arg(&key),
            );
        }
    }
    // What the default selection fetches: the same files in every variant.
    let files = selected(&base.path().join("root/bench/manifest"));
    let total: u64 = files.iter().map(|f| f.1).sum();
    let gb = total as f64 / 1e9;
    let (_server, host) = loopback_server(base.path(), rate, None);
    let dest = base.path().join("dest");
    // Wall s, CPU s and peak RSS MiB of each run, per variant.
    let mut runs: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); variants.len()];
    for _ in 0..REPS {
        for (i, v) in variants.iter().enumerate() {
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::create_dir_all(&dest).unwrap();
            let mut extra: Vec<&str> = Vec::new();
            if v.hash.is_some() {
                extra.extend(["--signature", "required", "--trusted", &trusted]);
            }
            if let Some(chunk) = &chunk {
                extra.extend(["--chunk-size", chunk]);
            }
            let source = format!("az://bench/{}", v.prefix);
            let mut cmd = prefetch_cmd(Some(&host), &source, &dest, &extra);
            let (f, out) = peers::measure_with_output(v.label, &mut cmd, &dest, total);
            let s: serde_json::Value =
                serde_json::from_str(out.lines().last().unwrap_or("{}")).unwrap_or_default();
            assert_eq!(s["verification"], v.verification, "{}: {s}", v.label);
            assert_eq!(s["bytes_fetched"], total, "{}: {s}", v.label);
            match v.hash {
                Some(hash) => assert_eq!(s["signature"]["hash"], hash, "{}: {s}", v.label),
                None => assert!(s["signature"].is_null(), "{}: {s}", v.label),
            }
            runs[i].push((gb / f.gb_per_s, f.cpu_s_per_gb * gb, f.peak_rss_mib));
        }
    }
    let _ = std::fs::remove_dir_all(&dest);
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<(f64, f64, f64)> = runs
        .iter()
        .map(|r| {
            (
                med(r.iter().map(|x| x.0).collect()),
                med(r.iter().map(|x| x.1).collect()),
                med(r.iter().map(|x| x.2).collect()),
            )
        })
        .collect();
    let endpoint = rate.map_or_else(
        || "uncapped".to_string(),
        |r| format!("capped at {:.0} MB/s per connection", r as f64 / 1e6),
    );
    println!(
        "\n## Signed models end to end\n\n### Loopback Blob endpoint ({endpoint}), the demo's model ({shard_mb} MiB shards): {gb:.2} GB ({} files) fetched to tmpfs, chunk {} (median of {REPS} interleaved rounds, each column on its own)\n",
        files.len(),
        chunk.as_deref().unwrap_or("default")
    );
    println!(
        "| model in the source | verification | wall s | CPU s | CPU s/GB | peak RSS MiB | wall vs manifest | CPU vs manifest |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (base_wall, base_cpu, _) = medians[0];
    for (v, (wall, cpu, rss)) in variants.iter().zip(&medians) {
        println!(
            "| {} | {} | {wall:.2} | {cpu:.2} | {:.2} | {rss:.0} | {:+.2} s | {:+.2} s ({:+.2} s/GB) |",
            v.label,
            v.verification,
            cpu / gb,
            wall - base_wall,
            cpu - base_cpu,
            (cpu - base_cpu) / gb
        );
    }
    println!("\nEvery run (wall s / CPU s / peak RSS MiB):\n");
    for (v, r) in variants.iter().zip(&runs) {
        let each: Vec<String> = r
            .iter()
            .map(|(w, c, m)| format!("{w:.2} / {c:.2} / {m:.0}"))
            .collect();
        println!("- {}: {}", v.label, each.join(", "));
    }
}

/// Kills the child when dropped, also when the benchmark panics.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rows of the loopback table the ratios use.
const UNHASHED: usize = 1;
const SDK: usize = 4;
const RCLONE: usize = 5;
const PLAIN_WRITE: usize = 6;

/// The plain client's fixed shape.
const PLAIN_CONCURRENCY: usize = 8;
const PLAIN_CHUNK: u64 = 64 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Helper processes the loopback section starts (so their CPU and memory are their own).
    if let Some(i) = args.iter().position(|a| a == "--serve-blob") {
        let rate = args.get(i + 2).and_then(|r| r.parse().ok());
        let tls = args
            .iter()
            .position(|a| a == "--tls")
            .map(|t| blobserver::tls_config(Path::new(&args[t + 1]), Path::new(&args[t + 2])));
        if let Some(l) = args.iter().position(|a| a == "--link") {
            blobserver::set_link_rate(args[l + 1].parse().expect("--link BYTES_PER_SECOND"));
        }
        blobserver::serve(PathBuf::from(&args[i + 1]), rate, tls);
    }
    if let Some(i) = args.iter().position(|a| a == "--plain-get-hyper") {
        peers::plain_get_hyper(
            &args[i + 1],
            Path::new(&args[i + 2]),
            args[i + 3].parse().unwrap(),
            args[i + 4].parse().unwrap(),
            args[i + 5].parse().unwrap(),
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--source-get") {
        peers::source_get(
            &args[i + 1],
            args[i + 2].parse().unwrap(),
            args[i + 3].parse().unwrap(),
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--plain-get") {
        let dest = (args[i + 3] != "-").then(|| PathBuf::from(&args[i + 3]));
        peers::plain_get(
            &args[i + 1],
            Path::new(&args[i + 2]),
            dest.as_deref(),
            args[i + 4].parse().unwrap(),
            args[i + 5].parse().unwrap(),
        );
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: do no work then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    machine();
    let only = std::env::var("MODELCACHE_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "loopback" {
        bench_loopback(env_usize("MODELCACHE_BENCH_LOOPBACK_SHARD_MB", 100), false);
    }
    if only.is_empty() || only == "https" {
        bench_loopback(env_usize("MODELCACHE_BENCH_LOOPBACK_SHARD_MB", 100), true);
    }
    if only.is_empty() || only == "client" {
        bench_client(env_usize("MODELCACHE_BENCH_LOOPBACK_SHARD_MB", 100));
    }
    if only.is_empty() || only == "streamer" {
        bench_streamer(env_usize("MODELCACHE_BENCH_LOOPBACK_SHARD_MB", 100));
    }
    if only.is_empty() || only == "adaptive" {
        bench_adaptive(env_usize("MODELCACHE_BENCH_ADAPTIVE_SHARD_MB", 200));
    }
    if only.is_empty() || only == "file" {
        bench_file(env_usize("MODELCACHE_BENCH_SHARD_MB", 64));
    }
    if only.is_empty() || only == "dragonfly" {
        bench_dragonfly(env_usize("MODELCACHE_BENCH_DRAGONFLY_SHARD_MB", 64));
    }
    if only.is_empty() || only == "signed" {
        bench_signed(env_usize("MODELCACHE_BENCH_SIGNED_SHARD_MB", 20));
    }
    if only.is_empty() || only == "take" {
        bench_take(env_usize("MODELCACHE_BENCH_TAKE_MB", 1024));
    }
    if only.is_empty() || only == "azurite" {
        bench_azurite(env_usize("MODELCACHE_BENCH_AZURITE_SHARD_MB", 8));
    }
}
