//! The seeded chaos campaign: `modelcache prefetch` through a proxy that injects a random fault
//! into about a third of all GETs (503 with `Retry-After`, 500, 429, resets before headers and
//! mid-body, truncated bodies, stalls before headers and mid-body, flipped bits, a wrong
//! `Content-Range`, a whole-blob 200 to a ranged GET), blobs replaced between listing and
//! download, and SIGKILL at random points of every phase followed by a resume. Every round
//! ends in one of: published byte-identical, CORRUPT, HANG or CRASH (clean refusals along the
//! way are counted and resumed). The seed is printed; `MODELCACHE_CHAOS_SEED=N` replays it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use crate::proxy::{Chaos, Fault, FaultProxy};
use crate::support::*;

/// Rounds, each a fresh cache filled from scratch.
const ROUNDS: usize = 30;
/// Runs killed per round before it may finish.
const KILLS_PER_ROUND: usize = 3;
/// A run that takes longer than this hangs (the stall timeout is 1 s, attempts are bounded).
const RUN_LIMIT: Duration = Duration::from_secs(90);
/// Runs per round before it counts as never converging.
const MAX_RUNS: usize = 14;

const PHASES: [&str; 4] = ["listing", "downloading", "verifying", "publishing"];

/// How one run of the binary ended.
enum Run {
    Killed { phase: &'static str },
    Exited { code: Option<i32>, error: String },
    Hung,
}

/// Runs `cmd`, killing it with SIGKILL `delay` after it enters `kill_in` (if it gets there).
fn run_once(cmd: &mut std::process::Command, kill_in: Option<(&'static str, Duration)>) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut phase = "listing";
    let mut due = match kill_in {
        Some(("listing", delay)) => Some(started + delay),
        _ => None,
    };
    let mut error = String::new();
    loop {
        if due.is_some_and(|at| Instant::now() >= at) && child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            child.wait().unwrap();
            return Run::Killed { phase };
        }
        if started.elapsed() > RUN_LIMIT {
            child.kill().unwrap();
            child.wait().unwrap();
            return Run::Hung;
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(line) => {
                if let Some(next) = PHASES.iter().find(|p| line.contains(&format!("; now {p}"))) {
                    phase = next;
                    if let Some((target, delay)) = kill_in {
                        if target == *next && due.is_none() {
                            due = Some(Instant::now() + delay);
                        }
                    }
                }
                if line.starts_with("error:") {
                    error = line;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                return Run::Exited {
                    code: status.code(),
                    error,
                };
            }
        }
    }
}

/// Rewrites one data byte of `shard` (its header stays valid) in the local copy and in the
/// container, so the blob's ETag changes under a download in flight.
fn replace_blob_hook(
    model: &AzureModel,
    shard: &str,
    replaced: &std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> crate::proxy::Hook {
    let replaced = std::sync::Arc::clone(replaced);
    let local = model.source.path().join(shard);
    let store = std::sync::Arc::clone(&model.store);
    let blob = format!("gpt-oss-120b/{shard}");
    Box::new(move || {
        Box::pin(async move {
            let mut bytes = std::fs::read(&local).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            let at = usize::try_from(8 + header).unwrap() + 1;
            bytes[at] = bytes[at].wrapping_add(1);
            std::fs::write(&local, &bytes).unwrap();
            put_small(&store, &blob, &bytes).await;
            replaced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
    })
}

/// What the campaign saw.
#[derive(Default, Debug)]
struct Tally {
    identical: usize,
    corrupt: Vec<String>,
    hangs: usize,
    crashes: Vec<String>,
    refused: BTreeMap<i32, usize>,
    kills: BTreeMap<&'static str, usize>,
    leftovers: Vec<String>,
    /// Rounds published with a weaker verification than their setup allows.
    weaker: Vec<String>,
    runs: usize,
}

/// What a finished round may leave: the published revisions and the lock file, nothing else.
fn leftovers(cache: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    if cache.join("staging/gpt-oss-120b").exists() {
        found.push("staging/gpt-oss-120b".to_string());
    }
    for f in files_under(&cache.join("store")) {
        if f.split('/')
            .any(|seg| seg.starts_with('.') && seg != ".modelcache")
        {
            found.push(format!("store/{f}"));
        }
    }
    found
}

#[test]
fn chaos_campaign_publishes_only_byte_identical_models() {
    let Some(az) = azurite() else { return };
    let seed: u64 = std::env::var("MODELCACHE_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    eprintln!("chaos: seed {seed} (replay with MODELCACHE_CHAOS_SEED={seed})");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // With a manifest (BLAKE3 catches a flipped bit) over Shared Key, and without one (the
    // transactional MD5 catches it) over a SAS, as workload identity would be.
    let with_manifest = rt.block_on(azure_model(az, 420_000, true));
    let without_manifest = rt.block_on(azure_model(az, 420_000, false));
    let proxy = FaultProxy::start(az.port);
    *proxy.chaos.lock().unwrap() = Some(Chaos {
        rng: fastrand::Rng::with_seed(seed),
        probability: 0.3,
        faults: vec![
            Fault::Busy {
                retry_after_secs: 0,
            },
            Fault::Busy {
                retry_after_secs: 1,
            },
            Fault::ServerError,
            Fault::TooMany {
                retry_after_secs: 0,
            },
            Fault::ResetBeforeHeaders,
            Fault::ResetMidBody,
            Fault::Truncate,
            Fault::SilentBeforeHeaders(Duration::from_secs(30)),
            Fault::Stall(Duration::from_secs(30)),
            Fault::FlipBit,
            Fault::FlipBit,
            Fault::WrongRange,
            Fault::NotPartial,
            Fault::LongBody(4096),
            Fault::StripMd5,
        ],
        counts: BTreeMap::new(),
    });
    let mut rng = fastrand::Rng::with_seed(seed.rotate_left(17) ^ 0x5eed);
    let mut tally = Tally::default();
    let replaced = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    for round in 0..ROUNDS {
        let manifest_round = round % 2 == 0;
        let model = if manifest_round {
            &with_manifest
        } else {
            &without_manifest
        };
        if !manifest_round && round % 3 == 1 {
            let shard = format!("model-{:05}-of-00014.safetensors", rng.usize(0..15));
            proxy.hook(
                &format!("{}/gpt-oss-120b/{shard}", model.container),
                replace_blob_hook(model, &shard, &replaced),
            );
        }
        let cache = tempfile::tempdir().unwrap();
        let mut kills = 0;
        let mut runs = 0;
        let finished = loop {
            runs += 1;
            tally.runs += 1;
            if runs > MAX_RUNS {
                break Err(format!(
                    "round {round}: not published after {MAX_RUNS} runs"
                ));
            }
            let kill = (kills < KILLS_PER_ROUND).then(|| {
                let phase = PHASES[rng.usize(..PHASES.len())];
                // Verifying and publishing last milliseconds: kill almost at once to land in them.
                let most = match phase {
                    "listing" => 60,
                    "downloading" => 400,
                    "verifying" => 2,
                    _ => 8,
                };
                (phase, Duration::from_millis(rng.u64(0..most)))
            });
            let mut cmd = prefetch_cmd(
                Some(&proxy.endpoint()),
                &model.url(),
                cache.path(),
                &["--stall-timeout", "1s", "--concurrency", "12"],
            );
            if !manifest_round {
                cmd.env("AZURE_STORAGE_SAS_KEY", account_sas());
            }
            match run_once(&mut cmd, kill) {
                Run::Killed { phase } => {
                    kills += 1;
                    *tally.kills.entry(phase).or_default() += 1;
                }
                Run::Exited { code: Some(0), .. } => break Ok(()),
                // Clean refusals: the source, download, verification or cache said no, with
                // an error line. The next run resumes.
                Run::Exited {
                    code: Some(code @ 3..=7),
                    error,
                } if error.starts_with("error:") => {
                    *tally.refused.entry(code).or_default() += 1;
                }
                Run::Exited { code, error } => {
                    tally
                        .crashes
                        .push(format!("round {round}: exit {code:?}: {error}"));
                    break Err(String::new());
                }
                Run::Hung => {
                    tally.hangs += 1;
                    break Err(format!("round {round}: a run hung"));
                }
            }
        };
        match finished {
            Ok(()) => {
                let link = cache.path().join("models/gpt-oss-120b");
                match published_difference(model.source.path(), &link) {
                    None => tally.identical += 1,
                    Some(d) => tally.corrupt.push(format!("round {round}: {d}")),
                }
                let marker: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(link.join(".modelcache/ready.json")).unwrap(),
                )
                .unwrap();
                let expected = if manifest_round { "blake3" } else { "md5" };
                if marker["verification"] != expected {
                    tally.weaker.push(format!(
                        "round {round}: verification {} where {expected} was expected",
                        marker["verification"]
                    ));
                }
                tally.leftovers.extend(
                    leftovers(cache.path())
                        .into_iter()
                        .map(|l| format!("round {round}: {l}")),
                );
            }
            Err(why) if !why.is_empty() => tally.crashes.push(why),
            Err(_) => {}
        }
    }
    let counts = proxy
        .chaos
        .lock()
        .unwrap()
        .as_ref()
        .map(|c| c.counts.clone())
        .unwrap_or_default();
    let faults: usize = counts.values().sum();
    let kills: usize = tally.kills.values().sum();
    let line = format!(
        "chaos: seed {seed}, {ROUNDS} rounds, {} runs in {:.0} s: {faults} faults injected {counts:?}, {} blobs replaced, {kills} kills {:?}, refusals by exit code {:?}; published identical {}, CORRUPT {}, HANG {}, CRASH {}, leftovers {}",
        tally.runs,
        started.elapsed().as_secs_f64(),
        replaced.load(std::sync::atomic::Ordering::Relaxed),
        tally.kills,
        tally.refused,
        tally.identical,
        tally.corrupt.len(),
        tally.hangs,
        tally.crashes.len(),
        tally.leftovers.len(),
    );
    eprintln!("{line}");
    report(&line);
    assert!(tally.corrupt.is_empty(), "{line}\n{:#?}", tally.corrupt);
    assert!(tally.crashes.is_empty(), "{line}\n{:#?}", tally.crashes);
    assert_eq!(tally.hangs, 0, "{line}");
    assert!(tally.leftovers.is_empty(), "{line}\n{:#?}", tally.leftovers);
    assert!(tally.weaker.is_empty(), "{line}\n{:#?}", tally.weaker);
    assert_eq!(tally.identical, ROUNDS, "{line}");
    assert!(faults >= 1000, "at least 1,000 faults: {line}");
    assert!(kills >= 50, "at least 50 kill-and-resume cycles: {line}");
    assert!(
        replaced.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "blobs were replaced under downloads: {line}"
    );
    for phase in PHASES {
        assert!(
            tally.kills.get(phase).copied().unwrap_or(0) > 0,
            "no kill landed in {phase}: {line}"
        );
    }
}
