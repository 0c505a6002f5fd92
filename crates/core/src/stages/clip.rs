//! Update-norm clipping: scales each client's update (local − global) down
//! to an L2 norm of at most `max_norm`. Bounds any one client's influence and
//! is the sensitivity bound that DP noise is calibrated to.

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Clip {
    pub max_norm: f64,
}

impl Clip {
    pub fn new(max_norm: f64) -> Result<Self, String> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(format!(
                "clip: max_norm must be a positive number, got {max_norm}"
            ));
        }
        Ok(Clip { max_norm })
    }

    /// Updates `scales` (the factor each update is multiplied by so far) for
    /// the active clients, given the raw update norms. Returns measurements.
    pub fn apply(&self, norms: &[f64], scales: &mut [f64], active: &[bool]) -> Value {
        let mut clipped = Vec::new();
        for i in 0..norms.len() {
            if !active[i] {
                continue;
            }
            let current = norms[i] * scales[i];
            if current > self.max_norm {
                scales[i] *= self.max_norm / current;
                clipped.push(i);
            }
        }
        json!({ "max_norm": self.max_norm, "clipped_count": clipped.len(), "clipped": clipped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_only_updates_above_the_bound() {
        let c = Clip::new(2.0).unwrap();
        let mut scales = vec![1.0, 1.0, 1.0];
        let m = c.apply(&[1.0, 4.0, 8.0], &mut scales, &[true, true, false]);
        assert_eq!(scales, vec![1.0, 0.5, 1.0]);
        assert_eq!(m["clipped_count"], 1);
        assert!(Clip::new(0.0).is_err() && Clip::new(f64::NAN).is_err());
    }
}
