//! Control-plane conformance suite. Every test runs twice: against a
//! standalone `redis-server` and against a 3-master Redis Cluster (with the
//! tenants spread over 4 shards), both real processes started here.
//!
//! One file per area; `support` holds what they share.

mod common;

#[path = "control/cancel.rs"]
mod cancel;
#[path = "control/claim.rs"]
mod claim;
#[path = "control/credits.rs"]
mod credits;
#[path = "control/lease.rs"]
mod lease;
#[path = "control/live.rs"]
mod live;
#[path = "control/maintenance.rs"]
mod maintenance;
#[path = "control/state.rs"]
mod state;
#[path = "control/submit.rs"]
mod submit;
#[path = "control/support.rs"]
mod support;
#[path = "control/tenants.rs"]
mod tenants;

// The conformance macro names each scenario as `super::$name`: the areas'
// scenarios are brought here so the test names stay `standalone::<name>`
// and `cluster::<name>` whatever file a scenario lives in.
use cancel::*;
use claim::*;
use credits::*;
use lease::*;
use live::*;
use maintenance::*;
use state::*;
use submit::*;
use tenants::*;

/// Starts the backend, runs `$body(url, shards)` under it.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let r = crate::common::redis::RedisServer::start();
                    super::$name(&r.url, 1).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let c = crate::common::redis::RedisCluster::start(3);
                    super::$name(&c.url, 4).await;
                }
            )*
        }
    };
}

conformance!(
    exactly_once_with_8_claimers,
    reaped_lease_fences_the_old_token,
    credit_invariant_under_random_operations,
    weights_share_capacity,
    idle_tenant_gets_no_burst,
    tenant_at_max_running_does_not_slow_others,
    light_tenant_is_not_stuck_behind_a_flood,
    quotas_and_gpu_slots_hold_at_every_claim,
    idempotency_keys,
    failing_job_returns_after_backoff,
    racing_schedulers_promote_once,
    cancel_queued_and_running,
    agent_state_commits_only_on_current_version,
    released_job_goes_back_uncharged,
    malformed_arguments_write_nothing,
    wake_up_signals_survive_an_abandoned_wait,
    large_agent_states_never_delete_themselves,
    cancel_wins_on_every_path_out_of_finalize,
    every_run_has_its_own_attempt_number,
    requeues_bypass_admission_and_the_queue_stays_bounded,
    virtual_time_is_corrected_at_the_claim_weight,
    release_and_reap_refund_the_claim_estimate,
    ledger_amounts_stay_exact_integers,
    node_faults_are_bounded_and_never_charged,
    missing_state_blob_fails_its_job_alone,
    claims_and_maintenance_go_on_past_a_failing_shard,
    slot_time_is_billed_exactly,
    stream_out_of_step_is_repaired,
    impossible_head_fails_and_frees_its_queue,
    gpu_tenant_that_fits_is_found_behind_many_that_do_not,
    a_batch_submit_decides_each_job_in_order,
    a_batch_finalize_settles_each_attempt_alone,
    live_log_is_fenced_and_capped,
    retry_queues_a_failed_job_as_its_next_attempt,
    a_node_without_the_scripts_gets_them_back,
);
