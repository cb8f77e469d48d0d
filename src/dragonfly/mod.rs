//! A client of Dragonfly's node daemon, `dfdaemon`, over its Unix socket: one
//! `DfdaemonDownload.DownloadTask` per file, read as a stream of events.
//!
//! Dragonfly moves the bytes (from a peer that has them, or back to the source); modelcache
//! keeps everything else: which bytes (the manifest), the credentials, BLAKE3 on every byte, the
//! publish. This module only speaks the protocol; what to do with a file dfdaemon wrote is the
//! fetch engine's business.

pub mod proto;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use proto::download_task_response::Response;

/// Where a piece's bytes came from, as dfdaemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Another node's dfdaemon, or this daemon's own cache of the task.
    Peer,
    /// dfdaemon read the source itself ("back to source").
    BackToSource,
}

/// One event of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The task's length is known; `complete` when the daemon already held every piece.
    Started {
        /// The task's length in bytes.
        content_length: u64,
        /// The daemon held the whole task before this download.
        complete: bool,
    },
    /// A piece is in the task's file (and so in the output path's hard link).
    Piece {
        /// Its number.
        number: u32,
        /// First byte.
        offset: u64,
        /// Length.
        length: u64,
        /// Where its bytes came from.
        origin: Origin,
    },
}

/// Why dfdaemon could not be used; each one makes modelcache fetch the file itself.
#[derive(Debug, thiserror::Error)]
pub enum DragonflyError {
    /// No socket at the configured path: dfdaemon is not running on this node, or its socket
    /// is not mounted into the agent's pod.
    #[error(
        "no dfdaemon socket at {socket} (hint: is Dragonfly's client DaemonSet running on this node, and its socket directory mounted into modelcache's pod?)"
    )]
    Absent {
        /// The configured socket.
        socket: PathBuf,
    },
    /// The socket is there but nothing answers on it.
    #[error("dfdaemon does not answer on {socket}")]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// dfdaemon answered with an error.
    #[error("dfdaemon refused or failed the download: {code:?}: {message}")]
    Failed {
        /// The gRPC status code.
        code: tonic::Code,
        /// dfdaemon's message.
        message: String,
    },
    /// The stream broke or went silent.
    #[error("no answer from dfdaemon for {0:?}")]
    Silent(Duration),
    /// dfdaemon said something that makes no sense for the request.
    #[error("dfdaemon answered out of protocol: {0}")]
    Protocol(String),
}

impl From<tonic::Status> for DragonflyError {
    fn from(status: tonic::Status) -> Self {
        DragonflyError::Failed {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

/// One file to download through dfdaemon.
#[derive(Clone)]
pub struct TaskRequest {
    /// The URL dfdaemon reads on a back-to-source download, with its credentials (a SAS):
    /// never logged.
    pub url: String,
    /// What the task id is computed from (the file's BLAKE3 from the manifest), so that every
    /// node asking for these bytes joins the same task whatever its URL's signature.
    pub content_id: String,
    /// Where dfdaemon puts the file: a name in the model's staging directory.
    pub output_path: PathBuf,
    /// How long dfdaemon may take for the whole file.
    pub timeout: Duration,
}

impl std::fmt::Debug for TaskRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskRequest")
            .field("url", &crate::source::redact_url(&self.url))
            .field("content_id", &self.content_id)
            .field("output_path", &self.output_path)
            .finish_non_exhaustive()
    }
}

/// A connection to one dfdaemon.
#[derive(Debug, Clone)]
pub struct Dfdaemon {
    channel: tonic::transport::Channel,
}

impl Dfdaemon {
    /// Connects to the daemon's download socket.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, DragonflyError> {
        if !socket.exists() {
            return Err(DragonflyError::Absent {
                socket: socket.to_path_buf(),
            });
        }
        let path = socket.to_path_buf();
        // The URI is a placeholder the connector ignores: every connection is to the socket.
        let channel = tonic::transport::Endpoint::from_static("http://dfdaemon.invalid")
            .connect_timeout(timeout)
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| DragonflyError::Unreachable {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self { channel })
    }

    /// Starts one `DownloadTask`; read its events with [`TaskStream::next`]. Dropping the
    /// stream cancels the download as far as modelcache is concerned.
    pub async fn download(&self, task: &TaskRequest) -> Result<TaskStream, DragonflyError> {
        let request = proto::DownloadTaskRequest {
            download: Some(proto::Download {
                url: task.url.clone(),
                output_path: Some(task.output_path.to_string_lossy().into_owned()),
                timeout: Some(prost_types::Duration {
                    seconds: i64::try_from(task.timeout.as_secs()).unwrap_or(i64::MAX),
                    nanos: 0,
                }),
                content_for_calculating_task_id: Some(task.content_id.clone()),
                // The file is hashed in place as its pieces land: a copy made only at the end
                // (dfdaemon's fallback when it cannot hard-link) is still hashed, afterwards.
                force_hard_link: false,
                overwrite: true,
                ..proto::Download::default()
            }),
        };
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| DragonflyError::Failed {
            code: tonic::Code::Unavailable,
            message: e.to_string(),
        })?;
        let codec = tonic_prost::ProstCodec::<
            proto::DownloadTaskRequest,
            proto::DownloadTaskResponse,
        >::default();
        let response = grpc
            .server_streaming(
                tonic::Request::new(request),
                http::uri::PathAndQuery::from_static(proto::DOWNLOAD_TASK),
                codec,
            )
            .await?;
        Ok(TaskStream {
            inner: response.into_inner(),
            task_id: String::new(),
        })
    }

    /// Makes this daemon drop its copy of a task (`DeleteLocalTask`), so that it stops serving
    /// it to peers.
    pub async fn delete_local_task(&self, task_id: &str) -> Result<(), DragonflyError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| DragonflyError::Failed {
            code: tonic::Code::Unavailable,
            message: e.to_string(),
        })?;
        let codec = tonic_prost::ProstCodec::<proto::DeleteLocalTaskRequest, ()>::default();
        grpc.unary(
            tonic::Request::new(proto::DeleteLocalTaskRequest {
                task_id: task_id.to_string(),
            }),
            http::uri::PathAndQuery::from_static(proto::DELETE_LOCAL_TASK),
            codec,
        )
        .await?;
        Ok(())
    }
}

/// The events of one download.
#[derive(Debug)]
pub struct TaskStream {
    inner: tonic::Streaming<proto::DownloadTaskResponse>,
    task_id: String,
}

impl TaskStream {
    /// The task's id, as dfdaemon named it in its answers (empty before the first).
    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The next event; `None` when dfdaemon says the download is complete. Fails when nothing
    /// arrives for `silence`.
    pub async fn next(&mut self, silence: Duration) -> Result<Option<Event>, DragonflyError> {
        loop {
            let message = tokio::time::timeout(silence, self.inner.message())
                .await
                .map_err(|_| DragonflyError::Silent(silence))??;
            let Some(message) = message else {
                return Ok(None);
            };
            if self.task_id.is_empty() {
                self.task_id = message.task_id.clone();
            }
            match message.response {
                Some(Response::DownloadTaskStartedResponse(started)) => {
                    return Ok(Some(Event::Started {
                        content_length: started.content_length,
                        complete: started.is_finished,
                    }));
                }
                Some(Response::DownloadPieceFinishedResponse(finished)) => {
                    let piece = finished.piece.ok_or_else(|| {
                        DragonflyError::Protocol("a finished-piece answer without its piece".into())
                    })?;
                    let origin = match piece.traffic_type {
                        Some(proto::TRAFFIC_REMOTE_PEER | proto::TRAFFIC_LOCAL_PEER) => {
                            Origin::Peer
                        }
                        _ => Origin::BackToSource,
                    };
                    return Ok(Some(Event::Piece {
                        number: piece.number,
                        offset: piece.offset,
                        length: piece.length,
                        origin,
                    }));
                }
                // A newer daemon's answer this version does not know: nothing to act on.
                None => {}
            }
        }
    }
}
