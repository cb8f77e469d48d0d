//! The agent's HTTP API (axum): routes, handlers, the JSON error envelope and the bearer-token
//! guard. It knows models and states, not ranges or disks.
//!
//! Three routers share the handlers: the read router (may listen on the node address) serves
//! state-changing routes only behind a configured bearer token and never names a pod; the
//! readers' router, on a Unix socket in the cache root that consumer pods see read-only,
//! serves the read routes and identifies each reader's pod from its process; the admin router
//! is served on a Unix socket in a root-only directory and serves everything. Every request is
//! bounded in body size and time.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;
use tracing::error;

use super::DiskStatus;
use super::auth::Bearer;
use super::models::{ModelError, ModelStatus, Models, PrefetchOverride, Reader, Reading};
use super::serve::Peer;

/// Largest accepted request body.
const BODY_LIMIT: usize = 64 * 1024;
/// Longest a request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of the handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The models.
    pub models: Arc<Models>,
    /// The disk setup, as it goes.
    pub disk: Arc<std::sync::RwLock<super::DiskStatus>>,
    /// The configuration file's later changes: what needs a restart, what was refused.
    pub config: Arc<std::sync::RwLock<super::reload::ConfigStatus>>,
    /// With Dragonfly on, whether dfdaemon can be handed URLs (see [`super::signing`]).
    pub dragonfly: Arc<std::sync::RwLock<Option<String>>>,
    /// Which listener serves this router.
    pub listener: Listener,
}

/// The agent's listeners, by who may reach them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `listen.read`: anyone on the node network.
    Read,
    /// The readers' socket in the cache root: processes that mount the cache.
    Readers,
    /// `listen.admin`: root on the node and the agent's own container.
    Admin,
}

impl AppState {
    /// A status as this listener may show it: pod UIDs on the admin socket only.
    fn shown(&self, status: ModelStatus) -> ModelStatus {
        if self.listener == Listener::Admin {
            status
        } else {
            status.without_pods()
        }
    }
}

/// The JSON error envelope: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: EnvelopeBody<'a>,
}

#[derive(Serialize)]
struct EnvelopeBody<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model named {name} is known to this agent"),
        )
    }
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::NotFound(name) => ApiError::model_not_found(&name),
            ModelError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m),
            ModelError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            ModelError::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
            ModelError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
            ModelError::Internal(m) => {
                // Logged in full; the body stays generic (no paths or URLs).
                error!("request failed: {m}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the agent failed to complete the request; see its log",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Envelope {
            error: EnvelopeBody {
                code: self.code,
                message: &self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// The read router, for `listen.read`: state-changing routes need `token`; without one they
/// are refused here.
pub fn read_router(mut state: AppState, token: Option<Bearer>) -> Router {
    state.listener = Listener::Read;
    let guarded = mutating_routes().route_layer(middleware::from_fn_with_state(
        Arc::new(token),
        require_token,
    ));
    bounded(read_routes().merge(guarded).with_state(state))
}

/// The readers' router, for the socket in the cache root: the read routes, readers identified
/// by their process.
pub fn readers_router(mut state: AppState) -> Router {
    state.listener = Listener::Readers;
    bounded(read_routes().with_state(state))
}

/// The admin router, for `listen.admin` (a root-only Unix socket): every route.
pub fn admin_router(mut state: AppState) -> Router {
    state.listener = Listener::Admin;
    bounded(read_routes().merge(mutating_routes()).with_state(state))
}

fn bounded(router: Router) -> Router {
    router
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
}

fn read_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{name}", get(get_model))
        .route("/v1/models/{name}/ready", get(model_ready))
        .route("/v1/models/{name}/readers", post(reader))
        .route("/v1/disk", get(disk))
        .route("/v1/config", get(config))
}

fn mutating_routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models/{name}/prefetch", post(prefetch))
        .route("/v1/models/{name}", delete(evict))
        .route("/v1/models/{name}/readers/{pod}", delete(drop_lease))
}

async fn require_token(
    State(token): State<Arc<Option<Bearer>>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token.as_ref() else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "state-changing requests are served on the admin socket (listen.admin) only; set listen.token_file to allow them here with a bearer token",
        )
        .into_response();
    };
    // The scheme is case-insensitive in HTTP (RFC 9110, section 11.1).
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, credentials)| credentials);
    match presented.map(|p| token.allows(p.trim())) {
        Some(Ok(true)) => next.run(request).await,
        // The path stays in the agent's log: this client has not shown it may know it.
        Some(Err(_)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the agent cannot read its token file (listen.token_file; see its log): state-changing requests are refused here until it is fixed",
        )
        .into_response(),
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this request needs the agent's bearer token: Authorization: Bearer TOKEN",
        )
        .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn healthz() -> &'static str {
    "ok\n"
}

#[derive(Serialize)]
struct Readiness {
    ready: bool,
    disk: String,
    cache_root: bool,
    models: std::collections::BTreeMap<String, super::models::State>,
    /// Who signed the revision each model serves (OpenSSF Model Signing), or `unsigned`.
    signed_by: std::collections::BTreeMap<String, String>,
    /// With Dragonfly on: `usable: …` or `unusable: …` (the agent serves either way; files
    /// dfdaemon cannot fetch are fetched directly).
    #[serde(skip_serializing_if = "Option::is_none")]
    dragonfly: Option<String>,
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let cache_root = state.models.layout().root().join("models").is_dir();
    let (pinned_ready, models) = state.models.pinned_ready();
    let (disk_ok, disk) = match &*state.disk.read().unwrap_or_else(|p| p.into_inner()) {
        DiskStatus::Disabled => (true, "disabled".to_string()),
        DiskStatus::InProgress => (false, "setting up".to_string()),
        DiskStatus::Ready(r) => (
            true,
            format!("mounted {}", r.mounted.as_deref().unwrap_or("?")),
        ),
        DiskStatus::Failed(e) => (false, format!("failed: {e}")),
    };
    let ready = disk_ok && cache_root && pinned_ready;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            ready,
            disk,
            cache_root,
            models,
            signed_by: state.models.signed_by(),
            dragonfly: state
                .dragonfly
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }),
    )
}

async fn metrics(State(state): State<AppState>) -> Response {
    let models = Arc::clone(&state.models);
    let text = tokio::task::spawn_blocking(move || models.render_metrics())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn disk(State(state): State<AppState>) -> Response {
    let status = state.disk.read().unwrap_or_else(|p| p.into_inner()).clone();
    match status {
        DiskStatus::Disabled => Json(serde_json::json!({"enabled": false})).into_response(),
        DiskStatus::InProgress => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"enabled": true, "state": "setting up"})),
        )
            .into_response(),
        DiskStatus::Ready(report) => {
            Json(serde_json::json!({"enabled": true, "state": "ready", "report": report}))
                .into_response()
        }
        DiskStatus::Failed(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"enabled": true, "state": "failed", "error": e})),
        )
            .into_response(),
    }
}

async fn config(State(state): State<AppState>) -> Json<super::reload::ConfigStatus> {
    Json(
        state
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}

async fn list_models(State(state): State<AppState>) -> Json<Vec<ModelStatus>> {
    Json(
        state
            .models
            .list()
            .into_iter()
            .map(|s| state.shown(s))
            .collect(),
    )
}

async fn get_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelStatus>, ApiError> {
    state
        .models
        .get(&name)
        .map(|s| Json(state.shown(s)))
        .ok_or_else(|| ApiError::model_not_found(&name))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<ModelStatus>), ApiError> {
    let models = Arc::clone(&state.models);
    let asked = name.clone();
    let (ready, status) = tokio::task::spawn_blocking(move || models.ready_now(&asked))
        .await
        .map_err(|e| ApiError::from(ModelError::Internal(e.to_string())))?
        .ok_or_else(|| ApiError::model_not_found(&name))?;
    // Not a use for eviction: anyone on the node network may ask, and polling must not keep a
    // model cached ahead of those really used.
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((code, Json(state.shown(status))))
}

/// Body of `POST /v1/models/NAME/readers`: the reading pod's UID, for a lease (or nothing).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderBody {
    pod: Option<String>,
}

/// The answer to a reader.
#[derive(Serialize)]
struct ReaderAnswer {
    model: String,
    ready: bool,
    /// The revision directory to read for the reader's whole life, when ready.
    revision: Option<String>,
    /// That directory, relative to the cache root.
    path: Option<String>,
    /// Whether a lease was recorded for the reader's pod.
    leased: bool,
    /// Whether the agent identified the pod itself (the readers' socket) rather than taking
    /// the reader's word for it.
    proved: bool,
    /// When the kubelet started the leased pod here (RFC 3339), for the reader's timeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_started_at: Option<String>,
    status: ModelStatus,
}

/// Who a reader is, from the listener it came through and what it says.
fn reader_identity(
    state: &AppState,
    peer: Option<&Peer>,
    named: Option<String>,
) -> Result<Reader, ApiError> {
    if state.listener != Listener::Readers {
        return Ok(named.map_or(Reader::Anonymous, Reader::Claimed));
    }
    let pid = peer.and_then(|p| p.pid).unwrap_or(0);
    let forbidden = |m: String| ApiError::new(StatusCode::FORBIDDEN, "forbidden", m);
    match state.models.pod_of_process(pid) {
        Ok(Some(pod)) => match named {
            Some(n) if n != pod.as_str() => Err(forbidden(format!(
                "this socket identifies the reader's pod from its process: it is {pod}, not {n}"
            ))),
            _ => Ok(Reader::Proved(pod)),
        },
        // In no pod (root on the node, a test): its word, checked as on the read listener,
        // which it could use as well.
        Ok(None) => Ok(named.map_or(Reader::NotInPod, Reader::Claimed)),
        // Not visible (the agent without the host's PID namespace): the reader's word, checked
        // as on the read listener.
        Err(e) => {
            tracing::debug!("a reader on the readers' socket is not identified: {e}");
            Ok(named.map_or(Reader::Anonymous, Reader::Claimed))
        }
    }
}

/// `POST /v1/models/NAME/readers`: a reader (a vLLM pod's init container) asks for the model.
/// 200 with the revision directory to read when it is ready (and the pod's lease recorded on
/// it); 202 while it is not. Served on the read listener without a token: it can only ask for
/// models the agent already knows, fetch a configured one for a pod running on this node (at
/// most once per backoff), add a lease for such a pod, and never names a source, a pod, or
/// changes a setting. On the readers' socket the pod is the connecting process's.
async fn reader(
    State(state): State<AppState>,
    Path(name): Path<String>,
    peer: Option<axum::Extension<Peer>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<ReaderAnswer>), ApiError> {
    let body = body.map_err(body_rejected)?;
    let body: ReaderBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReaderBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("invalid request body: {e}"),
            )
        })?
    };
    let models = Arc::clone(&state.models);
    let asked = name.clone();
    let for_state = state.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let who = reader_identity(&for_state, peer.as_deref(), body.pod)?;
        let reading = models.reader(&asked, who).map_err(ApiError::from)?;
        let pod_started = match &reading {
            Reading::Ready {
                leased: Some(pod), ..
            } => models.pod_started(pod),
            _ => None,
        };
        Ok::<_, ApiError>((reading, pod_started))
    })
    .await
    .map_err(|e| ApiError::from(ModelError::Internal(e.to_string())))??;
    let (reading, pod_started) = reading;
    Ok(match reading {
        Reading::Ready {
            revision,
            status,
            leased,
            proved,
        } => (
            StatusCode::OK,
            Json(ReaderAnswer {
                path: Some(format!("store/{name}/{revision}")),
                model: name,
                ready: true,
                revision: Some(revision),
                leased: leased.is_some(),
                proved,
                pod_started_at: pod_started.and_then(super::models::timeline::rfc3339),
                status: state.shown(status),
            }),
        ),
        Reading::Waiting(status) => (
            StatusCode::ACCEPTED,
            Json(ReaderAnswer {
                model: name,
                ready: false,
                revision: None,
                path: None,
                leased: false,
                proved: false,
                pod_started_at: None,
                status: state.shown(status),
            }),
        ),
    })
}

/// A body over the limit (or unreadable) is answered in the envelope like every other error.
fn body_rejected(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "payload_too_large"
    } else {
        "invalid_request"
    };
    ApiError::new(
        status,
        code,
        format!(
            "{} (bodies are limited to {} bytes)",
            rejection.body_text(),
            BODY_LIMIT
        ),
    )
}

/// Body of `POST /v1/models/NAME/prefetch`; empty for a configured model.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchBody {
    source: Option<String>,
    account: Option<String>,
    include: Option<Vec<String>>,
    exclude: Option<Vec<String>>,
    pin: Option<bool>,
    require_manifest: Option<bool>,
    signature: Option<crate::fetch::signed::SignatureMode>,
}

impl PrefetchBody {
    /// Parses a request body: blank is the empty body; anything else must be this JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
    }

    /// What the body asks to change, for the registry (which checks it).
    pub fn into_override(self) -> PrefetchOverride {
        PrefetchOverride {
            source: self.source,
            account: self.account,
            include: self.include,
            exclude: self.exclude,
            pin: self.pin,
            require_manifest: self.require_manifest,
            signature: self.signature,
        }
    }
}

#[derive(Serialize)]
struct Accepted {
    model: String,
    job: u64,
    joined: bool,
}

async fn prefetch(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let body = body.map_err(body_rejected)?;
    let body = PrefetchBody::parse(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))?;
    let (job, joined) = state.models.request_prefetch(&name, body.into_override())?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            model: name,
            job,
            joined,
        }),
    ))
}

/// `DELETE /v1/models/NAME/readers/POD`: the operator ends a pod's leases on a model (its
/// revisions may then be removed). 204, or 404 when the pod held none.
async fn drop_lease(
    State(state): State<AppState>,
    Path((name, pod)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let models = Arc::clone(&state.models);
    let ended = tokio::task::spawn_blocking(move || models.drop_lease(&name, &pod))
        .await
        .map_err(|e| ApiError::from(ModelError::Internal(e.to_string())))??;
    if ended {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "lease_not_found",
            "that pod holds no lease on that model",
        ))
    }
}

async fn evict(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let models = Arc::clone(&state.models);
    tokio::task::spawn_blocking(move || models.evict(&name))
        .await
        .map_err(|e| ApiError::from(ModelError::Internal(e.to_string())))??;
    Ok(StatusCode::NO_CONTENT)
}
