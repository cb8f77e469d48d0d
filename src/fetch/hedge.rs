//! Tail hedging: the last ranges of a download decide when it ends, so when only a few remain
//! and one is far behind what finished ranges managed, its remainder is asked for again on a
//! second connection and whichever copy finishes first is kept.
//!
//! "Behind" is judged against what a usual range would have delivered by now: the usual wait
//! for the first byte (the median over finished ranges) plus the bytes received so far at the
//! usual pace (bytes per second of body over finished ranges, so big ranges set it). A range
//! waiting for its first byte is measured against the wait, a large range streaming at the
//! usual pace is never behind however long it runs, and one that stalls falls behind at once.
//!
//! Both copies are pinned to the same ETag, so they carry the same bytes and may write the same
//! offsets of the partial file in any order. The second copy starts at the first one's last
//! flushed position with a copy of its hash state there, so either one's hash covers the whole
//! range. The loser is dropped; a write it had in flight still lands (the same bytes) before
//! the engine's run returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::verify::hash::PieceHasher;

/// How many times longer than a usual range would have needed a range must have run.
const SLOW_FACTOR: f64 = 3.0;

/// No range is hedged before it has run this long: a second copy costs a connection and
/// duplicate bytes, worth it for a straggler, not for the jitter of short ranges (a 64 MiB
/// range from Blob Storage takes about 0.5–1 s on one connection).
const MIN_AGE: Duration = Duration::from_secs(3);

/// Finished ranges needed before the usual wait and pace mean anything.
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
    first_byte: OnceLock<Instant>,
    hedged: AtomicBool,
}

impl Ticket {
    /// A ticket for a range launched `now`; its task records where it starts with
    /// [`Ticket::flushed`] once it knows the range and its hash state.
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            hedge: tokio::sync::Notify::new(),
            flushed: Mutex::new((0, None)),
            received: AtomicU64::new(0),
            started: now,
            first_byte: OnceLock::new(),
            hedged: AtomicBool::new(false),
        }
    }

    /// Records the first copy's progress after a write.
    pub(crate) fn flushed(&self, pos: u64, hasher: Option<&PieceHasher>) {
        *self.flushed.lock().unwrap_or_else(|p| p.into_inner()) = (pos, hasher.cloned());
    }

    /// Counts bytes the first copy received, at `now`.
    pub(crate) fn received(&self, bytes: u64, now: Instant) {
        if self.first_byte.get().is_none() {
            let _ = self.first_byte.set(now);
        }
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

/// The ranges in flight and what finished ones took; decides which to hedge.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    in_flight: HashMap<(usize, u64), std::sync::Arc<Ticket>>,
    /// Waits for the first byte of finished ranges.
    waits: Vec<Duration>,
    /// Bytes of finished ranges, and the time from their first byte to their end.
    body_bytes: u64,
    body_time: Duration,
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
        // A hedged range's first copy is the straggler: not what a usual range takes.
        if t.hedged.load(Ordering::Relaxed) {
            return;
        }
        let first_byte = t.first_byte.get().copied().unwrap_or(now);
        self.waits
            .push(first_byte.saturating_duration_since(t.started));
        self.body_bytes += t.received.load(Ordering::Relaxed);
        self.body_time += now.saturating_duration_since(first_byte);
    }

    /// Hedges made so far.
    #[cfg(test)]
    pub(crate) fn hedges(&self) -> usize {
        self.hedges
    }

    /// Once nothing is left to launch and at most `few` ranges are in flight, tells each one
    /// that has run at least [`MIN_AGE`] and [`SLOW_FACTOR`] times as long as a usual range
    /// would have needed to deliver what it has delivered to start its second copy, up to
    /// [`MAX_HEDGES`]. Returns how many it told.
    pub(crate) fn check(&mut self, nothing_queued: bool, few: usize, now: Instant) -> usize {
        if !nothing_queued
            || self.in_flight.len() > few
            || self.waits.len() < MIN_SAMPLES
            || self.hedges >= MAX_HEDGES
        {
            return 0;
        }
        let mut waits = self.waits.clone();
        waits.sort_unstable();
        let usual_wait = waits[waits.len() / 2].as_secs_f64();
        // Seconds per byte of body; none measured (only empty files finished) counts as free.
        let usual_cost = if self.body_bytes == 0 {
            0.0
        } else {
            self.body_time.as_secs_f64() / self.body_bytes as f64
        };
        let mut told = 0;
        for ticket in self.in_flight.values() {
            if self.hedges >= MAX_HEDGES {
                break;
            }
            let age = now.saturating_duration_since(ticket.started);
            if age < MIN_AGE {
                continue;
            }
            let delivered = ticket.received.load(Ordering::Relaxed) as f64;
            let usual = usual_wait + delivered * usual_cost;
            let behind = age.as_secs_f64() > SLOW_FACTOR * usual;
            if behind && !ticket.hedged.swap(true, Ordering::Relaxed) {
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A tail whose finished ranges each waited `wait` ms for their first byte, then received
    /// `bytes` in `body` ms.
    fn tail_with(finished: &[(u64, u64, u64)], t0: Instant) -> Tail {
        let mut tail = Tail::default();
        for (i, (wait, bytes, body)) in finished.iter().enumerate() {
            let t = Arc::new(Ticket::new(t0));
            t.received(*bytes, t0 + ms(*wait));
            tail.launched((0, i as u64), t);
            tail.finished((0, i as u64), t0 + ms(wait + body));
        }
        tail
    }

    /// A range in flight since `started`, its first byte after `wait` ms (none if `received`
    /// is 0).
    fn in_flight(
        tail: &mut Tail,
        key: (usize, u64),
        started: Instant,
        wait: u64,
        received: u64,
    ) -> Arc<Ticket> {
        let t = Arc::new(Ticket::new(started));
        if received > 0 {
            t.received(received, started + ms(wait));
        }
        tail.launched(key, Arc::clone(&t));
        t
    }

    /// Usual: a 100 ms wait, then 1 MB/s.
    fn usual(t0: Instant) -> Tail {
        tail_with(
            &[
                (100, MB, 1000),
                (100, MB, 1000),
                (120, MB, 900),
                (90, MB, 1100),
            ],
            t0,
        )
    }

    #[test]
    fn only_a_slow_range_in_the_tail_is_hedged_and_only_once() {
        let t0 = Instant::now();
        let mut tail = usual(t0);
        let slow = in_flight(&mut tail, (1, 0), t0, 100, MB / 2);
        let fine = in_flight(&mut tail, (1, 1), t0, 100, 3 * MB);
        let at = t0 + ms(3600);
        // Ranges still queued: never.
        assert_eq!(tail.check(false, 4, at), 0);
        // More in flight than `few`: never.
        assert_eq!(tail.check(true, 1, at), 0);
        // The tail: 0.5 MB usually takes 0.6 s (3.6 s is 6×); 3 MB usually takes 3.1 s.
        assert_eq!(tail.check(true, 4, at), 1);
        assert!(slow.hedged.load(Ordering::Relaxed));
        assert!(!fine.hedged.load(Ordering::Relaxed));
        // The other one stalls at 3 MB: behind once past 3 × 3.1 s.
        assert_eq!(tail.check(true, 4, t0 + ms(9000)), 0);
        assert_eq!(tail.check(true, 4, t0 + ms(9500)), 1, "then the other");
        assert_eq!(tail.check(true, 4, t0 + ms(40_000)), 0, "once each");
        assert_eq!(tail.hedges(), 2);
    }

    /// A large range streaming at the usual pace runs long because it is large, not because it
    /// is stuck: small files finishing in milliseconds do not make it a straggler.
    #[test]
    fn a_large_range_at_the_usual_pace_is_not_hedged_however_long_it_runs() {
        let t0 = Instant::now();
        let mut tail = tail_with(
            &[
                (3, 200, 1),
                (3, 300, 1),
                (4, 27_000, 2),
                (100, 2 * MB, 2000),
                (100, 2 * MB, 1800),
            ],
            t0,
        );
        let big = in_flight(&mut tail, (1, 0), t0, 100, 30 * MB);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_secs(30)), 0);
        assert!(!big.hedged.load(Ordering::Relaxed));
    }

    /// A small file still waiting for its first byte is measured against the usual wait: on a
    /// host where every answer takes seconds, waiting 3.5 s is not straggling; where answers take
    /// 100 ms, it is.
    #[test]
    fn a_range_waiting_for_its_first_byte_is_measured_against_the_usual_wait() {
        let t0 = Instant::now();
        let mut slow_host = tail_with(&[(2000, 31, 1), (1800, MB, 1000), (2200, MB, 1000)], t0);
        in_flight(&mut slow_host, (1, 0), t0, 0, 0);
        assert_eq!(slow_host.check(true, 4, t0 + ms(3500)), 0);
        assert_eq!(slow_host.check(true, 4, t0 + ms(6700)), 1);

        let mut tail = usual(t0);
        in_flight(&mut tail, (1, 0), t0, 0, 0);
        assert_eq!(tail.check(true, 4, t0 + ms(3500)), 1);
    }

    #[test]
    fn nothing_is_hedged_without_enough_finished_ranges_or_past_the_bound() {
        let t0 = Instant::now();
        let mut tail = tail_with(&[(5, MB, 10), (5, MB, 10)], t0);
        in_flight(&mut tail, (1, 0), t0, 0, 0);
        assert_eq!(tail.check(true, 4, t0 + Duration::from_secs(60)), 0);

        let mut tail = tail_with(&[(5, MB, 10), (5, MB, 10), (5, MB, 10)], t0);
        for i in 0..(MAX_HEDGES as u64 + 5) {
            in_flight(&mut tail, (2, i), t0, 0, 0);
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
        let mut tail = tail_with(&[(5, MB, 10), (5, MB, 12), (5, MB, 11)], t0);
        in_flight(&mut tail, (1, 0), t0, 0, 0);
        // Nothing received in 2.5 s, but under three seconds.
        assert_eq!(tail.check(true, 4, t0 + ms(2500)), 0);
        assert_eq!(tail.check(true, 4, t0 + ms(3500)), 1);
    }
}
