//! Configuration types shared by the engine: fetch tuning, file selection, and the process
//! environment captured once.
//!
//! This module owns parsing and validation of user-facing values (sizes, durations, globs) and
//! the defaults. It reads the environment exactly once ([`Environment::capture`]); everything
//! else receives the typed values. Command-line parsing lives in `cli`, which resolves flags into
//! these types; the agent's file lives in [`agent`].

pub mod agent;

use std::collections::BTreeMap;
use std::time::Duration;

use globset::{GlobSet, GlobSetBuilder};

/// Default number of ranged GETs in flight across all files of a model.
///
/// Chosen from `benches/prefetch.rs` and the node's figures: one Blob connection carries about
/// 60–120 MB/s, so filling an 80 Gbps NIC needs on the order of a hundred connections; 64 keeps
/// memory at 64 × 1 MiB of buffers while leaving headroom for several models at once.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default size of one ranged GET (and one BLAKE3 piece).
pub const DEFAULT_CHUNK_SIZE: u64 = 64 * MIB;
/// Whether full blocks are written with `O_DIRECT` by default.
pub const DEFAULT_DIRECT_IO: bool = true;
/// Default number of attempts for one range before the model fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
/// Default time a range may go without receiving a byte before it is cancelled and retried.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest accepted chunk size: BLAKE3 pieces must be whole power-of-two multiples of 1 KiB, and
/// anything below 64 KiB only adds request overhead.
pub const MIN_CHUNK_SIZE: u64 = 64 * KIB;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: u64 = GIB;
/// Globs excluded by default: another model-sized download that vLLM never reads
/// (`original/**`, `metal/**`), and what download tools leave in a model directory (`hf
/// download --local-dir` keeps its bookkeeping, locks and incomplete files under `.cache/`; a
/// git clone has `.git/` and `.gitattributes`).
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "original/**",
    "metal/**",
    ".cache/**",
    ".git/**",
    ".gitattributes",
    ".gitignore",
    "**/*.incomplete",
    "**/*.lock",
];

/// The most a `Retry-After` wait is lengthened by, as a fraction of it.
const RETRY_AFTER_JITTER: f64 = 0.5;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A configuration value that failed validation, naming the key and the raw value.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for {key}: {expected}")]
pub struct InvalidValue {
    /// The flag or key, e.g. `--chunk-size`.
    pub key: String,
    /// The raw value as given.
    pub value: String,
    /// What is allowed.
    pub expected: String,
}

impl InvalidValue {
    pub(crate) fn new(
        key: &str,
        value: impl std::fmt::Display,
        expected: impl Into<String>,
    ) -> Self {
        Self {
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// Parses a byte size such as `64MiB`, `1G`, `512k` or `4096` (binary multiples).
pub fn parse_size(raw: &str) -> Result<u64, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("expected a size such as 64MiB, got {raw:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {raw:?} is too large"))
}

/// Parses a duration such as `30s`, `2m` or `1h 30m`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim()).map_err(|e| format!("{e} (examples: 30s, 2m, 1h)"))
}

/// Formats a byte count for people: `1.23 GB` (decimal units, as network rates are quoted).
pub fn human_bytes(n: u64) -> String {
    #[expect(
        clippy::cast_precision_loss,
        reason = "display only; a few significant digits are shown"
    )]
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kB", f / 1e3)
    } else {
        format!("{n} B")
    }
}

/// How the downloader behaves: parallelism, range size, retries and checks.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Ranged GETs in flight across all files.
    pub concurrency: usize,
    /// Bytes per range; a power of two so BLAKE3 pieces combine.
    pub chunk_size: u64,
    /// Attempts per range (first try included) before the model fails.
    pub max_attempts: u32,
    /// A range receiving no byte for this long is cancelled and retried.
    pub stall_timeout: Duration,
    /// First retry delay; doubled per attempt, with full jitter.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// How many times the whole model restarts from a fresh listing when a blob changed.
    pub max_source_changes: u32,
    /// Hash ranges while downloading. Off only to measure the cost of verification.
    pub hash: bool,
    /// Write full blocks with `O_DIRECT` where the filesystem takes it, around the page cache.
    pub direct_io: bool,
    /// Choose the ranges in flight from measured throughput, with `concurrency` as the ceiling.
    pub adaptive: bool,
    /// Fetch files through Dragonfly's dfdaemon first (off when `None`).
    pub dragonfly: Option<DragonflyOptions>,
}

/// The Dragonfly path: each file asked of the node's dfdaemon, verified by modelcache, and
/// fetched directly whenever that fails.
#[derive(Debug, Clone, PartialEq)]
pub struct DragonflyOptions {
    /// dfdaemon's download socket.
    pub socket: std::path::PathBuf,
    /// Files asked of dfdaemon at once.
    pub concurrent_files: usize,
    /// A file from which no piece arrives for this long is fetched directly instead.
    pub stall_timeout: Duration,
    /// A file arriving slower than this (bytes per second, after `grace`) is fetched directly.
    pub min_rate: u64,
    /// How long a file may take to reach `min_rate`.
    pub grace: Duration,
    /// Clone each piece dfdaemon reports written into modelcache's own file and hash it there
    /// (on), or clone and hash the whole file once dfdaemon is done.
    pub hash_pieces: bool,
    /// Where dfdaemon writes files for modelcache, when it sees the cache filesystem under
    /// another path than modelcache does (another pod); `None`: straight into staging.
    pub exchange: Option<Exchange>,
}

/// One directory on the cache filesystem under the two paths its two users know it by. dfdaemon
/// hard-links each file it downloads into `dfdaemon_dir`, which must be on the same mount as
/// its storage; modelcache reaches it at `local_dir` (without following links) and clones each
/// file from there into staging, which must be on the same filesystem for a reflink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The directory as dfdaemon sees it.
    pub dfdaemon_dir: std::path::PathBuf,
    /// The same directory as modelcache sees it.
    pub local_dir: std::path::PathBuf,
}

impl DragonflyOptions {
    /// The defaults for a socket.
    pub fn new(socket: std::path::PathBuf) -> Self {
        Self {
            socket,
            concurrent_files: 4,
            stall_timeout: Duration::from_secs(30),
            min_rate: 50_000_000,
            grace: Duration::from_secs(20),
            hash_pieces: true,
            exchange: None,
        }
    }
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_source_changes: 3,
            hash: true,
            direct_io: DEFAULT_DIRECT_IO,
            adaptive: true,
            dragonfly: None,
        }
    }
}

impl FetchOptions {
    /// The delay before retry `attempt` (1-based): the server's `Retry-After` when it sent one
    /// (plus up to half again, so throttled ranges do not return together), otherwise exponential backoff with full jitter, capped at `backoff_max`.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            // Never sooner than the server asked, but spread over up to half as long again:
            // ranges throttled by one answer must not all come back in the same instant.
            return d + d.mul_f64(fastrand::f64() * RETRY_AFTER_JITTER);
        }
        self.backoff_base
            .saturating_mul(1u32 << attempt.clamp(1, 17).saturating_sub(1))
            .min(self.backoff_max)
            .mul_f64(fastrand::f64())
    }

    /// Checks every value against its allowed range, naming the flag on failure.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if self.concurrency == 0 || self.concurrency > 4096 {
            return Err(InvalidValue::new(
                "--concurrency",
                self.concurrency,
                "expected an integer from 1 to 4096",
            ));
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(InvalidValue::new(
                "--chunk-size",
                self.chunk_size,
                "expected a power of two from 64KiB to 1GiB (BLAKE3 pieces must combine)",
            ));
        }
        if self.max_attempts == 0 {
            return Err(InvalidValue::new(
                "--max-attempts",
                self.max_attempts,
                "expected at least 1",
            ));
        }
        if self.stall_timeout.is_zero() {
            return Err(InvalidValue::new(
                "--stall-timeout",
                "0s",
                "expected a positive duration",
            ));
        }
        Ok(())
    }
}

/// Which files of a source prefix make up the model.
#[derive(Debug, Clone)]
pub struct Selection {
    include: GlobSet,
    exclude: GlobSet,
    patterns: (Vec<String>, Vec<String>),
}

impl Selection {
    /// Builds a selection; an empty `include` means every file. `default_excludes` adds
    /// [`DEFAULT_EXCLUDES`].
    pub fn new(
        include: &[String],
        exclude: &[String],
        default_excludes: bool,
    ) -> Result<Self, InvalidValue> {
        let include: Vec<String> = if include.is_empty() {
            vec!["**".to_string()]
        } else {
            include.to_vec()
        };
        let mut excludes: Vec<String> = Vec::new();
        if default_excludes {
            excludes.extend(DEFAULT_EXCLUDES.iter().map(|s| (*s).to_string()));
        }
        excludes.extend(exclude.iter().cloned());
        Ok(Self {
            include: build_globs("--include", &include)?,
            exclude: build_globs("--exclude", &excludes)?,
            patterns: (include, excludes),
        })
    }

    /// The default selection for vLLM: everything but [`DEFAULT_EXCLUDES`].
    pub fn vllm_default() -> Self {
        // The default patterns are constants known to compile.
        Self::new(&[], &[], true).unwrap_or_else(|_| unreachable!("default globs are valid"))
    }

    /// Whether a relative, `/`-separated path belongs to the model.
    pub fn is_selected(&self, path: &str) -> bool {
        self.include.is_match(path) && !self.exclude.is_match(path)
    }

    /// The include and exclude patterns, for summaries and the ready marker.
    pub fn patterns(&self) -> (&[String], &[String]) {
        (&self.patterns.0, &self.patterns.1)
    }
}

fn build_globs(key: &str, patterns: &[String]) -> Result<GlobSet, InvalidValue> {
    let mut builder = GlobSetBuilder::new();
    for p in patterns {
        let glob = globset::GlobBuilder::new(p)
            .literal_separator(true)
            .build()
            .map_err(|e| InvalidValue::new(key, p, format!("expected a glob: {e}")))?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| InvalidValue::new(key, patterns.join(","), e.to_string()))
}

/// The process environment, read once at start-up.
///
/// Only the variables this program understands are kept: `AZURE_*` (handed to the Azure
/// client's configuration), `AZURITE_BLOB_STORAGE_URL`, `MSI_ENDPOINT`, and `MODELCACHE_*`
/// (configuration overrides).
#[derive(Clone, Default)]
pub struct Environment {
    azure: BTreeMap<String, String>,
    modelcache: BTreeMap<String, String>,
}

impl std::fmt::Debug for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values can be account keys or SAS tokens: print the names only.
        f.debug_struct("Environment")
            .field("azure_keys", &self.azure.keys().collect::<Vec<_>>())
            .field(
                "modelcache_keys",
                &self.modelcache.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Environment {
    /// Reads the process environment. Call once, in the binary.
    pub fn capture() -> Self {
        Self::from_pairs(std::env::vars())
    }

    /// Builds an environment from explicit pairs (tests pass a map here).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut env = Self::default();
        for (k, v) in pairs {
            if k.starts_with("AZURE_") || k == "AZURITE_BLOB_STORAGE_URL" || k == "MSI_ENDPOINT" {
                env.azure.insert(k, v);
            } else if k.starts_with("MODELCACHE_") {
                env.modelcache.insert(k, v);
            }
        }
        env
    }

    /// A `MODELCACHE_*` variable's value.
    pub fn modelcache(&self, key: &str) -> Option<&str> {
        self.modelcache.get(key).map(String::as_str)
    }

    /// The Azure-related variables, by name.
    pub fn azure(&self) -> &BTreeMap<String, String> {
        &self.azure
    }

    /// One variable's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.azure.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_size("64m"), Ok(64 * MIB));
        assert_eq!(parse_size("1G"), Ok(GIB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn backoff_honours_retry_after_and_stays_under_the_cap() {
        let o = FetchOptions::default();
        let asked = Duration::from_secs(7);
        let waits: Vec<Duration> = (0..200).map(|_| o.backoff(3, Some(asked))).collect();
        assert!(
            waits
                .iter()
                .all(|w| *w >= asked && *w <= asked.mul_f64(1.5)),
            "{waits:?}"
        );
        let spread = *waits.iter().max().unwrap() - *waits.iter().min().unwrap();
        assert!(
            spread > Duration::from_secs(1),
            "retries after one Retry-After must spread out: {waits:?}"
        );
        for attempt in [1, 2, 10, 40] {
            assert!(o.backoff(attempt, None) <= o.backoff_max);
        }
        assert!(o.backoff(1, None) <= o.backoff_base);
    }

    #[test]
    fn chunk_size_must_be_a_power_of_two_in_range() {
        let mut o = FetchOptions {
            chunk_size: 3 * MIB,
            ..FetchOptions::default()
        };
        let err = o.validate().unwrap_err();
        assert!(err.to_string().contains("--chunk-size"), "{err}");
        o.chunk_size = 32 * KIB;
        assert!(o.validate().is_err());
        o.chunk_size = MIB;
        assert!(o.validate().is_ok());
        o.concurrency = 0;
        assert!(o.validate().is_err());
    }

    #[test]
    fn default_selection_skips_original_and_metal_only() {
        let s = Selection::vllm_default();
        assert!(s.is_selected("model-00000-of-00014.safetensors"));
        assert!(s.is_selected("config.json"));
        assert!(!s.is_selected("original/model--00001-of-00007.safetensors"));
        assert!(!s.is_selected("metal/model.bin"));
        // A nested folder named like an excluded one is still selected.
        assert!(s.is_selected("sub/original/x"));
    }

    #[test]
    fn include_narrows_and_exclude_adds() {
        let s = Selection::new(&["*.safetensors".into()], &["model-0001*".into()], true).unwrap();
        assert!(s.is_selected("model-00000-of-00014.safetensors"));
        assert!(!s.is_selected("model-00010-of-00014.safetensors"));
        assert!(!s.is_selected("config.json"));
        // `*` does not cross `/`.
        assert!(!s.is_selected("dir/a.safetensors"));
    }

    #[test]
    fn bad_glob_names_the_flag() {
        let err = Selection::new(&["a[".into()], &[], true).unwrap_err();
        assert!(err.to_string().contains("--include"), "{err}");
    }

    #[test]
    fn environment_keeps_only_azure_variables() {
        let env = Environment::from_pairs([
            (
                "AZURE_STORAGE_ACCOUNT_KEY".to_string(),
                "secret".to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
        ]);
        assert_eq!(env.get("AZURE_STORAGE_ACCOUNT_KEY"), Some("secret"));
        assert_eq!(env.get("HOME"), None);
        assert!(!format!("{env:?}").contains("secret"));
    }
}
