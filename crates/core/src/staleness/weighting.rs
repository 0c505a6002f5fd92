//! The staleness discount s(τ) of an update τ versions old.

/// How an update's delta is discounted by its staleness τ (versions between
/// the one it was trained from and the one it is counted into). Every form
/// gives s(0) = 1 and never increases with τ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Staleness {
    /// s(τ) = 1 / (1 + τ)^exponent (FedBuff's choice, exponent 0.5).
    Polynomial { exponent: f64 },
    /// s(τ) = 1: stale updates count fully (bounded only by max_staleness).
    Constant,
    /// s(τ) = 1 for τ ≤ cutoff, else 1 / (slope · (τ − cutoff) + 1)
    /// (FedAsync's hinge, Xie et al. 2019).
    Hinge { slope: f64, cutoff: u32 },
}

impl Default for Staleness {
    fn default() -> Self {
        Staleness::Polynomial {
            exponent: Self::DEFAULT_EXPONENT,
        }
    }
}

impl Staleness {
    pub const DEFAULT_EXPONENT: f64 = 0.5;
    pub const DEFAULT_HINGE_SLOPE: f64 = 1.0;
    pub const DEFAULT_HINGE_CUTOFF: u32 = 4;

    /// Refuses parameters that would make s(τ) grow, or not a number.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Staleness::Polynomial { exponent } if !(exponent.is_finite() && exponent >= 0.0) => {
                Err(format!(
                    "staleness_exponent must be a finite number >= 0 (got {exponent})"
                ))
            }
            Staleness::Hinge { slope, .. } if !(slope.is_finite() && slope >= 0.0) => Err(format!(
                "hinge_slope must be a finite number >= 0 (got {slope})"
            )),
            _ => Ok(()),
        }
    }

    /// s(τ), in (0, 1].
    pub fn weight(&self, tau: u32) -> f64 {
        let t = f64::from(tau);
        match *self {
            Staleness::Polynomial { exponent } => (1.0 + t).powf(-exponent),
            Staleness::Constant => 1.0,
            Staleness::Hinge { slope, cutoff } if tau > cutoff => {
                1.0 / (slope * f64::from(tau - cutoff) + 1.0)
            }
            Staleness::Hinge { .. } => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_form_by_hand() {
        let p = Staleness::default();
        assert_eq!(p.weight(0), 1.0);
        assert_eq!(p.weight(3), 0.5); // 1/sqrt(4)
        let p2 = Staleness::Polynomial { exponent: 1.0 };
        assert_eq!(p2.weight(4), 0.2);
        assert_eq!(Staleness::Constant.weight(100), 1.0);
        let h = Staleness::Hinge {
            slope: 2.0,
            cutoff: 4,
        };
        assert_eq!(h.weight(4), 1.0);
        assert_eq!(h.weight(5), 1.0 / 3.0);
        assert_eq!(h.weight(9), 1.0 / 11.0);
    }

    #[test]
    fn never_grows_with_staleness() {
        for s in [
            Staleness::default(),
            Staleness::Polynomial { exponent: 0.0 },
            Staleness::Constant,
            Staleness::Hinge {
                slope: 0.5,
                cutoff: 2,
            },
        ] {
            s.check().unwrap();
            for tau in 0..50 {
                let (a, b) = (s.weight(tau), s.weight(tau + 1));
                assert!(b <= a && b > 0.0, "{s:?} at {tau}: {a} then {b}");
            }
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        for s in [
            Staleness::Polynomial { exponent: -1.0 },
            Staleness::Polynomial { exponent: f64::NAN },
            Staleness::Hinge {
                slope: f64::INFINITY,
                cutoff: 1,
            },
        ] {
            assert!(s.check().is_err(), "{s:?}");
        }
    }
}
