//! `max_client_share`: an optional cap on any one client's share of a
//! round's weight.
//!
//! A client's weight rests on claims it makes about itself (`num_examples`,
//! and under `quality` weighting its metrics). `limits.max_num_examples`
//! refuses absurd counts, but any count below that limit is believed, so one
//! client claiming a billion examples among clients with a thousand each
//! would still own the weighted mean. The cap bounds what believing a claim
//! can cost: whatever anyone claims, no client's normalized share exceeds
//! `s`.
//!
//! The cap works on shares, not counts. A cap on counts is scale-dependent
//! (10^6 examples is a lot in one federation and little in another, and the
//! right number moves as clients join); a share is a fraction of the round,
//! so `0.25` means the same thing whatever the federation's size or data.
//!
//! **Water-filling.** Every client above `s` is lowered to exactly `s` and
//! the excess goes to the others in proportion to their shares, repeated
//! until nobody is above `s`. The result is `min(s, λ·pᵢ)` with the one λ
//! that makes the shares sum to 1: the uncapped clients keep their ratios to
//! each other, and no client gains more than proportionally. A client the
//! weighting gave nothing (quality 0) keeps nothing.
//!
//! **When it cannot hold.** With m clients of positive weight, shares of at
//! most `s` sum to at most m·s, so the cap cannot hold when m·s < 1. Job
//! validation refuses a cap a quorum-sized round could not meet, but
//! rejections at run time can leave fewer clients: then the most even
//! weighting possible, equal shares of 1/m, is used and the measurement says
//! `degraded` (as Krum does when rejections leave too few updates).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A share cap, checked once when the config is parsed: 0 < s ≤ 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct MaxClientShare(f64);

impl MaxClientShare {
    pub fn new(share: f64) -> Result<Self, String> {
        // Written so that NaN fails too.
        if share > 0.0 && share <= 1.0 {
            Ok(MaxClientShare(share))
        } else {
            Err(format!(
                "max_client_share must be a fraction in (0, 1] (0.25: no client gets more \
                 than a quarter of the round's weight), got {share}"
            ))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Whether `clients` clients of positive weight can each stay within
    /// the cap: only if clients × s ≥ 1. The one test every caller uses, so
    /// job validation and the run-time fallback agree to the last bit.
    pub fn holds_for(self, clients: usize) -> bool {
        clients as f64 * self.0 >= 1.0
    }

    /// The fewest clients for which the cap can hold (⌈1/s⌉, corrected for
    /// rounding so that it agrees with [`holds_for`](Self::holds_for)).
    pub fn min_clients(self) -> usize {
        let mut n = (1.0 / self.0).ceil().max(1.0) as usize;
        while n > 1 && self.holds_for(n - 1) {
            n -= 1;
        }
        while !self.holds_for(n) {
            n += 1;
        }
        n
    }
}

impl From<MaxClientShare> for f64 {
    fn from(share: MaxClientShare) -> f64 {
        share.0
    }
}

impl TryFrom<f64> for MaxClientShare {
    type Error = String;

    fn try_from(share: f64) -> Result<Self, String> {
        MaxClientShare::new(share)
    }
}

/// The shares after the cap, and what the cap did.
#[derive(Debug, Clone, PartialEq)]
pub struct CappedShares {
    /// Same order as the input; sums to 1.
    pub shares: Vec<f64>,
    /// Inputs whose share the cap lowered, in input order.
    pub capped: Vec<usize>,
    /// The largest normalized share before the cap.
    pub largest_before: f64,
    /// Set when the cap could not hold (too few clients of positive
    /// weight): the shares are then equal, and this says why.
    pub degraded: Option<String>,
}

impl CappedShares {
    /// The round's `max_client_share` measurement. `ids` names the inputs;
    /// `unweighted_combiner` is set when the combiner ignores weights, so
    /// an operator reading "capped" knows it did not move the model.
    pub fn measurement(
        &self,
        cap: MaxClientShare,
        ids: &[&str],
        unweighted_combiner: Option<&str>,
    ) -> Value {
        let mut m = json!({
            "max_client_share": cap.get(),
            "clients": self.shares.iter().filter(|&&p| p > 0.0).count(),
            "largest_share_before": self.largest_before,
            "largest_share_after": self.shares.iter().copied().fold(0.0, f64::max),
            "capped": self.capped.len(),
            "capped_clients": self.capped.iter().map(|&i| ids[i]).collect::<Vec<_>>(),
        });
        if let Some(why) = &self.degraded {
            m["degraded"] = json!(why);
        }
        if let Some(combiner) = unweighted_combiner {
            m["moot"] = json!(format!(
                "the {combiner} combiner ignores weights: the cap changed only the recorded weights"
            ));
        }
        m
    }
}

/// Caps `weights` (non-negative, with a positive finite sum; normalized or
/// not) so that no share exceeds `cap`. Deterministic: ties are broken by
/// input position, never by hashing.
pub fn cap_shares(weights: &[f64], cap: MaxClientShare) -> CappedShares {
    let s = cap.get();
    let total: f64 = weights.iter().sum();
    debug_assert!(total > 0.0 && total.is_finite(), "weights sum to {total}");
    let before: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let largest_before = before.iter().copied().fold(0.0, f64::max);
    let positive: Vec<usize> = (0..before.len()).filter(|&i| before[i] > 0.0).collect();

    if !cap.holds_for(positive.len()) {
        let m = positive.len();
        let equal = 1.0 / m as f64;
        let mut shares = vec![0.0; before.len()];
        for &i in &positive {
            shares[i] = equal;
        }
        return CappedShares {
            capped: positive
                .iter()
                .copied()
                .filter(|&i| before[i] > equal)
                .collect(),
            shares,
            largest_before,
            degraded: Some(format!(
                "only {m} client(s) with weight: {m} × {s} < 1, so no weighting keeps every \
                 share within max_client_share = {s}; equal shares of 1/{m} instead"
            )),
        };
    }

    // Largest first; equal shares in input order.
    let mut order = positive;
    order.sort_by(|&a, &b| before[b].total_cmp(&before[a]).then(a.cmp(&b)));
    // rest[k]: the uncapped mass if the first k in `order` are capped,
    // summed from the smallest up. Subtracting capped shares from 1 instead
    // would cancel catastrophically when one share is 1 − 10⁻¹²: the
    // others' sum would keep only a few digits.
    let mut rest = vec![0.0; order.len() + 1];
    for k in (0..order.len()).rev() {
        rest[k] = rest[k + 1] + before[order[k]];
    }
    // Capping the largest raises everyone else's scaled share, so whoever
    // was above the cap stays above it: the capped set is a prefix of
    // `order`, found in one walk.
    let mut k = 0;
    while k < order.len() {
        let left = (1.0 - k as f64 * s).max(0.0);
        if before[order[k]] * left / rest[k] <= s {
            break;
        }
        k += 1;
    }
    let left = (1.0 - k as f64 * s).max(0.0);
    let mut shares = vec![0.0; before.len()];
    for (pos, &i) in order.iter().enumerate() {
        shares[i] = if pos < k {
            s
        } else {
            before[i] * left / rest[k]
        };
    }
    let mut capped: Vec<usize> = order[..k].to_vec();
    capped.sort_unstable();
    CappedShares {
        shares,
        capped,
        largest_before,
        degraded: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cap(s: f64) -> MaxClientShare {
        MaxClientShare::new(s).unwrap()
    }

    fn assert_sums_to_one(shares: &[f64]) {
        let sum: f64 = shares.iter().sum();
        assert!((sum - 1.0).abs() <= 1e-12, "sum {sum}: {shares:?}");
    }

    #[test]
    fn one_huge_claimant_among_equals_gets_exactly_the_cap() {
        let c = cap_shares(&[10.0, 1e12, 10.0, 10.0], cap(0.5));
        assert_eq!(c.shares[1], 0.5);
        for i in [0, 2, 3] {
            assert!((c.shares[i] - 0.5 / 3.0).abs() < 1e-15, "{:?}", c.shares);
        }
        assert_eq!(c.capped, vec![1]);
        assert!(c.largest_before > 0.999_999_999);
        assert_eq!(c.degraded, None);
        assert_sums_to_one(&c.shares);
    }

    #[test]
    fn two_huge_claimants_are_both_capped() {
        let c = cap_shares(&[1.0, 1e12, 1.0, 2e12, 1.0, 1.0], cap(0.25));
        assert_eq!(c.shares[1], 0.25);
        assert_eq!(c.shares[3], 0.25);
        for i in [0, 2, 4, 5] {
            assert!((c.shares[i] - 0.125).abs() < 1e-15, "{:?}", c.shares);
        }
        assert_eq!(c.capped, vec![1, 3]);
        assert_sums_to_one(&c.shares);
    }

    #[test]
    fn capping_one_can_push_the_next_over_and_it_is_capped_too() {
        // 0.6 is capped to 0.4; the 0.3 left over makes 0.3 → 0.3·0.6/0.4 =
        // 0.45, over the cap as well; the rest keep their 1 : 1 ratio.
        let c = cap_shares(&[0.6, 0.3, 0.05, 0.05], cap(0.4));
        assert_eq!(c.capped, vec![0, 1]);
        assert_eq!(&c.shares[..2], &[0.4, 0.4]);
        assert!((c.shares[2] - 0.1).abs() < 1e-15 && (c.shares[3] - 0.1).abs() < 1e-15);
        assert_sums_to_one(&c.shares);
    }

    #[test]
    fn shares_within_the_cap_are_unchanged() {
        let c = cap_shares(&[3.0, 3.0, 3.0, 3.0], cap(0.3));
        assert_eq!(c.shares, vec![0.25; 4]);
        assert!(c.capped.is_empty() && c.degraded.is_none());
        let c = cap_shares(&[1.0, 2.0, 7.0], cap(1.0));
        assert_eq!(c.shares, vec![0.1, 0.2, 0.7]);
        assert!(c.capped.is_empty());
    }

    #[test]
    fn a_cap_too_tight_for_the_clients_gives_equal_shares_and_says_so() {
        let c = cap_shares(&[5.0, 1.0, 1.0], cap(0.3));
        assert_eq!(c.shares, vec![1.0 / 3.0; 3]);
        assert_eq!(c.capped, vec![0]);
        let why = c.degraded.as_deref().unwrap();
        assert!(why.contains("3 × 0.3 < 1") && why.contains("1/3"), "{why}");
    }

    #[test]
    fn a_client_without_weight_keeps_none() {
        // Quality weighting can give 0; it neither counts towards the
        // clients the cap needs nor receives any of the excess.
        let c = cap_shares(&[9.0, 0.0, 1.0, 1.0], cap(0.5));
        assert_eq!(c.shares[1], 0.0);
        assert_eq!(c.shares[0], 0.5);
        assert_sums_to_one(&c.shares);
        let c = cap_shares(&[9.0, 0.0, 1.0], cap(0.4));
        assert_eq!(c.shares, vec![0.5, 0.0, 0.5]);
        assert!(c.degraded.unwrap().contains("only 2 client(s)"));
    }

    #[test]
    fn the_cap_is_refused_outside_zero_to_one_naming_the_key() {
        for bad in [0.0, -0.25, 1.5, f64::NAN, f64::INFINITY] {
            let err = MaxClientShare::new(bad).unwrap_err();
            assert!(err.contains("max_client_share"), "{bad}: {err}");
        }
        assert_eq!(cap(1.0).get(), 1.0);
    }

    #[test]
    fn min_clients_agrees_with_holds_for() {
        for (s, n) in [(1.0, 1), (0.5, 2), (0.4, 3), (0.25, 4), (0.1, 10)] {
            assert_eq!(cap(s).min_clients(), n, "{s}");
        }
        for s in [1.0 / 3.0, 0.3333, 0.33334, 0.1, 0.7, 1e-3, 0.142857] {
            let n = cap(s).min_clients();
            assert!(cap(s).holds_for(n) && !cap(s).holds_for(n - 1), "{s}: {n}");
        }
    }

    #[test]
    fn the_measurement_names_the_capped_clients() {
        let c = cap_shares(&[1.0, 1e12, 1.0], cap(0.5));
        let m = c.measurement(cap(0.5), &["a", "big", "c"], Some("median"));
        assert_eq!(m["capped"], 1);
        assert_eq!(m["capped_clients"], json!(["big"]));
        assert_eq!(m["largest_share_after"], 0.5);
        assert_eq!(m["clients"], 3);
        assert!(m.get("degraded").is_none());
        assert!(m["moot"].as_str().unwrap().contains("median"));
    }

    proptest! {
        /// Whatever the claims, the result is the water-filling one:
        /// shares sum to 1, none exceeds the cap, and there is one λ with
        /// share = λ·p for every uncapped client and λ·p ≥ s for every
        /// capped one.
        #[test]
        fn water_filling_holds_for_any_claims(
            claims in prop::collection::vec(
                prop_oneof![1u64..100, 1u64..1_000_000_000_000, Just(1_000_000_000_000u64)],
                1..40,
            ),
            s in 0.01f64..=1.0,
        ) {
            let weights: Vec<f64> = claims.iter().map(|&n| n as f64).collect();
            let total: f64 = weights.iter().sum();
            let p: Vec<f64> = weights.iter().map(|w| w / total).collect();
            let c = cap_shares(&weights, cap(s));
            let sum: f64 = c.shares.iter().sum();
            prop_assert!((sum - 1.0).abs() <= 1e-12, "sum {}", sum);
            if !cap(s).holds_for(weights.len()) {
                prop_assert!(c.degraded.is_some());
                let equal = 1.0 / weights.len() as f64;
                prop_assert!(c.shares.iter().all(|&x| x == equal));
                return Ok(());
            }
            prop_assert!(c.degraded.is_none());
            prop_assert!(c.shares.iter().all(|&x| x <= s * (1.0 + 1e-12)), "{:?}", c.shares);
            let uncapped: Vec<usize> =
                (0..p.len()).filter(|i| !c.capped.contains(i)).collect();
            if let Some(&first) = uncapped.first() {
                let lambda = c.shares[first] / p[first];
                prop_assert!(lambda >= 1.0 - 1e-12, "λ = {}", lambda);
                for &i in &uncapped {
                    prop_assert!((c.shares[i] - lambda * p[i]).abs() <= 1e-12 * lambda.max(1.0));
                }
                for &i in &c.capped {
                    prop_assert_eq!(c.shares[i], s);
                    prop_assert!(lambda * p[i] >= s * (1.0 - 1e-12));
                }
            }
            // The same claims give the same shares, bit for bit.
            prop_assert_eq!(cap_shares(&weights, cap(s)), c);
        }
    }
}
