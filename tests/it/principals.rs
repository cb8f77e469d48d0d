//! Issue 25: every principal on the node, bounded. Each test is one principal's attack, tried
//! against the agent's real listeners: an anonymous caller on the node network, a pod that
//! ended, a stray file, root touching a published file, the operator editing the
//! configuration live. (dfdaemon's are in `dragonfly`, the clone's primitives in the unit tests
//! of `store::take`.)

use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent::{Agent, config, http, metric, model_entry};
use crate::support::*;

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// `modelcache wait` naming `pod`, from a process in no pod: the agent takes its word for the
/// pod (checked to be running), as on the read listener.
fn wait_claiming(
    agent: &Agent,
    model: &str,
    cache: &Path,
    link: &Path,
    pod: &str,
) -> std::process::Output {
    crate::consumer::wait_as_reader(agent, model, cache, link, pod)
}

/// An agent with `models` on `node`, its cache under a new directory (kept with the agent).
fn agent_on(
    node: &FakeNode,
    models: &str,
    extra: &str,
) -> (tempfile::TempDir, std::path::PathBuf, Agent) {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let agent = Agent::start(
        dir.path(),
        &config(&cache, models, &format!("{extra}{}", node.leases_config())),
        "http://127.0.0.1:9",
        &[],
    );
    (dir, cache, agent)
}

/// Polls until `cond` holds, failing with the agent's log after `limit`.
fn until(agent: &Agent, limit: Duration, what: &str, cond: impl Fn() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < limit, "{what}: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The reproduction: a pod reads r1; the model is refreshed to r2; an anonymous
/// `POST /v1/models/m/readers {"pod": VICTIM}` on the read listener used to move the victim's
/// lease to r2, and the next lease pass removed r1 from under it. Now the call only adds, no
/// UID is shown on the read listener, and r1 goes only when the pod stops running, even though
/// the kubelet keeps its directory.
#[test]
fn issue25_no_request_moves_a_lease_and_a_stopped_pod_releases_it() {
    let source = small_model(60_000, 251);
    upload_manifest(source.path());
    let (node, victim) = FakeNode::with_pod(1);
    let (_dir, cache, agent) =
        agent_on(&node, &model_entry("m", &file_url(source.path()), true), "");
    let r1 = agent.until_ready("m")["revision"]
        .as_str()
        .unwrap()
        .to_string();
    let shared = tempfile::tempdir().unwrap();
    let link = shared.path().join("model");
    let out = wait_claiming(&agent, "m", &cache, &link, &victim);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    assert!(
        stdout(&out).contains("leased for this pod"),
        "{}",
        stdout(&out)
    );

    // The read listener names no pod.
    for path in ["/v1/models", "/v1/models/m", "/v1/models/m/ready"] {
        let (status, body) = http(&agent.read, "GET", path, &[], "");
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            !body.contains(&victim),
            "{path} shows the pod's UID: {body}"
        );
        assert!(body.contains("\"leases\":1"), "{path}: {body}");
    }
    let (_, admin) = http(&agent.admin, "GET", "/v1/models/m", &[], "");
    assert!(
        admin.contains(&victim),
        "the admin socket shows readers: {admin}"
    );

    // A refresh publishes r2.
    replace_model(source.path(), 60_000, 252);
    upload_manifest(source.path());
    let (status, body) = http(&agent.admin, "POST", "/v1/models/m/prefetch", &[], "");
    assert_eq!(status, 202, "{body}");
    agent.until("/v1/models/m", Duration::from_secs(60), |_, j| {
        j["state"] == "ready" && j["revision"].as_str().is_some_and(|r| r != r1)
    });

    // The attack: anonymous, token-less, naming the victim.
    let body = format!("{{\"pod\": \"{victim}\"}}");
    let (status, answer) = http(&agent.read, "POST", "/v1/models/m/readers", &[], &body);
    assert_eq!(status, 200, "{answer}");
    assert!(!answer.contains(&victim), "{answer}");
    // Lease passes run every second: r1 stays, and the victim still reads r1 through its link.
    std::thread::sleep(Duration::from_millis(3000));
    assert!(
        cache.join("store/m").join(&r1).exists(),
        "r1 was removed under its reader: {}",
        agent.log()
    );
    assert!(
        std::fs::read_link(&link)
            .unwrap()
            .join("config.json")
            .exists()
    );
    let (_, admin) = http(&agent.admin, "GET", "/v1/models/m", &[], "");
    let admin: serde_json::Value = serde_json::from_str(&admin).unwrap();
    let held: Vec<&str> = admin["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["revision"].as_str().unwrap())
        .collect();
    assert!(held.contains(&r1.as_str()) && held.len() == 2, "{admin}");
    let (_, metrics) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(&metrics, "modelcache_leases", Some(("model", "m"))),
        2.0,
        "{metrics}"
    );

    // A claim for a pod that does not run here is refused.
    let stranger = format!("{{\"pod\": \"{}\"}}", FakeNode::uid(99));
    let (status, answer) = http(&agent.read, "POST", "/v1/models/m/readers", &[], &stranger);
    assert_eq!(status, 403, "{answer}");

    // The pod's containers stop (a Job that finished, an eviction): its cgroup goes, its
    // kubelet directory stays. Its leases end, and r1 with them.
    node.stop(&victim);
    until(
        &agent,
        Duration::from_secs(30),
        "r1 outlived its stopped reader",
        || !cache.join("store/m").join(&r1).exists(),
    );
    agent.until_logged("no longer runs on this node");
}

/// The operator ends a lease on the admin API (and only there), and the lease gauges follow.
#[test]
fn issue25_only_the_operator_drops_a_lease() {
    let source = small_model(40_000, 253);
    let (node, pod) = FakeNode::with_pod(2);
    let (_dir, cache, agent) = agent_on(
        &node,
        &model_entry("m", &file_url(source.path()), false),
        "",
    );
    agent.until_ready("m");
    let shared = tempfile::tempdir().unwrap();
    let out = wait_claiming(&agent, "m", &cache, &shared.path().join("m"), &pod);
    assert!(out.status.success(), "{}", stderr(&out));
    let path = format!("/v1/models/m/readers/{pod}");
    let (status, body) = http(&agent.read, "DELETE", &path, &[], "");
    assert_eq!(status, 403, "the read listener drops no lease: {body}");
    let (status, body) = http(&agent.admin, "DELETE", "/v1/models/m", &[], "");
    assert_eq!(status, 409, "{body}");
    let (status, body) = http(&agent.admin, "DELETE", &path, &[], "");
    assert_eq!(status, 204, "{body}");
    let (status, _) = http(&agent.admin, "DELETE", &path, &[], "");
    assert_eq!(status, 404);
    agent.until_logged("the operator ended pod");
    let (_, metrics) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(&metrics, "modelcache_leases", Some(("model", "m"))),
        0.0,
        "{metrics}"
    );
    let (status, body) = http(&agent.admin, "DELETE", "/v1/models/m", &[], "");
    assert_eq!(status, 204, "{body}");
}

/// The storm: two requested models and a budget for one. Token-less reader calls, alternating,
/// used to evict and fetch one model after the other (12 calls, 12 evictions). Now a reader
/// never fetches a model that is not configured, an evicted requested model is forgotten, and a
/// configured one is fetched for a running pod at most once per backoff interval: counted from
/// `/metrics`.
#[test]
fn issue25_anonymous_readers_cannot_drive_a_fetch_storm() {
    let models: Vec<_> = (0..3).map(|i| small_model(100_000, 260 + i)).collect();
    let size = selected_bytes(models[0].path());
    let (node, pod) = FakeNode::with_pod(3);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // Room for one model and a half; the backoff is long, so the test sees only what reader
    // calls start.
    let config = format!(
        "cache_root = \"{}\"\n[listen]\nread = \"127.0.0.1:0\"\n[fetch]\nchunk_size = \"64KiB\"\nfailed_retry_delay = \"10m\"\n[cache]\nwarm_page_cache = \"off\"\nbudget = \"{}\"\n{}\n{}[api]\nallowed_sources = [\"file:///\"]\n",
        cache.display(),
        size * 3 / 2,
        node.leases_config(),
        model_entry("conf", &file_url(models[0].path()), false),
    );
    let agent = Agent::start(dir.path(), &config, "http://127.0.0.1:9", &[]);
    agent.until_ready("conf");
    let request = |name: &str, i: usize| {
        let body = format!("{{\"source\": \"{}\"}}", file_url(models[i].path()));
        let (status, answer) = http(
            &agent.admin,
            "POST",
            &format!("/v1/models/{name}/prefetch"),
            &[],
            &body,
        );
        assert_eq!(status, 202, "{answer}");
        agent.until_ready(name);
    };
    // Two requested models: b evicts a, then conf.
    request("a", 1);
    request("b", 2);
    let scrape = || http(&agent.read, "GET", "/metrics", &[], "").1;
    let before = scrape();
    let evictions = metric(&before, "modelcache_evictions_total", None);
    assert!(evictions >= 2.0, "{before}");
    let (status, _) = http(&agent.read, "GET", "/v1/models/a", &[], "");
    assert_eq!(status, 404, "an evicted requested model is forgotten");
    let fetched = |text: &str| metric(text, "modelcache_bytes_fetched_total", None);
    let fetched_before = fetched(&before);

    // The storm: 12 token-less calls, alternating, with and without a running pod's UID.
    let claim = format!("{{\"pod\": \"{pod}\"}}");
    let mut answers = Vec::new();
    for i in 0..12 {
        let name = ["a", "conf"][i % 2];
        let body = if i % 4 < 2 { "" } else { claim.as_str() };
        answers.push(
            http(
                &agent.read,
                "POST",
                &format!("/v1/models/{name}/readers"),
                &[],
                body,
            )
            .0,
        );
    }
    assert!(answers.iter().step_by(2).all(|s| *s == 404), "{answers:?}");
    // conf, evicted, is fetched again once, for the first call that named a running pod.
    agent.until_ready("conf");
    std::thread::sleep(Duration::from_millis(500));
    let after = scrape();
    assert_eq!(
        metric(
            &after,
            "modelcache_reader_fetches_total",
            Some(("outcome", "started"))
        ),
        1.0,
        "{after}\n{}",
        agent.log()
    );
    assert!(
        metric(
            &after,
            "modelcache_reader_fetches_total",
            Some(("outcome", "refused"))
        ) >= 1.0
    );
    assert_eq!(
        metric(&after, "modelcache_evictions_total", None),
        evictions + 1.0,
        "{after}"
    );
    let model_bytes = size as f64;
    assert!(
        fetched(&after) - fetched_before <= model_bytes * 1.01,
        "{} bytes fetched for one model of {size}",
        fetched(&after) - fetched_before
    );
}

/// Root on the node `touch`es a published file: the model used to stay "ready" while every
/// `wait` timed out, until the agent restarted. Now the reader's request re-verifies it: the
/// bytes match, the new time is recorded, and the reader gets the model.
#[test]
fn issue25_a_touched_published_file_is_reverified_not_a_dead_end() {
    let source = small_model(60_000, 254);
    upload_manifest(source.path());
    let (node, pod) = FakeNode::with_pod(4);
    let (_dir, cache, agent) =
        agent_on(&node, &model_entry("m", &file_url(source.path()), true), "");
    agent.until_ready("m");
    let shard = cache.join("models/m/model-00003-of-00014.safetensors");
    let status = std::process::Command::new("touch")
        .args(["-d", "2001-01-01"])
        .arg(&shard)
        .status()
        .unwrap();
    assert!(status.success());
    let shared = tempfile::tempdir().unwrap();
    let out = wait_claiming(&agent, "m", &cache, &shared.path().join("m"), &pod);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    agent.until_logged("had a new modification time but the published bytes");
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");

    // A byte changed, its time put back: the next reader's re-check repairs it.
    let mut bytes = std::fs::read(&shard).unwrap();
    let mtime = std::fs::metadata(&shard).unwrap().modified().unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    // Written into the same inode, as a writer with access to the file would.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .unwrap();
    let touched = std::fs::File::options().write(true).open(&shard).unwrap();
    touched
        .set_modified(mtime + Duration::from_secs(1))
        .unwrap();
    drop(touched);
    let out = wait_claiming(&agent, "m", &cache, &shared.path().join("m2"), &pod);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    assert_published_identical(source.path(), &shared.path().join("m2"));
    agent.until_logged("fetching just those again");
}

/// The operator points a configured model at a source that fails, live: new readers used to
/// get the old source's model (rc 0). Now they get the failure; and turning `require_manifest`
/// on live stops a structurally checked revision from being handed out.
#[test]
fn issue25_a_live_change_is_what_new_readers_get() {
    let source = small_model(40_000, 255);
    let (node, pod) = FakeNode::with_pod(5);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let make = |url: &str, require: bool| {
        config(
            &cache,
            &format!(
                "{}require_manifest = {require}\n",
                model_entry("m", url, false)
            ),
            &node.leases_config(),
        )
    };
    let agent = Agent::start(
        dir.path(),
        &make(&file_url(source.path()), false),
        "http://127.0.0.1:9",
        &[],
    );
    let ready = agent.until_ready("m");
    assert_eq!(ready["verification"], "structural", "{ready}");
    let shared = tempfile::tempdir().unwrap();

    // require_manifest on, live: the structural revision is not handed out; the model is
    // fetched again and fails for want of a manifest.
    std::fs::write(
        dir.path().join("agent.toml"),
        make(&file_url(source.path()), true),
    )
    .unwrap();
    agent.until_logged("configuration: m changed");
    let out = wait_claiming(&agent, "m", &cache, &shared.path().join("a"), &pod);
    assert!(
        !out.status.success(),
        "a structural revision was served: {}",
        stdout(&out)
    );
    assert!(!shared.path().join("a").exists());

    // A source that fails, live.
    let gone = dir.path().join("no-such-model");
    std::fs::write(dir.path().join("agent.toml"), make(&file_url(&gone), false)).unwrap();
    agent.until("/v1/models/m", Duration::from_secs(30), |_, j| {
        j["source"]
            .as_str()
            .is_some_and(|s| s.contains("no-such-model"))
            && j["state"] == "failed"
    });
    let out = wait_claiming(&agent, "m", &cache, &shared.path().join("b"), &pod);
    assert!(
        !out.status.success(),
        "the old source's model was served: {}",
        stdout(&out)
    );
    assert!(!shared.path().join("b").exists());
}

/// A lease record's write cut short (a full disk) leaves `.UID.tmp-PID`: it used to pin the
/// model forever ("the cache budget leaves … after evicting every unpinned model"). Now it is
/// no lease: the model is evicted when room is needed, and the file is swept.
#[test]
fn issue25_a_stray_lease_temp_file_pins_nothing() {
    let models: Vec<_> = (0..2).map(|i| small_model(100_000, 270 + i)).collect();
    let size = selected_bytes(models[0].path());
    let node = FakeNode::new();
    let (_dir, cache, agent) = agent_on(
        &node,
        &model_entry("a", &file_url(models[0].path()), false),
        &format!("budget = \"{}\"\n", size * 3 / 2),
    );
    agent.until_ready("a");
    let stray = cache.join("leases/a/.4b0c2a36-9f5e-4b8e-8a63-000000000009.tmp-4242");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, "{\"leases\": [").unwrap();
    let body = format!("{{\"source\": \"{}\"}}", file_url(models[1].path()));
    let (status, answer) = http(&agent.admin, "POST", "/v1/models/b/prefetch", &[], &body);
    assert_eq!(status, 202, "{answer}");
    agent.until_ready("b");
    assert!(!cache.join("models/a").exists(), "a was evicted");
    until(
        &agent,
        Duration::from_secs(10),
        "the stray file was not swept",
        || !stray.exists(),
    );
}

/// A real cgroup v2 directory tree shaped like a pod's, removed when dropped.
struct PodCgroup {
    root: std::path::PathBuf,
    pod: std::path::PathBuf,
}

impl PodCgroup {
    /// Under the host's cgroup v2 mount, or `None` (with the reason) where there is none to
    /// write to.
    fn new(uid: &str) -> Result<Self, String> {
        if !is_root() {
            return Err("making a cgroup needs root".into());
        }
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next() == Some("cgroup2"))
                    .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))
                    .flatten()
            })
            .ok_or("no cgroup v2 hierarchy is mounted")?;
        let root = mount.join(unique("modelcache-pods"));
        let pod = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&pod).map_err(|e| format!("cannot make {}: {e}", pod.display()))?;
        Ok(Self { root, pod })
    }

    /// `modelcache ARGS`, started inside the pod's cgroup.
    fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
            .arg(&self.pod)
            .arg(bin());
        cmd
    }

    /// The pod stops: its cgroup goes.
    fn stop(&self) {
        std::fs::remove_dir(&self.pod).unwrap();
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.pod);
        for dir in [
            "kubepods.slice/kubepods-besteffort.slice",
            "kubepods.slice",
            "",
        ] {
            let _ = std::fs::remove_dir(self.root.join(dir));
        }
    }
}

/// The reader's identity proved, not claimed: `wait` runs in a cgroup named like a pod's and
/// asks through the readers' socket in the (read-only for pods) cache root. The agent reads
/// the connecting process's cgroup: the lease is that pod's, marked proved, without the pod
/// naming itself; the same process naming another pod is refused; and the lease ends when the
/// pod's cgroup goes.
#[test]
fn issue25_the_readers_socket_identifies_the_pod_from_its_process() {
    let uid = FakeNode::uid(6);
    let cgroup = match PodCgroup::new(&uid) {
        Ok(c) => c,
        Err(why) => {
            return skip_or_fail(&format!(
                "the peer-identity test needs a writable cgroup v2 hierarchy: {why}"
            ));
        }
    };
    let source = small_model(40_000, 256);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &file_url(source.path()), false),
            &format!(
                "[leases]\ncgroup_root = \"{}\"\ncheck_interval = \"1s\"\n",
                cgroup.root.display()
            ),
        ),
        "http://127.0.0.1:9",
        &[],
    );
    let r1 = agent.until_ready("m")["revision"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(cache.join("readers.sock").exists(), "{}", agent.log());
    let shared = tempfile::tempdir().unwrap();
    let wait = |link: &str, extra: &[&str]| {
        let mut cmd = cgroup.command();
        cmd.args(["wait", "--model", "m", "--timeout", "30s", "--cache-root"])
            .arg(&cache)
            .arg("--link")
            .arg(shared.path().join(link))
            .args(extra);
        run(&mut cmd, Duration::from_secs(60))
    };
    let out = wait("a", &[]);
    assert!(out.status.success(), "{}\n{}", stderr(&out), agent.log());
    assert!(
        stdout(&out).contains("identified by the agent"),
        "{}",
        stdout(&out)
    );
    let (_, admin) = http(&agent.admin, "GET", "/v1/models/m", &[], "");
    let admin: serde_json::Value = serde_json::from_str(&admin).unwrap();
    assert_eq!(admin["readers"][0]["pod"], uid.as_str(), "{admin}");
    assert_eq!(admin["readers"][0]["proved"], true, "{admin}");
    assert_eq!(admin["readers"][0]["revision"], r1.as_str(), "{admin}");

    // Claiming to be another pod from inside this one is refused.
    let out = wait("b", &["--lease", &FakeNode::uid(7)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("identifies the reader's pod"),
        "{}",
        stderr(&out)
    );

    // The pod stops; its lease ends.
    cgroup.stop();
    agent.until_logged(&format!("pod {uid} no longer runs on this node"));
}

/// Issue 25, on a node upgraded from an agent that published dfdaemon's inodes as they were: a
/// published file that shares its inode with a name outside the cache is taken into an inode of
/// the agent's own by the scrub (which runs at start), verified, and a later write through the
/// other name no longer reaches it.
#[test]
fn issue25_a_published_file_shared_with_dfdaemon_is_taken_private_by_the_scrub() {
    use std::os::unix::fs::MetadataExt as _;
    let source = small_model(60_000, 257);
    upload_manifest(source.path());
    let node = FakeNode::new();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model = file_url(source.path());
    let first = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &model, true),
            &node.leases_config(),
        ),
        "http://127.0.0.1:9",
        &[],
    );
    first.until_ready("m");
    drop(first);
    // What the old agent left: dfdaemon's task file is the published file's other name.
    let shard = "model-00005-of-00014.safetensors";
    let published = std::fs::canonicalize(cache.join("models/m").join(shard)).unwrap();
    let task = cache.join("dragonfly/storage/content/tasks/abc");
    std::fs::create_dir_all(task.parent().unwrap()).unwrap();
    std::fs::hard_link(&published, &task).unwrap();
    assert_eq!(std::fs::metadata(&published).unwrap().nlink(), 2);

    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &model, true),
            &format!(
                "scrub_interval = \"1h\"\nscrub_rate = \"1GB\"\n{}",
                node.leases_config()
            ),
        ),
        "http://127.0.0.1:9",
        &[],
    );
    agent.until_logged("is now a copy of the agent's own");
    agent.until_logged("every file intact");
    let meta = std::fs::metadata(&published).unwrap();
    assert_eq!(meta.nlink(), 1);
    assert_ne!(meta.ino(), std::fs::metadata(&task).unwrap().ino());
    // dfdaemon writes its task file: the model is not touched.
    std::fs::write(&task, vec![0u8; 16]).unwrap();
    assert_published_identical(source.path(), &cache.join("models/m"));
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");
}
