//! How large the personal share is in a given round.
//!
//! FedSelect grows the personal subnetwork gradually rather than fixing it
//! in round 1: early local updates mostly say "the model is untrained", not
//! "this client is different", so committing elements then would freeze
//! noise. We use a linear ramp: round r personalizes
//! `target × min(r, ramp_rounds) / ramp_rounds` of each float tensor, so the
//! target is reached in round `ramp_rounds` and held after; `ramp_rounds =
//! 0` means the target from round 1. (The paper grows the set by a fixed
//! percentage of the remaining shared elements per round up to a limit; a
//! linear ramp reaches the same limit with one parameter fewer, and the
//! personal set still only grows because [`compute_mask`] keeps every
//! element that was already personal.)
//!
//! [`compute_mask`]: super::compute_mask

/// The personal fraction schedule: linear from 0 to `target`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    target: f64,
    ramp_rounds: u32,
}

impl Ramp {
    /// `target` in [0, 1): at least one element of a tensor stays shared
    /// whenever the tensor has more than one element, so the federation
    /// still learns every tensor.
    pub fn new(target: f64, ramp_rounds: u32) -> Result<Ramp, String> {
        check_fraction(target)?;
        Ok(Ramp {
            target,
            ramp_rounds,
        })
    }

    pub fn target(&self) -> f64 {
        self.target
    }

    pub fn ramp_rounds(&self) -> u32 {
        self.ramp_rounds
    }

    /// The personal fraction in round `round` (1-based; round 0 gives 0).
    pub fn fraction(&self, round: u32) -> f64 {
        if round == 0 {
            return 0.0;
        }
        if self.ramp_rounds == 0 {
            return self.target;
        }
        self.target * f64::from(round.min(self.ramp_rounds)) / f64::from(self.ramp_rounds)
    }
}

/// A personal fraction must be a number in [0, 1).
pub fn check_fraction(fraction: f64) -> Result<(), String> {
    if fraction.is_finite() && (0.0..1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(format!(
            "personal fraction must be in [0, 1) (0: share everything; 1 would keep \
             everything local and leave nothing to federate), got {fraction}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_linearly_then_holds() {
        let r = Ramp::new(0.2, 4).unwrap();
        let got: Vec<f64> = (0..=6).map(|k| r.fraction(k)).collect();
        let want = [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        let flat = Ramp::new(0.3, 0).unwrap();
        assert_eq!((flat.fraction(1), flat.fraction(9)), (0.3, 0.3));
    }

    #[test]
    fn fractions_outside_zero_one_are_refused_by_name() {
        for bad in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            let err = Ramp::new(bad, 3).unwrap_err();
            assert!(err.contains("personal fraction must be in [0, 1)"), "{err}");
        }
        assert!(Ramp::new(0.0, 3).is_ok());
    }
}
