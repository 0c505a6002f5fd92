//! Coordinate-wise median (Yin et al., 2018): robust to a minority of
//! arbitrary updates. Unweighted by design: a weight would let one client
//! claiming many examples move the median, which is what it must resist.

use crate::float::Acc;

/// The median of `values` (reorders them). Even counts average the two
/// middle values. `values` must be non-empty and hold no NaN.
pub fn median<A: Acc>(values: &mut [A]) -> A {
    let n = values.len();
    let mid = n / 2;
    let cmp = |a: &A, b: &A| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal);
    let (lower, upper_mid, _) = values.select_nth_unstable_by(mid, cmp);
    let upper_mid = *upper_mid;
    if n % 2 == 1 {
        upper_mid
    } else {
        let lower_mid = lower
            .iter()
            .copied()
            .fold(None, |m: Option<A>, v| match m {
                Some(m) if m >= v => Some(m),
                _ => Some(v),
            })
            .unwrap_or(upper_mid);
        (lower_mid + upper_mid) / A::from_f64(2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_even_counts() {
        assert_eq!(median(&mut [3.0f32, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0f64, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0f32]), 7.0);
        // One huge outlier does not move it.
        assert_eq!(median(&mut [1.0f32, 1e30, 2.0, 1.5, 1.2]), 1.5);
    }
}
