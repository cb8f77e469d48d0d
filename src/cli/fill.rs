//! The commands that fill and check a cache from the command line: `prefetch`, `manifest`,
//! `verify` and `demo`, with their progress display and one-line summary.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use super::{
    CommandError, DemoArgs, ManifestArgs, PrefetchArgs, VerifyArgs, cancel_on_signal, exit, invalid,
};
use crate::config::{DEFAULT_CHUNK_SIZE, Environment, FetchOptions, Selection, human_bytes};
use crate::fetch::progress::{Phase, Progress};
use crate::fetch::signed::PublishedSignature;
use crate::fetch::{PrefetchError, PrefetchRequest, Summary, compute_manifest, prefetch};
use crate::source::{self, MANIFEST_NAME, SourceOptions};
use crate::store::{Layout, ModelName};
use crate::verify::cached::verify_cached;

/// Process-wide resource use, for summaries and benchmarks.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResourceUse {
    /// User + system CPU seconds of this process.
    pub cpu_seconds: f64,
    /// Peak resident set size in bytes.
    pub peak_rss_bytes: u64,
}

fn resource_use() -> ResourceUse {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| {
                #[expect(clippy::cast_precision_loss, reason = "seconds for a report")]
                let s = t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
                s
            };
            ResourceUse {
                cpu_seconds: secs(u.user_time()) + secs(u.system_time()),
                // ru_maxrss (KiB on Linux) only where /proc is missing: it starts from the size
                // of the process that spawned this one, not from this program's own use.
                peak_rss_bytes: peak_rss_from_proc()
                    .unwrap_or_else(|| u64::try_from(u.max_rss()).unwrap_or(0) * 1024),
            }
        }
        Err(_) => ResourceUse {
            cpu_seconds: 0.0,
            peak_rss_bytes: peak_rss_from_proc().unwrap_or(0),
        },
    }
}

/// `VmHWM` of `/proc/self/status`: the peak resident size of this program's own memory.
fn peak_rss_from_proc() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:` line's value (in kB) as bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[derive(Serialize)]
struct JsonSummary<'a> {
    #[serde(flatten)]
    summary: &'a Summary,
    #[serde(flatten)]
    resources: ResourceUse,
}

/// `modelcache prefetch`.
pub async fn run_prefetch(args: PrefetchArgs, env: &Environment) -> Result<ExitCode, CommandError> {
    let model = ModelName::new(&args.model).map_err(invalid)?;
    let selection = args.selection.resolve().map_err(invalid)?;
    let mut options = args.fetch.resolve().map_err(invalid)?;
    options.hash = !args.no_hash;
    let source = args.source.open(env)?;
    let request = PrefetchRequest {
        parse_budget: crate::verify::structure::ParseBudget::default(),
        model: model.clone(),
        selection,
        options,
        require_manifest: args.require_manifest,
        signature: args.signing.resolve().map_err(invalid)?,
        owner: "modelcache prefetch".to_string(),
        cancel: cancel_on_signal(),
        make_room: None,
    };
    let layout = Layout::new(&args.cache_root);
    let progress = Arc::new(Progress::new());
    let reporter = spawn_reporter(model.to_string(), Arc::clone(&progress));
    let result = prefetch(source, &layout, &request, progress).await;
    reporter.stop().await;
    let summary = result?;
    if args.json {
        let line = serde_json::to_string(&JsonSummary {
            summary: &summary,
            resources: resource_use(),
        })
        .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?;
        println!("{line}");
    } else {
        println!("{}", summary_line(&summary));
    }
    Ok(ExitCode::SUCCESS)
}

/// The one-line summary of a prefetch.
pub fn summary_line(s: &Summary) -> String {
    let retries: u64 = s.retries.values().sum();
    let mut extra = String::new();
    if retries > 0 {
        extra.push_str(&format!(", {retries} ranges retried"));
    }
    if s.source_restarts > 0 {
        extra.push_str(&format!(
            ", {} restarts after source changes",
            s.source_restarts
        ));
    }
    if !s.refetched_files.is_empty() {
        extra.push_str(&format!(
            ", {} files re-fetched after a hash mismatch",
            s.refetched_files.len()
        ));
    }
    let o = &s.bytes_by_origin;
    if o.peer + o.back_to_source > 0 || s.dragonfly.fallbacks > 0 {
        extra.push_str(&format!(
            ", through Dragonfly {} files ({} from peers, {} from the source), {} direct",
            s.dragonfly.files,
            human_bytes(o.peer),
            human_bytes(o.back_to_source),
            human_bytes(o.direct)
        ));
        if s.dragonfly.rejected > 0 {
            extra.push_str(&format!(
                ", {} files from Dragonfly failed verification and were fetched directly",
                s.dragonfly.rejected
            ));
        }
    }
    if !s.warnings.is_empty() {
        extra.push_str(&format!(
            ", {} warnings (logged above and kept in ready.json)",
            s.warnings.len()
        ));
    }
    format!(
        "{}{} revision {}: {} files, {} ({} bytes) fetched, {} ({} bytes) reused, {:.1} s, {:.2} GB/s, verified {}{} -> {}",
        if s.already_published {
            "already published "
        } else {
            "published "
        },
        s.model,
        s.revision,
        s.files,
        human_bytes(s.bytes_fetched),
        s.bytes_fetched,
        human_bytes(s.bytes_reused),
        s.bytes_reused,
        s.seconds,
        s.gb_per_s,
        s.verification,
        extra,
        s.path.display()
    )
}

struct Reporter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Shows progress: a redrawn line on a terminal, a log line every five seconds otherwise.
fn spawn_reporter(model: String, progress: Arc<Progress>) -> Reporter {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let terminal = std::io::stderr().is_terminal();
    let task = tokio::spawn(async move {
        let period = if terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        let start = Instant::now();
        let mut drawn = false;
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                () = tokio::time::sleep(period) => {}
            }
            let line = progress_line(&model, &progress, start.elapsed());
            if terminal {
                eprint!("\r\x1b[2K{line}");
                drawn = true;
            } else if progress.phase() != Phase::Listing {
                info!(model.name = %model, "{line}");
            }
        }
        if drawn {
            eprint!("\r\x1b[2K");
        }
    });
    Reporter { stop, task }
}

fn progress_line(model: &str, p: &Progress, elapsed: Duration) -> String {
    let total = p.total();
    let fetched = p.fetched();
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let rate = fetched as f64 / elapsed.as_secs_f64().max(0.001);
    let line = progress_text(
        model,
        p.phase().as_str(),
        (fetched + p.reused()).min(total),
        total,
        rate,
    );
    let line = if p.phase() == Phase::Downloading && p.concurrency() > 0 {
        format!("{line}, {} ranges in flight", p.concurrency())
    } else {
        line
    };
    let origin = p.by_origin();
    if origin.peer + origin.back_to_source > 0 {
        format!(
            "{line}; via Dragonfly: {} from peers, {} from the source; {} direct",
            human_bytes(origin.peer),
            human_bytes(origin.back_to_source),
            human_bytes(origin.direct)
        )
    } else {
        line
    }
}

/// One progress line: phase, bytes, percent, rate and ETA.
pub(crate) fn progress_text(name: &str, phase: &str, done: u64, total: u64, rate: f64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let pct = if total > 0 {
        done as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    #[expect(clippy::cast_precision_loss, reason = "display")]
    let eta = if rate > 0.0 {
        format!("{:.0}s", total.saturating_sub(done) as f64 / rate)
    } else {
        "-".into()
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "display"
    )]
    let rate_bytes = rate as u64;
    format!(
        "{name}: {phase} {} / {} ({pct:.1}%) {}/s ETA {eta}",
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate_bytes)
    )
}

/// `modelcache verify`.
pub async fn run_verify(args: VerifyArgs, env: &Environment) -> Result<ExitCode, CommandError> {
    let from_config = |config: &std::path::Path| {
        crate::config::agent::AgentConfig::load(Some(config), env, &[])
            .map(|c| c.cache_root)
            .map_err(invalid)
    };
    let dir = match (&args.dir, &args.cache_root, &args.model, &args.config) {
        (Some(dir), _, _, _) => dir.clone(),
        (None, Some(root), Some(model), _) => {
            let name = ModelName::new(model).map_err(invalid)?;
            Layout::new(root).model_link(&name)
        }
        (None, None, Some(model), Some(config)) => {
            let name = ModelName::new(model).map_err(invalid)?;
            Layout::new(from_config(config)?).model_link(&name)
        }
        _ => {
            return Err(invalid(
                "give a model directory, or --model with --cache-root (or --config, MODELCACHE_CONFIG)",
            ));
        }
    };
    let mut trust = match &args.config {
        Some(config) => crate::config::agent::AgentConfig::load(Some(config), env, &[])
            .map(|c| (*c.trust).clone())
            .map_err(invalid)?,
        None => crate::verify::signature::Trust::default(),
    };
    let given = crate::verify::signature::Trust::load(&args.trusted)
        .map_err(|e| invalid(format!("--trusted: {e}")))?;
    trust.keys.extend(given.keys);
    trust.roots.extend(given.roots);
    if args.require_signature && trust.is_empty() {
        return Err(invalid(
            "--require-signature needs a trusted signer: pass --trusted PEM, or --config with signing.trusted",
        ));
    }
    let threads = std::thread::available_parallelism().map_or(2, usize::from);
    let started = Instant::now();
    let signature_dir = dir.clone();
    let report =
        tokio::task::spawn_blocking(move || verify_cached(&dir, DEFAULT_CHUNK_SIZE, threads))
            .await
            .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?
            .map_err(|e| {
                let code = match e {
                    crate::verify::VerifyError::Io { .. } => exit::CACHE_FAILED,
                    _ => exit::VERIFY_FAILED,
                };
                CommandError::new(code, e)
            })?;
    let signature_dir = std::fs::canonicalize(&signature_dir).unwrap_or(signature_dir);
    let signature = crate::fetch::signed::verify_published(&signature_dir, &trust)
        .await
        .map_err(|e| {
            let code = match e.kind() {
                crate::fetch::ErrorKind::Cache => exit::CACHE_FAILED,
                _ => exit::VERIFY_FAILED,
            };
            CommandError::new(code, e)
        })?;
    let signature_line = match &signature {
        PublishedSignature::Unsigned => "unsigned".to_string(),
        PublishedSignature::NotChecked { recorded } => format!(
            "signature kept, not checked (no trusted signer given; recorded signer: {})",
            recorded
                .as_ref()
                .map_or_else(|| "none".to_string(), |r| r.signer.to_string())
        ),
        PublishedSignature::Verified {
            signer,
            hash,
            files,
        } => format!("signature verified: signed by {signer}, {hash} of all {files} files match"),
    };
    if args.require_signature && !matches!(signature, PublishedSignature::Verified { .. }) {
        return Err(CommandError::new(
            exit::VERIFY_FAILED,
            format!(
                "{} is {signature_line}, and --require-signature was given",
                signature_dir.display()
            ),
        ));
    }
    let secs = started.elapsed().as_secs_f64();
    if args.json {
        #[derive(Serialize)]
        struct WithSignature<'a> {
            #[serde(flatten)]
            report: &'a crate::verify::cached::CachedReport,
            signature: &'a PublishedSignature,
        }
        let json = WithSignature {
            report: &report,
            signature: &signature,
        };
        println!("{}", serde_json::to_string(&json).unwrap_or_default());
    } else {
        #[expect(clippy::cast_precision_loss, reason = "display")]
        let rate = report.bytes as f64 / secs.max(0.001) / 1e9;
        println!(
            "verified {} revision {}: {} files, {} hashed in {secs:.1} s ({rate:.2} GB/s), verification {} -> {}",
            report.name,
            report.revision,
            report.files,
            human_bytes(report.bytes),
            report.verification,
            report.dir.display()
        );
        println!("{signature_line}");
        for warning in &report.warnings {
            println!("warning: {warning}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelcache manifest`.
pub async fn run_manifest(args: ManifestArgs, env: &Environment) -> Result<ExitCode, CommandError> {
    let selection = args.selection.resolve().map_err(invalid)?;
    let options = args.fetch.resolve().map_err(invalid)?;
    let source = args.source.open(env)?;
    let progress = Arc::new(Progress::new());
    let reporter = spawn_reporter("manifest".into(), Arc::clone(&progress));
    let result = compute_manifest(Arc::clone(&source), &selection, &options, progress).await;
    reporter.stop().await;
    let manifest = result?;
    let json = manifest.to_json();
    if args.upload {
        source
            .put_small(MANIFEST_NAME, bytes::Bytes::from(json))
            .await
            .map_err(|e| {
                CommandError::from(PrefetchError::Source {
                    url: source.describe(),
                    source: e,
                })
            })?;
        eprintln!("uploaded {}/{MANIFEST_NAME}", source.describe());
    } else if let Some(path) = args.output {
        std::fs::write(&path, json).map_err(|e| {
            CommandError::new(
                exit::CACHE_FAILED,
                PrefetchError::local("write", path.clone(), e),
            )
        })?;
        eprintln!("wrote {}", path.display());
    } else {
        print!("{json}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `modelcache demo`.
pub async fn run_demo(args: DemoArgs) -> Result<ExitCode, CommandError> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => own_demo_dir()?,
    };
    let shard_bytes = usize::try_from(args.shard_size.unwrap_or(20 << 20)).map_err(invalid)?;
    let shape = crate::demo::DemoShape {
        shard_bytes,
        ..crate::demo::DemoShape::default()
    };
    let source_dir = dir.join("source").join("gpt-oss-120b");
    let cache_root = dir.join("cache");
    let fail = |e: std::io::Error| CommandError::new(exit::CACHE_FAILED, e);
    let started = Instant::now();

    println!("modelcache demo: the node-boot flow on a generated GPT-OSS-shaped model");
    let stamp = source_dir.join(".demo-shape");
    let stamp_text = format!("{shape:?}");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(stamp_text.as_str()) {
        if source_dir.exists() {
            std::fs::remove_dir_all(&source_dir).map_err(fail)?;
        }
        let shape_copy = shape;
        let src = source_dir.clone();
        let bytes =
            tokio::task::spawn_blocking(move || crate::demo::generate_model(&src, &shape_copy))
                .await
                .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?
                .map_err(fail)?;
        std::fs::write(&stamp, stamp_text).map_err(fail)?;
        println!(
            "1. generated {} in {} ({} shards, index, tokenizer, tiktoken encodings, original/ and metal/)",
            human_bytes(bytes),
            source_dir.display(),
            shape.shards
        );
    } else {
        println!("1. reusing the generated model in {}", source_dir.display());
    }

    let env = Environment::default();
    let url = format!("file://{}", source_dir.display());
    let source = source::open(&url, &env, &SourceOptions::default()).map_err(invalid)?;
    let selection = Selection::vllm_default();
    let options = FetchOptions {
        chunk_size: 8 << 20,
        concurrency: 16,
        ..FetchOptions::default()
    };
    let manifest = compute_manifest(
        Arc::clone(&source),
        &selection,
        &options,
        Arc::new(Progress::new()),
    )
    .await?;
    source
        .put_small(MANIFEST_NAME, bytes::Bytes::from(manifest.to_json()))
        .await
        .map_err(|e| CommandError::new(exit::CACHE_FAILED, e))?;
    println!(
        "2. wrote {MANIFEST_NAME}: BLAKE3 of {} files (original/ and metal/ are not part of the model vLLM loads)",
        manifest.entries().count()
    );

    let model = ModelName::new("gpt-oss-120b").map_err(invalid)?;
    let request = PrefetchRequest {
        parse_budget: crate::verify::structure::ParseBudget::default(),
        model: model.clone(),
        selection,
        options,
        require_manifest: true,
        signature: crate::fetch::signed::SignaturePolicy::default(),
        owner: "modelcache demo".to_string(),
        cancel: cancel_on_signal(),
        make_room: None,
    };
    let layout = Layout::new(&cache_root);
    let progress = Arc::new(Progress::new());
    let reporter = spawn_reporter(model.to_string(), Arc::clone(&progress));
    let result = prefetch(source, &layout, &request, progress).await;
    reporter.stop().await;
    let summary = result?;
    println!("3. {}", summary_line(&summary));

    let link = layout.model_link(&model);
    let report = tokio::task::spawn_blocking(move || verify_cached(&link, 8 << 20, 2))
        .await
        .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?
        .map_err(|e| CommandError::new(exit::VERIFY_FAILED, e))?;
    println!(
        "4. re-verified from disk: {} files, {} hashed, verification {}",
        report.files,
        human_bytes(report.bytes),
        report.verification
    );
    let skipped = !summary.path.join("original").exists();
    println!(
        "5. original/ skipped: {skipped}; ready marker: {}",
        summary.path.join(".modelcache/ready.json").display()
    );
    let served = dir.join("pod").join("model").join("gpt-oss-120b");
    demo_api(&cache_root, &source_dir, &served).await?;
    println!(
        "\nvLLM would start with (the pod's link: one revision for the pod's whole life, never models/NAME, which a refresh repoints):\n  vllm serve {} --tensor-parallel-size 4\n  TIKTOKEN_ENCODINGS_BASE={}",
        served.display(),
        served.display()
    );
    println!(
        "\ndone in {:.1} s; {}",
        started.elapsed().as_secs_f64(),
        if summary.already_published {
            "the published revision was reused: nothing was fetched."
        } else {
            "run again to see the published revision reused (nothing fetched)."
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The demo's default folder: one per user (`$TMPDIR/modelcache-demo-UID`), so users of one
/// machine never share or trip over each other's files. One that exists but belongs to
/// someone else (made by another user to mislead) is refused.
fn own_demo_dir() -> Result<std::path::PathBuf, CommandError> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::getuid().as_raw();
    let dir = std::env::temp_dir().join(format!("modelcache-demo-{uid}"));
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) if meta.uid() != uid || !meta.is_dir() => Err(CommandError::new(
            exit::INVALID_INPUT,
            format!(
                "{} is not a directory of yours (hint: remove it, or give the demo another folder with --dir)",
                dir.display()
            ),
        )),
        _ => Ok(dir),
    }
}

/// Starts the agent on loopback over the demo's cache for a moment and asks it what an init
/// container and a readiness probe would.
async fn demo_api(
    cache_root: &std::path::Path,
    source_dir: &std::path::Path,
    served: &std::path::Path,
) -> Result<(), CommandError> {
    let socket = cache_root
        .parent()
        .unwrap_or(cache_root)
        .join("run/admin.sock");
    let toml = format!(
        "cache_root = {:?}\n[listen]\nread = \"127.0.0.1:0\"\nadmin = {:?}\n[cache]\nwarm_page_cache = \"off\"\n[[models]]\nname = \"gpt-oss-120b\"\nsource = \"file://{}\"\n",
        cache_root.display().to_string(),
        socket.display().to_string(),
        source_dir.display()
    );
    let config = crate::config::agent::AgentConfig::from_toml(
        &toml,
        "the demo",
        &Environment::default(),
        &[],
    )
    .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(crate::agent::serve(
        config,
        Environment::default(),
        None,
        stop.clone(),
        move |l| {
            let _ = tx.send(l);
        },
    ));
    let listening = rx
        .await
        .map_err(|_| CommandError::new(exit::UNEXPECTED, "the demo agent did not start"))?;
    println!(
        "6. the agent's API on loopback (what a readiness probe and `modelcache wait --api` ask):"
    );
    let client = reqwest::Client::new();
    for path in ["/readyz", "/v1/models/gpt-oss-120b/ready"] {
        let url = format!("http://{}{path}", listening.read);
        match client
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                let short: String = body.chars().take(140).collect();
                println!("   GET {url} -> {status} {short}");
            }
            Err(e) => println!("   GET {url} failed: {e}"),
        }
    }
    // What the vLLM pod's init container runs: the link in the pod's own volume (an emptyDir
    // on a node) points at the revision directory resolved now.
    let link_dir = served.parent().unwrap_or(served);
    std::fs::create_dir_all(link_dir).map_err(|e| CommandError::new(exit::CACHE_FAILED, e))?;
    println!(
        "7. the init container's contract: modelcache wait --model gpt-oss-120b --cache-root {} --link {}",
        cache_root.display(),
        served.display()
    );
    let waited = super::node::run_wait(crate::cli::WaitArgs {
        model: "gpt-oss-120b".to_string(),
        cache_root: Some(cache_root.to_path_buf()),
        api: Some(format!("http://{}", listening.read)),
        link: Some(served.to_path_buf()),
        lease: None,
        timeout: Some(Duration::from_secs(60)),
        interval: None,
        warm: false,
    })
    .await;
    stop.cancel();
    let _ = server.await;
    waited.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_rss_comes_from_vm_hwm() {
        let status =
            "Name:\tmodelcache\nVmPeak:\t  900000 kB\nVmHWM:\t   40960 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(40 << 20));
        assert_eq!(parse_vm_hwm("VmHWM: lots\n"), None);
        assert_eq!(parse_vm_hwm(""), None);
    }
}
