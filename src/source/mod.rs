//! Where model files come from: the [`Source`] trait and its two backends, Azure Blob Storage
//! ([`azure`]) and a local or mounted directory ([`file`]).
//!
//! A source lists a prefix (names relative to it, sizes, ETags) and reads byte ranges pinned to
//! the ETag it listed. It knows nothing of ranges plans, retries or the cache: the `fetch` module
//! drives it. Every failure is a [`SourceError`] grouped by what the caller can do about it.

pub mod azure;
pub mod file;

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::config::Environment;

/// Name of the manifest file in a source prefix.
pub const MANIFEST_NAME: &str = "modelcache.manifest.json";

/// One file under the source prefix, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Path relative to the prefix, `/`-separated; checked by [`validate_name`].
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Version identity: the blob's ETag, or a size/mtime tag for local files.
    pub etag: String,
}

/// A stream of body bytes for one range.
pub type ByteStream = BoxStream<'static, Result<Bytes, SourceError>>;

/// Why a source operation failed, grouped by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The prefix or a file does not exist.
    #[error("{path} was not found in the source")]
    NotFound {
        /// What was asked for.
        path: String,
    },
    /// The file's ETag no longer matches the listing: it was replaced since.
    #[error("{path} changed in the source since it was listed (its ETag no longer matches)")]
    Changed {
        /// The file that changed.
        path: String,
    },
    /// The credentials were refused.
    #[error(
        "the source refused our credentials for {path} (hint: check AZURE_CLIENT_ID / AZURE_FEDERATED_TOKEN_FILE, the SAS token or AZURE_STORAGE_ACCOUNT_KEY)"
    )]
    Unauthenticated {
        /// What was asked for.
        path: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The identity lacks permission.
    #[error(
        "permission denied for {path} (hint: the identity needs the Storage Blob Data Reader role on the container)"
    )]
    PermissionDenied {
        /// What was asked for.
        path: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// A local file or directory of a `file://` source that this user may not read.
    #[error(
        "permission denied reading {path} (hint: the user running modelcache needs read permission on the file and search permission on every directory above it)"
    )]
    Unreadable {
        /// The file or directory.
        path: String,
        /// The OS error.
        #[source]
        source: BoxError,
    },
    /// A failure worth retrying: throttling, a 5xx, a timeout, a reset, a short body or a stall.
    #[error("{cause} while reading {path}")]
    Transient {
        /// What was being read.
        path: String,
        /// Why, for retry accounting.
        cause: RetryCause,
        /// The delay the server asked for (`Retry-After`), if any.
        retry_after: Option<Duration>,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The server answered a different byte range than requested.
    #[error("the source answered bytes {got:?} of {path} where {want:?} was requested")]
    UnexpectedRange {
        /// The file.
        path: String,
        /// The requested range.
        want: Range<u64>,
        /// The answered range.
        got: Range<u64>,
    },
    /// A listed name is absolute, contains `..`, or is otherwise unsafe as a local path.
    #[error("refusing file name {name:?} from the source: {reason}")]
    UnsafeName {
        /// The name as listed.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A `file://` source reaches outside the directory it is confined to, through a symbolic
    /// link (a request may only name sources under `api.allowed_sources`).
    #[error(
        "{path} resolves to {target}, outside {allowed}: a source named by a request may not reach outside its allowed prefix"
    )]
    Outside {
        /// The file or directory as listed.
        path: String,
        /// Where its links lead.
        target: Box<str>,
        /// The directory it must stay in.
        allowed: Box<str>,
    },
    /// A `file://` source reaches one directory twice (a link loop, or a second link to it).
    #[error(
        "{path} leads to a directory already listed as {first} (a symbolic link loop, or a second link to it); a model must not contain one"
    )]
    LinkLoop {
        /// The path that leads back.
        path: String,
        /// Where the directory was first listed.
        first: String,
    },
    /// A small whole file (the manifest) is larger than any such file may be.
    #[error("{path} holds {size} bytes, over the {limit}-byte limit for this file")]
    TooLarge {
        /// The file.
        path: String,
        /// Its size (at least).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The listing holds more files than a model may.
    #[error(
        "the source lists more than {limit} files under its prefix; that is not one model (hint: point the source at the model's own directory)"
    )]
    TooManyFiles {
        /// The limit.
        limit: usize,
    },
    /// The source URL could not be understood.
    #[error("invalid source URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any query string redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The Azure client could not be configured from the URL and environment.
    #[error("cannot configure the Azure Blob client for {url}")]
    Config {
        /// The URL with any query string redacted.
        url: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// Any other failure the caller cannot fix by retrying.
    #[error("reading {path} from the source failed")]
    Other {
        /// What was being read.
        path: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// A boxed error from a dependency.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a range was retried; counted in the summary and (later) metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RetryCause {
    /// 503 ServerBusy, 429, or another answer asking us to slow down.
    Throttled,
    /// Another 5xx (e.g. 500 OperationTimeout).
    ServerError,
    /// The connection failed or was reset.
    Connection,
    /// A request timed out.
    Timeout,
    /// The body ended before the range did.
    ShortBody,
    /// No byte arrived within the stall timeout.
    Stalled,
    /// The server answered a ranged GET with something else: another byte range, a whole-blob
    /// 200, a missing or unreadable `Content-Range` (a misbehaving proxy or a server hiccup).
    BadRange,
    /// The bytes received do not match the checksum the server sent with them (a bit flipped
    /// in transit).
    Corrupt,
}

impl RetryCause {
    /// Every cause, for reports.
    pub const ALL: [RetryCause; 8] = [
        RetryCause::Throttled,
        RetryCause::ServerError,
        RetryCause::Connection,
        RetryCause::Timeout,
        RetryCause::ShortBody,
        RetryCause::Stalled,
        RetryCause::BadRange,
        RetryCause::Corrupt,
    ];

    /// A short snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryCause::Throttled => "throttled",
            RetryCause::ServerError => "server_error",
            RetryCause::Connection => "connection",
            RetryCause::Timeout => "timeout",
            RetryCause::ShortBody => "short_body",
            RetryCause::Stalled => "stalled",
            RetryCause::BadRange => "bad_range",
            RetryCause::Corrupt => "corrupt",
        }
    }
}

impl std::fmt::Display for RetryCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RetryCause::Throttled => "throttled by the server",
            RetryCause::ServerError => "server error",
            RetryCause::Connection => "connection failure",
            RetryCause::Timeout => "request timed out",
            RetryCause::ShortBody => "body ended early",
            RetryCause::Stalled => "no data within the stall timeout",
            RetryCause::BadRange => "an answer that was not the requested range",
            RetryCause::Corrupt => "bytes that do not match the checksum sent with them",
        })
    }
}

impl SourceError {
    /// The retry cause when this failure is worth retrying.
    pub fn retry_cause(&self) -> Option<RetryCause> {
        match self {
            SourceError::Transient { cause, .. } => Some(*cause),
            SourceError::UnexpectedRange { .. } => Some(RetryCause::BadRange),
            _ => None,
        }
    }

    /// The delay the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub(crate) fn transient(
        path: &str,
        cause: RetryCause,
        source: impl Into<BoxError>,
    ) -> SourceError {
        SourceError::Transient {
            path: path.to_string(),
            cause,
            retry_after: None,
            source: source.into(),
        }
    }
}

/// A place model files are read from.
#[async_trait]
pub trait Source: std::fmt::Debug + Send + Sync {
    /// The source's location for logs and markers, with secrets redacted.
    fn describe(&self) -> String;

    /// Lists every file under the prefix, with names relative to it (checked by
    /// [`validate_name`]).
    async fn list(&self) -> Result<Vec<RemoteFile>, SourceError>;

    /// Reads `range` of `file`, failing with [`SourceError::Changed`] if the file's version is no
    /// longer `file.etag`.
    async fn read_range(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError>;

    /// Like [`Source::read_range`], but each byte is checked in transit with a checksum the
    /// server sends (Blob's transactional MD5): a mismatch is a transient error with
    /// [`RetryCause::Corrupt`] and none of the bad bytes are yielded. Used when there is no
    /// manifest to catch a flipped bit afterwards. A source without such checksums reads
    /// unchecked, and says so in [`Source::transfers_checked`].
    async fn read_range_checked(
        &self,
        file: &RemoteFile,
        range: Range<u64>,
    ) -> Result<ByteStream, SourceError> {
        self.read_range(file, range).await
    }

    /// Whether every [`Source::read_range_checked`] so far was really checked in transit.
    fn transfers_checked(&self) -> bool {
        false
    }

    /// Reads a small whole file (the manifest); `None` when it does not exist.
    async fn read_small(&self, path: &str) -> Result<Option<Bytes>, SourceError>;

    /// Writes a small whole file (the manifest) into the prefix.
    async fn put_small(&self, path: &str, data: Bytes) -> Result<(), SourceError>;

    /// A URL another program (Dragonfly's dfdaemon) can read `file` from on its own, carrying a
    /// read-only credential for that one file that expires after `valid_for`; `None` when this
    /// kind of source has no such URL (local directories).
    async fn shareable_url(
        &self,
        _file: &RemoteFile,
        _valid_for: Duration,
    ) -> Result<Option<String>, SourceError> {
        Ok(None)
    }
}

/// Options for opening a source that are not part of its URL.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Storage account for `az://` URLs; falls back to `AZURE_STORAGE_ACCOUNT_NAME`.
    pub account: Option<String>,
    /// For `file://` sources: a directory every file must lie beneath once symbolic links are
    /// resolved (the allowed prefix a request named the source under). Unset, links are
    /// followed anywhere (the operator's own sources: a Hugging Face snapshot links into its
    /// cache's blob directory).
    pub confine: Option<std::path::PathBuf>,
}

/// Largest small whole file ([`Source::read_small`], the manifest) read into memory: a
/// manifest line is about 150 bytes, so this is over 100,000 files.
pub const MAX_SMALL_FILE: u64 = 16 << 20;

/// Most files a listing may hold: a model has tens; a prefix holding more is a mistake, and each
/// listed file costs memory.
pub const MAX_LISTED_FILES: usize = 20_000;

/// Opens a source from a URL: `az://CONTAINER/PREFIX`,
/// `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]` or `file:///PATH`.
pub fn open(
    url: &str,
    env: &Environment,
    options: &SourceOptions,
) -> Result<Arc<dyn Source>, SourceError> {
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Arc::new(file::FileSource::new(
            path,
            options.confine.as_deref(),
        )?));
    }
    if url.starts_with("az://") || url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Arc::new(azure::AzureSource::open(url, env, options)?));
    }
    Err(SourceError::InvalidUrl {
        url: redact_url(url),
        reason: "expected az://CONTAINER/PREFIX, https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX or file:///PATH".into(),
    })
}

/// Replaces a URL's query string (a SAS token) with `REDACTED`.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?REDACTED"),
        None => url.to_string(),
    }
}

/// Checks that a name from a listing or manifest is safe to use as a relative local path.
pub fn validate_name(name: &str) -> Result<(), SourceError> {
    let refuse = |reason| {
        Err(SourceError::UnsafeName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("the name is empty");
    }
    if name.starts_with('/') {
        return refuse("absolute paths are not allowed");
    }
    if name.contains('\\') || name.contains('\0') {
        return refuse("backslashes and NUL bytes are not allowed");
    }
    if name.len() > 1024 {
        return refuse("the name is longer than 1024 bytes");
    }
    for part in name.split('/') {
        match part {
            "" => return refuse("empty path segments are not allowed"),
            "." | ".." => return refuse("`.` and `..` segments could escape the destination"),
            _ if part.ends_with(".partial") => {
                return refuse("names ending in .partial collide with staging files");
            }
            _ if part == ".modelcache" => {
                return refuse(".modelcache is reserved for the cache's own records");
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_names_are_refused_with_the_name() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "x.partial",
            ".modelcache/ready.json",
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        for good in ["config.json", "a/b/c.safetensors", "..hidden", "a..b"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn sas_tokens_are_redacted() {
        assert_eq!(
            redact_url("https://a.blob.core.windows.net/c/p?sv=1&sig=secret"),
            "https://a.blob.core.windows.net/c/p?REDACTED"
        );
        assert_eq!(redact_url("az://c/p"), "az://c/p");
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let err = open(
            "s3://bucket/x",
            &Environment::default(),
            &SourceOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("s3://bucket/x"), "{err}");
    }
}
