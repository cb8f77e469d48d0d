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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};

const REPS: usize = 3;

#[derive(Clone, Copy, Debug, Default)]
struct Figure {
    gb_per_s: f64,
    cpu_s_per_gb: f64,
    peak_rss_mib: f64,
}

fn median(mut v: Vec<Figure>) -> Figure {
    v.sort_by(|a, b| a.gb_per_s.total_cmp(&b.gb_per_s));
    v[v.len() / 2]
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
    let mut cmd = support::modelcache();
    if let Some(e) = emulator {
        support::with_emulator(&mut cmd, e);
    }
    cmd.env("MODELCACHE_LOG", "warn")
        .args([
            "prefetch",
            "--json",
            "--model",
            "bench",
            "--chunk-size",
            chunk,
        ])
        .args([
            "--concurrency",
            &concurrency.to_string(),
            "--source",
            source,
        ])
        .arg("--cache-root")
        .arg(cache);
    if !hash {
        cmd.arg("--no-hash");
    }
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

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: do no work then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    machine();
    bench_file(env_usize("MODELCACHE_BENCH_SHARD_MB", 64));
    bench_azurite(env_usize("MODELCACHE_BENCH_AZURITE_SHARD_MB", 8));
}
