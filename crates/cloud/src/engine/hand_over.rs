//! The hand-over: how the StartRound task is answered. The stream path
//! answers it once every expected client is in; the state machine then
//! runs CloseRound, which aggregates. Nothing is written to the ledger
//! before answering, so a lost answer (a crash before it, a failed call)
//! leaves the round OPEN and complete, and the next attempt (the stream's
//! retry of the row, a retried StartRound) answers again.
//!
//! Step Functions takes one answer per token: a second hand-over (a racing
//! delivery, a row counted after the first) is refused as
//! `WorkflowMovedOn`, which is no error, and one this engine already sent
//! is not sent again.

use super::aggregation::participants;
use super::RoundEngine;
use crate::error::{CloudError, Result};
use crate::ports::{Callback, Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, HandOver, RoundRecord};

/// The usable updates of a round that is ready to be handed over: every
/// expected client received or rejected, and at least min_clients usable.
/// (A rejected client counts as in: it has one row per round, so it cannot
/// send a better one.) An async round (a version's buffer) is also ready
/// as soon as its K usable updates are in.
pub(super) fn ready(row: &RoundRecord) -> Option<usize> {
    let usable = participants(row).len();
    if row.buffer.is_some_and(|b| usable >= b.size as usize) {
        return Some(usable);
    }
    let all_in = row
        .expected_clients
        .iter()
        .all(|c| row.received.contains(c) || row.rejections.contains_key(c));
    (all_in && usable >= row.min_clients as usize).then_some(usable)
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Answers `token` (the round's StartRound task) with a [`HandOver`].
    pub(super) async fn hand_over(
        &self,
        row: &RoundRecord,
        token: &str,
        closed_by: ClosedBy,
    ) -> Result<()> {
        let hand_over = HandOver {
            job_id: row.job_id.clone(),
            round: row.round,
            closed_by,
            usable: participants(row).len(),
            expected: row.expected_clients.len(),
        };
        self.answer(token, &hand_over).await
    }

    /// Answers `token` with `hand_over`, unless this engine already did.
    pub(super) async fn answer(&self, token: &str, hand_over: &HandOver) -> Result<()> {
        let (job_id, round) = (&hand_over.job_id, hand_over.round);
        if self.answered.contains(job_id, round, token) {
            return Ok(());
        }
        let output = serde_json::to_value(hand_over)
            .map_err(|e| CloudError::Other(format!("encoding the hand-over: {e}")))?;
        let _: Callback = self.callback.succeed(token, &output).await?;
        self.answered.insert(job_id, round, token);
        Ok(())
    }
}
