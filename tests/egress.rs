//! Agents' outgoing HTTP (`wasi:http`) under their tenant's egress policy,
//! against real HTTP servers on the loopback range and the real `fetch`
//! guest: what is allowed goes through and is counted; every other host,
//! port and scheme, a redirect out of the policy and a name that resolves
//! to an internal address are refused before anything is sent; slow and
//! huge answers and request floods are bounded, each within its own job.

mod common;

use agentplane::egress::Policy;
use agentplane::host::{
    EgressGrant, EgressLimits, Host, HostConfig, RunOutcome, RunReport, RunRequest,
};
use agentplane::model::{ErrorKind, Limits};
use common::host::{limits, load};
use common::upstream::Upstream;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn host(egress: EgressLimits) -> Host {
    Host::new(HostConfig {
        max_instances: 16,
        egress,
        ..HostConfig::default()
    })
    .unwrap()
}

fn tight() -> EgressLimits {
    EgressLimits {
        first_byte_timeout: Duration::from_millis(400),
        between_bytes_timeout: Duration::from_millis(400),
        max_response_bytes: 1 << 20,
        max_in_flight_per_tenant: 1,
        ..EgressLimits::default()
    }
}

/// A grant of `rules`, 5 requests and 64 MiB.
fn grant(rules: &[String]) -> EgressGrant {
    EgressGrant {
        policy: Arc::new(Policy::parse(rules).unwrap()),
        max_requests: 5,
        max_bytes: 64 << 20,
    }
}

async fn fetch(host: &Host, tenant: &str, rules: &[String], input: Value) -> RunReport {
    fetch_with(host, tenant, grant(rules), input, limits()).await
}

async fn fetch_with(
    host: &Host,
    tenant: &str,
    egress: EgressGrant,
    input: Value,
    limits: Limits,
) -> RunReport {
    let c = load(host, "fetch").await;
    let req = RunRequest {
        egress,
        ..common::host::request(tenant, &c, &input.to_string(), limits)
    };
    host.run(req).await
}

fn output(r: &RunReport) -> Value {
    match &r.outcome {
        RunOutcome::Ok(out) => serde_json::from_str(out).unwrap(),
        other => panic!("expected success, got {other:?}; log:\n{}", r.log),
    }
}

/// The guest's error (`<url>: <WASI HTTP error code>`).
fn refused(r: &RunReport) -> &str {
    match &r.outcome {
        RunOutcome::Failed {
            kind: ErrorKind::AgentError,
            message,
        } => message,
        other => panic!("expected the guest's error, got {other:?}; log:\n{}", r.log),
    }
}

#[tokio::test]
async fn an_allowed_call_goes_through_and_is_counted() {
    let up = Upstream::start().await;
    let h = host(EgressLimits::default());
    let r = fetch(
        &h,
        "t1",
        &[up.base()],
        json!({"url": format!("{}/hello", up.base()), "headers": [["x-key", "k1"]]}),
    )
    .await;
    let out = output(&r);
    assert_eq!(out["status"], 200);
    assert_eq!(out["body"], "hello from upstream; x-key=k1");
    assert_eq!(up.hits(), 1);
    assert_eq!(r.egress.requests, 1);
    assert_eq!(r.egress.refused, 0);
    let body = "hello from upstream; x-key=k1".len() as u64;
    assert!(
        r.egress.bytes_in > body && r.egress.bytes_in < body + 512,
        "{:?}",
        r.egress
    );
    assert!(
        r.egress.bytes_out > 0 && r.egress.bytes_out < 512,
        "{:?}",
        r.egress
    );
}

#[tokio::test]
async fn another_host_port_or_scheme_is_refused_before_anything_is_sent() {
    let (up, other) = (Upstream::start().await, Upstream::start().await);
    let h = host(EgressLimits::default());
    let rules = [up.base()];
    for url in [
        format!("{}/hello", other.base()),
        format!("https://127.0.0.1:{}/hello", up.port()),
        format!("http://localhost:{}/hello", up.port()),
        format!("http://127.0.0.2:{}/hello", up.port()),
    ] {
        let r = fetch(&h, "t1", &rules, json!({ "url": url })).await;
        assert!(refused(&r).ends_with("HttpRequestDenied"), "{url}: {r:?}");
        assert!(
            r.log.contains("[egress]")
                && r.log.contains("not in the tenant's allowed_outbound_hosts"),
            "{url}: log:\n{}",
            r.log
        );
        assert_eq!((r.egress.requests, r.egress.refused), (0, 1), "{url}");
    }
    // No policy: nothing at all.
    let r = fetch(
        &h,
        "t1",
        &[],
        json!({"url": format!("{}/hello", up.base())}),
    )
    .await;
    assert!(refused(&r).ends_with("HttpRequestDenied"), "{r:?}");
    assert_eq!((up.hits(), other.hits()), (0, 0));
}

#[tokio::test]
async fn a_redirect_is_followed_only_within_the_policy() {
    let (up, other) = (Upstream::start().await, Upstream::start().await);
    let h = host(EgressLimits::default());
    let rules = [up.base()];
    let inside = format!("{}/redirect?to={}/hello", up.base(), up.base());
    let out = output(&fetch(&h, "t1", &rules, json!({"url": inside, "follow": 1})).await);
    assert_eq!(out["body"], "hello from upstream; x-key=");
    assert_eq!(out["hops"].as_array().unwrap().len(), 2);
    // Not followed by the host: the guest sees the 302 itself.
    let out = output(&fetch(&h, "t1", &rules, json!({"url": inside})).await);
    assert_eq!(out["status"], 302);
    let outside = format!("{}/redirect?to={}/hello", up.base(), other.base());
    let r = fetch(&h, "t1", &rules, json!({"url": outside, "follow": 1})).await;
    assert!(refused(&r).ends_with("HttpRequestDenied"), "{r:?}");
    assert_eq!(other.hits(), 0, "the redirect's target was never reached");
    assert_eq!(up.hits(), 4);
}

#[tokio::test]
async fn a_name_that_resolves_to_an_internal_address_is_refused() {
    let up = Upstream::start().await;
    let h = host(EgressLimits::default());
    // The rule names `localhost`, not its address: the name resolves to
    // loopback, which only a rule naming the address itself may reach.
    let rules = [format!("http://localhost:{}", up.port())];
    let r = fetch(
        &h,
        "t1",
        &rules,
        json!({"url": format!("http://localhost:{}/hello", up.port())}),
    )
    .await;
    assert!(refused(&r).ends_with("DestinationIpProhibited"), "{r:?}");
    assert!(
        r.log.contains("localhost resolves to no public address"),
        "log:\n{}",
        r.log
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_slow_server_times_out_in_its_own_job_only() {
    let up = Upstream::start().await;
    let h = Arc::new(host(EgressLimits {
        max_in_flight_per_tenant: 8,
        ..tight()
    }));
    let rules = vec![up.base()];
    let started = Instant::now();
    let slow = {
        let (h, rules, url) = (
            h.clone(),
            rules.clone(),
            format!("{}/slow?ms=5000", up.base()),
        );
        tokio::spawn(async move { fetch(&h, "t1", &rules, json!({ "url": url })).await })
    };
    // A neighbour's call on the same node meanwhile is unharmed.
    let quick = fetch(
        &h,
        "t2",
        &rules,
        json!({"url": format!("{}/hello", up.base())}),
    )
    .await;
    assert_eq!(output(&quick)["status"], 200);
    let r = slow.await.unwrap();
    assert!(refused(&r).ends_with("ConnectionReadTimeout"), "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // A stalled body: the between-bytes bound. (An error while reading a
    // body reaches the guest as a stream error whose text names it.)
    let r = fetch(
        &h,
        "t1",
        &rules,
        json!({"url": format!("{}/stall", up.base())}),
    )
    .await;
    assert!(refused(&r).contains("connection read timeout"), "{r:?}");

    // Waiting on the network counts against the job's wall clock: a job of
    // 1 s waiting on a server's 5 s ends as a `timeout` after about 1 s,
    // whatever the node's own (longer) first-byte bound.
    let patient = host(EgressLimits::default());
    let started = Instant::now();
    let r = fetch_with(
        &patient,
        "t1",
        grant(&rules),
        json!({"url": format!("{}/slow?ms=5000", up.base())}),
        Limits {
            timeout_ms: 1000,
            ..limits()
        },
    )
    .await;
    let waited = started.elapsed();
    match &r.outcome {
        RunOutcome::Failed { kind, .. } => assert_eq!(*kind, ErrorKind::Timeout, "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert!(waited < Duration::from_millis(2500), "{waited:?}");
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
}

#[tokio::test]
async fn a_huge_response_stops_at_the_cap() {
    let up = Upstream::start().await;
    let h = host(tight());
    let r = fetch(
        &h,
        "t1",
        &[up.base()],
        json!({"url": format!("{}/huge?mib=64", up.base())}),
    )
    .await;
    assert!(
        refused(&r).contains("HTTP response body size exceeds limit: 1048576 bytes"),
        "{r:?}"
    );
    assert!(
        r.log.contains("its body passed 1048576 bytes"),
        "log:\n{}",
        r.log
    );
    // What was taken in stops within a frame of the cap, not at 64 MiB.
    assert!(
        r.egress.bytes_in > 1 << 20 && r.egress.bytes_in < (1 << 20) + (1 << 20) + 4096,
        "{:?}",
        r.egress
    );
    // The node is fine: the next job's call goes through.
    let r = fetch(
        &h,
        "t1",
        &[up.base()],
        json!({"url": format!("{}/hello", up.base())}),
    )
    .await;
    assert_eq!(output(&r)["status"], 200);

    // The job's byte grant, both ways, under the response cap: what was
    // counted (and will be billed) never passes it.
    let small = EgressGrant {
        max_bytes: 100 << 10,
        ..grant(&[up.base()])
    };
    let r = fetch_with(
        &h,
        "t1",
        small,
        json!({"url": format!("{}/huge?mib=1", up.base())}),
        limits(),
    )
    .await;
    assert!(
        refused(&r).contains("response body size exceeds limit"),
        "{r:?}"
    );
    assert!(
        r.log
            .contains("the job's 102400 bytes of outgoing traffic are spent"),
        "log:\n{}",
        r.log
    );
    assert!(r.egress.bytes() <= 100 << 10, "{:?}", r.egress);
    assert!(r.egress.bytes() > 50 << 10, "{:?}", r.egress);
}

#[tokio::test]
async fn requests_per_job_and_in_flight_per_tenant_are_bounded() {
    let up = Upstream::start().await;
    let h = Arc::new(host(EgressLimits {
        first_byte_timeout: Duration::from_secs(5),
        ..tight()
    }));
    let rules = vec![up.base()];
    // Five per job: the sixth is refused, and never sent.
    let r = fetch(
        &h,
        "t1",
        &rules,
        json!({"url": format!("{}/hello", up.base()), "repeat": 10}),
    )
    .await;
    assert!(refused(&r).ends_with("HttpRequestDenied"), "{r:?}");
    assert!(
        r.log.contains("at most 5 are allowed per job"),
        "log:\n{}",
        r.log
    );
    assert_eq!((r.egress.requests, r.egress.refused), (5, 1));
    assert_eq!(up.hits(), 5);

    // One in flight per tenant: while t1 waits on a slow answer, its
    // second job's call is refused; t2's goes through.
    let slow = {
        let (h, rules, url) = (
            h.clone(),
            rules.clone(),
            format!("{}/slow?ms=1500", up.base()),
        );
        tokio::spawn(async move { fetch(&h, "t1", &rules, json!({ "url": url })).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hello = json!({"url": format!("{}/hello", up.base())});
    let r = fetch(&h, "t1", &rules, hello.clone()).await;
    assert!(refused(&r).ends_with("ConnectionLimitReached"), "{r:?}");
    assert!(
        r.log.contains("requests in flight on this node"),
        "log:\n{}",
        r.log
    );
    assert_eq!(
        output(&fetch(&h, "t2", &rules, hello.clone()).await)["status"],
        200
    );
    assert_eq!(output(&slow.await.unwrap())["body"], "late");
    // Its place is given back with the answer.
    assert_eq!(output(&fetch(&h, "t1", &rules, hello).await)["status"], 200);
}

#[tokio::test]
async fn the_tenant_api_sets_the_policy_and_the_worker_runs_under_it() {
    use common::stack::{ADMIN, Opts, Stack};
    use reqwest::Method;
    let up = Upstream::start().await;
    let s = Stack::start(Opts::default()).await;

    // A bad rule: a JSON error naming it, and no tenant made.
    let (st, v) = s
        .call(
            Method::POST,
            "/v1/tenants",
            Some(ADMIN),
            Some(json!({"id": "acme", "allowed_outbound_hosts": ["ftp://files.test"]})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(common::stack::error_code(&v), "invalid_request", "{v}");
    assert!(v.to_string().contains("ftp://files.test"), "{v}");
    let (st, _) = s
        .call(Method::GET, "/v1/tenants/acme", Some(ADMIN), None)
        .await;
    assert_eq!(st, 404);

    let token = s
        .tenant_with(
            "acme",
            json!({"allowed_outbound_hosts": [format!("{}/", up.base())]}),
        )
        .await;
    let info = s.tenant_info("acme").await;
    assert_eq!(info["allowed_outbound_hosts"], json!([up.base()]), "{info}");
    let fetch = s.push(&token, "fetch").await;
    let hello = json!({"url": format!("{}/hello", up.base())}).to_string();
    let id = s
        .submit(&token, json!({"component": fetch, "input": hello}))
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let out: Value = serde_json::from_str(job["output"].as_str().unwrap()).unwrap();
    assert_eq!(out["body"], "hello from upstream; x-key=");
    assert_eq!(up.hits(), 1);

    // A tenant cannot widen its own policy: only the admin sets it.
    let (st, v) = s
        .call(
            Method::PATCH,
            "/v1/tenants/acme",
            Some(&token),
            Some(json!({"allowed_outbound_hosts": ["http://169.254.169.254"]})),
        )
        .await;
    assert_eq!(
        (st.as_u16(), common::stack::error_code(&v)),
        (403, "forbidden"),
        "{v}"
    );
    assert_eq!(
        s.tenant_info("acme").await["allowed_outbound_hosts"],
        json!([up.base()])
    );

    // Emptied: the next job's call is refused, and its log says why.
    let (st, v) = s
        .call(
            Method::PATCH,
            "/v1/tenants/acme",
            Some(ADMIN),
            Some(json!({"allowed_outbound_hosts": []})),
        )
        .await;
    assert!(st.is_success(), "{st} {v}");
    let (st, v) = s
        .call(
            Method::PATCH,
            "/v1/tenants/acme",
            Some(ADMIN),
            Some(json!({"allowed_outbound_hosts": ["https://*.0.0.1"]})),
        )
        .await;
    assert_eq!(
        (st.as_u16(), common::stack::error_code(&v)),
        (400, "invalid_request"),
        "{v}"
    );
    assert_eq!(
        s.tenant_info("acme").await["allowed_outbound_hosts"],
        json!([])
    );
    let id = s
        .submit(
            &token,
            json!({"component": fetch, "input": hello, "max_attempts": 1}),
        )
        .await;
    let job = s.wait_terminal(&token, &id, 60).await;
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["kind"], "agent_error", "{job}");
    assert!(
        job["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("HttpRequestDenied"),
        "{job}"
    );
    let log = s.as_caller(&token).log(&id).await.unwrap();
    assert!(
        log.contains("[egress] GET") && log.contains("not in the tenant's allowed_outbound_hosts"),
        "{log}"
    );
    assert_eq!(up.hits(), 1, "the refused call never left the node");
    s.stop().await;
}
