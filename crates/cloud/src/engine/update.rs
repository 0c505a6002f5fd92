//! The stream path: one `updates` row at a time (at-least-once, maybe out of
//! order, maybe duplicated). Validate, count (a set ADD: replays are
//! harmless), and when every expected client is accounted for, claim the
//! round and aggregate; exactly one invocation wins the claim.

use super::aggregation::{participants, Closing};
use super::validate::{check_ids, CheckedUpdate, Refusal};
use super::{RoundEngine, UpdateOutcome};
use crate::bounded;
use crate::capacity;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::ports::{AddReceived, Callback, Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, RoundRecord, RoundResult, RoundStatus, UpdateRecord};

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// One INSERT from the `updates` stream.
    ///
    /// - `Rejected`: the row breaks a rule (the reason names it); recorded
    ///   in the round's rejections when the round exists and the row's
    ///   client is one of its expected clients. A row from any other client
    ///   is only reported (logged by the caller), never written into the
    ///   round it names. Also returned when this row completed the round but
    ///   no update at all was usable (the round is then FAILED and the
    ///   workflow told so).
    /// - `Late`: the round is past OPEN. A row that was already counted or
    ///   rejected (a replay) is not recorded again, so an earlier rejection
    ///   keeps its reason; a new one is recorded as late. If the stream path
    ///   closed the round, the stored result is sent to its task token
    ///   again unless this engine already did (see `resend_result`).
    /// - `Recorded`: counted; `usable` counts the usable updates so far.
    /// - `Aggregated`: this row completed the round and this engine closed it.
    ///
    /// A rejected expected client counts as "in" for completeness (it has
    /// one row per round, so it cannot send a better one): the round closes
    /// early once everyone is received or rejected and the usable updates
    /// reach min_clients; otherwise the deadline path decides.
    ///
    /// `Err` only for infrastructure failures (worth a stream retry).
    pub async fn on_update(&self, update: &UpdateRecord) -> Result<UpdateOutcome> {
        if let Err(reason) = check_ids(update) {
            return Ok(UpdateOutcome::Rejected(reason));
        }
        let (job_id, round, client) = (&update.job_id, update.round, &update.client_id);
        let Some(job) = self.ledger.get_job(job_id).await? else {
            return Ok(UpdateOutcome::Rejected(format!("job: no job `{job_id}`")));
        };
        let Some(row) = self.ledger.get_round(job_id, round).await? else {
            return Ok(UpdateOutcome::Rejected(format!(
                "round: job `{job_id}` has no round {round}"
            )));
        };
        // The row enters the engine here: checked once, against the round
        // it names. Only the count is kept (the aggregation reads the row
        // again, and checks what it reads then).
        match CheckedUpdate::check(update.clone(), &row) {
            // Whatever the round's state: a client cannot write into the
            // item of a round it is not part of, not even a rejection.
            Err(Refusal::NotExpected(reason)) => return Ok(UpdateOutcome::Rejected(reason)),
            _ if row.status != RoundStatus::Open => {
                return self.on_update_past_open(&job, &row, client).await;
            }
            Err(Refusal::BreaksRule(reason)) => {
                return self.reject_counted(&row, client, reason).await;
            }
            Ok(_) => {}
        }
        let after = match self.ledger.add_received(job_id, round, client).await? {
            AddReceived::Counted(after) => after,
            // Claimed between our read and our ADD. Whether the claimer
            // aggregates this client is whether `received` names it: a
            // concurrent delivery of this same row may have counted it
            // before the claim (then this one is a replay, not late).
            AddReceived::PastOpen(now) => {
                return self.on_update_past_open(&job, &now, client).await;
            }
        };
        let usable = participants(&after).len();
        let expected = after.expected_clients.len();
        let all_in = after
            .expected_clients
            .iter()
            .all(|c| after.received.contains(c) || after.rejections.contains_key(c));
        if !all_in || usable < after.min_clients as usize {
            return Ok(UpdateOutcome::Recorded { usable, expected });
        }
        self.claim_and_aggregate(&job, &after).await
    }

    /// Records why an expected client's row for an OPEN round is refused.
    async fn reject_counted(
        &self,
        row: &RoundRecord,
        client: &str,
        reason: String,
    ) -> Result<UpdateOutcome> {
        let reason = capacity::stored_reason(&reason, row.expected_clients.len());
        self.ledger
            .record_rejection(&row.job_id, row.round, client, &reason)
            .await?;
        Ok(UpdateOutcome::Rejected(reason))
    }

    /// A row of an expected client for a round that is AGGREGATING, CLOSED
    /// or FAILED.
    async fn on_update_past_open(
        &self,
        job: &Job,
        row: &RoundRecord,
        client: &str,
    ) -> Result<UpdateOutcome> {
        let reason = if row.received.contains(client) {
            format!(
                "replay: round {} is {:?} and this update was already counted",
                row.round, row.status
            )
        } else if let Some(earlier) = row.rejections.get(client) {
            // Already rejected for a rule while the round was OPEN: keep
            // that specific reason rather than overwrite it with "late".
            bounded::reason(&format!(
                "replay: round {} is {:?} and this update was already rejected ({earlier})",
                row.round, row.status
            ))
        } else {
            let reason = format!(
                "late: round {} is {:?}; updates are no longer accepted",
                row.round, row.status
            );
            let reason = capacity::stored_reason(&reason, row.expected_clients.len());
            self.ledger
                .record_rejection(&row.job_id, row.round, client, &reason)
                .await?;
            reason
        };
        // A stream retry after a crashed aggregator lands here: take over
        // once its lease has run out.
        let expired = row.lease_expires_at.is_some_and(|e| e < self.clock.now());
        if row.status == RoundStatus::Aggregating && expired {
            return self.claim_and_aggregate(job, row).await;
        }
        if let (RoundStatus::Closed, Some(token), Some(result)) =
            (row.status, &row.task_token, &row.result)
        {
            self.resend_result(row, token, result).await?;
        }
        Ok(UpdateOutcome::Late(reason))
    }

    /// The stream path closed this round, but its aggregator may have died
    /// (or had its `SendTaskSuccess` fail) after the CLOSED write and
    /// before the callback; the stream then redelivers the row that
    /// completed the round, and it lands here. Sending the stored result to
    /// the stored token finishes the StartRound task now instead of at its
    /// deadline (where CloseRound would return the same stored result).
    ///
    /// "Once" is Step Functions' own guarantee, not ours: a task token
    /// accepts one answer, and a call on an answered or timed-out token is
    /// refused (TaskTimedOut / InvalidToken), which the callback port
    /// reports as `WorkflowMovedOn`, not an error. No ledger flag could do
    /// better (an aggregator can die between sending and recording that it
    /// sent) and one would need a write per round. So a replay re-sends
    /// unless:
    /// - the deadline path closed the round: CloseRound runs only after the
    ///   StartRound task timed out, so that token is dead and the result
    ///   was CloseRound's own output;
    /// - this engine already had an answer on this token (it closed the
    ///   round and called back, or re-sent before): the common replay
    ///   right after a close costs nothing.
    ///
    /// A re-send that fails is an `Err`, so the stream retries the row.
    async fn resend_result(
        &self,
        row: &RoundRecord,
        token: &str,
        result: &RoundResult,
    ) -> Result<()> {
        if result.closed_by != ClosedBy::Stream
            || self.answered.contains(&row.job_id, row.round, token)
        {
            return Ok(());
        }
        let output = encode(result)?;
        let _: Callback = self.callback.succeed(token, &output).await?;
        self.answered.insert(&row.job_id, row.round, token);
        Ok(())
    }

    /// Claims the round (or takes over an expired lease) and, if this
    /// engine wins, aggregates and calls back the StartRound task.
    async fn claim_and_aggregate(&self, job: &Job, row: &RoundRecord) -> Result<UpdateOutcome> {
        let recorded = UpdateOutcome::Recorded {
            usable: participants(row).len(),
            expected: row.expected_clients.len(),
        };
        let Some(claimed) = self
            .ledger
            .claim_round(
                &row.job_id,
                row.round,
                &self.config.owner,
                self.clock.now(),
                self.config.lease_seconds,
            )
            .await?
        else {
            // Another invocation won: it aggregates and calls back.
            return Ok(recorded);
        };
        let token = claimed.task_token.clone();
        match self
            .aggregate_claimed(job, &claimed, ClosedBy::Stream)
            .await?
        {
            Closing::Closed(result) => {
                if let Some(token) = &token {
                    let output = encode(&result)?;
                    // WorkflowMovedOn: the deadline path owns the round now
                    // and will return the stored result itself.
                    let _: Callback = self.callback.succeed(token, &output).await?;
                    self.answered.insert(&claimed.job_id, claimed.round, token);
                }
                Ok(UpdateOutcome::Aggregated(result))
            }
            Closing::LeaseLost => Ok(recorded),
            Closing::Failed(failure) => {
                if let Some(token) = &token {
                    let name = failure.start_round_error_name();
                    let _: Callback = self
                        .callback
                        .fail(token, name.as_str(), &failure.to_string())
                        .await?;
                }
                Ok(UpdateOutcome::Rejected(bounded::reason(&format!(
                    "round {} failed: {failure}",
                    claimed.round
                ))))
            }
        }
    }
}

/// The round result as the task output.
fn encode(result: &RoundResult) -> Result<serde_json::Value> {
    serde_json::to_value(result)
        .map_err(|e| CloudError::Other(format!("encoding the round result: {e}")))
}
