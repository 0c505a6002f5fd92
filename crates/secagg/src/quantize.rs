//! Fixed-point encoding of f32 updates into the ring, and back.
//!
//! A value `x` is clipped to `[-c, c]` and mapped affinely onto the integer
//! grid `0..=2^q - 1` with **deterministic round-to-nearest** (not stochastic
//! rounding): the encoding of one value is then a pure function, the tests can
//! state an exact bound, and the bias of rounding to nearest is at most half a
//! grid step per coordinate, which is the bound below. The integer is
//! premultiplied by the client's integer weight `w ≤ max_weight`, so the
//! ring sum of all clients is `Σ w_i · q(x_i)`; [`QuantizationConfig::new`]
//! refuses parameters for which that sum could wrap around 2^b.
//!
//! Error bound: with step `Δ = 2c / (2^q - 1)`, each client's value (inside
//! the clip range) is off by at most `Δ/2 = c / (2^q - 1)`, and the weighted
//! mean of such errors is bounded by the same number. Dequantization runs in
//! f64 and rounds once to f32, adding at most half an f32 ulp of the result.

use serde::{Deserialize, Serialize};

use crate::ring::{Ring, RingWidthError};

/// The largest `q` accepted: a grid finer than 2^31 points is beyond f32's
/// precision anyway.
pub const MAX_QUANT_BITS: u32 = 31;

/// The parameters of the encoding, agreed by server and clients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "QuantizationFields", into = "QuantizationFields")]
pub struct QuantizationConfig {
    clip: f32,
    quant_bits: u32,
    ring: Ring,
    max_weight: u64,
    max_clients: u64,
}

/// The serialized form, validated by [`QuantizationConfig::new`] on parse.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct QuantizationFields {
    clip: f32,
    quant_bits: u32,
    field_bits: u32,
    max_weight: u64,
    max_clients: u64,
}

impl TryFrom<QuantizationFields> for QuantizationConfig {
    type Error = QuantizationError;
    fn try_from(f: QuantizationFields) -> Result<Self, Self::Error> {
        QuantizationConfig::new(
            f.clip,
            f.quant_bits,
            f.field_bits,
            f.max_weight,
            f.max_clients,
        )
    }
}

impl From<QuantizationConfig> for QuantizationFields {
    fn from(c: QuantizationConfig) -> Self {
        QuantizationFields {
            clip: c.clip,
            quant_bits: c.quant_bits,
            field_bits: c.ring.bits(),
            max_weight: c.max_weight,
            max_clients: c.max_clients,
        }
    }
}

/// Parameters that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizationError {
    /// The clip bound is not a positive finite number.
    #[error("clip must be positive and finite, got {0}")]
    Clip(f32),
    /// `q` outside `1..=MAX_QUANT_BITS`.
    #[error("quant_bits must be 1..={MAX_QUANT_BITS}, got {0}")]
    QuantBits(u32),
    /// The ring width is unsupported.
    #[error(transparent)]
    Ring(#[from] RingWidthError),
    /// A zero `max_weight` or `max_clients`.
    #[error("max_weight and max_clients must be at least 1 (got {max_weight} and {max_clients})")]
    Zero {
        /// The configured max weight.
        max_weight: u64,
        /// The configured max number of clients.
        max_clients: u64,
    },
    /// The sum of all clients' weighted values could wrap around 2^b.
    #[error(
        "the sum can wrap: {max_clients} clients × max weight {max_weight} × (2^{quant_bits} − 1) \
         = {worst_sum} is not below 2^{field_bits}"
    )]
    SumCanWrap {
        /// n.
        max_clients: u64,
        /// The largest weight.
        max_weight: u64,
        /// q.
        quant_bits: u32,
        /// b.
        field_bits: u32,
        /// n × max_weight × (2^q − 1).
        worst_sum: u128,
    },
    /// A weight outside `1..=max_weight`.
    #[error("weight {weight} is outside 1..={max_weight}")]
    Weight {
        /// The weight given.
        weight: u64,
        /// The largest allowed.
        max_weight: u64,
    },
}

impl QuantizationConfig {
    /// Checks that `max_clients × max_weight × (2^q − 1) < 2^field_bits`, so
    /// the ring sum of up to `max_clients` inputs is the integer sum.
    pub fn new(
        clip: f32,
        quant_bits: u32,
        field_bits: u32,
        max_weight: u64,
        max_clients: u64,
    ) -> Result<Self, QuantizationError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantizationError::Clip(clip));
        }
        if !(1..=MAX_QUANT_BITS).contains(&quant_bits) {
            return Err(QuantizationError::QuantBits(quant_bits));
        }
        let ring = Ring::new(field_bits)?;
        if max_weight == 0 || max_clients == 0 {
            return Err(QuantizationError::Zero {
                max_weight,
                max_clients,
            });
        }
        let levels = (1u128 << quant_bits) - 1;
        // Each factor is below 2^64 and levels below 2^31: the product of the
        // first two fits u128, the third multiplication is checked.
        let worst_sum = (max_clients as u128 * max_weight as u128).checked_mul(levels);
        let fits = worst_sum.is_some_and(|s| s < (1u128 << field_bits));
        if !fits {
            return Err(QuantizationError::SumCanWrap {
                max_clients,
                max_weight,
                quant_bits,
                field_bits,
                worst_sum: worst_sum.unwrap_or(u128::MAX),
            });
        }
        Ok(QuantizationConfig {
            clip,
            quant_bits,
            ring,
            max_weight,
            max_clients,
        })
    }

    /// [`QuantizationConfig::new`] in the narrowest ring (32 or 64 bits) in
    /// which the sum cannot wrap: masked vectors are half the bytes when 32
    /// bits suffice.
    pub fn narrowest(
        clip: f32,
        quant_bits: u32,
        max_weight: u64,
        max_clients: u64,
    ) -> Result<Self, QuantizationError> {
        QuantizationConfig::new(clip, quant_bits, 32, max_weight, max_clients)
            .or_else(|_| QuantizationConfig::new(clip, quant_bits, 64, max_weight, max_clients))
    }

    /// The ring the encoded values live in.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// The clip bound `c`.
    pub fn clip(&self) -> f32 {
        self.clip
    }

    /// The largest client weight.
    pub fn max_weight(&self) -> u64 {
        self.max_weight
    }

    /// The number of clients the capacity check was made for.
    pub fn max_clients(&self) -> u64 {
        self.max_clients
    }

    /// `2^q − 1`, the top of the integer grid.
    pub fn levels(&self) -> u64 {
        (1u64 << self.quant_bits) - 1
    }

    /// The per-coordinate error bound of a dequantized mean, `c / (2^q − 1)`,
    /// for values inside `[-c, c]` (float rounding comes on top).
    pub fn error_bound(&self) -> f64 {
        self.clip as f64 / self.levels() as f64
    }

    /// Checks a client weight against `1..=max_weight`.
    pub fn check_weight(&self, weight: u64) -> Result<(), QuantizationError> {
        if weight == 0 || weight > self.max_weight {
            return Err(QuantizationError::Weight {
                weight,
                max_weight: self.max_weight,
            });
        }
        Ok(())
    }

    /// One value onto the grid `0..=2^q − 1` (NaN encodes as 0, the midpoint).
    pub fn quantize_value(&self, x: f32) -> u64 {
        let c = self.clip as f64;
        let x = if x.is_nan() {
            0.0
        } else {
            (x as f64).clamp(-c, c)
        };
        let scaled = (x + c) / (2.0 * c) * self.levels() as f64;
        // In range by construction; round() is to nearest, ties away from 0.
        (scaled.round() as u64).min(self.levels())
    }

    /// `weight × q(x_i)` for every coordinate, as ring elements.
    pub fn quantize(&self, values: &[f32], weight: u64) -> Result<Vec<u64>, QuantizationError> {
        self.check_weight(weight)?;
        Ok(values
            .iter()
            .map(|&x| self.ring.reduce(self.quantize_value(x) * weight))
            .collect())
    }

    /// The weighted mean from the unmasked sum `Σ w_i q(x_i)` and `Σ w_i`.
    pub fn dequantize_mean(&self, sum: &[u64], total_weight: u64) -> Vec<f32> {
        let c = self.clip as f64;
        let step = 2.0 * c / self.levels() as f64;
        let w = total_weight.max(1) as f64;
        sum.iter()
            .map(|&s| (s as f64 / w * step - c) as f32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_narrowest_ring_that_cannot_wrap_is_chosen() {
        use super::QuantizationConfig;
        let narrow = QuantizationConfig::narrowest(1.0, 16, 100, 64).unwrap();
        assert_eq!(narrow.ring().bits(), 32);
        let wide = QuantizationConfig::narrowest(1.0, 16, 100_000, 64).unwrap();
        assert_eq!(wide.ring().bits(), 64);
        assert!(QuantizationConfig::narrowest(1.0, 31, u64::MAX, 64).is_err());
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_a_sum_that_can_wrap_and_names_the_numbers() {
        let err = QuantizationConfig::new(1.0, 16, 32, 1 << 10, 100).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("100 clients"), "{msg}");
        assert!(msg.contains("1024"), "{msg}");
        assert!(msg.contains("2^16"), "{msg}");
        assert!(msg.contains("2^32"), "{msg}");
        // 100 × 600 × 65535 < 2^32.
        assert!(QuantizationConfig::new(1.0, 16, 32, 600, 100).is_ok());
        assert!(QuantizationConfig::new(1.0, 31, 64, u64::MAX, 2).is_err());
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(QuantizationConfig::new(0.0, 8, 32, 1, 1).is_err());
        assert!(QuantizationConfig::new(f32::NAN, 8, 32, 1, 1).is_err());
        assert!(QuantizationConfig::new(1.0, 0, 32, 1, 1).is_err());
        assert!(QuantizationConfig::new(1.0, 8, 65, 1, 1).is_err());
        assert!(QuantizationConfig::new(1.0, 8, 32, 0, 1).is_err());
        let q = QuantizationConfig::new(1.0, 8, 32, 5, 10).unwrap();
        assert!(q.quantize(&[0.0], 0).is_err());
        assert!(q.quantize(&[0.0], 6).is_err());
    }

    #[test]
    fn clips_and_hits_the_grid_ends() {
        let q = QuantizationConfig::new(2.0, 8, 32, 1, 1).unwrap();
        assert_eq!(q.quantize_value(-5.0), 0);
        assert_eq!(q.quantize_value(5.0), 255);
        assert_eq!(q.quantize_value(-2.0), 0);
        assert_eq!(q.quantize_value(2.0), 255);
        assert_eq!(q.quantize_value(f32::NAN), 128);
    }

    #[test]
    fn serde_validates() {
        let q = QuantizationConfig::new(1.0, 8, 32, 5, 10).unwrap();
        let json = serde_json::to_string(&q).unwrap();
        assert_eq!(
            serde_json::from_str::<QuantizationConfig>(&json).unwrap(),
            q
        );
        let bad = json.replace("\"field_bits\":32", "\"field_bits\":8");
        assert!(serde_json::from_str::<QuantizationConfig>(&bad).is_err());
    }

    proptest! {
        #[test]
        fn weighted_mean_is_within_the_bound(
            rows in prop::collection::vec((prop::collection::vec(-1.5f32..1.5, 6), 1u64..=20), 1..8),
            quant_bits in 4u32..=20,
        ) {
            let q = QuantizationConfig::new(1.0, quant_bits, 64, 20, 8).unwrap();
            let ring = q.ring();
            let mut sum = vec![0u64; 6];
            let mut total = 0u64;
            let mut exact = [0f64; 6];
            for (values, w) in &rows {
                ring.add_assign(&mut sum, &q.quantize(values, *w).unwrap());
                total += w;
                for (e, &v) in exact.iter_mut().zip(values) {
                    *e += *w as f64 * (v as f64).clamp(-1.0, 1.0);
                }
            }
            let mean = q.dequantize_mean(&sum, total);
            for (m, e) in mean.iter().zip(exact) {
                let e = e / total as f64;
                // Float slack: f32 rounding of a value in [-1, 1].
                prop_assert!((*m as f64 - e).abs() <= q.error_bound() + 1e-6, "{m} vs {e}");
            }
        }
    }
}
