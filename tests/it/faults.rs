//! Faults injected between the prefetcher and Azurite.

use std::time::{Duration, Instant};

use crate::proxy::{Fault, FaultProxy};
use crate::support::*;

/// A generated model on Azurite (shards of `shard_bytes`, with or without its manifest) and a
/// fault proxy in front of Azurite; None when Azurite is not available (the skip is loud).
fn model_behind_proxy(shard_bytes: usize, with_manifest: bool) -> Option<(AzureModel, FaultProxy)> {
    let az = azurite()?;
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, shard_bytes, with_manifest));
    Some((model, FaultProxy::start(az.port)))
}

fn prefetch_via(
    proxy: &FaultProxy,
    model: &AzureModel,
    cache: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache,
        &["--concurrency", "4"],
    );
    run(cmd.args(extra), Duration::from_secs(180))
}

#[test]
fn throttling_resets_truncation_and_stalls_all_end_in_a_verified_model() {
    let Some((model, proxy)) = model_behind_proxy(200_000, true) else {
        return;
    };
    proxy.add(
        "model-00001",
        Fault::Busy {
            retry_after_secs: 1,
        },
        Some(2),
    );
    proxy.add("model-00002", Fault::ResetMidBody, Some(2));
    proxy.add("model-00004", Fault::Truncate, Some(2));
    proxy.add(
        "model-00006",
        Fault::Stall(Duration::from_secs(20)),
        Some(1),
    );
    proxy.add("model-00007", Fault::ServerError, Some(1));
    // Listing and the manifest are retried like ranges.
    proxy.add(
        "comp=list",
        Fault::Busy {
            retry_after_secs: 0,
        },
        Some(2),
    );
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = prefetch_via(&proxy, &model, cache.path(), &["--stall-timeout", "2s"]);
    let s = summary(&out);
    assert_eq!(proxy.fired(), 10, "every fault fired");
    assert!(
        stderr(&out).contains("retrying listing"),
        "{}",
        stderr(&out)
    );
    assert_eq!(s["verification"], "blake3");
    let retries = &s["retries"];
    // Two 503s on a range and two on the listing: all counted.
    assert_eq!(retries["throttled"], 4, "{s}");
    assert_eq!(retries["stalled"], 1, "{s}");
    assert_eq!(retries["server_error"], 1, "{s}");
    // Resets and truncations surface as connection failures or short bodies.
    let transport =
        retries["connection"].as_u64().unwrap_or(0) + retries["short_body"].as_u64().unwrap_or(0);
    assert_eq!(transport, 4, "{s}");
    // Two 503s with Retry-After: 1 on the same range cost at least two seconds.
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}

#[test]
fn a_fault_that_never_clears_fails_within_the_configured_bounds() {
    let Some((model, proxy)) = model_behind_proxy(100_000, true) else {
        return;
    };
    proxy.add(
        "model-00003",
        Fault::Busy {
            retry_after_secs: 0,
        },
        None,
    );
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = prefetch_via(&proxy, &model, cache.path(), &["--max-attempts", "3"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    // The header check's first read (64 KiB) runs out of attempts before the download starts;
    // the download's one range would cover the whole file, 0..size.
    let size = std::fs::metadata(model.source.path().join("model-00003-of-00014.safetensors"))
        .unwrap()
        .len();
    assert!(
        size > 65536,
        "the shard is larger than the header check's first read"
    );
    assert!(
        line.contains("model-00003-of-00014.safetensors bytes 0..65536:"),
        "{line}"
    );
    assert!(line.contains("after 3 attempts"), "{line}");
    assert!(line.contains("503"), "the last cause is named: {line}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(!cache.path().join("models/gpt-oss-120b").exists());
}

/// A small model on Azurite fetched through the proxy after `faults` set it up: the summary,
/// once the published bytes were checked against the source.
fn fetch_through_faults(
    extra: &[&str],
    faults: impl FnOnce(&FaultProxy),
) -> Option<(serde_json::Value, FaultProxy, Duration)> {
    let (model, proxy) = model_behind_proxy(100_000, true)?;
    faults(&proxy);
    let cache = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = prefetch_via(&proxy, &model, cache.path(), extra);
    let elapsed = started.elapsed();
    let s = summary(&out);
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
    Some((s, proxy, elapsed))
}

/// A ranged GET answered with a whole-blob `200` or with the wrong `Content-Range` (a
/// misbehaving proxy, a server hiccup) is retried like a 503, not the end of the download.
#[test]
fn a_200_or_a_wrong_content_range_answer_to_a_ranged_get_is_retried() {
    let Some((s, proxy, _)) = fetch_through_faults(&[], |proxy| {
        proxy.add("model-00002", Fault::NotPartial, Some(2));
        proxy.add("model-00005", Fault::WrongRange, Some(2));
    }) else {
        return;
    };
    assert_eq!(proxy.fired(), 4, "every fault fired");
    assert_eq!(s["retries"]["bad_range"], 4, "{s}");
    assert_eq!(s["verification"], "blake3");
}

/// A body longer than the asked range (a broken server or proxy) is retried from the last byte
/// written: the bytes received before the overrun and not yet written are neither lost nor
/// written twice. Shards of 1.5 MB in one range each, so that half a MB is still held in the
/// 1 MiB write buffer when the extra bytes come.
#[test]
fn a_body_longer_than_the_asked_range_is_retried_without_shifting_bytes() {
    let Some((model, proxy)) = model_behind_proxy(1_500_000, true) else {
        return;
    };
    // The first read of the shard is its header check.
    proxy.add_after("model-00003", 1, Fault::LongBody(64 << 10), Some(1));
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--chunk-size", "4MiB"],
    );
    let out = run(&mut cmd, Duration::from_secs(120));
    let s = summary(&out);
    assert_eq!(proxy.fired(), 1, "the fault fired");
    // One retry: the whole range was written before the overrun, so nothing is asked again.
    assert_eq!(s["retries"]["bad_range"], 1, "{s}");
    assert_eq!(s["hedged_ranges"], 0, "{s}");
    assert_eq!(s["verification"], "blake3");
    assert_eq!(
        s["refetched_files"],
        serde_json::json!([]),
        "no shard needed a second download: {s}"
    );
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}

/// A connection that is accepted but never sends response headers no longer hangs the range:
/// the stall timeout covers the wait for the headers, and the retry completes the model.
#[test]
fn a_range_whose_response_headers_never_come_is_retried_after_the_stall_timeout() {
    let Some((s, proxy, elapsed)) = fetch_through_faults(&["--stall-timeout", "2s"], |proxy| {
        proxy.add(
            "model-00004",
            Fault::SilentBeforeHeaders(Duration::from_secs(60)),
            Some(1),
        );
    }) else {
        return;
    };
    assert_eq!(proxy.fired(), 1);
    assert_eq!(s["retries"]["stalled"], 1, "{s}");
    assert!(
        elapsed < Duration::from_secs(40),
        "retried after the stall timeout, not after the server gave up"
    );
}

/// A listing or manifest request that is accepted and never answered (a server, or an
/// identity endpoint, that hangs) is retried after the stall timeout, not waited on forever.
#[test]
fn a_listing_or_manifest_that_never_answers_is_retried_after_the_stall_timeout() {
    let Some((s, proxy, elapsed)) = fetch_through_faults(&["--stall-timeout", "2s"], |proxy| {
        let silent = Fault::SilentBeforeHeaders(Duration::from_secs(120));
        proxy.add("comp=list", silent, Some(1));
        proxy.add("modelcache.manifest.json", silent, Some(1));
    }) else {
        return;
    };
    assert_eq!(proxy.fired(), 2, "both faults fired");
    assert_eq!(s["retries"]["stalled"], 2, "both counted as retries: {s}");
    assert_eq!(s["verification"], "blake3", "{s}");
    assert!(
        elapsed < Duration::from_secs(60),
        "each retried after 2 s, not after the server gave up: {elapsed:?}"
    );
}

/// SIGINT while the listing hangs stops the prefetch at once (exit 130), as it does mid-download.
#[test]
fn sigint_while_the_listing_hangs_stops_at_once() {
    let Some((model, proxy)) = model_behind_proxy(10_000, true) else {
        return;
    };
    proxy.add(
        "comp=list",
        Fault::SilentBeforeHeaders(Duration::from_secs(120)),
        None,
    );
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--stall-timeout", "60s"],
    );
    let child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The listing request reached the proxy: the prefetch is now waiting on it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.fired() == 0 {
        assert!(Instant::now() < deadline, "the listing never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = wait_with_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}

/// Without a manifest nothing checks the bytes afterwards, so each range is checked in transit
/// against Blob's transactional MD5: a flipped bit is retried, never published, and the model
/// is marked `md5`. Ranges larger than the 4 MiB Blob sums are read as 4 MiB pieces. With an
/// account key the MD5 cannot be asked for (the signature covers every `x-ms-` header), and the
/// model says `structural`, not more.
#[test]
fn without_a_manifest_a_bit_flipped_in_transit_is_caught_by_the_transactional_md5() {
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 5_000_000, false));
    let proxy = FaultProxy::start(az.port);
    for shard in ["model-00001", "model-00004", "model-00009"] {
        proxy.add(shard, Fault::FlipBit, Some(1));
    }
    // A whole-blob 200 to the one range of a small file carries no range MD5: retried, not
    // taken unchecked (the chaos campaign found it marking a model `structural`).
    proxy.add("gpt-oss-120b/config.json", Fault::NotPartial, Some(1));
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--chunk-size", "8MiB", "--concurrency", "4"],
    );
    cmd.env("AZURE_STORAGE_SAS_KEY", account_sas());
    let s = summary(&run(&mut cmd, Duration::from_secs(180)));
    assert_eq!(proxy.fired(), 4, "every fault fired");
    assert_eq!(s["retries"]["corrupt"], 3, "{s}");
    assert_eq!(s["retries"]["bad_range"], 1, "{s}");
    assert_eq!(s["verification"], "md5", "{s}");
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
    let ready = std::fs::read_to_string(
        cache
            .path()
            .join("models/gpt-oss-120b/.modelcache/ready.json"),
    )
    .unwrap();
    assert!(ready.contains("\"verification\": \"md5\""), "{ready}");

    let shared_key = tempfile::tempdir().unwrap();
    let s = summary(&run(
        &mut prefetch_cmd(Some(&az.endpoint()), &model.url(), shared_key.path(), &[]),
        Duration::from_secs(180),
    ));
    assert_eq!(s["verification"], "structural", "{s}");
}

/// Throttling answers halve the ranges in flight, and the summary says how many were left.
/// Every shard GET answers 503 (`Retry-After: 1`) from the moment the download begins (a hook
/// on the first read of config.json, which the header checks before the download never read),
/// so the adaptive controller's first window sees them, whatever the ceiling.
#[test]
fn throttling_halves_the_ranges_in_flight() {
    let Some((model, proxy)) = model_behind_proxy(1_000_000, true) else {
        return;
    };
    let add = proxy.rule_adder();
    proxy.hook(
        "gpt-oss-120b/config.json",
        Box::new(move || {
            Box::pin(async move {
                add(
                    ".safetensors",
                    Fault::Busy {
                        retry_after_secs: 1,
                    },
                    Some(64),
                );
            })
        }),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--concurrency", "64"],
    );
    let s = summary(&run(&mut cmd, Duration::from_secs(120)));
    assert!(s["retries"]["throttled"].as_u64().unwrap_or(0) >= 64, "{s}");
    let left = s["concurrency"].as_u64().unwrap();
    assert!(
        (1..=8).contains(&left),
        "16 at the start, halved at least once: {s}"
    );
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}

/// A range that goes silent at the end of the download is asked for again on a second
/// connection instead of waiting out the stall timeout. Both ranges of the stalled shard are
/// over 2 MiB, so whichever one stalls does so after half its body, past its first written MiB:
/// the second copy starts there with the first one's hash state, and the model passing its
/// BLAKE3 manifest proves the two parts join.
#[test]
fn a_slow_range_in_the_tail_is_hedged_on_a_second_connection() {
    let Some((model, proxy)) = model_behind_proxy(7_000_000, true) else {
        return;
    };
    // The first read of the shard is its header check.
    proxy.add_after(
        "model-00007",
        1,
        Fault::Stall(Duration::from_secs(90)),
        Some(1),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--chunk-size", "4MiB", "--stall-timeout", "120s"],
    );
    let started = Instant::now();
    let out = run(&mut cmd, Duration::from_secs(180));
    let s = summary(&out);
    assert_eq!(proxy.fired(), 1, "the stall fired");
    assert!(s["hedged_ranges"].as_u64().unwrap() >= 1, "{s}");
    // The second copy began past the first MiB the first copy had written, not at the range's
    // start (ranges start at multiples of 4 MiB).
    let err = stderr(&out);
    let line = err
        .lines()
        .find(|l| l.contains("asking for it on a second connection"))
        .unwrap_or_else(|| panic!("no hedge in the log: {err}"));
    let from: u64 = line
        .split(" bytes ")
        .nth(1)
        .and_then(|r| r.split("..").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        from % (4 << 20) != 0,
        "the hedge restarted the whole range: {line}"
    );
    assert_eq!(s["verification"], "blake3", "{s}");
    assert!(
        started.elapsed() < Duration::from_secs(80),
        "did not wait out the 90 s stall: {:?}",
        started.elapsed()
    );
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}
