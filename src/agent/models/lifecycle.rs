//! The job lifecycle as pure decisions: what a request, the end of an attempt, or a removal
//! does to a model's entry. The I/O shell (`jobs`, `budget`) asks these and carries out the
//! answers; nothing here touches a file, a lock or a task.

use super::State;

/// What a model's entry says when a decision is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Facts {
    /// Configured (retried with backoff, never forgotten) or requested over the API.
    pub configured: bool,
    /// The state recorded in the entry.
    pub state: State,
    /// A revision is linked and was verified: readers are served from it.
    pub serving: bool,
    /// The job working on the model, if any.
    pub job: Option<u64>,
    /// Pinned: never removed.
    pub pinned: bool,
    /// A pod reads one of its revisions: never removed while it does.
    pub leased: bool,
}

/// What a prefetch request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OnRequest {
    /// Join the job in flight (waking it if it waits out a backoff).
    Join(u64),
    /// Start a job.
    Start,
}

/// Decides a prefetch request: one job per model, so a second request joins the first.
pub(super) fn on_request(facts: Facts) -> OnRequest {
    match facts.job {
        Some(id) => OnRequest::Join(id),
        None => OnRequest::Start,
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Published (or found published).
    Published,
    /// Stopped by shutdown.
    Cancelled,
    /// Failed.
    Failed,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Next {
    /// The entry's new state.
    pub state: State,
    /// Try again after a backoff (the job stays); otherwise the job ends.
    pub retry: bool,
}

/// Decides what an attempt's end does. A model that serves a linked revision keeps serving it
/// whatever a refresh did: its files are verified, so readers are told `ready`, and the
/// refresh's error shows in the status. Configured models are retried; requested ones are not.
pub(super) fn after_attempt(facts: Facts, outcome: Outcome) -> Next {
    let serving = facts.state == State::Ready && facts.serving;
    match outcome {
        Outcome::Published => Next {
            state: State::Ready,
            retry: false,
        },
        Outcome::Cancelled => Next {
            state: if serving {
                State::Ready
            } else {
                State::Pending
            },
            retry: false,
        },
        Outcome::Failed => Next {
            state: if serving { State::Ready } else { State::Failed },
            retry: facts.configured,
        },
    }
}

/// Why a model's files may not be removed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Keep {
    /// Pinned models are never removed.
    Pinned,
    /// A job works on it.
    Busy(u64),
    /// Pods read it.
    Leased,
}

/// Decides whether an eviction or `DELETE` may remove a model's files: never a pinned one, one
/// a pod reads, or one a job works on. The caller also holds the model's file lock while it
/// removes them, so a holder outside this registry (a `modelcache prefetch` beside the agent)
/// is excluded too, and the lease guard, so no lease is recorded meanwhile.
pub(super) fn may_remove(facts: Facts) -> Result<(), Keep> {
    if facts.pinned {
        return Err(Keep::Pinned);
    }
    if facts.leased {
        return Err(Keep::Leased);
    }
    match facts.job {
        Some(id) => Err(Keep::Busy(id)),
        None => Ok(()),
    }
}

/// What becomes of an entry whose files were removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterRemoval {
    /// Forget it: requested over the API and idle.
    Forget,
    /// Keep it, pending, without a revision: configured, or a request started a job meanwhile
    /// (that job waited for the lock and now fetches onto a clean slate).
    Reset,
}

/// Decides what a removal (an eviction or a `DELETE`) leaves of the entry, looked at again
/// after the removal, since a request may have started a job while the files were being
/// removed. A configured model's entry stays, so a pod that waits for it again (a restart) gets
/// it fetched again; a requested one is forgotten (only a request on the admin socket, naming
/// its source again, brings it back).
pub(super) fn after_removal(facts: Facts) -> AfterRemoval {
    if facts.configured || facts.job.is_some() {
        AfterRemoval::Reset
    } else {
        AfterRemoval::Forget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(configured: bool, state: State, serving: bool, job: Option<u64>) -> Facts {
        Facts {
            configured,
            state,
            serving,
            job,
            pinned: false,
            leased: false,
        }
    }

    #[test]
    fn a_second_request_joins_the_job_in_flight() {
        assert_eq!(
            on_request(facts(false, State::Pending, false, Some(7))),
            OnRequest::Join(7)
        );
        assert_eq!(
            on_request(facts(true, State::Failed, false, None)),
            OnRequest::Start
        );
    }

    #[test]
    fn a_failed_or_cancelled_refresh_leaves_a_serving_model_ready() {
        for configured in [false, true] {
            let ready = facts(configured, State::Ready, true, Some(1));
            let next = after_attempt(ready, Outcome::Failed);
            assert_eq!(next.state, State::Ready);
            assert_eq!(next.retry, configured);
            assert_eq!(after_attempt(ready, Outcome::Cancelled).state, State::Ready);
        }
    }

    #[test]
    fn failures_of_unpublished_models_show_and_only_configured_ones_retry() {
        let requested = facts(false, State::Pending, false, Some(1));
        assert_eq!(
            after_attempt(requested, Outcome::Failed),
            Next {
                state: State::Failed,
                retry: false
            }
        );
        let configured = facts(true, State::Pending, false, Some(1));
        assert_eq!(
            after_attempt(configured, Outcome::Failed),
            Next {
                state: State::Failed,
                retry: true
            }
        );
        assert_eq!(
            after_attempt(configured, Outcome::Cancelled).state,
            State::Pending
        );
        // A `Ready` entry without a revision (evicted meanwhile) is not serving.
        let evicted = facts(true, State::Ready, false, Some(1));
        assert_eq!(after_attempt(evicted, Outcome::Failed).state, State::Failed);
        assert_eq!(
            after_attempt(requested, Outcome::Published).state,
            State::Ready
        );
    }

    #[test]
    fn pinned_busy_and_read_models_are_never_removed() {
        let mut pinned = facts(true, State::Ready, true, None);
        pinned.pinned = true;
        assert_eq!(may_remove(pinned), Err(Keep::Pinned));
        assert_eq!(
            may_remove(facts(false, State::Ready, true, Some(3))),
            Err(Keep::Busy(3))
        );
        assert_eq!(may_remove(facts(false, State::Ready, true, None)), Ok(()));
        let mut read = facts(false, State::Ready, true, None);
        read.leased = true;
        assert_eq!(may_remove(read), Err(Keep::Leased));
    }

    #[test]
    fn a_removal_never_forgets_an_entry_a_request_gave_a_job_meanwhile() {
        let deleted = after_removal;
        assert_eq!(
            deleted(facts(false, State::Ready, true, None)),
            AfterRemoval::Forget
        );
        assert_eq!(
            deleted(facts(false, State::Ready, true, Some(9))),
            AfterRemoval::Reset
        );
        assert_eq!(
            deleted(facts(true, State::Ready, true, None)),
            AfterRemoval::Reset
        );
    }

    /// A configured model stays known when evicted, so a reader waiting for it again has it
    /// fetched; a requested one is forgotten (issue 25: a reader must not bring back what the
    /// operator no longer configures).
    #[test]
    fn issue25_only_configured_models_stay_known_when_evicted() {
        assert_eq!(
            after_removal(facts(true, State::Ready, true, None)),
            AfterRemoval::Reset
        );
        assert_eq!(
            after_removal(facts(false, State::Ready, true, None)),
            AfterRemoval::Forget
        );
    }
}
