//! Async jobs: a row that reaches its version after the version was
//! claimed (late) is carried into the next version that opens, so a slow
//! client's update is not lost to the race with the fast clients that
//! filled the buffer. The carried row is a copy of the client's row: the
//! same object (its key stays the late version's), checksum and claims,
//! with `base_round` still naming the version it was trained from; it
//! arrives through the stream like any row and is counted, or rejected as
//! stale, there.
//!
//! The stream path only records the row as late, with a reason that says
//! it is waiting ([`PENDING`]): it has no write access to the updates table
//! (infra: the stream role reads the table only through its stream).
//! StartRound of each version carries every row still waiting in the
//! versions before it (max_staleness + 1 back: a row late for an older
//! version would be stale; at most [`MAX_LOOK_BACK`]) and then rewrites the reason to say where it went, so
//! a row recorded late after one StartRound looked is carried by the next,
//! and none is carried twice. A crash between the copy and the rewrite
//! repeats the copy on StartRound's retry: a conditional put of identical
//! content, harmless. A client that already has a row in the version
//! keeps it (one row per version); the late update then stays rejected,
//! with that reason.
//!
//! No version follows the job's last one, so nothing carries its late
//! rows: Finalize settles every row still waiting in the versions it
//! looks back over ([`RoundEngine::settle_late_rows_at_end`]), and a row
//! late for the last version after that is recorded as such at once
//! (update.rs). A row recorded as waiting that no StartRound still to run
//! would carry (the job ended, or versions moved on past every later
//! StartRound's look-back) is settled by the stream path right after it
//! is recorded ([`RoundEngine::settle_if_never_carried`]). Every update of
//! a job that finishes is thus counted in one version or rejected with a
//! reason that is final; only a failed job can leave rows waiting.

use super::RoundEngine;
use crate::asynchronous::AsyncSettings;
use crate::bounded;
use crate::capacity;
use crate::error::{CloudError, Result};
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, PutUpdate, StreamingStore, TaskCallback};
use crate::records::{RoundRecord, RoundStatus, UpdateRecord};

/// How a late rejection's reason starts.
pub(super) const LATE: &str = "late:";
/// What an async version's late reason ends with until StartRound of a
/// later version carries the row.
pub(super) const PENDING: &str = "waiting to be carried into the next version";
/// Versions StartRound looks back for late rows: max_staleness + 1 for the
/// largest max_staleness a job may set, so every row a version could
/// accept is carried.
pub(super) const MAX_LOOK_BACK: u32 = AsyncSettings::STALENESS_CAP + 1;

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// StartRound of async version `round`: carries the rows waiting in
    /// the `look_back` versions before it.
    pub(super) async fn carry_late_rows_into(
        &self,
        job_id: &str,
        round: u32,
        look_back: u32,
    ) -> Result<()> {
        let first = round.saturating_sub(look_back.min(MAX_LOOK_BACK)).max(1);
        for previous in first..round {
            let Some(prev) = self.ledger.get_round(job_id, previous).await? else {
                continue;
            };
            let waiting: Vec<&String> = prev
                .rejections
                .iter()
                .filter(|(_, reason)| reason.starts_with(LATE) && reason.ends_with(PENDING))
                .map(|(c, _)| c)
                .collect();
            for client in waiting {
                let row = match self.ledger.get_update(client, job_id, previous).await {
                    Ok(Some(row)) => row,
                    Ok(None) => continue,
                    // A row that no longer decodes is the client's: not carried.
                    Err(CloudError::Invalid(_)) => continue,
                    Err(e) => return Err(e),
                };
                let went = match self.put_carried(&row, round).await? {
                    PutUpdate::Created | PutUpdate::AlreadyThere => {
                        format!("carried into version {round}")
                    }
                    PutUpdate::Conflict(_) => {
                        format!("not carried: the client has its own row in version {round}")
                    }
                };
                let reason = bounded::reason(&format!(
                    "{LATE} version {previous} was being aggregated when it arrived; {went}"
                ));
                self.ledger
                    .record_rejection(job_id, previous, client, &reason)
                    .await?;
            }
        }
        Ok(())
    }

    /// Finalize (or ReportFailure) of an async job that ended with
    /// version `last`: every row still waiting to be carried in the
    /// versions up to `last` is rejected for good, with a reason that ends
    /// with `why` ([`ended_with`], [`failed_at`]). Idempotent (a retry
    /// finds nothing waiting).
    pub(super) async fn settle_late_rows_at_end(
        &self,
        job_id: &str,
        last: u32,
        why: &str,
    ) -> Result<()> {
        let first = last.saturating_sub(MAX_LOOK_BACK).max(1);
        for version in first..=last {
            let Some(row) = self.ledger.get_round(job_id, version).await? else {
                continue;
            };
            for (client, reason) in &row.rejections {
                if reason.starts_with(LATE) && reason.ends_with(PENDING) {
                    let reason = bounded::reason(&format!(
                        "{LATE} version {version} was being aggregated when it arrived; {why}"
                    ));
                    self.ledger
                        .record_rejection(job_id, version, client, &reason)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// The stream path, just after recording `client`'s row in async
    /// version `late.round` as waiting: whether any StartRound still to
    /// run will carry it. None will when the job has already ended, or when
    /// versions have moved on so far that every later StartRound looks
    /// back past it (a row trained from an old version that reaches the
    /// ledger long after). Then the row gets its final reason now, and
    /// that reason is returned. Otherwise `None`: the next StartRound
    /// carries it, or Finalize settles it (both read the rejection after
    /// it was recorded, so neither misses it).
    ///
    /// At most `look_back + 1` reads of round rows, and only for late rows.
    pub(super) async fn settle_if_never_carried(
        &self,
        late: &RoundRecord,
        client: &str,
        max_staleness: u32,
    ) -> Result<Option<String>> {
        let (job_id, version) = (&late.job_id, late.round);
        let look_back = max_staleness.saturating_add(1).min(MAX_LOOK_BACK);
        let mut newest = None;
        for next in version.saturating_add(1)..=version.saturating_add(look_back) {
            match self.ledger.get_round(job_id, next).await? {
                Some(row) => newest = Some(row),
                None => break,
            }
        }
        let Some(newest) = newest else {
            return Ok(None);
        };
        let ended = newest.status == RoundStatus::Closed
            && newest.result.as_ref().is_some_and(|r| !r.continue_training);
        let why = if ended {
            ended_with(newest.round)
        } else if newest.status == RoundStatus::Failed {
            // A FAILED version fails the job: no version follows it.
            failed_at(newest.round)
        } else if newest.round >= version.saturating_add(look_back) {
            // StartRound of `newest` looked back to `version` before this
            // row was recorded, and every later one starts after it. (Were
            // that StartRound still running and carrying it, the copy in
            // `newest` would be at least `look_back` = max_staleness + 1
            // versions stale there, so rejected as stale: max_staleness is
            // at most STALENESS_CAP, within the look-back.)
            format!(
                "version {} had already opened, and a version carries late rows from at most \
                 {look_back} versions back",
                newest.round
            )
        } else {
            return Ok(None);
        };
        let reason = capacity::stored_reason(
            &format!("{LATE} version {version} was being aggregated when it arrived; {why}"),
            late.expected_clients.len(),
        );
        self.ledger
            .record_rejection(job_id, version, client, &reason)
            .await?;
        Ok(Some(reason))
    }

    async fn put_carried(&self, row: &UpdateRecord, into: u32) -> Result<PutUpdate> {
        let carried = UpdateRecord {
            round: into,
            job_round: keys::job_round(&row.job_id, into),
            base_round: Some(row.base_round.unwrap_or(row.round)),
            ..row.clone()
        };
        self.ledger.put_update(&carried).await
    }
}

/// Why a late row of an async job that ended with version `last` is not
/// carried.
pub(super) fn ended_with(last: u32) -> String {
    format!("the job ended with version {last}, so no later version took it")
}

/// Why a late row of an async job that failed in version `version` is not
/// carried.
pub(super) fn failed_at(version: u32) -> String {
    format!("the job failed in version {version}, so no later version took it")
}
