//! What the aggregation's tasks share (`sharded/`): who takes part, the
//! checks of a row and its object before any byte of it is read, recording
//! a rejection, giving a lease up, the measurements' write and the stop
//! rule's history.

use std::collections::BTreeMap;

use super::validate::CheckedUpdate;
use super::RoundEngine;
use crate::bounded::quote;
use crate::capacity;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::ports::{Clock, Ledger, Notifier, ObjectStat, StreamingStore, TaskCallback};
use crate::records::{RoundRecord, RoundStatus};
use crate::round_measurements::RoundMeasurements;

/// The clients whose updates take part: received, not rejected, expected.
/// Sorted, so every attempt aggregates in the same order.
pub(crate) fn participants(row: &RoundRecord) -> Vec<String> {
    row.received
        .iter()
        .filter(|c| !row.rejections.contains_key(*c) && row.expected_clients.contains(c))
        .cloned()
        .collect()
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Makes our lease expired now. The ports have no "release", but a
    /// claim is allowed over a lease that expired before `now`: claiming
    /// with `now` just past our own expiry and a lease that ends a second
    /// ago does it, under the same condition. If someone else took over
    /// meanwhile, their expiry is later and the claim fails harmlessly.
    pub(super) async fn release_lease(&self, row: &RoundRecord) {
        let Some(ours) = row.lease_expires_at else {
            return;
        };
        let past = self.clock.now().saturating_sub(1);
        let fake_now = ours.saturating_add(1);
        // Best effort: if this fails too, the lease simply runs out.
        let _ = self
            .ledger
            .claim_round(
                &row.job_id,
                row.round,
                &self.config.owner,
                fake_now,
                past.saturating_sub(fake_now),
            )
            .await;
    }

    /// Writes `stored` at `key` through the streaming port, like the model.
    /// The store refusing it is the system's failure: retried.
    pub(super) async fn write_measurements(
        &self,
        key: &str,
        stored: &RoundMeasurements,
    ) -> Result<()> {
        let bytes = stored.to_json_bytes()?;
        super::sharded::put_bytes(&self.store, key, bytes).await
    }

    /// Records a rejection in the ledger and in this attempt's map, bounded
    /// to the round's share of the reason budget (capacity.rs): the reason
    /// may quote what the client sent (tensor names, S3's words about its
    /// object), and it is stored in the round item and returned in the task
    /// result.
    pub(super) async fn reject(
        &self,
        row: &RoundRecord,
        client: &str,
        reason: &str,
        rejected: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let reason = capacity::stored_reason(reason, row.expected_clients.len());
        self.ledger
            .record_rejection(&row.job_id, row.round, client, &reason)
            .await?;
        rejected.insert(client.to_string(), reason);
        Ok(())
    }

    /// Checks one client's row and object before any byte of the object is
    /// read: the row as read now (the ledger is the boundary here: the row
    /// may have been rewritten since it was counted, see [`CheckedUpdate`]),
    /// the object's existence, size (equal to what the row says) and
    /// readability; returns the stat every read is then pinned to. The
    /// inner `Err` is a rejection of that client; the outer one a failure
    /// of the attempt (e.g. the store is unreachable: worth retrying).
    pub(super) async fn check_update(
        &self,
        row: &RoundRecord,
        client: &str,
    ) -> Result<std::result::Result<(CheckedUpdate, ObjectStat), String>> {
        let update = match self.ledger.get_update(client, &row.job_id, row.round).await {
            Ok(Some(update)) => update,
            Ok(None) => {
                return Ok(Err(format!(
                    "row: no update row for `{client}` in round {} although it was counted",
                    row.round
                )))
            }
            // The row is the client's own writing: one that no longer
            // decodes (rewritten after it was counted) is its fault.
            Err(CloudError::Invalid(reason)) => return Ok(Err(format!("row: {reason}"))),
            Err(e) => return Err(e),
        };
        let update = match CheckedUpdate::check(update, row) {
            Ok(checked) => checked,
            Err(refusal) => return Ok(Err(refusal.into_reason())),
        };
        let key = &update.row().model_key;
        let Some(stat) = self.store.stat(key).await? else {
            return Ok(Err(format!("model: no object at `{key}`")));
        };
        if let Some(why) = &stat.unreadable {
            return Ok(Err(format!("model: `{key}` cannot be read: {why}")));
        }
        if stat.bytes != update.row().bytes {
            return Ok(Err(format!(
                "model: the row says {} bytes but the object at `{key}` holds {}",
                update.row().bytes,
                stat.bytes
            )));
        }
        // Equal store checksums bind the pinned bytes to the row with no
        // read; a different one means the object was replaced after the
        // row. Either side without one: the shards hash the bytes instead.
        if let (Some(row_says), Some(store_says)) =
            (&update.row().store_checksum, &stat.store_checksum)
        {
            if row_says != store_says {
                return Ok(Err(format!(
                    "model: the object at `{key}` is not the upload its row names (the store's checksum `{}`, the row's `{}`)",
                    quote(store_says),
                    quote(row_says)
                )));
            }
        }
        Ok(Ok((update, stat)))
    }

    /// The stop metric in the earlier closed rounds, oldest first.
    pub(super) async fn stop_history(&self, job: &Job, round: u32) -> Result<Vec<f64>> {
        let Some(stop) = &job.stop else {
            return Ok(Vec::new());
        };
        let mut rounds = self.ledger.list_rounds(&job.job_id).await?;
        rounds.sort_by_key(|r| r.round);
        Ok(rounds
            .iter()
            .filter(|r| r.round < round && r.status == RoundStatus::Closed)
            .filter_map(|r| r.result.as_ref()?.metrics.get(&stop.metric).copied())
            .filter(|v| v.is_finite())
            .collect())
    }
}
