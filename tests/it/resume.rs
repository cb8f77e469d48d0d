//! A prefetch killed with SIGKILL resumes from its journal.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::proxy::{Fault, FaultProxy};
use crate::support::*;

#[test]
fn a_killed_prefetch_resumes_without_fetching_finished_ranges_again() {
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 1 << 20, true));
    // Slow every range down so the kill lands part-way.
    let proxy = FaultProxy::start(az.port);
    proxy.add(
        "gpt-oss-120b/model-",
        Fault::Delay(Duration::from_millis(100)),
        None,
    );
    let cache = tempfile::tempdir().unwrap();
    let slow = ["--concurrency", "2"];
    let mut first = prefetch_cmd(Some(&proxy.endpoint()), &model.url(), cache.path(), &slow);
    let mut child = first
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let journal = cache.path().join("staging/gpt-oss-120b/journal.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read_to_string(&journal)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the journal never reached 20 ranges"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the first run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Bytes of the ranges the journal holds after the kill: exactly what must not be fetched again.
    let journaled = journaled_bytes(&journal);
    assert!(!cache.path().join("models/gpt-oss-120b").exists());

    let mut second = prefetch_cmd(Some(&az.endpoint()), &model.url(), cache.path(), &slow);
    let s = summary(&run(&mut second, Duration::from_secs(120)));
    let total = s["bytes_total"].as_u64().unwrap();
    let fetched = s["bytes_fetched"].as_u64().unwrap();
    let reused = s["bytes_reused"].as_u64().unwrap();
    assert!(
        reused >= journaled && journaled > 0,
        "the {journaled} journaled bytes are reused: {s}"
    );
    assert_eq!(
        fetched + reused,
        total,
        "nothing reused is fetched again: {s}"
    );
    assert_eq!(s["verification"], "blake3");
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}
