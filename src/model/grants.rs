//! Which models a tenant may call and what it pays per token: the tenant's
//! `models` (set by the admin), and the arithmetic of a job's token bill.
//!
//! Prices are credits per 1,000 tokens. A job's cost is counted exactly in
//! thousandths of a credit over all its calls and rounded up once, so a run
//! of many small calls pays what one call of the same tokens would.

use serde::{Deserialize, Serialize};

/// Models one tenant may be granted.
pub const MAX_GRANTS: usize = 64;

/// Highest price per 1,000 tokens, in or out. With [`MAX_TOKENS_PER_JOB`]
/// it keeps a job's token bill (10^15 thousandths) within 2^53 − 1.
pub const MAX_TOKEN_PRICE: u64 = 100_000_000;

/// Highest per-job token allowance a tenant may be given.
pub const MAX_TOKENS_PER_JOB: u64 = 10_000_000;

/// The tenant's per-job token allowance unless the admin sets one.
pub const DEFAULT_MAX_TOKENS_PER_JOB: u64 = 4096;

/// One model a tenant may call, at its price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelGrant {
    /// The model's name, as workers load it (`--model NAME=...`).
    pub model: String,
    /// Credits per 1,000 prompt tokens (and embedded tokens).
    #[serde(default, deserialize_with = "crate::num::u53")]
    pub credits_per_1k_tokens_in: u64,
    /// Credits per 1,000 generated tokens.
    #[serde(default, deserialize_with = "crate::num::u53")]
    pub credits_per_1k_tokens_out: u64,
}

impl std::str::FromStr for ModelGrant {
    type Err = String;

    /// `MODEL:IN:OUT`, prices in credits per 1,000 tokens (the CLI's form).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not MODEL:IN:OUT (credits per 1,000 tokens in and out)");
        let mut parts = s.split(':');
        let (Some(model), Some(pin), Some(pout), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(ModelGrant {
            model: model.to_string(),
            credits_per_1k_tokens_in: pin.parse().map_err(|_| bad())?,
            credits_per_1k_tokens_out: pout.parse().map_err(|_| bad())?,
        })
    }
}

impl ModelGrant {
    /// The cost of `tokens_in` and `tokens_out`, in thousandths of a credit.
    pub fn millicredits(&self, tokens_in: u64, tokens_out: u64) -> u64 {
        tokens_in
            .saturating_mul(self.credits_per_1k_tokens_in)
            .saturating_add(tokens_out.saturating_mul(self.credits_per_1k_tokens_out))
    }
}

/// Checks a list of grants: at most [`MAX_GRANTS`], each model named once
/// with a valid name, prices at most [`MAX_TOKEN_PRICE`].
pub fn check(grants: &[ModelGrant]) -> Result<(), String> {
    if grants.len() > MAX_GRANTS {
        return Err(format!("at most {MAX_GRANTS} models may be granted"));
    }
    for (i, g) in grants.iter().enumerate() {
        if !super::valid_name(&g.model) {
            return Err(format!(
                "`{}` is not a model name (1-64 of A-Z a-z 0-9 . _ -)",
                g.model.escape_default()
            ));
        }
        if grants[..i].iter().any(|o| o.model == g.model) {
            return Err(format!("model `{}` is granted twice", g.model));
        }
        if g.credits_per_1k_tokens_in > MAX_TOKEN_PRICE
            || g.credits_per_1k_tokens_out > MAX_TOKEN_PRICE
        {
            return Err(format!(
                "the price of `{}` is above {MAX_TOKEN_PRICE} credits per 1,000 tokens",
                g.model
            ));
        }
    }
    Ok(())
}

/// The stored form: one `model in out` line per grant.
pub fn to_stored(grants: &[ModelGrant]) -> String {
    grants
        .iter()
        .map(|g| {
            format!(
                "{} {} {}\n",
                g.model, g.credits_per_1k_tokens_in, g.credits_per_1k_tokens_out
            )
        })
        .collect()
}

/// Reads [`to_stored`]'s form back.
pub fn from_stored(text: &str) -> Result<Vec<ModelGrant>, String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            let (Some(model), Some(pin), Some(pout), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("malformed model grant {l:?}"));
            };
            let price = |p: &str| {
                p.parse::<u64>()
                    .map_err(|_| format!("malformed model grant {l:?}"))
            };
            Ok(ModelGrant {
                model: model.to_string(),
                credits_per_1k_tokens_in: price(pin)?,
                credits_per_1k_tokens_out: price(pout)?,
            })
        })
        .collect()
}

/// Credits a job reserves for `max_tokens` tokens: each priced at the
/// dearest rate, in or out, of any granted model, rounded up.
pub fn reserve(max_tokens: u64, grants: &[ModelGrant]) -> u64 {
    let dearest = grants
        .iter()
        .map(|g| g.credits_per_1k_tokens_in.max(g.credits_per_1k_tokens_out))
        .max()
        .unwrap_or(0);
    max_tokens.saturating_mul(dearest).div_ceil(1000)
}

/// What a run's inference calls used, as its bill counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUse {
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Their cost in thousandths of a credit, at the tenant's prices.
    pub millicredits: u64,
}

impl TokenUse {
    /// Credits billed: the thousandths rounded up, once per run.
    pub fn credits(&self) -> u64 {
        self.millicredits.div_ceil(1000)
    }

    /// Tokens in and out together (what the job's allowance counts).
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(model: &str, pin: u64, pout: u64) -> ModelGrant {
        ModelGrant {
            model: model.into(),
            credits_per_1k_tokens_in: pin,
            credits_per_1k_tokens_out: pout,
        }
    }

    #[test]
    fn grants_round_trip_through_their_stored_form() {
        let list = vec![g("tiny", 3, 7), g("big.v2", 0, 100_000_000)];
        check(&list).unwrap();
        assert_eq!(from_stored(&to_stored(&list)).unwrap(), list);
        assert_eq!(from_stored("").unwrap(), vec![]);
        assert!(from_stored("tiny 3").is_err());
    }

    #[test]
    fn bad_grants_are_refused() {
        assert!(check(&[g("a b", 1, 1)]).is_err());
        assert!(check(&[g("a", 1, 1), g("a", 2, 2)]).is_err());
        assert!(check(&[g("a", MAX_TOKEN_PRICE + 1, 1)]).is_err());
        let many: Vec<_> = (0..=MAX_GRANTS)
            .map(|i| g(&format!("m{i}"), 1, 1))
            .collect();
        assert!(check(&many).is_err());
    }

    #[test]
    fn the_reserve_covers_any_mix_of_tokens() {
        let list = [g("a", 3, 7), g("b", 5, 2)];
        // 1,001 tokens at 7 per 1,000: 7.007, rounded up.
        assert_eq!(reserve(1001, &list), 8);
        assert_eq!(reserve(1000, &[]), 0);
        for (tin, tout) in [(1001, 0), (0, 1001), (500, 501)] {
            let worst = list
                .iter()
                .map(|g| TokenUse {
                    tokens_in: tin,
                    tokens_out: tout,
                    millicredits: g.millicredits(tin, tout),
                })
                .map(|u| u.credits())
                .max()
                .unwrap();
            assert!(worst <= reserve(tin + tout, &list));
        }
        let top = reserve(
            MAX_TOKENS_PER_JOB,
            &[g("a", MAX_TOKEN_PRICE, MAX_TOKEN_PRICE)],
        );
        assert!(top < (1 << 53));
    }
}
