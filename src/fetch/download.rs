//! The download phase: every missing range fetched in parallel into the partial files while
//! hashed, made durable by checkpoints, and each file's hash compared with the manifest (a file
//! that does not match is fetched once more before the model fails).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use super::journal::{Journal, JournalLine};
use super::pieces::Engine;
use super::plan::Plan;
use super::progress::{Phase, Progress};
use super::{PrefetchError, enter_phase};
use crate::store::{Layout, ModelName, StoreError};
use crate::verify::VerifyError;
use crate::verify::hash::combine;
use crate::verify::manifest::ManifestEntry;

/// Downloads every range the engine's files still miss and checks each file against the
/// manifest; returns the files fetched a second time after a mismatch.
pub(super) async fn download_verified(
    engine: &Arc<Engine>,
    journal: &Arc<Mutex<Journal>>,
    plan: &Plan,
    layout: &Layout,
    name: &ModelName,
) -> Result<Vec<String>, PrefetchError> {
    let progress = &engine.progress;
    let options = &engine.options;
    let journal_path = layout.journal_path(name);
    let mut refetched: Vec<String> = Vec::new();
    let expected: HashMap<&str, &ManifestEntry> = plan
        .manifest
        .as_ref()
        .map(|(m, _)| m.entries().map(|e| (e.path.as_str(), e)).collect())
        .unwrap_or_default();

    for pass in 0..2 {
        let jobs = engine.missing_ranges();
        run_with_checkpoints(engine, jobs, journal, &layout.progress_path(name)).await?;

        // Every range is in: combine each file's digests and compare with the manifest.
        enter_phase(progress, name, Phase::Verifying);
        if !options.hash {
            break;
        }
        let mut mismatched = Vec::new();
        for (index, slot) in engine.files.iter().enumerate() {
            let digests: Vec<_> = slot.digests().into_iter().flatten().collect();
            let actual = combine(&digests).to_hex().to_string();
            if let Some(entry) = expected.get(slot.remote.path.as_str()) {
                if entry.blake3 != actual {
                    if pass == 1 {
                        return Err(VerifyError::HashMismatch {
                            path: slot.remote.path.clone(),
                            expected: entry.blake3.clone(),
                            actual,
                        }
                        .into());
                    }
                    warn!(model.name = %name, blob.path = %slot.remote.path, "{}: BLAKE3 does not match the manifest; fetching it once more", slot.remote.path);
                    mismatched.push(slot.remote.path.clone());
                    let mut d = slot.digests.lock().unwrap_or_else(|p| p.into_inner());
                    d.iter_mut().for_each(|x| *x = None);
                    // The signature's digests are computed again over the new bytes.
                    if let Some(sequential) = &engine.sequential {
                        sequential.reset(index);
                    }
                }
            }
        }
        if mismatched.is_empty() {
            break;
        }
        // Lines journaled during the first pass for those files must go too.
        forget(journal, &journal_path, &mismatched)?;
        refetched.extend(mismatched);
        enter_phase(progress, name, Phase::Downloading);
    }

    Ok(refetched)
}

/// Drops the journal's lines of `files`, so the next pass or run fetches them again.
pub(super) fn forget(
    journal: &Arc<Mutex<Journal>>,
    journal_path: &std::path::Path,
    files: &[String],
) -> Result<(), StoreError> {
    let mut still: Vec<JournalLine> = Journal::load(journal_path)?;
    still.retain(|l| !files.contains(&l.path));
    *journal.lock().unwrap_or_else(|p| p.into_inner()) = Journal::rewrite(journal_path, &still)?;
    Ok(())
}

/// Runs the engine while a checkpoint task makes finished ranges durable every two seconds;
/// whatever the outcome, a last checkpoint runs, so a failed or cancelled run keeps its work.
async fn run_with_checkpoints(
    engine: &Arc<Engine>,
    jobs: Vec<(usize, u64)>,
    journal: &Arc<Mutex<Journal>>,
    progress_file: &std::path::Path,
) -> Result<(), PrefetchError> {
    let ticker = {
        let engine = Arc::clone(engine);
        let journal = Arc::clone(journal);
        let progress_file = progress_file.to_path_buf();
        Periodic::start(Duration::from_secs(2), move || {
            let (engine, journal, progress_file) = (
                Arc::clone(&engine),
                Arc::clone(&journal),
                progress_file.clone(),
            );
            async move {
                if let Err(e) = checkpoint(&engine, &journal).await {
                    warn!("checkpoint of the resume journal failed: {e}");
                }
                write_progress(&progress_file, &engine.progress);
            }
        })
    };
    write_progress(progress_file, &engine.progress);
    let result = engine.run(jobs).await;
    ticker.stop().await;
    write_progress(progress_file, &engine.progress);
    let flushed = checkpoint(engine, journal).await;
    result?;
    flushed.map_err(PrefetchError::from)
}

/// A job run every interval on its own task until [`Periodic::stop`], which waits for a run in
/// progress to end instead of cancelling it. A checkpoint cancelled at an `await` would leave
/// its blocking append running unowned: lines taken from the engine reach the journal after the
/// final checkpoint, after the journal was read to decide how the model was verified, or after
/// it was rewritten for a refetch.
pub(super) struct Periodic {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Periodic {
    /// Runs `job` every `every`, the first time one interval from now.
    pub(super) fn start<F, Fut>(every: Duration, job: F) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            // A slow run delays the next one rather than making a burst of them.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                tokio::select! {
                    // A stop wins over a tick that is due as well.
                    biased;
                    () = token.cancelled() => return,
                    _ = interval.tick() => {}
                }
                job().await;
            }
        });
        Self { stop, task }
    }

    /// Stops the ticks; returns once a run in progress has ended.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        // A job that panicked has nothing left running; its panic was already reported.
        let _ = self.task.await;
    }
}

/// Best effort: progress is for people watching, so a failure to write it is not an error.
pub(super) fn write_progress(path: &std::path::Path, progress: &Progress) {
    if let Ok(json) = serde_json::to_vec(&progress.snapshot()) {
        let _ = crate::store::replace_readable(path, &json);
    }
}

/// Makes finished ranges durable: fdatasync each partial file they wrote, then append their lines
/// to the journal and fsync it.
async fn checkpoint(engine: &Arc<Engine>, journal: &Arc<Mutex<Journal>>) -> Result<(), StoreError> {
    let finished = engine.take_finished();
    if finished.is_empty() {
        return Ok(());
    }
    let journal = Arc::clone(journal);
    tokio::task::spawn_blocking(move || {
        let mut synced: Vec<*const std::fs::File> = Vec::new();
        for f in &finished {
            let ptr = Arc::as_ptr(&f.file);
            if !synced.contains(&ptr) {
                f.file
                    .sync_data()
                    .map_err(StoreError::io("fsync", std::path::Path::new(&f.line.path)))?;
                synced.push(ptr);
            }
        }
        let lines: Vec<JournalLine> = finished.into_iter().map(|f| f.line).collect();
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&lines)
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::Io {
            action: "checkpoint",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Fails before the first byte when the staging filesystem cannot hold what is still missing.
pub(super) fn check_space(staging: &std::path::Path, needed: u64) -> Result<(), PrefetchError> {
    if needed == 0 {
        return Ok(());
    }
    std::fs::create_dir_all(staging)
        .map_err(|e| PrefetchError::local("create", staging.to_path_buf(), e))?;
    let stat = nix::sys::statvfs::statvfs(staging).map_err(|e| {
        PrefetchError::local("check free space of", staging.to_path_buf(), e.into())
    })?;
    #[expect(
        clippy::useless_conversion,
        reason = "statvfs field types differ between platforms"
    )]
    let available =
        u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size()));
    // Headroom for the journal, the records and filesystem metadata.
    let with_headroom = needed.saturating_add(needed / 100).saturating_add(4 << 20);
    if with_headroom > available {
        return Err(PrefetchError::NoSpace {
            dir: staging.to_path_buf(),
            needed: with_headroom,
            available,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A checkpoint in progress when the download ends runs to its end before `stop` returns:
    /// its blocking work never outlives the caller (cancelling it at an `await`, as a task's
    /// `abort` does, left the journal append running after the final checkpoint and after the
    /// journal was read to decide the model's verification).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_waits_for_the_run_in_progress() {
        let started = Arc::new(tokio::sync::Notify::new());
        let ended = Arc::new(AtomicU32::new(0));
        let ticker = {
            let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
            Periodic::start(Duration::from_millis(10), move || {
                let (started, ended) = (Arc::clone(&started), Arc::clone(&ended));
                async move {
                    started.notify_one();
                    tokio::task::spawn_blocking(move || {
                        std::thread::sleep(Duration::from_millis(300));
                        ended.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
                    .ok();
                }
            })
        };
        started.notified().await;
        ticker.stop().await;
        assert_eq!(ended.load(Ordering::SeqCst), 1);
        // And nothing runs after it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }
}
