//! Issue 18, the consumer's contract over a model's whole life: what a vLLM pod reading the cache
//! meets across refreshes, evictions, restarts and hostile sources.

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

/// A zero-byte file with a stale partial left in staging (an earlier run of another revision)
/// is published empty: BLAKE3 of empty input matches the manifest whatever the partial holds,
/// so the partial must never be trusted for a file with nothing to download.
#[test]
fn issue18_a_stale_partial_of_a_zero_byte_file_is_not_published() {
    let source = small_model(40_000, 31);
    std::fs::write(source.path().join("README.md"), "").unwrap();
    let mut cmd = modelcache();
    cmd.args(["manifest", "--upload"])
        .arg(format!("--source=file://{}", source.path().display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", stderr(&out));
    let cache = tempfile::tempdir().unwrap();
    let stale = cache
        .path()
        .join("staging/gpt-oss-120b/files/README.md.partial");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, "bytes of another revision").unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    assert_eq!(summary(&out)["verification"], "blake3");
    let model = cache.path().join("models/gpt-oss-120b");
    assert_eq!(std::fs::metadata(model.join("README.md")).unwrap().len(), 0);
    assert_published_identical(source.path(), &model);
    let mut wait = modelcache();
    wait.args([
        "wait",
        "--model",
        "gpt-oss-120b",
        "--timeout",
        "1s",
        "--cache-root",
    ])
    .arg(cache.path());
    let out = run(&mut wait, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Blobs `config.json` and `config.json/extra` both selected: no directory can hold both, so
/// the publish would fail on every attempt. Refused at listing with both names, nothing written.
#[test]
fn issue18_a_file_that_is_also_a_directory_in_the_source_is_refused_at_listing() {
    let Some(az) = azurite() else { return };
    let container = unique("conflict");
    create_container(az, &container);
    let source = small_model(40_000, 5);
    let store = store(az, &container);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(upload_dir(&store, source.path(), "m"));
    put_raw_blob(az, &container, "m/config.json/extra", b"{}");
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&az.endpoint()),
        &format!("az://{container}/m"),
        cache.path(),
        &[],
    );
    let out = run(&mut cmd, Duration::from_secs(120));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("config.json") && err.contains("config.json/extra"),
        "{err}"
    );
    assert!(
        !files_under(cache.path())
            .iter()
            .any(|f| f.ends_with(".partial") || f.ends_with("journal.jsonl")),
        "nothing is downloaded"
    );
}

/// A token holder (or a caller on the admin socket) may start or join a configured model's
/// prefetch but not reshape it: a narrower selection, an unpin or a dropped manifest
/// requirement is refused with 403 naming what it tried, and the published model is unchanged.
#[test]
fn issue18_requests_cannot_change_a_configured_models_selection_pin_or_manifest_requirement() {
    use crate::agent::{Agent, config, http, model_entry};
    let source = small_model(20_000, 41);
    let mut cmd = modelcache();
    cmd.args(["manifest", "--upload"])
        .arg(format!("--source=file://{}", source.path().display()));
    assert!(run(&mut cmd, Duration::from_secs(60)).status.success());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let entry = model_entry("m", &format!("file://{}", source.path().display()), true)
        + "require_manifest = true\n";
    let agent = Agent::start(
        dir.path(),
        &config(&cache, &entry, ""),
        "http://127.0.0.1:9",
        &[("MODELCACHE_TOKEN", "t0ken")],
    );
    let ready = agent.until_ready("m");
    let revision = ready["revision"].as_str().unwrap().to_string();
    for (body, names) in [
        (r#"{"include":["config.json"]}"#, "selection"),
        (r#"{"exclude":["*.safetensors"]}"#, "selection"),
        (r#"{"pin":false}"#, "pin"),
        (r#"{"require_manifest":false}"#, "require_manifest"),
        (
            r#"{"include":["config.json"],"pin":false}"#,
            "selection (include, exclude) or pin",
        ),
    ] {
        for (addr, headers) in [
            (&agent.read, vec![("Authorization", "Bearer t0ken")]),
            (&agent.admin, vec![]),
        ] {
            let (status, answer) = http(addr, "POST", "/v1/models/m/prefetch", &headers, body);
            assert_eq!(status, 403, "{body} on {addr}: {answer}");
            assert!(
                answer.contains(names) && answer.contains("configured by the operator"),
                "{body}: {answer}"
            );
        }
    }
    // Repeating what is configured is joining, not changing.
    let (status, answer) = http(
        &agent.admin,
        "POST",
        "/v1/models/m/prefetch",
        &[],
        r#"{"pin":true,"require_manifest":true}"#,
    );
    assert_eq!(status, 202, "{answer}");
    let now = agent.until_ready("m");
    assert_eq!(now["pinned"], true);
    assert_eq!(now["verification"], "blake3");
    assert_eq!(now["revision"].as_str(), Some(revision.as_str()));
    assert_published_identical(source.path(), &cache.join("models/m"));
    let (status, _) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200);
}

/// A revision published without a manifest (structural) is not served to a configured model
/// that requires one: the agent fetches again, fails without a manifest, and `/readyz` stays
/// 503 instead of calling the structural copy ready.
#[test]
fn issue18_an_existing_structural_revision_is_not_served_under_require_manifest() {
    use crate::agent::{Agent, config, http, model_entry};
    let source = small_model(20_000, 43);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let out = prefetch_file(source.path(), &cache, &[]);
    assert_eq!(summary(&out)["verification"], "structural");
    let entry = model_entry(
        "gpt-oss-120b",
        &format!("file://{}", source.path().display()),
        true,
    ) + "require_manifest = true\n";
    let agent = Agent::start(
        dir.path(),
        &config(&cache, &entry, ""),
        "http://127.0.0.1:9",
        &[],
    );
    let failed = agent.until(
        "/v1/models/gpt-oss-120b",
        Duration::from_secs(60),
        |_, j| j["state"] == "failed",
    );
    assert!(
        failed["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("manifest is required")),
        "{failed}"
    );
    assert!(failed["revision"].is_null(), "{failed}");
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(
        agent.log().contains("requires a manifest"),
        "{}",
        agent.log()
    );
}

/// Two `-> .` links in a `file://` source used to make the walk exponential (each level
/// doubling the paths until the path length ran out). A directory reached twice is refused at
/// once, naming the link.
#[test]
fn issue18_link_loops_in_a_file_source_are_refused_at_once() {
    let source = small_model(20_000, 47);
    std::os::unix::fs::symlink(".", source.path().join("again")).unwrap();
    std::os::unix::fs::symlink(".", source.path().join("and-again")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = prefetch_file(source.path(), cache.path(), &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("again") && err.contains("loop"), "{err}");
}

/// A source a request names under an allowed prefix may not reach outside it through a link
/// (a node token linked into an allowed directory would be published 0644 for every pod), while
/// links that stay inside (a Hugging Face snapshot's `../../blobs/...`) are followed.
#[test]
fn issue18_a_requested_file_source_cannot_link_outside_its_allowed_prefix() {
    use crate::agent::{Agent, config, http};
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let token = outside.path().join("token");
    std::fs::write(&token, "node-secret-token").unwrap();
    // A snapshot-shaped model: one shard is a link into a blob directory beside it.
    let model = small_model(20_000, 53);
    let snapshot = allowed.path().join("snapshots/main");
    std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
    std::fs::rename(model.path(), &snapshot).unwrap();
    let blobs = allowed.path().join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let shard = "model-00003-of-00014.safetensors";
    std::fs::rename(snapshot.join(shard), blobs.join("abc123")).unwrap();
    std::os::unix::fs::symlink("../../blobs/abc123", snapshot.join(shard)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let extra = format!(
        "[api]\nallowed_sources = [\"file://{}/\"]\n",
        allowed.path().display()
    );
    let agent = Agent::start(
        dir.path(),
        &config(&cache, "", &extra),
        "http://127.0.0.1:9",
        &[],
    );
    let body = format!("{{\"source\": \"file://{}\"}}", snapshot.display());
    let (status, answer) = http(&agent.admin, "POST", "/v1/models/hf/prefetch", &[], &body);
    assert_eq!(status, 202, "{answer}");
    agent.until_ready("hf");
    std::fs::remove_file(snapshot.join(shard)).unwrap();
    std::fs::copy(blobs.join("abc123"), snapshot.join(shard)).unwrap();
    assert_published_identical(&snapshot, &cache.join("models/hf"));

    // The same snapshot with a link to the token, outside the allowed directory.
    std::os::unix::fs::symlink(&token, snapshot.join("special_tokens_map.json.bak")).unwrap();
    let (status, answer) = http(&agent.admin, "POST", "/v1/models/leak/prefetch", &[], &body);
    assert_eq!(status, 202, "{answer}");
    let failed = agent.until("/v1/models/leak", Duration::from_secs(60), |_, j| {
        j["state"] == "failed"
    });
    let error = failed["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("special_tokens_map.json.bak") && error.contains("outside"),
        "{failed}"
    );
    for f in files_under(&cache) {
        let bytes = std::fs::read(cache.join(&f)).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("node-secret-token"),
            "the token was copied to {f}"
        );
    }
}

/// Without a manifest every range asks Blob for its transactional MD5. An answer that comes
/// without it (one chaos round published a model as `structural` where MD5 had been checked)
/// is retried like any answer that is not what was asked for; it no longer marks the whole
/// model unchecked.
#[test]
fn issue18_an_answer_without_the_asked_for_md5_is_retried_not_taken_unchecked() {
    use crate::proxy::{Fault, FaultProxy};
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 300_000, false));
    let proxy = FaultProxy::start(az.port);
    proxy.add("model-00002", Fault::StripMd5, Some(2));
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = prefetch_cmd(
        Some(&proxy.endpoint()),
        &model.url(),
        cache.path(),
        &["--concurrency", "4"],
    );
    cmd.env("AZURE_STORAGE_SAS_KEY", account_sas());
    let s = summary(&run(&mut cmd, Duration::from_secs(180)));
    assert_eq!(proxy.fired(), 2, "{s}");
    assert_eq!(s["retries"]["bad_range"], 2, "{s}");
    assert_eq!(s["verification"], "md5", "{s}");
    assert_published_identical(
        model.source.path(),
        &cache.path().join("models/gpt-oss-120b"),
    );
}
