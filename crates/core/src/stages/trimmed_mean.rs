//! Coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the
//! ⌊β·n⌋ largest and ⌊β·n⌋ smallest values and average the rest. Unweighted,
//! for the same reason as the median.

use crate::float::Acc;

#[derive(Debug, Clone, PartialEq)]
pub struct TrimmedMean {
    pub beta: f64,
}

impl TrimmedMean {
    pub fn new(beta: f64) -> Result<Self, String> {
        if !(0.0..0.5).contains(&beta) {
            return Err(format!(
                "trimmed_mean: beta must be in [0, 0.5), got {beta}"
            ));
        }
        Ok(TrimmedMean { beta })
    }

    /// How many values are dropped at each end for `n` updates.
    pub fn trim_count(&self, n: usize) -> usize {
        (self.beta * n as f64).floor() as usize
    }

    /// The trimmed mean of `values` (sorts them). Callers check
    /// `2 · trim_count(n) < n` first.
    pub fn combine<A: Acc>(&self, values: &mut [A], trim: usize) -> A {
        values.sort_unstable_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let kept = &values[trim..values.len() - trim];
        let mut sum = A::default();
        for v in kept {
            sum += *v;
        }
        sum / A::from_f64(kept.len() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_both_tails() {
        let t = TrimmedMean::new(0.2).unwrap();
        assert_eq!(t.trim_count(5), 1);
        // Drop -100 and 100; mean of 1, 2, 3.
        assert_eq!(t.combine(&mut [100.0f64, 1.0, -100.0, 3.0, 2.0], 1), 2.0);
        assert_eq!(
            TrimmedMean::new(0.0)
                .unwrap()
                .combine(&mut [1.0f32, 2.0], 0),
            1.5
        );
        assert!(TrimmedMean::new(0.5).is_err());
    }
}
