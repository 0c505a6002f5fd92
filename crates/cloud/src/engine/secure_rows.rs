//! The stream path of a secure round (issue #18): one phase row at a time,
//! as the `updates` stream delivers it (at least once, maybe out of order).
//! As for update rows, a constant number of ledger calls per row and no
//! object read: check, count (a set ADD), and when every client the open
//! phase waits for is in, answer the task token the phase step registered
//! (`secure_phase.rs`), so the workflow closes the phase at once instead of
//! at its deadline.

use super::validate::{check_client_and_job, check_schema};
use super::{RoundEngine, UpdateOutcome};
use crate::bounded;
use crate::error::Result;
use crate::keys;
use crate::ports::{AddReceived, Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, HandOver, RoundRecord, RoundStatus, SecurePhase, SecureRow};

/// The rules a phase row must pass against the round it names, beyond
/// its ids; every reason is bounded. The message itself is the protocol's
/// to judge (it excludes its sender with a reason when it is malformed).
pub(super) fn check_secure_row(row: &SecureRow, round: &RoundRecord) -> Result<(), String> {
    let want = keys::secure_job_round(&round.job_id, round.round, row.phase);
    if row.job_round != want {
        return Err(bounded::reason(&format!(
            "job_round: {} does not match job `{}`, round {} and phase {} (want {want})",
            bounded::quote(&row.job_round),
            round.job_id,
            round.round,
            row.phase
        )));
    }
    if row.message.len() > SecureRow::MAX_MESSAGE_BYTES {
        return Err(format!(
            "message: {} bytes, more than the {} a phase message may hold",
            row.message.len(),
            SecureRow::MAX_MESSAGE_BYTES
        ));
    }
    check_schema(row.schema)
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// One phase row from the `updates` stream.
    ///
    /// - `Rejected`: not attributable to a secure round this client takes
    ///   part in (nothing is written into any round), or it breaks a rule:
    ///   then the reason is recorded and the row still counts as in, so the
    ///   phase does not wait for a better one (the phase's close refuses
    ///   it with the same reason).
    /// - `Late`: its phase has closed, or the round is past OPEN; the close
    ///   took what it took, so nothing is recorded.
    /// - `Recorded`: counted; `usable` of `expected` rows the phase waits
    ///   for are in.
    /// - `HandedOver`: with this row the phase has every row it waits for;
    ///   its task token was answered.
    pub async fn on_secure_row(&self, secure_row: &SecureRow) -> Result<UpdateOutcome> {
        let (job_id, round, client) = (&secure_row.job_id, secure_row.round, &secure_row.client_id);
        if let Err(reason) = check_client_and_job(client, job_id, round) {
            return Ok(UpdateOutcome::Rejected(reason));
        }
        let Some(row) = self.ledger.get_round(job_id, round).await? else {
            return Ok(UpdateOutcome::Rejected(format!(
                "round: job `{job_id}` has no round {round}"
            )));
        };
        if row.secure_awaiting.is_none() {
            return Ok(UpdateOutcome::Rejected(format!(
                "round: round {round} of job `{job_id}` is not a secure round"
            )));
        }
        if !row.expected_clients.contains(client) {
            return Ok(UpdateOutcome::Rejected(format!(
                "client: `{client}` is not a client of round {round} of job `{job_id}`"
            )));
        }
        if row.status != RoundStatus::Open {
            return Ok(UpdateOutcome::Late(format!(
                "late: round {round} is {:?}",
                row.status
            )));
        }
        let open = SecurePhase::ALL.get(row.secure_closed.len()).copied();
        if open != Some(secure_row.phase) {
            let now = open.map_or("none".to_string(), |p| p.to_string());
            return Ok(if open.is_some_and(|o| secure_row.phase > o) {
                UpdateOutcome::Rejected(format!(
                    "phase: {} is not open yet (the open phase is {now})",
                    secure_row.phase
                ))
            } else {
                UpdateOutcome::Late(format!(
                    "late: phase {} has closed (the open phase is {now})",
                    secure_row.phase
                ))
            });
        }
        let broken = check_secure_row(secure_row, &row).err();
        if let Some(reason) = &broken {
            let reason = bounded::reason(&format!(
                "secure aggregation, phase {}: {reason}",
                secure_row.phase
            ));
            self.ledger
                .record_rejection(job_id, round, client, &reason)
                .await?;
        }
        let after = match self
            .ledger
            .add_secure_received(job_id, round, secure_row.phase, client)
            .await?
        {
            AddReceived::Counted(after) => after,
            AddReceived::PastOpen(now) => {
                return Ok(UpdateOutcome::Late(format!(
                    "late: round {round} is {:?}",
                    now.status
                )))
            }
        };
        let handed_over = self.secure_hand_over_if_complete(&after).await?;
        let (usable, expected) = awaited_counts(&after);
        Ok(match (broken, handed_over) {
            (Some(reason), _) => UpdateOutcome::Rejected(reason),
            (None, true) => UpdateOutcome::HandedOver { usable, expected },
            (None, false) => UpdateOutcome::Recorded { usable, expected },
        })
    }

    /// Answers the open phase's task token when every row it waits for is
    /// in; whether it did (or had).
    pub(super) async fn secure_hand_over_if_complete(&self, row: &RoundRecord) -> Result<bool> {
        let (Some(_), Some(token)) = (row.secure_phase_complete(), &row.task_token) else {
            return Ok(false);
        };
        let (usable, expected) = awaited_counts(row);
        let hand_over = HandOver {
            job_id: row.job_id.clone(),
            round: row.round,
            closed_by: ClosedBy::Stream,
            usable,
            expected,
        };
        self.answer(token, &hand_over).await?;
        Ok(true)
    }
}

/// Rows in, of the rows the open phase waits for.
fn awaited_counts(row: &RoundRecord) -> (usize, usize) {
    row.secure_awaiting.as_ref().map_or((0, 0), |a| {
        let usable = a
            .clients
            .iter()
            .filter(|c| row.secure_row_received(a.phase, c))
            .count();
        (usable, a.clients.len())
    })
}
