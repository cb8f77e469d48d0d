//! The listing phase: what the source holds, which of its files are the model, what its
//! manifest says, and the revision that names that exact content.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::progress::Progress;
use super::signed::{self, SignatureMode, SignedPlan};
use super::{PrefetchError, PrefetchRequest, error_chain};
use crate::config::{FetchOptions, Selection};
use crate::source::{MANIFEST_NAME, RemoteFile, RetryCause, Source, SourceError, validate_name};
use crate::verify::VerifyError;
use crate::verify::manifest::Manifest;

/// What the listing, the manifest and the signature say the model is.
pub(super) struct Plan {
    pub(super) files: Vec<RemoteFile>,
    /// The source's manifest, or the one a BLAKE3 signature of whole files stands for.
    pub(super) manifest: Option<(Manifest, bytes::Bytes)>,
    /// The publisher's signature, verified and covering exactly the files.
    pub(super) signature: Option<SignedPlan>,
    pub(super) revision: String,
}

/// Lists the source, selects the model's files, reads the signature and the manifest, checking
/// they all agree.
pub(super) async fn plan(
    source: &Arc<dyn Source>,
    request: &PrefetchRequest,
    progress: &Progress,
) -> Result<Plan, PrefetchError> {
    let url = source.describe();
    let policy = &request.signature;
    let files = list_selected(
        source,
        &request.selection,
        &request.options,
        policy.excluded_name(),
        &request.cancel,
        progress,
    )
    .await?;
    let signature = match policy.excluded_name() {
        None => None,
        Some(file) => {
            let bundle = retried(
                &url,
                &request.options,
                &request.cancel,
                progress,
                file,
                || source.read_small(file),
            )
            .await?;
            let location = format!("{url}/{file}");
            if bundle.is_some() && policy.trust.is_empty() && policy.mode == SignatureMode::Optional
            {
                warn!(
                    model.name = %request.model,
                    "{}: {location} is there but no trusted signer is configured to check it: the model is published as unsigned",
                    request.model
                );
            }
            let signed = signed::check_bundle(policy, &location, bundle)?;
            if let Some(s) = &signed {
                signed::check_coverage(&files, &s.signed, &request.selection, file)?;
            }
            signed
        }
    };
    let mut manifest = match retried(
        &url,
        &request.options,
        &request.cancel,
        progress,
        MANIFEST_NAME,
        || source.read_small(MANIFEST_NAME),
    )
    .await?
    {
        Some(bytes) => {
            let m = Manifest::parse(&bytes, &format!("{url}/{MANIFEST_NAME}"))?;
            Some((m, bytes))
        }
        None if request.require_manifest && signature.is_none() => {
            return Err(VerifyError::ManifestRequired.into());
        }
        None => None,
    };
    if let Some(s) = signature.as_ref().filter(|s| s.stands_in_for_manifest()) {
        let signed = signed::manifest_from_signature(&files, &s.signed)?;
        match &manifest {
            Some((m, _)) => {
                if let Some(e) = signed::disagreement(&signed, m) {
                    return Err(e.into());
                }
            }
            None => {
                let bytes = bytes::Bytes::from(signed.to_json());
                manifest = Some((signed, bytes));
            }
        }
    }
    if let Some((m, _)) = &manifest {
        check_against_manifest(&files, m, &request.selection)?;
    }
    let revision = revision_of(
        &files,
        manifest.as_ref().map(|(m, _)| m),
        signature.as_ref(),
    );
    Ok(Plan {
        files,
        manifest,
        signature,
        revision,
    })
}

/// Lists the source and keeps the selected files, refusing unsafe names and an empty selection.
pub(super) async fn list_selected(
    source: &Arc<dyn Source>,
    selection: &Selection,
    options: &FetchOptions,
    signature_file: Option<&str>,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<Vec<RemoteFile>, PrefetchError> {
    let url = source.describe();
    let listed = retried(&url, options, cancel, progress, "listing", || source.list()).await?;
    if listed.is_empty() {
        return Err(PrefetchError::Source {
            url: url.clone(),
            source: SourceError::NotFound { path: url },
        });
    }
    let listed_count = listed.len();
    let files: Vec<RemoteFile> = listed
        .into_iter()
        .filter(|f| {
            f.path != MANIFEST_NAME
                && Some(f.path.as_str()) != signature_file
                && selection.is_selected(&f.path)
        })
        .collect();
    for f in &files {
        validate_name(&f.path).map_err(PrefetchError::UnsafeName)?;
    }
    refuse_file_directory_clashes(&files)?;
    if files.is_empty() {
        let (include, exclude) = selection.patterns();
        return Err(PrefetchError::NothingSelected {
            url,
            include: include.to_vec(),
            exclude: exclude.to_vec(),
            listed: listed_count,
        });
    }
    Ok(files)
}

/// Refuses a selection holding both a file `a` and a file under `a/`: a directory cannot hold
/// both, so the publish would fail on every attempt.
fn refuse_file_directory_clashes(files: &[RemoteFile]) -> Result<(), PrefetchError> {
    let names: std::collections::BTreeSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for f in files {
        let mut dirs = f.path.match_indices('/').map(|(at, _)| &f.path[..at]);
        if let Some(dir) = dirs.find(|d| names.contains(d)) {
            return Err(PrefetchError::FileIsDirectory {
                file: dir.to_string(),
                under: f.path.clone(),
            });
        }
    }
    Ok(())
}

fn check_against_manifest(
    files: &[RemoteFile],
    manifest: &Manifest,
    selection: &Selection,
) -> Result<(), VerifyError> {
    for f in files {
        let entry = manifest
            .get(&f.path)
            .ok_or_else(|| VerifyError::NotInManifest {
                path: f.path.clone(),
            })?;
        if entry.size != f.size {
            return Err(VerifyError::SizeMismatch {
                path: f.path.clone(),
                expected: entry.size,
                actual: f.size,
            });
        }
    }
    for entry in manifest.entries() {
        let listed = files.iter().any(|f| f.path == entry.path);
        if !listed && selection.is_selected(&entry.path) {
            return Err(VerifyError::MissingFromSource {
                path: entry.path.clone(),
            });
        }
    }
    Ok(())
}

/// Calls the source for a whole object (a listing, the manifest) like a range is fetched:
/// a call not answered within the stall timeout (a server or identity endpoint that accepts
/// and never answers) and transient failures are retried up to `max_attempts`, honouring
/// `Retry-After`, and counted with the ranges' retries; `cancel` stops the call and the wait
/// between attempts at once.
pub(super) async fn retried<T, F, Fut>(
    url: &str,
    options: &FetchOptions,
    cancel: &CancellationToken,
    progress: &Progress,
    what: &str,
    mut call: F,
) -> Result<T, PrefetchError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SourceError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let answer = tokio::select! {
            () = cancel.cancelled() => return Err(PrefetchError::Cancelled),
            answer = tokio::time::timeout(options.stall_timeout, call()) => answer,
        };
        let result = answer.unwrap_or_else(|_| {
            Err(SourceError::transient(
                what,
                RetryCause::Stalled,
                format!("no answer within {}s", options.stall_timeout.as_secs_f32()),
            ))
        });
        match result {
            Err(e) if e.retry_cause().is_some() && attempt < options.max_attempts => {
                if let Some(cause) = e.retry_cause() {
                    progress.retried(cause);
                }
                let delay = options.backoff(attempt, e.retry_after());
                warn!(
                    attempt,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "retrying {what} after: {}",
                    error_chain(&e)
                );
                tokio::select! {
                    () = cancel.cancelled() => return Err(PrefetchError::Cancelled),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            other => {
                return other.map_err(|source| PrefetchError::Source {
                    url: url.to_string(),
                    source,
                });
            }
        }
    }
}

/// A revision names the exact content: with a manifest, the files' hashes; without, their ETags;
/// signed, also the digests the signature lists for them (so a published revision was checked
/// against exactly these digests, and a model that becomes signed is fetched and checked once).
fn revision_of(
    files: &[RemoteFile],
    manifest: Option<&Manifest>,
    signature: Option<&SignedPlan>,
) -> String {
    let signed = signature.map(|s| signed::resources_by_path(&s.signed.resources));
    let mut hasher = blake3::Hasher::new();
    for f in files {
        let id = manifest
            .and_then(|m| m.get(&f.path))
            .map_or(f.etag.as_str(), |e| e.blake3.as_str());
        hasher.update(format!("{}\t{}\t{}", f.path, f.size, id).as_bytes());
        if let Some(list) = signed.as_ref().and_then(|s| s.get(f.path.as_str())) {
            for r in list {
                hasher.update(b"\t");
                hasher.update(crate::fetch::journal::hex(&r.digest).as_bytes());
            }
        }
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex()[..16].to_string()
}
