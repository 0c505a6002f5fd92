//! Server optimizers (Reddi et al., "Adaptive Federated Optimization", 2021).
//!
//! The combined model minus the global model is a pseudo-gradient Δ (it
//! points downhill already). FedAvgM keeps a momentum buffer; FedAdam,
//! FedYogi and FedAdagrad keep first and second moments m and v and step
//! `x ← x + η · m / (√v + τ)`. As in the paper (Algorithm 2) there is no
//! bias correction and the moments start at 0. The state persists per job as
//! a safetensors file: tensors `m.<name>` (and `v.<name>`) in the
//! accumulator dtype, metadata `fedstep.optimizer` and `fedstep.step`.

use crate::float::Acc;

use super::StageConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::FedAvgM => "fedavgm",
            OptimizerKind::FedAdam => "fedadam",
            OptimizerKind::FedYogi => "fedyogi",
            OptimizerKind::FedAdagrad => "fedadagrad",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptimizer {
    pub kind: OptimizerKind,
    pub learning_rate: f64,
    /// FedAvgM: momentum. Adaptive: β1.
    pub beta1: f64,
    /// Adaptive: β2 (unused by FedAvgM and FedAdagrad).
    pub beta2: f64,
    pub tau: f64,
}

fn check_unit(name: &str, v: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("{name} must be in [0, 1), got {v}"))
    }
}

impl ServerOptimizer {
    pub fn from_config(c: &StageConfig) -> Result<Self, String> {
        let (kind, learning_rate, beta1, beta2, tau) = match *c {
            StageConfig::Fedavgm {
                learning_rate,
                momentum,
            } => (OptimizerKind::FedAvgM, learning_rate, momentum, 0.0, 0.0),
            StageConfig::Fedadam {
                learning_rate,
                beta1,
                beta2,
                tau,
            } => (OptimizerKind::FedAdam, learning_rate, beta1, beta2, tau),
            StageConfig::Fedyogi {
                learning_rate,
                beta1,
                beta2,
                tau,
            } => (OptimizerKind::FedYogi, learning_rate, beta1, beta2, tau),
            StageConfig::Fedadagrad {
                learning_rate,
                beta1,
                tau,
            } => (OptimizerKind::FedAdagrad, learning_rate, beta1, 0.0, tau),
            ref other => return Err(format!("{other:?} is not a server optimizer")),
        };
        let name = kind.name();
        if !(learning_rate.is_finite() && learning_rate > 0.0) {
            return Err(format!(
                "{name}: learning_rate must be positive, got {learning_rate}"
            ));
        }
        let b1 = if kind == OptimizerKind::FedAvgM {
            "momentum"
        } else {
            "beta1"
        };
        check_unit(&format!("{name}: {b1}"), beta1)?;
        check_unit(&format!("{name}: beta2"), beta2)?;
        if kind != OptimizerKind::FedAvgM && !(tau.is_finite() && tau > 0.0) {
            return Err(format!("{name}: tau must be positive, got {tau}"));
        }
        Ok(ServerOptimizer {
            kind,
            learning_rate,
            beta1,
            beta2,
            tau,
        })
    }

    /// The state tensors kept per model tensor.
    pub fn slots(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::FedAvgM => &["m"],
            _ => &["m", "v"],
        }
    }

    /// One block: `x` holds the combined values on entry and the new global
    /// values on return; `g` is the old global; `m`/`v` the state (in/out;
    /// `v` is empty for FedAvgM).
    pub fn step<A: Acc>(&self, g: &[A], x: &mut [A], m: &mut [A], v: &mut [A]) {
        let lr = A::from_f64(self.learning_rate);
        let b1 = A::from_f64(self.beta1);
        let one = A::from_f64(1.0);
        match self.kind {
            OptimizerKind::FedAvgM => {
                for j in 0..x.len() {
                    let delta = x[j] - g[j];
                    m[j] = b1 * m[j] + delta;
                    x[j] = g[j] + lr * m[j];
                }
            }
            kind => {
                let b2 = A::from_f64(self.beta2);
                let tau = A::from_f64(self.tau);
                for j in 0..x.len() {
                    let delta = x[j] - g[j];
                    let d2 = delta * delta;
                    m[j] = b1 * m[j] + (one - b1) * delta;
                    v[j] = match kind {
                        OptimizerKind::FedAdam => b2 * v[j] + (one - b2) * d2,
                        OptimizerKind::FedYogi => v[j] - (one - b2) * d2 * (v[j] - d2).signum(),
                        _ => v[j] + d2,
                    };
                    x[j] = g[j] + lr * m[j] / (v[j].sqrt() + tau);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(toml_stage: &str) -> ServerOptimizer {
        let cfg =
            crate::config::PipelineConfig::from_toml(&format!("[[stages]]\n{toml_stage}")).unwrap();
        ServerOptimizer::from_config(&cfg.stages[0]).unwrap()
    }

    #[test]
    fn fedavgm_worked_example() {
        // η = 0.5, β = 0.9. Δ1 = 2: m = 2, x = 1 + 1 = 2. Δ2 = 1 − 2 = −1 from
        // g = 2 with combined 1: m = 1.8 − 1 = 0.8, x = 2 + 0.4 = 2.4.
        let o = opt("kind = \"fedavgm\"\nlearning_rate = 0.5\nmomentum = 0.9");
        let (mut m, mut v) = (vec![0f64], vec![]);
        let mut x = vec![3.0];
        o.step(&[1.0], &mut x, &mut m, &mut v);
        assert_eq!((x[0], m[0]), (2.0, 2.0));
        let mut x = vec![1.0];
        o.step(&[2.0], &mut x, &mut m, &mut v);
        assert!((m[0] - 0.8).abs() < 1e-12 && (x[0] - 2.4).abs() < 1e-12);
    }

    #[test]
    fn fedadam_worked_example() {
        // η = 0.1, β1 = 0.9, β2 = 0.99, τ = 0.001, g = 0, combined = 0.5:
        // Δ = 0.5, m = 0.05, v = 0.0025, x = 0.1 · 0.05 / (0.05 + 0.001).
        let o = opt("kind = \"fedadam\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![0f64], vec![0.5]);
        o.step(&[0.0], &mut x, &mut m, &mut v);
        assert!((m[0] - 0.05).abs() < 1e-15);
        assert!((v[0] - 0.0025).abs() < 1e-15);
        assert!((x[0] - 0.1 * 0.05 / 0.051).abs() < 1e-12, "{}", x[0]);
    }

    #[test]
    fn fedyogi_and_fedadagrad_second_moments() {
        // Yogi from v = 1 with Δ² = 0.25: v − 0.01·0.25·sign(0.75) = 0.9975.
        let o = opt("kind = \"fedyogi\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![1.0], vec![0.5]);
        o.step(&[0.0], &mut x, &mut m, &mut v);
        assert!((v[0] - 0.9975).abs() < 1e-12);
        // Adagrad accumulates: v = 1 + 0.25; β1 = 0 → m = Δ.
        let o = opt("kind = \"fedadagrad\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![1.0], vec![0.5]);
        o.step(&[0.0], &mut x, &mut m, &mut v);
        assert!((v[0] - 1.25).abs() < 1e-12 && (m[0] - 0.5).abs() < 1e-12);
        assert!((x[0] - 0.1 * 0.5 / (1.25f64.sqrt() + 0.001)).abs() < 1e-12);
    }
}
