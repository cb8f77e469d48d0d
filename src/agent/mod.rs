//! The node agent (`modelcache agent`): the composition root. It builds the model registry from
//! the configuration, serves the HTTP API on the read address and the admin socket, and on SIGTERM or
//! SIGINT stops accepting requests, cancels prefetches (their finished ranges are journaled) and
//! exits within a few seconds.

pub mod auth;
pub mod http;
pub mod metrics;
pub mod models;
pub mod pods;
pub mod reload;
mod serve;
pub mod signing;
pub mod socket;
pub mod sources;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Environment;
use crate::config::agent::AgentConfig;
use http::AppState;

/// The readers' socket, in the cache root.
pub const READERS_SOCKET: &str = "readers.sock";
use models::{ModelError, Models};

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A listener could not be bound.
    #[error("failed to listen on {addr} ({key})")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The configuration key.
        key: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The admin socket could not be served.
    #[error(transparent)]
    AdminSocket(#[from] socket::SocketError),
    /// The cache could not be prepared.
    #[error("failed to prepare the cache: {0}")]
    Cache(#[from] ModelError),
    /// Serving failed.
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// Where the agent listens (useful when the configuration asked for port 0).
#[derive(Debug, Clone)]
pub struct Listening {
    /// The read address.
    pub read: std::net::SocketAddr,
    /// The admin socket.
    pub admin: std::path::PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT; with `source`, the file's later changes are applied
/// as they come (see [`reload`]).
pub async fn run(
    config: AgentConfig,
    env: Environment,
    source: Option<reload::ConfigSource>,
) -> Result<(), AgentError> {
    let stop = CancellationToken::new();
    let signals = {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::signal::terminated().await;
            info!("shutting down: cancelling prefetches (finished ranges stay journaled)");
            stop.cancel();
        })
    };
    let result = serve(config, env, source, stop, |_| {}).await;
    signals.abort();
    result
}

async fn bind(addr: std::net::SocketAddr, key: &'static str) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { addr, key, source })
}

/// The disk setup as the API reports it.
#[derive(Debug, Clone)]
pub enum DiskStatus {
    /// `disk.enabled = false`: the cache root is used as it is.
    Disabled,
    /// Running (a first mkfs of a large array takes a while).
    InProgress,
    /// Done: what was found and done.
    Ready(crate::disk::Report),
    /// Failed: why, on one line. No model is fetched.
    Failed(String),
}

/// Runs the agent until `stop` is cancelled, calling `listening` once both listeners are bound.
///
/// The listeners serve from the start, before disk setup: `/healthz` answers while a slow mkfs
/// runs (so a liveness probe does not kill the agent), and `/readyz` says what it waits for.
pub async fn serve(
    config: AgentConfig,
    env: Environment,
    source: Option<reload::ConfigSource>,
    stop: CancellationToken,
    listening: impl FnOnce(Listening),
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let config_status = Arc::new(std::sync::RwLock::new(reload::ConfigStatus {
        file: source.as_ref().map(|s| s.path.display().to_string()),
        ..reload::ConfigStatus::default()
    }));
    let read = bind(config.read_addr, "listen.read").await?;
    // Removed when the agent returns, whatever the reason.
    let (admin, _admin_file) = socket::bind(&config.admin_socket)?;
    let disk = Arc::new(std::sync::RwLock::new(if config.disk.enabled {
        DiskStatus::InProgress
    } else {
        DiskStatus::Disabled
    }));
    let models = Models::waiting(Arc::clone(&config), env.clone(), "disk setup in progress");
    let dragonfly = Arc::new(std::sync::RwLock::new(
        config
            .fetch
            .dragonfly
            .is_some()
            .then(|| "checking whether URLs can be signed for dfdaemon".to_string()),
    ));
    if config.fetch.dragonfly.is_some() {
        let (config, env, shown) = (Arc::clone(&config), env.clone(), Arc::clone(&dragonfly));
        let stop = stop.clone();
        // Asked again while unusable: a role assignment takes minutes to reach the storage
        // service, and the operator should not have to restart every agent for it.
        tokio::spawn(async move {
            let mut last = None;
            while let Some(found) = signing::check(&config, &env).await {
                if last.as_ref() != Some(&found.line) {
                    if found.usable {
                        info!("dragonfly: {found}");
                    } else {
                        tracing::warn!("dragonfly: {found}");
                    }
                }
                *shown.write().unwrap_or_else(|p| p.into_inner()) = Some(found.line.clone());
                if found.usable {
                    break;
                }
                last = Some(found.line);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(signing::RECHECK_INTERVAL) => {}
                }
            }
        });
    }
    let state = AppState {
        models: Arc::clone(&models),
        disk: Arc::clone(&disk),
        config: Arc::clone(&config_status),
        dragonfly,
        listener: http::Listener::Read,
    };
    let read_addr = read.local_addr().map_err(AgentError::Serve)?;
    info!(
        listen.read = %read_addr,
        listen.admin = %config.admin_socket.display(),
        cache_root = %config.cache_root.display(),
        models = config.models.len(),
        "agent listening on {read_addr} (read) and {} (admin), cache {}",
        config.admin_socket.display(),
        config.cache_root.display()
    );
    listening(Listening {
        read: read_addr,
        admin: config.admin_socket.clone(),
    });
    let read_server = serve::serve(
        read,
        http::read_router(state.clone(), config.token.clone().map(auth::Bearer::new)),
        config.max_connections,
        true,
        stop.clone(),
    );
    let readers = (state.clone(), config.max_connections);
    let admin_server = serve::serve(
        admin,
        http::admin_router(state),
        config.max_connections,
        true,
        stop.clone(),
    );
    let mut servers = tokio::spawn(async move { tokio::try_join!(read_server, admin_server) });
    let setup = settle_disks(
        Arc::clone(&config),
        Arc::clone(&disk),
        Arc::clone(&models),
        stop.clone(),
        source.map(|source| (source, env, config_status)),
        readers,
    );
    tokio::pin!(setup);
    let mut setup_done = false;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            result = &mut setup, if !setup_done => {
                setup_done = true;
                if let Err(e) = result {
                    stop.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(2), &mut servers).await;
                    models.shutdown(Duration::from_secs(5)).await;
                    return Err(e);
                }
            }
            result = &mut servers => {
                // A server ended before any signal: that is a failure to serve.
                stop.cancel();
                models.shutdown(Duration::from_secs(5)).await;
                return match result {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(AgentError::Serve(e)),
                    Err(e) => Err(AgentError::Serve(std::io::Error::other(e))),
                };
            }
        }
    }
    // Let in-flight requests finish, briefly.
    let _ = tokio::time::timeout(Duration::from_secs(2), servers).await;
    models.shutdown(Duration::from_secs(5)).await;
    info!("agent stopped");
    Ok(())
}

/// Sets up the cache disks (when enabled), records the outcome for the API, then lets the
/// models start (and the background scrub, when on): on failure they stay pending and nothing
/// is written to the cache root.
async fn settle_disks(
    config: Arc<AgentConfig>,
    disk: Arc<std::sync::RwLock<DiskStatus>>,
    models: Arc<Models>,
    stop: CancellationToken,
    reload: Option<(
        reload::ConfigSource,
        Environment,
        Arc<std::sync::RwLock<reload::ConfigStatus>>,
    )>,
    (readers_state, max_connections): (AppState, usize),
) -> Result<(), AgentError> {
    let mut blocked = None;
    let mut status = None;
    if !config.disk.enabled && config.disk.private_mount.is_some() {
        // No disk setup, but consumers still get a read-only view of the cache root.
        let disk_config = config.disk.clone();
        let outcome = tokio::task::spawn_blocking(move || crate::disk::view::expose(&disk_config))
            .await
            .map_err(|e| AgentError::Serve(std::io::Error::other(e)))?;
        if let Err(e) = outcome {
            let line = crate::fetch::error_chain(&e);
            tracing::error!(
                "the read-only view of the cache failed; no model will be fetched: {line}"
            );
            blocked = Some(line);
        }
    }
    if config.disk.enabled {
        let disk_config = config.disk.clone();
        let arrays = crate::disk::apply::Mdadm {
            dev: disk_config.host.dev.clone(),
        };
        let started = std::time::Instant::now();
        let stopping = stop.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            crate::disk::apply(&disk_config, &arrays, &|| stopping.is_cancelled())
        })
        .await
        .map_err(|e| AgentError::Serve(std::io::Error::other(e)))?;
        status = Some(match outcome {
            Ok(report) => {
                for note in &report.plan.notes {
                    tracing::warn!("disk: {note}");
                }
                info!(
                    device = report.mounted.as_deref().unwrap_or(""),
                    duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "cache disks ready: {} mounted at {} in {:.1} s",
                    report.mounted.as_deref().unwrap_or("?"),
                    config.cache_root.display(),
                    started.elapsed().as_secs_f64()
                );
                DiskStatus::Ready(report)
            }
            Err(e) => {
                let line = crate::fetch::error_chain(&e);
                tracing::error!("disk setup failed; no model will be fetched: {line}");
                blocked = Some(line.clone());
                DiskStatus::Failed(line)
            }
        });
    }
    let accepting = blocked.is_none();
    if let (true, Some(host_path)) = (accepting, config.dragonfly_storage.clone()) {
        let (disk_config, writable) = (config.disk.clone(), config.writable_root());
        let outcome = tokio::task::spawn_blocking(move || {
            crate::disk::view::share_dragonfly_storage(&disk_config, &writable, &host_path)
        })
        .await
        .map_err(|e| AgentError::Serve(std::io::Error::other(e)))?;
        match outcome {
            Ok(shared) => info!(
                "Dragonfly's client can keep its storage on the cache filesystem at {}",
                shared.storage.display()
            ),
            // Models still come: each file dfdaemon cannot hand over is fetched directly.
            Err(e) => tracing::error!(
                "dfdaemon's storage cannot be shown on the cache filesystem; files it cannot hard-link into the cache are fetched directly: {}",
                crate::fetch::error_chain(&e)
            ),
        }
    }
    models.activate(blocked).map_err(AgentError::Cache)?;
    // Published after the models are activated: whoever sees the disk settled can prefetch.
    if let Some(status) = status {
        *disk.write().unwrap_or_else(|p| p.into_inner()) = status;
    }
    if accepting {
        info!("leases: {}", models.describe_pods());
        // On the cache filesystem, so only once it is mounted; pods see it in their read-only
        // view of the cache.
        let path = models.layout().root().join(READERS_SOCKET);
        match socket::bind_readers(&path) {
            Ok((listener, file)) => {
                info!(path = %path.display(), "readers' socket at {} (a reader's pod is told from its process)", path.display());
                let stop = stop.clone();
                tokio::spawn(async move {
                    let _file = file;
                    let router = http::readers_router(readers_state);
                    if let Err(e) =
                        serve::serve(listener, router, max_connections, false, stop).await
                    {
                        tracing::error!("the readers' socket failed: {e}");
                    }
                });
            }
            Err(e) => tracing::error!(
                "readers cannot be identified from their process (they may still name their pod on the read listener): {e}"
            ),
        }
        tokio::spawn(Arc::clone(&models).maintain(stop.clone()));
        if let Some((source, env, status)) = reload {
            tokio::spawn(reload::watch(
                Arc::clone(&models),
                Arc::clone(&config),
                source,
                env,
                status,
                stop.clone(),
            ));
        }
    }
    if let (true, Some(policy)) = (accepting, config.scrub) {
        info!(
            "background scrub: every {} at up to {}/s",
            humantime::format_duration(policy.interval),
            crate::config::human_bytes(policy.rate)
        );
        tokio::spawn(Arc::clone(&models).scrub(policy, stop));
    }
    info!(
        "cache settled: {}",
        if accepting {
            "models are being prefetched"
        } else {
            "no model is fetched until the disks are fixed"
        }
    );
    Ok(())
}
