//! `cargo bench --bench hashes`: what one core spends per GB on each digest modelcache computes,
//! or would compute, over a model's bytes.
//!
//! - BLAKE3 as a download hashes: 64 MiB pieces, each fed 1 MiB at a time (the fetch's write
//!   buffer) through `verify::hash::PieceHasher`, then `combine`d into the file's hash.
//! - SHA-256 as a signed model's per-file digests need it: the file in order, in 8 MiB updates,
//!   with aws-lc-rs (`digest::Context`) and with the `sha2` crate (already in the lock file).
//! - MD5 (the `md-5` crate behind Blob's transactional MD5) in the same 8 MiB updates, for
//!   reference.
//!
//! The bytes are pseudo-random and held in RAM (`MODELCACHE_BENCH_HASH_MIB`, default 2048), so no
//! disk or page cache is measured. Every algorithm runs on this one thread; each round runs them
//! all once, in turn, and each figure is the median of three rounds. CPU is this thread's user +
//! system time (`getrusage(RUSAGE_THREAD)`); GB is 10^9 bytes. Prints a Markdown table.

use std::hint::black_box;
use std::time::Instant;

use modelcache::verify::hash::{PieceDigest, PieceHasher, combine};
use sha2::Digest as _;

const ROUNDS: usize = 3;
/// The fetch's range size (`fetch.chunk_size` default), so BLAKE3's pieces.
const PIECE: usize = 64 << 20;
/// The bytes the fetch gathers before one hash-and-write call (`pieces.rs`, `WRITE_BUFFER`).
const PIECE_UPDATE: usize = 1 << 20;
/// The read size for the SHA-256 (and MD5) pass over a file.
const READ: usize = 8 << 20;

/// One algorithm: its label and a function from the bytes to their digest.
type Algorithm = (&'static str, fn(&[u8]) -> Vec<u8>);

const ALGORITHMS: [Algorithm; 4] = [
    (
        "BLAKE3, 64 MiB pieces in 1 MiB updates, combined (modelcache)",
        blake3_pieces,
    ),
    ("SHA-256, aws-lc-rs, 8 MiB updates", sha256_aws_lc),
    ("SHA-256, sha2 0.10, 8 MiB updates", sha256_sha2),
    ("MD5, md-5 0.10, 8 MiB updates (reference)", md5_digest),
];

fn blake3_pieces(data: &[u8]) -> Vec<u8> {
    let whole_file = data.len() <= PIECE;
    let digests: Vec<PieceDigest> = data
        .chunks(PIECE)
        .enumerate()
        .map(|(i, piece)| {
            let mut hasher = PieceHasher::new((i * PIECE) as u64, whole_file);
            for part in piece.chunks(PIECE_UPDATE) {
                hasher.update(part);
            }
            hasher.finish()
        })
        .collect();
    combine(&digests).as_bytes().to_vec()
}

fn sha256_aws_lc(data: &[u8]) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in data.chunks(READ) {
        ctx.update(part);
    }
    ctx.finish().as_ref().to_vec()
}

fn sha256_sha2(data: &[u8]) -> Vec<u8> {
    let mut hasher = sha2::Sha256::new();
    for part in data.chunks(READ) {
        hasher.update(part);
    }
    hasher.finalize().to_vec()
}

fn md5_digest(data: &[u8]) -> Vec<u8> {
    let mut hasher = md5::Md5::new();
    for part in data.chunks(READ) {
        hasher.update(part);
    }
    hasher.finalize().to_vec()
}

/// This thread's user + system CPU seconds.
fn thread_cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage(RUSAGE_THREAD)");
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 + v.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

/// One run of one algorithm: GB/s (wall) and CPU seconds per GB.
#[derive(Debug, Clone, Copy)]
struct Figure {
    gb_per_s: f64,
    cpu_s_per_gb: f64,
}

fn measure(f: fn(&[u8]) -> Vec<u8>, data: &[u8]) -> (Figure, Vec<u8>) {
    let gb = data.len() as f64 / 1e9;
    let cpu = thread_cpu_seconds();
    let wall = Instant::now();
    let digest = black_box(f(black_box(data)));
    let wall = wall.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu;
    let figure = Figure {
        gb_per_s: gb / wall,
        cpu_s_per_gb: cpu / gb,
    };
    (figure, digest)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    println!(
        "machine: {} cores, {} (family {}, model {}); CPU features: {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        field("model name"),
        field("cpu family"),
        field("model\t"),
        cpu_features()
    );
}

#[cfg(target_arch = "x86_64")]
fn cpu_features() -> String {
    let yes_no = |present: bool| if present { "yes" } else { "no" };
    format!(
        "sha_ni {}, avx2 {}, avx512f {}",
        yes_no(std::arch::is_x86_feature_detected!("sha")),
        yes_no(std::arch::is_x86_feature_detected!("avx2")),
        yes_no(std::arch::is_x86_feature_detected!("avx512f")),
    )
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_features() -> String {
    "not x86_64".to_string()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: do no work then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    machine();
    let mib: usize = std::env::var("MODELCACHE_BENCH_HASH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let mut data = vec![0u8; mib << 20];
    fastrand::Rng::with_seed(0x6d6f_6465_6c63).fill(&mut data);

    // The digests must be right before their speed means anything.
    let blake3_reference = blake3::hash(&data);
    assert_eq!(blake3_pieces(&data), blake3_reference.as_bytes().to_vec());
    assert_eq!(sha256_aws_lc(&data), sha256_sha2(&data));

    let mut figures: Vec<Vec<Figure>> = vec![Vec::new(); ALGORITHMS.len()];
    for round in 1..=ROUNDS {
        for ((label, f), runs) in ALGORITHMS.iter().zip(&mut figures) {
            let (figure, digest) = measure(*f, &data);
            eprintln!(
                "round {round}: {label}: {:.3} GB/s, {:.3} CPU s/GB, {}",
                figure.gb_per_s,
                figure.cpu_s_per_gb,
                hex(&digest)
            );
            runs.push(figure);
        }
    }

    println!(
        "\n### {mib} MiB in RAM, one thread (median of {ROUNDS} interleaved rounds)\n\n\
         | algorithm | GB/s | CPU s/GB | CPU / BLAKE3's |\n|---|---|---|---|"
    );
    let medians: Vec<(f64, f64)> = figures
        .iter()
        .map(|runs| {
            (
                median(runs.iter().map(|f| f.gb_per_s).collect()),
                median(runs.iter().map(|f| f.cpu_s_per_gb).collect()),
            )
        })
        .collect();
    let blake3_cpu = medians[0].1;
    for ((label, _), (gb_per_s, cpu)) in ALGORITHMS.iter().zip(&medians) {
        println!(
            "| {label} | {gb_per_s:.2} | {cpu:.3} | {:.2}× |",
            cpu / blake3_cpu
        );
    }
}
