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

/// A publish killed after it moved some verified files out of staging into
/// `store/NAME/.REV.tmp-PID` (the state such a kill leaves, built here without the race of a
/// real kill; the chaos test kills for real): the next run puts them back and fetches none of
/// them again, and nothing of the interrupted publish stays behind.
#[test]
fn a_publish_killed_part_way_resumes_without_fetching_moved_files_again() {
    let source = small_model(40_000, 21);
    let bad = "model-00003-of-00014.safetensors";
    let good = std::fs::read(source.path().join(bad)).unwrap();
    let url = format!("file://{}", source.path().display());
    let mut manifest = modelcache();
    manifest
        .args(["manifest", "--upload", "--chunk-size", "64KiB", "--source"])
        .arg(&url);
    let out = run(&mut manifest, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    // A shard with one tensor byte changed: its header passes the checks before the download,
    // everything downloads and is journaled, then its BLAKE3 refuses the model before
    // publishing, and staging holds every other file complete.
    let mut broken = good.clone();
    let n = broken.len();
    broken[n - 100] ^= 0xff;
    std::fs::write(source.path().join(bad), &broken).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = run(
        &mut prefetch_cmd(None, &url, cache.path(), &[]),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("BLAKE3"), "{}", stderr(&out));

    // What a publish killed after moving all files but `bad` leaves behind.
    let files = cache.path().join("staging/gpt-oss-120b/files");
    let tmp = cache
        .path()
        .join("store/gpt-oss-120b/.0123456789abcdef.tmp-4242");
    let mut moved_bytes = 0;
    for rel in files_under(&files) {
        let plain = rel.trim_end_matches(".partial");
        if plain == bad {
            continue;
        }
        let to = tmp.join(plain);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::rename(files.join(&rel), &to).unwrap();
        moved_bytes += std::fs::metadata(&to).unwrap().len();
    }
    assert!(moved_bytes > 0);

    std::fs::write(source.path().join(bad), &good).unwrap();
    let s = summary(&run(
        &mut prefetch_cmd(None, &url, cache.path(), &[]),
        Duration::from_secs(120),
    ));
    assert_eq!(
        s["bytes_fetched"].as_u64().unwrap(),
        u64::try_from(good.len()).unwrap(),
        "only the repaired shard is fetched; the moved files come back from the publish: {s}"
    );
    assert_published_identical(source.path(), &cache.path().join("models/gpt-oss-120b"));
    let store: Vec<String> = std::fs::read_dir(cache.path().join("store/gpt-oss-120b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(store.len(), 1, "only the published revision: {store:?}");
    assert!(!cache.path().join("staging/gpt-oss-120b").exists());
}
