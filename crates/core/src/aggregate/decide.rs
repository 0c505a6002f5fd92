//! Deciding the round: each shard's statistics pass (when a stage needs
//! norms or distances), then, from all of them, what the stages decide per
//! client (scales, zeroing, Krum's selection), the combination set and its
//! weights, and the round's noise key. The [`Decision`] is plain data, so
//! the task that decides can hand it to shard tasks in other processes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::prepare::Prepared;
use crate::bytes::{is_unavailable, Input};
use crate::error::{AggregateError, ModelError};
use crate::measurements::ClientStatus;
use crate::share_cap;
use crate::stages::krum::distances_from_gram;
use crate::stages::{NoiseKey, Scalars, TransformRound};
use crate::statistics::{self, StatsError};

/// What one shard's statistics pass found: the partial Gram matrix of
/// each of its float stripes, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardStatistics {
    pub stripes: Vec<Vec<f64>>,
    pub bytes_read: u64,
}

/// Why a step of an attempt stopped.
#[derive(Debug)]
pub enum StepError {
    /// Update `input` (its index in the request's updates) is bad: start a
    /// new attempt without it; `reason` is what the records say.
    Reject { input: usize, reason: String },
    /// The round cannot be aggregated now (the global model or the state
    /// at fault, a write failed, the store unavailable).
    Fatal(AggregateError),
}

impl From<AggregateError> for StepError {
    fn from(e: AggregateError) -> Self {
        StepError::Fatal(e)
    }
}

/// The round as decided: who is in, with which scale and weight, and what
/// every stage decided, for the combine pass of every shard. Its `Debug`
/// leaves the noise key out, so that logging a decision cannot leak it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Decision {
    /// The updates that reached the transforms (indices into the
    /// request's), in order; the per-client vectors below follow it.
    pub(super) live: Vec<usize>,
    /// The factor each update is multiplied by (clipping).
    pub(super) scales: Vec<f64>,
    /// Update norms, when a statistics pass ran.
    pub(super) norms: Option<Vec<f64>>,
    /// Zeroed or not selected, with the reason.
    pub(super) left_out: Vec<Option<(ClientStatus, String)>>,
    /// The norm every kept update is bounded by (the tightest clip).
    pub(super) norm_bound: Option<f64>,
    /// Each stateful transform's state for the next round, by kind.
    pub(super) next_state: BTreeMap<String, Scalars>,
    /// Positions (into `live`) of the updates combined.
    pub(super) kept: Vec<usize>,
    /// Their normalized weights, after the share cap.
    pub(super) weights: Vec<f64>,
    /// The stages' measurements so far, by kind.
    pub(super) stages: BTreeMap<String, Value>,
    /// The key of the round's noise stream (with a noise stage). Secret
    /// when the noise is: keep a decision where the output's readers
    /// cannot read it.
    pub(super) noise_key: Option<NoiseKey>,
}

impl Prepared<'_> {
    /// Shard `shard`'s statistics pass over the updates still in.
    pub fn statistics(&self, shard: usize) -> Result<ShardStatistics, StepError> {
        let live = self.live();
        if live.is_empty() {
            return Err(self.no_usable().into());
        }
        let inputs = self.inputs(&live);
        let full = self.setup.pipeline.combiner.needs_gram();
        let stats = statistics::run(
            &self.setup.reference,
            self.setup.shards.shard(shard),
            self.setup.global.as_ref(),
            &inputs,
            full,
            self.block_size(inputs.len()),
        )
        .map_err(|e| self.reject_for(e, &live))?;
        Ok(ShardStatistics {
            stripes: stats.stripes,
            bytes_read: stats.bytes_read,
        })
    }

    /// Decides the round from every shard's statistics, in shard order
    /// (none when no stage needs them).
    pub fn decide(&self, stats: &[ShardStatistics]) -> Result<Decision, StepError> {
        let live = self.live();
        if live.is_empty() {
            return Err(self.no_usable().into());
        }
        let n = live.len();
        let mut d = Decision {
            live,
            scales: vec![1.0; n],
            norms: None,
            left_out: vec![None; n],
            norm_bound: None,
            next_state: BTreeMap::new(),
            kept: Vec::new(),
            weights: Vec::new(),
            stages: BTreeMap::new(),
            noise_key: None,
        };
        if self.needs_statistics() {
            if stats.len() != self.setup.shards.len() {
                return Err(StepError::Fatal(AggregateError::Config(format!(
                    "the decision needs the statistics of all {} shards, got {}",
                    self.setup.shards.len(),
                    stats.len()
                ))));
            }
            let stripes: Vec<Vec<f64>> = stats.iter().flat_map(|s| s.stripes.clone()).collect();
            if stripes.iter().any(|s| s.len() != n * n) {
                return Err(StepError::Fatal(AggregateError::Config(
                    "statistics computed over a different set of updates".into(),
                )));
            }
            self.screen(&mut d, &statistics::gram(&stripes, n))?;
        }
        self.combination(&mut d)?;
        let pipeline = self.setup.pipeline;
        let (_, m) = pipeline
            .combiner
            .for_round(d.kept.len(), self.setup.req.round);
        if let Some(m) = m {
            d.stages.insert(pipeline.combiner.kind().to_string(), m);
        }
        if let Some(noise) = &pipeline.noise {
            let key = noise.draw_key();
            let (_, m) = noise.for_round(d.norm_bound, d.max_weight(), self.setup.req.round, &key);
            d.stages.insert(noise.kind().to_string(), m);
            d.noise_key = Some(key);
        }
        Ok(d)
    }

    /// Refuses a decision made over other updates than this attempt's (it
    /// came from another task, through storage): indexing by it would be
    /// wrong, or panic.
    pub(super) fn check_decision(&self, d: &Decision) -> Result<(), AggregateError> {
        let n = d.live.len();
        let consistent = d.live == self.live()
            && d.scales.len() == n
            && d.left_out.len() == n
            && d.norms.as_ref().is_none_or(|v| v.len() == n)
            && d.weights.len() == d.kept.len()
            && d.kept.iter().all(|&k| k < n);
        if consistent {
            Ok(())
        } else {
            Err(AggregateError::Config(
                "the decision was made over a different set of updates than this attempt's".into(),
            ))
        }
    }

    /// The update transforms (from the norms) and the combiner's selection
    /// (Krum, from the distances).
    fn screen(&self, d: &mut Decision, gram: &[Vec<f64>]) -> Result<(), StepError> {
        let n = d.live.len();
        let pipeline = self.setup.pipeline;
        let norms: Vec<f64> = (0..n).map(|i| gram[i][i].sqrt()).collect();
        let mut zeroed: Vec<Option<String>> = vec![None; n];
        for t in &pipeline.transforms {
            let state = self
                .setup
                .state_in
                .as_ref()
                .and_then(|s| s.scalars.get(t.kind()));
            let outcome = t
                .apply(TransformRound {
                    norms: &norms,
                    scales: &mut d.scales,
                    dropped: &mut zeroed,
                    state,
                })
                .map_err(|reason| self.state_refused(t.kind(), reason))?;
            d.stages.insert(t.kind().to_string(), outcome.measurement);
            if let Some(b) = outcome.norm_bound {
                d.norm_bound = Some(d.norm_bound.map_or(b, |a: f64| a.min(b)));
            }
            if let Some(next) = outcome.next_state {
                d.next_state.insert(t.kind().to_string(), next);
            }
        }
        for (left, z) in d.left_out.iter_mut().zip(zeroed) {
            *left = z.map(|r| (ClientStatus::Zeroed, r));
        }
        if pipeline.combiner.needs_gram() {
            let candidates: Vec<usize> = (0..n).filter(|&i| d.left_out[i].is_none()).collect();
            let sub: Vec<Vec<f64>> = candidates
                .iter()
                .map(|&i| candidates.iter().map(|&j| gram[i][j]).collect())
                .collect();
            let s: Vec<f64> = candidates.iter().map(|&i| d.scales[i]).collect();
            let selection = pipeline
                .combiner
                .select(&distances_from_gram(&sub, &s))
                .map_err(|e| StepError::Fatal(AggregateError::NoUsableUpdate(e)))?;
            if let Some(sel) = selection {
                for (pos, &i) in candidates.iter().enumerate() {
                    if !sel.chosen.contains(&pos) {
                        d.left_out[i] = Some((ClientStatus::NotSelected, sel.reason.clone()));
                    }
                }
                d.stages
                    .insert(pipeline.combiner.kind().to_string(), sel.measurement);
            }
        }
        d.norms = Some(norms);
        Ok(())
    }

    /// Chooses the combination set (live and not left out) and normalizes
    /// its weights, then applies the share cap.
    fn combination(&self, d: &mut Decision) -> Result<(), StepError> {
        let clients = &self.clients;
        let kept: Vec<usize> = (0..d.live.len())
            .filter(|&i| d.left_out[i].is_none())
            .collect();
        if kept.is_empty() {
            return Err(StepError::Fatal(AggregateError::NoUsableUpdate(
                "every valid update was dropped by the robustness stages".into(),
            )));
        }
        let total: f64 = kept.iter().map(|&i| clients[d.live[i]].raw_weight).sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(StepError::Fatal(AggregateError::NoUsableUpdate(format!(
                "the accepted updates' weights sum to {total}; nothing to average"
            ))));
        }
        let mut weights: Vec<f64> = kept
            .iter()
            .map(|&i| clients[d.live[i]].raw_weight / total)
            .collect();
        // The cap goes on the final set (after zeroing and Krum), before
        // anything reads the weights: the mean's coefficients, FedSelect's
        // denominators and the DP noise's largest weight all see it.
        if let Some(cap) = self.setup.cfg.max_client_share() {
            let capped = share_cap::cap_shares(&weights, cap);
            let ids: Vec<&str> = kept
                .iter()
                .map(|&i| clients[d.live[i]].meta.client_id.as_str())
                .collect();
            let combiner = &self.setup.pipeline.combiner;
            let moot = combiner.ignores_weights().then(|| combiner.kind());
            d.stages.insert(
                "max_client_share".to_string(),
                capped.measurement(cap, &ids, moot),
            );
            weights = capped.shares;
        }
        d.kept = kept;
        d.weights = weights;
        Ok(())
    }

    /// A transform can only fail on what it stored last round (its
    /// parameters were checked when the config was parsed): the state file
    /// is at fault.
    fn state_refused(&self, kind: &str, reason: String) -> StepError {
        StepError::Fatal(AggregateError::ServerState {
            name: self.state_in_name(),
            reason: format!("{kind}: {reason}"),
        })
    }

    pub(super) fn state_in_name(&self) -> String {
        self.setup
            .req
            .state_in
            .as_ref()
            .map_or("-".into(), |i| i.source().describe())
    }

    /// Turns a streaming failure into a rejection of the update it names
    /// (`live` maps the pass's input positions to the request's), or a
    /// fatal error when the global model is at fault or the read failed
    /// for the system's reasons.
    pub(super) fn reject_for(&self, e: StatsError, live: &[usize]) -> StepError {
        let global = self.setup.req.global.as_ref();
        let (i, reason) = match e {
            StatsError::NonFinite(nf) => (
                live[nf.input],
                format!(
                    "tensor `{}` holds a non-finite value ({}) at element {}",
                    nf.tensor, nf.value, nf.index
                ),
            ),
            StatsError::Read { input, error } => {
                if is_unavailable(&error) {
                    return StepError::Fatal(AggregateError::Unavailable {
                        name: self.source_name(live[input]),
                        reason: error.to_string(),
                    });
                }
                (live[input], format!("reading the model failed: {error}"))
            }
            StatsError::Invalid { input, reason } => (live[input], reason),
            StatsError::Global(reason) => {
                return StepError::Fatal(AggregateError::Global {
                    name: global.map_or("-".into(), |g: &Input| g.source().describe()),
                    source: ModelError::InvalidHeader(reason),
                })
            }
        };
        StepError::Reject {
            input: i,
            reason: format!("model {}: {reason}", self.source_name(i)),
        }
    }

    fn source_name(&self, i: usize) -> String {
        self.clients[i]
            .source
            .as_ref()
            .map_or_else(String::new, |s| s.name.clone())
    }
}

impl std::fmt::Debug for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decision")
            .field("live", &self.live)
            .field("scales", &self.scales)
            .field("norms", &self.norms)
            .field("left_out", &self.left_out)
            .field("norm_bound", &self.norm_bound)
            .field("next_state", &self.next_state)
            .field("kept", &self.kept)
            .field("weights", &self.weights)
            .field("stages", &self.stages)
            .field("noise_key", &self.noise_key.map(|_| "<secret>"))
            .finish()
    }
}

impl Decision {
    /// The largest normalized weight (what the DP noise is calibrated to).
    pub(super) fn max_weight(&self) -> f64 {
        self.weights.iter().copied().fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_never_prints_its_noise_key() {
        let d = Decision {
            live: vec![0],
            scales: vec![1.0],
            norms: None,
            left_out: vec![None],
            norm_bound: Some(1.0),
            next_state: BTreeMap::new(),
            kept: vec![0],
            weights: vec![1.0],
            stages: BTreeMap::new(),
            noise_key: Some([171; 32]),
        };
        let shown = format!("{d:?}");
        assert!(shown.contains("<secret>"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }
}
