//! Prometheus metrics of the agent (`GET /metrics`), in the text exposition format.
//!
//! Byte and retry counters come from each run's live [`Progress`]: finished runs are folded into
//! running totals, and a scrape adds the runs in flight, so every counter only grows.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::models::State;
use crate::fetch::progress::{Phase, Progress};
use crate::source::RetryCause;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    model: String,
    origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    model: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignerLabel {
    model: String,
    signer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    fetched: u64,
    reused: u64,
    hedged: u64,
    retries: [u64; RetryCause::ALL.len()],
    /// Direct, peer, back to source.
    origin: [u64; 3],
    /// Verified, fallback, rejected.
    dragonfly: [u64; 3],
}

const ORIGINS: [&str; 3] = ["direct", "peer", "back_to_source"];
const OUTCOMES: [&str; 3] = ["verified", "fallback", "rejected"];

impl Totals {
    fn add(&mut self, p: &Progress) {
        self.fetched += p.fetched();
        self.reused += p.reused();
        self.hedged += p.hedged_ranges();
        let o = p.by_origin();
        for (slot, n) in self
            .origin
            .iter_mut()
            .zip([o.direct, o.peer, o.back_to_source])
        {
            *slot += n;
        }
        let d = p.dragonfly();
        for (slot, n) in self
            .dragonfly
            .iter_mut()
            .zip([d.files, d.fallbacks, d.rejected])
        {
            *slot += n;
        }
        for (i, (_, n)) in p.retries().into_iter().enumerate() {
            if let Some(slot) = self.retries.get_mut(i) {
                *slot += n;
            }
        }
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    fetched: Family<ModelLabel, Counter>,
    reused: Family<ModelLabel, Counter>,
    by_origin: Family<OriginLabel, Counter>,
    dragonfly: Family<OutcomeLabel, Counter>,
    retries: Family<CauseLabel, Counter>,
    throttled: Counter,
    hedged: Counter,
    verify_failures: Counter,
    evictions: Counter,
    scrubbed: Counter,
    scrub_mismatches: Counter,
    state: Family<StateLabel, Gauge>,
    signed: Family<SignerLabel, Gauge>,
    concurrency: Family<ModelLabel, Gauge>,
    phases: Family<PhaseLabel, Histogram>,
    boot_steps: Family<StepLabel, Histogram>,
    free: Gauge,
    used: Gauge,
    leases: Family<ModelLabel, Gauge>,
    oldest_lease: Family<ModelLabel, Gauge>,
    reader_fetches: Family<OutcomeLabel, Counter>,
    finished: Mutex<BTreeMap<String, Totals>>,
    reported: Mutex<BTreeMap<String, Totals>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let fetched = Family::<ModelLabel, Counter>::default();
        let reused = Family::<ModelLabel, Counter>::default();
        let retries = Family::<CauseLabel, Counter>::default();
        let by_origin = Family::<OriginLabel, Counter>::default();
        let dragonfly = Family::<OutcomeLabel, Counter>::default();
        let throttled = Counter::default();
        let hedged = Counter::default();
        let verify_failures = Counter::default();
        let evictions = Counter::default();
        let scrubbed = Counter::default();
        let scrub_mismatches = Counter::default();
        let state = Family::<StateLabel, Gauge>::default();
        let signed = Family::<SignerLabel, Gauge>::default();
        let concurrency = Family::<ModelLabel, Gauge>::default();
        // 1 s to about 2.3 hours: a cold 65 GB fill on a slow link takes tens of minutes.
        let phases = Family::<PhaseLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1.0, 2.0, 14))) as fn() -> Histogram,
        );
        // Seconds after the agent's start: 1 s to about 2.3 hours, as the phases.
        let boot_steps = Family::<StepLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(1.0, 2.0, 14))) as fn() -> Histogram,
        );
        let free = Gauge::default();
        let used = Gauge::default();
        let leases = Family::<ModelLabel, Gauge>::default();
        let oldest_lease = Family::<ModelLabel, Gauge>::default();
        let reader_fetches = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "modelcache_leases",
            "Leases pods hold on a model's revisions",
            leases.clone(),
        );
        registry.register(
            "modelcache_oldest_lease_age_seconds",
            "Age of the oldest lease on a model",
            oldest_lease.clone(),
        );
        registry.register(
            "modelcache_reader_fetches",
            "Fetches a reader's request asked for: started, or refused (not configured, no running pod named, asked again within the backoff)",
            reader_fetches.clone(),
        );
        registry.register(
            "modelcache_bytes_fetched",
            "Bytes received from sources",
            fetched.clone(),
        );
        registry.register(
            "modelcache_bytes_reused",
            "Bytes reused from earlier runs or published revisions",
            reused.clone(),
        );
        registry.register(
            "modelcache_bytes_fetched_by_origin",
            "Bytes received, by origin: direct (modelcache's own GETs), peer (through dfdaemon from another node or its cache), back_to_source (through dfdaemon from the source)",
            by_origin.clone(),
        );
        registry.register(
            "modelcache_dragonfly_files",
            "Files asked of dfdaemon, by outcome: verified (matched the manifest), fallback (fetched directly; see the log for why), rejected (did not match the manifest)",
            dragonfly.clone(),
        );
        registry.register(
            "modelcache_range_retries",
            "Ranges retried, by cause",
            retries.clone(),
        );
        registry.register(
            "modelcache_hedged_ranges",
            "Slow ranges at the end of a download asked for again on a second connection",
            hedged.clone(),
        );
        registry.register(
            "modelcache_fetch_concurrency",
            "Ranges in flight per model now: the adaptive controller's choice (0 when not downloading)",
            concurrency.clone(),
        );
        registry.register(
            "modelcache_throttled_responses",
            "Answers asking us to slow down (503, 429)",
            throttled.clone(),
        );
        registry.register(
            "modelcache_verification_failures",
            "Prefetches failed by a hash, size or structure check",
            verify_failures.clone(),
        );
        registry.register(
            "modelcache_evictions",
            "Models evicted to stay within the disk budget or on request",
            evictions.clone(),
        );
        registry.register(
            "modelcache_scrubbed_bytes",
            "Bytes of published models re-hashed by the background scrub",
            scrubbed.clone(),
        );
        registry.register(
            "modelcache_scrub_mismatches",
            "Published files the scrub found changed since publish (each re-fetched)",
            scrub_mismatches.clone(),
        );
        registry.register(
            "modelcache_model_state",
            "1 for the state each model is in",
            state.clone(),
        );
        registry.register(
            "modelcache_model_signer",
            "1 for who signed the revision each model serves (OpenSSF Model Signing): the trusted key or certificate, or unsigned",
            signed.clone(),
        );
        registry.register(
            "modelcache_phase_duration_seconds",
            "Duration of each prefetch phase",
            phases.clone(),
        );
        registry.register(
            "modelcache_boot_timeline_seconds",
            "Seconds from the agent's start to each step of the first fill of each model configured at start (listing, first_byte, last_byte, verified, published, ready); disks_settled at every start",
            boot_steps.clone(),
        );
        registry.register(
            "modelcache_cache_free_bytes",
            "Free bytes on the cache filesystem",
            free.clone(),
        );
        registry.register(
            "modelcache_cache_used_bytes",
            "Bytes used by models and staging",
            used.clone(),
        );
        Self {
            registry,
            fetched,
            reused,
            by_origin,
            dragonfly,
            retries,
            throttled,
            hedged,
            verify_failures,
            evictions,
            scrubbed,
            scrub_mismatches,
            state,
            signed,
            concurrency,
            phases,
            boot_steps,
            free,
            used,
            leases,
            oldest_lease,
            reader_fetches,
            finished: Mutex::default(),
            reported: Mutex::default(),
        }
    }

    /// Folds a finished run into the totals and records its phase durations.
    pub fn record_run(&self, model: &str, progress: &Progress) {
        self.finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(model.to_string())
            .or_default()
            .add(progress);
        for (phase, d) in progress.phase_durations() {
            if phase != Phase::Done {
                self.phase(phase.as_str(), d);
            }
        }
    }

    /// Records that a step of a node's boot happened `seconds` after the agent's start.
    pub fn boot_step(&self, step: &str, seconds: f64) {
        self.boot_steps
            .get_or_create(&StepLabel {
                step: step.to_string(),
            })
            .observe(seconds);
    }

    /// Records one phase's duration.
    pub fn phase(&self, phase: &str, d: Duration) {
        self.phases
            .get_or_create(&PhaseLabel {
                phase: phase.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    /// Counts a verification failure.
    pub fn verification_failed(&self) {
        self.verify_failures.inc();
    }

    /// Counts bytes the scrub re-hashed.
    pub fn scrubbed(&self, bytes: u64) {
        self.scrubbed.inc_by(bytes);
    }

    /// Counts files the scrub found changed.
    pub fn scrub_mismatches(&self, files: u64) {
        self.scrub_mismatches.inc_by(files);
    }

    /// Sets a model's lease gauges: how many leases, and the oldest one's age.
    pub fn leases(&self, model: &str, count: u64, oldest_seconds: u64) {
        let label = ModelLabel {
            model: model.to_string(),
        };
        self.leases
            .get_or_create(&label)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.oldest_lease
            .get_or_create(&label)
            .set(i64::try_from(oldest_seconds).unwrap_or(i64::MAX));
    }

    /// Counts a reader's request for a fetch, by what became of it (`started` or `refused`).
    pub fn reader_fetch(&self, outcome: &str) {
        self.reader_fetches
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Counts an eviction.
    pub fn evicted(&self) {
        self.evictions.inc();
    }

    /// Brings counters up to date with the live runs and renders the text format.
    pub fn render(
        &self,
        live: &[(String, State, Arc<Progress>)],
        signers: &[(String, String)],
        free: u64,
        used: u64,
    ) -> String {
        // Only the signer of what each model serves now: one that was replaced is dropped.
        self.signed.clear();
        for (model, signer) in signers {
            self.signed
                .get_or_create(&SignerLabel {
                    model: model.clone(),
                    signer: signer.clone(),
                })
                .set(1);
        }
        let finished = self
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_cause = [0u64; RetryCause::ALL.len()];
        let mut by_cause_before = [0u64; RetryCause::ALL.len()];
        for (model, state, progress) in live {
            let mut now = finished.get(model).copied().unwrap_or_default();
            if matches!(state, State::Downloading | State::Verifying) {
                now.add(progress);
            }
            let before = reported.entry(model.clone()).or_default();
            let label = ModelLabel {
                model: model.clone(),
            };
            self.fetched
                .get_or_create(&label)
                .inc_by(now.fetched.saturating_sub(before.fetched));
            self.reused
                .get_or_create(&label)
                .inc_by(now.reused.saturating_sub(before.reused));
            for i in 0..by_cause.len() {
                by_cause[i] += now.retries[i];
                by_cause_before[i] += before.retries[i];
            }
            self.hedged.inc_by(now.hedged.saturating_sub(before.hedged));
            for (i, origin) in ORIGINS.iter().enumerate() {
                self.by_origin
                    .get_or_create(&OriginLabel {
                        model: model.clone(),
                        origin: (*origin).to_string(),
                    })
                    .inc_by(now.origin[i].saturating_sub(before.origin[i]));
                before.origin[i] = before.origin[i].max(now.origin[i]);
            }
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                self.dragonfly
                    .get_or_create(&OutcomeLabel {
                        outcome: (*outcome).to_string(),
                    })
                    .inc_by(now.dragonfly[i].saturating_sub(before.dragonfly[i]));
                before.dragonfly[i] = before.dragonfly[i].max(now.dragonfly[i]);
            }
            // Only ever move forward, so a counter never goes down.
            before.hedged = before.hedged.max(now.hedged);
            before.fetched = before.fetched.max(now.fetched);
            before.reused = before.reused.max(now.reused);
            for i in 0..before.retries.len() {
                before.retries[i] = before.retries[i].max(now.retries[i]);
            }
            let in_flight = if *state == State::Downloading {
                progress.concurrency()
            } else {
                0
            };
            self.concurrency
                .get_or_create(&label)
                .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
            for s in State::ALL {
                self.state
                    .get_or_create(&StateLabel {
                        model: model.clone(),
                        state: s.as_str().to_string(),
                    })
                    .set(i64::from(s == *state));
            }
        }
        for (i, cause) in RetryCause::ALL.iter().enumerate() {
            let delta = by_cause[i].saturating_sub(by_cause_before[i]);
            self.retries
                .get_or_create(&CauseLabel {
                    cause: cause.as_str().to_string(),
                })
                .inc_by(delta);
            if *cause == RetryCause::Throttled {
                self.throttled.inc_by(delta);
            }
        }
        self.free.set(i64::try_from(free).unwrap_or(i64::MAX));
        self.used.set(i64::try_from(used).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
