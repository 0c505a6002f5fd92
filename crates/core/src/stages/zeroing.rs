//! Zeroing: drops an update whose L2 norm (local − global) exceeds
//! `max_norm`. Unlike TFF's zeroing, which averages a zero in with the
//! client's weight, a dropped update leaves the weighted mean entirely (its
//! weight would otherwise pull the model toward the old global). It is
//! recorded per client with its norm, never dropped silently.

use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Zeroing {
    pub max_norm: f64,
}

impl Zeroing {
    pub fn new(max_norm: f64) -> Result<Self, String> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(format!(
                "zeroing: max_norm must be a positive number, got {max_norm}"
            ));
        }
        Ok(Zeroing { max_norm })
    }

    /// Marks updates over the bound in `dropped` with a reason.
    pub fn apply(
        &self,
        norms: &[f64],
        scales: &[f64],
        active: &[bool],
        dropped: &mut [Option<String>],
    ) -> Value {
        let mut zeroed = Vec::new();
        for i in 0..norms.len() {
            if !active[i] || dropped[i].is_some() {
                continue;
            }
            let current = norms[i] * scales[i];
            if current > self.max_norm {
                dropped[i] = Some(format!(
                    "update norm {current:.6e} exceeds the zeroing bound {}",
                    self.max_norm
                ));
                zeroed.push(i);
            }
        }
        json!({ "max_norm": self.max_norm, "zeroed_count": zeroed.len(), "zeroed": zeroed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_only_updates_above_the_bound() {
        let z = Zeroing::new(10.0).unwrap();
        let mut dropped = vec![None, None];
        let m = z.apply(&[5.0, 1e6], &[1.0, 1.0], &[true, true], &mut dropped);
        assert!(dropped[0].is_none());
        assert!(dropped[1].as_deref().unwrap().contains("zeroing bound 10"));
        assert_eq!(m["zeroed_count"], 1);
    }
}
