//! The round engine: the round protocol of docs/design.md §3, written once over
//! the ports so the Lambda, the emulator worker and `fedstep simulate` run
//! the very same code.
//!
//! Every step is safe to retry and to run concurrently with itself: state
//! changes go through the ledger's conditional writes (open, claim with a
//! lease, close by owner) and object keys are deterministic.

mod aggregation;
mod answered;
mod async_stop;
mod carry;
mod close;
mod finalize;
mod hand_over;
mod metrics;
mod report_failure;
mod scaffold;
mod secure_phase;
mod secure_rows;
mod sharded;
mod start;
mod stop_rule;
mod update;
mod validate;

pub use finalize::UNTYPED;
pub use secure_phase::{read_secure_document, SecurePhaseOutcome};
pub use sharded::{CommitOutcome, PlanOutcome, ShardTaskDone};

use std::sync::Arc;

use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::round_figures::RoundFigures;
use answered::Answered;

/// Told of every round this engine closed (not of rounds another engine
/// closed, nor of failed ones: those end the execution, which Step
/// Functions reports). Called once per close, after the CLOSED write.
pub type RoundObserver = Arc<dyn Fn(&RoundFigures) + Send + Sync>;

/// The default read-ahead budget: 96 MiB, well inside the smallest
/// Lambda memory that holds the aggregator, and a few windows of a few MiB
/// per input for up to a dozen inputs (ranged GETs of that size run near
/// S3's per-connection throughput). 128 MiB put the aggregation's peak RSS
/// at 263 MB for 8 × 100 MB inputs (`fedstep bench round`), over #14's
/// 256 MB target; the other ~130 MB are the output's parts in flight, the
/// core's blocks and the process itself.
pub const DEFAULT_READ_AHEAD_BYTES: u64 = 96 << 20;

/// Where and as whom an engine works.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How many bytes the aggregation may fetch ahead of its readers, over
    /// all inputs together (the engine needs no scratch directory: inputs
    /// are read in place and outputs written straight to the store). See
    /// [`DEFAULT_READ_AHEAD_BYTES`].
    pub read_ahead_bytes: u64,
    /// Lease owner name; unique per engine instance (e.g. a Lambda request id).
    pub owner: String,
    /// How long a claim on a round is held before another engine may take
    /// over. Must exceed the longest aggregation (Lambda: its timeout).
    pub lease_seconds: i64,
}

/// What became of one row from the `updates` stream.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    /// Counted; the round waits for more. `usable`: the round's updates
    /// counted and not rejected so far, of `expected` clients.
    Recorded { usable: usize, expected: usize },
    /// This row completed the round: the StartRound task was answered with
    /// a [`HandOver`](crate::records::HandOver) (or had been already), and
    /// the state machine's CloseRound aggregates.
    HandedOver { usable: usize, expected: usize },
    /// The row breaks a rule (named in the reason); the round goes on.
    Rejected(String),
    /// The round is no longer OPEN (or the row is a replay of a counted one).
    Late(String),
}

pub struct RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    store: S,
    ledger: L,
    notifier: N,
    callback: C,
    clock: K,
    config: EngineConfig,
    /// Task tokens this engine already had an answer on.
    answered: Answered,
    round_observer: Option<RoundObserver>,
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    pub fn new(
        store: S,
        ledger: L,
        notifier: N,
        callback: C,
        clock: K,
        config: EngineConfig,
    ) -> Self {
        RoundEngine {
            store,
            ledger,
            notifier,
            callback,
            clock,
            config,
            answered: Answered::default(),
            round_observer: None,
        }
    }

    /// Calls `observer` with the figures of each round this engine closes.
    pub fn observe_rounds(mut self, observer: RoundObserver) -> Self {
        self.round_observer = Some(observer);
        self
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn ledger(&self) -> &L {
        &self.ledger
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }
}
