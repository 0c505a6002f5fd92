//! The stream path: one `updates` row at a time (at-least-once, maybe out of
//! order, maybe duplicated). Validate, count (a set ADD: replays are
//! harmless), and when every expected client is accounted for, hand the
//! round over to the state machine, whose CloseRound task aggregates. A
//! stream invocation never reads a model: a constant number of ledger calls
//! per row, so it holds its stream shard for milliseconds whatever the
//! model size.

use super::aggregation::participants;
use super::carry::{ended_with, failed_at, LATE, PENDING};
use super::validate::{check_ids, CheckedUpdate, Refusal};
use super::{hand_over, RoundEngine, UpdateOutcome};
use crate::bounded;
use crate::capacity;
use crate::error::Result;
use crate::ports::{AddReceived, Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, RoundRecord, RoundStatus, UpdateRecord};

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
    ///   round it names.
    /// - `Late`: the round is past OPEN. A row that was already counted or
    ///   rejected (a replay) is not recorded again, so an earlier rejection
    ///   keeps its reason; a new one is recorded as late.
    /// - `Recorded`: counted; `usable` counts the usable updates so far.
    /// - `HandedOver`: with this row every expected client is in; the
    ///   StartRound task was answered (see hand_over.rs).
    ///
    /// A rejected expected client counts as "in" for completeness (it has
    /// one row per round, so it cannot send a better one): the round is
    /// handed over early once everyone is received or rejected and the
    /// usable updates reach min_clients; otherwise the deadline decides.
    ///
    /// `Err` only for infrastructure failures (worth a stream retry).
    pub async fn on_update(&self, update: &UpdateRecord) -> Result<UpdateOutcome> {
        if let Err(reason) = check_ids(update) {
            return Ok(UpdateOutcome::Rejected(reason));
        }
        let (job_id, round, client) = (&update.job_id, update.round, &update.client_id);
        // A round row exists only under its job's header (start_round writes
        // the header first), so the job is read only to word a refusal: the
        // common path is two ledger calls, the round's read and its ADD.
        let Some(row) = self.ledger.get_round(job_id, round).await? else {
            if self.ledger.get_job(job_id).await?.is_none() {
                return Ok(UpdateOutcome::Rejected(format!("job: no job `{job_id}`")));
            }
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
                return self.on_update_past_open(&row, client).await;
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
                return self.on_update_past_open(&now, client).await;
            }
        };
        let expected = after.expected_clients.len();
        let Some(usable) = hand_over::ready(&after) else {
            let usable = participants(&after).len();
            return Ok(UpdateOutcome::Recorded { usable, expected });
        };
        if let Some(token) = &after.task_token {
            self.hand_over(&after, token, ClosedBy::Stream).await?;
        }
        Ok(UpdateOutcome::HandedOver { usable, expected })
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
    /// or FAILED. An async version's late row waits to be carried into the
    /// next version (carry.rs).
    async fn on_update_past_open(&self, row: &RoundRecord, client: &str) -> Result<UpdateOutcome> {
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
            let reason = match row.buffer {
                None => format!(
                    "{LATE} round {} is {:?}; updates are no longer accepted",
                    row.round, row.status
                ),
                // A FAILED version failed the job: nothing follows it.
                Some(_) if row.status == RoundStatus::Failed => format!(
                    "{LATE} version {} is {:?}; {}",
                    row.round,
                    row.status,
                    failed_at(row.round)
                ),
                // The job's last version: no later one will carry it.
                Some(_) if row.result.as_ref().is_some_and(|r| !r.continue_training) => format!(
                    "{LATE} version {} is {:?}; {}",
                    row.round,
                    row.status,
                    ended_with(row.round)
                ),
                Some(_) => format!(
                    "{LATE} version {} is {:?}; {PENDING}",
                    row.round, row.status
                ),
            };
            let reason = capacity::stored_reason(&reason, row.expected_clients.len());
            self.ledger
                .record_rejection(&row.job_id, row.round, client, &reason)
                .await?;
            // Recorded as waiting first, then looked at: a StartRound that
            // runs after this record sees it (carry.rs).
            match row.buffer {
                Some(buffer) if reason.ends_with(PENDING) => self
                    .settle_if_never_carried(row, client, buffer.max_staleness)
                    .await?
                    .unwrap_or(reason),
                _ => reason,
            }
        };
        Ok(UpdateOutcome::Late(reason))
    }
}
