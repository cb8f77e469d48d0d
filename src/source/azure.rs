//! Azure Blob Storage as a source, through `object_store`'s Azure backend.
//!
//! `object_store` brings the credential chain (workload identity, managed identity, SAS, account
//! key, the Azurite emulator). Its own retries are switched off: the `fetch` module retries each
//! range itself, resuming mid-range, honouring `Retry-After` and counting causes. To see
//! `Retry-After` at all, a thin HTTP service wraps the client and turns 5xx, 408 and 429 answers
//! into an error that carries the status, the Azure error code and the delay.
//! `object_store`'s whole-request timeout is disabled: a 64 MiB range on a busy link takes longer
//! than any fixed limit, so stalls are caught per read by the fetcher instead.
//!
//! Checked reads ([`Source::read_range_checked`], used when a model has no manifest) ask Blob for
//! a transactional MD5 (`x-ms-range-get-content-md5`, ranges of at most 4 MiB) and the same
//! service checks each answer's bytes against it before passing any on. Shared Key requests
//! cannot ask: their signature covers every `x-ms-` header and is made before the service sees
//! the request, so an added header would void it. With an account key, reads stay unchecked
//! and the marker says `structural`.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};

use md5::{Digest, Md5};

use super::{
    BoxError, ByteStream, MAX_LISTED_FILES, MAX_SMALL_FILE, RemoteFile, RetryCause, Source,
    SourceError, SourceOptions, redact_url,
};
use crate::config::Environment;

/// The largest range Blob returns a transactional MD5 for.
const MD5_RANGE_LIMIT: u64 = 4 << 20;

/// A container prefix in an Azure storage account.
#[derive(Debug)]
pub struct AzureSource {
    store: Arc<MicrosoftAzure>,
    prefix: Option<Path>,
    display: String,
    /// Checked reads answered without a checked MD5: each one signed with the account key,
    /// whose signature covers every `x-ms-` header so the MD5 cannot be asked for.
    unchecked: Arc<AtomicU64>,
    /// Checked reads made.
    checked_reads: Arc<AtomicU64>,
    /// The container URL and SAS query of a source opened with a SAS in its URL: the SAS is
    /// what another program reading a file needs too (see [`Source::shareable_url`]).
    sas_url: Option<url::Url>,
}

impl AzureSource {
    /// Opens `az://CONTAINER/PREFIX` or `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]`.
    pub fn open(
        url: &str,
        env: &Environment,
        options: &SourceOptions,
    ) -> Result<Self, SourceError> {
        let display = redact_url(url);
        let invalid = |reason: &str| SourceError::InvalidUrl {
            url: display.clone(),
            reason: reason.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;

        let client_options = ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(Duration::from_secs(10))
            .with_http1_only();
        let mut builder = MicrosoftAzureBuilder::new()
            .with_client_options(client_options)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .with_http_connector(StatusAwareConnector);
        for (key, value) in env.azure() {
            if let Ok(config_key) = key.to_ascii_lowercase().parse::<AzureConfigKey>() {
                builder = builder.with_config(config_key, value);
            }
        }
        if let Some(endpoint) = env.get("MSI_ENDPOINT") {
            builder = builder.with_msi_endpoint(endpoint);
        }

        let mut sas_url = None;
        let (container, prefix) = match parsed.scheme() {
            "az" => {
                let container = parsed.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
                    invalid("az:// URLs name the container first: az://CONTAINER/PREFIX")
                })?;
                if let Some(account) = &options.account {
                    builder = builder.with_account(account);
                }
                (container.to_string(), parsed.path().to_string())
            }
            "https" | "http" => {
                let host = parsed.host_str().unwrap_or_default();
                let account = host.strip_suffix(".blob.core.windows.net").ok_or_else(|| {
                    invalid("expected https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX")
                })?;
                builder = builder.with_account(account);
                let path = parsed.path().trim_start_matches('/');
                let (container, rest) = path.split_once('/').unwrap_or((path, ""));
                if container.is_empty() {
                    return Err(invalid("the URL names no container"));
                }
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                if !pairs.is_empty() {
                    builder = builder.with_sas_authorization(pairs);
                    let mut base = parsed.clone();
                    base.set_path(&format!("/{container}"));
                    sas_url = Some(base);
                }
                (container.to_string(), rest.to_string())
            }
            _ => return Err(invalid("unsupported scheme")),
        };
        let prefix = prefix.trim_matches('/');
        if let Some(kind) = choose_credential(env, parsed.query().is_some_and(|q| !q.is_empty())) {
            builder = builder.with_config(AzureConfigKey::CredentialType, kind);
        }
        let store = builder
            .with_container_name(&container)
            .build()
            .map_err(|e| SourceError::Config {
                url: display.clone(),
                source: Box::new(e),
            })?;
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(Path::parse(prefix).map_err(|e| invalid(&e.to_string()))?)
        };
        Ok(Self {
            store: Arc::new(store),
            prefix,
            display,
            unchecked: Arc::new(AtomicU64::new(0)),
            checked_reads: Arc::new(AtomicU64::new(0)),
            sas_url,
        })
    }

    fn location(&self, relative: &str) -> Path {
        match &self.prefix {
            Some(p) => Path::from(format!("{}/{relative}", p.as_ref())),
            None => Path::from(relative),
        }
    }
}

#[async_trait]
impl Source for AzureSource {
    fn describe(&self) -> String {
        self.display.clone()
    }

    async fn list(&self) -> Result<Vec<RemoteFile>, SourceError> {
        let strip = self.prefix.as_ref().map(|p| format!("{}/", p.as_ref()));
        let mut files = Vec::new();
        let mut listing = self.store.list(self.prefix.as_ref());
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| map_error(&self.display, e))?;
            let full = meta.location.as_ref();
            let rel = match &strip {
                Some(s) => full.strip_prefix(s.as_str()).unwrap_or(full),
                None => full,
            };
            if files.len() >= MAX_LISTED_FILES {
                return Err(SourceError::TooManyFiles {
                    limit: MAX_LISTED_FILES,
                });
            }
            files.push(RemoteFile {
                path: rel.to_string(),
                size: meta.size,
                etag: meta.e_tag.unwrap_or_default(),
            });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    async fn read_range(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        get_range(&self.store, &self.location(&file.path), file, range, None).await
    }

    async fn read_range_checked(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        // Blob sends an MD5 for ranges of at most 4 MiB: read the range as consecutive pieces
        // of that size. The first is requested now, so its errors (412, 404, 403) are this
        // call's; the others as the stream is read.
        let mut pieces = (range.start..range.end)
            .step_by(usize::try_from(MD5_RANGE_LIMIT).unwrap_or(usize::MAX))
            .map(move |start| start..(start + MD5_RANGE_LIMIT).min(range.end));
        let Some(first) = pieces.next() else {
            return Ok(futures::stream::empty().boxed());
        };
        let counters = Counters {
            unchecked: Arc::clone(&self.unchecked),
            reads: Arc::clone(&self.checked_reads),
        };
        let location = self.location(&file.path);
        let head = get_range(&self.store, &location, file, first, Some(&counters)).await?;
        let (store, file) = (Arc::clone(&self.store), file.clone());
        let rest = futures::stream::iter(pieces)
            .then(move |piece| {
                let (store, location, file, counters) = (
                    Arc::clone(&store),
                    location.clone(),
                    file.clone(),
                    counters.clone(),
                );
                async move { get_range(&store, &location, &file, piece, Some(&counters)).await }
            })
            .try_flatten();
        Ok(head.chain(rest).boxed())
    }

    fn transfers_checked(&self) -> bool {
        self.checked_reads.load(Ordering::Relaxed) > 0
            && self.unchecked.load(Ordering::Relaxed) == 0
    }

    async fn read_small(&self, path: &str) -> Result<Option<Bytes>, SourceError> {
        let location = self.location(path);
        let result = match self.store.get(&location).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(map_error(path, e)),
        };
        if result.meta.size > MAX_SMALL_FILE {
            return Err(SourceError::TooLarge {
                path: path.to_string(),
                size: result.meta.size,
                limit: MAX_SMALL_FILE,
            });
        }
        result
            .bytes()
            .await
            .map(Some)
            .map_err(|e| map_error(path, e))
    }

    async fn put_small(&self, path: &str, data: Bytes) -> Result<(), SourceError> {
        self.store
            .put(&self.location(path), PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| map_error(path, e))
    }

    /// A SAS URL for one blob, read-only, expiring after `valid_for`: signed with the account
    /// key, or with a user delegation key obtained with the node's Azure AD identity (workload
    /// or managed identity; the role that reads blobs may also ask for one). A source opened
    /// with a SAS shares its own SAS. A bearer token in a header would also work, but it opens
    /// every blob the identity may read (or write) for an hour; this opens one file, read-only.
    async fn shareable_url(
        &self,
        file: &RemoteFile,
        valid_for: Duration,
    ) -> Result<Option<String>, SourceError> {
        let location = self.location(&file.path);
        if let Some(base) = &self.sas_url {
            let mut url = base.clone();
            if let Ok(mut segments) = url.path_segments_mut() {
                segments.extend(location.as_ref().split('/'));
            }
            return Ok(Some(url.to_string()));
        }
        use object_store::signer::Signer;
        self.store
            .signed_url(http::Method::GET, &location, valid_for)
            .await
            .map(|u| Some(u.to_string()))
            .map_err(|e| map_error(&file.path, e))
    }
}

/// Counts checked reads and those answered without a checked MD5.
#[derive(Debug, Clone)]
struct Counters {
    unchecked: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
}

/// Marks a GET whose answer must carry a transactional MD5 that [`StatusAwareService`] checks.
#[derive(Debug, Clone, Copy)]
struct AskTransferMd5;

/// Marks an answer whose bytes [`StatusAwareService`] checks against its transactional MD5.
#[derive(Debug, Clone, Copy)]
struct TransferMd5Checked;

/// One ranged GET pinned to the listed ETag; with `checked`, asking for and checking the
/// transactional MD5 (`range` must then be at most 4 MiB).
async fn get_range(
    store: &MicrosoftAzure,
    location: &Path,
    file: &RemoteFile,
    range: Range<u64>,
    checked: Option<&Counters>,
) -> Result<ByteStream, SourceError> {
    let mut options = GetOptions {
        if_match: (!file.etag.is_empty()).then(|| file.etag.clone()),
        range: Some(GetRange::Bounded(range.clone())),
        ..GetOptions::default()
    };
    if checked.is_some() {
        options.extensions.insert(AskTransferMd5);
    }
    let result = store.get_opts(location, options).await.map_err(|e| {
        match map_error(&file.path, e) {
            // Not a status, a transport failure, auth, 404 or 412: object_store refused the
            // answer itself (a 200 to a ranged GET, a missing or unparsable Content-Range).
            // Worth the same bounded retries as a 503.
            SourceError::Other { path, source } => SourceError::Transient {
                path,
                cause: RetryCause::BadRange,
                retry_after: None,
                source,
            },
            other => other,
        }
    })?;
    if let Some(counters) = checked {
        counters.reads.fetch_add(1, Ordering::Relaxed);
        if result.extensions.get::<TransferMd5Checked>().is_none() {
            counters.unchecked.fetch_add(1, Ordering::Relaxed);
        }
    }
    if result.range != range {
        return Err(SourceError::UnexpectedRange {
            path: file.path.clone(),
            want: range,
            got: result.range,
        });
    }
    let path = file.path.clone();
    Ok(result
        .into_stream()
        .map_err(move |e| map_error(&path, e))
        .boxed())
}

/// Picks the credential in the documented order: workload identity, SAS, account key, and
/// managed identity (IMDS) when nothing else is configured. `object_store`'s own automatic choice
/// would prefer an account key over workload identity. IMDS comes last rather than second
/// because it answers on every AKS node and would shadow credentials the operator set on purpose.
/// `AZURE_CREDENTIAL_TYPE`, when set, is left to decide.
fn choose_credential(env: &Environment, url_has_sas: bool) -> Option<&'static str> {
    let set = |k: &str| env.get(k).is_some_and(|v| !v.is_empty());
    if set("AZURE_CREDENTIAL_TYPE") || set("AZURE_STORAGE_USE_EMULATOR") {
        return None;
    }
    let workload =
        set("AZURE_CLIENT_ID") && set("AZURE_TENANT_ID") && set("AZURE_FEDERATED_TOKEN_FILE");
    let sas = url_has_sas || set("AZURE_STORAGE_SAS_TOKEN") || set("AZURE_STORAGE_SAS_KEY");
    let key = set("AZURE_STORAGE_ACCOUNT_KEY") || set("AZURE_STORAGE_ACCESS_KEY");
    Some(if workload {
        "workload_identity"
    } else if sas {
        "sas_token"
    } else if key {
        "access_key"
    } else if set("AZURE_CLIENT_SECRET") {
        "client_secret"
    } else {
        "managed_identity"
    })
}

/// Maps an `object_store` error to what the caller can do about it. The one place where HTTP
/// statuses and transport failures become [`SourceError`] groups.
fn map_error(path: &str, err: object_store::Error) -> SourceError {
    let path = path.to_string();
    match err {
        object_store::Error::NotFound { .. } => SourceError::NotFound { path },
        object_store::Error::Precondition { .. } => SourceError::Changed { path },
        object_store::Error::Unauthenticated { source, .. } => {
            SourceError::Unauthenticated { path, source }
        }
        object_store::Error::PermissionDenied { source, .. } => {
            SourceError::PermissionDenied { path, source }
        }
        object_store::Error::InvalidPath {
            source: object_store::path::Error::BadSegment { path: name, .. },
        } => SourceError::UnsafeName {
            name,
            reason: "a path segment such as `..` could escape the destination",
        },
        other => {
            // The server's own answer, when there is one, says more than the transport error
            // that carries it, so look for it through the whole chain first.
            let chain = || {
                std::iter::successors(Some(&other as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
            };
            let has = |is: fn(&(dyn std::error::Error + 'static)) -> bool| chain().any(is);
            let answered = chain().find_map(|e| e.downcast_ref::<ServerAnswered>());
            let transport = chain().find_map(|e| e.downcast_ref::<HttpError>());
            let (cause, retry_after) = match (answered, transport) {
                _ if has(|e| e.is::<TransferCorrupt>()) => (Some(RetryCause::Corrupt), None),
                _ if has(|e| e.is::<UncheckableAnswer>() || e.is::<MissingTransferMd5>()) => {
                    (Some(RetryCause::BadRange), None)
                }
                (Some(a), _) => (Some(a.cause()), a.retry_after),
                (None, Some(h)) if h.kind() == HttpErrorKind::Timeout => {
                    (Some(RetryCause::Timeout), None)
                }
                (None, Some(_)) => (Some(RetryCause::Connection), None),
                (None, None) => (None, None),
            };
            match cause {
                Some(cause) => SourceError::Transient {
                    path,
                    cause,
                    retry_after,
                    source: Box::new(other) as BoxError,
                },
                None => SourceError::Other {
                    path,
                    source: Box::new(other),
                },
            }
        }
    }
}

/// A server answer worth retrying (5xx, 408, 429), with what it told us.
#[derive(Debug)]
struct ServerAnswered {
    status: u16,
    error_code: Option<String>,
    retry_after: Option<Duration>,
}

impl ServerAnswered {
    fn cause(&self) -> RetryCause {
        match self.status {
            503 | 429 => RetryCause::Throttled,
            408 => RetryCause::Timeout,
            _ => RetryCause::ServerError,
        }
    }
}

impl std::fmt::Display for ServerAnswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the server answered {}", self.status)?;
        if let Some(code) = &self.error_code {
            write!(f, " {code}")?;
        }
        if let Some(d) = self.retry_after {
            write!(f, " (retry after {}s)", d.as_secs_f32())?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerAnswered {}

/// Parses `Retry-After` in its delta-seconds form; the HTTP-date form is ignored (Blob Storage
/// sends seconds). Capped at five minutes so a bad header cannot park a range forever.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(300.0)))
}

/// Builds the default reqwest client and wraps it in [`StatusAwareService`].
#[derive(Debug)]
struct StatusAwareConnector;

impl HttpConnector for StatusAwareConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(StatusAwareService { inner }))
    }
}

/// Turns retryable answers into [`ServerAnswered`] errors so `Retry-After` reaches the fetcher.
#[derive(Debug)]
struct StatusAwareService {
    inner: HttpClient,
}

#[async_trait]
impl HttpService for StatusAwareService {
    async fn call(&self, mut req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let ask_md5 =
            req.extensions().get::<AskTransferMd5>().is_some() && !signed_with_shared_key(&req);
        if ask_md5 {
            req.headers_mut().insert(
                "x-ms-range-get-content-md5",
                http::HeaderValue::from_static("true"),
            );
        }
        let response = self.inner.execute(req).await?;
        let status = response.status().as_u16();
        if status >= 500 || status == 429 || status == 408 {
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let answered = ServerAnswered {
                status,
                error_code: header("x-ms-error-code"),
                retry_after: header("retry-after").as_deref().and_then(parse_retry_after),
            };
            return Err(HttpError::new(HttpErrorKind::Unknown, answered));
        }
        if ask_md5 && status == 200 {
            // A whole-object answer to a ranged read carries no range MD5 (object_store accepts
            // one when the range is the whole blob): unverifiable, so retried like a bad range.
            return Err(HttpError::new(HttpErrorKind::Unknown, UncheckableAnswer));
        }
        let expected = response
            .headers()
            .get("content-md5")
            .and_then(|v| v.to_str().ok())
            .and_then(decode_md5);
        match expected {
            None if ask_md5 && status == 206 => {
                // Blob sends the MD5 of every range of at most 4 MiB it was asked for; one that
                // comes without is retried like any answer that is not what was asked for,
                // rather than taken unchecked (which would mark the whole model `structural`).
                Err(HttpError::new(HttpErrorKind::Unknown, MissingTransferMd5))
            }
            Some(expected) if ask_md5 && status == 206 => {
                let (mut parts, body) = response.into_parts();
                parts.extensions.insert(TransferMd5Checked);
                let body = Md5CheckedBody {
                    inner: body,
                    hasher: Md5::new(),
                    held: bytes::BytesMut::new(),
                    expected,
                    done: false,
                };
                Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
            }
            _ => Ok(response),
        }
    }
}

/// Whether a request is signed with the account key: its signature covers every `x-ms-`
/// header, so none may be added.
fn signed_with_shared_key(req: &HttpRequest) -> bool {
    req.headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("SharedKey"))
}

/// A `Content-MD5` header value: base64 of 16 bytes.
fn decode_md5(value: &str) -> Option<[u8; 16]> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    bytes.try_into().ok()
}

/// A checked read was answered with a whole-object `200`, which carries no range MD5.
#[derive(Debug)]
struct UncheckableAnswer;

impl std::fmt::Display for UncheckableAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a 200 answer to a ranged read that asked for a transactional MD5")
    }
}

impl std::error::Error for UncheckableAnswer {}

/// A checked read was answered without the transactional MD5 it asked for.
#[derive(Debug)]
struct MissingTransferMd5;

impl std::fmt::Display for MissingTransferMd5 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a ranged answer without the transactional MD5 (Content-MD5) it was asked for")
    }
}

impl std::error::Error for MissingTransferMd5 {}

/// A range's bytes did not match the MD5 the server sent with them.
#[derive(Debug)]
struct TransferCorrupt {
    expected: [u8; 16],
    actual: [u8; 16],
}

impl std::fmt::Display for TransferCorrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |b: &[u8; 16]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "the range's MD5 is {} but the server sent {} (bytes changed in transit)",
            hex(&self.actual),
            hex(&self.expected)
        )
    }
}

impl std::error::Error for TransferCorrupt {}

/// A response body checked against its transactional MD5 before any of it is passed on: the
/// fetcher keeps every byte it receives (a retry resumes after them), so bytes that turn out
/// bad must never reach it. While holding, an empty frame goes out per frame received, so
/// the fetcher's stall timer sees the data flowing. Holds at most one range (4 MiB).
struct Md5CheckedBody {
    inner: HttpResponseBody,
    hasher: Md5,
    held: bytes::BytesMut,
    expected: [u8; 16],
    done: bool,
}

impl http_body::Body for Md5CheckedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.hasher.update(data);
                    this.held.extend_from_slice(data);
                }
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::new()))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.done = true;
                let actual: [u8; 16] = this.hasher.finalize_reset().into();
                if actual == this.expected {
                    Poll::Ready(Some(Ok(http_body::Frame::data(this.held.split().freeze()))))
                } else {
                    let corrupt = TransferCorrupt {
                        expected: this.expected,
                        actual,
                    };
                    Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, corrupt))))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parses_seconds_and_caps() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("99999"), Some(Duration::from_secs(300)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn credentials_follow_the_documented_order() {
        let env = |pairs: &[(&str, &str)]| {
            Environment::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        };
        let wi = [
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_STORAGE_ACCOUNT_KEY", "k"),
        ];
        assert_eq!(
            choose_credential(&env(&wi), true),
            Some("workload_identity")
        );
        let key = [("AZURE_STORAGE_ACCOUNT_KEY", "k")];
        assert_eq!(choose_credential(&env(&key), true), Some("sas_token"));
        assert_eq!(choose_credential(&env(&key), false), Some("access_key"));
        assert_eq!(
            choose_credential(&env(&[]), false),
            Some("managed_identity")
        );
        let forced = [("AZURE_CREDENTIAL_TYPE", "azure_cli")];
        assert_eq!(choose_credential(&env(&forced), false), None);
    }

    #[test]
    fn urls_parse_into_account_container_and_prefix() {
        let env = Environment::from_pairs([(
            "AZURE_STORAGE_ACCOUNT_KEY".to_string(),
            "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
                .to_string(),
        )]);
        let s = AzureSource::open(
            "https://acct.blob.core.windows.net/models/gpt-oss-120b/?sv=x&sig=y",
            &env,
            &SourceOptions::default(),
        )
        .unwrap();
        assert_eq!(s.prefix.as_ref().map(|p| p.as_ref()), Some("gpt-oss-120b"));
        assert!(!s.describe().contains("sig="));
        let s = AzureSource::open(
            "az://models/a/b",
            &env,
            &SourceOptions {
                account: Some("acct".into()),
                confine: None,
            },
        )
        .unwrap();
        assert_eq!(s.location("x.json").as_ref(), "a/b/x.json");
        let err = AzureSource::open("https://example.com/c/p", &env, &SourceOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("example.com"), "{err}");
    }

    #[test]
    fn az_url_without_account_says_what_is_missing() {
        let err = AzureSource::open(
            "az://models/x",
            &Environment::default(),
            &SourceOptions::default(),
        )
        .unwrap_err();
        let chain = format!(
            "{err}: {}",
            std::error::Error::source(&err)
                .map(|e| e.to_string())
                .unwrap_or_default()
        );
        assert!(chain.contains("az://models/x"), "{chain}");
    }
}
