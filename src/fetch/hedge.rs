//! Tail hedging: the last ranges of a download decide when it ends, so when only a few remain
//! and one is receiving far slower than finished ranges did, its remainder is asked for again on
//! a second connection and whichever copy finishes first is kept.
//!
//! Slowness is judged by rate, not by time: a range's bytes received so far over its age,
//! against the bytes-per-second one connection carried over the finished ranges. A large range
//! that streams at the usual pace is never hedged however long it runs, and small files, which
//! finish in milliseconds, neither make big ranges look slow nor weigh on the usual pace.
//!
//! Both copies are pinned to the same ETag, so they carry the same bytes and may write the same
//! offsets of the partial file in any order. The second copy starts at the first one's last
//! flushed position with a copy of its hash state there, so either one's hash covers the whole
//! range. The loser is dropped; a write it had in flight still lands (the same bytes) before
//! the engine's run returns.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::verify::hash::PieceHasher;

/// How many times slower than the usual pace a range must be receiving to be hedged.
const SLOW_FACTOR: f64 = 3.0;

/// No range is hedged before it has run this long: a second copy costs a connection and
/// duplicate bytes, worth it for a straggler, not for the jitter of short ranges (a 64 MiB
/// range from Blob Storage takes about 0.5–1 s on one connection).
const MIN_AGE: Duration = Duration::from_secs(3);

/// Finished ranges needed before the usual pace means anything.
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
    /// Bytes the first copy has received, written or not (retries included).
    received: AtomicU64,
    started: Instant,
    hedged: AtomicBool,
}

impl Ticket {
    /// A ticket for a range starting at `start`, whose hash state is `hasher` there.
    pub(crate) fn new(start: u64, hasher: Option<PieceHasher>, now: Instant) -> Self {
        Self {
            hedge: tokio::sync::Notify::new(),
            flushed: Mutex::new((start, hasher)),
            received: AtomicU64::new(0),
            started: now,
            hedged: AtomicBool::new(false),
        }
    }

    /// Records the first copy's progress after a write.
    pub(crate) fn flushed(&self, pos: u64, hasher: Option<&PieceHasher>) {
        *self.flushed.lock().unwrap_or_else(|p| p.into_inner()) = (pos, hasher.cloned());
    }

    /// Counts bytes the first copy received.
    pub(crate) fn received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Where a second copy starts, and the hash state there.
    pub(crate) fn resume_point(&self) -> (u64, Option<PieceHasher>) {
        self.flushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The ranges in flight and the pace of finished ones; decides which to hedge.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    in_flight: HashMap<(usize, u64), std::sync::Arc<Ticket>>,
    finished: usize,
    finished_bytes: u64,
    finished_time: Duration,
    hedges: usize,
}

impl Tail {
    pub(crate) fn launched(&mut self, key: (usize, u64), ticket: std::sync::Arc<Ticket>) {
        self.in_flight.insert(key, ticket);
    }

    pub(crate) fn finished(&mut self, key: (usize, u64), now: Instant) {
        let Some(t) = self.in_flight.remove(&key) else {
            return;
        };
        // A hedged range's first copy is the straggler: its pace is not the usual one.
        if !t.hedged.load(Ordering::Relaxed) {
            self.finished += 1;
            self.finished_bytes += t.received.load(Ordering::Relaxed);
            self.finished_time += now.saturating_duration_since(t.started);
        }
    }

    /// Hedges made so far.
    #[cfg(test)]
    pub(crate) fn hedges(&self) -> usize {
        self.hedges
    }

    /// Once nothing is left to launch and at most `few` ranges are in flight, tells each one
    /// that has run at least [`MIN_AGE`] and is receiving [`SLOW_FACTOR`] times slower than one
    /// connection carried over the finished ranges to start its second copy, up to
    /// [`MAX_HEDGES`]. Returns how many it told.
    pub(crate) fn check(&mut self, nothing_queued: bool, few: usize, now: Instant) -> usize {
        if !nothing_queued
            || self.in_flight.len() > few
            || self.finished < MIN_SAMPLES
            || self.finished_time.is_zero()
            || self.hedges >= MAX_HEDGES
        {
            return 0;
        }
        // Bytes per second per connection, weighted by bytes: big ranges set the pace.
        let usual = self.finished_bytes as f64 / self.finished_time.as_secs_f64();
        let mut told = 0;
        for ticket in self.in_flight.values() {
            if self.hedges >= MAX_HEDGES {
                break;
            }
            let age = now.saturating_duration_since(ticket.started);
            if age < MIN_AGE {
                continue;
            }
            let pace = ticket.received.load(Ordering::Relaxed) as f64 / age.as_secs_f64();
            let slow = pace * SLOW_FACTOR < usual;
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

    const MB: u64 = 1_000_000;

    /// A tail whose finished ranges each received `bytes` in `ms`.
    fn tail_with(finished: &[(u64, u64)], started: Instant) -> Tail {
        let mut tail = Tail::default();
        for (i, (bytes, ms)) in finished.iter().enumerate() {
            let t = Arc::new(Ticket::new(0, None, started));
            t.received(*bytes);
            tail.launched((0, i as u64), t);
            tail.finished((0, i as u64), started + Duration::from_millis(*ms));
        }
        tail
    }

    fn in_flight(
        tail: &mut Tail,
        key: (usize, u64),
        started: Instant,
        received: u64,
    ) -> Arc<Ticket> {
        let t = Arc::new(Ticket::new(0, None, started));
        t.received(received);
        tail.launched(key, Arc::clone(&t));
        t
    }

    #[test]
    fn only_a_slow_range_in_the_tail_is_hedged_and_only_once() {
        let t0 = Instant::now();
        // The usual pace: 1 MB/s.
        let mut tail = tail_with(&[(MB, 1000), (MB, 1100), (MB, 900), (MB, 1000)], t0);
        let slow = in_flight(&mut tail, (1, 0), t0, MB / 2);
        let fine = in_flight(&mut tail, (1, 1), t0, 3 * MB);
        let at = t0 + Duration::from_millis(3600);
        // Ranges still queued: never.
        assert_eq!(tail.check(false, 4, at), 0);
        // More in flight than `few`: never.
        assert_eq!(tail.check(true, 1, at), 0);
        // The tail: 0.5 MB in 3.6 s is far below 1 MB/s; 3 MB in 3.6 s is not.
        assert_eq!(tail.check(true, 4, at), 1);
        assert!(slow.hedged.load(Ordering::Relaxed));
        assert!(!fine.hedged.load(Ordering::Relaxed));
        // The other one stalls: at 20 s its 3 MB are 0.15 MB/s.
        assert_eq!(
            tail.check(true, 4, t0 + Duration::from_secs(20)),
            1,
            "then the other"
        );
        assert_eq!(
            tail.check(true, 4, t0 + Duration::from_secs(40)),
            0,
            "once each"
        );
        assert_eq!(tail.hedges(), 2);
    }

    /// A large range streaming at the usual pace runs long because it is large, not because it
    /// is stuck: small files finishing in milliseconds do not make it a straggler.
    #[test]
    fn a_large_range_at_the_usual_pace_is_not_hedged_however_long_it_runs() {
        let t0 = Instant::now();
        let mut tail = tail_with(
            &[
                (200, 5),
                (300, 4),
                (27_000, 6),
                (2 * MB, 2000),
                (2 * MB, 1800),
            ],
            t0,
        );
        let big = in_flight(&mut tail, (1, 0), t0, 30 * MB);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_secs(30)), 0);
        assert!(!big.hedged.load(Ordering::Relaxed));
    }

    #[test]
    fn nothing_is_hedged_without_enough_finished_ranges_or_past_the_bound() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[(MB, 10), (MB, 10)], t0);
        in_flight(&mut tail, (1, 0), t0, 0);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_secs(60)), 0);

        let mut tail = tail_with(&[(MB, 10), (MB, 10), (MB, 10)], t0);
        for i in 0..(MAX_HEDGES as u64 + 5) {
            in_flight(&mut tail, (2, i), t0, 0);
        }
        assert_eq!(
            tail.check(true, 100, t0 + Duration::from_secs(60)),
            MAX_HEDGES
        );
        assert_eq!(tail.check(true, 100, t0 + Duration::from_secs(90)), 0);
    }

    #[test]
    fn no_range_is_hedged_before_it_has_run_three_seconds() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[(MB, 10), (MB, 12), (MB, 11)], t0);
        in_flight(&mut tail, (1, 0), t0, 0);
        // Nothing received in 2.5 s, but under three seconds.
        assert_eq!(tail.check(true, 4, t0 + Duration::from_millis(2500)), 0);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_millis(3500)), 1);
    }
}
