//! The part of Dragonfly's `dfdaemon.v2` and `common.v2` API (dragonfly-api 2.3.8) that
//! modelcache speaks: `DfdaemonDownload.DownloadTask` and the messages it streams back.
//!
//! Written out with prost's derive rather than taken from the `dragonfly-api` crate, whose build
//! compiles every Dragonfly service with `protoc`: modelcache would then need `protoc` on every
//! machine that builds it, for six messages. Field numbers and types are those of the canonical
//! `.proto` files; a test encodes these messages and decodes them with `dragonfly-api` (and the
//! reverse), and the integration tests speak to a real dfdaemon. Fields modelcache does not use
//! are left out: protobuf skips unknown fields on decode, and an absent field is its default.

use std::collections::HashMap;

/// The gRPC method: `dfdaemon.v2.DfdaemonDownload/DownloadTask`.
pub const DOWNLOAD_TASK: &str = "/dfdaemon.v2.DfdaemonDownload/DownloadTask";

/// The gRPC method: `dfdaemon.v2.DfdaemonDownload/DeleteLocalTask`.
pub const DELETE_LOCAL_TASK: &str = "/dfdaemon.v2.DfdaemonDownload/DeleteLocalTask";

/// `dfdaemon.v2.DeleteLocalTaskRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteLocalTaskRequest {
    /// The task.
    #[prost(string, tag = "1")]
    pub task_id: String,
}

/// `dfdaemon.v2.DownloadTaskRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DownloadTaskRequest {
    /// What to download.
    #[prost(message, optional, tag = "1")]
    pub download: Option<Download>,
}

/// `common.v2.Download`, the fields modelcache sets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Download {
    /// The source URL dfdaemon reads when it goes back to the source.
    #[prost(string, tag = "1")]
    pub url: String,
    /// `common.v2.TaskType`; 0 is `STANDARD`.
    #[prost(int32, tag = "4")]
    pub r#type: i32,
    /// `common.v2.Priority`; 0 is `LEVEL0`.
    #[prost(int32, tag = "7")]
    pub priority: i32,
    /// Headers dfdaemon sends to the source.
    #[prost(map = "string, string", tag = "9")]
    pub request_header: HashMap<String, String>,
    /// Where dfdaemon hard-links (or, across filesystems, copies) the task's file.
    #[prost(string, optional, tag = "11")]
    pub output_path: Option<String>,
    /// How long the whole download may take.
    #[prost(message, optional, tag = "12")]
    pub timeout: Option<prost_types::Duration>,
    /// Never read the source (peers only).
    #[prost(bool, tag = "13")]
    pub disable_back_to_source: bool,
    /// Send each piece's bytes in the stream too.
    #[prost(bool, tag = "20")]
    pub need_piece_content: bool,
    /// Fail rather than copy when the hard link cannot be made.
    #[prost(bool, tag = "22")]
    pub force_hard_link: bool,
    /// What the task id is computed from instead of the URL: every node asking for the same
    /// bytes shares one task, whatever its URL's signature.
    #[prost(string, optional, tag = "23")]
    pub content_for_calculating_task_id: Option<String>,
    /// Pieces dfdaemon downloads at once for this task.
    #[prost(uint32, optional, tag = "25")]
    pub concurrent_piece_count: Option<u32>,
    /// Replace a file already at `output_path`.
    #[prost(bool, tag = "26")]
    pub overwrite: bool,
}

/// `dfdaemon.v2.DownloadTaskResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DownloadTaskResponse {
    /// The answering daemon's host.
    #[prost(string, tag = "1")]
    pub host_id: String,
    /// The task.
    #[prost(string, tag = "2")]
    pub task_id: String,
    /// This download's peer.
    #[prost(string, tag = "3")]
    pub peer_id: String,
    /// Started, or a piece finished.
    #[prost(oneof = "download_task_response::Response", tags = "4, 5")]
    pub response: Option<download_task_response::Response>,
}

/// The oneof of [`DownloadTaskResponse`].
pub mod download_task_response {
    /// `DownloadTaskResponse.response`.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Response {
        /// The download started: the task's length is known.
        #[prost(message, tag = "4")]
        DownloadTaskStartedResponse(super::DownloadTaskStartedResponse),
        /// One piece is written.
        #[prost(message, tag = "5")]
        DownloadPieceFinishedResponse(super::DownloadPieceFinishedResponse),
    }
}

/// `dfdaemon.v2.DownloadTaskStartedResponse`, the fields modelcache reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DownloadTaskStartedResponse {
    /// The task's length in bytes.
    #[prost(uint64, tag = "1")]
    pub content_length: u64,
    /// The task was already complete on this daemon.
    #[prost(bool, tag = "5")]
    pub is_finished: bool,
}

/// `dfdaemon.v2.DownloadPieceFinishedResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DownloadPieceFinishedResponse {
    /// The piece.
    #[prost(message, optional, tag = "1")]
    pub piece: Option<Piece>,
}

/// `common.v2.Piece`, the fields modelcache reads.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Piece {
    /// Piece number.
    #[prost(uint32, tag = "1")]
    pub number: u32,
    /// First byte of the piece in the task.
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    /// Length of the piece.
    #[prost(uint64, tag = "4")]
    pub length: u64,
    /// `common.v2.TrafficType`: where the piece's bytes came from.
    #[prost(int32, optional, tag = "7")]
    pub traffic_type: Option<i32>,
}

/// `common.v2.TrafficType.BACK_TO_SOURCE`.
pub const TRAFFIC_BACK_TO_SOURCE: i32 = 0;
/// `common.v2.TrafficType.REMOTE_PEER`.
pub const TRAFFIC_REMOTE_PEER: i32 = 1;
/// `common.v2.TrafficType.LOCAL_PEER`.
pub const TRAFFIC_LOCAL_PEER: i32 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use dragonfly_api::common::v2 as common;
    use dragonfly_api::dfdaemon::v2 as dfdaemon;
    use prost::Message;

    #[test]
    fn the_request_reads_as_dragonflys_own() {
        let ours = DownloadTaskRequest {
            download: Some(Download {
                url: "https://a.blob.core.windows.net/c/m.safetensors?sig=x".into(),
                request_header: [("x-ms-version".to_string(), "2023-11-03".to_string())].into(),
                output_path: Some("/cache/staging/m/dragonfly/0.part".into()),
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
                disable_back_to_source: true,
                need_piece_content: true,
                force_hard_link: true,
                content_for_calculating_task_id: Some("modelcache-blake3:ab".into()),
                concurrent_piece_count: Some(8),
                overwrite: true,
                ..Download::default()
            }),
        };
        let theirs = dfdaemon::DownloadTaskRequest::decode(ours.encode_to_vec().as_slice())
            .expect("decodes");
        let d = theirs.download.expect("download");
        assert_eq!(
            d.url,
            "https://a.blob.core.windows.net/c/m.safetensors?sig=x"
        );
        assert_eq!(
            d.request_header.get("x-ms-version").map(String::as_str),
            Some("2023-11-03")
        );
        assert_eq!(
            d.output_path.as_deref(),
            Some("/cache/staging/m/dragonfly/0.part")
        );
        assert_eq!(d.timeout.map(|t| t.seconds), Some(60));
        assert!(
            d.disable_back_to_source && d.need_piece_content && d.force_hard_link && d.overwrite
        );
        assert_eq!(
            d.content_for_calculating_task_id.as_deref(),
            Some("modelcache-blake3:ab")
        );
        assert_eq!(d.concurrent_piece_count, Some(8));
        assert_eq!(d.r#type, common::TaskType::Standard as i32);
    }

    #[test]
    fn the_delete_request_reads_as_dragonflys_own() {
        let ours = DeleteLocalTaskRequest {
            task_id: "abc".into(),
        };
        let theirs = dfdaemon::DeleteLocalTaskRequest::decode(ours.encode_to_vec().as_slice())
            .expect("decodes");
        assert_eq!(theirs.task_id, "abc");
    }

    #[test]
    fn dragonflys_answers_read_as_ours() {
        let started = dfdaemon::DownloadTaskResponse {
            host_id: "h".into(),
            task_id: "t".into(),
            peer_id: "p".into(),
            response: Some(
                dfdaemon::download_task_response::Response::DownloadTaskStartedResponse(
                    dfdaemon::DownloadTaskStartedResponse {
                        content_length: 1 << 33,
                        is_finished: true,
                        ..Default::default()
                    },
                ),
            ),
        };
        let ours =
            DownloadTaskResponse::decode(started.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(
            ours.response,
            Some(
                download_task_response::Response::DownloadTaskStartedResponse(
                    DownloadTaskStartedResponse {
                        content_length: 1 << 33,
                        is_finished: true,
                    }
                )
            )
        );
        for (traffic, expected) in [
            (common::TrafficType::BackToSource, TRAFFIC_BACK_TO_SOURCE),
            (common::TrafficType::RemotePeer, TRAFFIC_REMOTE_PEER),
            (common::TrafficType::LocalPeer, TRAFFIC_LOCAL_PEER),
        ] {
            let piece = dfdaemon::DownloadTaskResponse {
                response: Some(
                    dfdaemon::download_task_response::Response::DownloadPieceFinishedResponse(
                        dfdaemon::DownloadPieceFinishedResponse {
                            piece: Some(common::Piece {
                                number: 7,
                                offset: 7 << 22,
                                length: 1 << 22,
                                digest: "crc32:1".into(),
                                content: Some(vec![1, 2, 3]),
                                traffic_type: Some(traffic as i32),
                                ..Default::default()
                            }),
                        },
                    ),
                ),
                ..Default::default()
            };
            let ours =
                DownloadTaskResponse::decode(piece.encode_to_vec().as_slice()).expect("decodes");
            let Some(download_task_response::Response::DownloadPieceFinishedResponse(f)) =
                ours.response
            else {
                panic!("not a piece: {ours:?}");
            };
            assert_eq!(
                f.piece,
                Some(Piece {
                    number: 7,
                    offset: 7 << 22,
                    length: 1 << 22,
                    traffic_type: Some(expected),
                })
            );
        }
    }
}
