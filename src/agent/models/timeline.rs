//! A node's time to serving, step by step: when the agent started, when its disks settled, and
//! for each model when listing began, the first and last bytes arrived, every byte was verified
//! and the revision was published. All in seconds after the agent's start, so one node's boot
//! reads as one line, and the same steps across a fleet fill one histogram
//! (`modelcache_boot_timeline_seconds`).

use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fetch::progress::Steps;

/// `t` as RFC 3339 with milliseconds (UTC), when it is one: from 1970 to the year 9999 (a
/// file's time can be set to anything by whoever owns it).
pub fn rfc3339(t: SystemTime) -> Option<String> {
    let since = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    (since.as_secs() < 253_402_300_800).then(|| humantime::format_rfc3339_millis(t).to_string())
}

/// The agent's own steps, shared by every model.
#[derive(Debug)]
pub struct Boot {
    started: Instant,
    started_at: SystemTime,
    disks_settled: OnceLock<Instant>,
}

impl Boot {
    /// Now is the agent's start.
    pub fn now() -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
            disks_settled: OnceLock::new(),
        }
    }

    /// The origin every step is measured from.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records that the disks are settled (mounted, or given up on); only the first call counts.
    /// Returns the seconds after the start when this call recorded it.
    pub fn disks_settled(&self) -> Option<f64> {
        let now = Instant::now();
        self.disks_settled.set(now).ok().map(|()| self.seconds(now))
    }

    /// Seconds from the agent's start to `at`.
    pub fn seconds(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.started).as_secs_f64()
    }

    /// The timeline of one model, from its own steps.
    pub fn timeline(&self, run: Option<Steps>, ready: Option<Instant>) -> Timeline {
        Timeline {
            agent_started_at: rfc3339(self.started_at).unwrap_or_default(),
            disks_settled: self.disks_settled.get().map(|t| self.seconds(*t)),
            run: run.unwrap_or_default(),
            ready: ready.map(|t| self.seconds(t)),
        }
    }
}

/// One model's timeline on this node, as `GET /v1/models/NAME` shows it (`timeline`): seconds
/// after the agent's start; `null` for a step not reached (or not needed: a model found
/// published at start has no download).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// When the agent started (RFC 3339, UTC).
    pub agent_started_at: String,
    /// The cache disks were mounted (or their setup failed).
    pub disks_settled: Option<f64>,
    /// The fill that published the revision being served, or the one running.
    #[serde(flatten)]
    pub run: Steps,
    /// The model was first ready in this agent's life: published, or found published and
    /// intact at start.
    pub ready: Option<f64>,
}

impl Timeline {
    /// `disks 4.1 s · listing 4.2 s · first byte 4.6 s · … · ready 101.3 s`, the steps reached.
    pub fn line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(at) = self.disks_settled {
            parts.push(format!("disks {at:.1} s"));
        }
        for (step, at) in self.run.reached() {
            parts.push(format!("{} {at:.1} s", step.replace('_', " ")));
        }
        if let Some(at) = self.ready {
            parts.push(format!("ready {at:.1} s"));
        }
        parts.join(" · ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_steps_reached_in_order() {
        let timeline = Timeline {
            agent_started_at: "2026-01-01T00:00:00.000Z".into(),
            disks_settled: Some(4.06),
            run: Steps {
                listing: Some(4.2),
                first_byte: Some(4.61),
                last_byte: None,
                verified: None,
                published: None,
            },
            ready: None,
        };
        assert_eq!(
            timeline.line(),
            "disks 4.1 s · listing 4.2 s · first byte 4.6 s"
        );
    }

    #[test]
    fn times_outside_rfc_3339_are_none_not_a_panic() {
        let epoch = std::time::UNIX_EPOCH;
        assert_eq!(
            rfc3339(epoch + std::time::Duration::from_millis(1500)).as_deref(),
            Some("1970-01-01T00:00:01.500Z")
        );
        assert_eq!(rfc3339(epoch - std::time::Duration::from_secs(1)), None);
        assert_eq!(
            rfc3339(epoch + std::time::Duration::from_secs(253_402_300_800)),
            None
        );
    }

    #[test]
    fn disks_settle_once() {
        let boot = Boot::now();
        assert!(boot.disks_settled().is_some());
        assert!(boot.disks_settled().is_none());
        let timeline = boot.timeline(None, None);
        assert!(timeline.disks_settled.is_some());
        assert_eq!(timeline.run, Steps::default());
    }
}
