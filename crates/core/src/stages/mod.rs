//! The composable stages of the aggregation pipeline, in the spirit of
//! TensorFlow Federated's aggregators: each is a small type with its own
//! parameters, state (server optimizers) and measurements.
//!
//! Stages fall into four phases that always run in this order:
//!
//! 1. **update transforms** (`clip`, `zeroing`): per-client scale factors
//!    decided from the norm of `update − global`;
//! 2. **one combiner** (default weighted `mean`; `median`, `trimmed_mean`,
//!    `krum`): turns the transformed updates into one model;
//! 3. **`dp_noise`**: Gaussian noise on the clipped mean;
//! 4. **one server optimizer** (`fedavgm`, `fedadam`, `fedyogi`,
//!    `fedadagrad`): treats `combined − global` as a pseudo-gradient.
//!
//! A config that lists stages out of phase order is refused rather than
//! silently reordered, so what runs is what the file says.

pub mod bucketing;
pub mod clip;
pub mod dp_noise;
pub mod krum;
pub mod median;
pub mod server_optimizer;
pub mod trimmed_mean;
pub mod zeroing;

use serde::Deserialize;

pub use bucketing::Bucketing;
pub use clip::Clip;
pub use dp_noise::DpNoise;
pub use krum::Krum;
pub use server_optimizer::{OptimizerKind, ServerOptimizer};
pub use trimmed_mean::TrimmedMean;
pub use zeroing::Zeroing;

/// One `[[stages]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StageConfig {
    /// Scale each update down to L2 norm ≤ `max_norm` (update = local − global).
    Clip { max_norm: f64 },
    /// Drop updates whose L2 norm exceeds `max_norm`.
    Zeroing { max_norm: f64 },
    /// Weighted mean (the default combiner; listing it is optional).
    Mean,
    /// Coordinate-wise median (unweighted). `bucket` > 1 first averages
    /// random groups of that many updates (see `bucketing`).
    Median {
        #[serde(default = "one")]
        bucket: usize,
    },
    /// Coordinate-wise mean after dropping the ⌊β·n⌋ largest and smallest
    /// (n = number of buckets when `bucket` > 1).
    TrimmedMean {
        beta: f64,
        #[serde(default = "one")]
        bucket: usize,
    },
    /// Krum / Multi-Krum: tolerate `byzantine` bad updates; average the
    /// `select` best-scored (1 = Krum).
    Krum {
        byzantine: usize,
        #[serde(default = "one")]
        select: usize,
    },
    /// Central Gaussian DP noise, stddev = noise_multiplier × clip norm ×
    /// the largest normalized weight. `seed` makes it reproducible (tests);
    /// without it the noise comes from the OS's entropy.
    DpNoise {
        noise_multiplier: f64,
        #[serde(default)]
        seed: Option<u64>,
    },
    Fedavgm {
        #[serde(default = "lr_one")]
        learning_rate: f64,
        #[serde(default = "momentum")]
        momentum: f64,
    },
    Fedadam {
        #[serde(default = "lr_adaptive")]
        learning_rate: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
    Fedyogi {
        #[serde(default = "lr_adaptive")]
        learning_rate: f64,
        #[serde(default = "beta1")]
        beta1: f64,
        #[serde(default = "beta2")]
        beta2: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
    Fedadagrad {
        #[serde(default = "lr_adaptive")]
        learning_rate: f64,
        #[serde(default)]
        beta1: f64,
        #[serde(default = "tau")]
        tau: f64,
    },
}

fn one() -> usize {
    1
}
fn lr_one() -> f64 {
    1.0
}
fn momentum() -> f64 {
    0.9
}
fn lr_adaptive() -> f64 {
    0.01
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.99
}
fn tau() -> f64 {
    1e-3
}

/// Per-client transforms, applied in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    Clip(Clip),
    Zeroing(Zeroing),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Combiner {
    Mean,
    Median,
    TrimmedMean(TrimmedMean),
    Krum(Krum),
}

impl Combiner {
    pub fn name(&self) -> &'static str {
        match self {
            Combiner::Mean => "mean",
            Combiner::Median => "median",
            Combiner::TrimmedMean(_) => "trimmed_mean",
            Combiner::Krum(_) => "krum",
        }
    }

    /// Median and trimmed mean count every update (or bucket) once, so a
    /// client cannot claim its way into moving them; Krum averages its
    /// selection with the weights, like the mean.
    pub fn ignores_weights(&self) -> bool {
        matches!(self, Combiner::Median | Combiner::TrimmedMean(_))
    }
}

/// A checked pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub transforms: Vec<Transform>,
    pub combiner: Combiner,
    pub noise: Option<DpNoise>,
    pub optimizer: Option<ServerOptimizer>,
    /// Groups averaged before a robust combiner (size 1: none).
    pub bucketing: Bucketing,
}

impl Pipeline {
    pub fn build(stages: &[StageConfig]) -> Result<Pipeline, String> {
        let mut p = Pipeline {
            transforms: Vec::new(),
            combiner: Combiner::Mean,
            noise: None,
            optimizer: None,
            bucketing: Bucketing { size: 1 },
        };
        let mut phase = 0;
        let mut combiner_set = false;
        for (i, s) in stages.iter().enumerate() {
            let at = |msg: String| format!("stages[{i}]: {msg}");
            let this_phase = match s {
                StageConfig::Clip { .. } | StageConfig::Zeroing { .. } => 1,
                StageConfig::Mean
                | StageConfig::Median { .. }
                | StageConfig::TrimmedMean { .. }
                | StageConfig::Krum { .. } => 2,
                StageConfig::DpNoise { .. } => 3,
                _ => 4,
            };
            if this_phase < phase {
                return Err(at(
                    "out of order: stages run as transforms (clip, zeroing) → one combiner \
                     (mean, median, trimmed_mean, krum) → dp_noise → one server optimizer"
                        .into(),
                ));
            }
            if this_phase == phase && this_phase > 1 {
                return Err(at("only one stage of this phase is allowed".into()));
            }
            phase = this_phase;
            match s {
                StageConfig::Clip { max_norm } => p
                    .transforms
                    .push(Transform::Clip(Clip::new(*max_norm).map_err(at)?)),
                StageConfig::Zeroing { max_norm } => p
                    .transforms
                    .push(Transform::Zeroing(Zeroing::new(*max_norm).map_err(at)?)),
                StageConfig::Mean => p.combiner = Combiner::Mean,
                StageConfig::Median { bucket } => {
                    p.combiner = Combiner::Median;
                    p.bucketing = Bucketing::new(*bucket).map_err(at)?;
                }
                StageConfig::TrimmedMean { beta, bucket } => {
                    p.combiner = Combiner::TrimmedMean(TrimmedMean::new(*beta).map_err(at)?);
                    p.bucketing = Bucketing::new(*bucket).map_err(at)?;
                }
                StageConfig::Krum { byzantine, select } => {
                    p.combiner = Combiner::Krum(Krum::new(*byzantine, *select).map_err(at)?)
                }
                StageConfig::DpNoise {
                    noise_multiplier,
                    seed,
                } => p.noise = Some(DpNoise::new(*noise_multiplier, *seed).map_err(at)?),
                other => {
                    p.optimizer = Some(ServerOptimizer::from_config(other).map_err(at)?);
                }
            }
            if this_phase == 2 {
                combiner_set = true;
            }
        }
        let _ = combiner_set;
        if p.noise.is_some() {
            if p.clip_norm().is_none() {
                return Err(
                    "dp_noise needs a clip stage before it: the noise is calibrated to \
                            the clip norm (the sensitivity of the mean)"
                        .into(),
                );
            }
            if p.combiner != Combiner::Mean {
                return Err(format!(
                    "dp_noise works with the mean combiner only: its calibration assumes a \
                     weighted mean of clipped updates, not `{}`",
                    p.combiner.name()
                ));
            }
        }
        Ok(p)
    }

    /// The tightest clip bound, which is what the DP noise is calibrated to.
    pub fn clip_norm(&self) -> Option<f64> {
        self.transforms
            .iter()
            .filter_map(|t| match t {
                Transform::Clip(c) => Some(c.max_norm),
                Transform::Zeroing(_) => None,
            })
            .reduce(f64::min)
    }

    /// Whether the stages need a global model (norms of updates, server
    /// optimizers): without one there is no "update", only a model.
    pub fn needs_global(&self) -> bool {
        !self.transforms.is_empty() || self.optimizer.is_some()
    }

    /// Whether a first pass over the data (norms, Gram matrix) is needed
    /// before combining.
    pub fn needs_statistics(&self) -> bool {
        !self.transforms.is_empty() || matches!(self.combiner, Combiner::Krum(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(toml_text: &str) -> Result<Pipeline, String> {
        crate::config::PipelineConfig::from_toml(toml_text).and_then(|c| Pipeline::build(&c.stages))
    }

    #[test]
    fn empty_is_plain_mean() {
        let p = build("").unwrap();
        assert_eq!(p.combiner, Combiner::Mean);
        assert!(!p.needs_global() && !p.needs_statistics());
    }

    #[test]
    fn order_is_enforced() {
        let err =
            build("[[stages]]\nkind = \"median\"\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0")
                .unwrap_err();
        assert!(err.contains("stages[1]: out of order"), "{err}");
        let err = build("[[stages]]\nkind = \"median\"\n[[stages]]\nkind = \"mean\"").unwrap_err();
        assert!(err.contains("only one"), "{err}");
        let err =
            build("[[stages]]\nkind = \"fedadam\"\n[[stages]]\nkind = \"fedyogi\"").unwrap_err();
        assert!(err.contains("only one"), "{err}");
    }

    #[test]
    fn dp_needs_clip_and_mean() {
        let err = build("[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0").unwrap_err();
        assert!(err.contains("needs a clip"), "{err}");
        let err = build(
            "[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n[[stages]]\nkind = \"median\"\n\
             [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
        )
        .unwrap_err();
        assert!(err.contains("mean combiner only"), "{err}");
        let p = build(
            "[[stages]]\nkind = \"clip\"\nmax_norm = 2.0\n[[stages]]\nkind = \"clip\"\nmax_norm = 1.0\n\
             [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 1.0",
        )
        .unwrap();
        assert_eq!(p.clip_norm(), Some(1.0));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (text, want) in [
            ("[[stages]]\nkind = \"clip\"\nmax_norm = -1.0", "max_norm"),
            ("[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.5", "beta"),
            (
                "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 0",
                "select",
            ),
            ("[[stages]]\nkind = \"fedadam\"\nbeta2 = 1.5", "beta2"),
            (
                "[[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = -1.0",
                "noise_multiplier",
            ),
        ] {
            let err = build(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }
}
