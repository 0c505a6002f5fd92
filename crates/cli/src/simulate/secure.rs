//! `--secure-aggregation`: the same federation again with every round's
//! mean computed by SecAgg+ (`fedstep-secagg`), all four phases in process,
//! beside the plain run, so report.json can say what secure aggregation
//! costs in accuracy.
//!
//! Each round, every client trains from the global model exactly as in the
//! plain run (same trainer, same data, same seeds), then masks its clipped,
//! quantized update delta premultiplied by its example count; the
//! aggregator sees only the masked vectors, sums them, removes the masks it
//! recovered in the last phase and divides by the public total weight. The
//! new global model is the old plus that mean delta: with examples
//! weighting, exactly plain FedAvg's weighted mean of the models, up to the
//! quantization error. The round engine does not run SecAgg rounds yet
//! (ARCHITECTURE.md, "Secure aggregation"), so this loop drives the
//! protocol itself; only the aggregation differs from the plain run.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use fedstep_secagg::messages::{ForwardedShares, UnmaskRequest};
use fedstep_secagg::{
    Client, ClientId, MaskedClient, QuantizationConfig, RecoveredMasks, RoundId, RoundParams,
    Server,
};
use fedstep_trainer::{evaluate_params, train_params, MlpParams, TrainConfig};
use rand_core::OsRng;
use serde::Serialize;

use super::data::SimData;

/// --secure-aggregation's settings, checked.
#[derive(Debug, Clone, Serialize)]
pub struct SecureSim {
    /// Each coordinate of an update delta is clipped to [−clip, clip].
    pub clip: f32,
    /// 2^q − 1 quantization levels over the clip range.
    pub quant_bits: u32,
    /// Neighbours per client (k); None: every other client (plain SecAgg,
    /// SecAgg+'s choice for a handful of clients).
    pub neighbours: Option<usize>,
}

impl SecureSim {
    /// Digits' update deltas after a round of local training stay well
    /// inside ±1 (the largest on the defaults, seeds 0–4: 0.25), and 16
    /// bits put the grid 3·10⁻⁵ apart.
    pub const DEFAULT_CLIP: f32 = 1.0;
    pub const DEFAULT_QUANT_BITS: u32 = 16;
}

/// One secure round.
#[derive(Debug, Clone, Serialize)]
pub struct SecureRound {
    pub round: u32,
    pub accuracy: f64,
    pub loss: f64,
    /// Coordinates of all deltas that the clip range cut.
    pub clipped_fraction: f64,
    /// The largest |delta| any client sent before clipping.
    pub max_abs_delta: f64,
}

/// report.json's `secure_aggregation`.
#[derive(Debug, Clone, Serialize)]
pub struct SecureReport {
    pub protocol: &'static str,
    pub neighbours: usize,
    pub threshold: usize,
    pub field_bits: u32,
    pub clip: f32,
    pub quant_bits: u32,
    /// Per coordinate of the mean delta, c / (2^q − 1).
    pub error_bound: f64,
    pub final_accuracy: f64,
    /// The plain run's, for the same rounds.
    pub plain_final_accuracy: f64,
    /// (final_accuracy − plain_final_accuracy) × 100.
    pub points_vs_plain: f64,
    pub rounds: Vec<SecureRound>,
}

/// The four tensors of an MLP as one vector, and back.
fn flatten(params: &MlpParams) -> Vec<f32> {
    params.tensors().iter().flatten().copied().collect()
}

fn unflatten(like: &MlpParams, flat: &[f32]) -> Result<MlpParams> {
    let mut at = 0;
    let tensors = like.tensors().clone().map(|t| {
        let part = flat[at..at + t.len()].to_vec();
        at += t.len();
        part
    });
    Ok(MlpParams::from_tensors(like.shape(), tensors)?)
}

/// Runs `rounds` secure rounds from `init` and compares with the plain
/// run's final accuracy.
pub fn run(
    sim: &SecureSim,
    init: &[u8],
    data: &SimData,
    cfg: &TrainConfig,
    rounds: u32,
    plain_final_accuracy: f64,
) -> Result<SecureReport> {
    let n = data.clients.len();
    if n < 3 {
        bail!("--secure-aggregation needs at least 3 clients (a sum of fewer reveals one)");
    }
    let weights: Vec<u64> = data.clients.iter().map(|c| c.train.len() as u64).collect();
    let max_weight = weights.iter().copied().max().unwrap_or(1).max(1);
    let quantization =
        QuantizationConfig::narrowest(sim.clip, sim.quant_bits, max_weight, n as u64)
            .context("--secure-aggregation's quantization")?;
    let neighbours = sim.neighbours.unwrap_or(n - 1);
    let mut global = MlpParams::from_safetensors(init)?;
    let mut report_rounds = Vec::with_capacity(rounds as usize);
    let mut threshold = 0;
    for round in 1..=rounds {
        // Local training, in parallel, with the plain run's seeds.
        let trained: Vec<MlpParams> = std::thread::scope(|scope| {
            let handles: Vec<_> = data
                .clients
                .iter()
                .enumerate()
                .map(|(k, share)| {
                    let global = &global;
                    let seed = u64::from(round) * 1000 + k as u64;
                    scope.spawn(move || train_params(global, &share.train, cfg, seed))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| Ok(h.join().expect("a training thread panicked")?.0))
                .collect::<Result<_>>()
        })?;
        let start = flatten(&global);
        let deltas: Vec<Vec<f32>> = trained
            .iter()
            .map(|t| flatten(t).iter().zip(&start).map(|(x, g)| x - g).collect())
            .collect();
        let clip = f64::from(sim.clip);
        let all = deltas.iter().flatten();
        let max_abs_delta = all.clone().fold(0.0f64, |m, d| m.max(f64::from(d.abs())));
        let clipped = all.clone().filter(|d| f64::from(d.abs()) > clip).count();
        let params = RoundParams {
            round: RoundId::new(format!("simulate/round-{round}"))?,
            neighbours,
            min_clients: 3,
            vector_len: start.len() as u64,
            quantization,
        };
        let (mean_delta, t) = secure_mean(&params, &deltas, &weights)?;
        threshold = t;
        let next: Vec<f32> = start.iter().zip(&mean_delta).map(|(g, d)| g + d).collect();
        global = unflatten(&global, &next)?;
        let eval = evaluate_params(&global, &data.test)?;
        report_rounds.push(SecureRound {
            round,
            accuracy: eval.accuracy,
            loss: eval.loss,
            clipped_fraction: clipped as f64 / (deltas.len() * start.len()).max(1) as f64,
            max_abs_delta,
        });
    }
    let final_accuracy = report_rounds.last().map_or(f64::NAN, |r| r.accuracy);
    Ok(SecureReport {
        protocol: "secagg+",
        neighbours,
        threshold,
        field_bits: quantization.ring().bits(),
        clip: sim.clip,
        quant_bits: sim.quant_bits,
        error_bound: quantization.error_bound(),
        final_accuracy,
        plain_final_accuracy,
        points_vs_plain: (final_accuracy - plain_final_accuracy) * 100.0,
        rounds: report_rounds,
    })
}

/// One SecAgg+ round over `inputs` (client i is `ClientId(i)`): the
/// weighted mean and the Shamir threshold used. The masked vectors are
/// summed as they arrive; the aggregator never holds one on its own.
fn secure_mean(
    params: &RoundParams,
    inputs: &[Vec<f32>],
    weights: &[u64],
) -> Result<(Vec<f32>, usize)> {
    let mut server = Server::new(params.clone());
    let ids: Vec<ClientId> = (0..inputs.len() as u32).map(ClientId).collect();
    let clients: BTreeMap<ClientId, Client> = ids
        .iter()
        .map(|&id| (id, Client::new(id, params.clone(), &mut OsRng)))
        .collect();
    for (&id, client) in &clients {
        server.receive_advertise_keys(id, client.advertise());
    }
    let roster = server.close_advertise_keys()?;
    let mut shared = BTreeMap::new();
    for (id, client) in clients {
        let (state, message) = client.share_keys(&roster, &mut OsRng)?;
        server.receive_share_keys(id, message);
        shared.insert(id, state);
    }
    let forwarded: Vec<ForwardedShares> = server.close_share_keys()?;
    let ring = params.quantization.ring();
    let mut masked_sum = vec![0u64; params.vector_len as usize];
    let mut holders: BTreeMap<ClientId, MaskedClient> = BTreeMap::new();
    for f in &forwarded {
        let i = f.to.0 as usize;
        let state = shared
            .remove(&f.to)
            .context("a forward for a client that did not share")?;
        let (holder, message, vector) = state.mask_input(f, &inputs[i], weights[i])?;
        server.receive_masked_input(f.to, message);
        ring.add_assign(&mut masked_sum, &vector);
        holders.insert(f.to, holder);
    }
    let requests: Vec<UnmaskRequest> = server.close_masked_input()?;
    for request in &requests {
        let answer = holders[&request.to].unmask(request)?;
        server.receive_unmask(request.to, answer);
    }
    let recovered: RecoveredMasks = server.close_unmask()?;
    if let Some(e) = server.exclusions().first() {
        bail!("simulated client {} was excluded: {}", e.client.0, e.reason);
    }
    let unmasked = recovered.unmask(&masked_sum)?;
    Ok((recovered.mean(&unmasked), server.threshold()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secure_mean_is_the_weighted_mean_within_the_bound() {
        let inputs = vec![
            vec![0.5, -0.25, 0.0],
            vec![-0.5, 0.75, 0.1],
            vec![0.25, 0.25, -0.2],
        ];
        let weights = [10, 30, 60];
        let quantization = QuantizationConfig::narrowest(1.0, 16, 60, 3).unwrap();
        let params = RoundParams {
            round: RoundId::new("test/round-1").unwrap(),
            neighbours: 2,
            min_clients: 3,
            vector_len: 3,
            quantization,
        };
        let (mean, threshold) = secure_mean(&params, &inputs, &weights).unwrap();
        assert_eq!(threshold, 2);
        for j in 0..3 {
            let want: f64 = inputs
                .iter()
                .zip(weights)
                .map(|(x, w)| f64::from(x[j]) * w as f64)
                .sum::<f64>()
                / 100.0;
            let err = (f64::from(mean[j]) - want).abs();
            assert!(err <= quantization.error_bound() + 1e-6, "{j}: {err}");
        }
    }

    #[test]
    fn flatten_and_unflatten_are_inverse() {
        let shape = fedstep_trainer::MlpShape {
            input: 4,
            hidden: 3,
            classes: 2,
        };
        let params = MlpParams::init(shape, 7).unwrap();
        let back = unflatten(&params, &flatten(&params)).unwrap();
        assert_eq!(back.tensors(), params.tensors());
    }
}
