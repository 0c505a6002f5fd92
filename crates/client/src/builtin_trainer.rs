//! The built-in trainer: fedstep-trainer's candle MLP on a local dataset
//! (the bundled digits, a digits CSV, or MNIST IDX files), optionally cut
//! down to a non-IID class share like a `fedstep simulate` client.

use std::sync::Arc;

use fedstep_trainer::{
    bundled_digits, load_digits_csv, load_mnist_idx, partition, train_local, train_scaffold,
    ClientSpec, Dataset, MlpParams, TrainConfig,
};
use serde_json::{Map, Value};

use crate::config::{BuiltinConfig, DatasetKind};
use crate::trainer::{TrainError, TrainReport, TrainRequest, Trainer};

pub struct BuiltinTrainer {
    data: Arc<Dataset>,
    cfg: TrainConfig,
}

impl BuiltinTrainer {
    pub fn from_config(c: &BuiltinConfig) -> Result<BuiltinTrainer, TrainError> {
        let err = |e: fedstep_trainer::TrainerError| TrainError(format!("dataset: {e}"));
        let full = match (c.dataset, &c.digits_csv) {
            (DatasetKind::Digits, None) => bundled_digits().map_err(err)?,
            (DatasetKind::Digits, Some(p)) => load_digits_csv(p).map_err(err)?,
            (DatasetKind::Mnist, _) => match (&c.mnist_images, &c.mnist_labels) {
                (Some(i), Some(l)) => load_mnist_idx(i, l).map_err(err)?,
                _ => {
                    return Err(TrainError(
                        "mnist needs mnist_images and mnist_labels".into(),
                    ))
                }
            },
        };
        let data = match &c.classes {
            None => full,
            Some(classes) => {
                let spec = ClientSpec {
                    classes: classes.clone(),
                    sel_prob: c.sel_prob,
                    def_prob: c.def_prob,
                };
                partition(&full, &[spec], c.seed)
                    .map_err(err)?
                    .pop()
                    .ok_or_else(|| TrainError("partition returned no share".into()))?
            }
        };
        if data.is_empty() {
            return Err(TrainError(
                "the configured class share is empty: raise sel_prob/def_prob or pick other classes"
                    .into(),
            ));
        }
        let cfg = TrainConfig {
            local_epochs: c.local_epochs,
            batch_size: c.batch_size,
            learning_rate: c.learning_rate,
            seed: c.seed,
            ..TrainConfig::default()
        };
        cfg.validate().map_err(|e| TrainError(e.to_string()))?;
        Ok(BuiltinTrainer {
            data: Arc::new(data),
            cfg,
        })
    }

    pub fn examples(&self) -> usize {
        self.data.len()
    }
}

/// The job's `[round_config]` may set `local_epochs`, `batch_size`,
/// `learning_rate` and FedProx's `mu` for everyone; other keys are for
/// other trainers. `algorithm` (fedavg | fedprox | scaffold, README
/// "Client drift") must be one this trainer runs; SCAFFOLD needs the
/// round's variate files (`has_variates`: the message named a server
/// variate), else it is refused rather than silently trained as FedAvg.
fn with_round_config(
    mut cfg: TrainConfig,
    rc: &Map<String, Value>,
    has_variates: bool,
) -> Result<TrainConfig, TrainError> {
    let positive_int = |key: &str| -> Result<Option<usize>, TrainError> {
        match rc.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n >= 1)
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    TrainError(format!(
                        "round_config.{key} = {v} is not a positive integer"
                    ))
                }),
        }
    };
    if let Some(n) = positive_int("local_epochs")? {
        cfg.local_epochs = n;
    }
    if let Some(n) = positive_int("batch_size")? {
        cfg.batch_size = n;
    }
    if let Some(v) = rc.get("learning_rate") {
        cfg.learning_rate = v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                TrainError(format!(
                    "round_config.learning_rate = {v} is not a positive number"
                ))
            })?;
    }
    if let Some(v) = rc.get("mu") {
        cfg.proximal_mu = v
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| TrainError(format!("round_config.mu = {v} is not a number >= 0")))?;
    }
    match rc.get("algorithm") {
        None => {}
        Some(Value::String(a)) if a == "fedavg" || a == "fedprox" => {}
        Some(Value::String(a)) if a == "scaffold" && has_variates => {}
        Some(Value::String(a)) if a == "scaffold" => {
            return Err(TrainError(
                "round_config.algorithm = \"scaffold\" but the round's message names no \
                 server variate (an aggregator older than SCAFFOLD support?)"
                    .into(),
            ))
        }
        Some(v) => {
            return Err(TrainError(format!(
                "round_config.algorithm = {v}: expected \"fedavg\", \"fedprox\" or \"scaffold\""
            )))
        }
    }
    Ok(cfg)
}

impl Trainer for BuiltinTrainer {
    async fn train(&self, req: TrainRequest) -> Result<TrainReport, TrainError> {
        let cfg = with_round_config(self.cfg.clone(), &req.round_config, req.scaffold.is_some())?;
        let global = read(&req.global_model).await?;
        let variates = match &req.scaffold {
            Some(f) => Some((
                read(&f.server_variate).await?,
                read(&f.client_variate).await?,
            )),
            None => None,
        };
        let data = Arc::clone(&self.data);
        let round = u64::from(req.round);
        // candle training is CPU-bound: keep it off the async workers so the
        // visibility heartbeat keeps ticking.
        let (outcome, delta) = tokio::task::spawn_blocking(move || match variates {
            None => train_local(&global, &data, &cfg, round).map(|o| (o, None)),
            Some((c, c_i)) => scaffold_round(&global, &data, &cfg, round, &c, &c_i),
        })
        .await
        .map_err(|e| TrainError(format!("training task: {e}")))?
        .map_err(|e| TrainError(format!("built-in trainer: {e}")))?;
        tokio::fs::write(&req.output_model, &outcome.model_bytes)
            .await
            .map_err(|e| TrainError(format!("{}: {e}", req.output_model.display())))?;
        if let (Some(f), Some(delta)) = (&req.scaffold, delta) {
            tokio::fs::write(&f.delta_out, delta)
                .await
                .map_err(|e| TrainError(format!("{}: {e}", f.delta_out.display())))?;
        }
        Ok(TrainReport {
            num_examples: outcome.num_examples as u64,
            llm_type: None,
            metrics: outcome.metrics,
        })
    }
}

async fn read(path: &std::path::Path) -> Result<Vec<u8>, TrainError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| TrainError(format!("{}: {e}", path.display())))
}

/// SCAFFOLD's local round (fedstep-trainer's `train_scaffold`, as
/// `fedstep simulate` runs it): the trained model and the Δc_i bytes. The
/// client keeps c_i itself (`crate::scaffold`), so c_i⁺ is not written.
fn scaffold_round(
    global: &[u8],
    data: &fedstep_trainer::Dataset,
    cfg: &TrainConfig,
    round: u64,
    server_variate: &[u8],
    client_variate: &[u8],
) -> fedstep_trainer::Result<(fedstep_trainer::TrainOutcome, Option<Vec<u8>>)> {
    let params = MlpParams::from_safetensors(global)?;
    let c = MlpParams::from_safetensors(server_variate)?;
    let c_i = MlpParams::from_safetensors(client_variate)?;
    let out = train_scaffold(&params, data, cfg, round, &c, &c_i)?;
    let outcome = fedstep_trainer::TrainOutcome {
        model_bytes: out.trained.to_safetensors()?,
        num_examples: data.len(),
        metrics: std::collections::BTreeMap::from([
            ("loss".to_string(), out.eval.loss),
            ("accuracy".to_string(), out.eval.accuracy),
        ]),
    };
    Ok((outcome, Some(out.delta.to_safetensors()?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_config_overrides_are_type_checked() {
        let base = TrainConfig::default();
        let rc = json!({"local_epochs": 3, "learning_rate": 0.05, "other": "x"});
        let cfg = with_round_config(base.clone(), rc.as_object().unwrap(), false).unwrap();
        assert_eq!((cfg.local_epochs, cfg.learning_rate), (3, 0.05));
        let rc = json!({"local_epochs": "three"});
        let err = with_round_config(base.clone(), rc.as_object().unwrap(), false).unwrap_err();
        assert!(err.0.contains("local_epochs"), "{err}");
        // FedProx's μ reaches the trainer; a bad one is refused, and so is
        // SCAFFOLD without the round's variate files.
        let rc = json!({"algorithm": "fedprox", "mu": 0.25});
        let cfg = with_round_config(base.clone(), rc.as_object().unwrap(), false).unwrap();
        assert_eq!(cfg.proximal_mu, 0.25);
        let rc = json!({"algorithm": "scaffold"});
        assert!(with_round_config(base.clone(), rc.as_object().unwrap(), true).is_ok());
        for (rc, word) in [
            (json!({"mu": -1}), "round_config.mu"),
            (json!({"mu": "x"}), "round_config.mu"),
            (json!({"algorithm": "scaffold"}), "names no server variate"),
            (json!({"algorithm": "fedsgd"}), "expected"),
        ] {
            let err = with_round_config(base.clone(), rc.as_object().unwrap(), false).unwrap_err();
            assert!(err.0.contains(word), "{rc}: {err}");
        }
    }
}
