//! Tail hedging: the last ranges of a download decide when it ends, so when only a few remain
//! and one has been running far longer than finished ranges took, its remainder is asked for
//! again on a second connection and whichever copy finishes first is kept.
//!
//! Both copies are pinned to the same ETag, so they carry the same bytes and may write the same
//! offsets of the partial file in any order. The second copy starts at the first one's last
//! flushed position with a copy of its hash state there, so either one's hash covers the whole
//! range. The loser is dropped; a write it had in flight still lands (the same bytes) before
//! the engine's run returns.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::verify::hash::PieceHasher;

/// How many times the median range duration a range must have run to be hedged.
const SLOW_FACTOR: u32 = 3;

/// No range is hedged before it has run this long: a second copy costs a connection and
/// duplicate bytes, worth it for a straggler, not for the jitter of short ranges (a 64 MiB
/// range from Blob Storage takes about 0.5–1 s on one connection).
const MIN_AGE: Duration = Duration::from_secs(3);

/// Finished ranges needed before a median means anything.
const MIN_SAMPLES: usize = 3;

/// Most hedges in one run of the engine.
pub(crate) const MAX_HEDGES: usize = 16;

/// One range in flight, as the hedging monitor and the range's task share it.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// Told to the range's task when it should start its second copy.
    pub(crate) hedge: tokio::sync::Notify,
    /// The first copy's position and hash state after its last write.
    pub(crate) flushed: Mutex<(u64, Option<PieceHasher>)>,
    started: Instant,
    hedged: AtomicBool,
}

impl Ticket {
    /// A ticket for a range starting at `start`, whose hash state is `hasher` there.
    pub(crate) fn new(start: u64, hasher: Option<PieceHasher>, now: Instant) -> Self {
        Self {
            hedge: tokio::sync::Notify::new(),
            flushed: Mutex::new((start, hasher)),
            started: now,
            hedged: AtomicBool::new(false),
        }
    }

    /// Records the first copy's progress after a write.
    pub(crate) fn flushed(&self, pos: u64, hasher: Option<&PieceHasher>) {
        *self.flushed.lock().unwrap_or_else(|p| p.into_inner()) = (pos, hasher.cloned());
    }

    /// Where a second copy starts, and the hash state there.
    pub(crate) fn resume_point(&self) -> (u64, Option<PieceHasher>) {
        self.flushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The ranges in flight and how long finished ones took; decides which to hedge.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    in_flight: HashMap<(usize, u64), std::sync::Arc<Ticket>>,
    durations: Vec<Duration>,
    hedges: usize,
}

impl Tail {
    pub(crate) fn launched(&mut self, key: (usize, u64), ticket: std::sync::Arc<Ticket>) {
        self.in_flight.insert(key, ticket);
    }

    pub(crate) fn finished(&mut self, key: (usize, u64), now: Instant) {
        if let Some(t) = self.in_flight.remove(&key) {
            self.durations
                .push(now.saturating_duration_since(t.started));
        }
    }

    /// Hedges made so far.
    #[cfg(test)]
    pub(crate) fn hedges(&self) -> usize {
        self.hedges
    }

    /// Once nothing is left to launch and at most `few` ranges are in flight, tells each one
    /// that has run longer than [`SLOW_FACTOR`] × the median finished range (and at least
    /// [`MIN_AGE`]) to start its second copy, up to [`MAX_HEDGES`]. Returns how many it told.
    pub(crate) fn check(&mut self, nothing_queued: bool, few: usize, now: Instant) -> usize {
        if !nothing_queued
            || self.in_flight.len() > few
            || self.durations.len() < MIN_SAMPLES
            || self.hedges >= MAX_HEDGES
        {
            return 0;
        }
        let mut sorted = self.durations.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        let threshold = (median * SLOW_FACTOR).max(MIN_AGE);
        let mut told = 0;
        for ticket in self.in_flight.values() {
            if self.hedges >= MAX_HEDGES {
                break;
            }
            let slow = now.saturating_duration_since(ticket.started) > threshold;
            if slow && !ticket.hedged.swap(true, Ordering::Relaxed) {
                ticket.hedge.notify_one();
                self.hedges += 1;
                told += 1;
            }
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tail_with(finished: &[u64], started: Instant) -> Tail {
        let mut tail = Tail::default();
        for (i, ms) in finished.iter().enumerate() {
            let t = Arc::new(Ticket::new(0, None, started));
            tail.launched((0, i as u64), t);
            tail.finished((0, i as u64), started + Duration::from_millis(*ms));
        }
        tail
    }

    #[test]
    fn only_a_slow_range_in_the_tail_is_hedged_and_only_once() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[1000, 1100, 1200, 900], t0);
        let slow = Arc::new(Ticket::new(0, None, t0));
        let fine = Arc::new(Ticket::new(0, None, t0 + Duration::from_millis(2500)));
        tail.launched((1, 0), Arc::clone(&slow));
        tail.launched((1, 1), Arc::clone(&fine));
        let at = t0 + Duration::from_millis(3600);
        // Ranges still queued: never.
        assert_eq!(tail.check(false, 4, at), 0);
        // More in flight than `few`: never.
        assert_eq!(tail.check(true, 1, at), 0);
        // The tail: the range running 3.6 s against a 1.1 s median, not the one at 1.1 s.
        assert_eq!(tail.check(true, 4, at), 1);
        assert!(slow.hedged.load(Ordering::Relaxed));
        assert!(!fine.hedged.load(Ordering::Relaxed));
        assert_eq!(
            tail.check(true, 4, at + Duration::from_secs(10)),
            1,
            "then the other"
        );
        assert_eq!(
            tail.check(true, 4, at + Duration::from_secs(20)),
            0,
            "once each"
        );
        assert_eq!(tail.hedges(), 2);
    }

    #[test]
    fn nothing_is_hedged_without_enough_finished_ranges_or_past_the_bound() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[10, 10], t0);
        tail.launched((1, 0), Arc::new(Ticket::new(0, None, t0)));
        assert_eq!(tail.check(true, 4, t0 + Duration::from_secs(60)), 0);

        let mut tail = tail_with(&[10, 10, 10], t0);
        for i in 0..(MAX_HEDGES as u64 + 5) {
            tail.launched((2, i), Arc::new(Ticket::new(0, None, t0)));
        }
        assert_eq!(
            tail.check(true, 100, t0 + Duration::from_secs(60)),
            MAX_HEDGES
        );
        assert_eq!(tail.check(true, 100, t0 + Duration::from_secs(90)), 0);
    }

    #[test]
    fn short_ranges_are_not_tails() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[10, 12, 11], t0);
        tail.launched((1, 0), Arc::new(Ticket::new(0, None, t0)));
        // 2.5 s is 200× the median but under three seconds.
        assert_eq!(tail.check(true, 4, t0 + Duration::from_millis(2500)), 0);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_millis(3500)), 1);
    }
}
