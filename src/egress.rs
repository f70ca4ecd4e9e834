//! Outbound HTTP rules, shared by everything that reaches out of a node:
//! job callbacks (`--callback-allow`, [`crate::callbacks`]) and agents'
//! `wasi:http` requests (each tenant's `allowed_outbound_hosts`,
//! [`crate::host`]).
//!
//! - A [`Rule`] is `scheme://host[:port]`: `http` or `https`, a name or an
//!   address, `*.` before a name for any of its subdomains (not the name
//!   itself), and without a port the scheme's default. Hosts are
//!   normalized as URLs write them (`0x7f.0.0.1` is `127.0.0.1`).
//! - A [`Policy`] is a list of rules; an empty one allows nothing.
//! - **Addresses.** A name is resolved on the host and only its public
//!   addresses are used ([`is_public`]): loopback, private, link-local
//!   (cloud metadata services), shared (CGNAT), multicast, broadcast and
//!   unspecified addresses are refused, so a name that resolves (or is
//!   rebound) to an internal address reaches nothing. An address is reached
//!   only when a rule names that very address, and then as it is.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// One rule: `scheme://host[:port]`, where `host` may start with `*.` (any
/// subdomain, not the domain itself); without a port, the scheme's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    scheme: String,
    host: HostRule,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    /// A name or an address, as `Url::host_str` writes it (lowercase,
    /// IPv6 in brackets).
    Exact(String),
    /// `*.example.com` → `.example.com`.
    Suffix(String),
}

/// Whether a URL's host is a name (not an address).
fn is_name(url: &reqwest::Url) -> bool {
    url_ip(url).is_none()
}

/// The address a URL's host is, if it is one.
fn url_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let h = url.host_str().unwrap_or_default();
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

impl std::str::FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Rule, String> {
        let bad = |why: &str| format!("rule `{s}`: {why} (want `scheme://host[:port]`)");
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default = default_port(&scheme).ok_or_else(|| bad("scheme must be http or https"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '@', '?', '#']) || rest.is_empty() {
            return Err(bad("only a host and a port"));
        }
        let (wild, rest) = match rest.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        // Parsed as a URL so the host is normalized the way a request's is.
        let url =
            reqwest::Url::parse(&format!("{scheme}://{rest}/")).map_err(|e| bad(&e.to_string()))?;
        let host = url.host_str().ok_or_else(|| bad("no host"))?.to_string();
        let port = url.port().unwrap_or(default);
        let host = if wild {
            if !is_name(&url) {
                return Err(bad("`*.` applies to names, not addresses"));
            }
            HostRule::Suffix(format!(".{host}"))
        } else {
            HostRule::Exact(host)
        };
        Ok(Rule { scheme, host, port })
    }
}

/// The rule's normal form, `scheme://host:port` (the port always written),
/// which parses back to the same rule.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            HostRule::Exact(h) => write!(f, "{}://{h}:{}", self.scheme, self.port),
            HostRule::Suffix(s) => write!(f, "{}://*{s}:{}", self.scheme, self.port),
        }
    }
}

impl Rule {
    /// Whether `url`'s scheme, host and port are this rule's.
    pub fn matches(&self, url: &reqwest::Url) -> bool {
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return false;
        };
        if url.scheme() != self.scheme || port != self.port {
            return false;
        }
        match &self.host {
            HostRule::Exact(h) => h == host,
            // Only names: `*.0.0.1` must not match an address.
            HostRule::Suffix(sfx) => is_name(url) && host.ends_with(sfx.as_str()),
        }
    }
}

/// Why a URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Rules one policy may hold.
pub const MAX_RULES: usize = 64;

/// Longest rule accepted, in bytes.
pub const MAX_RULE_BYTES: usize = 256;

/// A list of rules: a URL is allowed when any matches. The default (empty)
/// allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// Parses a list as a tenant gives it; the error names the first bad
    /// entry. At most [`MAX_RULES`] rules of [`MAX_RULE_BYTES`] each.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Policy, String> {
        if list.len() > MAX_RULES {
            return Err(format!(
                "{} rules; at most {MAX_RULES} are accepted",
                list.len()
            ));
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(list.len());
        for s in list {
            let s = s.as_ref();
            if s.len() > MAX_RULE_BYTES {
                return Err(format!(
                    "a rule of {} bytes; at most {MAX_RULE_BYTES} are accepted",
                    s.len()
                ));
            }
            let r: Rule = s.parse()?;
            if !rules.contains(&r) {
                rules.push(r);
            }
        }
        Ok(Policy { rules })
    }

    /// The policy as stored: its rules in normal form, one per line (`""`
    /// for none).
    pub fn to_stored(&self) -> String {
        self.list().join("\n")
    }

    /// A policy as [`Policy::to_stored`] wrote it.
    pub fn from_stored(text: &str) -> Result<Policy, String> {
        if text.is_empty() {
            return Ok(Policy::default());
        }
        Policy::parse(&text.split('\n').collect::<Vec<_>>())
    }

    /// A stored policy ([`Policy::from_stored`]) to share between runs;
    /// the empty one is one shared value, so a tenant without rules costs
    /// its jobs nothing.
    pub fn shared(text: &str) -> Result<std::sync::Arc<Policy>, String> {
        static NONE: std::sync::OnceLock<std::sync::Arc<Policy>> = std::sync::OnceLock::new();
        if text.is_empty() {
            return Ok(NONE.get_or_init(Default::default).clone());
        }
        Policy::from_stored(text).map(std::sync::Arc::new)
    }

    /// The rules in normal form.
    pub fn list(&self) -> Vec<String> {
        self.rules.iter().map(Rule::to_string).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a rule allows `url`'s scheme, host and port.
    pub fn allows(&self, url: &reqwest::Url) -> bool {
        self.rules.iter().any(|r| r.matches(url))
    }
}

/// Addresses a name may resolve to: no loopback, private, link-local
/// (cloud metadata), shared (CGNAT), multicast, broadcast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Why no address may be reached: the name did not resolve (an I/O error)
/// or resolved to no public address ([`Refused`]).
pub type Unreachable = Box<dyn std::error::Error + Send + Sync>;

/// Where a URL allowed by a rule may be reached: its own address when the
/// host is one (a rule named it), else the public addresses its name
/// resolves to on this host, never an internal one ([`is_public`]).
pub async fn addresses(url: &reqwest::Url) -> Result<Vec<SocketAddr>, Unreachable> {
    let port = url.port_or_known_default().unwrap_or(0);
    if let Some(ip) = url_ip(url) {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    public_addresses(url.host_str().unwrap_or_default(), port).await
}

/// The public addresses `host` resolves to on this host, with `port`;
/// [`Refused`] when it resolves to none.
pub async fn public_addresses(host: &str, port: u16) -> Result<Vec<SocketAddr>, Unreachable> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await?
        .filter(|a| is_public(a.ip()))
        .collect();
    if addrs.is_empty() {
        return Err(Box::new(Refused(format!(
            "{host} resolves to no public address"
        ))));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn a_policy_keeps_its_rules_in_normal_form_and_matches_like_them() {
        let p = Policy::parse(&[
            "https://*.Example.com",
            "http://127.0.0.1:9000/",
            "http://[::1]:8080",
            "https://api.test",
            "https://api.test:443",
        ])
        .unwrap();
        assert_eq!(
            p.list(),
            [
                "https://*.example.com:443",
                "http://127.0.0.1:9000",
                "http://[::1]:8080",
                "https://api.test:443"
            ]
        );
        assert_eq!(Policy::from_stored(&p.to_stored()).unwrap(), p);
        assert_eq!(Policy::from_stored("").unwrap(), Policy::default());
        assert!(p.allows(&url("https://a.example.com/x")));
        assert!(!p.allows(&url("https://example.com/")));
        assert!(!p.allows(&url("http://a.example.com/")));
        assert!(p.allows(&url("http://[::1]:8080/")));
        assert!(p.allows(&url("https://api.test/v1")));
        assert!(!p.allows(&url("https://api.test:8443/v1")));
        assert!(!Policy::default().allows(&url("https://api.test/")));
        let many: Vec<String> = (0..=MAX_RULES)
            .map(|i| format!("https://h{i}.test"))
            .collect();
        assert!(Policy::parse(&many).unwrap_err().contains("at most 64"));
        assert!(
            Policy::parse(&["ftp://x.test"])
                .unwrap_err()
                .contains("`ftp://x.test`")
        );
    }

    #[test]
    fn private_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "255.255.255.255",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_name_reaches_only_public_addresses_and_an_address_only_itself() {
        // `localhost` is a name that resolves to loopback: refused.
        let e = addresses(&url("http://localhost:9/")).await.unwrap_err();
        let r = e
            .downcast_ref::<Refused>()
            .expect("refused, not a lookup error");
        assert!(
            r.0.contains("localhost resolves to no public address"),
            "{r}"
        );
        // An address is used as it is (a rule named it).
        assert_eq!(
            addresses(&url("http://127.0.0.1:9/")).await.unwrap(),
            vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]
        );
    }
}
