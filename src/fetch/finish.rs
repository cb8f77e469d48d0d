//! The last phases: the structure of every safetensors header and index, then the ready marker
//! and the atomic publish, then the staging directory goes.

use std::collections::HashMap;
use std::path::PathBuf;

use tracing::warn;

use super::PrefetchError;
use super::pieces::Engine;
use super::plan::Plan;
use super::signed::{SignatureRecord, SignedPlan};
use crate::store::{
    Layout, ModelName, RECORDS_DIR, ReadyFile, ReadyMarker, SIGNATURE_COPY, StagedModel,
    Verification, publish, write_synced,
};
use crate::verify::VerifyError;
use crate::verify::hash::combine;
use crate::verify::structure::{
    ParseBudget, ShardTensors, add_header, check_index, check_safetensors, header_len, is_index,
    is_safetensors, read_index,
};

/// Checks every staged safetensors header, then every index against those headers; returns
/// what is odd but loads (see [`check_index`]), each also logged.
pub(super) async fn check_structure(
    layout: &Layout,
    name: &ModelName,
    plan: &Plan,
    budget: &ParseBudget,
) -> Result<Vec<String>, PrefetchError> {
    let files: Vec<(String, PathBuf)> = plan
        .files
        .iter()
        .filter(|f| is_safetensors(&f.path) || is_index(&f.path))
        .map(|f| (f.path.clone(), layout.partial_path(name, &f.path)))
        .collect();
    let budget = budget.clone();
    let warnings = tokio::task::spawn_blocking(move || check_files(&files, &budget))
        .await
        .map_err(|e| PrefetchError::Internal(e.to_string()))??;
    for warning in &warnings {
        warn!(model.name = %name, "{name}: {warning}");
    }
    Ok(warnings)
}

fn check_files(
    files: &[(String, PathBuf)],
    budget: &ParseBudget,
) -> Result<Vec<String>, VerifyError> {
    let mut shards: HashMap<String, ShardTensors> = HashMap::new();
    let mut warnings = Vec::new();
    let mut headers = 0;
    for (rel, path) in files.iter().filter(|(rel, _)| is_safetensors(rel)) {
        let _held = budget.hold_blocking(header_len(path)?);
        let (tensors, header_len) = check_safetensors(path, rel)?;
        add_header(&mut headers, header_len, rel)?;
        shards.insert(rel.clone(), tensors);
    }
    for (rel, path) in files.iter().filter(|(rel, _)| is_index(rel)) {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        let _held = budget.hold_blocking(size);
        let bytes = read_index(path, rel)?;
        warnings.extend(check_index(rel, &bytes, &shards)?);
    }
    Ok(warnings)
}

/// What the ready marker says besides the files.
pub(super) struct Outcome<'a> {
    /// The source, redacted.
    pub(super) source: String,
    pub(super) verification: Verification,
    pub(super) warnings: Vec<String>,
    /// The signature's name in the source.
    pub(super) signature_file: &'a str,
}

/// Writes the ready marker, publishes the staged files as the plan's revision and removes the
/// staging directory; returns the revision directory linked.
pub(super) async fn publish_staged(
    layout: &Layout,
    name: &ModelName,
    plan: &Plan,
    engine: &Engine,
    outcome: Outcome<'_>,
) -> Result<String, PrefetchError> {
    let Outcome {
        source,
        verification,
        warnings,
        signature_file,
    } = outcome;
    let files: Vec<ReadyFile> = engine
        .files
        .iter()
        .map(|s| ReadyFile {
            path: s.remote.path.clone(),
            size: s.remote.size,
            blake3: engine.options.hash.then(|| {
                let digests: Vec<_> = s.digests().into_iter().flatten().collect();
                combine(&digests).to_hex().to_string()
            }),
            mtime_ns: None,
            etag: Some(s.remote.etag.clone()).filter(|e| !e.is_empty()),
        })
        .collect();
    let marker = ReadyMarker {
        name: name.to_string(),
        source,
        revision: plan.revision.clone(),
        files,
        bytes: plan.files.iter().map(|f| f.size).sum(),
        verification,
        verified_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        warnings,
        damaged: Vec::new(),
        signature: plan.signature.as_ref().map(|s| s.record(signature_file)),
    };
    let manifest_bytes = plan.manifest.as_ref().map(|(_, b)| b.to_vec());
    let signature_bytes = plan.signature.as_ref().map(|s| s.bundle.to_vec());
    let staged_layout = layout.clone();
    let staged_name = name.clone();
    let revision = plan.revision.clone();
    let linked = tokio::task::spawn_blocking(move || {
        publish(
            &staged_layout,
            &StagedModel {
                name: &staged_name,
                revision: &revision,
                marker: &marker,
                manifest: manifest_bytes.as_deref(),
                signature: signature_bytes.as_deref(),
            },
        )
    })
    .await
    .map_err(|e| PrefetchError::Internal(e.to_string()))??;
    remove_staging(layout, name);
    Ok(linked)
}

/// Records on an already published revision the signature that verified it now (a signer the
/// operator rotated in signs the same digests): the bundle's copy first, then the marker.
pub(super) fn record_signature(
    layout: &Layout,
    name: &ModelName,
    dir_name: &str,
    mut marker: ReadyMarker,
    signed: &SignedPlan,
    signature_file: &str,
) -> Result<SignatureRecord, PrefetchError> {
    let record = signed.record(signature_file);
    if marker.signature.as_ref() == Some(&record) {
        return Ok(record);
    }
    let dir = layout.revision_dir(name, dir_name);
    let records = dir.join(RECORDS_DIR);
    let tmp = records.join(format!(".{SIGNATURE_COPY}.tmp-{}", std::process::id()));
    write_synced(&tmp, &signed.bundle)?;
    let copy = records.join(SIGNATURE_COPY);
    std::fs::rename(&tmp, &copy).map_err(|e| PrefetchError::local("rename", tmp.clone(), e))?;
    marker.signature = Some(record.clone());
    marker.write(&dir)?;
    Ok(record)
}

/// Removes `staging/NAME` and the progress record once the files are published.
pub(super) fn remove_staging(layout: &Layout, name: &ModelName) {
    layout.remove_progress(name);
    let staging = layout.staging_dir(name);
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %staging.display(), "could not remove the staging directory {}: {e}", staging.display());
        }
    }
}
