//! How much of each tensor a client keeps personal: one fraction for every
//! float tensor, and optional overrides by tensor name.
//!
//! Why overrides: what is "particular to a client" is not spread evenly
//! over a model. Under label skew (each client owns a few classes) the
//! elements that move most in every weight matrix are the ones encoding
//! the client's own classes; keeping even 1% of them personal starves the
//! global model of those classes, and each personalized model forgets the
//! foreign classes it rarely sees. The output layer's biases carry the
//! client's label prior, which is exactly what should stay local there
//! (`fedstep simulate`'s FedSelect scenario measures both; see
//! scripts/simulate-targets.sh). The selection inside a tensor stays
//! FedSelect's: the top fraction by |local − global|.

use std::collections::BTreeMap;

use super::schedule::check_fraction;

/// The personal fraction of each float tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonalFractions {
    default: f64,
    per_tensor: BTreeMap<String, f64>,
}

impl PersonalFractions {
    /// `default` for every float tensor not named in `per_tensor`. Every
    /// fraction must be in [0, 1); the error names the offending tensor.
    pub fn new(default: f64, per_tensor: BTreeMap<String, f64>) -> Result<Self, String> {
        check_fraction(default)?;
        for (name, f) in &per_tensor {
            check_fraction(*f).map_err(|e| format!("tensor `{name}`: {e}"))?;
        }
        Ok(PersonalFractions {
            default,
            per_tensor,
        })
    }

    /// The same fraction for every float tensor.
    pub fn uniform(fraction: f64) -> Result<Self, String> {
        Self::new(fraction, BTreeMap::new())
    }

    pub fn default_fraction(&self) -> f64 {
        self.default
    }

    pub fn overrides(&self) -> &BTreeMap<String, f64> {
        &self.per_tensor
    }

    /// The fraction of `tensor`.
    pub fn of(&self, tensor: &str) -> f64 {
        self.per_tensor.get(tensor).copied().unwrap_or(self.default)
    }

    /// Every fraction times `factor` (in [0, 1]: the ramp's progress).
    pub fn scaled(&self, factor: f64) -> PersonalFractions {
        PersonalFractions {
            default: self.default * factor,
            per_tensor: self
                .per_tensor
                .iter()
                .map(|(k, v)| (k.clone(), v * factor))
                .collect(),
        }
    }

    /// An override naming no float tensor of the model is a typo or a
    /// model mismatch; both would silently personalize nothing.
    pub fn check_names<'a>(
        &self,
        float_tensors: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        let known: Vec<&str> = float_tensors.into_iter().collect();
        match self
            .per_tensor
            .keys()
            .find(|k| !known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some(name) => Err(format!(
                "a personal fraction is set for tensor `{name}`, which is not a float tensor of \
                 the model (its float tensors: {})",
                known.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn overrides_win_over_the_default() {
        let f = PersonalFractions::new(0.0, overrides(&[("fc2.bias", 0.5)])).unwrap();
        assert_eq!((f.of("fc2.bias"), f.of("fc1.weight")), (0.5, 0.0));
        let half = f.scaled(0.5);
        assert_eq!((half.of("fc2.bias"), half.of("fc1.weight")), (0.25, 0.0));
    }

    #[test]
    fn bad_fractions_and_unknown_tensors_are_named() {
        let err = PersonalFractions::new(0.1, overrides(&[("fc2.bias", 1.0)])).unwrap_err();
        assert!(
            err.starts_with("tensor `fc2.bias`: personal fraction must be in [0, 1)"),
            "{err}"
        );
        assert!(PersonalFractions::uniform(-0.1).is_err());
        let f = PersonalFractions::new(0.1, overrides(&[("fc3.bias", 0.5)])).unwrap();
        let err = f.check_names(["fc1.weight", "fc2.bias"]).unwrap_err();
        assert!(
            err.contains("`fc3.bias`") && err.contains("fc1.weight, fc2.bias"),
            "{err}"
        );
        assert!(PersonalFractions::uniform(0.1)
            .unwrap()
            .check_names(["fc1.weight"])
            .is_ok());
    }
}
