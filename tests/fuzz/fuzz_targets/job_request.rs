//! The `POST /v1/jobs` body parser and its checks over arbitrary bytes:
//! every input is a request or an `ApiError` (which must render as the JSON
//! error shape), never a panic.
#![no_main]

use agentplane::api::parse_job_request;
use agentplane::control::TenantInfo;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tenant() -> &'static TenantInfo {
    static T: OnceLock<TenantInfo> = OnceLock::new();
    T.get_or_init(|| {
        serde_json::from_value(serde_json::json!({
            "id": "fuzz", "weight": 1, "max_running": 10, "max_queued": 100,
            "max_gpus": 1,
            "limits": {"fuel": 1_000_000_000u64, "memory_bytes": 64u64 << 20, "timeout_ms": 30_000},
            "credits": {"balance": 1000, "reserved": 0},
            "running": 0, "queued": 0, "gpus_in_use": 0, "granted": 1000, "settled": 0,
            "storage": {"max_component_bytes": 1, "max_context_bytes": 1, "max_state_bytes": 1,
                        "component_bytes": 0, "context_bytes": 0, "state_bytes": 0}
        }))
        .expect("a tenant record")
    })
}

fuzz_target!(|data: &[u8]| {
    match parse_job_request(data, tenant(), 1 << 20) {
        Ok(req) => {
            // What was accepted stays within the tenant's limits.
            assert!(req.fuel.is_none_or(|f| f > 0 && f <= 1_000_000_000));
            assert!(req.timeout_ms.is_none_or(|t| t > 0 && t <= 30_000));
            assert!(req.input.len() <= 1 << 20);
        }
        Err(e) => {
            use axum::response::IntoResponse;
            let resp = e.into_response();
            assert!(resp.status().is_client_error(), "{:?}", resp.status());
        }
    }
});
