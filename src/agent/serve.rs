//! Serving a router with connection-level limits, which `axum::serve` does not offer: a client
//! must send its request headers within a few seconds (a slow-loris client otherwise holds a
//! connection as long as it likes), and each listener serves a bounded number of connections at
//! once (one more is closed at accept, so a flood cannot exhaust the agent's file descriptors).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long a client may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is at the other end of a connection: given to every request as an extension.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// For the log: an address, or a socket peer's pid and uid.
    pub shown: String,
    /// A Unix socket peer's process id, as the agent's PID namespace sees it (0: not visible
    /// there); `None` over TCP.
    pub pid: Option<i32>,
}

/// A listener the server accepts connections from: the TCP read listener or a Unix socket.
pub trait Accept {
    /// A connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection, and who it is from.
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, Peer)>> + Send;
    /// Where this listens (for the log).
    fn describe(&self) -> String;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, Peer)> {
        let (stream, peer) = self.accept().await?;
        Ok((
            stream,
            Peer {
                shown: peer.to_string(),
                pid: None,
            },
        ))
    }
    fn describe(&self) -> String {
        self.local_addr().map(|a| a.to_string()).unwrap_or_default()
    }
}

impl Accept for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<(Self::Stream, Peer)> {
        let (stream, _) = self.accept().await?;
        // SO_PEERCRED: the kernel's record of the process that connected, not anything the
        // peer says.
        let peer = stream
            .peer_cred()
            .map(|c| Peer {
                shown: format!("pid {} uid {}", c.pid().unwrap_or(0), c.uid()),
                pid: Some(c.pid().unwrap_or(0)),
            })
            .unwrap_or_default();
        Ok((stream, peer))
    }
    fn describe(&self) -> String {
        self.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_default()
    }
}

/// Serves `router` on `listener` until `stop` fires, then lets requests in flight finish
/// (briefly). At most `max_connections` connections are served at once. Without `keep_alive`
/// each connection serves one request (the readers' socket: a peer's process is looked up for
/// the request it connected for, not for later ones).
pub async fn serve<L: Accept>(
    listener: L,
    router: Router,
    max_connections: usize,
    keep_alive: bool,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut warned = false;
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept_one() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors or a connection reset before accept: keep serving.
                Err(e) => {
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if !warned {
                warn!(peer = %peer.shown, "{max_connections} connections are open on {}: closing new ones until some end (listen.max_connections)", listener.describe());
                warned = true;
            }
            drop(stream);
            continue;
        };
        warned = false;
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                router.clone(),
                move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(peer.clone());
                    request
                },
            ));
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(keep_alive);
        let connection =
            graceful.watch(builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
    Ok(())
}
