//! A small Dragonfly scheduler for the tests: dfdaemon will not start without a scheduler that
//! answers the gRPC health check and `AnnounceHost`, and Dragonfly's own scheduler is a Go
//! service. This one keeps the rule the tests need: a peer asking for a task gets, as its
//! parent, a daemon on another host that finished the task; without one it is sent back to the
//! source. Every decision is recorded for the tests to read.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use dragonfly_api::common::v2 as common;
use dragonfly_api::scheduler::v2 as sched;
use dragonfly_api::scheduler::v2::scheduler_server::{Scheduler, SchedulerServer};
use futures::Stream;
use sched::announce_peer_request::Request as PeerRequest;
use sched::announce_peer_response::Response as PeerResponse;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

fn unimplemented_rpc<T>(name: &str) -> Result<T, tonic::Status> {
    Err(tonic::Status::unimplemented(format!(
        "the test scheduler does not serve {name}"
    )))
}

/// What the scheduler decided for one registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The asking daemon's host.
    pub host_id: String,
    /// The task.
    pub task_id: String,
    /// The parent's host, or `None` for back to the source.
    pub parent_host: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    hosts: HashMap<String, common::Host>,
    /// Task id → (peer id, host id) of each daemon that finished it.
    finished: HashMap<String, Vec<(String, String)>>,
    decisions: Vec<Decision>,
}

/// The running scheduler.
pub struct TestScheduler {
    pub port: u16,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl TestScheduler {
    /// Serves on a free loopback port, with the standard gRPC health service.
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let state: Arc<Mutex<State>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let service = Service {
            state: Arc::clone(&state),
        };
        runtime.spawn(async move {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter.set_serving::<SchedulerServer<Service>>().await;
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .add_service(SchedulerServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self {
            port,
            state,
            _runtime: runtime,
        }
    }

    /// Every registration so far.
    pub fn decisions(&self) -> Vec<Decision> {
        self.state.lock().unwrap().decisions.clone()
    }

    /// Waits until the daemon named `hostname` has told the scheduler it finished `tasks`
    /// tasks: dfdaemon reports a finished download to its scheduler after it answered the
    /// download's last piece, so a node asking right after could otherwise find no parent.
    pub fn until_finished(&self, hostname: &str, tasks: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let done = {
                let state = self.state.lock().unwrap();
                let host = state
                    .hosts
                    .values()
                    .find(|h| h.hostname == hostname)
                    .map(|h| h.id.clone());
                state
                    .finished
                    .values()
                    .filter(|peers| peers.iter().any(|(_, h)| Some(h) == host.as_ref()))
                    .count()
            };
            if done >= tasks {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{hostname} reported {done} finished tasks to the scheduler, not {tasks}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The host id a hostname announced itself with.
    pub fn host_id(&self, hostname: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state
            .hosts
            .values()
            .find(|h| h.hostname == hostname)
            .map(|h| h.id.clone())
    }
}

struct Service {
    state: Arc<Mutex<State>>,
}

impl Service {
    /// A daemon on another host that finished the task, as a candidate parent.
    fn parent_for(&self, host_id: &str, task_id: &str) -> Option<common::Peer> {
        let state = self.state.lock().unwrap();
        let (peer_id, parent_host) = state
            .finished
            .get(task_id)?
            .iter()
            .rev()
            .find(|(_, h)| h != host_id)?
            .clone();
        let host = state.hosts.get(&parent_host)?.clone();
        Some(common::Peer {
            id: peer_id,
            state: "Succeeded".into(),
            host: Some(host),
            ..Default::default()
        })
    }

    fn decide(&self, host_id: &str, task_id: &str, reschedule: bool) -> PeerResponse {
        let parent = if reschedule {
            None
        } else {
            self.parent_for(host_id, task_id)
        };
        self.state.lock().unwrap().decisions.push(Decision {
            host_id: host_id.to_string(),
            task_id: task_id.to_string(),
            parent_host: parent
                .as_ref()
                .and_then(|p| p.host.as_ref())
                .map(|h| h.id.clone()),
        });
        match parent {
            Some(parent) => PeerResponse::NormalTaskResponse(sched::NormalTaskResponse {
                candidate_parents: vec![parent],
            }),
            None => PeerResponse::NeedBackToSourceResponse(sched::NeedBackToSourceResponse {
                description: Some("no other host has finished this task".into()),
            }),
        }
    }
}

#[tonic::async_trait]
impl Scheduler for Service {
    type AnnouncePeerStream = BoxStream<sched::AnnouncePeerResponse>;
    type AnnounceCachePeerStream = BoxStream<sched::AnnounceCachePeerResponse>;
    type AnnouncePersistentPeerStream = BoxStream<sched::AnnouncePersistentPeerResponse>;
    type AnnouncePersistentCachePeerStream = BoxStream<sched::AnnouncePersistentCachePeerResponse>;

    async fn announce_peer(
        &self,
        request: tonic::Request<tonic::Streaming<sched::AnnouncePeerRequest>>,
    ) -> Result<tonic::Response<Self::AnnouncePeerStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let service = Service {
            state: Arc::clone(&self.state),
        };
        tokio::spawn(async move {
            // Ends with the peer's last word; dropping `tx` then ends the answer stream, which
            // is what the peer waits for before it closes its side.
            while let Ok(Some(message)) = incoming.message().await {
                let answer = match message.request {
                    Some(PeerRequest::RegisterPeerRequest(_)) => {
                        Some(service.decide(&message.host_id, &message.task_id, false))
                    }
                    Some(PeerRequest::ReschedulePeerRequest(_)) => {
                        Some(service.decide(&message.host_id, &message.task_id, true))
                    }
                    Some(
                        PeerRequest::DownloadPeerFinishedRequest(_)
                        | PeerRequest::DownloadPeerBackToSourceFinishedRequest(_),
                    ) => {
                        service
                            .state
                            .lock()
                            .unwrap()
                            .finished
                            .entry(message.task_id.clone())
                            .or_default()
                            .push((message.peer_id.clone(), message.host_id.clone()));
                        break;
                    }
                    Some(
                        PeerRequest::DownloadPeerFailedRequest(_)
                        | PeerRequest::DownloadPeerBackToSourceFailedRequest(_),
                    ) => break,
                    _ => None,
                };
                if let Some(response) = answer {
                    let answer = sched::AnnouncePeerResponse {
                        response: Some(response),
                    };
                    if tx.send(Ok(answer)).await.is_err() {
                        break;
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn announce_host(
        &self,
        request: tonic::Request<sched::AnnounceHostRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        if let Some(host) = request.into_inner().host {
            self.state
                .lock()
                .unwrap()
                .hosts
                .insert(host.id.clone(), host);
        }
        Ok(tonic::Response::new(()))
    }

    async fn delete_host(
        &self,
        _request: tonic::Request<sched::DeleteHostRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Ok(tonic::Response::new(()))
    }

    async fn delete_peer(
        &self,
        _request: tonic::Request<sched::DeletePeerRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Ok(tonic::Response::new(()))
    }

    async fn delete_task(
        &self,
        _request: tonic::Request<sched::DeleteTaskRequest>,
    ) -> Result<tonic::Response<()>, tonic::Status> {
        Ok(tonic::Response::new(()))
    }

    async fn stat_peer(
        &self,
        _request: tonic::Request<sched::StatPeerRequest>,
    ) -> std::result::Result<tonic::Response<common::Peer>, tonic::Status> {
        unimplemented_rpc("stat_peer")
    }
    async fn stat_task(
        &self,
        _request: tonic::Request<sched::StatTaskRequest>,
    ) -> std::result::Result<tonic::Response<common::Task>, tonic::Status> {
        unimplemented_rpc("stat_task")
    }
    async fn list_hosts(
        &self,
        _request: tonic::Request<sched::ListHostsRequest>,
    ) -> std::result::Result<tonic::Response<sched::ListHostsResponse>, tonic::Status> {
        unimplemented_rpc("list_hosts")
    }
    async fn announce_cache_peer(
        &self,
        _request: tonic::Request<tonic::Streaming<sched::AnnounceCachePeerRequest>>,
    ) -> std::result::Result<tonic::Response<Self::AnnounceCachePeerStream>, tonic::Status> {
        unimplemented_rpc("announce_cache_peer")
    }
    async fn stat_cache_peer(
        &self,
        _request: tonic::Request<sched::StatCachePeerRequest>,
    ) -> std::result::Result<tonic::Response<common::CachePeer>, tonic::Status> {
        unimplemented_rpc("stat_cache_peer")
    }
    async fn delete_cache_peer(
        &self,
        _request: tonic::Request<sched::DeleteCachePeerRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_cache_peer")
    }
    async fn stat_cache_task(
        &self,
        _request: tonic::Request<sched::StatCacheTaskRequest>,
    ) -> std::result::Result<tonic::Response<common::CacheTask>, tonic::Status> {
        unimplemented_rpc("stat_cache_task")
    }
    async fn delete_cache_task(
        &self,
        _request: tonic::Request<sched::DeleteCacheTaskRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_cache_task")
    }
    async fn announce_persistent_peer(
        &self,
        _request: tonic::Request<tonic::Streaming<sched::AnnouncePersistentPeerRequest>>,
    ) -> std::result::Result<tonic::Response<Self::AnnouncePersistentPeerStream>, tonic::Status>
    {
        unimplemented_rpc("announce_persistent_peer")
    }
    async fn stat_persistent_peer(
        &self,
        _request: tonic::Request<sched::StatPersistentPeerRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentPeer>, tonic::Status> {
        unimplemented_rpc("stat_persistent_peer")
    }
    async fn delete_persistent_peer(
        &self,
        _request: tonic::Request<sched::DeletePersistentPeerRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_persistent_peer")
    }
    async fn upload_persistent_task_started(
        &self,
        _request: tonic::Request<sched::UploadPersistentTaskStartedRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("upload_persistent_task_started")
    }
    async fn upload_persistent_task_finished(
        &self,
        _request: tonic::Request<sched::UploadPersistentTaskFinishedRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentTask>, tonic::Status> {
        unimplemented_rpc("upload_persistent_task_finished")
    }
    async fn upload_persistent_task_failed(
        &self,
        _request: tonic::Request<sched::UploadPersistentTaskFailedRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("upload_persistent_task_failed")
    }
    async fn stat_persistent_task(
        &self,
        _request: tonic::Request<sched::StatPersistentTaskRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentTask>, tonic::Status> {
        unimplemented_rpc("stat_persistent_task")
    }
    async fn delete_persistent_task(
        &self,
        _request: tonic::Request<sched::DeletePersistentTaskRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_persistent_task")
    }
    async fn announce_persistent_cache_peer(
        &self,
        _request: tonic::Request<tonic::Streaming<sched::AnnouncePersistentCachePeerRequest>>,
    ) -> std::result::Result<tonic::Response<Self::AnnouncePersistentCachePeerStream>, tonic::Status>
    {
        unimplemented_rpc("announce_persistent_cache_peer")
    }
    async fn stat_persistent_cache_peer(
        &self,
        _request: tonic::Request<sched::StatPersistentCachePeerRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentCachePeer>, tonic::Status> {
        unimplemented_rpc("stat_persistent_cache_peer")
    }
    async fn delete_persistent_cache_peer(
        &self,
        _request: tonic::Request<sched::DeletePersistentCachePeerRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_persistent_cache_peer")
    }
    async fn upload_persistent_cache_task_started(
        &self,
        _request: tonic::Request<sched::UploadPersistentCacheTaskStartedRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("upload_persistent_cache_task_started")
    }
    async fn upload_persistent_cache_task_finished(
        &self,
        _request: tonic::Request<sched::UploadPersistentCacheTaskFinishedRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentCacheTask>, tonic::Status> {
        unimplemented_rpc("upload_persistent_cache_task_finished")
    }
    async fn upload_persistent_cache_task_failed(
        &self,
        _request: tonic::Request<sched::UploadPersistentCacheTaskFailedRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("upload_persistent_cache_task_failed")
    }
    async fn stat_persistent_cache_task(
        &self,
        _request: tonic::Request<sched::StatPersistentCacheTaskRequest>,
    ) -> std::result::Result<tonic::Response<common::PersistentCacheTask>, tonic::Status> {
        unimplemented_rpc("stat_persistent_cache_task")
    }
    async fn delete_persistent_cache_task(
        &self,
        _request: tonic::Request<sched::DeletePersistentCacheTaskRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("delete_persistent_cache_task")
    }
    async fn preheat_image(
        &self,
        _request: tonic::Request<sched::PreheatImageRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("preheat_image")
    }
    async fn stat_image(
        &self,
        _request: tonic::Request<sched::StatImageRequest>,
    ) -> std::result::Result<tonic::Response<sched::StatImageResponse>, tonic::Status> {
        unimplemented_rpc("stat_image")
    }
    async fn preheat_file(
        &self,
        _request: tonic::Request<sched::PreheatFileRequest>,
    ) -> std::result::Result<tonic::Response<()>, tonic::Status> {
        unimplemented_rpc("preheat_file")
    }
    async fn stat_file(
        &self,
        _request: tonic::Request<sched::StatFileRequest>,
    ) -> std::result::Result<tonic::Response<sched::StatFileResponse>, tonic::Status> {
        unimplemented_rpc("stat_file")
    }
}
