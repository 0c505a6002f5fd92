//! One shard's combine pass: the decided combination over the shard's
//! stripes, through the combiner, the noise and the server optimizer,
//! written as the shard's parts of the new global model and of the state.

use serde::{Deserialize, Serialize};

use super::decide::{Decision, StepError};
use super::prepare::{specs, Prepared};
use crate::bytes::OutputTarget;
use crate::combine::{self, CombineError, CombinePlan, OptimizerIo};
use crate::error::AggregateError;
use crate::personalization::masked_mean::Tally;
use crate::personalization::Personalization;
use crate::shard::{Part, PartDest, ShardOutput, PART_BYTES};
use crate::stream::Source;
use crate::writer::{ModelWriter, OutputLayout};

/// Where every byte of the round's outputs goes, and who writes it.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub model: OutputLayout,
    pub model_parts: Vec<Part>,
    /// The stages' state, when some stage keeps state and the request
    /// names where it goes.
    pub state: Option<StateOutput>,
}

#[derive(Debug, Clone)]
pub struct StateOutput {
    pub layout: OutputLayout,
    pub parts: Vec<Part>,
    /// The step the state is written at (1 after the first round).
    pub step: u64,
}

/// What one shard's combine pass did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardDone {
    pub bytes_read: u64,
    /// FedSelect: what the shard's masks said.
    pub tally: Option<Tally>,
}

impl Prepared<'_> {
    /// The outputs' layouts and parts for `decision` (the state's header
    /// holds the stages' next scalars, so it is known only once decided).
    pub fn outputs(&self, decision: &Decision) -> Result<Outputs, AggregateError> {
        let setup = &self.setup;
        let req = setup.req;
        let model = OutputLayout::new(&specs(&setup.reference), &setup.metadata)
            .map_err(|e| output_error(req.out, e))?;
        let model_parts = setup
            .shards
            .parts(
                &setup.reference,
                &model,
                |t| vec![(t.name.clone(), t.dtype)],
                PART_BYTES,
            )
            .map_err(|e| output_error(req.out, std::io::Error::other(e)))?;
        let state = match req.state_out.filter(|_| !setup.state.is_empty()) {
            Some(target) => {
                let step = setup.state_in.as_ref().map_or(0, |s| s.step) + 1;
                let next = decision
                    .next_state
                    .iter()
                    .filter_map(|(kind, scalars)| {
                        let kind = setup.pipeline.stages().find(|s| s.kind() == kind)?.kind();
                        Some((kind, scalars.clone()))
                    })
                    .collect();
                let layout = setup
                    .state
                    .output_layout(&setup.reference, step, &next)
                    .map_err(|e| output_error(target, e))?;
                let parts = setup
                    .shards
                    .parts(
                        &setup.reference,
                        &layout,
                        |t| setup.state.tensors_of(t),
                        PART_BYTES,
                    )
                    .map_err(|e| output_error(target, std::io::Error::other(e)))?;
                Some(StateOutput {
                    layout,
                    parts,
                    step,
                })
            }
            None => None,
        };
        Ok(Outputs {
            model,
            model_parts,
            state,
        })
    }

    /// Shard `shard`'s combine pass: writes its parts of the model to
    /// `model` and of the state to `state` (required when `outputs` has a
    /// state). Every part of the shard is written whole, or this fails.
    pub fn combine_shard(
        &self,
        decision: &Decision,
        outputs: &Outputs,
        shard: usize,
        model: PartDest,
        state: Option<PartDest>,
    ) -> Result<ShardDone, StepError> {
        let setup = &self.setup;
        let (req, pipeline) = (setup.req, setup.pipeline);
        let d = decision;
        self.check_decision(d)?;
        let inputs = self.inputs(&d.live);
        let kept_inputs: Vec<&Source> = d.kept.iter().map(|&i| inputs[i]).collect();
        let kept_scales: Vec<f64> = d.kept.iter().map(|&i| d.scales[i]).collect();
        let noise = match (&pipeline.noise, &d.noise_key) {
            (Some(n), Some(key)) => {
                Some(n.for_round(d.norm_bound, d.max_weight(), req.round, key).0)
            }
            (Some(_), None) => {
                return Err(StepError::Fatal(AggregateError::Config(
                    "the decision has no noise key, the pipeline has a noise stage".into(),
                )))
            }
            _ => None,
        };
        let model_out = ShardOutput::new(&outputs.model_parts, shard, model);
        let writer = ModelWriter::create_with(&model_out, outputs.model.clone())
            .map_err(|e| output_error(req.out, e))?;
        let state_writer = match (&outputs.state, state, req.state_out) {
            (Some(s), Some(dest), Some(target)) => {
                let out = ShardOutput::new(&s.parts, shard, dest);
                Some(
                    ModelWriter::create_with(&out, s.layout.clone())
                        .map_err(|e| output_error(target, e))?,
                )
            }
            (None, _, _) => None,
            _ => {
                return Err(StepError::Fatal(AggregateError::Config(
                    "the state is written, but no destination was given for it".into(),
                )))
            }
        };
        let (round_combiner, _) = pipeline.combiner.for_round(d.kept.len(), req.round);
        let plan = CombinePlan {
            reference: &setup.reference,
            stripes: setup.shards.shard(shard),
            carry_source: setup.global.as_ref().unwrap_or(kept_inputs[0]),
            global: setup.global.as_ref(),
            inputs: kept_inputs,
            coefs: d
                .weights
                .iter()
                .zip(&kept_scales)
                .map(|(w, s)| w * s)
                .collect(),
            scales: kept_scales,
            combiner: pipeline.combiner.as_ref(),
            round_combiner,
            noise: noise.as_deref(),
            // A stateful optimizer always has a state writer (prepare
            // refuses a stateful pipeline without a state destination);
            // server SGD (FedAvgM without momentum) has no slots to write.
            optimizer: pipeline.optimizer.as_ref().map(|optimizer| OptimizerIo {
                optimizer: optimizer.as_ref(),
                slots: optimizer.state().map_or(&[], |s| s.tensor_slots),
                state_in: setup.state_in.as_ref().map(|s| &s.source),
                state_out: state_writer.as_ref(),
            }),
            out: &writer,
            block_elems: self.block_size(inputs.len()),
            masked_weights: (setup.cfg.personalization() == Personalization::Fedselect)
                .then(|| d.weights.clone()),
        };
        let kept_live: Vec<usize> = d.kept.iter().map(|&k| d.live[k]).collect();
        let done = match combine::run(plan) {
            Ok(done) => done,
            Err(CombineError::Input(e)) => return Err(self.reject_for(e, &kept_live)),
            Err(CombineError::Write(source)) => return Err(output_error(req.out, source).into()),
            Err(CombineError::Overflow { tensor, index }) => {
                return Err(StepError::Fatal(AggregateError::NoUsableUpdate(format!(
                    "the new global model's `{tensor}` element {index} is not finite although every input is: \
                     the combination, the noise, the server optimizer or the tensor's dtype overflowed; \
                     nothing was written"
                ))))
            }
            Err(CombineError::State(reason)) => {
                return Err(StepError::Fatal(AggregateError::ServerState {
                    name: self.state_in_name(),
                    reason,
                }))
            }
        };
        // Each writer checks that the shard wrote every byte of its parts.
        writer.finish().map_err(|e| output_error(req.out, e))?;
        if let (Some(w), Some(target)) = (state_writer, req.state_out) {
            w.finish().map_err(|e| output_error(target, e))?;
        }
        Ok(ShardDone {
            bytes_read: done.bytes_read,
            tally: done.tally,
        })
    }
}

pub(super) fn output_error(target: &dyn OutputTarget, source: std::io::Error) -> AggregateError {
    AggregateError::Output {
        name: target.describe(),
        source,
    }
}
