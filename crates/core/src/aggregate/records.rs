//! The aggregation's record once every shard is done: every input exactly
//! once with its status, weight, norm and scale, every stage's measurement,
//! and the totals.

use std::collections::HashMap;
use std::time::Duration;

use super::decide::Decision;
use super::prepare::Prepared;
use super::shard_pass::{Outputs, ShardDone};
use super::AggregationOutcome;
use crate::measurements::{ClientMeasurement, ClientStatus, Measurements};
use crate::personalization::masked_mean::Tally;
use crate::stages::measured;
use crate::stages::state_file::is_float;

/// Reads and passes over the data, over every attempt and shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct Effort {
    pub passes: u32,
    pub bytes_read: u64,
}

impl Prepared<'_> {
    /// The outcome of the attempt that wrote `outputs` under `decision`,
    /// from its shards' results (in any order).
    pub fn outcome(
        &self,
        decision: &Decision,
        outputs: &Outputs,
        shards: &[ShardDone],
        effort: Effort,
        elapsed: Duration,
    ) -> AggregationOutcome {
        let setup = &self.setup;
        let cfg = setup.cfg;
        let mut stages = decision.stages.clone();
        let mut tally: Option<Tally> = None;
        for t in shards.iter().filter_map(|s| s.tally.as_ref()) {
            tally
                .get_or_insert_with(|| Tally::new(t.shared.len()))
                .add(t);
        }
        if let Some(tally) = tally {
            let float_elements: u64 = setup
                .reference
                .iter()
                .filter(|t| is_float(t))
                .map(|t| t.elements() as u64)
                .sum();
            let ids: Vec<&str> = decision
                .kept
                .iter()
                .map(|&i| self.clients[decision.live[i]].meta.client_id.as_str())
                .collect();
            stages.insert(
                "fedselect".to_string(),
                measured(&tally.measurement(&ids, float_elements)),
            );
        }
        if let Some(opt) = &setup.pipeline.optimizer {
            let step = outputs.state.as_ref().map(|state| state.step);
            stages.insert(opt.kind().to_string(), opt.measurement(step));
        }
        let clients = self.records(decision);
        let count = |s: ClientStatus| clients.iter().filter(|r| r.status == s).count();
        AggregationOutcome {
            measurements: Measurements {
                weighting: format!("{:?}", cfg.weighting()).to_lowercase(),
                llm_type: cfg.type_filter_name().to_string(),
                target_llm_type: self.target_type.clone(),
                combiner: setup.pipeline.combiner_name().to_string(),
                accepted: count(ClientStatus::Accepted),
                rejected: count(ClientStatus::Rejected),
                excluded: count(ClientStatus::Excluded),
                clients,
                stages,
                tensors: setup.reference.len(),
                parameters: setup.reference.iter().map(|t| t.elements() as u64).sum(),
                bytes_read: effort.bytes_read,
                bytes_written: outputs.model.len(),
                passes: effort.passes,
                seconds: elapsed.as_secs_f64(),
            },
        }
    }

    /// The final per-client record: every input exactly once.
    fn records(&self, d: &Decision) -> Vec<ClientMeasurement> {
        let clients = &self.clients;
        let weight_of: HashMap<usize, f64> = d
            .kept
            .iter()
            .zip(&d.weights)
            .map(|(&k, &w)| (d.live[k], w))
            .collect();
        let live_pos: HashMap<usize, usize> =
            d.live.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        let records: Vec<ClientMeasurement> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pos = live_pos.get(&i).copied();
                let left_out = pos.and_then(|p| d.left_out[p].clone());
                let (status, reason) = match (&c.dropped, left_out) {
                    (Some((s, r)), _) => (*s, Some(r.clone())),
                    (None, Some((s, r))) => (s, Some(r)),
                    (None, None) => (ClientStatus::Accepted, None),
                };
                ClientMeasurement {
                    client_id: c.meta.client_id.clone(),
                    status,
                    reason,
                    num_examples: c.num_examples,
                    llm_type: c.meta.llm_type.clone(),
                    quality: c.quality,
                    weight: weight_of.get(&i).copied(),
                    update_norm: pos.and_then(|p| d.norms.as_ref().map(|n| n[p])),
                    scale: pos.filter(|_| d.norms.is_some()).map(|p| d.scales[p]),
                }
            })
            .collect();
        // Every input appears exactly once: accepted ones are exactly the
        // combination set, every other one has a reason.
        debug_assert_eq!(records.len(), clients.len());
        debug_assert_eq!(
            records
                .iter()
                .filter(|r| r.status == ClientStatus::Accepted)
                .count(),
            d.kept.len()
        );
        debug_assert!(records
            .iter()
            .all(|r| (r.status == ClientStatus::Accepted) == r.reason.is_none()));
        records
    }
}
