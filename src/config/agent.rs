//! The agent's configuration: a TOML file (from a ConfigMap), every scalar key overridable by
//! environment (`MODELCACHE_<KEY>`, dots as underscores) and by flag (`--set KEY=VALUE`).
//!
//! Precedence: `--set` > environment > file > built-in default. Unknown keys are errors naming
//! the key and the file: a typo in a ConfigMap must fail the rollout, not run on defaults.
//! [`DEFAULT_CONFIG`] is the documented default file (`modelcache agent --print-default-config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{
    DragonflyOptions, Environment, Exchange, FetchOptions, InvalidValue, Selection, parse_duration,
    parse_size,
};
use crate::fetch::signed::{DEFAULT_SIGNATURE_FILE, SignatureMode};
use crate::store::ModelName;
use crate::verify::signature::Trust;
use std::sync::Arc;

/// Dragonfly's client keeps its storage here (its Helm chart's `storage.dir`).
pub const DFDAEMON_STORAGE_DIR: &str = "/var/lib/dragonfly";

/// The directory inside dfdaemon's storage that modelcache asks it to write files into.
const EXCHANGE_DIR: &str = "modelcache";

/// The default configuration, with every key and its override.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// Scalar keys that can be overridden, with the kind of value each takes.
const OVERRIDABLE: &[(&str, Kind)] = &[
    ("cache_root", Kind::Text),
    ("listen.read", Kind::Text),
    ("listen.admin", Kind::Text),
    ("listen.token_file", Kind::Text),
    ("listen.max_connections", Kind::Integer),
    ("fetch.concurrency", Kind::Integer),
    ("fetch.chunk_size", Kind::Text),
    ("fetch.max_attempts", Kind::Integer),
    ("fetch.stall_timeout", Kind::Text),
    ("fetch.retry_max_delay", Kind::Text),
    ("fetch.failed_retry_delay", Kind::Text),
    ("fetch.direct_io", Kind::Bool),
    ("fetch.adaptive_concurrency", Kind::Bool),
    ("fetch.dragonfly.socket", Kind::Text),
    ("fetch.dragonfly.concurrent_files", Kind::Integer),
    ("fetch.dragonfly.stall_timeout", Kind::Text),
    ("fetch.dragonfly.min_rate", Kind::Text),
    ("fetch.dragonfly.grace", Kind::Text),
    ("fetch.dragonfly.hash", Kind::Text),
    ("fetch.dragonfly.storage_host_path", Kind::Text),
    ("fetch.dragonfly.dfdaemon_storage_dir", Kind::Text),
    ("cache.budget", Kind::Text),
    ("cache.warm_page_cache", Kind::Text),
    ("cache.warm_max_ram_fraction", Kind::Float),
    ("cache.proc_root", Kind::Text),
    ("cache.scrub_rate", Kind::Text),
    ("cache.scrub_interval", Kind::Text),
    ("cache.private_mount", Kind::Text),
    ("leases.pods_dir", Kind::Text),
    ("leases.check_interval", Kind::Text),
    ("leases.cgroup_root", Kind::Text),
    ("api.allowed_sources", Kind::List),
    ("signing.trusted", Kind::List),
    ("signing.default", Kind::Text),
    ("disk.enabled", Kind::Bool),
    ("disk.models", Kind::List),
    ("disk.devices", Kind::List),
    ("disk.filesystem", Kind::Text),
    ("disk.raid_chunk", Kind::Text),
    ("disk.label", Kind::Text),
    ("disk.discard", Kind::Bool),
    ("disk.member_wait", Kind::Text),
    ("disk.sysfs_root", Kind::Text),
    ("disk.dev_root", Kind::Text),
];

#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Integer,
    Float,
    Bool,
    /// Comma-separated.
    List,
}

/// Every `MODELCACHE_*` variable the agent's configuration reads (overrides and the token).
pub fn env_vars() -> Vec<String> {
    let mut vars: Vec<String> = OVERRIDABLE.iter().map(|(k, _)| env_name(k)).collect();
    vars.push("MODELCACHE_TOKEN".into());
    vars
}

/// The environment variable overriding a key: `fetch.concurrency` → `MODELCACHE_FETCH_CONCURRENCY`.
pub fn env_name(key: &str) -> String {
    format!("MODELCACHE_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read the configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid configuration in {origin}: {message}")]
    Parse {
        /// The file (or "overrides").
        origin: String,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value is out of range.
    #[error(transparent)]
    Invalid(#[from] InvalidValue),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_cache_root")]
    cache_root: PathBuf,
    #[serde(default)]
    listen: ListenFile,
    #[serde(default)]
    fetch: FetchFile,
    #[serde(default)]
    cache: CacheFile,
    #[serde(default)]
    disk: DiskFile,
    #[serde(default)]
    api: ApiFile,
    #[serde(default)]
    leases: LeasesFile,
    #[serde(default)]
    signing: SigningFile,
    #[serde(default)]
    models: Vec<ModelFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningFile {
    #[serde(default)]
    trusted: Vec<PathBuf>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeasesFile {
    #[serde(default = "default_pods_dir")]
    pods_dir: PathBuf,
    #[serde(default)]
    check_interval: Option<String>,
    #[serde(default = "default_cgroup_root")]
    cgroup_root: PathBuf,
}

impl Default for LeasesFile {
    fn default() -> Self {
        Self {
            pods_dir: default_pods_dir(),
            check_interval: None,
            cgroup_root: default_cgroup_root(),
        }
    }
}

fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}

fn default_pods_dir() -> PathBuf {
    PathBuf::from("/var/lib/kubelet/pods")
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiFile {
    #[serde(default)]
    allowed_sources: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    #[serde(default)]
    enabled: bool,
    #[serde(default = "default_disk_models")]
    models: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default = "default_fs")]
    filesystem: String,
    #[serde(default = "default_raid_chunk")]
    raid_chunk: String,
    #[serde(default = "default_label")]
    label: String,
    #[serde(default)]
    discard: bool,
    #[serde(default)]
    member_wait: Option<String>,
    #[serde(default = "default_sysfs")]
    sysfs_root: PathBuf,
    #[serde(default = "default_dev")]
    dev_root: PathBuf,
}

impl Default for DiskFile {
    fn default() -> Self {
        Self {
            enabled: false,
            models: default_disk_models(),
            devices: Vec::new(),
            filesystem: default_fs(),
            raid_chunk: default_raid_chunk(),
            label: default_label(),
            discard: false,
            member_wait: None,
            sysfs_root: default_sysfs(),
            dev_root: default_dev(),
        }
    }
}

fn default_disk_models() -> Vec<String> {
    crate::disk::DEFAULT_MODELS
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

fn default_fs() -> String {
    "xfs".into()
}

fn default_raid_chunk() -> String {
    "512KiB".into()
}

fn default_label() -> String {
    "modelcache".into()
}

fn default_sysfs() -> PathBuf {
    PathBuf::from("/sys")
}

fn default_dev() -> PathBuf {
    PathBuf::from("/dev")
}

fn default_cache_root() -> PathBuf {
    PathBuf::from("/mnt/modelcache")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    #[serde(default = "default_read")]
    read: String,
    #[serde(default = "default_admin")]
    admin: String,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            read: default_read(),
            admin: default_admin(),
            token_file: None,
            max_connections: default_max_connections(),
        }
    }
}

fn default_max_connections() -> usize {
    256
}

fn default_read() -> String {
    "0.0.0.0:8080".into()
}

/// The admin socket's default path; its directory is made root-only by the agent.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/modelcache/admin.sock";

fn default_admin() -> String {
    DEFAULT_ADMIN_SOCKET.into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFile {
    concurrency: Option<usize>,
    chunk_size: Option<String>,
    max_attempts: Option<u32>,
    stall_timeout: Option<String>,
    retry_max_delay: Option<String>,
    failed_retry_delay: Option<String>,
    direct_io: Option<bool>,
    adaptive_concurrency: Option<bool>,
    #[serde(default)]
    dragonfly: Option<DragonflyFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DragonflyFile {
    socket: Option<PathBuf>,
    concurrent_files: Option<usize>,
    stall_timeout: Option<String>,
    min_rate: Option<String>,
    grace: Option<String>,
    hash: Option<String>,
    storage_host_path: Option<PathBuf>,
    dfdaemon_storage_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    #[serde(default)]
    budget: Option<String>,
    #[serde(default = "default_warm")]
    warm_page_cache: String,
    #[serde(default = "default_warm_fraction")]
    warm_max_ram_fraction: f64,
    #[serde(default = "default_proc_root")]
    proc_root: PathBuf,
    #[serde(default)]
    scrub_rate: Option<String>,
    #[serde(default)]
    scrub_interval: Option<String>,
    #[serde(default)]
    private_mount: Option<PathBuf>,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self {
            budget: None,
            warm_page_cache: default_warm(),
            warm_max_ram_fraction: default_warm_fraction(),
            proc_root: default_proc_root(),
            scrub_rate: None,
            scrub_interval: None,
            private_mount: None,
        }
    }
}

fn default_warm() -> String {
    // Under cgroup v2 the agent's reads are charged to its own small memory limit and
    // reclaimed there; the consumer warms instead (`modelcache wait --warm`).
    "off".into()
}

fn default_warm_fraction() -> f64 {
    0.5
}

fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    source: String,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default = "yes")]
    default_excludes: bool,
    #[serde(default = "yes")]
    pin: bool,
    #[serde(default)]
    require_manifest: bool,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    signature_file: Option<String>,
}

fn yes() -> bool {
    true
}

/// How much of the cache filesystem models may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// No limit but the filesystem's free space.
    Unlimited,
    /// At most this many bytes.
    Bytes(u64),
    /// At most this fraction (0–1] of the filesystem's size.
    Fraction(f64),
}

/// Whether to read a published model into the page cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WarmPolicy {
    /// Never.
    Off,
    /// Always.
    On,
    /// When the model is at most this fraction of RAM.
    Auto(f64),
}

/// Background re-hashing of published models against their recorded hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubPolicy {
    /// Bytes read per second, at most.
    pub rate: u64,
    /// Time from the start of one pass to the start of the next; the first starts at once.
    pub interval: Duration,
}

/// How readers' leases are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasePolicy {
    /// The kubelet's pod directories: where no pod cgroups are visible, a lease counts while
    /// `pods_dir/POD_UID` exists.
    pub pods_dir: PathBuf,
    /// The host's cgroup tree: a lease counts while its pod's cgroup exists.
    pub cgroup_root: PathBuf,
    /// How often ended leases are dropped and old revisions no reader holds are removed.
    pub check_interval: Duration,
}

/// One model the agent keeps published.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// The name in the cache.
    pub name: ModelName,
    /// The source URL (may hold a SAS token: never log it unredacted).
    pub source: String,
    /// Storage account for `az://` URLs.
    pub account: Option<String>,
    /// Which files.
    pub selection: Selection,
    /// Never evicted; counted by `/readyz`.
    pub pin: bool,
    /// Refuse a source without a manifest.
    pub require_manifest: bool,
    /// Whether the publisher's signature is read and required.
    pub signature: SignatureMode,
    /// The signature's name in the model's directory.
    pub signature_file: String,
    /// The signers trusted for it (the agent's `signing.trusted`).
    pub trust: Arc<Trust>,
}

/// A bearer token, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Constant-time-enough comparison with a presented token.
    pub fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(REDACTED)")
    }
}

/// Where the bearer token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `MODELCACHE_TOKEN`: fixed for the agent's life.
    Fixed(Token),
    /// `listen.token_file`: re-read when the file changes (Kubernetes rotates mounted secrets by
    /// swapping a symlink).
    File(PathBuf),
}

/// Reads a token file: its trimmed contents, which must not be empty.
pub fn read_token_file(path: &Path) -> Result<Token, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(
            InvalidValue::new("listen.token_file", path.display(), "the file is empty").into(),
        );
    }
    Ok(Token(token.to_string()))
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Validates `listen.admin`: an absolute socket path. An address is refused with the reason: a
/// TCP port of an agent on the host network is open to every pod on the host network.
fn admin_socket(raw: &str) -> Result<PathBuf, InvalidValue> {
    if raw.parse::<SocketAddr>().is_ok() {
        return Err(InvalidValue::new(
            "listen.admin",
            raw,
            format!(
                "expected a Unix socket path such as {DEFAULT_ADMIN_SOCKET}: the admin API is no longer served on TCP, where every pod on the host network could reach it (use listen.token_file to allow state-changing requests on listen.read)"
            ),
        ));
    }
    let path = PathBuf::from(raw);
    if !path.is_absolute() || path.file_name().is_none() {
        return Err(InvalidValue::new(
            "listen.admin",
            raw,
            format!("expected an absolute socket path such as {DEFAULT_ADMIN_SOCKET}"),
        ));
    }
    if raw.len() > SOCKET_PATH_MAX || raw.contains('\0') {
        return Err(InvalidValue::new(
            "listen.admin",
            raw,
            format!("a socket path holds at most {SOCKET_PATH_MAX} bytes and no NUL"),
        ));
    }
    Ok(path)
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The cache root.
    pub cache_root: PathBuf,
    /// Address for read endpoints (may be the node address).
    pub read_addr: SocketAddr,
    /// Unix socket for every endpoint, state-changing included. Its directory is root-only, so
    /// only the node's root (and the agent's container) can reach it.
    pub admin_socket: PathBuf,
    /// Bearer token that also allows state-changing requests on the read address.
    pub token: Option<TokenSource>,
    /// Connections served at once per listener.
    pub max_connections: usize,
    /// Download tuning.
    pub fetch: FetchOptions,
    /// `fetch.dragonfly.storage_host_path`: where the agent shows dfdaemon the directory on the
    /// cache filesystem that dfdaemon keeps its storage in.
    pub dragonfly_storage: Option<PathBuf>,
    /// First delay before retrying a failed model (doubles up to ten minutes).
    pub failed_retry_delay: Duration,
    /// Disk budget.
    pub budget: Budget,
    /// Page-cache warming.
    pub warm: WarmPolicy,
    /// Background scrub; `None` when off.
    pub scrub: Option<ScrubPolicy>,
    /// Source prefixes an API request may name for a model that is not configured.
    pub allowed_sources: Vec<String>,
    /// Readers' leases.
    pub leases: LeasePolicy,
    /// Where `/proc` is (for `meminfo` and `mountinfo`).
    pub proc_root: PathBuf,
    /// Disk setup.
    pub disk: crate::disk::DiskConfig,
    /// The signers trusted for every model (`signing.trusted`).
    pub trust: Arc<Trust>,
    /// The PEM files `trust` was read from: watched for changes like the file itself.
    pub trusted_files: Vec<PathBuf>,
    /// The signature policy of prefetch requests for models not configured
    /// (`signing.default`); a request may ask for a stricter one.
    pub signature_default: SignatureMode,
    /// Configured models.
    pub models: Vec<ModelSpec>,
}

impl AgentConfig {
    /// Where the agent reads and writes the cache: its private mount when consumers see the
    /// cache root read-only (`cache.private_mount`), the cache root otherwise.
    pub fn writable_root(&self) -> PathBuf {
        match &self.disk.private_mount {
            Some(private) => crate::disk::view::writable_root(private),
            None => self.cache_root.clone(),
        }
    }

    /// Loads the file (if any), applies environment then `--set` overrides, and validates.
    pub fn load(
        file: Option<&Path>,
        env: &Environment,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => (String::new(), "the built-in defaults".to_string()),
        };
        Self::from_toml(&text, &origin, env, sets)
    }

    /// Like [`AgentConfig::load`], from TOML text (`origin` names it in errors).
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &Environment,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.to_string(),
                    message: e.message().to_string(),
                })?;
        for (key, kind) in OVERRIDABLE {
            if let Some(value) = env.modelcache(&env_name(key)) {
                set_key(&mut table, key, *kind, value, &env_name(key))?;
            }
        }
        for set in sets {
            let (key, value) = set.split_once('=').ok_or_else(|| {
                InvalidValue::new(
                    "--set",
                    set,
                    "expected KEY=VALUE, e.g. fetch.concurrency=32",
                )
            })?;
            let Some((_, kind)) = OVERRIDABLE.iter().find(|(k, _)| *k == key.trim()) else {
                let keys: Vec<&str> = OVERRIDABLE.iter().map(|(k, _)| *k).collect();
                return Err(InvalidValue::new(
                    "--set",
                    set,
                    format!("unknown key; one of {}", keys.join(", ")),
                )
                .into());
            };
            set_key(&mut table, key.trim(), *kind, value.trim(), "--set")?;
        }
        let file: FileConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.to_string(),
                    message: e.message().to_string(),
                })?;
        Self::validate(file, env)
    }

    fn validate(file: FileConfig, env: &Environment) -> Result<Self, ConfigError> {
        let addr = |key: &str, raw: &str| {
            raw.parse::<SocketAddr>().map_err(|_| {
                InvalidValue::new(key, raw, "expected an address such as 127.0.0.1:8081")
            })
        };
        let read_addr = addr("listen.read", &file.listen.read)?;
        let admin_socket = admin_socket(&file.listen.admin)?;
        let token = match (&file.listen.token_file, env.modelcache("MODELCACHE_TOKEN")) {
            (_, Some(t)) if !t.trim().is_empty() => {
                Some(TokenSource::Fixed(Token(t.trim().to_string())))
            }
            (Some(path), _) => {
                // Read once now so a missing or empty file fails at start, not at first use.
                read_token_file(path)?;
                Some(TokenSource::File(path.clone()))
            }
            _ => None,
        };
        let size = |key: &str, raw: &Option<String>, default: u64| match raw {
            Some(r) => parse_size(r).map_err(|e| InvalidValue::new(key, r, e)),
            None => Ok(default),
        };
        let duration = |key: &str, raw: &Option<String>, default: Duration| match raw {
            Some(r) => parse_duration(r).map_err(|e| InvalidValue::new(key, r, e)),
            None => Ok(default),
        };
        let defaults = FetchOptions::default();
        let writable = match &file.cache.private_mount {
            Some(private) => crate::disk::view::writable_root(private),
            None => file.cache_root.clone(),
        };
        let dragonfly_storage = file
            .fetch
            .dragonfly
            .as_ref()
            .and_then(|d| d.storage_host_path.clone());
        if let Some(p) = &dragonfly_storage {
            if !p.is_absolute() {
                return Err(InvalidValue::new(
                    "fetch.dragonfly.storage_host_path",
                    p.display(),
                    "expected an absolute path (a hostPath volume of the agent's pod, mountPropagation: Bidirectional)",
                )
                .into());
            }
        }
        let fetch = FetchOptions {
            concurrency: file.fetch.concurrency.unwrap_or(defaults.concurrency),
            chunk_size: size(
                "fetch.chunk_size",
                &file.fetch.chunk_size,
                defaults.chunk_size,
            )?,
            max_attempts: file.fetch.max_attempts.unwrap_or(defaults.max_attempts),
            stall_timeout: duration(
                "fetch.stall_timeout",
                &file.fetch.stall_timeout,
                defaults.stall_timeout,
            )?,
            backoff_max: duration(
                "fetch.retry_max_delay",
                &file.fetch.retry_max_delay,
                defaults.backoff_max,
            )?,
            direct_io: file.fetch.direct_io.unwrap_or(defaults.direct_io),
            adaptive: file.fetch.adaptive_concurrency.unwrap_or(defaults.adaptive),
            dragonfly: match &file.fetch.dragonfly {
                Some(DragonflyFile {
                    socket: Some(socket),
                    concurrent_files,
                    stall_timeout,
                    min_rate,
                    grace,
                    hash,
                    storage_host_path,
                    dfdaemon_storage_dir,
                }) => {
                    let d = DragonflyOptions::new(socket.clone());
                    let concurrent_files = concurrent_files.unwrap_or(d.concurrent_files);
                    if !(1..=64).contains(&concurrent_files) {
                        return Err(InvalidValue::new(
                            "fetch.dragonfly.concurrent_files",
                            concurrent_files,
                            "expected an integer from 1 to 64",
                        )
                        .into());
                    }
                    let hash_pieces = match hash.as_deref() {
                        None | Some("pieces") => true,
                        Some("after") => false,
                        Some(other) => {
                            return Err(InvalidValue::new(
                                "fetch.dragonfly.hash",
                                other,
                                "expected pieces (clone and hash each piece as dfdaemon writes it) or after (clone and hash the file once it is done)",
                            )
                            .into());
                        }
                    };
                    Some(DragonflyOptions {
                        concurrent_files,
                        stall_timeout: duration(
                            "fetch.dragonfly.stall_timeout",
                            stall_timeout,
                            d.stall_timeout,
                        )?,
                        min_rate: size("fetch.dragonfly.min_rate", min_rate, d.min_rate)?,
                        grace: duration("fetch.dragonfly.grace", grace, d.grace)?,
                        hash_pieces,
                        // dfdaemon in its own pod sees the shared directory at its storage
                        // path; the agent at the cache filesystem's `dragonfly/storage`.
                        exchange: storage_host_path.as_ref().map(|_| Exchange {
                            dfdaemon_dir: dfdaemon_storage_dir
                                .clone()
                                .unwrap_or_else(|| PathBuf::from(DFDAEMON_STORAGE_DIR))
                                .join(EXCHANGE_DIR),
                            local_dir: writable
                                .join(crate::disk::view::DRAGONFLY_STORAGE)
                                .join(EXCHANGE_DIR),
                        }),
                        ..d
                    })
                }
                Some(DragonflyFile { socket: None, .. }) => {
                    return Err(InvalidValue::new(
                        "fetch.dragonfly.socket",
                        "(unset)",
                        "the [fetch.dragonfly] section needs socket = \"/run/dragonfly/dfdaemon.sock\" (or remove the section to fetch directly)",
                    )
                    .into());
                }
                None => None,
            },
            ..defaults
        };
        fetch.validate()?;
        let failed_retry_delay = duration(
            "fetch.failed_retry_delay",
            &file.fetch.failed_retry_delay,
            Duration::from_secs(30),
        )?;
        let budget = match &file.cache.budget {
            None => Budget::Unlimited,
            Some(raw) => parse_budget(raw)?,
        };
        let warm = match file.cache.warm_page_cache.as_str() {
            "off" => WarmPolicy::Off,
            "on" => WarmPolicy::On,
            "auto" => {
                let f = file.cache.warm_max_ram_fraction;
                if !(f > 0.0 && f <= 1.0) {
                    return Err(InvalidValue::new(
                        "cache.warm_max_ram_fraction",
                        f,
                        "expected a fraction in (0, 1]",
                    )
                    .into());
                }
                WarmPolicy::Auto(f)
            }
            other => {
                return Err(InvalidValue::new(
                    "cache.warm_page_cache",
                    other,
                    "expected auto, on or off",
                )
                .into());
            }
        };
        let scrub = match file.cache.scrub_rate.as_deref().map(str::trim) {
            Some("off") => None,
            rate => Some(ScrubPolicy {
                rate: match rate {
                    None => 50 << 20,
                    Some(raw) => parse_size(raw).ok().filter(|r| *r > 0).ok_or_else(|| {
                        InvalidValue::new(
                            "cache.scrub_rate",
                            raw,
                            "expected bytes per second such as 50MiB, or off",
                        )
                    })?,
                },
                interval: duration(
                    "cache.scrub_interval",
                    &file.cache.scrub_interval,
                    Duration::from_secs(24 * 3600),
                )?,
            }),
        };
        let trusted_files = file.signing.trusted.clone();
        let trust = Arc::new(
            Trust::load(&file.signing.trusted)
                .map_err(|e| InvalidValue::new("signing.trusted", "", e.to_string()))?,
        );
        let signature_default = match &file.signing.default {
            Some(v) => SignatureMode::parse("signing.default", v)?,
            None => SignatureMode::default(),
        };
        let needs_trust = |key: &str, mode: SignatureMode| {
            if mode == SignatureMode::Required && trust.is_empty() {
                Err(InvalidValue::new(
                    key,
                    "required",
                    "a required signature needs a trusted signer: list the publisher's public key or CA certificate (PEM files) in signing.trusted",
                ))
            } else {
                Ok(())
            }
        };
        needs_trust("signing.default", signature_default)?;
        let mut models: Vec<ModelSpec> = Vec::new();
        for (i, m) in file.models.into_iter().enumerate() {
            let key = format!("models[{i}]");
            let name = ModelName::new(&m.name)
                .map_err(|e| InvalidValue::new(&format!("{key}.name"), &m.name, e.to_string()))?;
            if models.iter().any(|x| x.name == name) {
                return Err(InvalidValue::new(
                    &format!("{key}.name"),
                    &m.name,
                    "a model of this name is already configured",
                )
                .into());
            }
            if !(m.source.starts_with("az://")
                || m.source.starts_with("https://")
                || m.source.starts_with("file:///"))
            {
                return Err(InvalidValue::new(
                    &format!("{key}.source"),
                    crate::source::redact_url(&m.source),
                    "expected az://CONTAINER/PREFIX, https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX or file:///PATH",
                )
                .into());
            }
            let selection = Selection::new(&m.include, &m.exclude, m.default_excludes)?;
            let signature = match &m.signature {
                Some(v) => SignatureMode::parse(&format!("{key}.signature"), v)?,
                None => signature_default,
            };
            needs_trust(&format!("{key}.signature"), signature)?;
            let signature_file = m
                .signature_file
                .unwrap_or_else(|| DEFAULT_SIGNATURE_FILE.to_string());
            crate::source::validate_name(&signature_file).map_err(|e| {
                InvalidValue::new(
                    &format!("{key}.signature_file"),
                    &signature_file,
                    e.to_string(),
                )
            })?;
            models.push(ModelSpec {
                name,
                source: m.source,
                account: m.account,
                selection,
                pin: m.pin,
                require_manifest: m.require_manifest,
                signature,
                signature_file,
                trust: Arc::clone(&trust),
            });
        }
        let leases = LeasePolicy {
            check_interval: duration(
                "leases.check_interval",
                &file.leases.check_interval,
                Duration::from_secs(30),
            )?,
            pods_dir: file.leases.pods_dir,
            cgroup_root: file.leases.cgroup_root,
        };
        if let Some(private) = &file.cache.private_mount {
            if !private.is_absolute() || private.starts_with(&file.cache_root) {
                return Err(InvalidValue::new(
                    "cache.private_mount",
                    private.display(),
                    "expected an absolute directory outside cache_root (an emptyDir the agent alone mounts)",
                )
                .into());
            }
        }
        let disk = validate_disk(
            file.disk,
            &file.cache_root,
            &file.cache.proc_root,
            file.cache.private_mount,
        )?;
        Ok(Self {
            disk,
            cache_root: file.cache_root,
            read_addr,
            admin_socket,
            token,
            max_connections: match file.listen.max_connections {
                0 => {
                    return Err(InvalidValue::new(
                        "listen.max_connections",
                        0,
                        "expected at least 1",
                    )
                    .into());
                }
                n => n,
            },
            fetch,
            dragonfly_storage,
            failed_retry_delay,
            budget,
            warm,
            scrub,
            allowed_sources: file.api.allowed_sources,
            leases,
            proc_root: file.cache.proc_root,
            trust,
            trusted_files,
            signature_default,
            models,
        })
    }
}

fn validate_disk(
    d: DiskFile,
    cache_root: &Path,
    proc_root: &Path,
    private_mount: Option<PathBuf>,
) -> Result<crate::disk::DiskConfig, InvalidValue> {
    let member_wait = match &d.member_wait {
        Some(raw) => {
            parse_duration(raw).map_err(|e| InvalidValue::new("disk.member_wait", raw, e))?
        }
        None => Duration::from_secs(120),
    };
    let filesystem = match d.filesystem.as_str() {
        "xfs" => crate::disk::Filesystem::Xfs,
        "ext4" => crate::disk::Filesystem::Ext4,
        other => {
            return Err(InvalidValue::new(
                "disk.filesystem",
                other,
                "expected xfs or ext4",
            ));
        }
    };
    let raid_chunk = parse_size(&d.raid_chunk)
        .map_err(|e| InvalidValue::new("disk.raid_chunk", &d.raid_chunk, e))?;
    if !raid_chunk.is_power_of_two() || raid_chunk < 4096 {
        return Err(InvalidValue::new(
            "disk.raid_chunk",
            &d.raid_chunk,
            "expected a power of two of at least 4KiB",
        ));
    }
    let label_ok = !d.label.is_empty()
        && d.label.len() <= 12
        && d.label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !label_ok {
        return Err(InvalidValue::new(
            "disk.label",
            &d.label,
            "expected 1-12 letters, digits, '-' or '_' (the xfs label limit)",
        ));
    }
    if d.enabled && d.models.is_empty() && d.devices.is_empty() {
        return Err(InvalidValue::new(
            "disk.models",
            "[]",
            "expected model strings or disk.devices when disk.enabled is true",
        ));
    }
    Ok(crate::disk::DiskConfig {
        enabled: d.enabled,
        selector: crate::disk::discover::Selector {
            models: d.models,
            devices: d.devices,
        },
        filesystem,
        raid_chunk,
        label: d.label,
        discard: d.discard,
        host: crate::disk::discover::HostPaths {
            sysfs: d.sysfs_root,
            dev: d.dev_root,
            proc: proc_root.to_path_buf(),
        },
        target: cache_root.to_path_buf(),
        private_mount,
        member_wait,
    })
}

/// Parses `cache.budget`: `90%` or a size such as `500GiB`.
fn parse_budget(raw: &str) -> Result<Budget, InvalidValue> {
    if let Some(pct) = raw.trim().strip_suffix('%') {
        let p: f64 = pct.trim().parse().map_err(|_| {
            InvalidValue::new(
                "cache.budget",
                raw,
                "expected a percentage such as 90% or a size such as 500GiB",
            )
        })?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(InvalidValue::new(
                "cache.budget",
                raw,
                "expected a percentage in (0, 100]",
            ));
        }
        return Ok(Budget::Fraction(p / 100.0));
    }
    parse_size(raw)
        .map(Budget::Bytes)
        .map_err(|e| InvalidValue::new("cache.budget", raw, e))
}

/// Sets a dotted key in a TOML table from an override string.
fn set_key(
    table: &mut toml::Table,
    key: &str,
    kind: Kind,
    raw: &str,
    origin: &str,
) -> Result<(), ConfigError> {
    let value =
        match kind {
            Kind::Text => toml::Value::String(raw.to_string()),
            Kind::Integer => toml::Value::Integer(raw.parse().map_err(|_| {
                InvalidValue::new(origin, raw, format!("expected an integer for {key}"))
            })?),
            Kind::Float => toml::Value::Float(raw.parse().map_err(|_| {
                InvalidValue::new(origin, raw, format!("expected a number for {key}"))
            })?),
            Kind::Bool => toml::Value::Boolean(raw.parse().map_err(|_| {
                InvalidValue::new(origin, raw, format!("expected true or false for {key}"))
            })?),
            Kind::List => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_string()))
                    .collect(),
            ),
        };
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut current = table;
    for part in parts {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => {
                return Err(ConfigError::Parse {
                    origin: origin.to_string(),
                    message: format!("{part} is not a table"),
                });
            }
        };
    }
    current.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn the_default_config_file_is_valid() {
        let c = AgentConfig::from_toml(DEFAULT_CONFIG, "default", &env(&[]), &[]).unwrap();
        assert_eq!(c.fetch.concurrency, 64);
        assert_eq!(c.models.len(), 1);
        assert!(c.models[0].pin);
        assert_eq!(c.admin_socket, Path::new(DEFAULT_ADMIN_SOCKET));
    }

    #[test]
    fn precedence_is_set_then_env_then_file() {
        let file = "[fetch]\nconcurrency = 8\n";
        let c = AgentConfig::from_toml(file, "f", &env(&[]), &[]).unwrap();
        assert_eq!(c.fetch.concurrency, 8);
        let e = env(&[("MODELCACHE_FETCH_CONCURRENCY", "16")]);
        let c = AgentConfig::from_toml(file, "f", &e, &[]).unwrap();
        assert_eq!(c.fetch.concurrency, 16);
        let c = AgentConfig::from_toml(file, "f", &e, &["fetch.concurrency=32".into()]).unwrap();
        assert_eq!(c.fetch.concurrency, 32);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = AgentConfig::from_toml("[fetch]\nconcurency = 8\n", "cm.toml", &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cm.toml") && err.contains("concurency"),
            "{err}"
        );
        let err = AgentConfig::from_toml(
            "",
            "f",
            &env(&[("MODELCACHE_FETCH_CONCURRENCY", "abc")]),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("MODELCACHE_FETCH_CONCURRENCY") && err.contains("abc"),
            "{err}"
        );
        for (admin, why) in [
            ("127.0.0.1:8081", "no longer served on TCP"),
            ("run/admin.sock", "absolute"),
            ("/", "absolute"),
        ] {
            let toml = format!("[listen]\nadmin = \"{admin}\"\n");
            let err = AgentConfig::from_toml(&toml, "f", &env(&[]), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("listen.admin") && err.contains(why), "{err}");
        }
        let long = format!("[listen]\nadmin = \"/{}\"\n", "s".repeat(120));
        let err = AgentConfig::from_toml(&long, "f", &env(&[]), &[]).unwrap_err();
        assert!(err.to_string().contains("at most 107 bytes"), "{err}");
        let err = AgentConfig::from_toml("", "f", &env(&[]), &["nope=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key"), "{err}");
        let err = AgentConfig::from_toml("[cache]\nbudget = \"150%\"\n", "f", &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cache.budget"), "{err}");
        let bad_model = "[[models]]\nname = \"../x\"\nsource = \"az://c/p\"\n";
        let err = AgentConfig::from_toml(bad_model, "f", &env(&[]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("models[0].name"), "{err}");
    }

    #[test]
    fn disk_settings_validate_and_lists_override_from_the_environment() {
        let e = env(&[
            ("MODELCACHE_DISK_DEVICES", "/dev/loop3, /dev/loop4"),
            ("MODELCACHE_DISK_ENABLED", "true"),
        ]);
        let c = AgentConfig::from_toml("", "f", &e, &[]).unwrap();
        assert!(c.disk.enabled);
        assert_eq!(c.disk.selector.devices, ["/dev/loop3", "/dev/loop4"]);
        assert_eq!(c.disk.raid_chunk, 512 * 1024);
        let err = AgentConfig::from_toml(
            "[disk]\nlabel = \"much-too-long-label\"\n",
            "f",
            &env(&[]),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("disk.label"), "{err}");
        let err = AgentConfig::from_toml("[disk]\nfilesystem = \"zfs\"\n", "f", &env(&[]), &[])
            .unwrap_err();
        assert!(err.to_string().contains("disk.filesystem"), "{err}");
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(parse_budget("90%").unwrap(), Budget::Fraction(0.9));
        assert_eq!(parse_budget("1GiB").unwrap(), Budget::Bytes(1 << 30));
        assert!(parse_budget("0%").is_err());
    }

    #[test]
    fn token_is_never_printed() {
        let c =
            AgentConfig::from_toml("", "f", &env(&[("MODELCACHE_TOKEN", "s3cret")]), &[]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            c.token,
            Some(TokenSource::Fixed(Token("s3cret".to_string())))
        );
    }
}
