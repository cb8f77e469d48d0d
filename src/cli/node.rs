//! The commands that run or talk to the node agent: `agent`, `wait` and `status`.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use super::{
    AgentArgs, CommandError, DiskCommand, StatusArgs, WaitArgs, exit, invalid, progress_text,
};
use crate::config::agent::{AgentConfig, DEFAULT_CONFIG};
use crate::config::{Environment, human_bytes};
use crate::fetch::progress::ProgressSnapshot;
use crate::store::{Layout, ModelName};

/// `modelcache agent`.
pub async fn run_agent(args: AgentArgs, env: &Environment) -> Result<ExitCode, CommandError> {
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(ExitCode::SUCCESS);
    }
    // The file is read once here, and its hash kept: the agent applies later changes of it.
    let (config, source) = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| {
                invalid(crate::config::agent::ConfigError::Read {
                    path: path.clone(),
                    source,
                })
            })?;
            let config = AgentConfig::from_toml(&text, &path.display().to_string(), env, &args.set)
                .map_err(invalid)?;
            let source = crate::agent::reload::ConfigSource {
                path: path.clone(),
                sets: args.set.clone(),
                loaded: blake3::hash(text.as_bytes()),
            };
            (config, Some(source))
        }
        None => (
            AgentConfig::load(None, env, &args.set).map_err(invalid)?,
            None,
        ),
    };
    if args.check {
        let models: Vec<String> = config
            .models
            .iter()
            .map(|m| format!("{}{}", m.name, if m.pin { " (pinned)" } else { "" }))
            .collect();
        println!(
            "configuration OK: cache {}, read {}, admin {}, token {}, models: {}",
            config.cache_root.display(),
            config.read_addr,
            config.admin_socket.display(),
            if config.token.is_some() {
                "set"
            } else {
                "unset"
            },
            if models.is_empty() {
                "none".to_string()
            } else {
                models.join(", ")
            }
        );
        println!(
            "leases: {}",
            crate::agent::pods::Pods::new(
                &config.leases.cgroup_root,
                &config.proc_root,
                &config.leases.pods_dir
            )
            .describe()
        );
        if let Some(d) = &config.fetch.dragonfly {
            match &d.exchange {
                Some(x) => println!(
                    "dragonfly: dfdaemon at {}, writing into {} (the agent's {}); storage shown at {}",
                    d.socket.display(),
                    x.dfdaemon_dir.display(),
                    x.local_dir.display(),
                    config
                        .dragonfly_storage
                        .as_deref()
                        .unwrap_or(std::path::Path::new("?"))
                        .display()
                ),
                None => println!(
                    "dragonfly: dfdaemon at {}, writing into each model's staging directory",
                    d.socket.display()
                ),
            }
            // With this process's credentials: run it in the agent's pod for the node's answer.
            if let Some(found) = crate::agent::signing::check(&config, env).await {
                println!("dragonfly (with this process's credentials): {found}");
            }
        } else {
            println!(
                "dragonfly: off (no [fetch.dragonfly] in this configuration or MODELCACHE_FETCH_DRAGONFLY_* in the environment)"
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    crate::agent::run(config, env.clone(), source)
        .await
        .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?;
    Ok(ExitCode::SUCCESS)
}

/// What one look at readiness found.
enum Look {
    /// Ready: the revision directory to read, and a line saying so.
    Ready {
        revision: String,
        line: String,
        agent: AgentTimes,
    },
    Waiting(String),
    Failed(String),
    /// The agent refused the request itself (a pod not on this node, a bad name): waiting
    /// would not change it.
    Refused(String),
}

/// What the agent said about time when it answered ready (nothing when read from the cache).
#[derive(Debug, Default)]
struct AgentTimes {
    /// When the kubelet started this pod, as the agent saw it.
    pod_started: Option<SystemTime>,
    /// The model's steps on the agent.
    timeline: Option<crate::agent::models::timeline::Timeline>,
}

/// `wait`'s own steps, for the line it ends with.
struct WaitSteps {
    began: Instant,
    began_at: SystemTime,
    ready: Option<Instant>,
    linked: Option<Instant>,
    warmed: Option<Instant>,
}

impl WaitSteps {
    fn now() -> Self {
        Self {
            began: Instant::now(),
            began_at: SystemTime::now(),
            ready: None,
            linked: None,
            warmed: None,
        }
    }

    /// One line an operator can paste: how long from the pod's start (or this command's) to
    /// serving, and where it went.
    fn line(&self, name: &ModelName, agent: &AgentTimes) -> String {
        let span = |from: Instant, to: Option<Instant>| {
            to.map(|t| t.saturating_duration_since(from).as_secs_f64())
        };
        let ready = span(self.began, self.ready).unwrap_or(0.0);
        let mut parts = Vec::new();
        let before = agent
            .pod_started
            .and_then(|p| self.began_at.duration_since(p).ok())
            .map(|d| d.as_secs_f64());
        if let Some(before) = before {
            parts.push(format!(
                "{before:.1} s before this wait (image pulls, earlier init containers)"
            ));
        }
        parts.push(format!("{ready:.1} s waiting for the agent"));
        let mut last = self.ready.unwrap_or(self.began);
        if let Some(t) = span(last, self.linked) {
            parts.push(format!("link {t:.1} s"));
            last = self.linked.unwrap_or(last);
        }
        if let Some(t) = span(last, self.warmed) {
            parts.push(format!("warm {t:.1} s"));
            last = self.warmed.unwrap_or(last);
        }
        let total = last.saturating_duration_since(self.began).as_secs_f64();
        let head = match before {
            Some(before) => format!(
                "{name}: serving {:.1} s after the pod started",
                before + total
            ),
            None => format!("{name}: serving {total:.1} s after this wait began"),
        };
        let mut line = format!("{head}: {}", parts.join(", "));
        if let Some(timeline) = &agent.timeline {
            line.push_str(&format!(
                "; the agent (seconds after its start at {}): {}",
                timeline.agent_started_at,
                timeline.line()
            ));
        }
        line
    }
}

/// `modelcache wait`: until the model is ready, then the revision it resolved (linked at
/// `--link`, leased with `--lease`, warmed with `--warm`).
pub async fn run_wait(args: WaitArgs) -> Result<ExitCode, CommandError> {
    let name = ModelName::new(&args.model).map_err(invalid)?;
    if let Some(pod) = &args.lease {
        crate::store::leases::PodUid::new(pod).map_err(invalid)?;
    }
    let timeout = args.timeout.unwrap_or(Duration::from_secs(1800));
    let interval = args.interval.unwrap_or(Duration::from_secs(2));
    let api = args.api.as_deref().map(AgentApi::new).transpose()?;
    let view = args
        .cache_root
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(invalid)?
        .map(Layout::new);
    // The readers' socket in the cache, where the agent tells this pod from its process: a
    // lease there is proved, not claimed. The read listener (--api) is the fallback.
    let socket = view
        .as_ref()
        .map(|v| v.root().join(crate::agent::READERS_SOCKET))
        .filter(|p| p.exists())
        .map(|p| AgentApi::new(&format!("unix:{}", p.display())))
        .transpose()?;
    let apis: Vec<&AgentApi> = socket.iter().chain(api.iter()).collect();
    if args.lease.is_some() && apis.is_empty() {
        return Err(invalid(
            "--lease needs the agent: give --api, or a --cache-root where the agent's readers' socket (readers.sock) is",
        ));
    }
    let mut steps = WaitSteps::now();
    let started = steps.began;
    let mut last_line = String::new();
    let mut last_sample: Option<(Instant, u64)> = None;
    loop {
        let look = match (apis.first(), &view) {
            (Some(first), _) => {
                let mut look = ask_agent(first, &name, args.lease.as_deref()).await;
                for next in apis.iter().skip(1) {
                    if !matches!(&look, Look::Waiting(line) if line.contains("waiting for the agent"))
                    {
                        break;
                    }
                    look = ask_agent(next, &name, args.lease.as_deref()).await;
                }
                match (look, &view) {
                    // The agent's answer must be visible here before it is served.
                    (
                        Look::Ready {
                            revision,
                            line,
                            agent,
                        },
                        Some(view),
                    ) => visible_here(view, &name, revision, line, agent),
                    // Progress from the cache while the agent cannot be reached.
                    (Look::Waiting(line), Some(view)) if line.contains("waiting for the agent") => {
                        match progress_from_cache(view, &name, &mut last_sample) {
                            Some(progress) => Look::Waiting(format!("{progress} ({line})")),
                            None => Look::Waiting(line),
                        }
                    }
                    (look, _) => look,
                }
            }
            (None, Some(view)) => look_at_cache(view, &name, &mut last_sample),
            (None, None) => return Err(invalid("give --cache-root or --api")),
        };
        match look {
            Look::Ready {
                revision,
                line,
                agent,
            } => {
                steps.ready = Some(Instant::now());
                let Some(view) = &view else {
                    println!("{line}");
                    println!("{}", steps.line(&name, &agent));
                    return Ok(ExitCode::SUCCESS);
                };
                let dir = view.revision_dir(&name, &revision);
                let served = match &args.link {
                    Some(link) => {
                        point_link(link, &dir)?;
                        steps.linked = Some(Instant::now());
                        link.clone()
                    }
                    None => dir.clone(),
                };
                println!("{line} -> {}", served.display());
                if args.warm {
                    warm(&dir, &name).await?;
                    steps.warmed = Some(Instant::now());
                }
                println!("{}", steps.line(&name, &agent));
                return Ok(ExitCode::SUCCESS);
            }
            Look::Failed(reason) => {
                return Err(CommandError::new(
                    exit::MODEL_FAILED,
                    format!("{name} failed: {reason}"),
                ));
            }
            Look::Refused(reason) => {
                return Err(CommandError::new(exit::INVALID_INPUT, reason));
            }
            Look::Waiting(line) => {
                if line != last_line {
                    println!("{line}");
                    last_line = line;
                }
            }
        }
        if started.elapsed() >= timeout {
            return Err(CommandError::new(
                exit::TIMEOUT,
                format!(
                    "{name} was not ready within {} (last: {last_line}) (hint: raise --timeout; `modelcache status` shows what the agent is doing)",
                    humantime::format_duration(timeout)
                ),
            ));
        }
        tokio::time::sleep(interval.min(timeout.saturating_sub(started.elapsed()))).await;
    }
}

/// Makes `link` point at `dir` (absolute, as this container sees it), replacing whatever it
/// pointed at with one rename: the server container, sharing `link`'s volume, then reads that
/// revision directory and nothing else.
fn point_link(link: &std::path::Path, dir: &std::path::Path) -> Result<(), CommandError> {
    let failed = |what: &str, e: std::io::Error| {
        CommandError::new(
            exit::UNEXPECTED,
            format!(
                "failed to {what} {} (hint: --link names a path in a writable volume shared with the server container, such as an emptyDir): {e}",
                link.display()
            ),
        )
    };
    let parent = link
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let file_name = link
        .file_name()
        .ok_or_else(|| invalid(format!("--link {}: expected a file path", link.display())))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(dir, &tmp).map_err(|e| failed("create a link beside", e))?;
    std::fs::rename(&tmp, link).map_err(|e| failed("replace", e))
}

/// `wait --warm`: reads the resolved revision once, in this process's memory cgroup.
async fn warm(dir: &std::path::Path, name: &ModelName) -> Result<(), CommandError> {
    let started = Instant::now();
    let reading = dir.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || crate::store::read_into_page_cache(&reading))
        .await
        .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?
        .map_err(|e| {
            CommandError::new(
                exit::UNEXPECTED,
                format!("failed to read {} into the page cache: {e}", dir.display()),
            )
        })?;
    let seconds = started.elapsed().as_secs_f64();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = bytes as f64 / seconds.max(0.001) / 1e9;
    println!(
        "{name}: read {} into the page cache in {seconds:.1} s ({rate:.2} GB/s)",
        human_bytes(bytes)
    );
    Ok(())
}

/// Ready when the link's revision has a ready marker whose files are intact.
fn look_at_cache(layout: &Layout, name: &ModelName, last: &mut Option<(Instant, u64)>) -> Look {
    if let Some((revision, marker)) = layout.linked_intact(name) {
        return Look::Ready {
            line: format!(
                "{name} is ready: revision {revision}, {} in {} files, verified {}, {}",
                human_bytes(marker.bytes),
                marker.files.len(),
                marker.verification,
                marker.signature.as_ref().map_or_else(
                    || "unsigned".to_string(),
                    |s| format!("signed by {}", s.signer)
                ),
            ),
            revision,
            agent: AgentTimes::default(),
        };
    }
    Look::Waiting(
        progress_from_cache(layout, name, last).unwrap_or_else(|| {
            format!("{name}: not published yet; waiting for the agent to fetch it")
        }),
    )
}

/// The agent answered `revision`: ready once its directory is intact in this container's view
/// of the cache (a mount still propagating, or a copy being repaired, is waited for).
fn visible_here(
    view: &Layout,
    name: &ModelName,
    revision: String,
    line: String,
    agent: AgentTimes,
) -> Look {
    let dir = view.revision_dir(name, &revision);
    match crate::store::ReadyMarker::read(&dir) {
        Ok(marker) if marker.files_present(&dir) => Look::Ready {
            revision,
            line,
            agent,
        },
        _ => Look::Waiting(format!(
            "{name}: the agent says revision {revision} is ready, but {} is not (yet) there intact; waiting",
            dir.display()
        )),
    }
}

/// The progress record's line, if there is one.
fn progress_from_cache(
    layout: &Layout,
    name: &ModelName,
    last: &mut Option<(Instant, u64)>,
) -> Option<String> {
    let bytes = std::fs::read(layout.progress_path(name)).ok()?;
    let p = serde_json::from_slice::<ProgressSnapshot>(&bytes).ok()?;
    let now = Instant::now();
    let rate = match *last {
        Some((t, bytes)) if now > t && p.fetched >= bytes => {
            #[expect(clippy::cast_precision_loss, reason = "display")]
            let r = (p.fetched - bytes) as f64 / now.duration_since(t).as_secs_f64();
            r
        }
        _ => 0.0,
    };
    *last = Some((now, p.fetched));
    Some(progress_text(
        name.as_str(),
        &p.phase,
        (p.fetched + p.reused).min(p.total),
        p.total,
        rate,
    ))
}

/// The agent's API as a client reaches it: an `http://` URL or the admin socket's path.
#[derive(Debug)]
pub struct AgentApi {
    client: reqwest::Client,
    base: String,
    /// As the user gave it, for messages.
    shown: String,
}

impl AgentApi {
    /// A client for `api`: a path (or `unix:PATH`) is the admin socket, anything else a URL.
    pub fn new(api: &str) -> Result<Self, CommandError> {
        let builder = reqwest::Client::builder().timeout(Duration::from_secs(10));
        let socket = api.strip_prefix("unix:").unwrap_or(api);
        let (builder, base) = if socket.starts_with('/') {
            // The host part of the URL is ignored on a socket; it only fills the Host header.
            (builder.unix_socket(socket), "http://localhost".to_string())
        } else if api.starts_with("http://") || api.starts_with("https://") {
            (builder, api.trim_end_matches('/').to_string())
        } else {
            return Err(invalid(format!(
                "--api {api}: expected the admin socket's path (e.g. {}) or a URL such as http://NODE_IP:8080",
                crate::config::agent::DEFAULT_ADMIN_SOCKET
            )));
        };
        Ok(Self {
            client: builder
                .build()
                .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?,
            base,
            shown: api.to_string(),
        })
    }

    /// `GET path` (which starts with `/`).
    async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client.get(format!("{}{path}", self.base)).send().await
    }

    /// `POST path` with a JSON body (or none).
    async fn post(&self, path: &str, body: String) -> reqwest::Result<reqwest::Response> {
        let mut request = self.client.post(format!("{}{path}", self.base));
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request.send().await
    }
}

impl std::fmt::Display for AgentApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Asks the agent for the model as a reader, naming the pod for a lease.
async fn ask_agent(api: &AgentApi, name: &ModelName, pod: Option<&str>) -> Look {
    let body = pod.map_or_else(String::new, |pod| {
        serde_json::json!({ "pod": pod }).to_string()
    });
    let response = match api.post(&format!("/v1/models/{name}/readers"), body).await {
        Ok(r) => r,
        Err(e) => {
            return Look::Waiting(format!(
                "{name}: waiting for the agent at {api}: {}",
                crate::fetch::error_chain(&e)
            ));
        }
    };
    let status = response.status();
    let body: serde_json::Value = match response.json().await {
        Ok(v) => v,
        Err(e) => return Look::Waiting(format!("{name}: unreadable answer from {api}: {e}")),
    };
    let message = || {
        body["error"]["message"]
            .as_str()
            .unwrap_or("no message")
            .to_string()
    };
    match status.as_u16() {
        200 => Look::Ready {
            revision: body["revision"].as_str().unwrap_or_default().to_string(),
            line: format!(
                "{name} is ready: revision {}, {}, verified {}, {}{}",
                body["revision"].as_str().unwrap_or("?"),
                human_bytes(body["status"]["bytes_total"].as_u64().unwrap_or(0)),
                body["status"]["verification"].as_str().unwrap_or("?"),
                signed_by(&body["status"]["signature"]),
                match (body["leased"] == true, body["proved"] == true) {
                    (true, true) => ", leased for this pod (identified by the agent)",
                    (true, false) => ", leased for this pod",
                    _ => "",
                }
            ),
            agent: AgentTimes {
                pod_started: body["pod_started_at"]
                    .as_str()
                    .and_then(|t| humantime::parse_rfc3339_weak(t).ok()),
                timeline: serde_json::from_value(body["status"]["timeline"].clone()).ok(),
            },
        },
        202 => {
            let s = &body["status"];
            match s["state"].as_str().unwrap_or("unknown") {
                "failed" => Look::Failed(
                    s["last_error"]
                        .as_str()
                        .unwrap_or("unknown error")
                        .to_string(),
                ),
                phase => Look::Waiting(progress_text(
                    name.as_str(),
                    phase,
                    s["bytes_done"].as_u64().unwrap_or(0),
                    s["bytes_total"].as_u64().unwrap_or(0),
                    s["rate_bytes_per_second"].as_f64().unwrap_or(0.0),
                )),
            }
        }
        404 => Look::Waiting(format!(
            "{name}: the agent does not know this model: it is not in its configuration (models[]) and no request named its source"
        )),
        503 => Look::Waiting(format!(
            "{name}: the agent cannot answer yet: {}",
            message()
        )),
        _ => Look::Refused(format!("the agent at {api} refused: {}", message())),
    }
}

/// `modelcache status`.
pub async fn run_status(args: StatusArgs, env: &Environment) -> Result<ExitCode, CommandError> {
    let address = match (&args.api, &args.config) {
        (Some(api), _) => api.clone(),
        (None, Some(config)) => AgentConfig::load(Some(config), env, &[])
            .map_err(invalid)?
            .admin_socket
            .display()
            .to_string(),
        (None, None) => crate::config::agent::DEFAULT_ADMIN_SOCKET.to_string(),
    };
    let api = AgentApi::new(&address)?;
    let unavailable = |e: &reqwest::Error| {
        CommandError::new(
            exit::SOURCE_UNAVAILABLE,
            format!(
                "cannot reach the agent at {}: {} (hint: the admin socket is root-only, so run this as root on the node or with `kubectl exec ds/modelcache -- modelcache status`; --api or MODELCACHE_API names another socket or the read listener's URL)",
                address,
                crate::fetch::error_chain(e)
            ),
        )
    };
    let response = api.get("/v1/models").await.map_err(|e| unavailable(&e))?;
    let models: Vec<serde_json::Value> = response.json().await.map_err(|e| unavailable(&e))?;
    // An agent from before /v1/config answers 404 there: no configuration line then.
    let config: Option<serde_json::Value> = match api.get("/v1/config").await {
        Ok(r) if r.status().is_success() => r.json().await.ok(),
        _ => None,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&models).unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<12} {:>21} {:>11} {:>6} {:<16} {:<10} ERROR",
        "MODEL", "STATE", "PROGRESS", "RATE", "ETA", "REVISION", "VERIFIED"
    );
    for m in &models {
        let done = m["bytes_done"].as_u64().unwrap_or(0);
        let total = m["bytes_total"].as_u64().unwrap_or(0);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "display"
        )]
        let rate = m["rate_bytes_per_second"].as_f64().unwrap_or(0.0) as u64;
        println!(
            "{:<24} {:<12} {:>21} {:>11} {:>6} {:<16} {:<10} {}",
            m["name"].as_str().unwrap_or("?"),
            m["state"].as_str().unwrap_or("?"),
            format!("{} / {}", human_bytes(done), human_bytes(total)),
            format!("{}/s", human_bytes(rate)),
            m["eta_seconds"]
                .as_f64()
                .map_or("-".to_string(), |e| format!("{e:.0}s")),
            m["revision"].as_str().unwrap_or("-"),
            m["verification"].as_str().unwrap_or("-"),
            m["last_error"].as_str().unwrap_or("")
        );
    }
    for m in models_via_dragonfly(&models) {
        println!("{m}");
    }
    for m in &models {
        if let Some(line) = signature_text(m) {
            println!("{line}");
        }
    }
    for m in &models {
        if let Some(line) = timeline_text(m) {
            println!("{line}");
        }
    }
    if let Some(config) = config {
        print!("{}", config_text(&config));
    }
    Ok(ExitCode::SUCCESS)
}

/// Who signed a model's published revision, for people; `None` before one is published.
fn signature_text(m: &serde_json::Value) -> Option<String> {
    let name = m["name"].as_str()?;
    m["revision"].as_str()?;
    let s = &m["signature"];
    if s.is_null() {
        return Some(format!("{name}: unsigned"));
    }
    Some(format!(
        "{name}: {}; {} digests of {} in {}",
        signed_by(s),
        s["hash"].as_str().unwrap_or("?"),
        s["method"].as_str().unwrap_or("?"),
        s["file"].as_str().unwrap_or("?")
    ))
}

/// `signed by …` for a revision's signature record as the agent shows it, or `unsigned`.
fn signed_by(s: &serde_json::Value) -> String {
    if s.is_null() {
        return "unsigned".into();
    }
    let signer = &s["signer"];
    let who = match signer["kind"].as_str() {
        Some("key") => format!(
            "key {} ({})",
            signer["name"].as_str().unwrap_or("?"),
            signer["fingerprint"].as_str().unwrap_or("?")
        ),
        Some("certificate") => format!(
            "certificate {} ({}) under {}",
            signer["subject"].as_str().unwrap_or("?"),
            signer["fingerprint"].as_str().unwrap_or("?"),
            signer["root"].as_str().unwrap_or("?")
        ),
        _ => "an unknown signer".to_string(),
    };
    format!("signed by {who}")
}

/// A model's timeline on the node, for people; `None` from an agent that does not keep one.
fn timeline_text(model: &serde_json::Value) -> Option<String> {
    let timeline: crate::agent::models::timeline::Timeline =
        serde_json::from_value(model["timeline"].clone()).ok()?;
    Some(format!(
        "{}: seconds after the agent started at {}: {}",
        model["name"].as_str().unwrap_or("?"),
        timeline.agent_started_at,
        timeline.line()
    ))
}

/// One line per model whose last run went through Dragonfly: bytes by origin and file outcomes.
fn models_via_dragonfly(models: &[serde_json::Value]) -> Vec<String> {
    models
        .iter()
        .filter_map(|m| {
            let o = &m["bytes_by_origin"];
            let d = &m["dragonfly"];
            let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
            let asked = n(d, "files") + n(d, "fallbacks");
            (asked > 0).then(|| {
                format!(
                    "{}: {} from Dragonfly peers, {} through Dragonfly from the source, {} direct; {} files verified from Dragonfly, {} fetched directly instead ({} failed verification)",
                    m["name"].as_str().unwrap_or("?"),
                    human_bytes(n(o, "peer")),
                    human_bytes(n(o, "back_to_source")),
                    human_bytes(n(o, "direct")),
                    n(d, "files"),
                    n(d, "fallbacks"),
                    n(d, "rejected"),
                )
            })
        })
        .collect()
}

/// What `GET /v1/config` says, for people: nothing when all is applied.
fn config_text(config: &serde_json::Value) -> String {
    let file = config["file"].as_str().unwrap_or("the configuration file");
    let mut out = String::new();
    if let Some(why) = config["refused"].as_str() {
        out.push_str(&format!(
            "configuration: the current {file} is refused, the running configuration is kept: {why}\n"
        ));
    }
    let restart: Vec<&str> = config["restart_needed"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    if !restart.is_empty() {
        out.push_str(&format!(
            "configuration: {file} changes {}, which take effect when the agent restarts (kubectl -n modelcache rollout restart ds/modelcache)\n",
            restart.join(", ")
        ));
    }
    out
}

/// `modelcache disk plan` and `modelcache disk apply`.
pub async fn run_disk(command: DiskCommand, env: &Environment) -> Result<ExitCode, CommandError> {
    let (args, apply) = match command {
        DiskCommand::Plan(a) => (a, false),
        DiskCommand::Apply(a) => (a, true),
    };
    let config = AgentConfig::load(args.config.as_deref(), env, &args.set).map_err(invalid)?;
    if apply && !config.disk.enabled {
        println!(
            "disk setup is disabled (disk.enabled = false): nothing was done to any device; the cache root {} is used as it is (hint: set disk.enabled = true in the configuration, or pass --set disk.enabled=true)",
            config.disk.target.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let disk = config.disk.clone();
    let arrays = crate::disk::apply::Mdadm {
        dev: disk.host.dev.clone(),
    };
    let result = tokio::task::spawn_blocking(move || {
        if apply {
            crate::disk::apply(&disk, &arrays, &|| false)
        } else {
            crate::disk::plan(&disk, false).map(|plan| crate::disk::Report {
                plan,
                mounted: None,
                view: None,
            })
        }
    })
    .await
    .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?
    .map_err(|e| CommandError::new(exit::DISK_SETUP_FAILED, e))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).unwrap_or_default()
        );
    } else {
        print!("{}", disk_report_text(&result, &config.disk.target));
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan as a person reads it: each device and its verdict, the notes, the steps.
pub fn disk_report_text(report: &crate::disk::Report, target: &std::path::Path) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:<30} {:>10}  VERDICT",
        "DEVICE", "MODEL", "SIZE"
    );
    for d in &report.plan.devices {
        let verdict = d
            .skipped
            .as_ref()
            .map(|s| format!("skipped: {s}"))
            .or_else(|| d.content.clone())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<14} {:<30} {:>10}  {verdict}",
            d.path.display(),
            d.model.as_deref().unwrap_or("-"),
            human_bytes(d.size_bytes)
        );
    }
    for n in &report.plan.notes {
        let _ = writeln!(out, "note: {n}");
    }
    let _ = writeln!(out, "steps for {}:", target.display());
    for (i, s) in report.plan.steps.iter().enumerate() {
        let _ = writeln!(out, "  {}. {s}", i + 1);
    }
    if let Some(m) = &report.mounted {
        let _ = writeln!(out, "done: {} is mounted at {}", m, target.display());
    }
    if let Some(view) = &report.view {
        let _ = writeln!(
            out,
            "consumers see {} read-only{}; the agent writes at {}",
            target.display(),
            if view.attached {
                ""
            } else {
                " (as an earlier run left it)"
            },
            view.writable.display()
        );
    }
    out
}
