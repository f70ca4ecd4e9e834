//! Identifiers checked once, at the edge, and carried as types from there
//! on: a [`TenantId`] can only be made by [`TenantId::parse`] (or its
//! `FromStr`, `TryFrom` and serde forms, which call it), so the control
//! plane, which takes `&TenantId`, cannot be handed an unchecked id and
//! does not check again.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

/// A tenant's id: 1 to [`TenantId::MAX_LEN`] bytes of `a-z`, `0-9`, `-`
/// and `_`. Tenant ids appear inside Redis keys (`{shard}:t:<id>`) and
/// tokens (`<id>.<secret>`), so they are kept to a small, unambiguous
/// alphabet: no `:`, `{`, `}` or `.` that could forge another key or token.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, pattern = "^[a-z0-9_-]{1,64}$")]
pub struct TenantId(String);

/// Why a string is not a [`TenantId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTenantId;

impl fmt::Display for InvalidTenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a tenant id is 1-{} characters of a-z, 0-9, `-` and `_`",
            TenantId::MAX_LEN
        )
    }
}

impl std::error::Error for InvalidTenantId {}

impl TenantId {
    /// Longest id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// The one check of a tenant id.
    pub fn parse(s: &str) -> Result<TenantId, InvalidTenantId> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(TenantId(s.to_owned()))
        } else {
            Err(InvalidTenantId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Read-only access as a `&str`, so key builders and formatters take it
/// as they are.
impl Deref for TenantId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::parse(s)
    }
}

impl TryFrom<&str> for TenantId {
    type Error = InvalidTenantId;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        TenantId::parse(s)
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenantId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TenantId::parse(&s)
    }
}

impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}

/// Metric labels (`"tenant" => id`) take the id by value.
impl From<TenantId> for metrics::SharedString {
    fn from(t: TenantId) -> Self {
        t.0.into()
    }
}

impl PartialEq<str> for TenantId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for TenantId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for TenantId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TenantId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_key_safe() {
        assert!(TenantId::parse("acme-01_x").is_ok());
        assert!(TenantId::parse(&"a".repeat(64)).is_ok());
        for bad in [
            "",
            "Acme",
            "a:b",
            "a{b}",
            "a.b",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            assert_eq!(TenantId::parse(bad), Err(InvalidTenantId), "{bad:?}");
        }
    }

    #[test]
    fn every_way_in_checks() {
        assert!("a:b".parse::<TenantId>().is_err());
        assert!(TenantId::try_from("A".to_string()).is_err());
        assert!(serde_json::from_str::<TenantId>("\"a{b}\"").is_err());
        let t: TenantId = serde_json::from_str("\"acme\"").unwrap();
        assert_eq!(t, "acme");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"acme\"");
        assert_eq!(t.to_string(), "acme");
    }
}
