//! One aggregation: weigh the updates, validate them, run the statistics
//! pass if a stage needs norms or distances, decide the round, then the
//! combine pass that writes the new global model — per shard.
//!
//! A bad update never sinks the round: claims, headers, shapes and values
//! are checked and the offender is rejected with a reason. Values are
//! checked while streaming; when a pass finds a bad value mid-way, the
//! offender is rejected and the attempt restarts without it (nothing is
//! visible before every shard is done). Bad input is rare, so the common
//! path reads every input exactly once.
//!
//! The steps are the tasks of a sharded aggregation, each callable on its
//! own from an opened attempt ([`prepare()`] → [`Prepared`]): a shard's
//! statistics ([`Prepared::statistics`]), the decision from all of them
//! ([`Prepared::decide`], plain data), the outputs' parts
//! ([`Prepared::outputs`]), a shard's combine pass
//! ([`Prepared::combine_shard`]) and the record ([`Prepared::outcome`]).
//! [`aggregate_sharded`] runs them in this process, one shard after the
//! other; the workflow runs the same steps as tasks on many Lambdas.

mod decide;
mod prepare;
mod records;
mod shard_pass;

use std::collections::BTreeMap;
use std::time::Instant;

pub use decide::{Decision, ShardStatistics, StepError};
pub use prepare::{prepare, Prepared, Sharding};
pub use records::Effort;
pub use shard_pass::{Outputs, ShardDone, StateOutput};

use crate::bytes::{Input, OutputTarget};
use crate::config::PipelineConfig;
use crate::error::AggregateError;
use crate::measurements::Measurements;
use crate::shard::{InPlace, PartDest};
use crate::update_meta::UpdateSource;
use shard_pass::output_error;

pub struct AggregationRequest<'a> {
    pub updates: &'a [UpdateSource],
    /// The model the clients trained from. Needed by clipping, zeroing and
    /// server optimizers; without it the updates' own tensors are the
    /// reference and integer tensors come from the first accepted update.
    pub global: Option<Input>,
    pub config: &'a PipelineConfig,
    pub out: &'a dyn OutputTarget,
    /// The stages' state from the previous round (none: every stage starts
    /// afresh). Read only when some stage keeps state.
    pub state_in: Option<Input>,
    /// Where to write the stages' new state: required when some stage keeps
    /// state, and written only then.
    pub state_out: Option<&'a dyn OutputTarget>,
    /// The round number: keys the DP noise stream so rounds never share noise.
    pub round: u64,
}

#[derive(Debug)]
pub struct AggregationOutcome {
    pub measurements: Measurements,
}

pub fn aggregate(req: &AggregationRequest<'_>) -> Result<AggregationOutcome, AggregateError> {
    aggregate_sharded(req, 1)
}

/// [`aggregate`] with the model cut into at most `shards` shards (see
/// `shard`), each run as its own statistics and combine pass over its
/// stripes and written as its own parts of the outputs, one after another
/// in this process. The outputs are the same bit for bit whatever
/// `shards` is; this is what the workflow's shard tasks do across Lambdas,
/// and how that promise is tested.
pub fn aggregate_sharded(
    req: &AggregationRequest<'_>,
    shards: usize,
) -> Result<AggregationOutcome, AggregateError> {
    let started = Instant::now();
    let mut rejected: BTreeMap<usize, String> = BTreeMap::new();
    let mut effort = Effort::default();
    loop {
        let sharding = Sharding {
            shards,
            min_shard_bytes: 0,
        };
        let attempt = prepare(req, sharding, &rejected)?;
        match run_attempt(req, &attempt, &mut effort) {
            Ok(outcome) => {
                let (decision, outputs, done) = outcome;
                return Ok(attempt.outcome(&decision, &outputs, &done, effort, started.elapsed()));
            }
            Err(StepError::Reject { input, reason }) => {
                rejected.insert(input, reason);
            }
            Err(StepError::Fatal(e)) => return Err(e),
        }
    }
}

/// Every step of one attempt, in this process; the outputs become visible
/// (the state first: a model whose state is missing would restart the
/// optimizer's moments) only once every shard wrote its parts.
fn run_attempt(
    req: &AggregationRequest<'_>,
    attempt: &Prepared<'_>,
    effort: &mut Effort,
) -> Result<(Decision, Outputs, Vec<ShardDone>), StepError> {
    let shards = attempt.shards().len();
    let mut stats = Vec::new();
    if attempt.needs_statistics() {
        effort.passes += 1;
        for shard in 0..shards {
            let s = attempt.statistics(shard)?;
            effort.bytes_read += s.bytes_read;
            stats.push(s);
        }
    }
    let decision = attempt.decide(&stats)?;
    let outputs = attempt.outputs(&decision)?;
    let model =
        InPlace::create(req.out, outputs.model.len()).map_err(|e| output_error(req.out, e))?;
    let state = match (&outputs.state, req.state_out) {
        (Some(s), Some(target)) => Some((
            target,
            InPlace::create(target, s.layout.len()).map_err(|e| output_error(target, e))?,
        )),
        _ => None,
    };
    effort.passes += 1;
    let mut done = Vec::with_capacity(shards);
    for shard in 0..shards {
        let d = attempt.combine_shard(
            &decision,
            &outputs,
            shard,
            PartDest::InPlace(model.clone()),
            state.as_ref().map(|(_, s)| PartDest::InPlace(s.clone())),
        )?;
        effort.bytes_read += d.bytes_read;
        done.push(d);
    }
    if let Some((target, s)) = state {
        s.finish().map_err(|e| output_error(target, e))?;
    }
    model.finish().map_err(|e| output_error(req.out, e))?;
    Ok((decision, outputs, done))
}
