//! The Dragonfly path against the real dfdaemon (dragonfly-client 1.5.10, built by the test
//! command into a cache directory outside the clone), two of them on this host as two nodes,
//! with the test scheduler and Azurite behind the byte-counting fault proxy.

pub mod daemon;
pub mod scheduler;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::FaultProxy;
use crate::support::*;
use daemon::{Daemon, dfdaemon_bin};
use scheduler::TestScheduler;

/// Azurite behind a byte-counting proxy, a model with a manifest, the test scheduler and the
/// dfdaemon binary; `None` after a loud skip (or a failure in CI).
struct Fleet {
    bin: PathBuf,
    proxy: FaultProxy,
    model: AzureModel,
    scheduler: TestScheduler,
    root: tempfile::TempDir,
}

/// Shards above dfdaemon's smallest piece (4 MiB): a file at or under it bypasses the
/// scheduler and always comes from the source.
const SHARD_BYTES: usize = 12 << 20;

fn fleet() -> Option<Fleet> {
    fleet_with(true)
}

/// A fleet whose model has a manifest or not (`with_manifest`).
fn fleet_with(with_manifest: bool) -> Option<Fleet> {
    let Some(bin) = dfdaemon_bin() else {
        skip_or_fail(
            "dfdaemon is not built (the README's test command builds dragonfly-client 1.5.10 into /var/cache/modelcache-tools; set DFDAEMON_BIN to use another)",
        );
        return None;
    };
    let az = azurite()?;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt.block_on(azure_model(az, SHARD_BYTES, with_manifest));
    let proxy = FaultProxy::start(az.port);
    Some(Fleet {
        bin,
        proxy,
        model,
        scheduler: TestScheduler::start(),
        root: tempfile::tempdir().unwrap(),
    })
}

impl Fleet {
    fn daemon(&self, name: &str, upload_limit: &str) -> Daemon {
        Daemon::start(
            &self.bin,
            name,
            &self.root.path().join(name),
            self.scheduler.port,
            upload_limit,
        )
    }

    /// A node's cache, on the same filesystem as its dfdaemon's storage (hard links work).
    fn cache(&self, name: &str) -> PathBuf {
        let p = self.root.path().join(format!("{name}-cache"));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn prefetch(&self, cache: &Path, socket: &Path, extra: &[&str]) -> Command {
        let mut args = vec!["--chunk-size", "1MiB", "--concurrency", "8"];
        args.extend_from_slice(&["--dragonfly-socket", socket.to_str().unwrap()]);
        args.extend_from_slice(extra);
        prefetch_cmd(
            Some(&self.proxy.endpoint()),
            &self.model.url(),
            cache,
            &args,
        )
    }

    /// Node A fetches the model through `a`; returns once A's daemon has told the scheduler
    /// it holds every shard (the files dfdaemon takes through the scheduler: over 4 MiB).
    fn seed_node_a(&self, a: &Daemon, cache_a: &Path) -> serde_json::Value {
        let s = summary(&run(
            &mut self.prefetch(cache_a, &a.socket, &[]),
            Duration::from_secs(300),
        ));
        self.scheduler.until_finished(&a.name, 15);
        s
    }

    fn model_bytes(&self) -> u64 {
        files_under(self.model.source.path())
            .iter()
            .filter(|f| !f.starts_with("original/") && !f.starts_with("metal/"))
            .map(|f| {
                std::fs::metadata(self.model.source.path().join(f))
                    .unwrap()
                    .len()
            })
            .sum()
    }
}

fn published(cache: &Path) -> PathBuf {
    cache.join("models/gpt-oss-120b")
}

fn origin(s: &serde_json::Value, key: &str) -> u64 {
    s["bytes_by_origin"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no bytes_by_origin.{key} in {s}"))
}

/// Node A fetches through its dfdaemon: the source serves about the model once. Node B then
/// fetches through its own dfdaemon with A's as the parent: under 1% of the model comes from
/// the source. Both publish the model byte-identical and BLAKE3-verified.
#[test]
fn a_second_node_takes_the_model_from_the_first_and_barely_touches_the_source() {
    let Some(f) = fleet() else { return };
    let a = f.daemon("node-a", "10GiB");
    let b = f.daemon("node-b", "10GiB");
    let model = f.model_bytes();

    let (cache_a, cache_b) = (f.cache("a"), f.cache("b"));
    let before = f.proxy.served();
    let out = run(
        &mut f.prefetch(&cache_a, &a.socket, &[]),
        Duration::from_secs(300),
    );
    let s = summary(&out);
    let source_a = f.proxy.served() - before;
    assert_eq!(s["verification"], "blake3", "{s}");
    assert_eq!(s["dragonfly"]["rejected"], 0, "{s}");
    assert_eq!(
        s["dragonfly"]["fallbacks"],
        0,
        "{}\n{}",
        stderr(&out),
        a.logs()
    );
    assert!(
        origin(&s, "back_to_source") >= model * 9 / 10,
        "A's dfdaemon read the source: {s}"
    );
    assert!(
        source_a >= model && source_a < model + model / 10,
        "the source served A about the model once: {source_a} bytes for a {model}-byte model"
    );
    assert_published_identical(f.model.source.path(), &published(&cache_a));
    f.scheduler.until_finished(&a.name, 15);

    // B hashes each file in one read once dfdaemon is done (A hashed pieces as they landed):
    // both ways of checking peers' bytes end in the same verified model.
    let before = f.proxy.served();
    let out = run(
        &mut f.prefetch(&cache_b, &b.socket, &["--dragonfly-hash", "after"]),
        Duration::from_secs(300),
    );
    let s = summary(&out);
    let source_b = f.proxy.served() - before;
    assert_eq!(s["verification"], "blake3", "{s}");
    assert_eq!(
        s["dragonfly"]["fallbacks"],
        0,
        "{}\n{}",
        stderr(&out),
        b.logs()
    );
    assert!(
        origin(&s, "peer") >= model * 9 / 10,
        "B's bytes came from A: {s}"
    );
    assert!(
        source_b * 100 < model,
        "B read {source_b} bytes from the source for a {model}-byte model (limit 1%): {s}\n{}",
        stderr(&out)
    );
    assert_published_identical(f.model.source.path(), &published(&cache_b));
    for cache in [&cache_a, &cache_b] {
        let v = verify_model(cache);
        assert!(v.status.success(), "verify: {}", stderr(&v));
    }
    let host_a = f.scheduler.host_id("node-a").expect("A announced itself");
    assert!(
        f.scheduler
            .decisions()
            .iter()
            .any(|d| d.parent_host.as_deref() == Some(host_a.as_str())),
        "the scheduler named A as a parent: {:?}",
        f.scheduler.decisions()
    );
    report(&format!(
        "dragonfly two nodes: model {model} B; source served A {source_a} B, B {source_b} B ({:.3}% of the model)",
        source_b as f64 * 100.0 / model as f64
    ));
}

/// dfdaemon A dies while B is taking the model from it: B still publishes the whole model,
/// verified, its missing pieces from the source (through its dfdaemon, or directly).
#[test]
fn a_parent_killed_mid_transfer_leaves_the_second_node_to_finish() {
    let Some(f) = fleet() else { return };
    // A serves peers slowly, so that B is mid-transfer when A dies.
    let mut a = f.daemon("node-a", "8MiB");
    let b = f.daemon("node-b", "10GiB");
    let (cache_a, cache_b) = (f.cache("a"), f.cache("b"));
    f.seed_node_a(&a, &cache_a);

    let child = f
        .prefetch(&cache_b, &b.socket, &["--dragonfly-stall-timeout", "5s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill A once B reports bytes from it (its progress file, as `wait --cache-root` reads it).
    let progress = cache_b.join("progress/gpt-oss-120b.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let peer = std::fs::read(&progress)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|p| p["by_origin"]["peer"].as_u64())
            .unwrap_or(0);
        if peer > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "B never took a piece from A");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.kill();
    let out = wait_with_limit(child, Duration::from_secs(300));
    let s = summary(&out);
    assert_eq!(s["verification"], "blake3", "{s}");
    assert!(
        origin(&s, "peer") > 0,
        "B had pieces from A before it died: {s}\n{:?}\n{}",
        f.scheduler.decisions(),
        b.logs()
    );
    assert!(
        origin(&s, "peer") < f.model_bytes(),
        "A died before B had everything from it: {s}"
    );
    assert_published_identical(f.model.source.path(), &published(&cache_b));
    report(&format!(
        "dragonfly parent killed: B from peer {} B, dfdaemon back-to-source {} B, direct {} B; {} files direct",
        origin(&s, "peer"),
        origin(&s, "back_to_source"),
        origin(&s, "direct"),
        s["dragonfly"]["fallbacks"]
    ));
}

/// A peer serving slower than the floor: B gives up on Dragonfly for each file once the grace
/// has passed, saying so, and fetches it directly.
#[test]
fn a_transfer_slower_than_the_floor_is_fetched_directly() {
    let Some(f) = fleet() else { return };
    let a = f.daemon("node-a", "2MiB");
    let b = f.daemon("node-b", "10GiB");
    let (cache_a, cache_b) = (f.cache("a"), f.cache("b"));
    f.seed_node_a(&a, &cache_a);
    let out = run(
        &mut f.prefetch(
            &cache_b,
            &b.socket,
            &["--dragonfly-min-rate", "20MB", "--dragonfly-grace", "2s"],
        ),
        Duration::from_secs(300),
    );
    let s = summary(&out);
    let log = stderr(&out);
    assert!(
        log.contains("the transfer is too slow") && log.contains("fetching it directly"),
        "{log}"
    );
    assert!(s["dragonfly"]["fallbacks"].as_u64().unwrap() > 0, "{s}");
    assert!(origin(&s, "direct") >= SHARD_BYTES as u64 / 2, "{s}");
    assert_published_identical(f.model.source.path(), &published(&cache_b));
}

use std::os::unix::fs::MetadataExt;

/// A peer serving a byte that is not the model's, under a matching CRC32 (dfdaemon's own piece
/// check passes): modelcache's BLAKE3 catches it, fetches that file directly, and the model is
/// published right.
#[test]
fn a_peer_serving_a_flipped_byte_is_caught_and_the_file_fetched_directly() {
    let Some(f) = fleet() else { return };
    let mut a = f.daemon("node-a", "10GiB");
    let b = f.daemon("node-b", "10GiB");
    let (cache_a, cache_b) = (f.cache("a"), f.cache("b"));
    f.seed_node_a(&a, &cache_a);

    // A's copy of one shard in its dfdaemon storage, altered near its end with four more bytes
    // that keep the piece's CRC32.
    let shard = "model-00007-of-00014.safetensors";
    let stored = stored_copy(&a, &published(&cache_a).join(shard));
    let mut bytes = std::fs::read(&stored).unwrap();
    let crc_before = crc32fast::hash(&bytes);
    forge_same_crc(&mut bytes);
    assert_eq!(
        crc32fast::hash(&bytes),
        crc_before,
        "the forgery keeps the CRC32"
    );
    let copy = stored.with_extension("forged");
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::rename(&copy, &stored).unwrap();
    // A restarted dfdaemon serves from its storage, not from what it held in memory.
    a.restart(&f.bin);

    let out = run(
        &mut f.prefetch(&cache_b, &b.socket, &[]),
        Duration::from_secs(300),
    );
    let s = summary(&out);
    let log = stderr(&out);
    assert_eq!(
        s["dragonfly"]["rejected"],
        1,
        "{s}\n{log}\nB's dfdaemon: {}",
        b.logs()
    );
    assert!(
        log.contains(shard) && log.contains("does not match the manifest"),
        "the log names the rejected file: {log}"
    );
    let shard_size = std::fs::metadata(f.model.source.path().join(shard))
        .unwrap()
        .len();
    assert!(
        origin(&s, "direct") >= shard_size,
        "the shard came directly: {s}"
    );
    assert_published_identical(f.model.source.path(), &published(&cache_b));
    assert_published_identical(f.model.source.path(), &published(&cache_a));
}

/// A model signed with SHA-256 (the reference signer's default) and no manifest comes through
/// dfdaemon too: each file's SHA-256 is checked on modelcache's own clone before it is adopted
/// (and not read again at the end). A peer's forged byte that keeps dfdaemon's CRC32 is caught
/// by the signature and the file fetched directly. Signed again with BLAKE3, the signature is
/// the manifest: the same path checks it like one. Signed again with a certificate chain over
/// SHA-256 shards: each shard is checked on the clone.
#[test]
fn a_signed_model_without_a_manifest_comes_through_dragonfly_checked_against_its_signature() {
    use crate::signing::{By, keys, oms_python, sign};
    let Some(python) = oms_python() else { return };
    let Some(f) = fleet_with(false) else { return };
    let upload_signature = || {
        let bytes = std::fs::read(f.model.source.path().join("model.sig")).unwrap();
        tokio::runtime::Runtime::new().unwrap().block_on(put_small(
            &f.model.store,
            "gpt-oss-120b/model.sig",
            &bytes,
        ));
    };
    sign(&python, f.model.source.path(), By::Key, "sha256", None);
    upload_signature();
    let trusted = keys().public.to_str().unwrap().to_string();
    let signed = ["--signature", "required", "--trusted", trusted.as_str()];
    let mut a = f.daemon("node-a", "10GiB");
    let b = f.daemon("node-b", "10GiB");
    let (cache_a, cache_b, cache_c) = (f.cache("a"), f.cache("b"), f.cache("c"));
    let s = summary(&run(
        &mut f.prefetch(&cache_a, &a.socket, &signed),
        Duration::from_secs(300),
    ));
    f.scheduler.until_finished(&a.name, 15);
    assert_eq!(s["verification"], "signature", "{s}");
    assert_eq!(s["signature"]["hash"], "sha256", "{s}");
    assert_eq!(s["dragonfly"]["fallbacks"], 0, "{s}");
    assert!(s["dragonfly"]["files"].as_u64().unwrap() >= 15, "{s}");
    assert_published_identical(f.model.source.path(), &published(&cache_a));

    // A's copy of one shard, forged so that dfdaemon's CRC32 still matches.
    let shard = "model-00004-of-00014.safetensors";
    let stored = stored_copy(&a, &published(&cache_a).join(shard));
    let mut bytes = std::fs::read(&stored).unwrap();
    forge_same_crc(&mut bytes);
    let copy = stored.with_extension("forged");
    std::fs::write(&copy, &bytes).unwrap();
    std::fs::rename(&copy, &stored).unwrap();
    a.restart(&f.bin);
    let out = run(
        &mut f.prefetch(&cache_b, &b.socket, &signed),
        Duration::from_secs(300),
    );
    let s = summary(&out);
    let log = stderr(&out);
    assert_eq!(s["verification"], "signature", "{s}");
    assert_eq!(
        s["dragonfly"]["rejected"], 1,
        "{s}
{log}"
    );
    assert!(
        log.contains(shard)
            && log.contains("SHA-256")
            && log.contains("does not match the signature"),
        "the log names the rejected file: {log}"
    );
    assert!(origin(&s, "peer") > 0, "B took files from A: {s}");
    assert_published_identical(f.model.source.path(), &published(&cache_b));

    // Signed with BLAKE3 instead: the signature stands in for the manifest on this path too.
    sign(&python, f.model.source.path(), By::Key, "blake3", None);
    upload_signature();
    let s = summary(&run(
        &mut f.prefetch(&cache_c, &b.socket, &signed),
        Duration::from_secs(300),
    ));
    assert_eq!(s["verification"], "blake3", "{s}");
    assert_eq!(s["signature"]["hash"], "blake3", "{s}");
    assert_eq!(s["dragonfly"]["fallbacks"], 0, "{s}");
    assert_published_identical(f.model.source.path(), &published(&cache_c));

    // Signed with a certificate chain, SHA-256 of 5 MiB shards: each shard checked on the
    // clone.
    sign(
        &python,
        f.model.source.path(),
        By::Certificate,
        "sha256",
        Some(5 << 20),
    );
    upload_signature();
    let cache_d = f.cache("d");
    let root = keys().root.to_str().unwrap().to_string();
    let s = summary(&run(
        &mut f.prefetch(
            &cache_d,
            &b.socket,
            &["--signature", "required", "--trusted", root.as_str()],
        ),
        Duration::from_secs(300),
    ));
    assert_eq!(s["verification"], "signature", "{s}");
    assert_eq!(s["signature"]["method"], "shards", "{s}");
    assert_eq!(s["signature"]["signer"]["kind"], "certificate", "{s}");
    assert_eq!(s["dragonfly"]["fallbacks"], 0, "{s}");
    assert_published_identical(f.model.source.path(), &published(&cache_d));
    report(
        "dragonfly signed: SHA-256 (key), BLAKE3 (key) and SHA-256 shards (certificate) signatures without a manifest verified through dfdaemon; a forged peer byte caught by the SHA-256 signature",
    );
}

/// The file in `daemon`'s storage that holds the same bytes as `published`.
fn stored_copy(daemon: &Daemon, published: &Path) -> PathBuf {
    let want = std::fs::read(published).unwrap();
    files_under(&daemon.dir.join("storage"))
        .into_iter()
        .map(|f| daemon.dir.join("storage").join(f))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.len() == want.len() as u64)
                && std::fs::read(p).is_ok_and(|b| b == want)
        })
        .unwrap_or_else(|| panic!("dfdaemon holds no copy of {}", published.display()))
}

/// Issue 25: dfdaemon keeps its storage writable on the node network's side. Once a file came
/// through it, anything that writes its task file (a re-download into a kept task, a hostile
/// peer's bytes, a compromised dfdaemon) used to change the published bytes, which share that
/// inode, and could put the modification time back so no cheap check saw it. Now the
/// published file is a clone in an inode of the agent's own: rewriting the task file in place,
/// time restored, leaves the published bytes and their verification as they were.
#[test]
fn issue25_a_task_file_rewritten_after_publish_never_reaches_the_published_bytes() {
    let Some(f) = fleet() else { return };
    let a = f.daemon("node-a", "10GiB");
    let cache_a = f.cache("a");
    let s = f.seed_node_a(&a, &cache_a);
    assert_eq!(s["dragonfly"]["fallbacks"], 0, "{s}");
    let shard = "model-00004-of-00014.safetensors";
    let published_shard = published(&cache_a).join(shard);
    let stored = stored_copy(&a, &published_shard);
    let (ours, theirs) = (
        std::fs::metadata(&published_shard).unwrap(),
        std::fs::metadata(&stored).unwrap(),
    );
    assert_ne!(
        ours.ino(),
        theirs.ino(),
        "the published file is dfdaemon's inode"
    );
    assert_eq!(ours.nlink(), 1, "the published file has another name");

    // Rewritten in place, in the same inode, the modification time put back to the nanosecond.
    let mut bytes = std::fs::read(&stored).unwrap();
    forge_same_crc(&mut bytes);
    let mtime = theirs.modified().unwrap();
    {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&stored)
            .unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_all().unwrap();
        file.set_modified(mtime).unwrap();
    }
    assert_eq!(std::fs::metadata(&stored).unwrap().ino(), theirs.ino());
    assert_eq!(
        std::fs::metadata(&stored).unwrap().modified().unwrap(),
        mtime
    );
    assert_published_identical(f.model.source.path(), &published(&cache_a));
    let v = verify_model(&cache_a);
    assert!(v.status.success(), "verify: {}", stderr(&v));
}

/// Flips a byte 64 bytes before the end and sets the four bytes after it so that the CRC32 of
/// any span ending at the file's end (the last piece, whatever its length) is unchanged: CRC32
/// is linear, so the change a difference makes depends only on the difference and its distance
/// to the end.
fn forge_same_crc(bytes: &mut [u8]) {
    let n = bytes.len();
    let tail = 64;
    // Δcrc of a difference `d` in the last `tail` bytes (CRC's affine part cancels).
    let delta = |d: &[u8]| crc32fast::hash(d) ^ crc32fast::hash(&vec![0u8; d.len()]);
    let mut flip = vec![0u8; tail];
    flip[0] = 0x01;
    let target = delta(&flip);
    // Columns: the Δcrc of each single bit in bytes 1..5 of the tail.
    let columns: Vec<u32> = (0..32)
        .map(|bit| {
            let mut d = vec![0u8; tail];
            d[1 + bit / 8] = 1 << (bit % 8);
            delta(&d)
        })
        .collect();
    // Solve Σ x_i · columns_i = target over GF(2).
    let mut rows: Vec<(u32, u32)> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, 1u32 << i))
        .collect();
    let mut basis: Vec<(u32, u32)> = Vec::new();
    for (mut v, mut mask) in rows.drain(..) {
        for (bv, bm) in &basis {
            if v ^ bv < v {
                v ^= bv;
                mask ^= bm;
            }
        }
        if v != 0 {
            basis.push((v, mask));
            basis.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
    }
    let (mut rest, mut chosen) = (target, 0u32);
    for (bv, bm) in &basis {
        if rest ^ bv < rest {
            rest ^= bv;
            chosen ^= bm;
        }
    }
    assert_eq!(rest, 0, "the four bytes span every CRC difference");
    let start = n - tail;
    bytes[start] ^= 0x01;
    for bit in 0..32 {
        if chosen & (1 << bit) != 0 {
            bytes[start + 1 + bit / 8] ^= 1 << (bit % 8);
        }
    }
}

/// No dfdaemon on the node: the model comes directly, with one line saying why.
#[test]
fn without_dfdaemon_the_model_comes_directly_with_one_line_saying_so() {
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 200_000, true));
    let cache = tempfile::tempdir().unwrap();
    let socket = cache.path().join("no-such/dfdaemon.sock");
    let mut cmd = prefetch_cmd(
        Some(&az.endpoint()),
        &model.url(),
        cache.path(),
        &["--dragonfly-socket", socket.to_str().unwrap()],
    );
    let out = run(&mut cmd, Duration::from_secs(120));
    let s = summary(&out);
    let log = stderr(&out);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("dfdaemon")).collect();
    assert_eq!(lines.len(), 1, "one line about dfdaemon: {log}");
    assert!(
        lines[0].contains("no dfdaemon socket at") && lines[0].contains("fetching all"),
        "{}",
        lines[0]
    );
    assert_eq!(
        origin(&s, "direct"),
        s["bytes_fetched"].as_u64().unwrap(),
        "{s}"
    );
    assert_eq!(s["verification"], "blake3");
    assert_published_identical(model.source.path(), &published(cache.path()));
}

/// The Dragonfly path trusts peers only against a manifest: without one the prefetch stops
/// before downloading, saying so.
#[test]
fn without_a_manifest_the_dragonfly_path_refuses_with_a_hint() {
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 200_000, false));
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&az.endpoint()),
        &model.url(),
        cache.path(),
        &["--dragonfly-socket", "/nonexistent/dfdaemon.sock"],
    );
    let out = run(&mut cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("no modelcache.manifest.json") && err.contains("modelcache manifest"),
        "{err}"
    );
    assert!(!published(cache.path()).exists());
}

/// The node's mounts as the DaemonSets make them: the agent's pod (cache root and the Dragonfly
/// host path Bidirectional, an emptyDir private mount) shows the cache filesystem's
/// `dragonfly/` directory at the host path; a dfdaemon pod mounting `HOST_PATH/storage` (as
/// deploy/dragonfly/values-aks.yaml does) writes a task there and hard-links it into
/// `modelcache/`; the agent finds that file on its own writable mount, renames it into staging,
/// and it is the same inode: the hand-over modelcache relies on works across the two pods.
const STORAGE_SHARE: &str = r#"
set -u
mount --bind "$HOST" "$HOST" && mount --make-shared "$HOST"
mount --bind "$DFHOST" "$DFHOST" && mount --make-shared "$DFHOST"
unshare -m --propagation unchanged sh -c '
  mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  mount --rbind "$DFHOST" "$DFAGENT" && mount --make-rshared "$DFAGENT" &&
  mount -t tmpfs -o size=16m emptydir "$PRIV" && mount --make-private "$PRIV" &&
  exec "$MC" agent --config "$CONFIG"' > /dev/null 2> "$STATE/agent.err" &
AGENT=$!
n=0
until grep -q "keep its storage on the cache filesystem" "$STATE/agent.err"; do
  kill -0 $AGENT 2>/dev/null || { echo "AGENT_DIED=1"; exit 1; }
  n=$((n + 1)); [ $n -lt 600 ] || { echo "AGENT_SILENT=1"; kill $AGENT; exit 1; }
  sleep 0.1
done
echo "NODE_SEES_STORAGE=$([ -d "$DFHOST/storage" ] && echo yes)"
unshare -m --propagation unchanged sh -c '
  mount --bind "$DFHOST/storage" "$DFPOD" && mount --make-rslave "$DFPOD" &&
  mkdir -p "$DFPOD/content" "$DFPOD/modelcache/m" &&
  echo "task bytes" > "$DFPOD/content/task" &&
  ln "$DFPOD/content/task" "$DFPOD/modelcache/m/0.part"' 2> "$STATE/dfpod.err" && echo "DFPOD_LINKED=yes"
nsenter -t $AGENT -m sh -c '
  mkdir -p "$PRIV/cache/staging/m/files" &&
  mv "$PRIV/cache/dragonfly/storage/modelcache/m/0.part" "$PRIV/cache/staging/m/files/x.partial" &&
  echo "AGENT_READS=$(cat "$PRIV/cache/staging/m/files/x.partial")" &&
  echo "LINKS=$(stat -c %h "$PRIV/cache/staging/m/files/x.partial")"' 2> "$STATE/adopt.err"
echo "MODE=$(stat -c %a "$HOST/dragonfly")"
kill $AGENT
wait $AGENT 2>/dev/null
echo "AGENT_RESTART=$(unshare -m --propagation unchanged sh -c '
  mount --rbind "$HOST" "$CACHE" && mount --make-rshared "$CACHE" &&
  mount --rbind "$DFHOST" "$DFAGENT" && mount --make-rshared "$DFAGENT" &&
  mount -t tmpfs -o size=16m emptydir "$PRIV" && mount --make-private "$PRIV" &&
  timeout 5 "$MC" agent --config "$CONFIG"' 2>&1 | grep -o "already shown\|shows the cache filesystem" | head -1)"
"#;

#[test]
fn the_agent_shows_dfdaemon_its_storage_on_the_cache_filesystem_across_pods() {
    let ok = is_root()
        && Command::new("unshare")
            .args(["-m", "true"])
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        skip_or_fail("mount namespaces need root and unshare(1)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let p = dir.path().join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "cache_root = \"{}\"\n[listen]\nread = \"127.0.0.1:0\"\nadmin = \"{}\"\n[cache]\nprivate_mount = \"{}\"\nwarm_page_cache = \"off\"\n[disk]\nenabled = false\n[fetch.dragonfly]\nsocket = \"{}\"\nstorage_host_path = \"{}\"\n",
            p("cache").display(),
            p("state").join("admin.sock").display(),
            p("private").display(),
            dir.path().join("no/dfdaemon.sock").display(),
            p("df-agent").display(),
        ),
    )
    .unwrap();
    let out = run(
        Command::new("unshare")
            .args(["-m", "bash", "-c", STORAGE_SHARE])
            .env("MC", bin())
            .env("CONFIG", &config)
            .env("HOST", p("host"))
            .env("CACHE", p("cache"))
            .env("PRIV", p("private"))
            .env("DFHOST", p("df-host"))
            .env("DFAGENT", p("df-agent"))
            .env("DFPOD", p("df-pod"))
            .env("STATE", p("state")),
        Duration::from_secs(120),
    );
    let state =
        |f: &str| std::fs::read_to_string(dir.path().join("state").join(f)).unwrap_or_default();
    let text = stdout(&out);
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or("")
            .to_string()
    };
    let context = format!(
        "{text}\n{}\nagent: {}\ndfdaemon pod: {}\nadopt: {}",
        stderr(&out),
        state("agent.err"),
        state("dfpod.err"),
        state("adopt.err")
    );
    assert_eq!(get("NODE_SEES_STORAGE"), "yes", "{context}");
    assert_eq!(get("DFPOD_LINKED"), "yes", "{context}");
    assert_eq!(get("AGENT_READS"), "task bytes", "{context}");
    assert_eq!(
        get("LINKS"),
        "2",
        "one inode, dfdaemon's name and the cache's: {context}"
    );
    assert_eq!(get("MODE"), "700", "{context}");
    assert_eq!(get("AGENT_RESTART"), "already shown", "{context}");
}
