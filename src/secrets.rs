//! Tenants' secrets: values (API keys, tokens) a tenant stores for its
//! agents, which read them through `wasi:config/store`. Write-only: set and
//! deleted through the API, never answered back, never logged.
//!
//! - **Sealed at rest.** The API seals each value with ChaCha20-Poly1305
//!   under the deployment's secrets key ([`SecretsKey`], from
//!   `AGENTPLANE_SECRETS_KEY`) before it reaches Redis, bound to its tenant
//!   and name (a sealed value moved to another tenant or name does not
//!   open); only workers, holding the same key, open them, for the runs of
//!   agents that import `wasi:config/store`.
//! - **Redacted.** Whatever a run hands back (its log, its output, its error
//!   message) has every secret value of its tenant replaced by
//!   [`REDACTED`] ([`Redactor`]), so an agent that prints its key does not
//!   put it in a job record, a log or an API answer.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

/// What replaces a secret value in what a run hands back.
pub const REDACTED: &str = "[redacted]";

/// Secrets one tenant may hold.
pub const MAX_SECRETS: usize = 64;

/// Shortest value accepted: a shorter one would be redacted wherever its
/// few bytes happen to appear.
pub const MIN_VALUE_BYTES: usize = 8;

/// Longest value accepted.
pub const MAX_VALUE_BYTES: usize = 4096;

/// Shortest passphrase a secrets key is derived from.
pub const MIN_KEY_CHARS: usize = 16;

/// Bytes of nonce before each sealed value.
const NONCE_BYTES: usize = 12;

/// Whether `name` may name a secret: 1-64 characters of `a-z`, `A-Z`,
/// `0-9` and `_` (a `wasi:config` key, and an environment variable's name).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why a value is refused, or `None`.
pub fn check_value(value: &str) -> Option<String> {
    if value.len() < MIN_VALUE_BYTES || value.len() > MAX_VALUE_BYTES {
        return Some(format!(
            "a secret's value is {MIN_VALUE_BYTES} to {MAX_VALUE_BYTES} bytes (it is {})",
            value.len()
        ));
    }
    None
}

/// The deployment's key that seals and opens secrets.
#[derive(Clone)]
pub struct SecretsKey(ChaCha20Poly1305);

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsKey(<hidden>)")
    }
}

impl SecretsKey {
    /// The key derived from a passphrase of at least [`MIN_KEY_CHARS`].
    pub fn from_passphrase(passphrase: &str) -> Result<SecretsKey, String> {
        if passphrase.chars().count() < MIN_KEY_CHARS {
            return Err(format!(
                "the secrets key must be at least {MIN_KEY_CHARS} characters"
            ));
        }
        let mut h = Sha256::new();
        h.update(b"agentplane secrets key\0");
        h.update(passphrase.as_bytes());
        let key: [u8; 32] = h.finalize().into();
        Ok(SecretsKey(ChaCha20Poly1305::new(Key::from_slice(&key))))
    }

    /// What a sealed value is bound to: its tenant and name.
    fn aad(tenant: &str, name: &str) -> Vec<u8> {
        format!("{tenant}\0{name}").into_bytes()
    }

    /// `value` sealed for `tenant`'s secret `name`: a random nonce, then
    /// the ciphertext and its tag.
    pub fn seal(&self, tenant: &str, name: &str, value: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let aad = Self::aad(tenant, name);
        let sealed = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.as_bytes(),
                    aad: &aad,
                },
            )
            .expect("ChaCha20-Poly1305 seals any value of this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// The value [`SecretsKey::seal`] sealed for `tenant`'s `name`, or
    /// `None` if it was sealed under another key, tenant or name, or
    /// altered.
    pub fn open(&self, tenant: &str, name: &str, sealed: &[u8]) -> Option<String> {
        if sealed.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        let aad = Self::aad(tenant, name);
        let plain = self
            .0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &aad,
                },
            )
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

/// Replaces a tenant's secret values in what a run hands back.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a value that contains another is replaced whole.
    values: Vec<String>,
}

impl Redactor {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Redactor {
        let mut values: Vec<String> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Redactor { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// `text` with every secret value replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_for_its_tenant_name_and_key() {
        let k = SecretsKey::from_passphrase("a deployment passphrase").unwrap();
        let sealed = k.seal("acme", "api_key", "sk-live-0123456789");
        assert!(
            !sealed.windows(b"sk-live".len()).any(|w| w == b"sk-live"),
            "sealed, not encoded"
        );
        assert_eq!(
            k.open("acme", "api_key", &sealed).as_deref(),
            Some("sk-live-0123456789")
        );
        assert_eq!(k.open("beta", "api_key", &sealed), None, "another tenant");
        assert_eq!(k.open("acme", "other", &sealed), None, "another name");
        let other = SecretsKey::from_passphrase("another passphrase!!").unwrap();
        assert_eq!(other.open("acme", "api_key", &sealed), None, "another key");
        let mut bent = sealed.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert_eq!(k.open("acme", "api_key", &bent), None, "altered");
        assert_ne!(
            sealed,
            k.seal("acme", "api_key", "sk-live-0123456789"),
            "fresh nonce"
        );
        assert!(SecretsKey::from_passphrase("short").is_err());
    }

    #[test]
    fn names_values_and_redaction() {
        assert!(valid_name("OPENAI_API_KEY") && valid_name("k1"));
        assert!(!valid_name("") && !valid_name("a-b") && !valid_name("a.b"));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(check_value("12345678").is_none());
        assert!(check_value("1234567").unwrap().contains("8 to 4096"));
        let r = Redactor::new(["secret-one", "secret-one-and-more", ""]);
        assert_eq!(
            r.redact("a secret-one-and-more b secret-one c"),
            "a [redacted] b [redacted] c"
        );
        assert!(Redactor::new([]).is_empty());
    }
}
