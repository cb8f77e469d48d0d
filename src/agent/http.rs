//! The agent's HTTP API (axum): routes, handlers, the JSON error envelope and the bearer-token
//! guard. It knows models and states, not ranges or disks.
//!
//! Two routers share the handlers: the read router (may listen on the node address) serves
//! state-changing routes only behind a configured bearer token; the admin router is served on a
//! Unix socket in a root-only directory and serves everything. Every request is bounded in body size and time.

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
use super::models::{ModelError, ModelStatus, Models, PrefetchOverride, Reading};

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
pub fn read_router(state: AppState, token: Option<Bearer>) -> Router {
    let guarded = mutating_routes().route_layer(middleware::from_fn_with_state(
        Arc::new(token),
        require_token,
    ));
    bounded(read_routes().merge(guarded).with_state(state))
}

/// The admin router, for `listen.admin` (a root-only Unix socket): every route.
pub fn admin_router(state: AppState) -> Router {
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
    Json(state.models.list())
}

async fn get_model(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelStatus>, ApiError> {
    state
        .models
        .get(&name)
        .map(Json)
        .ok_or_else(|| ApiError::model_not_found(&name))
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<ModelStatus>), ApiError> {
    let status = state
        .models
        .get(&name)
        .ok_or_else(|| ApiError::model_not_found(&name))?;
    // Not a use for eviction: anyone on the node network may ask, and polling must not keep a
    // model cached ahead of those really used.
    let code = if status.state == super::models::State::Ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((code, Json(status)))
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
    /// Whether the pod's lease on it was recorded.
    leased: bool,
    status: ModelStatus,
}

/// `POST /v1/models/NAME/readers`: a reader (a vLLM pod's init container) asks for the model.
/// 200 with the revision directory to read when it is ready (and the pod's lease recorded on
/// it); 202 while it is not (it is fetched if nothing was fetching it). Served on the read
/// listener without a token: it can only ask for models the agent already knows, record a
/// lease for a pod that exists on this node, and never names a source or changes a setting.
async fn reader(
    State(state): State<AppState>,
    Path(name): Path<String>,
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
    let reading = tokio::task::spawn_blocking(move || models.reader(&asked, body.pod.as_deref()))
        .await
        .map_err(|e| ApiError::from(ModelError::Internal(e.to_string())))??;
    Ok(match reading {
        Reading::Ready {
            revision,
            status,
            leased,
        } => (
            StatusCode::OK,
            Json(ReaderAnswer {
                path: Some(format!("store/{name}/{revision}")),
                model: name,
                ready: true,
                revision: Some(revision),
                leased,
                status,
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
                status,
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
