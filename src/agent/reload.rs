//! Configuration changes while the agent runs.
//!
//! A ConfigMap mounted as a volume is updated in place: the kubelet writes the new files beside
//! the old ones and swaps a `..data` symlink, about a minute after the edit. The agent reads its
//! file every few seconds and, when its contents change:
//! - a file that does not parse, or names a bad value, is refused with the reason in the log and
//!   in `GET /v1/config`, and the running configuration is kept;
//! - model changes are applied at once ([`Models::reconcile`]): added models are fetched,
//!   removed ones are no longer refreshed nor pinned (they stay until evicted), changed ones
//!   take their new settings, and are fetched again when what they are changed (source,
//!   selection, manifest requirement);
//! - every other setting takes effect at the next start: each changed one is named in the log
//!   and in `GET /v1/config` (and so in `modelcache status`).
//!
//! The environment and `--set` overrides the agent started with still apply on top of the
//! file.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::models::Models;
use crate::config::Environment;
use crate::config::agent::AgentConfig;

/// How often the file is read again.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The file the agent's configuration came from, and what it was started with.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file (a ConfigMap volume's symlink is followed at every read).
    pub path: PathBuf,
    /// `--set` overrides, applied on top of every version of the file.
    pub sets: Vec<String>,
    /// The BLAKE3 of the contents the running configuration was loaded from.
    pub loaded: blake3::Hash,
}

/// The configuration as `GET /v1/config` reports it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    /// The file, if the agent was started from one.
    pub file: Option<String>,
    /// When its contents last changed and were taken or refused, RFC 3339.
    pub changed_at: Option<String>,
    /// Settings the file changes that take effect only when the agent restarts.
    pub restart_needed: Vec<String>,
    /// Why the file's current contents were refused; the running configuration is kept.
    pub refused: Option<String>,
}

/// Watches `source` until `stop` fires, applying what can be applied.
pub async fn watch(
    models: Arc<Models>,
    running: Arc<AgentConfig>,
    source: ConfigSource,
    env: Environment,
    status: Arc<RwLock<ConfigStatus>>,
    stop: CancellationToken,
) {
    // The trusted signers' PEM files count as part of the file: a key removed from its own
    // ConfigMap is noticed like an edit of the configuration.
    let mut trusted_files = running.trusted_files.clone();
    let mut settle = Settle::new(with_files(source.loaded, &trusted_files).await);
    let mut unreadable = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let text = match tokio::fs::read_to_string(&source.path).await {
            Ok(text) => {
                unreadable = false;
                text
            }
            Err(e) => {
                // A ConfigMap's symlinks are swapped, not rewritten; a read between the two
                // renames can miss the file. Said once; tried again next time.
                if !unreadable {
                    warn!(path = %source.path.display(), "cannot read the configuration file {}: {e}; the running configuration is kept", source.path.display());
                    unreadable = true;
                }
                continue;
            }
        };
        match settle.observe(with_files(blake3::hash(text.as_bytes()), &trusted_files).await) {
            Observed::Unchanged => continue,
            Observed::Settling => {
                info!(path = %source.path.display(), "the configuration file changed; applied once it reads the same {} from now", humantime::format_duration(CHECK_EVERY));
                continue;
            }
            Observed::Settled => {}
        }
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let origin = source.path.display().to_string();
        let parsed = AgentConfig::from_toml(&text, &origin, &env, &source.sets);
        let new = match parsed {
            Ok(new) => new,
            Err(e) => {
                let why = crate::fetch::error_chain(&e);
                error!(path = %origin, "the configuration file changed but is refused; the running configuration is kept: {why}");
                let mut s = status.write().unwrap_or_else(|p| p.into_inner());
                s.refused = Some(why);
                s.changed_at = Some(now);
                continue;
            }
        };
        let restart = restart_needed(&running, &new);
        // Watched from the next read on: the files this version names (a changed list reads
        // as one more change, applied as a no-op).
        trusted_files.clone_from(&new.trusted_files);
        if restart.is_empty() {
            info!(path = %origin, "the configuration file changed: applying its models");
        } else {
            warn!(path = %origin, "the configuration file changed: applying its models; {} take effect when the agent restarts", restart.join(", "));
        }
        let applied = models.reconcile(new.models).await;
        for line in applied.lines() {
            info!("configuration: {line}");
        }
        let mut s = status.write().unwrap_or_else(|p| p.into_inner());
        s.refused = None;
        s.restart_needed = restart;
        s.changed_at = Some(now);
    }
}

/// The configuration's hash with the contents of the files it names (a file that cannot be
/// read counts as such, so its return is a change too).
async fn with_files(text: blake3::Hash, files: &[std::path::PathBuf]) -> blake3::Hash {
    let mut all = blake3::Hasher::new();
    all.update(text.as_bytes());
    for path in files {
        all.update(path.as_os_str().as_encoded_bytes());
        match tokio::fs::read(path).await {
            Ok(bytes) => all.update(blake3::hash(&bytes).as_bytes()),
            Err(_) => all.update(b"\0unreadable"),
        };
    }
    all.finalize()
}

/// What one read of the file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Observed {
    /// The contents last applied (or refused).
    Unchanged,
    /// New contents, not yet read twice in a row: wait one more interval.
    Settling,
    /// New contents read the same twice in a row: take them.
    Settled,
}

/// Takes new contents only once two reads one interval apart agree, so a file written in
/// place is never applied half-written.
#[derive(Debug)]
struct Settle {
    taken: blake3::Hash,
    candidate: Option<blake3::Hash>,
}

impl Settle {
    fn new(taken: blake3::Hash) -> Self {
        Self {
            taken,
            candidate: None,
        }
    }

    fn observe(&mut self, read: blake3::Hash) -> Observed {
        if read == self.taken {
            self.candidate = None;
            return Observed::Unchanged;
        }
        if self.candidate == Some(read) {
            self.taken = read;
            self.candidate = None;
            return Observed::Settled;
        }
        self.candidate = Some(read);
        Observed::Settling
    }
}

/// The settings other than models that differ, by the file's section or key.
pub fn restart_needed(running: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        // Debug forms stand for equality: several of these types carry no PartialEq, and their
        // secrets print redacted on both sides alike.
        format!("{a:?}") != format!("{b:?}")
    }
    let checks: [(&str, bool); 11] = [
        ("cache_root", running.cache_root != new.cache_root),
        (
            "listen",
            running.read_addr != new.read_addr
                || running.admin_socket != new.admin_socket
                || running.max_connections != new.max_connections
                || differs(&running.token, &new.token),
        ),
        (
            "fetch",
            differs(&running.fetch, &new.fetch)
                || running.failed_retry_delay != new.failed_retry_delay,
        ),
        ("cache.budget", differs(&running.budget, &new.budget)),
        ("cache.warm_page_cache", differs(&running.warm, &new.warm)),
        ("cache.scrub", differs(&running.scrub, &new.scrub)),
        (
            "api.allowed_sources",
            running.allowed_sources != new.allowed_sources,
        ),
        ("leases", running.leases != new.leases),
        (
            "cache.private_mount",
            running.disk.private_mount != new.disk.private_mount,
        ),
        ("disk", differs(&disk_alone(running), &disk_alone(new))),
        (
            // Configured models take the new trust at once; requests for other models, and
            // models found published at start, keep the running one.
            "signing (for models not configured)",
            running.signature_default != new.signature_default
                || !crate::fetch::signed::same_trust(&running.trust, &new.trust),
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key.to_string())
        .collect()
}

/// The `[disk]` settings, without the private mount (its own key above).
fn disk_alone(config: &AgentConfig) -> crate::disk::DiskConfig {
    let mut disk = config.disk.clone();
    disk.private_mount = None;
    disk
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25: contents are taken only when two reads in a row agree: a half-written file
    /// read once is never applied, whatever follows it.
    #[test]
    fn issue25_a_half_written_file_is_never_applied() {
        let (old, half, full) = (
            blake3::hash(b"old"),
            blake3::hash(b"[[models]]\nname = "),
            blake3::hash(b"[[models]]\nname = \"m\""),
        );
        let mut settle = Settle::new(old);
        assert_eq!(settle.observe(old), Observed::Unchanged);
        assert_eq!(settle.observe(half), Observed::Settling);
        assert_eq!(settle.observe(full), Observed::Settling);
        assert_eq!(settle.observe(full), Observed::Settled);
        assert_eq!(settle.observe(full), Observed::Unchanged);
        // Edited back before it settled: nothing was taken in between.
        assert_eq!(settle.observe(half), Observed::Settling);
        assert_eq!(settle.observe(full), Observed::Unchanged);
        assert_eq!(settle.observe(half), Observed::Settling);
        assert_eq!(settle.observe(half), Observed::Settled);
    }
}
