//! Jobs: one per model at a time, started by configuration or a request, retried with backoff
//! when configured; each runs the prefetch engine under the model's file lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::lifecycle::{self, OnRequest, Outcome};
use super::{Entry, Job, ModelError, Models, PrefetchOverride, millis};

/// What a request builds on: the entry's spec and where it came from.
struct Base<'a> {
    spec: &'a ModelSpec,
    configured: bool,
    /// The source is the whole URL (false when adopted from a ready marker that redacted it).
    source_kept: bool,
}

/// Checks a request on a configured model: it may join or refresh it, and repeat the
/// configured source, account, pin and manifest requirement, but change none of them, nor name
/// a selection. Returns the configured spec.
fn operators_spec(
    name: &ModelName,
    spec: &ModelSpec,
    o: &PrefetchOverride,
) -> Result<ModelSpec, ModelError> {
    let repoints = o.source.as_ref().is_some_and(|s| *s != spec.source)
        || o.account
            .as_ref()
            .is_some_and(|a| Some(a) != spec.account.as_ref());
    if repoints {
        return Err(ModelError::Forbidden(
            crate::agent::sources::SourceRefused::Repoint {
                model: name.to_string(),
            }
            .to_string(),
        ));
    }
    let mut changes = Vec::new();
    if o.include.is_some() || o.exclude.is_some() {
        changes.push("its selection (include, exclude)");
    }
    if o.pin.is_some_and(|pin| pin != spec.pin) {
        changes.push("pin");
    }
    if o.require_manifest
        .is_some_and(|r| r != spec.require_manifest)
    {
        changes.push("require_manifest");
    }
    if o.signature.is_some_and(|s| s != spec.signature) {
        changes.push("signature");
    }
    if !changes.is_empty() {
        return Err(ModelError::Forbidden(format!(
            "{name} is configured by the operator: a request may start or join its prefetch but not change {} (change models[] in the agent's configuration instead)",
            changes.join(" or ")
        )));
    }
    Ok(spec.clone())
}
use crate::config::agent::ModelSpec;
use crate::config::human_bytes;
use crate::fetch::progress::Progress;
use crate::fetch::signed::{DEFAULT_SIGNATURE_FILE, SignatureMode, SignaturePolicy};
use crate::fetch::{ErrorKind, PrefetchError, PrefetchRequest, error_chain, prefetch};
use crate::source::{self, SourceOptions, redact_url};
use crate::store::ModelName;

impl Models {
    /// Starts a prefetch, or joins the one in flight: returns the job id and whether it joined.
    ///
    /// Recording the model and starting its job happen under one lock, so concurrent requests
    /// for a new model see either no entry or an entry that already has its job: exactly one
    /// of them starts it, the others join.
    pub fn request_prefetch(
        self: &Arc<Self>,
        name: &str,
        request: PrefetchOverride,
    ) -> Result<(u64, bool), ModelError> {
        let model = ModelName::new(name).map_err(|e| ModelError::Invalid(e.to_string()))?;
        // Disks only ever go from blocked to settled, so a request that passes this check
        // writes onto the settled cache filesystem, never onto the OS disk beneath it.
        if let Some(reason) = self.blocked_reason().clone() {
            return Err(ModelError::Unavailable(format!(
                "the cache disks are not ready ({reason}); no model can be fetched until they are (see GET /v1/disk)"
            )));
        }
        let mut entries = self.lock();
        if let Some(entry) = entries.get_mut(name) {
            match lifecycle::on_request(entry.facts()) {
                OnRequest::Join(id) => {
                    // A model waiting out a backoff tries again now.
                    if let Some(job) = &entry.job {
                        job.wake.notify_one();
                    }
                    entry.last_used = SystemTime::now();
                    return Ok((id, true));
                }
                OnRequest::Start => {}
            }
            entry.spec = self.merged_spec(
                &model,
                Some(Base {
                    spec: &entry.spec,
                    configured: entry.configured,
                    source_kept: entry.source_kept,
                }),
                request,
            )?;
            entry.last_used = SystemTime::now();
        } else {
            let spec = self.merged_spec(&model, None, request)?;
            entries.insert(name.to_string(), Entry::new(spec, false));
        }
        let id = self.spawn_job_locked(&mut entries, name);
        Ok((id, false))
    }

    /// The spec a request asks for: the configured or earlier one, changed by the request.
    ///
    /// A configured model belongs to the operator's configuration: a request may join or
    /// refresh it, never change its source, account, selection, pin or manifest requirement
    /// (403 naming what it tried). Any other model may be changed, and named with a source
    /// only under `api.allowed_sources` (see [`crate::agent::sources`]).
    fn merged_spec(
        &self,
        name: &ModelName,
        base: Option<Base<'_>>,
        o: PrefetchOverride,
    ) -> Result<ModelSpec, ModelError> {
        if let Some(b) = base.as_ref().filter(|b| b.configured) {
            return operators_spec(name, b.spec, &o);
        }
        if let (Some(b), None) = (&base, &o.source) {
            if !b.source_kept {
                return Err(ModelError::Invalid(format!(
                    "{name} was published before the agent restarted, and the query of its source ({}) is not kept on disk (it may hold a SAS token): name the source in the request body to refresh it",
                    b.spec.source
                )));
            }
        }
        let base = base.map(|b| b.spec);
        let named = o.source.is_some();
        if o.account.is_some() {
            return Err(ModelError::Forbidden(
                crate::agent::sources::SourceRefused::Account.to_string(),
            ));
        }
        let source = match (o.source, base) {
            (Some(s), _) => s,
            (None, Some(b)) => b.source.clone(),
            (None, None) => {
                return Err(ModelError::Invalid(format!(
                    "model {name} is not configured: the request body must name a source"
                )));
            }
        };
        let selection = match (o.include, o.exclude, base) {
            (None, None, Some(b)) => b.selection.clone(),
            (include, exclude, _) => crate::config::Selection::new(
                &include.unwrap_or_default(),
                &exclude.unwrap_or_default(),
                true,
            )
            .map_err(|e| ModelError::Invalid(e.to_string()))?,
        };
        let account = o.account.or_else(|| base.and_then(|b| b.account.clone()));
        // The operator's default is the floor: a request may ask for more, never for less.
        let floor = self.config.signature_default;
        let signature = match o.signature {
            Some(asked) if asked < floor => {
                return Err(ModelError::Forbidden(format!(
                    "signature {:?} is weaker than the agent's signing.default {:?}: a request may only ask for a stricter signature policy",
                    asked.as_str(),
                    floor.as_str()
                )));
            }
            Some(SignatureMode::Required) if self.config.trust.is_empty() => {
                return Err(ModelError::Invalid(
                    "signature \"required\" needs a trusted signer, and the agent's signing.trusted is empty".into(),
                ));
            }
            Some(asked) => asked,
            None => base.map_or(floor, |b| b.signature.max(floor)),
        };
        // A source that cannot even be opened (bad URL, no account) is the caller's mistake:
        // say so now, not as a failed model later.
        source::open(
            &source,
            &self.env,
            &SourceOptions {
                account: account.clone(),
                confine: None,
            },
        )
        .map_err(|e| ModelError::Invalid(error_chain(&e)))?;
        // Checked once the URL is known to be one (a malformed one is a 400, not a 403).
        if named {
            crate::agent::sources::check_allowed(&source, &self.config.allowed_sources)
                .map_err(|e| ModelError::Forbidden(e.to_string()))?;
        }
        Ok(ModelSpec {
            name: name.clone(),
            account,
            selection,
            pin: o.pin.unwrap_or(base.is_some_and(|b| b.pin)),
            require_manifest: o
                .require_manifest
                .unwrap_or(base.is_some_and(|b| b.require_manifest)),
            signature,
            signature_file: DEFAULT_SIGNATURE_FILE.to_string(),
            trust: Arc::clone(&self.config.trust),
            source,
        })
    }

    /// Starts the job of `name` and records it in its entry, both while the caller holds the
    /// registry lock: no one can see the entry without its job in between. The task itself
    /// only touches the registry once the caller releases the lock.
    pub(super) fn spawn_job_locked(
        self: &Arc<Self>,
        entries: &mut BTreeMap<String, Entry>,
        name: &str,
    ) -> u64 {
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let models = Arc::clone(self);
        let (n, c, w) = (name.to_string(), cancel.clone(), Arc::clone(&wake));
        let handle = tokio::spawn(async move { models.run_job(n, id, c, w).await });
        if let Some(entry) = entries.get_mut(name) {
            entry.job = Some(Job {
                id,
                cancel,
                wake,
                handle,
            });
        }
        id
    }

    async fn run_job(
        self: Arc<Self>,
        name: String,
        id: u64,
        cancel: CancellationToken,
        wake: Arc<Notify>,
    ) {
        let mut delay = self.config.failed_retry_delay;
        loop {
            let Some((spec, progress, configured)) = self.begin_attempt(&name) else {
                return;
            };
            let started = Instant::now();
            info!(model.name = %name, job = id, state = "downloading", "{name}: prefetch started (job {id})");
            let result = self
                .prefetch_once(&spec, configured, id, Arc::clone(&progress), cancel.clone())
                .await;
            self.release_reservation(&spec.name);
            self.metrics.record_run(&name, &progress);
            let outcome = match &result {
                Ok(_) => Outcome::Published,
                Err(PrefetchError::Cancelled) => Outcome::Cancelled,
                Err(_) => Outcome::Failed,
            };
            let published = match result {
                Ok(summary) => {
                    info!(
                        model.name = %name, job = id, state = "ready", duration_ms = millis(started.elapsed()),
                        bytes_fetched = summary.bytes_fetched, bytes_reused = summary.bytes_reused,
                        "{name}: ready, revision {} ({} fetched, {} reused) in {:.1} s",
                        summary.revision, human_bytes(summary.bytes_fetched), human_bytes(summary.bytes_reused),
                        started.elapsed().as_secs_f64()
                    );
                    Some(summary)
                }
                Err(PrefetchError::Cancelled) => {
                    info!(model.name = %name, job = id, "{name}: stopped by shutdown; finished ranges are journaled");
                    None
                }
                Err(e) => {
                    let line = error_chain(&e);
                    error!(model.name = %name, job = id, state = "failed", duration_ms = millis(started.elapsed()), "{name}: prefetch failed: {line}");
                    if e.kind() == ErrorKind::VerifyFailed {
                        self.metrics.verification_failed();
                    }
                    if let Some(entry) = self.lock().get_mut(&name) {
                        entry.last_error = Some(line);
                    }
                    None
                }
            };
            let next = {
                let mut entries = self.lock();
                let Some(entry) = entries.get_mut(&name) else {
                    return;
                };
                let next = lifecycle::after_attempt(entry.facts(), outcome);
                entry.state = next.state;
                if let Some(summary) = &published {
                    if !summary.already_published {
                        let steps = progress.steps(self.boot.started());
                        entry.serving_from_now(Some(steps), &self.boot, &self.metrics);
                    } else if entry.revision.as_deref() != Some(summary.revision.as_str())
                        || entry.served_since.is_none()
                    {
                        // Found intact in the store (a refresh that changed nothing keeps the
                        // timeline of the fill that published it).
                        entry.serving_from_now(None, &self.boot, &self.metrics);
                    }
                    entry.revision = Some(summary.revision.clone());
                    entry.verification = Some(summary.verification);
                    entry.signature.clone_from(&summary.signature);
                    entry.warnings.clone_from(&summary.warnings);
                    entry.last_error = None;
                    entry.last_used = SystemTime::now();
                }
                if next.retry {
                    entry.in_backoff = true;
                } else if entry.job.as_ref().is_some_and(|j| j.id == id) {
                    // Only its own: a job the configuration took over may end after another
                    // started.
                    entry.job = None;
                }
                next
            };
            if let Some(summary) = published {
                self.warm(&spec.name, &summary.revision, summary.bytes_total)
                    .await;
                return;
            }
            if !next.retry {
                return;
            }
            warn!(model.name = %name, delay_ms = millis(delay), "{name}: trying again in {}s", delay.as_secs());
            tokio::select! {
                () = cancel.cancelled() => {
                    if let Some(e) = self.lock().get_mut(&name) {
                        if e.job.as_ref().is_some_and(|j| j.id == id) {
                            e.job = None;
                        }
                        e.in_backoff = false;
                    }
                    return;
                }
                () = wake.notified() => {}
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(600));
        }
    }

    fn begin_attempt(&self, name: &str) -> Option<(ModelSpec, Arc<Progress>, bool)> {
        let mut entries = self.lock();
        let entry = entries.get_mut(name)?;
        entry.progress = Arc::new(Progress::new());
        entry.started = Some(Instant::now());
        entry.in_backoff = false;
        Some((
            entry.spec.clone(),
            Arc::clone(&entry.progress),
            entry.configured,
        ))
    }

    async fn prefetch_once(
        self: &Arc<Self>,
        spec: &ModelSpec,
        configured: bool,
        job: u64,
        progress: Arc<Progress>,
        cancel: CancellationToken,
    ) -> Result<crate::fetch::Summary, PrefetchError> {
        // A source a request named stays under the prefix that allowed it, links included.
        let confine = (!configured)
            .then(|| {
                crate::agent::sources::confining_dir(&spec.source, &self.config.allowed_sources)
            })
            .flatten();
        let source = source::open(
            &spec.source,
            &self.env,
            &SourceOptions {
                account: spec.account.clone(),
                confine,
            },
        )
        .map_err(|source| PrefetchError::Source {
            url: redact_url(&spec.source),
            source,
        })?;
        let models = Arc::clone(self);
        let for_model = spec.name.clone();
        let request = PrefetchRequest {
            parse_budget: self.parse_budget.clone(),
            model: spec.name.clone(),
            selection: spec.selection.clone(),
            options: self.config.fetch.clone(),
            require_manifest: spec.require_manifest,
            signature: SignaturePolicy {
                mode: spec.signature,
                file: spec.signature_file.clone(),
                trust: Arc::clone(&spec.trust),
            },
            owner: format!("modelcache agent, job {job}"),
            cancel,
            make_room: Some(Arc::new(move |needed| models.make_room(&for_model, needed))),
        };
        prefetch(source, &self.layout, &request, progress).await
    }

    /// Cancels every job and waits (bounded) for them to checkpoint and stop.
    pub async fn shutdown(&self, limit: Duration) {
        let handles: Vec<tokio::task::JoinHandle<()>> = {
            let mut entries = self.lock();
            entries
                .values_mut()
                .filter_map(|e| {
                    e.job.take().map(|j| {
                        j.cancel.cancel();
                        j.handle
                    })
                })
                .collect()
        };
        let all = futures::future::join_all(handles);
        if tokio::time::timeout(limit, all).await.is_err() {
            warn!(
                "some prefetch jobs did not stop within {}s",
                limit.as_secs()
            );
        }
    }
}
