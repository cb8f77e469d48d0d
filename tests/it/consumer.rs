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
    upload_manifest(source.path());
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
    upload_manifest(source.path());
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
    agent.until_logged("requires a manifest");
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

/// `modelcache wait` as the vLLM pod's init container runs it: through the agent, leasing the
/// revision for `pod`, linking it at `link`.
pub(crate) fn wait_as_reader(
    agent: &crate::agent::Agent,
    model: &str,
    cache: &Path,
    link: &Path,
    pod: &str,
) -> std::process::Output {
    let mut cmd = modelcache();
    cmd.args([
        "wait",
        "--model",
        model,
        "--interval",
        "200ms",
        "--timeout",
        "120s",
    ])
    .args(["--api", &format!("http://{}", agent.read)])
    .arg("--cache-root")
    .arg(cache)
    .arg("--link")
    .arg(link)
    .args(["--lease", pod]);
    run(&mut cmd, Duration::from_secs(180))
}

/// The agent's configuration with leases judged against `pods` (a stand-in for the kubelet's
/// pod directories, used where no pod cgroups are visible: the cgroup root named here does not
/// exist), checked every second.
fn leases_config(pods: &Path) -> String {
    format!(
        "[leases]\npods_dir = \"{}\"\ncgroup_root = \"{}\"\ncheck_interval = \"1s\"\n",
        pods.display(),
        pods.join("no-cgroups-here").display()
    )
}

/// A reader resolves the model once: it opens shard 1, a refresh publishes r2, and it then opens
/// shard 2 through the same path: both come from r1, its revision for as long as its pod lives.
/// r1 goes once the pod is gone.
#[test]
fn issue18_a_reader_keeps_one_revision_through_a_refresh_until_its_pod_is_gone() {
    use crate::agent::{Agent, config, http, model_entry};
    let source = small_model(60_000, 71);
    upload_manifest(source.path());
    let pods = tempfile::tempdir().unwrap();
    std::fs::create_dir(pods.path().join("pod-1")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let shared = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &format!("file://{}", source.path().display()), true),
            &leases_config(pods.path()),
        ),
        "http://127.0.0.1:9",
        &[],
    );
    let r1 = agent.until_ready("m")["revision"]
        .as_str()
        .unwrap()
        .to_string();
    let (shard1, shard2) = (
        "model-00001-of-00014.safetensors",
        "model-00002-of-00014.safetensors",
    );
    let r1_bytes = |f: &str| std::fs::read(source.path().join(f)).unwrap();
    let (r1_shard1, r1_shard2) = (r1_bytes(shard1), r1_bytes(shard2));

    let link = shared.path().join("model");
    let out = wait_as_reader(&agent, "m", &cache, &link, "pod-1");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("leased for this pod"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        cache.join("store/m").join(&r1)
    );
    // vLLM opens shard 1 ...
    assert_eq!(std::fs::read(link.join(shard1)).unwrap(), r1_shard1);

    // ... the source changes and the agent refreshes: r2 is published, the link swapped ...
    replace_model(source.path(), 60_000, 72);
    upload_manifest(source.path());
    let (status, body) = http(&agent.admin, "POST", "/v1/models/m/prefetch", &[], "");
    assert_eq!(status, 202, "{body}");
    let refreshed = agent.until("/v1/models/m", Duration::from_secs(60), |_, j| {
        j["state"] == "ready" && j["revision"].as_str().is_some_and(|r| r != r1)
    });
    assert_ne!(
        std::fs::read(cache.join("models/m").join(shard2)).unwrap(),
        r1_shard2,
        "the published link moved to r2"
    );
    // ... and then opens shard 2 through the path it was given: r1's bytes, not r2's.
    assert_eq!(std::fs::read(link.join(shard2)).unwrap(), r1_shard2);
    let readers = refreshed["readers"].as_array().unwrap();
    assert_eq!(readers.len(), 1, "{refreshed}");
    assert_eq!(readers[0]["pod"], "pod-1");
    assert_eq!(readers[0]["revision"].as_str(), Some(r1.as_str()));

    // r1 stays while the pod exists (two lease checks pass) ...
    std::thread::sleep(Duration::from_millis(2500));
    assert!(cache.join("store/m").join(&r1).join(shard2).exists());
    // ... and goes once the kubelet has removed the pod's directory.
    std::fs::remove_dir(pods.path().join("pod-1")).unwrap();
    let started = std::time::Instant::now();
    while cache.join("store/m").join(&r1).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "r1 outlived its reader: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.until_logged("pod pod-1 no longer runs on this node");
    let now = agent.until_ready("m");
    assert_eq!(now["leases"], 0, "{now}");
    assert!(now.get("readers").is_none(), "{now}");
    assert!(cache.join("models/m").join(shard2).exists());
}

/// Under budget pressure a leased model stays and an unleased one is evicted; `DELETE` of a
/// leased model answers 409 naming its pod; a pod restarted after its model was evicted gets it
/// back just by waiting for it.
#[test]
fn issue18_leased_models_are_never_evicted_and_a_restarted_pod_gets_its_model_back() {
    use crate::agent::{Agent, config, http, model_entry};
    let models: Vec<_> = (0..3).map(|i| small_model(200_000, 80 + i)).collect();
    let size: u64 = files_under(models[0].path())
        .iter()
        .filter(|f| !f.starts_with("original/") && !f.starts_with("metal/"))
        .map(|f| std::fs::metadata(models[0].path().join(f)).unwrap().len())
        .sum();
    let pods = tempfile::tempdir().unwrap();
    for pod in ["pod-a", "pod-b2"] {
        std::fs::create_dir(pods.path().join(pod)).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let shared = tempfile::tempdir().unwrap();
    // Room for two models, not three.
    let budget = size * 5 / 2;
    let url = |i: usize| format!("file://{}", models[i].path().display());
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &(model_entry("a", &url(0), false) + &model_entry("b", &url(1), false)),
            &format!("budget = \"{budget}\"\n{}", leases_config(pods.path())),
        ),
        "http://127.0.0.1:9",
        &[],
    );
    agent.until_ready("a");
    agent.until_ready("b");
    // a's reader leases it; then b is used more recently, so a is the least recently used.
    let out = wait_as_reader(&agent, "a", &cache, &shared.path().join("a"), "pod-a");
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, _) = http(&agent.admin, "POST", "/v1/models/b/prefetch", &[], "");
    assert_eq!(status, 202);
    agent.until_ready("b");
    // A third model needs room: a is leased, so b goes.
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/c/prefetch",
        &[],
        &format!("{{\"source\": \"{}\"}}", url(2)),
    );
    assert_eq!(status, 202, "{body}");
    agent.until_ready("c");
    assert!(cache.join("models/a").exists(), "the leased model stayed");
    assert!(!cache.join("models/b").exists(), "the unleased model went");
    assert!(
        std::fs::read_link(shared.path().join("a"))
            .unwrap()
            .join("config.json")
            .exists()
    );
    let (status, body) = http(&agent.admin, "DELETE", "/v1/models/a", &[], "");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("pod-a"), "{body}");

    // b's pod restarts (a new pod, a new UID): waiting for b has it fetched again.
    let out = wait_as_reader(&agent, "b", &cache, &shared.path().join("b"), "pod-b2");
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    assert!(stdout(&out).contains("b is ready"), "{}", stdout(&out));
    assert_published_identical(models[1].path(), &shared.path().join("b"));
    assert!(cache.join("models/a").exists(), "a is still leased");
    assert!(!cache.join("models/c").exists(), "c made room for b");
}

/// The init container runs as a non-root user (uid 10001 in the example): `wait --cache-root`
/// shows the download's percent from the world-readable progress record, while `staging/`
/// (the partial files) stays closed to it.
#[test]
fn issue18_a_non_root_init_container_sees_progress_with_a_percent() {
    use crate::agent::{Agent, config, model_entry};
    use crate::proxy::{Fault, FaultProxy};
    if !is_root() {
        skip_or_fail("running wait as uid 10001 needs root");
        return;
    }
    let Some(az) = azurite() else { return };
    let model = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(azure_model(az, 400_000, true));
    let proxy = FaultProxy::start(az.port);
    // Slow shards, so the download lasts a few seconds.
    for i in 2..14 {
        proxy.add(
            &format!("model-{i:05}-of-00014"),
            Fault::Delay(Duration::from_millis(700)),
            Some(3),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut wait = std::process::Command::new("setpriv");
    wait.env_clear()
        .args(["--reuid=10001", "--regid=10001", "--clear-groups"])
        .arg(bin())
        .args([
            "wait",
            "--model",
            "m",
            "--interval",
            "100ms",
            "--timeout",
            "120s",
        ])
        .arg("--cache-root")
        .arg(&cache);
    let agent = Agent::start_listening(
        dir.path(),
        &config(&cache, &model_entry("m", &model.url(), true), ""),
        &proxy.endpoint(),
        &[],
    );
    let out = run(&mut wait, Duration::from_secs(180));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.lines()
            .any(|l| l.contains("m: downloading") && l.contains('%')),
        "no progress line with a percent:\n{text}\n{}",
        agent.log()
    );
    assert!(text.contains("m is ready"), "{text}");
    let staging = std::fs::metadata(cache.join("staging")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(staging.permissions().mode() & 0o777, 0o700);
}
