//! The one typed client of the HTTP API, used by the CLI, `bench` and the
//! end-to-end tests: each method is one route, takes typed bodies and
//! answers typed values, and every non-2xx answer is a [`ClientError::Api`]
//! carrying the status and the contract's error code.

use crate::api::{Balance, BatchResult, JobPage, JobRef, JobRequest, TenantPage, TenantToken};
use crate::control::{
    ComponentMeta, ContextMeta, LedgerPage, LimitsPatch, TenantInfo, TenantPatch, UsageReport,
};
use crate::model::{ErrorKind, Job, JobState};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest `?wait=` a default server honours (`--max-wait-ms`): asking
/// for more only holds the connection as long.
const WAIT_SECS: u64 = crate::api::limits::DEFAULT_MAX_WAIT.as_secs();

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error. `code` is the contract's code
    /// (`not_found`, `invalid_request`, …), empty when the body was not the
    /// API's JSON error (a proxy's page, say), whose text is then `message`.
    #[error("HTTP {}: {}", status.as_u16(), describe(code, message))]
    Api {
        status: StatusCode,
        code: String,
        message: String,
    },
    /// No answer: the connection failed or timed out.
    #[error("requesting {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// A 2xx answer that is not the expected shape.
    #[error("unexpected answer from {url}: {why}")]
    Decode { url: String, why: String },
}

fn describe(code: &str, message: &str) -> String {
    if code.is_empty() {
        message.to_string()
    } else {
        format!("{code}: {message}")
    }
}

impl ClientError {
    /// The HTTP status of an API error; `None` when there was no answer.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The contract's error code of an API error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Result of a call.
pub type ClientResult<T> = Result<T, ClientError>;

/// `POST /v1/tenants` body: what is not given takes the server's default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsPatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_component_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_context_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_state_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_outbound_hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<crate::model::grants::ModelGrant>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_per_job: Option<u64>,
}

/// `GET /v1/jobs` filter and page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct JobsFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A page of a listing that pages by cursor (ledger, admin tenants).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Page {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `GET /v1/tenants/{id}/usage` window: RFC 3339 times or Unix ms, and
/// `hour` or `day`; the server's defaults for what is not given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageWindow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// `GET /v1/admin/jobs` filter and page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AdminJobsFilter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// A client of one API as one caller (or none); cheap to clone.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Installs rustls's ring provider as the process default, once: reqwest
/// is built without a provider of its own (the tree already has ring; no
/// second crypto library), so this must run before any `reqwest::Client`
/// is built. Every client of the crate calls it; so must a program that
/// builds its own.
pub fn tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider is installed already, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl ApiClient {
    /// A client of the API at `base` (`http://host:port`), calling with
    /// `token` (the admin's or a tenant's) when given.
    pub fn new(base: &str, token: Option<String>) -> ClientResult<ApiClient> {
        tls_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Long-polls are held up to a minute by the server.
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|source| ClientError::Transport {
                url: base.to_string(),
                source,
            })?;
        Ok(ApiClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The same API, called with another token (shares the connections).
    pub fn with_token(&self, token: &str) -> ApiClient {
        ApiClient {
            token: Some(token.to_string()),
            ..self.clone()
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The token it calls with.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn request(&self, method: Method, path: &str) -> (String, RequestBuilder) {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        (url, req)
    }

    /// Sends a request; the body of a 2xx answer, or the API's error.
    async fn send(&self, url: String, req: RequestBuilder) -> ClientResult<(String, String)> {
        let resp = req.send().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|source| ClientError::Transport {
            url: url.clone(),
            source,
        })?;
        if status.is_success() {
            return Ok((url, text));
        }
        #[derive(Deserialize)]
        struct Wire {
            error: WireError,
        }
        #[derive(Deserialize)]
        struct WireError {
            code: String,
            message: String,
        }
        Err(match serde_json::from_str::<Wire>(&text) {
            Ok(Wire { error }) => ClientError::Api {
                status,
                code: error.code,
                message: error.message,
            },
            Err(_) => ClientError::Api {
                status,
                code: String::new(),
                message: text.trim().to_string(),
            },
        })
    }

    async fn call<T: DeserializeOwned>(&self, url: String, req: RequestBuilder) -> ClientResult<T> {
        let (url, text) = self.send(url, req).await?;
        serde_json::from_str(&text).map_err(|e| ClientError::Decode {
            url,
            why: e.to_string(),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> ClientResult<T> {
        let (url, req) = self.request(Method::GET, path);
        self.call(url, req).await
    }

    async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> ClientResult<T> {
        let (url, req) = self.request(Method::POST, path);
        self.call(url, req.json(body)).await
    }

    async fn post_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        bytes: Vec<u8>,
        content_type: &'static str,
    ) -> ClientResult<T> {
        let (url, req) = self.request(Method::POST, path);
        self.call(url, req.header("content-type", content_type).body(bytes))
            .await
    }

    /// `POST /v1/tenants` (admin): the new tenant's token.
    pub async fn create_tenant(&self, spec: &NewTenant) -> ClientResult<TenantToken> {
        self.post_json("/v1/tenants", spec).await
    }

    /// `GET /v1/tenants/{id}` (admin, or that tenant).
    pub async fn tenant(&self, id: &str) -> ClientResult<TenantInfo> {
        self.get(&format!("/v1/tenants/{id}")).await
    }

    /// `PATCH /v1/tenants/{id}` (admin): the tenant after the change.
    pub async fn patch_tenant(&self, id: &str, patch: &TenantPatch) -> ClientResult<TenantInfo> {
        let (url, req) = self.request(Method::PATCH, &format!("/v1/tenants/{id}"));
        self.call(url, req.json(patch)).await
    }

    /// `PUT /v1/tenants/{id}/secrets/{name}` (admin, that tenant): sets a
    /// secret its agents read through `wasi:config/store`.
    pub async fn set_secret(&self, id: &str, name: &str, value: &str) -> ClientResult<()> {
        let (url, req) = self.request(Method::PUT, &format!("/v1/tenants/{id}/secrets/{name}"));
        self.send(url, req.json(&serde_json::json!({ "value": value })))
            .await
            .map(|_| ())
    }

    /// `DELETE /v1/tenants/{id}/secrets/{name}` (admin, that tenant).
    pub async fn delete_secret(&self, id: &str, name: &str) -> ClientResult<()> {
        let (url, req) = self.request(Method::DELETE, &format!("/v1/tenants/{id}/secrets/{name}"));
        self.send(url, req).await.map(|_| ())
    }

    /// `GET /v1/tenants/{id}/secrets` (admin, that tenant): names only.
    pub async fn secrets(&self, id: &str) -> ClientResult<crate::api::SecretList> {
        self.get(&format!("/v1/tenants/{id}/secrets")).await
    }

    /// `POST /v1/tenants/{id}/credits` (admin): grants `amount` (negative
    /// takes back); the new balance.
    pub async fn grant_credits(&self, id: &str, amount: i64) -> ClientResult<Balance> {
        #[derive(Serialize)]
        struct Grant {
            amount: i64,
        }
        self.post_json(&format!("/v1/tenants/{id}/credits"), &Grant { amount })
            .await
    }

    /// `POST /v1/tenants/{id}/credits` (admin) with an `Idempotency-Key`:
    /// a replay with the same amount credits nothing.
    pub async fn grant_credits_once(
        &self,
        id: &str,
        amount: i64,
        key: &str,
    ) -> ClientResult<Balance> {
        let (url, req) = self.request(Method::POST, &format!("/v1/tenants/{id}/credits"));
        let req = req
            .header("idempotency-key", key)
            .json(&serde_json::json!({ "amount": amount }));
        self.call(url, req).await
    }

    /// `path` with `q` as its query string (none when `q` is empty).
    fn with_query<Q: Serialize>(&self, path: &str, q: &Q) -> ClientResult<String> {
        let q = serde_urlencoded::to_string(q).map_err(|e| ClientError::Decode {
            url: format!("{}{path}", self.base),
            why: e.to_string(),
        })?;
        Ok(if q.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{q}")
        })
    }

    /// `GET /v1/tenants/{id}/ledger` (admin, or that tenant): one page,
    /// oldest first.
    pub async fn ledger(&self, id: &str, page: &Page) -> ClientResult<LedgerPage> {
        self.get(&self.with_query(&format!("/v1/tenants/{id}/ledger"), page)?)
            .await
    }

    /// The same page as CSV (`Accept: text/csv`).
    pub async fn ledger_csv(&self, id: &str, page: &Page) -> ClientResult<String> {
        let path = self.with_query(&format!("/v1/tenants/{id}/ledger"), page)?;
        let (url, req) = self.request(Method::GET, &path);
        self.send(url, req.header("accept", "text/csv"))
            .await
            .map(|(_, text)| text)
    }

    /// `GET /v1/tenants/{id}/usage` (admin, or that tenant).
    pub async fn usage(&self, id: &str, window: &UsageWindow) -> ClientResult<UsageReport> {
        self.get(&self.with_query(&format!("/v1/tenants/{id}/usage"), window)?)
            .await
    }

    /// `GET /v1/admin/tenants` (admin).
    pub async fn admin_tenants(&self, page: &Page) -> ClientResult<TenantPage> {
        self.get(&self.with_query("/v1/admin/tenants", page)?).await
    }

    /// `GET /v1/admin/jobs` (admin): jobs across tenants, newest first.
    pub async fn admin_jobs(&self, filter: &AdminJobsFilter) -> ClientResult<JobPage> {
        self.get(&self.with_query("/v1/admin/jobs", filter)?).await
    }

    /// `POST /v1/jobs/{id}/retry` (the tenant): the failed job queued again
    /// as its next attempt (same id); the job's state now.
    pub async fn retry(&self, id: &str) -> ClientResult<JobRef> {
        let (url, req) = self.request(Method::POST, &format!("/v1/jobs/{id}/retry"));
        self.call(url, req).await
    }

    /// `POST /v1/admin/tenants/{tenant}/jobs/{id}/retry` (admin).
    pub async fn admin_retry(&self, tenant: &str, id: &str) -> ClientResult<JobRef> {
        let (url, req) = self.request(
            Method::POST,
            &format!("/v1/admin/tenants/{tenant}/jobs/{id}/retry"),
        );
        self.call(url, req).await
    }

    /// `GET /v1/admin/tenants/{tenant}/jobs/{id}/log` (admin): any
    /// tenant's job's log.
    pub async fn admin_log(&self, tenant: &str, id: &str) -> ClientResult<String> {
        let (url, req) = self.request(
            Method::GET,
            &format!("/v1/admin/tenants/{tenant}/jobs/{id}/log"),
        );
        self.send(url, req).await.map(|(_, text)| text)
    }

    /// `POST /v1/components`: uploads a Wasm component.
    pub async fn push_component(&self, wasm: Vec<u8>) -> ClientResult<ComponentMeta> {
        self.post_raw("/v1/components", wasm, "application/wasm")
            .await
    }

    /// `GET /v1/components/{digest}`.
    pub async fn component(&self, digest: &str) -> ClientResult<ComponentMeta> {
        self.get(&format!("/v1/components/{digest}")).await
    }

    /// `POST /v1/contexts`: uploads a context given as its JSON document
    /// `{"name","documents","tools"}` (sent as is: it may be large).
    pub async fn push_context(&self, json: Vec<u8>) -> ClientResult<ContextMeta> {
        self.post_raw("/v1/contexts", json, "application/json")
            .await
    }

    /// `GET /v1/contexts/{name}`.
    pub async fn context(&self, name: &str) -> ClientResult<ContextMeta> {
        self.get(&format!("/v1/contexts/{name}")).await
    }

    /// `POST /v1/jobs`, with an `Idempotency-Key` when given.
    pub async fn submit(
        &self,
        job: &JobRequest,
        idempotency_key: Option<&str>,
    ) -> ClientResult<JobRef> {
        let (url, mut req) = self.request(Method::POST, "/v1/jobs");
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        self.call(url, req.json(job)).await
    }

    /// `POST /v1/jobs/batch`: up to 1,000 jobs, each with its own
    /// idempotency key when given; one result per job, in order.
    pub async fn submit_batch(
        &self,
        jobs: &[(JobRequest, Option<String>)],
    ) -> ClientResult<Vec<BatchResult>> {
        #[derive(Serialize)]
        struct Item<'a> {
            job: &'a JobRequest,
            #[serde(skip_serializing_if = "Option::is_none")]
            idempotency_key: Option<&'a str>,
        }
        #[derive(Deserialize)]
        struct Answer {
            results: Vec<BatchResult>,
        }
        let items: Vec<Item> = jobs
            .iter()
            .map(|(job, key)| Item {
                job,
                idempotency_key: key.as_deref(),
            })
            .collect();
        let a: Answer = self
            .post_json("/v1/jobs/batch", &serde_json::json!({ "jobs": items }))
            .await?;
        Ok(a.results)
    }

    /// `GET /v1/jobs/{id}`, held until the job is terminal or `wait`
    /// seconds passed when given.
    pub async fn job(&self, id: &str, wait: Option<f64>) -> ClientResult<Job> {
        match wait {
            Some(w) => self.get(&format!("/v1/jobs/{id}?wait={w}")).await,
            None => self.get(&format!("/v1/jobs/{id}")).await,
        }
    }

    /// Long-polls `GET /v1/jobs/{id}` until the job is terminal.
    pub async fn wait_terminal(&self, id: &str) -> ClientResult<Job> {
        loop {
            let job = self.job(id, Some(WAIT_SECS as f64)).await?;
            if job.state.is_terminal() {
                return Ok(job);
            }
        }
    }

    /// `GET /v1/jobs`: one page of the caller's jobs, newest first.
    pub async fn jobs(&self, filter: &JobsFilter) -> ClientResult<JobPage> {
        let q = serde_urlencoded::to_string(filter).map_err(|e| ClientError::Decode {
            url: format!("{}/v1/jobs", self.base),
            why: e.to_string(),
        })?;
        if q.is_empty() {
            self.get("/v1/jobs").await
        } else {
            self.get(&format!("/v1/jobs?{q}")).await
        }
    }

    /// `POST /v1/jobs/{id}/cancel`: the job's state now.
    pub async fn cancel(&self, id: &str) -> ClientResult<JobRef> {
        let (url, req) = self.request(Method::POST, &format!("/v1/jobs/{id}/cancel"));
        self.call(url, req).await
    }

    /// `GET /v1/jobs/{id}/log`: the last attempt's log (or what the running
    /// one has logged so far).
    pub async fn log(&self, id: &str) -> ClientResult<String> {
        let (url, req) = self.request(Method::GET, &format!("/v1/jobs/{id}/log"));
        self.send(url, req).await.map(|(_, text)| text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_tenant_sends_only_what_is_given() {
        let t = NewTenant {
            id: "acme".into(),
            credits: Some(5),
            ..NewTenant::default()
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"id":"acme","credits":5}"#
        );
    }

    #[test]
    fn api_errors_read_like_the_cli_always_printed_them() {
        let e = ClientError::Api {
            status: StatusCode::NOT_FOUND,
            code: "not_found".into(),
            message: "job not found".into(),
        };
        assert_eq!(e.to_string(), "HTTP 404: not_found: job not found");
        assert_eq!(e.code(), Some("not_found"));
        let e = ClientError::Api {
            status: StatusCode::BAD_GATEWAY,
            code: String::new(),
            message: "bad gateway".into(),
        };
        assert_eq!(e.to_string(), "HTTP 502: bad gateway");
    }
}
