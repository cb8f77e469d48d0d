//! Issue 19, an operator's path: configuration changes applied to a running agent in the pod's
//! shape, the leftovers of download tools never selected, the demo for every user of a
//! machine, and documentation whose links resolve.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::{Agent, http};
use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A ConfigMap volume as the kubelet makes it: `config.toml -> ..data/config.toml`, `..data ->
/// ..TIMESTAMP`; an update writes a new timestamped directory and swaps `..data` with a rename.
struct ConfigMapVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl ConfigMapVolume {
    fn new(text: &str) -> Self {
        let mut volume = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        volume.update(text);
        std::os::unix::fs::symlink("..data/config.toml", volume.path()).unwrap();
        volume
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn update(&mut self, text: &str) {
        self.version += 1;
        let versioned = self
            .dir
            .path()
            .join(format!("..2026_12_04_v{}", self.version));
        std::fs::create_dir(&versioned).unwrap();
        std::fs::write(versioned.join("config.toml"), text).unwrap();
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(versioned.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

fn model_toml(name: &str, source: &Path, pin: bool) -> String {
    format!(
        "[[models]]\nname = \"{name}\"\nsource = \"file://{}\"\npin = {pin}\n",
        source.display()
    )
}

/// Issue 19: edit the configuration file of a running agent, as a ConfigMap update does, in
/// the pod's mount namespace: a model added is fetched, a pin changed takes effect, a model
/// removed is no longer pinned (the node is ready without it), a model whose source changed is
/// fetched again from the new one, a broken file is refused and the
/// running configuration kept, and a setting that needs a restart says so in the log, in
/// `GET /v1/config` and in `modelcache status`. The agent never restarts.
#[test]
fn issue19_config_changes_take_effect_without_a_restart() {
    if !is_root() {
        skip_or_fail("the agent's pod namespace needs root");
        return;
    }
    let (a, b) = (small_model(20_000, 91), small_model(20_000, 92));
    let cache_root = crate::disk::Target::new();
    make_shared_mount(cache_root.path());
    let private = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let head = format!(
        "cache_root = \"{}\"\n[listen]\nread = \"127.0.0.1:0\"\n[fetch]\nchunk_size = \"64KiB\"\n[cache]\nprivate_mount = \"{}\"\n",
        cache_root.path().display(),
        private.path().display()
    );
    let mut volume = ConfigMapVolume::new(&(head.clone() + &model_toml("a", a.path(), true)));
    let agent = Agent::start_in(dir.path(), "", "http://127.0.0.1:9", &[], {
        let mut cmd = in_agent_pod(private.path());
        cmd.env("MODELCACHE_CONFIG", volume.path());
        cmd
    });
    let pid = agent.pid();
    let ready = |name: &str| {
        agent.until(
            &format!("/v1/models/{name}"),
            Duration::from_secs(60),
            |_, j| j["state"] == "ready",
        )
    };
    let config = || {
        let (_, body) = http(&agent.admin, "GET", "/v1/config", &[], "");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let until_changed = |before: &serde_json::Value| {
        let started = Instant::now();
        loop {
            let now = config();
            if now["changed_at"] != before["changed_at"] || now != *before {
                return now;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the change was not noticed: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    ready("a");
    assert_eq!(config()["file"].as_str(), volume.path().to_str());

    // Add b; unpin a.
    let before = config();
    volume.update(
        &(head.clone() + &model_toml("a", a.path(), false) + &model_toml("b", b.path(), true)),
    );
    until_changed(&before);
    let b_now = ready("b");
    assert_eq!(b_now["pinned"], true);
    assert_published_identical(b.path(), &cache_root.path().join("models/b"));
    let a_now = ready("a");
    assert_eq!(a_now["pinned"], false);
    agent.until_logged("configuration: b added");
    agent.until_logged("a no longer pinned");

    // Remove a: it stays published but neither pinned nor refreshed; b alone gates readiness.
    let before = config();
    volume.update(&(head.clone() + &model_toml("b", b.path(), true)));
    until_changed(&before);
    agent.until_logged("a removed");
    assert_eq!(ready("a")["pinned"], false);
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");

    // Point b at another source: it is fetched again and the new revision is the new source.
    let c = small_model(20_000, 94);
    let before = config();
    volume.update(&(head.clone() + &model_toml("b", c.path(), true)));
    until_changed(&before);
    agent.until_logged("b changed: fetched again with its new settings");
    let refetched = agent.until("/v1/models/b", Duration::from_secs(60), |_, j| {
        j["state"] == "ready" && j["revision"] != b_now["revision"]
    });
    assert_eq!(refetched["pinned"], true);
    assert_published_identical(c.path(), &cache_root.path().join("models/b"));

    // A broken file is refused; the running configuration is kept.
    let before = config();
    volume.update("[[models]\nname = ");
    let refused = until_changed(&before);
    assert!(
        refused["refused"].as_str().is_some_and(|r| !r.is_empty()),
        "{refused}"
    );
    agent.until_logged("refused; the running configuration is kept");
    assert_eq!(ready("b")["pinned"], true);

    // A setting that needs a restart says so; the models still apply.
    let before = config();
    volume.update(
        &(head.replace("[fetch]\n", "[fetch]\nconcurrency = 8\n")
            + &model_toml("b", c.path(), true)),
    );
    let restart = until_changed(&before);
    assert!(restart["refused"].is_null(), "{restart}");
    assert_eq!(restart["restart_needed"], serde_json::json!(["fetch"]));
    agent.until_logged("fetch take effect when the agent restarts");
    let mut status = modelcache();
    status.args(["status", "--api", &agent.admin]);
    let out = run(&mut status, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("changes fetch, which take effect when the agent restarts"),
        "{}",
        stdout(&out)
    );
    assert_eq!(agent.pid(), pid, "no restart");
}

/// Issue 19: what `hf download --local-dir` leaves in a model directory (its `.cache/`
/// bookkeeping with locks and incomplete files, `.gitattributes`), and a git clone's `.git/`,
/// is neither selected nor put in a manifest.
#[test]
fn issue19_download_tool_leftovers_are_neither_selected_nor_in_the_manifest() {
    let source = small_model(20_000, 93);
    let root = source.path();
    for (path, body) in [
        (
            ".gitattributes",
            "*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        ),
        (".cache/huggingface/.gitignore", "*\n"),
        (
            ".cache/huggingface/download/config.json.metadata",
            "abc\n1\n",
        ),
        (
            ".cache/huggingface/download/model-00001-of-00014.safetensors.lock",
            "",
        ),
        (
            ".cache/huggingface/download/model-00002-of-00014.safetensors.incomplete",
            "partial",
        ),
        (".git/HEAD", "ref: refs/heads/main\n"),
        ("tokenizer.json.lock", ""),
    ] {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    upload_manifest(root);
    let manifest = std::fs::read_to_string(root.join("modelcache.manifest.json")).unwrap();
    for leftover in [".cache", ".git", ".lock", ".incomplete"] {
        assert!(
            !manifest.contains(leftover),
            "{leftover} in the manifest: {manifest}"
        );
    }
    let cache = tempfile::tempdir().unwrap();
    let url = format!("file://{}", root.display());
    let out = run(
        &mut prefetch_cmd(None, &url, cache.path(), &[]),
        Duration::from_secs(120),
    );
    assert_eq!(summary(&out)["verification"], "blake3");
    let published = files_under(&cache.path().join("models/gpt-oss-120b"));
    assert!(
        published.iter().all(|f| !f.starts_with(".cache")
            && !f.starts_with(".git")
            && !f.ends_with(".lock")
            && !f.ends_with(".incomplete")),
        "{published:?}"
    );
    assert!(
        published.iter().any(|f| f == "config.json"),
        "{published:?}"
    );
}

/// Issue 19: two users of one machine, one of them not root, each run the demo with its
/// defaults: each gets a folder of its own and a working demo, and the output says what
/// happened (generated, then reused and nothing fetched).
#[test]
fn issue19_the_demo_works_for_two_users_of_one_machine() {
    if !is_root() {
        skip_or_fail("running the demo as a second user needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let demo = |user: Option<u32>| {
        let mut cmd = match user {
            Some(uid) => {
                let mut cmd = std::process::Command::new("setpriv");
                cmd.env_clear()
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .arg("--clear-groups")
                    .arg(bin());
                cmd
            }
            None => {
                let mut cmd = std::process::Command::new(bin());
                cmd.env_clear();
                cmd
            }
        };
        cmd.env("TMPDIR", tmp.path())
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .args(["demo", "--shard-size", "256KiB"]);
        run(&mut cmd, Duration::from_secs(180))
    };
    let first_root = demo(None);
    let first_user = demo(Some(10001));
    for (who, out) in [("root", &first_root), ("uid 10001", &first_user)] {
        assert!(
            out.status.success(),
            "{who}: {}\n{}",
            stdout(out),
            stderr(out)
        );
        assert!(
            stdout(out).contains("1. generated"),
            "{who}: {}",
            stdout(out)
        );
        assert!(
            stdout(out).contains("run again to see"),
            "{who}: {}",
            stdout(out)
        );
    }
    for uid in [0, 10001] {
        assert!(
            tmp.path()
                .join(format!("modelcache-demo-{uid}/cache/models/gpt-oss-120b"))
                .exists()
        );
    }
    let again = demo(Some(10001));
    assert!(again.status.success(), "{}", stderr(&again));
    let text = stdout(&again);
    assert!(
        text.contains("1. reusing the generated model")
            && text.contains("already published")
            && text.contains("the published revision was reused: nothing was fetched"),
        "{text}"
    );
    assert!(!text.contains("run again to see"), "{text}");
}

/// Issue 19: a `file://` source the user may not read says so in terms of files and
/// permissions, not Azure roles, and without "gave up after 1 attempts" (nothing is retried).
#[test]
fn issue19_a_file_the_user_may_not_read_is_a_permissions_error_not_an_azure_one() {
    if !is_root() {
        skip_or_fail("reading as another user needs root");
        return;
    }
    let source = small_model(20_000, 94);
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(source.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let shard = source.path().join("model-00004-of-00014.safetensors");
        std::fs::set_permissions(&shard, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let mut cmd = std::process::Command::new("setpriv");
    cmd.env_clear()
        .args(["--reuid=10001", "--regid=10001", "--clear-groups"])
        .arg(bin())
        .args(["prefetch", "--model", "m", "--cache-root"])
        .arg(cache.path())
        .arg(format!("--source=file://{}", source.path().display()));
    let out = run(&mut cmd, Duration::from_secs(60));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(".safetensors")
            && err.contains("permission denied reading")
            && err.contains("read permission"),
        "{err}"
    );
    assert!(
        !err.contains("Storage Blob") && !err.contains("gave up"),
        "{err}"
    );
}

/// Issue 19: the README is a front door (about 200 lines) and every relative link in it and in
/// docs/ resolves, to a file and, where one is named, to a heading in it.
#[test]
fn issue19_the_readme_is_short_and_every_documentation_link_resolves() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(lines <= 220, "README.md has {lines} lines");
    let mut pages = vec![repo().join("README.md")];
    for entry in std::fs::read_dir(repo().join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut links = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in text
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
        {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            assert!(
                resolved.exists(),
                "{}: the link {target} leads nowhere",
                page.display()
            );
            if !anchor.is_empty() {
                let headings: Vec<String> = std::fs::read_to_string(&resolved)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .map(|l| slug(l.trim_start_matches('#').trim()))
                    .collect();
                assert!(
                    headings.iter().any(|h| h == anchor),
                    "{}: no heading #{anchor} in {}",
                    page.display(),
                    resolved.display()
                );
            }
            links += 1;
        }
    }
    assert!(links >= 10, "{links} links checked");
}

/// A heading's anchor, as GitHub makes it.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}
