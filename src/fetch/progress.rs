//! Live counters of a prefetch, shared between the engine and whoever reports on it (the
//! command line's progress line today, the agent's API later). Lock-free: the hot path only
//! adds to atomics.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::source::RetryCause;

/// What a prefetch is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listing the source and planning.
    Listing,
    /// Downloading and hashing ranges.
    Downloading,
    /// Checking hashes and structure.
    Verifying,
    /// Moving into the store and linking.
    Publishing,
    /// Finished.
    Done,
}

impl Phase {
    /// A lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Listing => "listing",
            Phase::Downloading => "downloading",
            Phase::Verifying => "verifying",
            Phase::Publishing => "publishing",
            Phase::Done => "done",
        }
    }
}

/// Counters of one prefetch.
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    phase_log: std::sync::Mutex<Vec<(Phase, std::time::Instant)>>,
    total: AtomicU64,
    fetched: AtomicU64,
    reused: AtomicU64,
    retries: [AtomicU64; RetryCause::ALL.len()],
    concurrency: AtomicUsize,
    hedged: AtomicU64,
}

impl Progress {
    /// Fresh counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters `phase`; returns the phase that ended and how long it lasted, when it changed.
    pub(crate) fn set_phase(&self, phase: Phase) -> Option<(Phase, std::time::Duration)> {
        let previous = self.phase.swap(phase as u8, Ordering::Relaxed);
        let mut log = self.phase_log.lock().unwrap_or_else(|p| p.into_inner());
        let ended = match log.last() {
            Some((p, since)) if previous != phase as u8 => Some((*p, since.elapsed())),
            _ => None,
        };
        if log.is_empty() || ended.is_some() {
            log.push((phase, std::time::Instant::now()));
        }
        ended
    }

    /// How long each phase took so far, in order (a phase entered twice appears twice).
    pub fn phase_durations(&self) -> Vec<(Phase, std::time::Duration)> {
        let log = self.phase_log.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        log.iter()
            .enumerate()
            .filter(|(_, (p, _))| *p != Phase::Done)
            .map(|(i, (p, t))| {
                let end = log.get(i + 1).map_or(now, |(_, next)| *next);
                (*p, end.duration_since(*t))
            })
            .collect()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Listing,
            1 => Phase::Downloading,
            2 => Phase::Verifying,
            3 => Phase::Publishing,
            _ => Phase::Done,
        }
    }

    pub(crate) fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_fetched(&self, bytes: u64) {
        self.fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_reused(&self, bytes: u64) {
        self.reused.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn retried(&self, cause: RetryCause) {
        if let Some(i) = RetryCause::ALL.iter().position(|c| *c == cause) {
            self.retries[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes the model needs in all.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes received from the source in this run (retried bytes count again).
    pub fn fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Bytes taken from an earlier run's finished ranges or an already published revision.
    pub fn reused(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    pub(crate) fn set_concurrency(&self, ranges: usize) {
        self.concurrency.store(ranges, Ordering::Relaxed);
    }

    /// Ranges allowed in flight now (chosen by the adaptive controller, or the fixed limit);
    /// 0 before the download starts.
    pub fn concurrency(&self) -> usize {
        self.concurrency.load(Ordering::Relaxed)
    }

    pub(crate) fn hedged(&self) {
        self.hedged.fetch_add(1, Ordering::Relaxed);
    }

    /// Slow ranges at the end of a download asked for again on a second connection.
    pub fn hedged_ranges(&self) -> u64 {
        self.hedged.load(Ordering::Relaxed)
    }

    /// Answers so far that asked to slow down (503, 429).
    pub(crate) fn throttled(&self) -> u64 {
        self.retries()
            .into_iter()
            .find(|(c, _)| *c == RetryCause::Throttled)
            .map_or(0, |(_, n)| n)
    }

    /// Retries so far, by cause.
    pub fn retries(&self) -> Vec<(RetryCause, u64)> {
        RetryCause::ALL
            .iter()
            .zip(&self.retries)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A point-in-time copy of the counters, written to `progress/NAME.json` so that
/// `modelcache wait --cache-root` can report progress with no network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// The phase name.
    pub phase: String,
    /// Bytes in the model.
    pub total: u64,
    /// Bytes fetched in this run.
    pub fetched: u64,
    /// Bytes reused.
    pub reused: u64,
    /// Ranges allowed in flight (see [`Progress::concurrency`]).
    #[serde(default)]
    pub concurrency: usize,
    /// When, in milliseconds since the Unix epoch.
    pub updated_unix_ms: u64,
}

impl Progress {
    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        ProgressSnapshot {
            phase: self.phase().as_str().to_string(),
            total: self.total(),
            fetched: self.fetched(),
            reused: self.reused(),
            concurrency: self.concurrency(),
            updated_unix_ms: now,
        }
    }
}
