//! Central Gaussian differential-privacy noise on the clipped weighted mean.
//!
//! With every update clipped to norm C and normalized weights p_i, changing
//! one client's update moves the mean by at most C · max p_i, so the noise
//! stddev is `noise_multiplier × C × max p_i` (with uniform weights over n
//! clients: z·C/n, as in TFF's DP mean). The privacy accounting (ε, δ over
//! rounds) is the operator's: this stage reports σ and the multiplier.
//!
//! Noise comes from ChaCha20. With a `seed` (tests, reproducible
//! experiments) each round uses its own ChaCha stream, so rounds never reuse
//! noise; without one the key comes from the OS's entropy. The noise of
//! element k of the model is a function of k alone (Box–Muller on the two
//! 64-bit words of pair k/2, read by seeking the stream), so a shard that
//! writes elements a..b draws exactly what one pass over the whole model
//! draws there, and blocks are noised in parallel.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    measured, params, Noise, NoiseKernel, NoiseKey, RoundNoise, Stage, StageInfo, StageTable,
};
use crate::float::Acc;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpNoise {
    pub noise_multiplier: f64,
    /// Makes the noise reproducible (tests); without it the noise comes
    /// from the OS's entropy.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// The noise a round got.
#[derive(Debug, Serialize)]
pub struct DpNoiseMeasurement {
    pub noise_multiplier: f64,
    /// The norm bound the noise is calibrated to (the tightest clip).
    pub clip_norm: f64,
    pub max_weight: f64,
    pub stddev: f64,
    pub seeded: bool,
}

impl DpNoise {
    pub fn new(noise_multiplier: f64, seed: Option<u64>) -> Result<Self, String> {
        if !(noise_multiplier.is_finite() && noise_multiplier >= 0.0) {
            return Err(format!(
                "dp_noise: noise_multiplier must be a number ≥ 0, got {noise_multiplier}"
            ));
        }
        Ok(DpNoise {
            noise_multiplier,
            seed,
        })
    }

    pub fn stage(table: &StageTable) -> Result<Stage, String> {
        let p: DpNoise = params("dp_noise", table)?;
        Ok(Stage::Noise(Box::new(DpNoise::new(
            p.noise_multiplier,
            p.seed,
        )?)))
    }

    pub fn stddev(&self, clip_norm: f64, max_weight: f64) -> f64 {
        self.noise_multiplier * clip_norm * max_weight
    }

    /// Round `round`'s stream under `key`: rounds never share noise.
    pub fn rng(key: &NoiseKey, round: u64) -> ChaCha20Rng {
        let mut rng = ChaCha20Rng::from_seed(*key);
        rng.set_stream(round);
        rng
    }
}

impl StageInfo for DpNoise {
    fn kind(&self) -> &'static str {
        "dp_noise"
    }

    fn fedselect_refusal(&self) -> Option<&'static str> {
        Some(
            "the masked mean divides each element by the weight of the clients that shared \
             it, so a single client can set an element alone: the sensitivity is \
             data-dependent and the noise calibration (clip norm × largest weight) does not hold",
        )
    }
}

impl Noise for DpNoise {
    fn draw_key(&self) -> NoiseKey {
        match self.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed).get_seed(),
            None => ChaCha20Rng::from_os_rng().get_seed(),
        }
    }

    fn for_round(
        &self,
        norm_bound: Option<f64>,
        max_weight: f64,
        round: u64,
        key: &NoiseKey,
    ) -> (Box<dyn RoundNoise>, Value) {
        // The pipeline refuses dp_noise without a clip before it.
        let clip = norm_bound.expect("checked by Pipeline::build");
        let sigma = self.stddev(clip, max_weight);
        let m = measured(&DpNoiseMeasurement {
            noise_multiplier: self.noise_multiplier,
            clip_norm: clip,
            max_weight,
            stddev: sigma,
            seeded: self.seed.is_some(),
        });
        let noise = GaussianNoise {
            rng: Self::rng(key, round),
            sigma,
        };
        (Box::new(noise), m)
    }
}

/// One round's noise stream.
struct GaussianNoise {
    rng: ChaCha20Rng,
    sigma: f64,
}

impl<A: Acc> NoiseKernel<A> for GaussianNoise {
    fn add_block(&self, first: u64, out: &mut [A]) {
        add_noise(&self.rng, self.sigma, first, out);
    }
}

/// Elements noised per parallel work item (even, so items start on pairs).
const NOISE_CHUNK: usize = 4096;

/// Adds N(0, σ²) to every value; `values[i]` is element `first + i` of the
/// model and gets that element's draw from `stream` (a ChaCha20 stream
/// positioned anywhere: it is sought for each chunk).
pub fn add_noise<A: Acc>(stream: &ChaCha20Rng, sigma: f64, first: u64, values: &mut [A]) {
    if sigma == 0.0 {
        return;
    }
    values
        .par_chunks_mut(NOISE_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = stream.clone();
            let start = first + (c * NOISE_CHUNK) as u64;
            // Two 64-bit words (four 32-bit ones) per pair of elements.
            rng.set_word_pos(u128::from(start / 2) * 4);
            let mut pending = None;
            if start % 2 == 1 {
                pending = Some(normal_pair(&mut rng).1);
            }
            for v in chunk {
                let z = pending.take().unwrap_or_else(|| {
                    let (z0, z1) = normal_pair(&mut rng);
                    pending = Some(z1);
                    z0
                });
                *v += A::from_f64(sigma * z);
            }
        });
}

/// Two independent standard normals from the next two 64-bit words
/// (Box–Muller; the uniforms are in (0, 1), so the logarithm is finite).
fn normal_pair(rng: &mut ChaCha20Rng) -> (f64, f64) {
    let open01 = |x: u64| ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let (u1, u2) = (open01(rng.next_u64()), open01(rng.next_u64()));
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_per_round_and_differs_across_rounds() {
        let dp = DpNoise::new(1.0, Some(42)).unwrap();
        let draw = |round| {
            let mut v = vec![0f64; 4];
            add_noise(&DpNoise::rng(&dp.draw_key(), round), 1.0, 0, &mut v);
            v
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn noise_has_the_requested_stddev() {
        let dp = DpNoise::new(2.0, Some(7)).unwrap();
        let sigma = dp.stddev(0.5, 0.25); // 2 · 0.5 · 0.25 = 0.25
        assert_eq!(sigma, 0.25);
        let mut v = vec![0f64; 200_000];
        add_noise(&DpNoise::rng(&dp.draw_key(), 0), sigma, 0, &mut v);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.005, "{mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.005, "{}", var.sqrt());
    }

    #[test]
    fn any_block_draws_what_the_whole_pass_draws_at_its_elements() {
        let dp = DpNoise::new(1.0, Some(3)).unwrap();
        let whole = {
            let mut v = vec![0f64; 3 * NOISE_CHUNK + 5];
            add_noise(&DpNoise::rng(&dp.draw_key(), 9), 1.0, 0, &mut v);
            v
        };
        for (a, b) in [
            (0, 1),
            (1, 2),
            (1, 4100),
            (4095, 8193),
            (7, 3 * NOISE_CHUNK + 5),
        ] {
            let mut part = vec![0f64; b - a];
            add_noise(&DpNoise::rng(&dp.draw_key(), 9), 1.0, a as u64, &mut part);
            assert_eq!(part, whole[a..b], "elements {a}..{b}");
        }
    }
}
