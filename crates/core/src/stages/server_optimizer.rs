//! Server optimizers (Reddi et al., "Adaptive Federated Optimization", 2021).
//!
//! The combined model minus the global model is a pseudo-gradient Δ (it
//! points downhill already). FedAvgM keeps a momentum buffer; FedAdam,
//! FedYogi and FedAdagrad keep first and second moments m and v and step
//! `x ← x + η · m / (√v + τ)`. As in the paper (Algorithm 2) there is no
//! bias correction and the moments start at 0. The state persists per job as
//! a safetensors file: tensors `m.<name>` (and `v.<name>`) in the
//! accumulator dtype, metadata `fedstep.optimizer` and `fedstep.step`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{measured, params, ServerStep, Stage, StageInfo, StageTable, StateSpec, StepKernel};
use crate::float::Acc;

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

/// What the optimizer did this round.
#[derive(Debug, Serialize)]
pub struct OptimizerMeasurement {
    /// Rounds this state has been stepped (1 on the first); absent for a
    /// stateless step (FedAvgM without momentum).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    pub learning_rate: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FedAvgMParams {
    #[serde(default = "lr_one")]
    learning_rate: f64,
    #[serde(default = "momentum")]
    momentum: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdaptiveParams {
    #[serde(default = "lr_adaptive")]
    learning_rate: f64,
    #[serde(default = "beta1")]
    beta1: f64,
    #[serde(default = "beta2")]
    beta2: f64,
    #[serde(default = "tau")]
    tau: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdagradParams {
    #[serde(default = "lr_adaptive")]
    learning_rate: f64,
    #[serde(default)]
    beta1: f64,
    #[serde(default = "tau")]
    tau: f64,
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

pub fn fedavgm(table: &StageTable) -> Result<Stage, String> {
    ServerOptimizer::stage(OptimizerKind::FedAvgM, table)
}

pub fn fedadam(table: &StageTable) -> Result<Stage, String> {
    ServerOptimizer::stage(OptimizerKind::FedAdam, table)
}

pub fn fedyogi(table: &StageTable) -> Result<Stage, String> {
    ServerOptimizer::stage(OptimizerKind::FedYogi, table)
}

pub fn fedadagrad(table: &StageTable) -> Result<Stage, String> {
    ServerOptimizer::stage(OptimizerKind::FedAdagrad, table)
}

fn check_unit(name: &str, v: f64) -> Result<(), String> {
    if (0.0..1.0).contains(&v) {
        Ok(())
    } else {
        Err(format!("{name} must be in [0, 1), got {v}"))
    }
}

impl ServerOptimizer {
    fn stage(kind: OptimizerKind, table: &StageTable) -> Result<Stage, String> {
        Ok(Stage::ServerOptimizer(Box::new(Self::from_table(
            kind, table,
        )?)))
    }

    fn from_table(kind: OptimizerKind, table: &StageTable) -> Result<Self, String> {
        let name = kind.name();
        let (learning_rate, beta1, beta2, tau) = match kind {
            OptimizerKind::FedAvgM => {
                let p: FedAvgMParams = params(name, table)?;
                (p.learning_rate, p.momentum, 0.0, 0.0)
            }
            OptimizerKind::FedAdam | OptimizerKind::FedYogi => {
                let p: AdaptiveParams = params(name, table)?;
                (p.learning_rate, p.beta1, p.beta2, p.tau)
            }
            OptimizerKind::FedAdagrad => {
                let p: AdagradParams = params(name, table)?;
                (p.learning_rate, p.beta1, 0.0, p.tau)
            }
        };
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

    /// FedAvgM without momentum is server SGD, x ← g + η·Δ: nothing to
    /// carry from one round to the next, so no state file is kept.
    fn is_stateless(&self) -> bool {
        self.kind == OptimizerKind::FedAvgM && self.beta1 == 0.0
    }

    /// One block: `x` holds the combined values on entry and the new global
    /// values on return; `g` is the old global; `m`/`v` the state (in/out;
    /// `v` is empty for FedAvgM, both are empty when stateless).
    pub fn step_moments<A: Acc>(&self, g: &[A], x: &mut [A], m: &mut [A], v: &mut [A]) {
        let lr = A::from_f64(self.learning_rate);
        let b1 = A::from_f64(self.beta1);
        let one = A::from_f64(1.0);
        match self.kind {
            OptimizerKind::FedAvgM if self.is_stateless() => {
                for j in 0..x.len() {
                    x[j] = g[j] + lr * (x[j] - g[j]);
                }
            }
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

impl StageInfo for ServerOptimizer {
    fn kind(&self) -> &'static str {
        self.kind.name()
    }

    /// Tensors `m.<name>` (and `v.<name>`), metadata `fedstep.optimizer`:
    /// the names files were written with before any other stage kept state.
    fn state(&self) -> Option<StateSpec> {
        if self.is_stateless() {
            return None;
        }
        let tensor_slots: &'static [&'static str] = match self.kind {
            OptimizerKind::FedAvgM => &["m"],
            _ => &["m", "v"],
        };
        Some(StateSpec {
            marker: Some(("fedstep.optimizer", self.kind.name())),
            scalars: &[],
            tensor_slots,
        })
    }
}

impl<A: Acc> StepKernel<A> for ServerOptimizer {
    fn step(&self, g: &[A], x: &mut [A], slots: &mut [&mut [A]]) {
        match slots {
            [] => self.step_moments(g, x, &mut [], &mut []),
            [m] => self.step_moments(g, x, m, &mut []),
            [m, v] => self.step_moments(g, x, m, v),
            _ => unreachable!("the state file gives each slot of `state()` a buffer"),
        }
    }
}

impl ServerStep for ServerOptimizer {
    fn measurement(&self, step: Option<u64>) -> Value {
        measured(&OptimizerMeasurement {
            step,
            learning_rate: self.learning_rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(toml_stage: &str) -> ServerOptimizer {
        let table: StageTable = toml::from_str(toml_stage).unwrap();
        let kind = [
            OptimizerKind::FedAvgM,
            OptimizerKind::FedAdam,
            OptimizerKind::FedYogi,
            OptimizerKind::FedAdagrad,
        ]
        .into_iter()
        .find(|k| table["kind"] == k.name())
        .unwrap();
        ServerOptimizer::from_table(kind, &table).unwrap()
    }

    #[test]
    fn fedavgm_worked_example() {
        // η = 0.5, β = 0.9. Δ1 = 2: m = 2, x = 1 + 1 = 2. Δ2 = 1 − 2 = −1 from
        // g = 2 with combined 1: m = 1.8 − 1 = 0.8, x = 2 + 0.4 = 2.4.
        let o = opt("kind = \"fedavgm\"\nlearning_rate = 0.5\nmomentum = 0.9");
        let (mut m, mut v) = (vec![0f64], vec![]);
        let mut x = vec![3.0];
        o.step_moments(&[1.0], &mut x, &mut m, &mut v);
        assert_eq!((x[0], m[0]), (2.0, 2.0));
        let mut x = vec![1.0];
        o.step_moments(&[2.0], &mut x, &mut m, &mut v);
        assert!((m[0] - 0.8).abs() < 1e-12 && (x[0] - 2.4).abs() < 1e-12);
    }

    #[test]
    fn fedavgm_without_momentum_is_server_sgd_and_keeps_no_state() {
        // η = 0.5 from g = 1 with combined 3: x = 1 + 0.5 · 2 = 2, twice the
        // same, since nothing carries over.
        let o = opt("kind = \"fedavgm\"\nlearning_rate = 0.5\nmomentum = 0.0");
        assert!(o.state().is_none());
        for _ in 0..2 {
            let mut x = vec![3.0f64];
            StepKernel::step(&o, &[1.0], &mut x, &mut []);
            assert_eq!(x[0], 2.0);
        }
        assert!(opt("kind = \"fedavgm\"\nmomentum = 0.1").state().is_some());
    }

    #[test]
    fn fedadam_worked_example() {
        // η = 0.1, β1 = 0.9, β2 = 0.99, τ = 0.001, g = 0, combined = 0.5:
        // Δ = 0.5, m = 0.05, v = 0.0025, x = 0.1 · 0.05 / (0.05 + 0.001).
        let o = opt("kind = \"fedadam\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![0f64], vec![0.5]);
        o.step_moments(&[0.0], &mut x, &mut m, &mut v);
        assert!((m[0] - 0.05).abs() < 1e-15);
        assert!((v[0] - 0.0025).abs() < 1e-15);
        assert!((x[0] - 0.1 * 0.05 / 0.051).abs() < 1e-12, "{}", x[0]);
    }

    #[test]
    fn fedyogi_and_fedadagrad_second_moments() {
        // Yogi from v = 1 with Δ² = 0.25: v − 0.01·0.25·sign(0.75) = 0.9975.
        let o = opt("kind = \"fedyogi\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![1.0], vec![0.5]);
        o.step_moments(&[0.0], &mut x, &mut m, &mut v);
        assert!((v[0] - 0.9975).abs() < 1e-12);
        // Adagrad accumulates: v = 1 + 0.25; β1 = 0 → m = Δ.
        let o = opt("kind = \"fedadagrad\"\nlearning_rate = 0.1");
        let (mut m, mut v, mut x) = (vec![0f64], vec![1.0], vec![0.5]);
        o.step_moments(&[0.0], &mut x, &mut m, &mut v);
        assert!((v[0] - 1.25).abs() < 1e-12 && (m[0] - 0.5).abs() < 1e-12);
        assert!((x[0] - 0.1 * 0.5 / (1.25f64.sqrt() + 0.001)).abs() < 1e-12);
    }
}
