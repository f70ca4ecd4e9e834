//! The worker's one decision per attempt, kept pure so every combination
//! can be tested without Redis or a guest: how what the renew task learned
//! (the [`Verdict`]) and how the run ended (the [`RunOutcome`]) combine into
//! what the worker tells the control plane.

use crate::control::AttemptOutcome;
use crate::host::RunOutcome;
use crate::model::ErrorKind;

/// What the renew task learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Held,
    Lost,
    Cancelled,
}

/// What the worker does with an attempt once its run is over.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Decision {
    /// The lease is someone else's now: change nothing (FINALIZE would be
    /// refused anyway).
    Discard,
    /// FINALIZE the attempt with this outcome (charged).
    Finalize(AttemptOutcome),
    /// RELEASE as a node fault with this message: uncharged, uncounted, and
    /// bounded per job by the control plane.
    ReleaseFault(String),
    /// RELEASE: the job goes back to the queue uncharged (drain).
    Release,
}

/// The decision for a run that ended with `outcome` while the renew task
/// reached `verdict`.
///
/// - A lost lease wins over everything: someone else owns the job.
/// - A cancel wins over every outcome: the attempt ends `cancelled` and its
///   run is settled.
/// - With the lease held, a node fault is released (not the guest's doing),
///   an interrupted run was stopped by the drain's hard stop and is
///   released, and everything else is finalized as it ended.
pub(super) fn decide(verdict: Verdict, outcome: RunOutcome) -> Decision {
    match (verdict, outcome) {
        (Verdict::Lost, _) => Decision::Discard,
        (Verdict::Cancelled, _) => Decision::Finalize(AttemptOutcome::Cancelled),
        (
            Verdict::Held,
            RunOutcome::Failed {
                kind: ErrorKind::NodeFault,
                message,
            },
        ) => Decision::ReleaseFault(message),
        // Only the drain's hard stop interrupts a run whose lease is held.
        (Verdict::Held, RunOutcome::Interrupted) => Decision::Release,
        (Verdict::Held, RunOutcome::Ok(output)) => {
            Decision::Finalize(AttemptOutcome::Succeeded { output })
        }
        (Verdict::Held, RunOutcome::Failed { kind, message }) => {
            Decision::Finalize(AttemptOutcome::Failed { kind, message })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way a run can end: success, interruption, and a failure of
    /// each kind (the node fault among them).
    fn outcomes() -> Vec<RunOutcome> {
        let mut all = vec![RunOutcome::Ok("out".into()), RunOutcome::Interrupted];
        all.extend(ErrorKind::ALL.into_iter().map(|kind| RunOutcome::Failed {
            kind,
            message: format!("{kind} happened"),
        }));
        all
    }

    #[test]
    fn a_lost_lease_discards_every_outcome() {
        for o in outcomes() {
            assert_eq!(decide(Verdict::Lost, o.clone()), Decision::Discard, "{o:?}");
        }
    }

    #[test]
    fn a_cancel_finalizes_every_outcome_as_cancelled() {
        for o in outcomes() {
            assert_eq!(
                decide(Verdict::Cancelled, o.clone()),
                Decision::Finalize(AttemptOutcome::Cancelled),
                "{o:?}"
            );
        }
    }

    #[test]
    fn a_held_lease_finalizes_what_the_guest_did() {
        assert_eq!(
            decide(Verdict::Held, RunOutcome::Ok("out".into())),
            Decision::Finalize(AttemptOutcome::Succeeded {
                output: "out".into()
            })
        );
        for kind in ErrorKind::ALL {
            if kind == ErrorKind::NodeFault {
                continue;
            }
            let message = format!("{kind} happened");
            let failed = RunOutcome::Failed {
                kind,
                message: message.clone(),
            };
            assert_eq!(
                decide(Verdict::Held, failed),
                Decision::Finalize(AttemptOutcome::Failed { kind, message }),
                "{kind}"
            );
        }
    }

    #[test]
    fn a_held_lease_releases_node_faults_and_interrupted_runs() {
        let fault = RunOutcome::Failed {
            kind: ErrorKind::NodeFault,
            message: "pool exhausted".into(),
        };
        assert_eq!(
            decide(Verdict::Held, fault),
            Decision::ReleaseFault("pool exhausted".into())
        );
        assert_eq!(
            decide(Verdict::Held, RunOutcome::Interrupted),
            Decision::Release
        );
    }

    #[test]
    fn every_combination_has_exactly_the_documented_decision() {
        // The table, spelled out once more as counts: 3 verdicts × every
        // outcome, each landing in the one arm the rules above give it.
        let (mut discard, mut cancelled, mut finalize, mut fault, mut release) = (0, 0, 0, 0, 0);
        for v in [Verdict::Held, Verdict::Lost, Verdict::Cancelled] {
            for o in outcomes() {
                match decide(v, o) {
                    Decision::Discard => discard += 1,
                    Decision::Finalize(AttemptOutcome::Cancelled) => cancelled += 1,
                    Decision::Finalize(_) => finalize += 1,
                    Decision::ReleaseFault(_) => fault += 1,
                    Decision::Release => release += 1,
                }
            }
        }
        let n = outcomes().len();
        assert_eq!(
            (discard, cancelled, finalize, fault, release),
            (n, n, n - 2, 1, 1)
        );
    }
}
