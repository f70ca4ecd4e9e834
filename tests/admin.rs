//! What an operator sees, over real HTTP and a real `redis-server`:
//! tenants with counts, credits and recent share; jobs across tenants by
//! state and error kind; any tenant's job's log; retry of a failed job as
//! its next, charged attempt.

mod common;

use agentplane::client::{AdminJobsFilter, Page};
use agentplane::model::{ErrorKind, JobState, TenantPatch};
use common::stack::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_lists_tenants_and_jobs_across_tenants() {
    let s = Stack::start(Opts::default()).await;
    let Scene {
        acme,
        ok_a,
        bad_b,
        ok_b,
        ..
    } = s.three_finished_jobs("a").await;
    let admin = s.as_caller(ADMIN);

    // Tenants, by id, with their counters and recent share of capacity.
    let page = admin.admin_tenants(&Page::default()).await.unwrap();
    let ids: Vec<&str> = page.tenants.iter().map(|t| t.info.id.as_str()).collect();
    assert_eq!(ids, ["acme", "beta", "idle"]);
    assert_eq!(page.next_cursor, None);
    let beta_row = &page.tenants[1];
    assert_eq!(beta_row.info.weight, 3);
    assert_eq!((beta_row.info.running, beta_row.info.queued), (0, 0));
    assert!(beta_row.info.credits.balance < 1_000_000_000);
    let shares: f64 = page.tenants.iter().map(|t| t.share_1m).sum();
    assert!((shares - 1.0).abs() < 1e-9, "{page:?}");
    assert!(beta_row.share_1m > 0.0 && page.tenants[2].share_1m == 0.0);
    // Weights of the tenants that ran: acme 1, beta 3.
    assert!((beta_row.weight_share - 0.75).abs() < 1e-9, "{beta_row:?}");
    // Paged by id.
    let p1 = admin
        .admin_tenants(&Page {
            limit: Some(2),
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(p1.tenants.len(), 2);
    assert_eq!(p1.next_cursor.as_deref(), Some("beta"));
    let p2 = admin
        .admin_tenants(&Page {
            limit: Some(2),
            cursor: p1.next_cursor,
        })
        .await
        .unwrap();
    assert_eq!(p2.tenants[0].info.id, "idle");
    assert_eq!(p2.next_cursor, None);

    // Jobs across tenants, newest first; by state and by error kind.
    let all = admin.admin_jobs(&AdminJobsFilter::default()).await.unwrap();
    let ids: Vec<&str> = all.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [ok_b.as_str(), bad_b.as_str(), ok_a.as_str()]);
    let failed = admin
        .admin_jobs(&AdminJobsFilter {
            state: Some(JobState::Failed),
            error_kind: Some(ErrorKind::AgentError),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(failed.jobs.len(), 1);
    assert_eq!(failed.jobs[0].id, bad_b);
    assert_eq!(failed.jobs[0].tenant, "beta");
    let none = admin
        .admin_jobs(&AdminJobsFilter {
            error_kind: Some(ErrorKind::Timeout),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.jobs.is_empty() && none.next_cursor.is_none());
    let first = admin
        .admin_jobs(&AdminJobsFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(first.jobs.len(), 2);
    let rest = admin
        .admin_jobs(&AdminJobsFilter {
            limit: Some(2),
            cursor: first.next_cursor.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.jobs.len(), 1);
    assert_eq!(rest.jobs[0].id, ok_a);

    // Tenants may not read the admin's listings.
    let e = s
        .as_caller(&acme)
        .admin_tenants(&Page::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::FORBIDDEN));
    let (st, v) = s.get("/v1/admin/jobs?error_kind=oops", ADMIN).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("error_kind")
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_job_is_retried_as_its_next_attempt_and_charged_as_usual() {
    let s = Stack::start(Opts::default()).await;
    let acme = s.tenant("acme").await;
    let d = s.push(&acme, "echo").await;
    let bad = s
        .submit(
            &acme,
            json!({"component": d, "input": "fail:again", "max_attempts": 1}),
        )
        .await;
    let good = s
        .submit(&acme, json!({"component": d, "input": "ok"}))
        .await;
    s.wait_terminal(&acme, &bad, 60).await;
    s.wait_terminal(&acme, &good, 60).await;
    let settled = s.tenant_info("acme").await["settled"].as_i64().unwrap();
    let api = s.as_caller(&acme);

    // Two retries at once: exactly one wins, the other is 409 not_failed.
    // The tenant runs nothing meanwhile, so the winner's job is still
    // queued when the loser comes (else the worker could fail it again in
    // between, and a second retry would rightly win too).
    let max_running = s.tenant_info("acme").await["max_running"].as_u64().unwrap() as u32;
    let hold = |n: u32| TenantPatch {
        max_running: Some(n),
        ..TenantPatch::default()
    };
    s.as_caller(ADMIN)
        .patch_tenant("acme", &hold(0))
        .await
        .unwrap();
    let path = format!("/v1/jobs/{bad}/retry");
    let (a, b) = tokio::join!(
        s.post(&path, &acme, json!(null)),
        s.post(&path, &acme, json!(null))
    );
    let mut codes = [a.0, b.0];
    codes.sort();
    assert_eq!(codes, [StatusCode::OK, StatusCode::CONFLICT], "{a:?} {b:?}");
    let (won, lost) = if a.0 == StatusCode::OK {
        (a.1, b.1)
    } else {
        (b.1, a.1)
    };
    // The same job, queued again (or already running its next attempt).
    assert_eq!(won["id"], bad.as_str(), "{won}");
    assert_eq!(error_code(&lost), "not_failed", "{lost}");
    let queued = s.get(&format!("/v1/jobs/{bad}"), &acme).await.1;
    assert_eq!(state(&queued), "queued", "{queued}");
    s.as_caller(ADMIN)
        .patch_tenant("acme", &hold(max_running))
        .await
        .unwrap();
    let job = s.wait_terminal(&acme, &bad, 60).await;
    // The same input fails the same way, as one counted attempt of its
    // own, and that run is charged as any.
    assert_eq!(state(&job), "failed", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let info = s.assert_books_balance("acme").await;
    assert!(info["settled"].as_i64().unwrap() > settled, "{info}");
    // The ledger names each run of the job once: runs 1 and 2.
    let ledger = s
        .as_caller(ADMIN)
        .ledger("acme", &Page::default())
        .await
        .unwrap();
    let mut runs: Vec<(String, u32)> = ledger
        .entries
        .iter()
        .filter(|e| e.job == bad && e.op != "release")
        .map(|e| (e.op.clone(), e.attempt))
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            ("reserve".into(), 1),
            ("reserve".into(), 2),
            ("settle".into(), 1),
            ("settle".into(), 2)
        ]
    );
    // The admin retries for a tenant; a job that did not fail is 409;
    // another tenant's job does not exist.
    let r2 = s.as_caller(ADMIN).admin_retry("acme", &bad).await.unwrap();
    assert_eq!(r2.id, bad);
    let e = api.retry(&good).await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::CONFLICT), "{e}");
    assert_eq!(e.code(), Some("not_failed"), "{e}");
    let other = s.tenant("other").await;
    let e = s.as_caller(&other).retry(&bad).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
    let job = s.wait_terminal(&acme, &bad, 60).await;
    assert_eq!(state(&job), "failed", "{job}");
    s.assert_books_balance("acme").await;
    s.stop().await;
}
