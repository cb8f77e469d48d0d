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
    /// When the first byte arrived from the source (or dfdaemon).
    first_byte: std::sync::OnceLock<std::time::Instant>,
    total: AtomicU64,
    fetched: AtomicU64,
    reused: AtomicU64,
    retries: [AtomicU64; RetryCause::ALL.len()],
    concurrency: AtomicUsize,
    hedged: AtomicU64,
    via_peer: AtomicU64,
    via_back_to_source: AtomicU64,
    dragonfly_files: AtomicU64,
    dragonfly_fallbacks: AtomicU64,
    dragonfly_rejected: AtomicU64,
}

/// Bytes received in a run by where they came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesByOrigin {
    /// modelcache's own ranged GETs to the source.
    pub direct: u64,
    /// Through dfdaemon, from another node's dfdaemon (or its own cache of the task).
    pub peer: u64,
    /// Through dfdaemon, which read the source itself.
    pub back_to_source: u64,
}

/// What the Dragonfly path did in a run, counted in files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DragonflyCounts {
    /// Files that came through dfdaemon and matched the manifest.
    pub files: u64,
    /// Files fetched directly because dfdaemon was absent, failed, stalled or was too slow.
    pub fallbacks: u64,
    /// Files dfdaemon delivered that did not match the manifest: discarded and fetched directly.
    pub rejected: u64,
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

    /// When each step of this run happened so far, in seconds after `origin`.
    ///
    /// The last byte is when the last download phase ended (a repair downloads again after
    /// verifying); a run that reused every byte has neither a first nor a last byte.
    pub fn steps(&self, origin: std::time::Instant) -> Steps {
        let log = self.phase_log.lock().unwrap_or_else(|p| p.into_inner());
        let after = |t: std::time::Instant| t.saturating_duration_since(origin).as_secs_f64();
        let first = |phase: Phase| {
            log.iter()
                .find(|(p, _)| *p == phase)
                .map(|(_, t)| after(*t))
        };
        let first_byte = self.first_byte.get().map(|t| after(*t));
        let last_byte = first_byte.and_then(|_| {
            let last_download = log.iter().rposition(|(p, _)| *p == Phase::Downloading)?;
            log.get(last_download + 1).map(|(_, t)| after(*t))
        });
        Steps {
            listing: first(Phase::Listing),
            first_byte,
            last_byte,
            verified: first(Phase::Publishing),
            published: first(Phase::Done),
        }
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
        if bytes > 0 && self.first_byte.get().is_none() {
            let _ = self.first_byte.set(std::time::Instant::now());
        }
        self.fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts bytes dfdaemon wrote; they are part of [`Progress::fetched`] too (and, like
    /// retried bytes, stay counted when the file is then discarded).
    pub(crate) fn add_via_dragonfly(&self, bytes: u64, from_peer: bool) {
        self.add_fetched(bytes);
        if from_peer {
            self.via_peer.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.via_back_to_source.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn dragonfly_file(&self) {
        self.dragonfly_files.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dragonfly_fallback(&self) {
        self.dragonfly_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dragonfly_rejected(&self) {
        self.dragonfly_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes fetched in this run by origin.
    pub fn by_origin(&self) -> BytesByOrigin {
        let peer = self.via_peer.load(Ordering::Relaxed);
        let back_to_source = self.via_back_to_source.load(Ordering::Relaxed);
        BytesByOrigin {
            direct: self.fetched().saturating_sub(peer + back_to_source),
            peer,
            back_to_source,
        }
    }

    /// The Dragonfly path's file counts in this run.
    pub fn dragonfly(&self) -> DragonflyCounts {
        DragonflyCounts {
            files: self.dragonfly_files.load(Ordering::Relaxed),
            fallbacks: self.dragonfly_fallbacks.load(Ordering::Relaxed),
            rejected: self.dragonfly_rejected.load(Ordering::Relaxed),
        }
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

/// When each step of one fill happened, in seconds after an origin: the command's start for
/// `modelcache prefetch`, the agent's start in the agent. `None`: not (yet) reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Steps {
    /// Listing the source began.
    pub listing: Option<f64>,
    /// The first byte arrived.
    pub first_byte: Option<f64>,
    /// The last byte arrived (the download ended).
    pub last_byte: Option<f64>,
    /// Every byte was verified (publishing began).
    pub verified: Option<f64>,
    /// The revision was published.
    pub published: Option<f64>,
}

impl Steps {
    /// The steps reached, in order, as `(name, seconds)`.
    pub fn reached(&self) -> Vec<(&'static str, f64)> {
        [
            ("listing", self.listing),
            ("first_byte", self.first_byte),
            ("last_byte", self.last_byte),
            ("verified", self.verified),
            ("published", self.published),
        ]
        .into_iter()
        .filter_map(|(name, at)| at.map(|at| (name, at)))
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
    /// Bytes fetched by origin.
    #[serde(default)]
    pub by_origin: BytesByOrigin,
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
            by_origin: self.by_origin(),
            updated_unix_ms: now,
        }
    }
}
