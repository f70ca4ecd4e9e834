//! Job callbacks (README, "Callbacks"): a job submitted with a
//! `callback_url` has its result POSTed there once it is finished, signed
//! with its tenant's key, retried with backoff, under the deployment's
//! egress rules.
//!
//! - **Durable, at least once.** The script that finishes the job adds it
//!   to its shard's `hooks` set in the same step (`finish` in lua/lib.lua);
//!   [`run_dispatcher`] (in every API process) takes due hooks under a
//!   lease (`lua/hooks.lua`), so a process that dies mid-delivery leaves
//!   them to be taken again. Receivers dedupe on `X-Agentplane-Delivery`.
//! - **Signed.** `X-Agentplane-Signature: t=<unix s>,v1=<hex>` where
//!   `hex = HMAC-SHA256(key, "<t>.<body>")` and `key` is the tenant's key
//!   (`GET /v1/tenants/{id}/callback-key`), itself HMAC-SHA256 of the
//!   deployment secret and the tenant id: one secret, a key per tenant.
//! - **Egress rules.** Only URLs matching a `--callback-allow` rule
//!   (`scheme://host[:port]`, `*.` for any subdomain) are accepted, checked
//!   at submission and again before each attempt. Names are resolved on the
//!   host, and only to public addresses: loopback, private, link-local
//!   (metadata services), shared, multicast and unspecified addresses are
//!   refused unless a rule names that address itself. No redirects, no
//!   proxy, connect and total timeouts, the answer's body is not read.
//! - **Bounded per tenant.** A tenant's receivers hold at most
//!   [`Delivery::per_tenant`] deliveries at once, so one that never answers
//!   does not stall the callbacks of others.

pub use crate::egress::{Refused, Rule};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;

/// Longest `callback_url` accepted.
pub const MAX_URL_BYTES: usize = 2048;

/// Retry and bounds of deliveries.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Attempts before a callback is given up (`failed`).
    pub max_attempts: u32,
    /// Delay after the first failed attempt; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest delay between attempts.
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// Whole attempt: connect, send, answer's head.
    pub timeout: Duration,
    /// How long a taken hook is left to its dispatcher before another may
    /// take it (longer than `timeout`).
    pub lease: Duration,
    /// Deliveries in flight per API process.
    pub concurrency: usize,
    /// Of those, how many one tenant's callbacks may hold.
    pub per_tenant: usize,
    /// How often due hooks are looked for.
    pub poll: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            concurrency: 64,
            per_tenant: 4,
            poll: Duration::from_millis(250),
        }
    }
}

impl Delivery {
    /// The delay after `attempts` failed attempts.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(20);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// The egress rules and the signing secret of a deployment; cheap to clone.
#[derive(Clone)]
pub struct Callbacks {
    rules: Arc<Vec<Rule>>,
    secret: Arc<[u8; 32]>,
    pub delivery: Delivery,
}

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callbacks")
            .field("rules", &self.rules)
            .field("secret", &"<hidden>")
            .field("delivery", &self.delivery)
            .finish()
    }
}

/// No rules (every callback refused) and a random secret.
impl Default for Callbacks {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        Callbacks::new(Vec::new(), secret)
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// The `X-Agentplane-Signature` value of `body` sent at `t` (unix seconds)
/// under the tenant key `key`: `t=<t>,v1=<hex HMAC-SHA256(key, "<t>.<body>")>`.
pub fn signature(key: &str, t: u64, body: &[u8]) -> String {
    let ts = t.to_string();
    format!(
        "t={ts},v1={}",
        hmac_hex(key.as_bytes(), &[ts.as_bytes(), b".", body])
    )
}

impl Callbacks {
    pub fn new(rules: Vec<Rule>, secret: [u8; 32]) -> Callbacks {
        Callbacks {
            rules: Arc::new(rules),
            secret: Arc::new(secret),
            delivery: Delivery::default(),
        }
    }

    /// Whether any callback can be accepted.
    pub fn enabled(&self) -> bool {
        !self.rules.is_empty()
    }

    /// The tenant's signing key (64 hex digits; the HMAC key is this text).
    pub fn tenant_key(&self, tenant: &str) -> String {
        hmac_hex(
            &self.secret[..],
            &[b"agentplane callback key\0", tenant.as_bytes()],
        )
    }

    /// Checks a `callback_url` against the rules; the message names the
    /// field. Names are checked again (resolved) at each delivery.
    pub fn check(&self, url: &str) -> Result<reqwest::Url, Refused> {
        if !self.enabled() {
            return Err(Refused(
                "`callback_url`: callbacks are not enabled on this deployment (--callback-allow)"
                    .into(),
            ));
        }
        if url.len() > MAX_URL_BYTES {
            return Err(Refused(format!(
                "`callback_url` is longer than {MAX_URL_BYTES} bytes"
            )));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| Refused(format!("`callback_url` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Refused("`callback_url` must be http:// or https://".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Refused(
                "`callback_url` must not carry credentials; verify the signature instead".into(),
            ));
        }
        if !self.rules.iter().any(|r| r.matches(&parsed)) {
            return Err(Refused(format!(
                "`callback_url`: {}://{} is not allowed by this deployment's callback rules",
                parsed.scheme(),
                parsed.host_str().unwrap_or_default()
            )));
        }
        Ok(parsed)
    }
}

mod dispatch;
pub use dispatch::{CallbackBody, run_dispatcher};

#[cfg(test)]
mod tests {
    use super::*;

    fn cb(rules: &[&str]) -> Callbacks {
        Callbacks::new(rules.iter().map(|r| r.parse().unwrap()).collect(), [7; 32])
    }

    #[test]
    fn rules_match_scheme_host_and_port() {
        let c = cb(&[
            "https://*.example.com",
            "http://127.0.0.1:9000",
            "https://hooks.test:8443",
        ]);
        assert!(c.check("https://a.example.com/x?y").is_ok());
        assert!(c.check("https://b.a.example.com/").is_ok());
        assert!(c.check("https://example.com/").is_err());
        assert!(c.check("http://a.example.com/").is_err());
        assert!(c.check("https://a.example.com:444/").is_err());
        assert!(c.check("https://a.example.com.evil.net/").is_err());
        assert!(c.check("http://127.0.0.1:9000/cb").is_ok());
        assert!(c.check("http://127.0.0.1:9001/cb").is_err());
        assert!(
            c.check("http://0x7f.0.0.1:9000/cb").is_ok(),
            "normalized to 127.0.0.1"
        );
        assert!(c.check("https://hooks.test:8443/").is_ok());
        assert!(c.check("https://u:p@a.example.com/").is_err());
        assert!(c.check("ftp://a.example.com/").is_err());
        assert!(cb(&[]).check("https://a.example.com/").is_err());
        assert!(
            "https://*.0.1".parse::<Rule>().is_err(),
            "`*.` of an address"
        );
        assert!("example.com".parse::<Rule>().is_err());
        assert!("https://example.com/path".parse::<Rule>().is_err());
    }

    #[test]
    fn signatures_are_stripe_style_hmacs() {
        let c = cb(&[]);
        let k = c.tenant_key("acme");
        assert_eq!(k.len(), 64);
        assert_ne!(k, c.tenant_key("beta"));
        let s = signature(&k, 1_700_000_000, b"{}");
        let mut mac = HmacSha256::new_from_slice(k.as_bytes()).unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(
            s,
            format!(
                "t=1700000000,v1={}",
                hex::encode(mac.finalize().into_bytes())
            )
        );
    }

    #[test]
    fn backoff_doubles_to_its_cap() {
        let d = Delivery::default();
        assert_eq!(d.backoff(1), Duration::from_secs(1));
        assert_eq!(d.backoff(3), Duration::from_secs(4));
        assert_eq!(d.backoff(30), Duration::from_secs(600));
    }
}
