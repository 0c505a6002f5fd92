//! A round's aggregation as the workflow runs it (issue #14): PlanRound →
//! (a statistics Map → DecideRound, when a stage needs norms) → a Map of
//! AggregateShard tasks → CommitRound, each a task of its own that may run
//! in its own process (a Lambda of the Map, or a local worker). One shard
//! is the ordinary case of the same path. [`RoundEngine::close_round`]
//! runs the same steps in this process, one after the other.
//!
//! Exactly once: the plan claims the round under a lease named after the
//! attempt; every later task checks the attempt still holds it, writes
//! only the attempt's own objects (its folder, its uploads' parts) and is
//! safe to run again; only the commit makes anything visible, and it
//! closes the round conditionally on the lease.

mod attempt;
mod commit;
mod plan;
mod tasks;

pub use commit::CommitOutcome;
pub use plan::PlanOutcome;
pub use tasks::ShardTaskDone;

pub(super) use attempt::{get_json, put_bytes, put_json};
pub(super) use tasks::blocking;

use fedstep_core::AggregateError;

use crate::error::CloudError;

/// The core's failures as the engine reports them: the store's (reading
/// or writing) are the system's, worth retrying.
pub(super) fn core_error(e: AggregateError) -> CloudError {
    match e {
        AggregateError::Unavailable { name, reason } => {
            CloudError::Transient(format!("reading `{name}`: {reason}"))
        }
        AggregateError::Output { name, source } => {
            CloudError::Transient(format!("writing `{name}`: {source}"))
        }
        e => e.into(),
    }
}
