//! The binary on local directories: demo, verify, structure checks and input errors.

use std::path::Path;
use std::time::Duration;

use crate::support::*;

fn prefetch_file(source: &Path, cache: &Path, extra: &[&str]) -> std::process::Output {
    let url = format!("file://{}", source.display());
    run(
        &mut prefetch_cmd(None, &url, cache, extra),
        Duration::from_secs(120),
    )
}

fn write_manifest(source: &Path) {
    upload_manifest(source);
}

#[test]
fn demo_runs_the_whole_flow_and_reuses_on_the_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = modelcache();
    cmd.arg("demo")
        .arg("--dir")
        .arg(dir.path())
        .args(["--shard-size", "512KiB"]);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("verified blake3"), "{text}");
    assert!(text.contains("original/ skipped: true"), "{text}");
    assert!(
        text.contains("/readyz -> 200"),
        "the demo asks the agent's API: {text}"
    );
    // It ends with the consumer's contract: `wait --link` resolved one revision into the pod's
    // own link, and vLLM serves that link, never the mutable models/NAME.
    let served = dir.path().join("pod/model/gpt-oss-120b");
    let revision_dir = std::fs::read_link(&served).expect("the demo's wait made the pod's link");
    assert!(
        revision_dir.starts_with(dir.path().join("cache/store/gpt-oss-120b")),
        "{}",
        revision_dir.display()
    );
    let tail: Vec<&str> = text.lines().rev().take(6).collect();
    assert!(
        tail.iter().any(
            |l| l.trim() == format!("vllm serve {} --tensor-parallel-size 4", served.display())
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("-> {}", served.display()))
            && !text.contains(&format!(
                "vllm serve {}",
                dir.path().join("cache/models").display()
            )),
        "{text}"
    );
    // Not a terminal: plain log lines, no colour codes.
    assert!(!stderr(&out).contains('\u{1b}'), "{}", stderr(&out));
    let link = dir.path().join("cache/models/gpt-oss-120b");
    assert!(link.join("model-00014-of-00014.safetensors").exists());
    assert!(link.join("o200k_base.tiktoken").exists());
    let again = run(&mut cmd, Duration::from_secs(120));
    assert!(
        stdout(&again).contains("already published"),
        "{}",
        stdout(&again)
    );
}

#[test]
fn file_source_prefetch_is_byte_identical_and_verify_catches_a_flipped_byte() {
    let source = small_model(100_000, 11);
    write_manifest(source.path());
    // `--output` writes the same manifest `--upload` put beside the files.
    let out_dir = tempfile::tempdir().unwrap();
    let written = out_dir.path().join("m.json");
    let mut cmd = modelcache();
    cmd.args(["manifest", "--chunk-size", "64KiB", "--output"])
        .arg(&written)
        .arg(format!("--source=file://{}", source.path().display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&written).unwrap(),
        std::fs::read_to_string(source.path().join("modelcache.manifest.json")).unwrap()
    );
    let cache = tempfile::tempdir().unwrap();
    let s = summary(&prefetch_file(source.path(), cache.path(), &[]));
    assert_eq!(s["verification"], "blake3");
    let link = cache.path().join("models/gpt-oss-120b");
    assert_published_identical(source.path(), &link);

    let ok = verify_model(cache.path());
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("verification blake3"),
        "{}",
        stdout(&ok)
    );

    let shard = link.join("model-00009-of-00014.safetensors");
    let mut data = std::fs::read(&shard).unwrap();
    let n = data.len();
    data[n / 2] ^= 1;
    std::fs::write(&shard, data).unwrap();
    let bad = verify_model(cache.path());
    assert_eq!(bad.status.code(), Some(5), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("model-00009-of-00014.safetensors"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn without_a_manifest_a_truncated_shard_fails_the_structure_check() {
    let source = small_model(100_000, 12);
    let shard = source.path().join("model-00002-of-00014.safetensors");
    let data = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &data[..data.len() - 10]).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert_refused_before_download(
        &out,
        cache.path(),
        "model-00002-of-00014.safetensors is not a valid safetensors file",
    );
    assert!(!cache.path().join("models/gpt-oss-120b").exists());

    // An intact model without a manifest is published as structurally checked.
    std::fs::write(&shard, &data).unwrap();
    let s = summary(&prefetch_file(source.path(), cache.path(), &[]));
    assert_eq!(s["verification"], "structural");
}

#[test]
fn an_index_naming_an_excluded_shard_is_refused() {
    let source = small_model(50_000, 13);
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &["--exclude", "model-00003-*"]);
    assert_refused_before_download(
        &out,
        cache.path(),
        "model-00003-of-00014.safetensors, which is not in the model",
    );
}

#[test]
fn require_manifest_refuses_a_source_without_one() {
    let source = small_model(50_000, 14);
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &["--require-manifest"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("hint:"), "{}", stderr(&out));
}

#[test]
fn a_manifest_entry_with_dotdot_is_refused() {
    let source = small_model(50_000, 15);
    let hash = "0".repeat(64);
    std::fs::write(
        source.path().join("modelcache.manifest.json"),
        format!(r#"{{"format":"modelcache.manifest/v1","algorithm":"blake3","files":[{{"path":"../../etc/evil","size":1,"blake3":"{hash}"}}]}}"#),
    )
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("\"../../etc/evil\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_input_is_refused_with_the_flag_and_exit_code_2() {
    let cache = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--model", "../x", "--source", "file:///tmp"],
            "invalid model name",
        ),
        (
            &[
                "--model",
                "m",
                "--source",
                "file:///tmp",
                "--chunk-size",
                "3MiB",
            ],
            "--chunk-size",
        ),
        (
            &["--model", "m", "--source", "s3://bucket/x"],
            "s3://bucket/x",
        ),
        (
            &[
                "--model",
                "m",
                "--source",
                "file:///tmp",
                "--concurrency",
                "0",
            ],
            "--concurrency",
        ),
    ];
    for (args, needle) in cases {
        let mut cmd = modelcache();
        cmd.arg("prefetch")
            .args(args)
            .arg("--cache-root")
            .arg(cache.path());
        let out = run(&mut cmd, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

#[test]
fn help_lists_exit_codes_and_defaults() {
    let mut cmd = modelcache();
    cmd.args(["prefetch", "--help"]);
    let out = run(&mut cmd, Duration::from_secs(30));
    let text = stdout(&out);
    for needle in [
        "Exit codes:",
        "[default: 64]",
        "[default: 64MiB]",
        "MODELCACHE_CACHE_ROOT",
        "original/**",
    ] {
        assert!(text.contains(needle), "missing {needle}: {text}");
    }
}

/// Zero-byte files (a `README.md`, an empty `added_tokens.json`, one in a subdirectory) are
/// published as empty files, with and without a manifest, and verify clean.
#[test]
fn empty_files_in_the_selection_are_published() {
    let source = small_model(50_000, 17);
    std::fs::write(source.path().join("README.md"), "").unwrap();
    std::fs::create_dir_all(source.path().join("docs")).unwrap();
    std::fs::write(source.path().join("docs/empty.txt"), "").unwrap();
    let plain = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), plain.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    write_manifest(source.path());
    let verified = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), verified.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&out)["verification"], "blake3");
    for cache in [&plain, &verified] {
        let dir = cache.path().join("models/gpt-oss-120b");
        assert_published_identical(source.path(), &dir);
        assert_eq!(std::fs::metadata(dir.join("README.md")).unwrap().len(), 0);
        assert_eq!(
            std::fs::metadata(dir.join("docs/empty.txt")).unwrap().len(),
            0
        );
        let out = verify_model(cache.path());
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// A published revision whose shard was changed on disk (its mtime moved) is fetched again and
/// the fresh copy replaces the damaged one, instead of the old directory being linked again.
#[test]
fn a_damaged_published_revision_is_replaced_not_relinked() {
    let source = small_model(60_000, 23);
    write_manifest(source.path());
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let model = cache.path().join("models/gpt-oss-120b");
    let shard = model.join("model-00003-of-00014.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();

    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_published_identical(source.path(), &model);
    let out = verify_model(cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    // Nothing damaged is left beside it, and a third run finds it intact.
    let store = cache.path().join("store/gpt-oss-120b");
    let left: Vec<String> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert_eq!(summary(&out)["bytes_fetched"], 0);
}

/// Two writers never share a model's files: a `modelcache prefetch` started while another holds
/// the model (here the test, as an agent job would) says whom it waits for, touches nothing,
/// and finishes once the holder lets go.
#[test]
fn a_prefetch_waits_for_whoever_holds_the_model_then_finishes() {
    use std::io::{BufRead, BufReader};
    let source = small_model(50_000, 5);
    let cache = tempfile::tempdir().unwrap();
    let layout = modelcache::store::Layout::new(cache.path());
    let name = modelcache::store::ModelName::new("gpt-oss-120b").unwrap();
    let modelcache::store::lock::TryLock::Held(held) =
        modelcache::store::lock::try_lock(&layout, &name, "the test's writer").unwrap()
    else {
        panic!("the lock of a new model must be free");
    };
    let url = format!("file://{}", source.path().display());
    let mut child = prefetch_cmd(None, &url, cache.path(), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Lines arrive on a channel so a prefetch that never says it waits fails the test instead
    // of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    std::thread::spawn(move || {
        for line in stderr_lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("the prefetch never said whom it waits for: {seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("waiting for") {
            break;
        }
    }
    assert!(seen.contains("the test's writer"), "{seen}");
    assert!(
        !cache.path().join("staging/gpt-oss-120b").exists(),
        "nothing is written while another holds the model"
    );
    drop(held);
    let out = wait_with_limit(child, Duration::from_secs(120));
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(out.status.success(), "{seen}{}", rest.join("\n"));
    assert_published_identical(source.path(), &cache.path().join("models/gpt-oss-120b"));
}

/// Real repositories whose index maps a tensor no shard holds, or counts `total_size` in file
/// bytes, load in vLLM: they are published with warnings (summary, `ready.json`, `verify`).
/// An index naming a shard that is not in the model would make vLLM fail: refused.
#[test]
fn inconsistent_index_metadata_is_published_with_warnings_a_missing_shard_is_refused() {
    let source = small_model(30_000, 8);
    let index_path = source.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["metadata"]["total_size"] = serde_json::json!(123_456_789);
    index["weight_map"]["model.layers.99.phantom.weight"] =
        serde_json::json!("model-00001-of-00014.safetensors");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let s = summary(&prefetch_file(source.path(), cache.path(), &[]));
    let warnings = s["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{s}");
    assert!(warnings[0].as_str().unwrap().contains("phantom"), "{s}");
    assert!(warnings[1].as_str().unwrap().contains("123456789"), "{s}");
    let link = cache.path().join("models/gpt-oss-120b");
    assert_published_identical(source.path(), &link);
    let marker = std::fs::read_to_string(link.join(".modelcache/ready.json")).unwrap();
    assert!(marker.contains("phantom"), "{marker}");
    let verified = verify_model(cache.path());
    assert!(verified.status.success(), "{}", stderr(&verified));
    assert!(stdout(&verified).contains("warning: model.safetensors.index.json"));

    index["weight_map"]["model.layers.99.phantom.weight"] =
        serde_json::json!("model-00099-of-00099.safetensors");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), fresh.path(), &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("model-00099-of-00099.safetensors"));
    assert!(!fresh.path().join("models/gpt-oss-120b").exists());
}

/// Whatever the source's modes and the writer's umask, a published model gives nothing away:
/// files 0644 (nothing writable or executable by the pods that mount the cache), directories
/// 0755, and the half-fetched bytes in staging/ and the locks stay owner-only. Nothing outside
/// the selection is written.
#[test]
fn published_files_keep_modes_that_give_nothing_away_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let source = small_model(20_000, 7);
    for entry in walk_all(source.path()) {
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let inner = prefetch_cmd(
        None,
        &format!("file://{}", source.path().display()),
        cache.path(),
        &[],
    );
    // The shell sets the most permissive umask, then becomes the prefetch.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask 000 && exec \"$0\" \"$@\""])
        .arg(inner.get_program())
        .args(inner.get_args());
    let out = run(&mut cmd, Duration::from_secs(120));
    summary(&out);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let model = cache.path().join("models/gpt-oss-120b");
    let published = walk_all(&model.canonicalize().unwrap());
    assert!(published.len() > 15, "{published:?}");
    for path in &published {
        let expected = if path.is_dir() { 0o755 } else { 0o644 };
        assert_eq!(mode(path), expected, "{}", path.display());
    }
    for dir in ["models", "store", "store/gpt-oss-120b"] {
        assert_eq!(mode(&cache.path().join(dir)), 0o755, "{dir}");
    }
    for dir in ["staging", "locks"] {
        assert_eq!(mode(&cache.path().join(dir)), 0o700, "{dir}");
    }
    // Only the selection (original/ and metal/ are not) and the cache's own records.
    for file in files_under(&model) {
        assert!(
            !file.starts_with("original/") && !file.starts_with("metal/"),
            "{file} is outside the selection"
        );
    }
}

/// Every file and directory under `dir` (not `dir` itself).
fn walk_all(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_all(&path));
        }
        out.push(path);
    }
    out
}

/// `peak_rss_bytes` is the prefetch's own peak: spawned from a process that has touched 400 MiB
/// (as a benchmark harness or an init script might), a small prefetch reports far less. The
/// kernel's `ru_maxrss` carries the spawning process's size over into the child.
#[test]
fn the_reported_peak_rss_is_the_prefetchs_own_not_its_parents() {
    let ballast = vec![1u8; 400 << 20];
    let source = small_model(20_000, 9);
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    std::hint::black_box(&ballast);
    let rss = summary(&out)["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss > (1 << 20) && rss < (200 << 20),
        "peak_rss_bytes {rss} is not the prefetch's own"
    );
}

/// The ranges in flight are in the summary: the adaptive controller's choice within the
/// ceiling, or exactly `--concurrency` with adaptation off.
#[test]
fn the_summary_says_how_many_ranges_were_in_flight() {
    let source = small_model(300_000, 17);
    let cache = tempfile::tempdir().unwrap();
    let s = summary(&prefetch_file(
        source.path(),
        cache.path(),
        &["--concurrency", "12"],
    ));
    let chosen = s["concurrency"].as_u64().unwrap();
    assert!((1..=12).contains(&chosen), "{s}");
    let fixed = tempfile::tempdir().unwrap();
    let s = summary(&prefetch_file(
        source.path(),
        fixed.path(),
        &["--concurrency", "5", "--adaptive-concurrency", "false"],
    ));
    assert_eq!(s["concurrency"], 5, "{s}");
}
