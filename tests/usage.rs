//! A tenant's bill over real HTTP and a real `redis-server`: the ledger
//! (JSON and CSV, paged) whose sums equal the balance, usage by hour and
//! day, and credit grants made once per Idempotency-Key.

mod common;

use agentplane::client::{Page, UsageWindow};
use agentplane::control::LedgerRow;
use common::stack::*;
use reqwest::StatusCode;
use serde_json::json;

/// Runs two jobs that succeed and one that fails on tenant `acme`.
async fn billed_tenant(s: &Stack) -> String {
    let token = s.tenant("acme").await;
    let digest = s.push(&token, "echo").await;
    for input in ["hello", "again", "fail:boom"] {
        let id = s
            .submit(
                &token,
                json!({"component": digest, "input": input, "max_attempts": 1}),
            )
            .await;
        s.wait_terminal(&token, &id, 60).await;
    }
    token
}

async fn all_entries(api: &agentplane::client::ApiClient, id: &str) -> Vec<LedgerRow> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = api
            .ledger(
                id,
                &Page {
                    limit: Some(2),
                    cursor: cursor.take(),
                },
            )
            .await
            .expect("ledger page");
        assert!(page.entries.len() <= 2);
        out.extend(page.entries);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_ledger_adds_up_to_the_balance_in_json_and_csv() {
    let s = Stack::start(Opts::default()).await;
    let token = billed_tenant(&s).await;
    let info = s.assert_books_balance("acme").await;
    let acme = s.as_caller(&token);
    let entries = all_entries(&acme, "acme").await;
    // One grant at creation, then for each of 3 runs its reserve and its
    // settle (which carries the release of the unused rest).
    assert_eq!(entries.len(), 7, "{entries:?}");
    let sum = |op: &str| -> i64 {
        entries
            .iter()
            .filter(|e| e.op == op)
            .map(|e| e.amount)
            .sum()
    };
    assert_eq!(sum("grant"), info["granted"].as_i64().unwrap());
    assert_eq!(sum("settle"), info["settled"].as_i64().unwrap());
    assert_eq!(
        sum("grant") - sum("settle"),
        info["credits"]["balance"].as_i64().unwrap()
    );
    let released: i64 = entries.iter().map(|e| e.released).sum();
    assert!(released > 0, "{entries:?}");
    assert_eq!(
        sum("reserve") - sum("settle") - released - sum("release"),
        0
    );
    assert!(sum("settle") > 0);
    let last = entries.last().unwrap();
    assert_eq!(last.balance, info["credits"]["balance"].as_i64().unwrap());
    // Oldest first, ids increasing.
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));

    // The admin reads the same ledger; the CSV has the same lines.
    let admin = s.as_caller(ADMIN);
    let page = admin.ledger("acme", &Page::default()).await.unwrap();
    assert_eq!(page.entries, entries);
    assert_eq!(page.checkpoint.grant, 0);
    let csv = admin.ledger_csv("acme", &Page::default()).await.unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("id,time,op,job,attempt,amount,released,balance,reserved")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), entries.len());
    for (row, e) in rows.iter().zip(&entries) {
        assert_eq!(row[0], e.id);
        assert_eq!(row[2], e.op);
        assert_eq!(row[5].parse::<i64>().unwrap(), e.amount);
        assert_eq!(row[6].parse::<i64>().unwrap(), e.released);
    }
    let csv_balance: i64 = rows
        .iter()
        .map(|r| match r[2] {
            "grant" => r[5].parse::<i64>().unwrap(),
            "settle" => -r[5].parse::<i64>().unwrap(),
            _ => 0,
        })
        .sum();
    assert_eq!(csv_balance, info["credits"]["balance"].as_i64().unwrap());
    let resp = s
        .http
        .get(format!("{}/v1/tenants/acme/ledger?limit=1", s.base))
        .bearer_auth(&token)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(
        resp.headers()["next-cursor"].to_str().unwrap(),
        entries[0].id
    );

    // Another tenant cannot see it; bad pages are named.
    let other = s.tenant("other").await;
    let e = s
        .as_caller(&other)
        .ledger("acme", &Page::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
    s.assert_queries_refused(
        "/v1/tenants/acme/ledger",
        &token,
        &[
            ("limit=0", "limit"),
            ("cursor=x", "cursor"),
            ("colour=1", "colour"),
        ],
    )
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_counts_fuel_time_credits_and_outcomes() {
    let s = Stack::start(Opts::default()).await;
    let token = billed_tenant(&s).await;
    let info = s.assert_books_balance("acme").await;
    let acme = s.as_caller(&token);
    let jobs = acme.jobs(&Default::default()).await.unwrap().jobs;
    let fuel: u64 = jobs.iter().map(|j| j.usage.fuel).sum();
    let wall: u64 = jobs.iter().map(|j| j.usage.wall_ms).sum();
    for by in ["hour", "day"] {
        let u = acme
            .usage(
                "acme",
                &UsageWindow {
                    by: Some(by.into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(u.by, by);
        assert!(!u.truncated);
        assert_eq!(u.total.jobs.get("succeeded"), Some(&2), "{u:?}");
        assert_eq!(u.total.jobs.get("failed"), Some(&1), "{u:?}");
        assert_eq!(u.total.failures.get("agent_error"), Some(&1), "{u:?}");
        assert_eq!(u.total.credits, info["settled"].as_i64().unwrap());
        assert_eq!(u.total.fuel, fuel);
        assert!(fuel > 0);
        assert_eq!(u.total.slot_ms, wall);
        assert_eq!(u.total.gpu_ms, 0);
        // Buckets add up to the total.
        let bc: i64 = u.buckets.iter().map(|b| b.credits).sum();
        assert_eq!(bc, u.total.credits);
        assert!(!u.buckets.is_empty() && u.buckets.len() <= 2);
    }
    // A window before the jobs holds nothing; the admin may read it too.
    let u = s
        .as_caller(ADMIN)
        .usage(
            "acme",
            &UsageWindow {
                from: Some("2020-01-01T00:00:00Z".into()),
                to: Some("2020-01-02T00:00:00Z".into()),
                by: Some("day".into()),
            },
        )
        .await
        .unwrap();
    assert!(u.buckets.is_empty());
    assert_eq!(u.total.credits, 0);
    s.assert_queries_refused(
        "/v1/tenants/acme/usage",
        &token,
        &[
            ("by=week", "`by`"),
            ("from=yesterday", "`from`"),
            ("from=2000&to=1000", "`from`"),
        ],
    )
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_with_an_idempotency_key_credits_once() {
    let s = Stack::start(Opts::default()).await;
    s.tenant("acme").await;
    let admin = s.as_caller(ADMIN);
    let before = s.tenant_info("acme").await["credits"]["balance"]
        .as_i64()
        .unwrap();
    let first = admin
        .grant_credits_once("acme", 250, "grant-1")
        .await
        .unwrap();
    assert_eq!(first.balance, before + 250);
    // The retry of a grant whose answer was lost: same answer, no credit.
    let again = admin
        .grant_credits_once("acme", 250, "grant-1")
        .await
        .unwrap();
    assert_eq!(again, first);
    let info = s.assert_books_balance("acme").await;
    assert_eq!(info["credits"]["balance"].as_i64().unwrap(), before + 250);
    // The same key with another amount is a conflict, and credits nothing.
    let e = admin
        .grant_credits_once("acme", 999, "grant-1")
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNPROCESSABLE_ENTITY), "{e}");
    assert_eq!(e.code(), Some("idempotency_conflict"));
    // Another key is another grant; no key grants every time.
    let b = admin
        .grant_credits_once("acme", 5, "grant-2")
        .await
        .unwrap();
    assert_eq!(b.balance, before + 255);
    admin.grant_credits("acme", 5).await.unwrap();
    let b = admin.grant_credits("acme", 5).await.unwrap();
    assert_eq!(b.balance, before + 265);
    // The ledger shows each real grant once.
    let page = admin.ledger("acme", &Page::default()).await.unwrap();
    let grants: Vec<i64> = page
        .entries
        .iter()
        .filter(|e| e.op == "grant")
        .map(|e| e.amount)
        .collect();
    assert_eq!(grants, vec![1_000_000_000, 250, 5, 5, 5]);
    // A missing tenant is 404 with or without a key.
    let e = admin
        .grant_credits_once("nobody", 1, "k")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
    s.stop().await;
}
