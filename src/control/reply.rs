//! Reading what the scripts answer and what they stored.

use super::*;

pub(super) fn bad(msg: impl Into<String>) -> CpError {
    CpError::Internal(msg.into())
}

pub(super) fn v_str(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

/// The status word a script's answer starts with (each script's header in
/// `lua/` lists the ones it answers). A word not listed here is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Status {
    Ok,
    Created,
    Exists,
    Conflict,
    NotFound,
    NoTenant,
    QueueFull,
    Credits,
    Insufficient,
    OutOfRange,
    Quota,
    Moved,
    Lost,
    Cancelled,
    Succeeded,
    Failed,
    Retry,
}

impl Status {
    fn parse(word: &str) -> Option<Status> {
        Some(match word {
            "ok" => Status::Ok,
            "created" => Status::Created,
            "exists" => Status::Exists,
            "conflict" => Status::Conflict,
            "not_found" => Status::NotFound,
            "no_tenant" => Status::NoTenant,
            "queue_full" => Status::QueueFull,
            "credits" => Status::Credits,
            "insufficient" => Status::Insufficient,
            "out_of_range" => Status::OutOfRange,
            "quota" => Status::Quota,
            "moved" => Status::Moved,
            "lost" => Status::Lost,
            "cancelled" => Status::Cancelled,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "retry" => Status::Retry,
            _ => return None,
        })
    }
}

/// A script's array answer, read field by field in the order its header
/// documents. Every read says what it expected, and a missing, surplus or
/// malformed field is an error naming the script and the field, never a
/// silent default.
pub(super) struct Reply<'a> {
    script: &'static str,
    items: &'a [Value],
    at: usize,
}

impl<'a> Reply<'a> {
    /// An answer that must be an array.
    pub(super) fn new(script: &'static str, v: &'a Value) -> Result<Reply<'a>, CpError> {
        match v {
            Value::Array(items) => Ok(Reply {
                script,
                items,
                at: 0,
            }),
            other => Err(bad(format!("{script} answered {other:?}, not an array"))),
        }
    }

    /// An answer `[status, ...]`: the status and a cursor on the rest.
    pub(super) fn status(
        script: &'static str,
        v: &'a Value,
    ) -> Result<(Status, Reply<'a>), CpError> {
        let mut r = Reply::new(script, v)?;
        let word = r.string("status")?;
        let s = Status::parse(&word)
            .ok_or_else(|| bad(format!("{script} answered an unknown status `{word}`")))?;
        Ok((s, r))
    }

    /// The status was valid but not one this call can answer.
    pub(super) fn unexpected(&self, s: Status) -> CpError {
        bad(format!(
            "{} answered {s:?}, which this call does not expect",
            self.script
        ))
    }

    /// A nested value (an answer within an array of answers).
    pub(super) fn item(&mut self, what: &str) -> Result<&'a Value, CpError> {
        self.next(what)
    }

    fn next(&mut self, what: &str) -> Result<&'a Value, CpError> {
        let v = self.items.get(self.at).ok_or_else(|| {
            bad(format!(
                "{} answered {} fields; `{what}` (field {}) is missing",
                self.script,
                self.items.len(),
                self.at
            ))
        })?;
        self.at += 1;
        Ok(v)
    }

    fn wrong(&self, what: &str, v: &Value, want: &str) -> CpError {
        bad(format!(
            "{}: `{what}` (field {}) is {v:?}, not {want}",
            self.script,
            self.at - 1
        ))
    }

    /// A string field (bulk or simple; an integer is not a string).
    pub(super) fn string(&mut self, what: &str) -> Result<String, CpError> {
        let v = self.next(what)?;
        match v {
            Value::BulkString(b) => {
                String::from_utf8(b.clone()).map_err(|_| self.wrong(what, v, "UTF-8 text"))
            }
            Value::SimpleString(s) => Ok(s.clone()),
            _ => Err(self.wrong(what, v, "a string")),
        }
    }

    /// A tenant id field: a string that must parse as a [`TenantId`].
    pub(super) fn tenant(&mut self, what: &str) -> Result<crate::model::TenantId, CpError> {
        let s = self.string(what)?;
        crate::model::TenantId::parse(&s).map_err(|_| {
            bad(format!(
                "{}: `{what}` (field {}) is {s:?}, not a tenant id",
                self.script,
                self.at - 1
            ))
        })
    }

    /// A byte-string field (an agent's state).
    pub(super) fn bytes(&mut self, what: &str) -> Result<Vec<u8>, CpError> {
        let v = self.next(what)?;
        match v {
            Value::BulkString(b) => Ok(b.clone()),
            Value::SimpleString(s) => Ok(s.clone().into_bytes()),
            _ => Err(self.wrong(what, v, "bytes")),
        }
    }

    /// An exact integer within ±2^53 − 1 (Lua numbers are answered as
    /// integers; a string of plain digits is accepted too).
    pub(super) fn int(&mut self, what: &str) -> Result<i64, CpError> {
        let v = self.next(what)?;
        let n = match v {
            Value::Int(i) => Some(*i),
            Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()),
            Value::SimpleString(s) => s.parse().ok(),
            _ => None,
        };
        n.filter(|n: &i64| n.abs() <= MAX_EXACT_INT)
            .ok_or_else(|| self.wrong(what, v, "an exact integer"))
    }

    /// A non-negative integer that fits `T`.
    pub(super) fn uint<T: TryFrom<i64>>(&mut self, what: &str) -> Result<T, CpError> {
        let n = self.int(what)?;
        T::try_from(n).map_err(|_| {
            bad(format!(
                "{}: `{what}` (field {}) is {n}, out of range",
                self.script,
                self.at - 1
            ))
        })
    }

    /// True once every field was read (answers of repeated records).
    pub(super) fn is_done(&self) -> bool {
        self.at >= self.items.len()
    }

    /// Every field was read: a surplus one means the two sides disagree.
    pub(super) fn end(self) -> Result<(), CpError> {
        if self.at == self.items.len() {
            Ok(())
        } else {
            Err(bad(format!(
                "{} answered {} fields, {} expected",
                self.script,
                self.items.len(),
                self.at
            )))
        }
    }
}

/// An integer the scripts wrote (credits, counters), read exactly: a value
/// that is not plain integer digits is an error, never a silent 0 (Lua's
/// `1e+14` once read as 0 and lost money from the books).
pub(super) fn exact_int(k: &str, s: Option<&str>) -> Result<i64, CpError> {
    match s {
        None | Some("") => Ok(0),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|v| v.abs() <= MAX_EXACT_INT)
            .ok_or_else(|| bad(format!("`{k}` is not an exact integer: {s:?}"))),
    }
}

pub(super) fn num(h: &HashMap<String, String>, k: &str) -> i64 {
    h.get(k)
        .and_then(|s| s.parse::<f64>().ok())
        .map(|f| f as i64)
        .unwrap_or(0)
}

pub(super) fn opt_time(h: &HashMap<String, String>, k: &str) -> Option<String> {
    let ms = num(h, k);
    (ms > 0).then(|| rfc3339_ms(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_integers_or_a_loud_error() {
        assert_eq!(exact_int("a", None).unwrap(), 0);
        assert_eq!(exact_int("a", Some("")).unwrap(), 0);
        assert_eq!(
            exact_int("a", Some("9007199254740991")).unwrap(),
            MAX_EXACT_INT
        );
        assert_eq!(exact_int("a", Some("-42")).unwrap(), -42);
        // What Lua's tostring wrote for 10^14, and what was once read as 0.
        for bad in [
            "1e+14",
            "1.2345678901234e+14",
            "12.5",
            "9007199254740992",
            "x",
        ] {
            assert!(exact_int("amount", Some(bad)).is_err(), "{bad}");
        }
    }
}
