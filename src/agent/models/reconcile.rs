//! Applying a changed list of configured models to the running registry (see
//! [`crate::agent::reload`]).

use std::sync::Arc;

use super::{Entry, Models, State, serves_spec, why_not_served};
use crate::config::agent::ModelSpec;
use tracing::warn;

/// What a change of the configured models did, model by model.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Models now configured that were not.
    pub added: Vec<String>,
    /// Models no longer configured: kept until evicted, neither pinned nor refreshed.
    pub removed: Vec<String>,
    /// Models whose source, selection or manifest requirement changed: fetched again.
    pub refetched: Vec<String>,
    /// Models whose pin changed, and to what.
    pub repinned: Vec<(String, bool)>,
}

impl Reconciled {
    /// One line per change, for the log.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = Vec::new();
        lines.extend(self.added.iter().map(|m| format!("{m} added")));
        lines.extend(self.removed.iter().map(|m| {
            format!("{m} removed: no longer pinned or refreshed; its files stay until evicted")
        }));
        lines.extend(
            self.refetched
                .iter()
                .map(|m| format!("{m} changed: fetched again with its new settings")),
        );
        lines.extend(
            self.repinned.iter().map(|(m, pin)| {
                format!("{m} {}", if *pin { "pinned" } else { "no longer pinned" })
            }),
        );
        if lines.is_empty() {
            lines.push("no model changed".into());
        }
        lines
    }
}

/// Whether two specs of one model fetch different things.
fn fetches_differently(a: &ModelSpec, b: &ModelSpec) -> bool {
    a.source != b.source
        || a.account != b.account
        || a.selection.patterns() != b.selection.patterns()
        || a.require_manifest != b.require_manifest
        || a.signature != b.signature
        || a.signature_file != b.signature_file
        || !crate::fetch::signed::same_trust(&a.trust, &b.trust)
}

impl Models {
    /// Makes the registry's configured models `specs`. A running prefetch of a model whose
    /// fetching changed is cancelled (its finished ranges stay journaled) and started again
    /// with the new settings; a removed model's retries stop.
    pub async fn reconcile(self: &Arc<Self>, specs: Vec<ModelSpec>) -> Reconciled {
        let mut done = Reconciled::default();
        let mut restart = Vec::new();
        {
            let mut entries = self.lock();
            for spec in &specs {
                let name = spec.name.to_string();
                let Some(entry) = entries.get_mut(&name) else {
                    entries.insert(name.clone(), Entry::new(spec.clone(), true));
                    done.added.push(name.clone());
                    self.start_configured(&mut entries, &name);
                    continue;
                };
                let was = std::mem::replace(&mut entry.spec, spec.clone());
                let newly = !entry.configured;
                entry.configured = true;
                entry.source_kept = true;
                if fetches_differently(&was, spec) {
                    done.refetched.push(name.clone());
                    // New readers get what the new settings ask for, or wait for it: a
                    // revision that does not serve them is no longer handed out (pods
                    // already reading it keep it through their leases).
                    let serves = entry.revision.as_ref().is_some_and(|r| {
                        let dir = self.layout.revision_dir(&spec.name, r);
                        let why_not = crate::store::ReadyMarker::read(&dir)
                            .map_or_else(|e| Some(e.to_string()), |m| why_not_served(spec, &m));
                        if let Some(why) = &why_not {
                            warn!(model.name = %spec.name, revision = %r, "{} revision {r} is no longer handed to new readers: {why}", spec.name);
                        }
                        why_not.is_none()
                    });
                    if !serves && entry.revision.is_some() {
                        entry.state = State::Pending;
                        entry.revision = None;
                        entry.verification = None;
                        entry.signature = None;
                        entry.warnings.clear();
                    }
                    match entry.job.take() {
                        Some(job) => restart.push((name.clone(), job)),
                        None => {
                            self.spawn_job_locked(&mut entries, &name);
                        }
                    }
                } else if newly {
                    // Requested before, configured now: kept as it is when ready.
                    done.added.push(name.clone());
                    if entry.job.is_none() && entry.state() != State::Ready {
                        self.start_configured(&mut entries, &name);
                    }
                } else if was.pin != spec.pin {
                    done.repinned.push((name.clone(), spec.pin));
                }
            }
            for (name, entry) in entries.iter_mut() {
                if !entry.configured || specs.iter().any(|s| s.name.as_str() == name) {
                    continue;
                }
                entry.configured = false;
                entry.spec.pin = false;
                done.removed.push(name.clone());
                // A failed model waiting out its backoff stops retrying now; a download in
                // flight finishes, and is not retried.
                if entry.in_backoff {
                    if let Some(job) = entry.job.take() {
                        job.cancel.cancel();
                        entry.in_backoff = false;
                    }
                }
            }
        }
        for (name, job) in restart {
            job.cancel.cancel();
            // Stops within seconds, after a last journal checkpoint.
            let _ = job.handle.await;
            let mut entries = self.lock();
            if entries.get(&name).is_some_and(|e| e.job.is_none()) {
                self.spawn_job_locked(&mut entries, &name);
            }
        }
        done
    }

    /// A model just configured: ready at once when a published revision serves its spec,
    /// fetched otherwise. The caller holds the registry's lock.
    fn start_configured(
        self: &Arc<Self>,
        entries: &mut std::collections::BTreeMap<String, Entry>,
        name: &str,
    ) {
        // Without settled disks nothing is written (the cache root would be the OS disk).
        let blocked = self.blocked_reason().is_some();
        let Some(entry) = entries.get_mut(name) else {
            return;
        };
        let published = self
            .layout
            .linked_intact(&entry.spec.name)
            .filter(|(revision, marker)| serves_spec(&entry.spec, revision, marker));
        match published {
            Some((revision, marker)) => {
                entry.state = State::Ready;
                entry.revision = Some(revision);
                entry.verification = Some(marker.verification);
                entry.signature = marker.signature;
                entry.warnings = marker.warnings;
                entry.last_error = None;
            }
            None if !blocked => {
                self.spawn_job_locked(entries, name);
            }
            None => {}
        }
    }
}
