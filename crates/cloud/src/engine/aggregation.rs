//! The aggregation of a round CloseRound has claimed (whether the stream
//! path handed it over or its deadline passed): check every input
//! against its row before reading a byte of it, run the numeric core over
//! the objects in place (ranged reads, nothing staged on local disk), write
//! round r+1's global model and server state straight to the store, then
//! the aggregation's measurements beside them, and close the round under
//! the lease.
//!
//! Safe to run again after a crash at any point: inputs are read again, the
//! outputs go to deterministic keys (a retry rewrites the same objects) and
//! only the conditional close makes the outcome visible.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedstep_core::measurements::{ClientStatus, Measurements};
use fedstep_core::{
    AggregateError, AggregationRequest, Input, OutputTarget, UpdateMeta, UpdateSource,
};

use super::validate::CheckedUpdate;
use super::{metrics, stop_rule, RoundEngine};
use crate::capacity;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{
    Clock, Ledger, Notifier, ObjectReader, ObjectWriter, StreamingStore, TaskCallback,
};
use crate::records::{ClosedBy, RoundRecord, RoundResult, RoundStatus, UpdateRecord};
use crate::round_failure::RoundFailure;
use crate::round_figures::RoundFigures;
use crate::round_measurements::RoundMeasurements;

/// How an aggregation attempt ended.
pub(super) enum Closing {
    /// This engine closed the round with this result.
    Closed(RoundResult),
    /// Another engine took the round over (our lease expired); its result
    /// stands, ours was not recorded.
    LeaseLost,
    /// No update was usable; the round is FAILED with this failure.
    Failed(RoundFailure),
}

/// The clients whose updates take part: received, not rejected, expected.
/// Sorted, so every attempt aggregates in the same order.
pub(super) fn participants(row: &RoundRecord) -> Vec<String> {
    row.received
        .iter()
        .filter(|c| !row.rejections.contains_key(*c) && row.expected_clients.contains(c))
        .cloned()
        .collect()
}

/// One update that passed the checks before reading: its row and the
/// pinned object the core will read.
struct Checked {
    row: CheckedUpdate,
    reader: Arc<dyn ObjectReader>,
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Aggregates a round this engine has just claimed (`row` is the row
    /// `claim_round` returned). On an error the lease is given up at once,
    /// so the caller's retry (a stream redelivery, CloseRound) can take the
    /// round over without waiting for the lease to run out.
    pub(super) async fn aggregate_claimed(
        &self,
        job: &Job,
        row: &RoundRecord,
        closed_by: ClosedBy,
    ) -> Result<Closing> {
        let outcome = self.aggregate_claimed_once(job, row, closed_by).await;
        if outcome.is_err() {
            self.release_lease(row).await;
        }
        outcome
    }

    /// Makes our lease expired now. The ports have no "release", but a
    /// claim is allowed over a lease that expired before `now`: claiming
    /// with `now` just past our own expiry and a lease that ends a second
    /// ago does it, under the same condition. If someone else took over
    /// meanwhile, their expiry is later and the claim fails harmlessly.
    async fn release_lease(&self, row: &RoundRecord) {
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

    async fn aggregate_claimed_once(
        &self,
        job: &Job,
        row: &RoundRecord,
        closed_by: ClosedBy,
    ) -> Result<Closing> {
        let (job_id, round) = (row.job_id.as_str(), row.round);
        let global_key = &row.global_model_key;
        let global_stat = self.store.stat(global_key).await?.ok_or_else(|| {
            CloudError::NotFound(format!(
                "the global model of round {round} of job `{job_id}` is gone from `{global_key}`"
            ))
        })?;

        let mut rejected = row.rejections.clone();
        let mut inputs: BTreeMap<String, Checked> = BTreeMap::new();
        let candidates = participants(row);
        // Split the read-ahead budget between the inputs, the global model
        // and the optimizer state.
        let read_ahead = self.config.read_ahead_bytes / (candidates.len() as u64 + 2);
        for client in candidates {
            match self.check_update(row, &client, read_ahead).await? {
                Ok(checked) => {
                    inputs.insert(client, checked);
                }
                Err(reason) => {
                    self.reject(row, &client, &reason, &mut rejected).await?;
                }
            }
        }
        let global = self.store.reader(global_key, &global_stat, read_ahead)?;
        let state_key = keys::server_state(job_id, round);
        let state_in = match self.store.stat(&state_key).await? {
            Some(stat) => Some(self.store.reader(&state_key, &stat, read_ahead)?),
            None => None,
        };
        let out = self.store.writer(&keys::global_model(job_id, round + 1))?;
        let state_out = self.store.writer(&keys::server_state(job_id, round + 1))?;
        let config = job.pipeline().clone();

        // Aggregate; then prove every accepted input hashes to what its row
        // committed to. Reads were pinned to the object the stat saw, so a
        // mismatch means the client committed to other bytes than it
        // uploaded: it is rejected and the aggregation runs again without
        // it. The outputs are staged until then, and committed only once
        // every input is proven.
        let measurements = loop {
            if inputs.is_empty() {
                let detail: Vec<String> =
                    rejected.iter().map(|(c, r)| format!("{c}: {r}")).collect();
                return self
                    .fail(
                        job_id,
                        round,
                        RoundFailure::no_usable_update(&detail.join("; ")),
                    )
                    .await;
            }
            let sources: Vec<UpdateSource> = inputs
                .iter()
                .map(|(client, c)| UpdateSource {
                    input: Input::new(c.reader.clone()),
                    meta: UpdateMeta {
                        client_id: client.clone(),
                        num_examples: c.row.row().num_examples.clone(),
                        llm_type: c.row.row().llm_type.clone(),
                        metrics: c.row.row().metrics.clone(),
                    },
                })
                .collect();
            let run = Run {
                sources,
                global: global.clone(),
                state_in: state_in.clone(),
                out: out.clone(),
                state_out: state_out.clone(),
                config: config.clone(),
                round: u64::from(round),
            };
            // The numeric core is synchronous and CPU-bound, and its reads
            // block on the store: keep it off the async workers.
            let outcome = tokio::task::spawn_blocking(move || run.aggregate())
                .await
                .map_err(|e| CloudError::Other(format!("the aggregation task panicked: {e}")))?;
            let measurements = match outcome {
                Ok(m) => m,
                Err(AggregateError::NoUsableUpdate(reason)) => {
                    return self
                        .fail(job_id, round, RoundFailure::no_usable_update(&reason))
                        .await
                }
                Err(AggregateError::Unavailable { name, reason }) => {
                    return Err(CloudError::Transient(format!("reading `{name}`: {reason}")))
                }
                // The store refused a write: the system's failure, retried.
                Err(AggregateError::Output { name, source }) => {
                    return Err(CloudError::Transient(format!("writing `{name}`: {source}")))
                }
                Err(e) => return Err(e.into()),
            };
            let accepted: Vec<(String, Arc<dyn ObjectReader>, String)> = measurements
                .clients
                .iter()
                .filter(|c| c.status == ClientStatus::Accepted)
                .filter_map(|c| {
                    let i = inputs.get(&c.client_id)?;
                    Some((
                        c.client_id.clone(),
                        i.reader.clone(),
                        i.row.row().checksum.clone(),
                    ))
                })
                .collect();
            let global_for_hash = global.clone();
            let hashes = tokio::task::spawn_blocking(move || {
                let global = global_for_hash.sha256();
                let updates: Vec<(String, String, std::io::Result<String>)> = accepted
                    .into_iter()
                    .map(|(client, reader, want)| (client, want, reader.sha256()))
                    .collect();
                (global, updates)
            })
            .await
            .map_err(|e| CloudError::Other(format!("the checksum task panicked: {e}")))?;
            let global_sha = hashes.0.map_err(|e| {
                CloudError::Transient(format!("hashing the global model `{global_key}`: {e}"))
            })?;
            if !global_sha.eq_ignore_ascii_case(&row.global_checksum) {
                // Not the clients' fault and not fixable by retrying: say so.
                return Err(CloudError::Invalid(format!(
                    "global model `{global_key}` hashes to {global_sha} but round {round} of job `{job_id}` was opened with {}",
                    row.global_checksum
                )));
            }
            let mut mismatched = Vec::new();
            for (client, want, got) in hashes.1 {
                let reason = match got {
                    Ok(sha) if sha.eq_ignore_ascii_case(&want) => continue,
                    Ok(sha) => format!(
                        "checksum: the row says {want} but the object at `{}` hashes to {sha}",
                        inputs[&client].row.row().model_key
                    ),
                    Err(e) if fedstep_core::bytes::is_unavailable(&e) => {
                        return Err(CloudError::Transient(format!(
                            "hashing `{}`: {e}",
                            inputs[&client].row.row().model_key
                        )))
                    }
                    Err(e) => format!("model: reading it to verify its checksum failed: {e}"),
                };
                mismatched.push((client, reason));
            }
            if mismatched.is_empty() {
                // Every input is proven: only now may the outputs appear
                // at their keys (the state first: a model whose state is
                // missing would restart the optimizer's moments).
                let (o, so) = (out.clone(), state_out.clone());
                let committed = tokio::task::spawn_blocking(move || {
                    so.commit()?;
                    o.commit()
                })
                .await
                .map_err(|e| CloudError::Other(format!("the commit task panicked: {e}")))?
                .map_err(|e| {
                    CloudError::Transient(format!("committing round {}'s outputs: {e}", round + 1))
                })?;
                match committed {
                    Some(info) if !info.sha256.is_empty() => break measurements,
                    _ => {
                        return Err(CloudError::Other(format!(
                            "the aggregation left no hashed model to commit at `{}`",
                            keys::global_model(job_id, round + 1)
                        )))
                    }
                }
            }
            for (client, reason) in mismatched {
                inputs.remove(&client);
                self.reject(row, &client, &reason, &mut rejected).await?;
            }
        };
        // Every rejection so far was the engine's own, made before the core
        // read the update (at on_update, in the checks, on a checksum
        // mismatch): the core never measured those clients.
        let engine_rejected = rejected.clone();
        for c in measurements
            .clients
            .iter()
            .filter(|c| c.status != ClientStatus::Accepted)
        {
            let reason = format!(
                "{}: {}",
                status_name(c.status),
                c.reason.as_deref().unwrap_or("no reason given")
            );
            self.reject(row, &c.client_id, &reason, &mut rejected)
                .await?;
        }

        // Beside the model, before the round is CLOSED: a closed round
        // always has its measurements. A retry rewrites the same key.
        let stored = RoundMeasurements::new(job_id, round, measurements, &engine_rejected);
        self.write_measurements(&keys::round_measurements(job_id, round + 1), &stored)
            .await?;
        let measurements = stored.measurements;

        let next_key = keys::global_model(job_id, round + 1);
        let rows: BTreeMap<String, UpdateRecord> = inputs
            .into_iter()
            .map(|(c, i)| (c, i.row.into_row()))
            .collect();
        let metrics = metrics::round_metrics(&measurements, &rows, rejected.len());
        let history = self.stop_history(job, round).await?;
        let result = RoundResult {
            job_id: job_id.to_string(),
            round,
            global_model_key: next_key,
            continue_training: stop_rule::should_continue(job, round, &history, &metrics),
            metrics,
            closed_by,
            accepted: measurements
                .clients
                .iter()
                .filter(|c| c.status == ClientStatus::Accepted)
                .map(|c| c.client_id.clone())
                .collect(),
            rejected,
        };
        let closed = self
            .ledger
            .close_round(job_id, round, &self.config.owner, &result)
            .await?;
        if !closed {
            return Ok(Closing::LeaseLost);
        }
        if let Some(observe) = &self.round_observer {
            let opened_at = row
                .deadline
                .saturating_sub(i64::try_from(job.round_timeout_seconds).unwrap_or(i64::MAX));
            observe(&RoundFigures {
                job_id: job_id.to_string(),
                round,
                closed_by,
                clients_accepted: result.accepted.len(),
                clients_rejected: result.rejected.len(),
                aggregation_seconds: measurements.seconds,
                bytes_read: measurements.bytes_read,
                bytes_written: measurements.bytes_written,
                open_to_close_seconds: self.clock.now().saturating_sub(opened_at),
                stop_metric: job.stop.as_ref().and_then(|stop| {
                    let value = result.metrics.get(&stop.metric)?;
                    Some((stop.metric.clone(), *value))
                }),
            });
        }
        Ok(Closing::Closed(result))
    }

    /// Writes `stored` at `key` through the streaming port, like the model.
    /// The store refusing it is the system's failure: retried.
    async fn write_measurements(&self, key: &str, stored: &RoundMeasurements) -> Result<()> {
        let bytes = stored.to_json_bytes()?;
        let writer = self.store.writer(key)?;
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let sink = writer.create(bytes.len() as u64)?;
            sink.write_at(0, &bytes)?;
            sink.finish()?;
            writer.commit()
        })
        .await
        .map_err(|e| CloudError::Other(format!("the measurements task panicked: {e}")))?;
        match written {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(CloudError::Other(format!(
                "the measurements at `{key}` were written but not committed"
            ))),
            Err(e) => Err(CloudError::Transient(format!("writing `{key}`: {e}"))),
        }
    }

    /// Records a rejection in the ledger and in this attempt's map, bounded
    /// to the round's share of the reason budget (capacity.rs): the reason
    /// may quote what the client sent (tensor names, S3's words about its
    /// object), and it is stored in the round item and returned in the task
    /// result.
    async fn reject(
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
    /// readability; then pins the read to it. The
    /// inner `Err` is a rejection of that client; the outer one a failure
    /// of the attempt (e.g. the store is unreachable: worth retrying).
    async fn check_update(
        &self,
        row: &RoundRecord,
        client: &str,
        read_ahead: u64,
    ) -> Result<std::result::Result<Checked, String>> {
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
        let reader = self.store.reader(key, &stat, read_ahead)?;
        Ok(Ok(Checked {
            row: update,
            reader,
        }))
    }

    /// FAILED with `failure` (bounded by its constructor: it joins every
    /// client's reason, and travels in the round item and as the task
    /// failure's cause).
    async fn fail(&self, job_id: &str, round: u32, failure: RoundFailure) -> Result<Closing> {
        self.ledger.fail_round(job_id, round, &failure).await?;
        Ok(Closing::Failed(failure))
    }

    /// The stop metric in the earlier closed rounds, oldest first.
    async fn stop_history(&self, job: &Job, round: u32) -> Result<Vec<f64>> {
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

/// One call of the numeric core, owned, so it can move to a blocking thread.
struct Run {
    sources: Vec<UpdateSource>,
    global: Arc<dyn ObjectReader>,
    state_in: Option<Arc<dyn ObjectReader>>,
    out: Arc<dyn ObjectWriter>,
    state_out: Arc<dyn ObjectWriter>,
    config: fedstep_core::PipelineConfig,
    round: u64,
}

impl Run {
    fn aggregate(self) -> std::result::Result<Measurements, AggregateError> {
        let out: &dyn OutputTarget = self.out.as_ref();
        let state_out: &dyn OutputTarget = self.state_out.as_ref();
        fedstep_core::aggregate(&AggregationRequest {
            updates: &self.sources,
            global: Some(Input::new(self.global)),
            config: &self.config,
            out,
            state_in: self.state_in.map(|r| Input::new(r)),
            state_out: Some(state_out),
            round: self.round,
        })
        .map(|o| o.measurements)
    }
}

fn status_name(s: ClientStatus) -> &'static str {
    match s {
        ClientStatus::Accepted => "accepted",
        ClientStatus::Rejected => "rejected",
        ClientStatus::Excluded => "excluded",
        ClientStatus::Zeroed => "zeroed",
        ClientStatus::NotSelected => "not selected",
    }
}
