//! Adaptive concurrency: how many ranges are in flight, chosen from measured throughput.
//!
//! The best number depends on the host and the link: on two cores 8 connections beat 64 (the
//! CPU is the limit and every extra connection costs it), while a 10 GB/s node reading Blob
//! Storage, where one connection carries about 60–120 MB/s, needs on the order of 100. The
//! controller starts at 16 and quadruples while that pays (like TCP's slow start), steps back
//! when it does not, then from time to time probes a quarter up or a fifth down and keeps
//! the move when it pays (down: when throughput holds, which saves memory and CPU). A window
//! with throttling answers (503, 429) halves it. It never goes above the configured ceiling
//! (`--concurrency`) or below one.
//!
//! [`Controller`] is the decision alone, fed one measurement per window, so it is tested with
//! exact inputs; the engine measures and applies it.

use std::time::Duration;

/// Where the limit starts (or the ceiling, when lower).
pub(crate) const START: usize = 16;

/// How much slow start multiplies the limit by at each window that paid: a node that needs
/// 64 or more connections gets them after one window.
const GROWTH: usize = 4;

/// One measurement window.
pub(crate) const WINDOW: Duration = Duration::from_millis(500);

/// Time given to a change before its window starts: new connections need their handshake and
/// their first bytes.
pub(crate) const SETTLE: Duration = Duration::from_millis(200);

/// How much more throughput a larger limit must bring to be kept.
const GAIN: f64 = 0.05;

/// How much throughput a smaller limit may lose and still be kept.
const TOLERANCE: f64 = 0.02;

/// Windows at a settled limit before the next probe.
const HOLD: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Doubling; `before` is the limit and rate the current doubling is judged against.
    SlowStart { before: Option<(usize, f64)> },
    /// Settled; probing again after `windows` more windows.
    Holding { windows: u32 },
    /// Trying `limit` against `before`.
    Probing { before: (usize, f64), up: bool },
}

/// The concurrency decision, one window at a time.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    ceiling: usize,
    limit: usize,
    state: State,
    /// Direction of the next probe.
    probe_up: bool,
    /// Throughput measured at the current limit in the last window, if any.
    baseline: Option<f64>,
}

impl Controller {
    /// A controller under `ceiling` (at least 1).
    pub(crate) fn new(ceiling: usize) -> Self {
        let ceiling = ceiling.max(1);
        Self {
            ceiling,
            limit: START.min(ceiling),
            state: State::SlowStart { before: None },
            probe_up: true,
            baseline: None,
        }
    }

    /// Ranges allowed in flight now.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Takes one window's throughput (bytes per second, at the current limit) and whether any
    /// answer in it asked to slow down; returns the limit for the next window.
    pub(crate) fn observe(&mut self, rate: f64, throttled: bool) -> usize {
        if throttled {
            self.limit = self.limit.div_ceil(2).max(1);
            self.state = State::Holding { windows: HOLD };
            self.baseline = None;
            self.probe_up = false;
            return self.limit;
        }
        match self.state {
            State::SlowStart { before } => {
                let paid = before.is_none_or(|(_, r)| rate >= r * (1.0 + GAIN));
                if !paid {
                    if let Some((limit, r)) = before {
                        self.limit = limit;
                        self.baseline = Some(r);
                    }
                    self.state = State::Holding { windows: HOLD };
                } else if self.limit >= self.ceiling {
                    self.baseline = Some(rate);
                    self.state = State::Holding { windows: HOLD };
                } else {
                    self.state = State::SlowStart {
                        before: Some((self.limit, rate)),
                    };
                    self.limit = (self.limit * GROWTH).min(self.ceiling);
                }
            }
            State::Probing { before, up } => {
                let kept = if up {
                    rate >= before.1 * (1.0 + GAIN)
                } else {
                    rate >= before.1 * (1.0 - TOLERANCE)
                };
                if kept {
                    self.baseline = Some(rate);
                    // A move that paid is worth another in the same direction soon.
                    self.probe_up = up;
                    self.state = State::Holding { windows: 1 };
                } else {
                    self.limit = before.0;
                    self.baseline = Some(before.1);
                    self.probe_up = !up;
                    self.state = State::Holding { windows: HOLD };
                }
            }
            State::Holding { windows } => {
                self.baseline = Some(rate);
                if windows > 1 {
                    self.state = State::Holding {
                        windows: windows - 1,
                    };
                } else {
                    self.start_probe(rate);
                }
            }
        }
        self.limit
    }

    fn start_probe(&mut self, rate: f64) {
        let up = (self.limit + self.limit.div_ceil(4)).min(self.ceiling);
        let down = (self.limit * 4 / 5).max(1);
        let (next, is_up) = match (self.probe_up, up > self.limit, down < self.limit) {
            (true, true, _) | (false, true, false) => (up, true),
            (_, _, true) => (down, false),
            _ => {
                // A ceiling of one: nothing to probe.
                self.state = State::Holding { windows: HOLD };
                return;
            }
        };
        self.state = State::Probing {
            before: (self.limit, rate),
            up: is_up,
        };
        self.limit = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds windows from a throughput curve (bytes/s as a function of the limit) and returns
    /// the limits chosen.
    fn run(ceiling: usize, windows: usize, curve: impl Fn(usize) -> f64) -> Vec<usize> {
        let mut c = Controller::new(ceiling);
        (0..windows)
            .map(|_| {
                let rate = curve(c.limit());
                c.observe(rate, false)
            })
            .collect()
    }

    /// Rate capped per connection (a throttled account, or Blob's per-connection speed): more
    /// connections keep paying up to the ceiling, reached in a few windows.
    #[test]
    fn it_climbs_to_the_ceiling_while_connections_pay() {
        let limits = run(64, 12, |n| n as f64 * 60e6);
        assert_eq!(limits[0], 64, "{limits:?}");
        // At the ceiling the only probe is down, one window at a time, and it comes back.
        let after = &limits[1..];
        assert!(after.iter().all(|l| *l >= 51), "{limits:?}");
        assert!(
            after.iter().filter(|l| **l == 64).count() * 4 >= after.len() * 3,
            "{limits:?}"
        );
    }

    /// CPU-bound (two cores): best at 8, a little worse above. It tries 64 once, comes back
    /// to 16, and walks down while fewer connections lose nothing, settling near 8.
    #[test]
    fn it_settles_where_more_connections_stop_paying() {
        let curve = |n: usize| {
            if n <= 8 {
                1.3e9 * n as f64 / 8.0
            } else {
                1.3e9 - (n - 8) as f64 * 5e6
            }
        };
        let limits = run(64, 60, curve);
        assert_eq!(limits[..2], [64, 16], "{limits:?}");
        let settled = &limits[20..];
        assert!(settled.iter().all(|l| (6..=12).contains(l)), "{limits:?}");
        let near_best = settled.iter().filter(|l| (8..=10).contains(*l)).count();
        assert!(
            near_best * 4 >= settled.len() * 3,
            "mostly at 8 to 10: {limits:?}"
        );
    }

    /// A flat curve: fewer connections lose nothing, so probes walk it down.
    #[test]
    fn it_gives_back_connections_that_bring_nothing() {
        let mut c = Controller::new(64);
        c.limit = 64;
        c.state = State::Holding { windows: 1 };
        c.probe_up = false;
        let mut limits = Vec::new();
        for _ in 0..60 {
            limits.push(c.observe(1e9, false));
        }
        assert!(*limits.last().unwrap() < 16, "{limits:?}");
        assert!(limits.iter().all(|l| *l >= 1 && *l <= 64));
    }

    /// Throttling halves the limit at once, whatever the state.
    #[test]
    fn throttling_halves_it() {
        let mut c = Controller::new(64);
        for _ in 0..3 {
            c.observe(c.limit() as f64 * 60e6, false);
        }
        assert_eq!(c.limit(), 64);
        assert_eq!(c.observe(1e9, true), 32);
        assert_eq!(c.observe(1e9, true), 16);
        let mut c = Controller::new(1);
        assert_eq!(c.observe(1e9, true), 1);
        for _ in 0..20 {
            assert_eq!(c.observe(1e9, false), 1);
        }
    }
}
