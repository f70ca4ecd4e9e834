//! Integers the API accepts, bounded to what Redis and Lua hold exactly.
//!
//! Lua numbers are doubles: above 2^53 neighbouring integers collapse, and
//! a limit near 2^63 read back through Lua turned into 0 fuel and 0 memory.
//! Every integer of a request is therefore refused beyond
//! `|n| <= 2^53 - 1` ([`MAX_SAFE`]) when it is parsed, with the
//! field named (`serde_path_to_error` in the API adds the path).
//!
//! Used with `#[serde(deserialize_with = …)]` so the request structs keep
//! plain `u64`/`i64` fields.

use serde::de::{Deserialize, Deserializer, Error, Unexpected};

/// The largest integer the scripts hold exactly (Lua numbers are doubles):
/// every amount, count and size stays within ±this, and is formatted as
/// an integer everywhere.
pub const MAX_EXACT_INT: i64 = (1 << 53) - 1;

/// [`MAX_EXACT_INT`] as the unsigned bound of a `u53`.
const MAX_SAFE: u64 = MAX_EXACT_INT as u64;

const EXPECTED_U: &str = "an integer from 0 to 9007199254740991 (2^53 - 1)";
const EXPECTED_I: &str = "an integer from -9007199254740991 to 9007199254740991 (±(2^53 - 1))";

fn check_u<E: Error>(v: u64) -> Result<u64, E> {
    if v > MAX_SAFE {
        return Err(E::invalid_value(Unexpected::Unsigned(v), &EXPECTED_U));
    }
    Ok(v)
}

/// A `u64` at most [`MAX_SAFE`].
pub fn u53<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    check_u(u64::deserialize(d)?)
}

/// An optional `u64` at most [`MAX_SAFE`] (use with `default`).
pub fn opt_u53<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(d)?.map(check_u).transpose()
}

/// An `i64` with `|n|` at most [`MAX_SAFE`].
pub fn i53<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let v = i64::deserialize(d)?;
    if v.unsigned_abs() > MAX_SAFE {
        return Err(D::Error::invalid_value(Unexpected::Signed(v), &EXPECTED_I));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "opt_u53")]
        a: Option<u64>,
        #[serde(default, deserialize_with = "i53")]
        b: i64,
    }

    #[test]
    fn bounds_are_exact() {
        let ok: T =
            serde_json::from_str(r#"{"a":9007199254740991,"b":-9007199254740991}"#).unwrap();
        assert_eq!(ok.a, Some(MAX_SAFE));
        assert_eq!(ok.b, -(MAX_SAFE as i64));
        assert!(serde_json::from_str::<T>(r#"{"a":9007199254740992}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"b":9007199254740992}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"b":-9007199254740992}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"a":1.0}"#).is_err());
        let none: T = serde_json::from_str(r#"{"a":null}"#).unwrap();
        assert_eq!(none.a, None);
    }
}
