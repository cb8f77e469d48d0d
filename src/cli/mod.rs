//! The command line: clap types (raw values only), their resolution into the library's typed
//! settings, one `run_<command>` per subcommand, progress display and exit codes.
//!
//! Clap types stop here: the engine receives [`FetchOptions`], [`Selection`] and a [`Layout`].
//! The commands live in [`fill`] (prefetch, manifest, verify, demo) and [`node`] (agent, wait,
//! status, disk).

mod fill;
mod node;

pub(crate) use fill::progress_text;
pub use fill::{ResourceUse, run_demo, run_manifest, run_prefetch, run_verify, summary_line};

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY, DEFAULT_MAX_ATTEMPTS, DragonflyOptions, Environment,
    FetchOptions, InvalidValue, Selection, parse_duration, parse_size,
};
use crate::fetch::{ErrorKind, PrefetchError, error_chain};
use crate::source::{self, SourceOptions};

/// Exit codes, also listed in `--help`.
pub mod exit {
    /// Everything asked for is done.
    pub const SUCCESS: u8 = 0;
    /// An unexpected failure (a bug, or an error of no known group).
    pub const UNEXPECTED: u8 = 1;
    /// Bad flags, URL, model name or configuration.
    pub const INVALID_INPUT: u8 = 2;
    /// The source cannot be read: not found, credentials, permissions, no manifest when required.
    pub const SOURCE_UNAVAILABLE: u8 = 3;
    /// Downloading failed after every retry, or the source kept changing.
    pub const DOWNLOAD_FAILED: u8 = 4;
    /// The bytes are not the model: hash, size or structure.
    pub const VERIFY_FAILED: u8 = 5;
    /// The cache filesystem is too small.
    pub const NO_SPACE: u8 = 6;
    /// The local cache failed (I/O error).
    pub const CACHE_FAILED: u8 = 7;
    /// `wait` gave up: the model was not ready within `--timeout`.
    pub const TIMEOUT: u8 = 8;
    /// `wait`: the agent reports the model as failed.
    pub const MODEL_FAILED: u8 = 9;
    /// Disk setup failed or refused (no usable disk, mount point busy, mkfs/mdadm/mount failed).
    pub const DISK_SETUP_FAILED: u8 = 10;
    /// Stopped by SIGINT or SIGTERM; finished work is kept for the next run.
    pub const INTERRUPTED: u8 = 130;
}

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  unexpected failure
  2  invalid input: flags, URL, model name
  3  source unavailable: not found, credentials, permissions, missing manifest
  4  download failed after every retry, or the source kept changing
  5  verification failed: hash, size or safetensors structure
  6  not enough space in the cache
  7  local cache I/O failure
  8  wait: not ready within --timeout
  9  wait: the model failed
  10  disk setup failed or refused
  130  interrupted (SIGINT/SIGTERM); finished ranges are kept for the next run";

const ABOUT: &str = "Node-local model cache for Kubernetes GPU nodes.";

const LONG_ABOUT: &str = "\
Node-local model cache for Kubernetes GPU nodes.

Fills a local cache with a model's safetensors files from Azure Blob Storage (or a directory)
with many parallel ranged GETs, hashes every byte with BLAKE3 as it arrives, checks the
safetensors and index structure, and publishes the model atomically at CACHE_ROOT/models/NAME
for vLLM to load. Interrupted runs resume where they stopped.

Start with `modelcache demo` for a first look on any machine.";

/// The `modelcache` command line.
#[derive(Debug, Parser)]
#[command(name = "modelcache", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "MODELCACHE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per event.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download, verify and publish a model into the cache, resuming earlier work.
    #[command(after_help = EXIT_CODES_HELP)]
    Prefetch(PrefetchArgs),
    /// Re-check a cached model against its manifest and structure.
    #[command(after_help = EXIT_CODES_HELP)]
    Verify(VerifyArgs),
    /// Compute the BLAKE3 manifest of a source prefix, once per model revision.
    #[command(after_help = EXIT_CODES_HELP)]
    Manifest(ManifestArgs),
    /// Run the node agent: keep configured models published, serve the HTTP API.
    #[command(after_help = EXIT_CODES_HELP)]
    Agent(AgentArgs),
    /// Block until a model is ready (the vLLM pod's init container).
    #[command(after_help = EXIT_CODES_HELP)]
    Wait(WaitArgs),
    /// Show what the agent is doing, as a table.
    Status(StatusArgs),
    /// Set up the node's local NVMe disks as the cache filesystem.
    #[command(subcommand, after_help = EXIT_CODES_HELP)]
    Disk(DiskCommand),
    /// Run the whole flow on a generated GPT-OSS-shaped model in a local folder.
    Demo(DemoArgs),
}

/// `modelcache agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The configuration file (TOML) [default: built-in defaults, see --print-default-config].
    #[arg(long, env = "MODELCACHE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set fetch.concurrency=32 (repeatable; wins over the environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Check the configuration, print what it resolves to, and exit.
    #[arg(long)]
    pub check: bool,
    /// Print the documented default configuration file and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

/// `modelcache disk`.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Print what would be done to each device and why, changing nothing.
    Plan(DiskArgs),
    /// Find, assemble or create, format and mount the cache disks.
    Apply(DiskArgs),
}

/// Arguments of `modelcache disk plan|apply`.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// The agent's configuration file (its [disk] section and cache_root).
    #[arg(long, env = "MODELCACHE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. --set disk.devices=/dev/nvme1n1 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `modelcache wait`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("where").required(true).multiple(true).args(["cache_root", "api"])))]
pub struct WaitArgs {
    /// The model to wait for.
    #[arg(long, env = "MODELCACHE_MODEL", value_name = "NAME")]
    pub model: String,
    /// The cache root as this container mounts it (the hostPath, read-only is enough).
    ///
    /// When the agent's readers' socket is there (CACHE_ROOT/readers.sock), the agent is asked
    /// through it: it tells this pod from the process that connects, so the lease it records is
    /// proved, not claimed. Without it, readiness is read from the published link and ready
    /// marker (no network needed). The revision the agent answers is checked here before
    /// --link points at it.
    #[arg(long, value_name = "DIR")]
    pub cache_root: Option<PathBuf>,
    /// Ask the agent: a URL such as http://$(NODE_IP):8080 (its read listener), or the path of
    /// its admin socket (/run/modelcache/admin.sock).
    ///
    /// Waiting is asking: a model the agent knows but is not fetching (it was evicted, say) is
    /// fetched again. Needed for --lease.
    #[arg(long, value_name = "URL|SOCKET")]
    pub api: Option<String>,
    /// Once ready, make PATH a symbolic link to the revision directory it resolved
    /// (CACHE_ROOT/store/NAME/REVISION) and serve PATH.
    ///
    /// vLLM opens shards one at a time, by path: read through CACHE_ROOT/models/NAME, a refresh
    /// during its start would mix two revisions. PATH lives in a volume the server container
    /// shares (an emptyDir), so the server reads one revision for as long as the pod lives.
    /// Needs --cache-root.
    #[arg(long, value_name = "PATH", requires = "cache_root")]
    pub link: Option<PathBuf>,
    /// Hold a lease for this pod (its UID, from the downward API: metadata.uid) on the
    /// revision it resolves: the agent never removes or rewrites that revision while the pod
    /// runs on the node.
    ///
    /// Through the readers' socket (see --cache-root) the agent identifies the pod itself and
    /// leases it anyway; POD_UID must then match. Through --api the agent checks that the pod
    /// runs on this node. Needs --api or the readers' socket.
    #[arg(long, env = "MODELCACHE_POD_UID", value_name = "POD_UID")]
    pub lease: Option<String>,
    /// Give up after this long [default: 30m].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Time between checks [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Once ready, read the model once so it is in the page cache when the server starts.
    ///
    /// Under cgroup v2 the pages are charged to the memory cgroup of the process that reads
    /// them and reclaimed at its limit, so warming only helps from the pod that will load the
    /// model: run `wait --warm` in its init container, with a memory limit that fits the model.
    /// Needs --cache-root (it reads the files).
    #[arg(long, requires = "cache_root")]
    pub warm: bool,
}

/// `modelcache status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's API: the path of its admin socket, or a URL such as http://NODE_IP:8080
    /// (its read listener) [default: the admin socket of --config's file, else
    /// /run/modelcache/admin.sock].
    #[arg(long, env = "MODELCACHE_API", value_name = "SOCKET|URL")]
    pub api: Option<String>,
    /// The agent's configuration file, for its admin socket (set in the agent's pod).
    #[arg(long, env = "MODELCACHE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the agent's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Source location and credentials.
#[derive(Debug, Args)]
#[command(next_help_heading = "Source")]
pub struct SourceArgs {
    /// Where the model's files are.
    ///
    /// az://CONTAINER/PREFIX (account from --account or AZURE_STORAGE_ACCOUNT_NAME),
    /// https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS], or file:///PATH.
    #[arg(long, env = "MODELCACHE_SOURCE", value_name = "URL")]
    pub source: String,
    /// Storage account for az:// URLs [default: AZURE_STORAGE_ACCOUNT_NAME].
    #[arg(long, value_name = "NAME")]
    pub account: Option<String>,
}

/// File selection.
#[derive(Debug, Args)]
#[command(next_help_heading = "Selection")]
pub struct SelectionArgs {
    /// Only files matching this glob (repeatable) [default: every file].
    #[arg(long = "include", value_name = "GLOB")]
    pub include: Vec<String>,
    /// Skip files matching this glob (repeatable), in addition to the defaults: original/**,
    /// metal/** and what download tools leave (.cache/**, .git/**, .gitattributes, .gitignore,
    /// **/*.incomplete, **/*.lock).
    #[arg(long = "exclude", value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Do not skip the defaults (original/** and metal/**, each another model-sized download
    /// vLLM ignores, and download tools' leftovers).
    #[arg(long)]
    pub no_default_excludes: bool,
}

impl SourceArgs {
    fn open(&self, env: &Environment) -> Result<Arc<dyn source::Source>, CommandError> {
        let options = SourceOptions {
            account: self.account.clone(),
            confine: None,
        };
        source::open(&self.source, env, &options).map_err(|e| {
            CommandError::from(PrefetchError::Source {
                url: source::redact_url(&self.source),
                source: e,
            })
        })
    }
}

impl SelectionArgs {
    fn resolve(&self) -> Result<Selection, InvalidValue> {
        Selection::new(&self.include, &self.exclude, !self.no_default_excludes)
    }
}

/// Download tuning.
#[derive(Debug, Args)]
#[command(next_help_heading = "Download")]
pub struct FetchArgs {
    /// Most ranged GETs in flight across all files; with adaptive concurrency the number is
    /// chosen from measured throughput up to this ceiling [default: 64].
    #[arg(long, env = "MODELCACHE_CONCURRENCY", value_name = "N")]
    pub concurrency: Option<usize>,
    /// Choose the ranges in flight from measured throughput: start at 16, quadruple while it pays,
    /// halve on throttling, probe now and then; false keeps exactly --concurrency
    /// [default: true].
    #[arg(long, env = "MODELCACHE_ADAPTIVE_CONCURRENCY", value_name = "BOOL")]
    pub adaptive_concurrency: Option<bool>,
    /// Bytes per ranged GET, a power of two from 64KiB to 1GiB [default: 64MiB].
    #[arg(long, env = "MODELCACHE_CHUNK_SIZE", value_name = "SIZE", value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Attempts per range before the model fails [default: 8].
    #[arg(long, env = "MODELCACHE_MAX_ATTEMPTS", value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Cancel and retry a range that receives no byte for this long [default: 30s].
    #[arg(long, env = "MODELCACHE_STALL_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub stall_timeout: Option<Duration>,
    /// Largest delay between retries of a range [default: 30s].
    #[arg(long, env = "MODELCACHE_RETRY_MAX_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub retry_max_delay: Option<Duration>,
    /// Write whole blocks with O_DIRECT, around the page cache, where the filesystem supports
    /// it (not tmpfs; a file's last partial block goes through the page cache) [default: true].
    #[arg(long, env = "MODELCACHE_DIRECT_IO", value_name = "BOOL")]
    pub direct_io: Option<bool>,
    /// Ask Dragonfly's dfdaemon on this socket for each file first (P2P: from a node that has
    /// it, else dfdaemon reads the source once for the fleet). Every file is still checked
    /// against the manifest, which this needs; any file dfdaemon cannot deliver, or delivers
    /// wrong, is fetched directly [default: off].
    #[arg(long, env = "MODELCACHE_FETCH_DRAGONFLY_SOCKET", value_name = "PATH")]
    pub dragonfly_socket: Option<std::path::PathBuf>,
    /// With --dragonfly-socket: fetch a file directly when no piece of it arrives through
    /// dfdaemon for this long [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "dragonfly_socket")]
    pub dragonfly_stall_timeout: Option<Duration>,
    /// With --dragonfly-socket: fetch a file directly when it arrives through dfdaemon slower
    /// than this, per second, after --dragonfly-grace [default: 50MB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "dragonfly_socket")]
    pub dragonfly_min_rate: Option<u64>,
    /// With --dragonfly-socket: how long a file may take to reach --dragonfly-min-rate
    /// [default: 20s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "dragonfly_socket")]
    pub dragonfly_grace: Option<Duration>,
    /// With --dragonfly-socket: `pieces` clones each piece dfdaemon reports written into
    /// modelcache's own file and hashes it there; `after` clones and hashes each file once
    /// dfdaemon is done [default: pieces].
    #[arg(long, value_name = "WHEN", value_parser = ["pieces", "after"], requires = "dragonfly_socket")]
    pub dragonfly_hash: Option<String>,
}

impl FetchArgs {
    fn resolve(&self) -> Result<FetchOptions, InvalidValue> {
        let defaults = FetchOptions::default();
        let options = FetchOptions {
            concurrency: self.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
            chunk_size: self.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE),
            max_attempts: self.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            stall_timeout: self.stall_timeout.unwrap_or(defaults.stall_timeout),
            backoff_max: self.retry_max_delay.unwrap_or(defaults.backoff_max),
            direct_io: self.direct_io.unwrap_or(defaults.direct_io),
            adaptive: self.adaptive_concurrency.unwrap_or(defaults.adaptive),
            dragonfly: self.dragonfly_socket.as_ref().map(|socket| {
                let d = DragonflyOptions::new(socket.clone());
                DragonflyOptions {
                    stall_timeout: self.dragonfly_stall_timeout.unwrap_or(d.stall_timeout),
                    min_rate: self.dragonfly_min_rate.unwrap_or(d.min_rate),
                    hash_pieces: self.dragonfly_hash.as_deref() != Some("after"),
                    grace: self.dragonfly_grace.unwrap_or(d.grace),
                    ..d
                }
            }),
            ..defaults
        };
        options.validate()?;
        Ok(options)
    }
}

/// `modelcache prefetch`.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// Where the files come from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// The model's name in the cache; published at CACHE_ROOT/models/NAME.
    #[arg(long, env = "MODELCACHE_MODEL", value_name = "NAME")]
    pub model: String,
    /// The cache's root directory.
    #[arg(
        long,
        env = "MODELCACHE_CACHE_ROOT",
        value_name = "DIR",
        default_value = "/mnt/modelcache"
    )]
    pub cache_root: PathBuf,
    /// Refuse a source without modelcache.manifest.json (a verified signature counts as one).
    #[arg(long, env = "MODELCACHE_REQUIRE_MANIFEST")]
    pub require_manifest: bool,
    /// The publisher's signature (OpenSSF Model Signing).
    #[command(flatten)]
    pub signing: SigningArgs,
    /// Print the final summary as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip BLAKE3 hashing (measures the cost of verification; never use in production).
    #[arg(long, hide = true)]
    pub no_hash: bool,
    /// Which files make up the model.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Download tuning.
    #[command(flatten)]
    pub fetch: FetchArgs,
}

/// Where a model's signature is and whom to trust.
#[derive(Debug, Args)]
#[command(next_help_heading = "Signature (OpenSSF Model Signing)")]
pub struct SigningArgs {
    /// Whether the signature is read: off; optional (verified when present, the model is
    /// published as unsigned when absent); required (missing or invalid, nothing is
    /// published). With no --trusted signer, optional publishes unsigned.
    #[arg(
        long,
        env = "MODELCACHE_SIGNATURE",
        value_name = "MODE",
        default_value = "optional",
        value_parser = ["off", "optional", "required"]
    )]
    pub signature: String,
    /// The signature's name in the model's directory, as `model_signing sign --signature` wrote it.
    #[arg(
        long,
        env = "MODELCACHE_SIGNATURE_FILE",
        value_name = "NAME",
        default_value = crate::fetch::signed::DEFAULT_SIGNATURE_FILE
    )]
    pub signature_file: String,
    /// A trusted signer: a PEM file with the publisher's public key (`model_signing sign key`)
    /// or the CA certificate its signing certificate chains to (`sign certificate`). Repeat for
    /// several.
    #[arg(
        long,
        env = "MODELCACHE_TRUSTED",
        value_name = "PEM",
        value_delimiter = ','
    )]
    pub trusted: Vec<PathBuf>,
}

impl SigningArgs {
    /// The policy these flags give.
    pub fn resolve(&self) -> Result<crate::fetch::signed::SignaturePolicy, String> {
        use crate::fetch::signed::{SignatureMode, SignaturePolicy};
        let mode =
            SignatureMode::parse("--signature", &self.signature).map_err(|e| e.to_string())?;
        crate::source::validate_name(&self.signature_file)
            .map_err(|e| format!("--signature-file: {e}"))?;
        let trust = crate::verify::signature::Trust::load(&self.trusted)
            .map_err(|e| format!("--trusted: {e}"))?;
        if mode == SignatureMode::Required && trust.is_empty() {
            return Err("--signature required needs a trusted signer: pass the publisher's public key or CA certificate with --trusted PEM".into());
        }
        Ok(SignaturePolicy {
            mode,
            file: self.signature_file.clone(),
            trust: std::sync::Arc::new(trust),
        })
    }
}

/// `modelcache verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A published model directory (instead of --cache-root and --model).
    #[arg(value_name = "DIR", conflicts_with_all = ["cache_root", "model"])]
    pub dir: Option<PathBuf>,
    /// The cache's root directory [default: cache_root of --config's file].
    #[arg(
        long,
        env = "MODELCACHE_CACHE_ROOT",
        value_name = "DIR",
        requires = "model"
    )]
    pub cache_root: Option<PathBuf>,
    /// The model to verify (under --cache-root).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// The agent's configuration file, for its cache root and its trusted signers
    /// (`signing.trusted`), set in the agent's pod.
    #[arg(long, env = "MODELCACHE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// A trusted signer to check the revision's signature against: the publisher's public key
    /// or CA certificate (PEM). Repeat for several; adds to --config's `signing.trusted`.
    /// Without any, a signature kept with the revision is reported, not checked.
    #[arg(
        long,
        env = "MODELCACHE_TRUSTED",
        value_name = "PEM",
        value_delimiter = ','
    )]
    pub trusted: Vec<PathBuf>,
    /// Fail unless the revision's signature is there and verifies against a trusted signer.
    #[arg(long, env = "MODELCACHE_REQUIRE_SIGNATURE")]
    pub require_signature: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `modelcache manifest`.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// Where the files come from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Write the manifest to this file instead of stdout.
    #[arg(long, value_name = "PATH", conflicts_with = "upload")]
    pub output: Option<PathBuf>,
    /// Upload the manifest into the source prefix as modelcache.manifest.json.
    #[arg(long)]
    pub upload: bool,
    /// Which files make up the model.
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Download tuning.
    #[command(flatten)]
    pub fetch: FetchArgs,
}

/// `modelcache demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the generated source and the cache [default: $TMPDIR/modelcache-demo-UID,
    /// one per user].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Bytes per generated shard (15 shards) [default: 20MiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub shard_size: Option<u64>,
}

/// A failed command: the exit code and the error to print.
#[derive(Debug)]
pub struct CommandError {
    /// Process exit code.
    pub exit_code: u8,
    /// The error.
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl CommandError {
    pub(crate) fn new(
        exit_code: u8,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            exit_code,
            error: error.into(),
        }
    }

    /// The error and its causes on one line.
    pub fn one_line(&self) -> String {
        error_chain(self.error.as_ref())
    }
}

impl From<PrefetchError> for CommandError {
    fn from(e: PrefetchError) -> Self {
        let code = match e.kind() {
            ErrorKind::InvalidInput => exit::INVALID_INPUT,
            ErrorKind::SourceUnavailable => exit::SOURCE_UNAVAILABLE,
            ErrorKind::DownloadFailed => exit::DOWNLOAD_FAILED,
            ErrorKind::VerifyFailed => exit::VERIFY_FAILED,
            ErrorKind::NoSpace => exit::NO_SPACE,
            ErrorKind::Cache => exit::CACHE_FAILED,
            ErrorKind::Cancelled => exit::INTERRUPTED,
        };
        CommandError::new(code, e)
    }
}

pub(crate) fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> CommandError {
    CommandError::new(exit::INVALID_INPUT, e)
}

/// Runs a parsed command line. `env` is the process environment, read once by the caller.
pub fn run(cli: Cli, env: &Environment) -> Result<ExitCode, CommandError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CommandError::new(exit::UNEXPECTED, e))?;
    runtime.block_on(async {
        match cli.command {
            Command::Prefetch(args) => run_prefetch(args, env).await,
            Command::Verify(args) => run_verify(args, env).await,
            Command::Manifest(args) => run_manifest(args, env).await,
            Command::Agent(args) => node::run_agent(args, env).await,
            Command::Wait(args) => node::run_wait(args).await,
            Command::Status(args) => node::run_status(args, env).await,
            Command::Disk(command) => node::run_disk(command, env).await,
            Command::Demo(args) => run_demo(args).await,
        }
    })
}

/// A token cancelled by the first SIGINT or SIGTERM, so a prefetch stops with its journal
/// checkpointed instead of dying mid-write.
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        crate::signal::terminated().await;
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn first_help_lines_are_short_sentences() {
        let mut cmd = Cli::command();
        for sub in cmd.get_subcommands_mut() {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            // clap drops the source's trailing period; the sentence must still fit 79 columns.
            assert!(!about.is_empty() && about.len() <= 79, "{about}");
        }
    }

    #[test]
    fn bad_fetch_values_name_their_flag() {
        let args = FetchArgs {
            concurrency: Some(0),
            chunk_size: None,
            max_attempts: None,
            stall_timeout: None,
            retry_max_delay: None,
            direct_io: None,
            adaptive_concurrency: None,
            dragonfly_socket: None,
            dragonfly_stall_timeout: None,
            dragonfly_min_rate: None,
            dragonfly_hash: None,
            dragonfly_grace: None,
        };
        let err = args.resolve().unwrap_err();
        assert!(err.to_string().contains("--concurrency"), "{err}");
    }
}
