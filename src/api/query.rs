//! Query strings, each route's as one typed struct that refuses unknown
//! keys (`deny_unknown_fields`): a misspelt `?limt=` must be an error, not
//! a silently ignored parameter.
//!
//! Values are checked while they are parsed, by the `deserialize_with`
//! functions below, whose messages name the parameter; any failure is 400
//! `invalid_request` with serde's message as is (it names the unknown or
//! duplicated key, or the value at fault).

use super::error::ApiError;
use super::job_id_ok;
use crate::model::{ErrorKind, JobState};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};

use super::limits::{DEFAULT_PAGE, MAX_PAGE};

/// The query string of a request parsed into `T`, or 400 `invalid_request`.
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(q)
            .map(Query)
            .map_err(|e| ApiError::Invalid(e.to_string()))
    }
}

/// `GET /v1/jobs/{id}?wait=SECONDS`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    /// Seconds to hold the answer; finite and non-negative (the handler
    /// caps it at `max_wait`).
    #[serde(default, deserialize_with = "wait_secs")]
    pub wait: Option<f64>,
}

/// `GET /v1/jobs?state=&limit=&cursor=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JobsQuery {
    /// Only jobs in this state; an empty `state=` means all.
    #[serde(default, deserialize_with = "job_state")]
    pub state: Option<JobState>,
    /// Page size, 1 to `MAX_PAGE`.
    #[serde(default = "default_page", deserialize_with = "page_size")]
    pub limit: usize,
    /// `next_cursor` of the previous page; an empty `cursor=` means none.
    #[serde(default, deserialize_with = "cursor")]
    pub cursor: Option<String>,
}

/// `GET /v1/tenants/{id}/ledger?cursor=&limit=` and
/// `GET /v1/admin/tenants?cursor=&limit=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    /// Page size, 1 to `MAX_PAGE`.
    #[serde(default = "default_page", deserialize_with = "page_size")]
    pub limit: usize,
    /// `next_cursor` of the previous page; an empty `cursor=` means none
    /// (the route checks its shape).
    #[serde(default, deserialize_with = "opt_string")]
    pub cursor: Option<String>,
}

/// `GET /v1/tenants/{id}/usage?from=&to=&by=hour|day`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UsageQuery {
    /// Start, RFC 3339 or Unix ms (default: `to` less 24 buckets of `by`).
    #[serde(default, deserialize_with = "opt_time")]
    pub from: Option<u64>,
    /// End, exclusive, RFC 3339 or Unix ms (default: now).
    #[serde(default, deserialize_with = "opt_time")]
    pub to: Option<u64>,
    /// `hour` (default) or `day`.
    #[serde(default, deserialize_with = "bucket")]
    pub by: Option<Bucket>,
}

/// A usage bucket's width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn ms(self) -> u64 {
        match self {
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }
}

/// `GET /v1/admin/jobs?state=&error_kind=&limit=&cursor=`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminJobsQuery {
    #[serde(default, deserialize_with = "job_state")]
    pub state: Option<JobState>,
    /// Only failed jobs of this error kind.
    #[serde(default, deserialize_with = "error_kind")]
    pub error_kind: Option<ErrorKind>,
    #[serde(default = "default_page", deserialize_with = "page_size")]
    pub limit: usize,
    #[serde(default, deserialize_with = "cursor")]
    pub cursor: Option<String>,
}

fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    Ok(Some(s).filter(|s| !s.is_empty()))
}

fn opt_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Some(ms));
    }
    let t = time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
        .map_err(|_| D::Error::custom("`from` and `to` must be RFC 3339 times or Unix ms"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map(Some)
        .map_err(|_| D::Error::custom("`from` and `to` must be after 1970"))
}

fn bucket<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bucket>, D::Error> {
    match String::deserialize(d)?.as_str() {
        "" => Ok(None),
        "hour" => Ok(Some(Bucket::Hour)),
        "day" => Ok(Some(Bucket::Day)),
        _ => Err(D::Error::custom("`by` must be `hour` or `day`")),
    }
}

fn error_kind<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ErrorKind>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        D::Error::custom(format!(
            "`error_kind` `{}` is not an error kind",
            s.escape_default()
        ))
    })
}

fn default_page() -> usize {
    DEFAULT_PAGE
}

fn wait_secs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Some)
        .ok_or_else(|| D::Error::custom("`wait` must be a non-negative number of seconds"))
}

fn job_state<'de, D: Deserializer<'de>>(d: D) -> Result<Option<JobState>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        D::Error::custom(
            "`state` must be one of queued, delayed, running, succeeded, failed, cancelled",
        )
    })
}

fn page_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| D::Error::custom(format!("`limit` must be an integer from 1 to {MAX_PAGE}")))
}

fn cursor<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    // Every cursor is a job id, and every job id a ULID: anything else is
    // refused here, naming the field, rather than by the control plane's
    // own check (whose message does not).
    if !job_id_ok(&s) || ulid::Ulid::from_string(&s).is_err() {
        return Err(D::Error::custom("`cursor` is not a job id"));
    }
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: DeserializeOwned>(q: &str) -> Result<T, String> {
        serde_urlencoded::from_str(q).map_err(|e| e.to_string())
    }

    #[test]
    fn jobs_query_defaults_and_checks() {
        let q: JobsQuery = parse("").unwrap();
        assert_eq!((q.state, q.limit, q.cursor), (None, DEFAULT_PAGE, None));
        let q: JobsQuery =
            parse("state=running&limit=5&cursor=01ARZ3NDEKTSV4RRFFQ69G5FAV").unwrap();
        assert_eq!(q.state, Some(JobState::Running));
        assert_eq!(q.limit, 5);
        assert_eq!(q.cursor.as_deref(), Some("01ARZ3NDEKTSV4RRFFQ69G5FAV"));
        let q: JobsQuery = parse("state=&cursor=").unwrap();
        assert_eq!((q.state, q.cursor), (None, None));
        for (bad, names) in [
            ("limit=0", "`limit`"),
            ("limit=", "`limit`"),
            ("state=sleeping", "`state`"),
            ("cursor=a:b", "`cursor`"),
            ("cursor=abc", "`cursor`"),
            ("cursor=not-a-cursor", "`cursor`"),
            ("colour=red", "colour"),
        ] {
            let e = parse::<JobsQuery>(bad).unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
    }

    #[test]
    fn wait_is_a_finite_non_negative_number() {
        assert_eq!(parse::<WaitQuery>("").unwrap().wait, None);
        assert_eq!(parse::<WaitQuery>("wait=1.5").unwrap().wait, Some(1.5));
        assert_eq!(parse::<WaitQuery>("wait=1e300").unwrap().wait, Some(1e300));
        for bad in ["wait=-1", "wait=inf", "wait=NaN", "wait=", "wait=x"] {
            let e = parse::<WaitQuery>(bad).unwrap_err();
            assert!(e.contains("`wait`"), "{bad}: {e}");
        }
        let e = parse::<WaitQuery>("wait=1&state=x").unwrap_err();
        assert!(e.contains("state"), "{e}");
    }
}
