//! The real binary as `modelcache agent` against Azurite: readiness, waiting, joining,
//! authorisation, shutdown and resume, fast restart, eviction and metrics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proxy::{Fault, FaultProxy};
use crate::support::*;

/// A running agent: its child process, its two addresses, and its log.
pub(crate) struct Agent {
    child: Option<Child>,
    pub(crate) read: String,
    pub(crate) admin: String,
    log: Arc<Mutex<String>>,
}

impl Agent {
    /// Starts `modelcache agent` with `config` (TOML), the emulator at `endpoint`, and `envs`,
    /// and waits until its cache is settled (disk setup done or failed, models started).
    pub(crate) fn start(dir: &Path, config: &str, endpoint: &str, envs: &[(&str, &str)]) -> Self {
        let agent = Self::start_listening(dir, config, endpoint, envs);
        let started = Instant::now();
        while !agent.log().contains("cache settled: ") {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the agent's cache did not settle: {}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Starts the agent and returns as soon as it listens (disk setup may still run).
    pub(crate) fn start_listening(
        dir: &Path,
        config: &str,
        endpoint: &str,
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start_in(dir, config, endpoint, envs, modelcache())
    }

    /// Starts the agent through `cmd` (the binary, or a wrapper that runs it, e.g. in a memory
    /// cgroup) and returns as soon as it listens. With `config` empty, the agent finds its file
    /// through `MODELCACHE_CONFIG`, which `cmd` sets.
    pub(crate) fn start_in(
        dir: &Path,
        config: &str,
        endpoint: &str,
        envs: &[(&str, &str)],
        mut cmd: std::process::Command,
    ) -> Self {
        with_emulator(&mut cmd, endpoint);
        // Each agent's admin socket in its own directory (the default is the node's).
        cmd.env("MODELCACHE_LISTEN_ADMIN", dir.join("run/admin.sock"));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.arg("agent");
        if !config.is_empty() {
            let path = dir.join("agent.toml");
            std::fs::write(&path, config).unwrap();
            cmd.arg("--config").arg(&path);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // "agent listening on ADDR (read) and PATH (admin), cache DIR"
                if let Some(rest) = line.split("agent listening on ").nth(1)
                    && let Some((read, rest)) = rest.split_once(" (read) and ")
                    && let Some((admin, _)) = rest.split_once(" (admin)")
                {
                    let _ = tx.send(vec![read.to_string(), admin.to_string()]);
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let addrs = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the agent did not start: {}", log.lock().unwrap()));
        Self {
            child: Some(child),
            read: addrs[0].clone(),
            admin: addrs[1].clone(),
            log,
        }
    }

    /// The agent's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the agent has logged `needle`: its stderr reaches the log through a reader
    /// thread, so a line the agent wrote before answering a request may not be there yet.
    pub(crate) fn until_logged(&self, needle: &str) {
        let started = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the agent never logged {needle:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns how long the agent took to exit, and its status.
    pub(crate) fn terminate(&mut self) -> (Duration, std::process::ExitStatus) {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        let started = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (started.elapsed(), status);
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the agent ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls until `GET path` on the admin address answers JSON for which `done` holds.
    pub(crate) fn until(
        &self,
        path: &str,
        limit: Duration,
        done: impl Fn(u16, &serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let (status, body) = http(&self.admin, "GET", path, &[], "");
            let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            if done(status, &json) {
                return json;
            }
            assert!(
                started.elapsed() < limit,
                "{path} never reached the state: {status} {body}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn until_ready(&self, model: &str) -> serde_json::Value {
        self.until(
            &format!("/v1/models/{model}"),
            Duration::from_secs(90),
            |_, j| j["state"] == "ready",
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A minimal HTTP/1.1 request; returns the status and the body.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = connect(addr);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        if addr.starts_with('/') {
            "localhost"
        } else {
            addr
        },
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // The server may answer with chunked encoding: keep only the JSON or text payload.
    let body = if body.contains("\r\n") && !body.trim_start().starts_with(['{', '[', '#']) {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

/// A connection to a listener: a TCP address, or a Unix socket's path.
pub(crate) trait Connection: Read + Write {}
impl<T: Read + Write> Connection for T {}

pub(crate) fn connect(addr: &str) -> Box<dyn Connection> {
    if addr.starts_with('/') {
        let stream = std::os::unix::net::UnixStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Box::new(stream)
    } else {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        Box::new(stream)
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n.min(after.len())]);
        rest = after.get(n + 2..).unwrap_or("");
    }
    out
}

/// The agent's configuration for a test: a read listener on a free loopback port (the admin
/// socket is set by [`Agent::start`]), small ranges, and,
/// unless `extra` sets its own `[api]`, requests allowed to name any `file://` or `az://`
/// source (the tests of other things POST sources of their own).
pub(crate) fn config(cache: &Path, models: &str, extra: &str) -> String {
    let api = if extra.contains("[api]") {
        ""
    } else {
        "\n[api]\nallowed_sources = [\"file:///\", \"az://\"]\n"
    };
    format!(
        "cache_root = \"{}\"\n[listen]\nread = \"127.0.0.1:0\"\n[fetch]\nchunk_size = \"64KiB\"\nconcurrency = 4\nfailed_retry_delay = \"1s\"\n[cache]\nwarm_page_cache = \"off\"\n{extra}\n{models}{api}",
        cache.display()
    )
}

pub(crate) fn model_entry(name: &str, url: &str, pin: bool) -> String {
    format!("[[models]]\nname = \"{name}\"\nsource = \"{url}\"\npin = {pin}\n")
}

pub(crate) fn metric(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

#[test]
fn readyz_turns_ready_only_after_publish_and_both_waits_agree() {
    let Some(az) = azurite() else { return };
    let model = rt().block_on(azure_model(az, 200_000, true));
    let proxy = FaultProxy::start(az.port);
    proxy.add(
        "gpt-oss-120b/model-",
        Fault::Delay(Duration::from_millis(150)),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let agent = Agent::start(
        dir.path(),
        &config(&cache, &model_entry("gpt-oss-120b", &model.url(), true), ""),
        &proxy.endpoint(),
        &[],
    );

    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"ready\":false"), "{body}");

    let api = format!("http://{}", agent.read);
    let mut by_api = modelcache();
    by_api.args([
        "wait",
        "--model",
        "gpt-oss-120b",
        "--api",
        &api,
        "--interval",
        "200ms",
        "--timeout",
        "90s",
    ]);
    let mut by_dir = modelcache();
    by_dir
        .args([
            "wait",
            "--model",
            "gpt-oss-120b",
            "--interval",
            "200ms",
            "--timeout",
            "90s",
            "--cache-root",
        ])
        .arg(&cache);
    let a = by_api
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = by_dir
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (
        wait_with_limit(a, Duration::from_secs(120)),
        wait_with_limit(b, Duration::from_secs(120)),
    );
    assert!(
        a.status.success(),
        "wait --api: {} {}",
        stdout(&a),
        stderr(&a)
    );
    assert!(
        b.status.success(),
        "wait --cache-root: {} {}",
        stdout(&b),
        stderr(&b)
    );
    assert!(
        stdout(&a).contains("%"),
        "progress lines while waiting: {}",
        stdout(&a)
    );
    assert!(stdout(&a).contains("is ready"), "{}", stdout(&a));
    assert!(stdout(&b).contains("is ready"), "{}", stdout(&b));

    let (status, _) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200);
    let (status, _) = http(&agent.read, "GET", "/v1/models/gpt-oss-120b/ready", &[], "");
    assert_eq!(status, 200);
    let m = agent.until_ready("gpt-oss-120b");
    assert_eq!(m["verification"], "blake3");
    assert_eq!(m["bytes_fetched"], m["bytes_total"]);
    assert_published_identical(model.source.path(), &cache.join("models/gpt-oss-120b"));

    // /metrics parses as Prometheus text and agrees with the API.
    let (status, text) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(status, 200);
    let total = m["bytes_total"].as_f64().unwrap();
    assert_eq!(
        metric(
            &text,
            "modelcache_bytes_fetched_total",
            Some(("model", "gpt-oss-120b"))
        ),
        total
    );
    assert_eq!(
        metric(&text, "modelcache_model_state", Some(("state", "ready"))),
        1.0
    );
    assert!(metric(&text, "modelcache_cache_used_bytes", None) >= total);
    assert!(
        text.contains("modelcache_phase_duration_seconds_bucket"),
        "{text}"
    );

    // Timeouts: a model nobody fetches.
    for args in [
        vec!["--api", api.as_str()],
        vec!["--cache-root", cache.to_str().unwrap()],
    ] {
        let mut w = modelcache();
        w.args([
            "wait",
            "--model",
            "never",
            "--timeout",
            "1s",
            "--interval",
            "200ms",
        ])
        .args(&args);
        let out = run(&mut w, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(8), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("was not ready within 1s"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn two_concurrent_prefetch_requests_make_one_download() {
    let Some(az) = azurite() else { return };
    let model = rt().block_on(azure_model(az, 200_000, true));
    let proxy = FaultProxy::start(az.port);
    proxy.add(
        "gpt-oss-120b/model-",
        Fault::Delay(Duration::from_millis(50)),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("cache"), "", ""),
        &proxy.endpoint(),
        &[],
    );
    let body = format!("{{\"source\": \"{}\"}}", model.url());
    let answers: Vec<(u16, String)> = std::thread::scope(|s| {
        let posts: Vec<_> = (0..2)
            .map(|_| s.spawn(|| http(&agent.admin, "POST", "/v1/models/m/prefetch", &[], &body)))
            .collect();
        posts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let jobs: Vec<serde_json::Value> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 202, "{body}");
            serde_json::from_str(body).unwrap()
        })
        .collect();
    assert_eq!(jobs[0]["job"], jobs[1]["job"], "{jobs:?}");
    assert_eq!(
        jobs.iter().filter(|j| j["joined"] == true).count(),
        1,
        "{jobs:?}"
    );
    let m = agent.until_ready("m");
    assert_eq!(
        m["bytes_fetched"], m["bytes_total"],
        "one download, not two: {m}"
    );
    let (_, text) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(
            &text,
            "modelcache_bytes_fetched_total",
            Some(("model", "m"))
        ),
        m["bytes_total"].as_f64().unwrap()
    );

    // Bad input gets a 4xx with the JSON envelope.
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/x/prefetch",
        &[],
        "{\"sauce\": 1}",
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\"code\":\"invalid_request\"") && body.contains("sauce"),
        "{body}"
    );
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/..%2Fx/prefetch",
        &[],
        &body_with_source(&model.url()),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(&agent.admin, "POST", "/v1/models/y/prefetch", &[], "");
    assert_eq!(status, 400, "an unknown model needs a source: {body}");
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/y/prefetch",
        &[],
        &body_with_source("s3://bucket/y"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("s3://bucket/y"), "{body}");
    let (status, body) = http(&agent.admin, "GET", "/v1/models/nope", &[], "");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("model_not_found"), "{body}");
    let big = "x".repeat(200_000);
    let (status, body) = http(&agent.admin, "POST", "/v1/models/z/prefetch", &[], &big);
    assert_eq!(status, 413);
    assert!(body.contains("\"code\":\"payload_too_large\""), "{body}");
}

fn body_with_source(url: &str) -> String {
    format!("{{\"source\": \"{url}\"}}")
}

#[test]
fn state_changing_requests_on_the_read_address_need_the_token() {
    let Some(az) = azurite() else { return };
    let dir = tempfile::tempdir().unwrap();
    // No token: refused on the read address, served on the admin (loopback) address.
    let open = Agent::start(
        dir.path(),
        &config(&dir.path().join("c1"), "", ""),
        &az.endpoint(),
        &[],
    );
    let body = body_with_source("az://nothing-here/x");
    let (status, text) = http(&open.read, "POST", "/v1/models/m/prefetch", &[], &body);
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("listen.token_file"), "{text}");
    let (status, _) = http(&open.read, "DELETE", "/v1/models/m", &[], "");
    assert_eq!(status, 403);
    let (status, text) = http(&open.admin, "POST", "/v1/models/m/prefetch", &[], &body);
    assert_eq!(status, 202, "{text}");
    drop(open);

    // With a token: the read address (the node address in a cluster) demands it.
    let dir2 = tempfile::tempdir().unwrap();
    let guarded = Agent::start(
        dir2.path(),
        &config(&dir2.path().join("c2"), "", ""),
        &az.endpoint(),
        &[("MODELCACHE_TOKEN", "s3cret")],
    );
    for auth in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "s3cret")],
    ] {
        let (status, text) = http(&guarded.read, "POST", "/v1/models/m/prefetch", &auth, &body);
        assert_eq!(status, 401, "{auth:?}: {text}");
    }
    let (status, text) = http(
        &guarded.read,
        "POST",
        "/v1/models/m/prefetch",
        &[("Authorization", "Bearer s3cret")],
        &body,
    );
    assert_eq!(status, 202, "{text}");
    // The scheme is case-insensitive, as HTTP says.
    let (status, text) = http(
        &guarded.read,
        "POST",
        "/v1/models/m/prefetch",
        &[("Authorization", "bearer s3cret")],
        &body,
    );
    assert_eq!(status, 202, "{text}");
    // Reads stay open.
    let (status, _) = http(&guarded.read, "GET", "/v1/models", &[], "");
    assert_eq!(status, 200);
    assert!(
        !guarded.log().contains("s3cret"),
        "the token is never logged"
    );
}

#[test]
fn sigterm_mid_download_then_restart_resumes_and_a_published_model_is_ready_at_once() {
    let Some(az) = azurite() else { return };
    let model = rt().block_on(azure_model(az, 1 << 20, true));
    let proxy = FaultProxy::start(az.port);
    proxy.add(
        "gpt-oss-120b/model-",
        Fault::Delay(Duration::from_millis(100)),
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cfg = config(&cache, &model_entry("gpt-oss-120b", &model.url(), true), "");
    let mut first = Agent::start(dir.path(), &cfg, &proxy.endpoint(), &[]);
    let journal = cache.join("staging/gpt-oss-120b/journal.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&journal)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 10
    {
        assert!(Instant::now() < deadline, "no progress: {}", first.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (took, status) = first.terminate();
    assert!(status.success(), "{status:?}: {}", first.log());
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    first.until_logged("stopped by shutdown");
    // Bytes of the ranges the journal holds: exactly what the next run must not fetch again.
    let journaled = journaled_bytes(&journal);
    assert!(journaled > 0);

    let second = Agent::start(dir.path(), &cfg, &az.endpoint(), &[]);
    let m = second.until_ready("gpt-oss-120b");
    let (total, fetched, reused) = (
        m["bytes_total"].as_u64().unwrap(),
        m["bytes_fetched"].as_u64().unwrap(),
        m["bytes_reused"].as_u64().unwrap(),
    );
    assert!(
        reused >= journaled,
        "journaled ranges ({journaled} bytes) are reused: {m}"
    );
    assert_eq!(fetched + reused, total, "{m}");
    assert_published_identical(model.source.path(), &cache.join("models/gpt-oss-120b"));
    drop(second);

    // Restart with the model published: ready at once, nothing asked of the source.
    let quiet = FaultProxy::start(az.port);
    let started = Instant::now();
    let third = Agent::start(dir.path(), &cfg, &quiet.endpoint(), &[]);
    let (status, body) = http(&third.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let m: serde_json::Value =
        serde_json::from_str(&http(&third.admin, "GET", "/v1/models/gpt-oss-120b", &[], "").1)
            .unwrap();
    assert_eq!(m["state"], "ready");
    assert_eq!(m["bytes_fetched"], 0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        quiet.requests.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no request reached the source"
    );
}

#[test]
fn eviction_removes_the_least_recently_used_unpinned_model_and_never_a_pinned_one() {
    let Some(az) = azurite() else { return };
    let rt = rt();
    let pinned = rt.block_on(azure_model(az, 200_000, true));
    let a = rt.block_on(azure_model(az, 200_000, true));
    let b = rt.block_on(azure_model(az, 200_000, true));
    let c = rt.block_on(azure_model(az, 200_000, true));
    let big = rt.block_on(azure_model(az, 1 << 20, true));
    let size: u64 = files_under(pinned.source.path())
        .iter()
        .filter(|f| !f.starts_with("original/") && !f.starts_with("metal/"))
        .map(|f| {
            std::fs::metadata(pinned.source.path().join(f))
                .unwrap()
                .len()
        })
        .sum();
    // Room for three models, not four.
    let budget = size * 7 / 2 + (1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("pinned", &pinned.url(), true),
            &format!("budget = \"{budget}\""),
        ),
        &az.endpoint(),
        &[],
    );
    agent.until_ready("pinned");
    let fetch = |name: &str, m: &AzureModel| {
        let (status, text) = http(
            &agent.admin,
            "POST",
            &format!("/v1/models/{name}/prefetch"),
            &[],
            &body_with_source(&m.url()),
        );
        assert_eq!(status, 202, "{text}");
        agent.until_ready(name);
    };
    fetch("a", &a);
    fetch("b", &b);
    // Anyone on the node may poll readiness; that is not a use, so it cannot keep a model.
    for _ in 0..3 {
        let (status, _) = http(&agent.read, "GET", "/v1/models/a/ready", &[], "");
        assert_eq!(status, 200);
    }
    fetch("c", &c);
    // Making room for c evicted a (least recently used, unpinned), never the pinned model.
    assert!(!cache.join("models/a").exists(), "a was evicted");
    assert!(!cache.join("store/a").exists());
    for kept in ["pinned", "b", "c"] {
        assert!(cache.join("models").join(kept).exists(), "{kept} was kept");
    }
    // Requested, not configured: forgotten once evicted (issue 25: no reader brings it back;
    // a request on the admin socket names it again).
    let (status, body) = http(&agent.admin, "GET", "/v1/models/a", &[], "");
    assert_eq!(status, 404, "{body}");

    // A model that cannot fit even after evicting every unpinned one fails clearly.
    let (status, _) = http(
        &agent.admin,
        "POST",
        "/v1/models/big/prefetch",
        &[],
        &body_with_source(&big.url()),
    );
    assert_eq!(status, 202);
    let m = agent.until("/v1/models/big", Duration::from_secs(60), |_, j| {
        j["state"] == "failed"
    });
    assert!(
        m["last_error"].as_str().unwrap().contains("cache budget"),
        "{m}"
    );
    assert!(
        cache.join("models/pinned").exists(),
        "the pinned model is never evicted"
    );

    // DELETE: a pinned model is refused; an unpinned one goes.
    let (status, text) = http(&agent.admin, "DELETE", "/v1/models/pinned", &[], "");
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("pinned"), "{text}");
    let (status, _) = http(&agent.admin, "DELETE", "/v1/models/b", &[], "");
    assert_eq!(status, 204);
    assert!(!cache.join("models/b").exists());
    let (_, text) = http(&agent.read, "GET", "/metrics", &[], "");
    assert!(
        metric(&text, "modelcache_evictions_total", None) >= 2.0,
        "{text}"
    );
}

#[test]
fn a_bad_configuration_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("bad.toml");
    std::fs::write(&path, "[fetch]\nconcurency = 8\n").unwrap();
    let mut cmd = modelcache();
    cmd.args(["agent", "--config"]).arg(&path);
    let out = run(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("concurency") && stderr(&out).contains("bad.toml"),
        "{}",
        stderr(&out)
    );

    let mut cmd = modelcache();
    cmd.args(["agent", "--check", "--set", "fetch.concurrency=0"]);
    let out = run(&mut cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--concurrency") || stderr(&out).contains("concurrency"),
        "{}",
        stderr(&out)
    );

    let mut cmd = modelcache();
    cmd.args(["agent", "--print-default-config"]);
    let default = stdout(&run(&mut cmd, Duration::from_secs(30)));
    std::fs::write(&path, default).unwrap();
    let mut cmd = modelcache();
    cmd.args(["agent", "--check", "--config"]).arg(&path);
    let out = run(&mut cmd, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("gpt-oss-120b (pinned)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn models_published_before_the_agent_started_are_listed_ready_and_unpinned() {
    let source = small_model(50_000, 21);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", source.path().display());
    let out = run(
        &mut prefetch_cmd(None, &url, &cache, &[]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let agent = Agent::start(
        dir.path(),
        &config(&cache, "", ""),
        "http://127.0.0.1:9",
        &[],
    );
    let m: serde_json::Value =
        serde_json::from_str(&http(&agent.admin, "GET", "/v1/models/gpt-oss-120b", &[], "").1)
            .unwrap();
    assert_eq!(m["state"], "ready", "{m}");
    assert_eq!(m["pinned"], false, "{m}");
    assert_eq!(m["verification"], "structural", "{m}");
    // Nothing pinned is waiting, so the node is ready.
    assert_eq!(http(&agent.read, "GET", "/readyz", &[], "").0, 200);

    // `modelcache status` reads the same thing as a table.
    let mut status = modelcache();
    status.args(["status", "--api", &agent.admin]);
    let out = run(&mut status, Duration::from_secs(30));
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.starts_with("gpt-oss-120b"))
        .unwrap_or_default();
    assert!(
        row.contains("ready") && row.contains("structural"),
        "{table}"
    );
    let mut unreachable = modelcache();
    unreachable.args(["status", "--api", "http://127.0.0.1:9"]);
    let out = run(&mut unreachable, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot reach the agent"),
        "{}",
        stderr(&out)
    );
}

/// Disk setup runs behind the listeners: while it is stuck (here on a sysfs file that is a FIFO
/// nobody writes yet, standing in for a slow mkfs), `/healthz` answers so a liveness probe does
/// not kill the agent, `/readyz` and `/v1/disk` say what it waits for, and nothing may write to
/// the cache root, which is still the OS disk.
#[test]
fn healthz_answers_while_disk_setup_runs_and_nothing_is_written_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path().join("sys/block/fake0");
    std::fs::create_dir_all(sys.join("holders")).unwrap();
    std::fs::write(sys.join("dev"), "7:99\n").unwrap();
    std::fs::write(sys.join("removable"), "0\n").unwrap();
    let fifo = sys.join("size");
    nix::unistd::mkfifo(
        &fifo,
        nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("dev")).unwrap();
    let cache = dir.path().join("cache");
    let extra = format!(
        "[disk]\nenabled = true\ndevices = [\"fake0\"]\nsysfs_root = \"{}\"\ndev_root = \"{}\"",
        dir.path().join("sys").display(),
        dir.path().join("dev").display()
    );
    let agent = Agent::start_listening(
        dir.path(),
        &config(&cache, &model_entry("m", "az://c/m", true), &extra),
        "http://127.0.0.1:9",
        &[],
    );

    let (status, body) = http(&agent.read, "GET", "/healthz", &[], "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("setting up"), "{body}");
    let (status, body) = http(&agent.read, "GET", "/v1/disk", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("setting up"), "{body}");
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/x/prefetch",
        &[],
        "{\"source\": \"az://c/x\"}",
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cache disks are not ready"), "{body}");
    let (status, body) = http(&agent.admin, "DELETE", "/v1/models/m", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(!cache.join("models").exists(), "nothing written yet");

    // The stuck read returns (a device with no media): setup fails, said everywhere. Opening
    // without blocking fails until the agent's reader is there, so this cannot hang.
    let started = Instant::now();
    let mut writer = loop {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&fifo)
        {
            Ok(f) => break f,
            Err(e) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "the agent never read the device size: {e}\n{}",
                agent.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    writer.write_all(b"0\n").unwrap();
    drop(writer);
    let started = Instant::now();
    while !agent.log().contains("cache settled: ") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = http(&agent.read, "GET", "/v1/disk", &[], "");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("failed") && body.contains("has no media"),
        "{body}"
    );
    let (status, _) = http(&agent.read, "GET", "/healthz", &[], "");
    assert_eq!(status, 200);
    assert!(
        !cache.join("models").exists(),
        "nothing written to the OS disk"
    );
}

/// A refresh of a published model (a POST for it) keeps it ready while it runs and after it
/// fails: the link still points at a verified revision, so `/readyz` and the model's `ready`
/// stay 200 and init containers are not failed by a transient outage of the source.
#[test]
fn a_ready_model_stays_ready_through_a_refresh_that_fails() {
    let Some(az) = azurite() else { return };
    let model = rt().block_on(azure_model(az, 100_000, true));
    let proxy = FaultProxy::start(az.port);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &config(
            &dir.path().join("cache"),
            &model_entry("m", &model.url(), true),
            "",
        ),
        &proxy.endpoint(),
        &[("MODELCACHE_FETCH_MAX_ATTEMPTS", "3")],
    );
    agent.until_ready("m");

    // The source is down: every listing answers 503 with Retry-After: 1.
    proxy.add(
        "comp=list",
        Fault::Busy {
            retry_after_secs: 1,
        },
        None,
    );
    let (status, body) = http(&agent.admin, "POST", "/v1/models/m/prefetch", &[], "");
    assert_eq!(status, 202, "{body}");
    let during = agent.until("/v1/models/m", Duration::from_secs(30), |_, j| {
        !j["job"].is_null()
    });
    assert_eq!(during["state"], "ready", "{during}");
    let (status, body) = http(&agent.read, "GET", "/v1/models/m/ready", &[], "");
    assert_eq!(status, 200, "{body}");

    let after = agent.until("/v1/models/m", Duration::from_secs(60), |_, j| {
        j["last_error"].as_str().is_some_and(|e| e.contains("503"))
    });
    assert_eq!(after["state"], "ready", "{after}");
    let (status, body) = http(&agent.read, "GET", "/readyz", &[], "");
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(&agent.read, "GET", "/v1/models/m/ready", &[], "");
    assert_eq!(status, 200);
    assert!(proxy.fired() >= 3, "the refresh really ran into the outage");
}

/// A publish killed part-way leaves `store/NAME/.REV.tmp-PID` (the model's verified files,
/// moved out of staging). At start the agent, under each model's lock: moves such files back to
/// staging for a configured model (its resume then finds them journaled), removes them with
/// the partials of a model no one configured, and leaves a model someone holds alone.
#[test]
fn copies_left_by_killed_publishes_are_recovered_or_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let shard = "model-00001-of-00002.safetensors";
    let left = |model: &str, kind: &str| {
        let d = cache.join(format!("store/{model}/.0123456789abcdef.{kind}-4242"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(shard), vec![7u8; 4096]).unwrap();
        d
    };
    let configured = left("c", "tmp");
    let unconfigured = left("m", "tmp");
    let damaged = left("m", "damaged");
    let held = left("held", "tmp");
    std::fs::create_dir_all(cache.join("staging/m/files")).unwrap();
    std::fs::write(cache.join("staging/m/files/x.partial"), b"abandoned").unwrap();
    let layout = modelcache::store::Layout::new(&cache);
    let holder = modelcache::store::ModelName::new("held").unwrap();
    let modelcache::store::lock::TryLock::Held(_lock) =
        modelcache::store::lock::try_lock(&layout, &holder, "a test").unwrap()
    else {
        panic!("the lock of a model no one uses must be free");
    };
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry(
                "c",
                &format!("file://{}", dir.path().join("no-such-source").display()),
                false,
            ),
            "",
        ),
        "http://127.0.0.1:9",
        &[],
    );
    let log = agent.log();
    assert!(!configured.exists(), "{log}");
    assert_eq!(
        std::fs::read(cache.join(format!("staging/c/files/{shard}.partial"))).unwrap(),
        vec![7u8; 4096],
        "the verified file goes back to staging for the resume: {log}"
    );
    assert!(!unconfigured.exists() && !damaged.exists(), "{log}");
    assert!(!cache.join("staging/m").exists(), "{log}");
    assert!(held.exists(), "a model someone holds is left alone: {log}");
    assert!(
        log.contains("recovered the files of an interrupted publish"),
        "{log}"
    );
    assert!(log.contains("is in use by pid"), "{log}");
}

/// Six simultaneous `POST …/prefetch` for a new model start exactly one job, 100 times in a
/// row, over HTTP. The test holds each model's file lock while its requests race, so no job can
/// finish and legitimately make room for a second: only the race itself could. Then a `DELETE`
/// of a model someone else holds is refused naming the holder, and goes through once released.
#[test]
fn six_concurrent_requests_for_a_new_model_start_one_job_a_hundred_times() {
    use modelcache::store::lock::{TryLock, try_lock};
    let source = small_model(2_000, 3);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let agent = Agent::start(
        dir.path(),
        &config(&cache, "", ""),
        "http://127.0.0.1:9",
        &[],
    );
    let layout = modelcache::store::Layout::new(&cache);
    let body = body_with_source(&format!("file://{}", source.path().display()));
    let mut held = Vec::new();
    for round in 0..100 {
        let name = format!("m{round}");
        let model = modelcache::store::ModelName::new(&name).unwrap();
        let TryLock::Held(lock) = try_lock(&layout, &model, "the test").unwrap() else {
            panic!("round {round}: the lock of a new model must be free");
        };
        held.push(lock);
        let path = format!("/v1/models/{name}/prefetch");
        let start = std::sync::Barrier::new(6);
        let answers: Vec<serde_json::Value> = std::thread::scope(|s| {
            let posts: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        http(&agent.admin, "POST", &path, &[], &body)
                    })
                })
                .collect();
            posts
                .into_iter()
                .map(|p| {
                    let (status, text) = p.join().unwrap();
                    assert_eq!(status, 202, "round {round}: {text}");
                    serde_json::from_str(&text).unwrap()
                })
                .collect()
        });
        let started = answers.iter().filter(|a| a["joined"] == false).count();
        assert_eq!(started, 1, "round {round}: {answers:?}");
        assert!(
            answers.iter().all(|a| a["job"] == answers[0]["job"]),
            "round {round}: {answers:?}"
        );
    }
    // Nothing was written while the test held the models.
    assert!(!cache.join("staging/m0").exists(), "{}", agent.log());
    let first = held.remove(0);
    held.clear();
    let ready = agent.until_ready("m1");
    assert_eq!(ready["bytes_fetched"], ready["bytes_total"], "{ready}");

    let (status, text) = http(&agent.admin, "DELETE", "/v1/models/m1", &[], "");
    assert_eq!(status, 204, "{text}");
    drop(first);
    agent.until_ready("m0");
    let TryLock::Held(again) = try_lock(
        &layout,
        &modelcache::store::ModelName::new("m0").unwrap(),
        "the test",
    )
    .unwrap() else {
        panic!("m0 is idle once ready");
    };
    let (status, text) = http(&agent.admin, "DELETE", "/v1/models/m0", &[], "");
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("the test"), "the holder is named: {text}");
    assert!(cache.join("models/m0").exists(), "nothing removed");
    drop(again);
    let (status, text) = http(&agent.admin, "DELETE", "/v1/models/m0", &[], "");
    assert_eq!(status, 204, "{text}");
    assert!(!cache.join("models/m0").exists() && !cache.join("store/m0").exists());
}

/// A byte flipped in a published shard with its modification time kept passes every cheap
/// check; the background scrub re-hashes it, takes the model out of `ready`, fetches just that
/// shard again (the intact files are linked, not fetched) and publishes a new revision
/// directory, byte-identical to the source.
#[test]
fn the_scrub_finds_a_flipped_byte_and_refetches_just_that_file() {
    use std::os::unix::fs::FileExt;
    let source = small_model(100_000, 13);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", source.path().display());
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &url, true),
            "scrub_rate = \"1GiB\"\nscrub_interval = \"1s\"\n",
        ),
        "http://127.0.0.1:9",
        &[],
    );
    let first = agent.until_ready("m");
    let revision = first["revision"].as_str().unwrap().to_string();
    let shard = "model-00005-of-00014.safetensors";
    let published = cache.join("models/m").join(shard);
    let size = std::fs::metadata(&published).unwrap().len();
    let mtime = std::fs::metadata(&published).unwrap().modified().unwrap();
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&published)
            .unwrap();
        let mut byte = [0u8; 1];
        file.read_at(&mut byte, size - 10).unwrap();
        file.write_at(&[byte[0] ^ 0x01], size - 10).unwrap();
        file.set_modified(mtime).unwrap();
    }
    let repaired = agent.until("/v1/models/m", Duration::from_secs(60), |_, j| {
        j["state"] == "ready" && j["revision"].as_str() != Some(revision.as_str())
    });
    assert_eq!(
        repaired["revision"],
        format!("{revision}-2"),
        "a new revision directory: {repaired}"
    );
    assert_eq!(
        repaired["bytes_fetched"], size,
        "only the damaged shard is fetched again: {repaired}"
    );
    assert_published_identical(source.path(), &cache.join("models/m"));
    assert!(!cache.join("store/m").join(&revision).exists());
    let (_, text) = http(&agent.read, "GET", "/metrics", &[], "");
    assert_eq!(
        metric(&text, "modelcache_scrub_mismatches_total", None),
        1.0
    );
    assert!(metric(&text, "modelcache_scrubbed_bytes_total", None) > 0.0);
    agent.until_logged("changed since publish (model-00005-of-00014.safetensors)");
}

/// The agent runs as root: a request naming `file:///etc` or the node's service-account tokens
/// would copy them into a directory every vLLM pod mounts. Requests may name sources only under
/// `api.allowed_sources` (none by default) and never repoint a configured model; refusals are
/// 403 with the envelope, naming the setting, and write nothing.
#[test]
fn requests_cannot_copy_host_paths_or_repoint_a_configured_model() {
    let configured = small_model(20_000, 1);
    let allowed = tempfile::tempdir().unwrap();
    let other = small_model(20_000, 2);
    let allowed_model = allowed.path().join("llama");
    std::fs::rename(other.path(), &allowed_model).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let extra = format!(
        "[api]\nallowed_sources = [\"file://{}/\"]\n",
        allowed.path().display()
    );
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry(
                "m",
                &format!("file://{}", configured.path().display()),
                true,
            ),
            &extra,
        ),
        "http://127.0.0.1:9",
        &[("MODELCACHE_TOKEN", "t0ken")],
    );
    agent.until_ready("m");
    for source in [
        "file:///etc".to_string(),
        "file:///var/run/secrets".to_string(),
        format!("file://{}/../../etc", allowed.path().display()),
        format!("file://{}-private/x", allowed.path().display()),
    ] {
        let (status, body) = http(
            &agent.admin,
            "POST",
            "/v1/models/x/prefetch",
            &[],
            &body_with_source(&source),
        );
        assert_eq!(status, 403, "{source}: {body}");
        assert!(body.contains("\"code\":\"forbidden\""), "{body}");
        // The same on the read listener with the token: a token is not a licence to read files.
        let (status, body) = http(
            &agent.read,
            "POST",
            "/v1/models/x/prefetch",
            &[("Authorization", "Bearer t0ken")],
            &body_with_source(&source),
        );
        assert_eq!(status, 403, "{source} on the read listener: {body}");
    }
    let (_, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/x/prefetch",
        &[],
        &body_with_source("file:///etc"),
    );
    assert!(
        body.contains("api.allowed_sources"),
        "names the setting: {body}"
    );
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/x/prefetch",
        &[],
        &format!(
            "{{\"source\": \"file://{}\", \"account\": \"elsewhere\"}}",
            allowed_model.display()
        ),
    );
    assert_eq!(status, 403, "{body}");
    for path in ["models/x", "staging/x", "store/x"] {
        assert!(!cache.join(path).exists(), "{path} was written");
    }
    // A configured model cannot be repointed, but may be refreshed as configured.
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/m/prefetch",
        &[],
        &body_with_source(&format!("file://{}", allowed_model.display())),
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cannot repoint"), "{body}");
    let (status, body) = http(&agent.admin, "POST", "/v1/models/m/prefetch", &[], "");
    assert_eq!(status, 202, "{body}");
    // A source under the allowed prefix is fetched.
    let (status, body) = http(
        &agent.admin,
        "POST",
        "/v1/models/llama/prefetch",
        &[],
        &body_with_source(&format!("file://{}", allowed_model.display())),
    );
    assert_eq!(status, 202, "{body}");
    agent.until_ready("llama");
    assert_published_identical(&allowed_model, &cache.join("models/llama"));
}

/// A client that sends its request headers slowly (slow loris) is cut off after a few seconds,
/// and connections beyond `listen.max_connections` are closed at accept; others are served.
#[test]
fn slow_clients_and_connection_floods_are_cut_off() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        &config(&dir.path().join("cache"), "", ""),
        "http://127.0.0.1:9",
        &[("MODELCACHE_LISTEN_MAX_CONNECTIONS", "4")],
    );
    let closed_within = |stream: &mut TcpStream, limit: Duration| {
        stream.set_read_timeout(Some(limit)).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return started.elapsed(),
                // A 408 may come first; the connection closes after it.
                Ok(_) => {}
            }
        }
    };

    let mut slow = TcpStream::connect(&agent.read).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")
        .unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(30));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "cut off after the header timeout, not served: {took:?}"
    );

    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&agent.read).unwrap())
        .collect();
    let mut fifth = TcpStream::connect(&agent.read).unwrap();
    fifth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    fifth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = fifth.read_to_end(&mut answer);
    assert!(
        answer.is_empty(),
        "the fifth connection is closed unanswered"
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = TcpStream::connect(&agent.read).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        if answer.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "served again once the idle ones left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The admin API is a Unix socket in an owner-only directory: root (and `modelcache status`)
/// reach it, another user cannot, and it is gone when the agent stops. The read listener's
/// token file is re-read when Kubernetes rotates the secret (a symlink swap), and a token file
/// that disappears refuses state-changing requests instead of allowing them.
#[test]
fn the_admin_api_is_a_root_only_socket_and_a_rotated_token_takes_effect() {
    use std::os::unix::fs::PermissionsExt as _;
    if !is_root() {
        skip_or_fail("the admin socket test needs root (to try the socket as another user)");
        return;
    }
    let model = small_model(20_000, 3);
    let dir = tempfile::tempdir().unwrap();
    // The layout of a mounted Secret: token -> ..data/token, ..data -> ..TIMESTAMP/.
    let secret = dir.path().join("secret");
    let rotate = |n: u32, token: &str| {
        let version = secret.join(format!("..v{n}"));
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("token"), format!("{token}\n")).unwrap();
        let tmp = secret.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..v{n}"), &tmp).unwrap();
        std::fs::rename(&tmp, secret.join("..data")).unwrap();
    };
    rotate(1, "first-token");
    std::os::unix::fs::symlink("..data/token", secret.join("token")).unwrap();
    let extra = format!(
        "[api]\nallowed_sources = [\"file://{}\"]\n",
        model.path().display()
    );
    let mut config = config(&dir.path().join("cache"), "", &extra);
    config = config.replace(
        "[listen]\n",
        &format!(
            "[listen]\ntoken_file = \"{}\"\n",
            secret.join("token").display()
        ),
    );
    let mut agent = Agent::start(dir.path(), &config, "http://127.0.0.1:9", &[]);

    let socket = PathBuf::from(&agent.admin);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&socket), 0o600);
    let (status, _) = http(&agent.admin, "GET", "/v1/models", &[], "");
    assert_eq!(status, 200, "root reaches the socket");
    // Another user is refused by the kernel before any byte is read. (A copy of the binary in
    // a directory that user may enter: the build tree may be private.)
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = public.path().join("modelcache");
    std::fs::copy(bin(), &copy).unwrap();
    let mut as_nobody = std::process::Command::new("setpriv");
    as_nobody
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&copy)
        .args(["status", "--api", &agent.admin]);
    let out = run(&mut as_nobody, Duration::from_secs(30));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("Permission denied") && stderr(&out).contains("root-only"),
        "{}",
        stderr(&out)
    );

    let body = body_with_source(&format!("file://{}", model.path().display()));
    let post = |token: &str| {
        let auth = format!("Bearer {token}");
        http(
            &agent.read,
            "POST",
            "/v1/models/m/prefetch",
            &[("Authorization", auth.as_str())],
            &body,
        )
    };
    assert_eq!(post("first-token").0, 202);
    rotate(2, "second-token");
    let (status, text) = post("first-token");
    assert_eq!(status, 401, "the old token stops working: {text}");
    let (status, text) = post("second-token");
    assert_eq!(status, 202, "the new one works at once: {text}");
    std::fs::remove_file(secret.join("token")).unwrap();
    let (status, text) = post("second-token");
    assert_eq!(status, 503, "a missing token file refuses: {text}");
    assert!(text.contains("listen.token_file"), "{text}");
    assert!(
        !agent.log().contains("second-token"),
        "the token is never logged"
    );

    let (_, status) = agent.terminate();
    assert!(status.success());
    assert!(!socket.exists(), "the socket is removed at exit");
}

/// A model someone holds when a scrub pass reaches it (a lease pass removing an old revision,
/// a recheck, a hand-run prefetch) is scrubbed once it is free, in that pass, not an interval
/// later: here the model's lock is held for a few seconds from outside while the agent starts
/// with an hour between passes.
#[test]
fn a_model_held_when_the_scrub_reaches_it_is_scrubbed_once_free() {
    let source = small_model(60_000, 17);
    upload_manifest(source.path());
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let url = format!("file://{}", source.path().display());
    drop({
        let first = Agent::start(
            dir.path(),
            &config(&cache, &model_entry("m", &url, true), ""),
            "http://127.0.0.1:9",
            &[],
        );
        first.until_ready("m");
        first
    });
    // `flock` holds the model's lock until its `sleep` ends.
    let lock = cache.join("locks/m");
    let mut holder = std::process::Command::new("flock")
        .arg("-x")
        .arg(&lock)
        .args(["sleep", "4"])
        .spawn()
        .expect("run flock (util-linux)");
    let started = Instant::now();
    while !std::process::Command::new("flock")
        .args(["-n", "-x"])
        .arg(&lock)
        .arg("true")
        .status()
        .is_ok_and(|s| !s.success())
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "flock never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = Agent::start(
        dir.path(),
        &config(
            &cache,
            &model_entry("m", &url, true),
            "scrub_rate = \"1GiB\"\nscrub_interval = \"1h\"\n",
        ),
        "http://127.0.0.1:9",
        &[],
    );
    agent.until_logged("every file intact");
    let _ = holder.wait();
}
