//! How large the personal share is in a given round.
//!
//! FedSelect grows the personal subnetwork gradually rather than fixing it
//! in round 1: early local updates mostly say "the model is untrained", not
//! "this client is different", so committing elements then would freeze
//! noise. We use a linear ramp: round r personalizes
//! `target × min(r, ramp_rounds) / ramp_rounds` of each float tensor (each
//! tensor has its own target, see [`PersonalFractions`]), so the
//! target is reached in round `ramp_rounds` and held after; `ramp_rounds =
//! 0` means the target from round 1. (The paper grows the set by a fixed
//! percentage of the remaining shared elements per round up to a limit; a
//! linear ramp reaches the same limit with one parameter fewer, and the
//! personal set still only grows because [`compute_mask`] keeps every
//! element that was already personal.)
//!
//! [`compute_mask`]: super::compute_mask

use super::fractions::PersonalFractions;

/// The personal fraction schedule: linear from 0 to each tensor's target.
#[derive(Debug, Clone, PartialEq)]
pub struct Ramp {
    targets: PersonalFractions,
    ramp_rounds: u32,
}

impl Ramp {
    /// Targets are in [0, 1) by construction ([`PersonalFractions::new`]):
    /// at least one element of a tensor stays shared whenever the tensor
    /// has more than one element, so the federation still learns every
    /// tensor.
    pub fn new(targets: PersonalFractions, ramp_rounds: u32) -> Ramp {
        Ramp {
            targets,
            ramp_rounds,
        }
    }

    pub fn targets(&self) -> &PersonalFractions {
        &self.targets
    }

    pub fn ramp_rounds(&self) -> u32 {
        self.ramp_rounds
    }

    /// How far along the ramp round `round` is (1-based; round 0 gives 0).
    pub fn progress(&self, round: u32) -> f64 {
        if round == 0 {
            return 0.0;
        }
        if self.ramp_rounds == 0 {
            return 1.0;
        }
        f64::from(round.min(self.ramp_rounds)) / f64::from(self.ramp_rounds)
    }

    /// The personal fractions in round `round`.
    pub fn at(&self, round: u32) -> PersonalFractions {
        self.targets.scaled(self.progress(round))
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
        let r = Ramp::new(PersonalFractions::uniform(0.2).unwrap(), 4);
        let got: Vec<f64> = (0..=6).map(|k| r.at(k).of("w")).collect();
        let want = [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        let flat = Ramp::new(PersonalFractions::uniform(0.3).unwrap(), 0);
        assert_eq!((flat.at(1).of("w"), flat.at(9).of("w")), (0.3, 0.3));
    }

    #[test]
    fn every_tensor_ramps_to_its_own_target() {
        let per = [("b".to_string(), 0.5)].into();
        let r = Ramp::new(PersonalFractions::new(0.1, per).unwrap(), 2);
        assert_eq!((r.at(1).of("w"), r.at(1).of("b")), (0.05, 0.25));
        assert_eq!((r.at(2).of("w"), r.at(2).of("b")), (0.1, 0.5));
    }

    #[test]
    fn fractions_outside_zero_one_are_refused_by_name() {
        for bad in [-0.1, 1.0, 1.5, f64::NAN, f64::INFINITY] {
            let err = check_fraction(bad).unwrap_err();
            assert!(err.contains("personal fraction must be in [0, 1)"), "{err}");
        }
        assert!(check_fraction(0.0).is_ok());
    }
}
