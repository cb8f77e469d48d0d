//! Background scrub: re-hashes published models at a bounded rate against the hashes recorded
//! at publish (the manifest's, or those computed while downloading), because a flipped byte
//! whose modification time was kept passes every cheap check. A mismatch marks the revision
//! damaged (so `wait` and `/readyz` stop calling it ready), stages its intact files for the
//! repair, and starts a job that fetches just the bad files and publishes a new revision
//! directory atomically.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Models, State};
use crate::config::agent::ScrubPolicy;
use crate::config::human_bytes;
use crate::fetch::error_chain;
use crate::fetch::journal::{Journal, JournalLine, hex};
use crate::store::lock::{TryLock, try_lock};
use crate::store::{Layout, ModelName, ReadyFile, ReadyMarker, StoreError, Verification};
use crate::verify::cached::{expected_blake3, read_manifest_copy};
use crate::verify::hash::{PieceDigest, PieceHasher, combine, piece_count};

/// Why one model's scrub stopped.
#[derive(Debug, thiserror::Error)]
enum ScrubError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Verify(#[from] crate::verify::VerifyError),
    #[error("stopped")]
    Stopped,
}

/// One file's fresh hash: its piece digests (for the repair's journal) and their root.
struct Hashed {
    digests: Vec<PieceDigest>,
    hex: String,
}

impl Models {
    /// Scrubs every ready model, one at a time, then again `policy.interval` after the start
    /// of each pass, until `stop` fires.
    pub async fn scrub(self: Arc<Self>, policy: ScrubPolicy, stop: CancellationToken) {
        loop {
            let started = Instant::now();
            let ready: Vec<ModelName> = self
                .lock()
                .values()
                .filter(|e| e.state == State::Ready && e.revision.is_some() && e.job.is_none())
                .map(|e| e.spec.name.clone())
                .collect();
            for name in ready {
                match self.scrub_model(&name, policy, &stop).await {
                    Ok(()) => {}
                    Err(ScrubError::Stopped) => return,
                    Err(e) => {
                        warn!(model.name = %name, "{name}: scrub failed: {}", error_chain(&e));
                    }
                }
            }
            let pause = policy.interval.saturating_sub(started.elapsed());
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn scrub_model(
        self: &Arc<Self>,
        name: &ModelName,
        policy: ScrubPolicy,
        stop: &CancellationToken,
    ) -> Result<(), ScrubError> {
        // A model someone works on is skipped this pass: its files are changing anyway.
        let TryLock::Held(held) = try_lock(&self.layout, name, "modelcache agent, scrubbing")?
        else {
            return Ok(());
        };
        let Some(dir_name) = self.layout.published_revision(name) else {
            return Ok(());
        };
        let dir = self.layout.revision_dir(name, &dir_name);
        let mut marker = ReadyMarker::read(&dir)?;
        if !marker.damaged.is_empty() {
            return Ok(());
        }
        let manifest = read_manifest_copy(&dir)?;
        let chunk = self.config.fetch.chunk_size;
        let started = Instant::now();
        let mut bytes = 0;
        let mut intact: Vec<(ReadyFile, Hashed)> = Vec::new();
        let mut bad: Vec<String> = Vec::new();
        for file in &marker.files {
            let Some(expected) = expected_blake3(manifest.as_ref(), file) else {
                continue;
            };
            let path = dir.join(&file.path);
            let stop_reading = stop.clone();
            let rate = policy.rate;
            let hashed = tokio::task::spawn_blocking(move || {
                hash_at_rate(&path, chunk, rate, &stop_reading).map_err(|source| {
                    if stop_reading.is_cancelled() {
                        ScrubError::Stopped
                    } else {
                        ScrubError::Read { path, source }
                    }
                })
            })
            .await
            .map_err(|_| ScrubError::Stopped)??;
            bytes += file.size;
            self.metrics.scrubbed(file.size);
            if hashed.hex == expected {
                intact.push((file.clone(), hashed));
            } else {
                bad.push(file.path.clone());
            }
        }
        if bad.is_empty() {
            info!(model.name = %name, phase = "scrub", size_bytes = bytes, "{name}: scrubbed {} in {:.1} s, every file intact", human_bytes(bytes), started.elapsed().as_secs_f64());
            return Ok(());
        }
        error!(model.name = %name, "{name}: the scrub found {} file(s) changed since publish ({}); fetching just those again", bad.len(), bad.join(", "));
        self.metrics
            .scrub_mismatches(u64::try_from(bad.len()).unwrap_or(u64::MAX));
        let checked = marker.verification == Verification::Md5;
        stage_repair(&self.layout, name, &dir, &intact, chunk, checked)?;
        marker.damaged.clone_from(&bad);
        marker.write(&dir)?;
        drop(held);
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(name.as_str()) {
            // Its bytes are wrong: not ready until repaired.
            entry.state = State::Pending;
            entry.last_error = Some(format!(
                "the scrub found {} file(s) changed since publish ({}); re-fetching them",
                bad.len(),
                bad.join(", ")
            ));
            if entry.job.is_none() {
                self.spawn_job_locked(&mut entries, name.as_str());
            }
        }
        Ok(())
    }
}

/// Hashes a file piece by piece, reading at most `rate` bytes a second (the scrub must not
/// compete with vLLM reading the same disks); fails with `Interrupted` when `stop` fires.
fn hash_at_rate(
    path: &Path,
    chunk: u64,
    rate: u64,
    stop: &CancellationToken,
) -> std::io::Result<Hashed> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let count = piece_count(size, chunk);
    let started = Instant::now();
    let mut read_total: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut digests = Vec::new();
    for index in 0..count {
        let mut hasher = PieceHasher::new(index * chunk, count <= 1);
        let mut left = chunk.min(size - index * chunk);
        while left > 0 {
            if stop.is_cancelled() {
                return Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
            }
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
            read_total += n as u64;
            #[expect(clippy::cast_precision_loss, reason = "a pacing delay")]
            let due = Duration::from_secs_f64(read_total as f64 / rate.max(1) as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        digests.push(hasher.finish());
    }
    let hex = combine(&digests).to_hex().to_string();
    Ok(Hashed { digests, hex })
}

/// Links the intact files of a damaged revision into `staging/NAME` and journals their ranges,
/// so the repair's resume keeps them and fetches only the others. The links share inodes with
/// the published files, which nothing ever writes; the resume drops such a partial rather than
/// write into it (see `fetch::resume`).
fn stage_repair(
    layout: &Layout,
    name: &ModelName,
    dir: &Path,
    intact: &[(ReadyFile, Hashed)],
    chunk: u64,
    checked: bool,
) -> Result<(), StoreError> {
    let staging = layout.staging_dir(name);
    match std::fs::remove_dir_all(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(StoreError::Io {
                action: "remove",
                path: staging,
                source: e,
            });
        }
    }
    let mut lines = Vec::new();
    for (file, hashed) in intact {
        // A marker from before ETags were recorded cannot be matched to a listing: fetched.
        let Some(etag) = &file.etag else { continue };
        let partial = layout.partial_path(name, &file.path);
        if let Some(parent) = partial.parent() {
            std::fs::create_dir_all(parent).map_err(StoreError::io("create", parent))?;
        }
        let published = dir.join(&file.path);
        std::fs::hard_link(&published, &partial).map_err(StoreError::io("link", &published))?;
        for (index, digest) in hashed.digests.iter().enumerate() {
            lines.push(JournalLine {
                path: file.path.clone(),
                size: file.size,
                etag: etag.clone(),
                chunk,
                index: index as u64,
                digest: hex(digest),
                checked,
            });
        }
    }
    std::fs::create_dir_all(&staging).map_err(StoreError::io("create", &staging))?;
    Journal::rewrite(&layout.journal_path(name), &lines)?;
    Ok(())
}
