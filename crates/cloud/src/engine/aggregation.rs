//! The aggregation of a claimed round, shared by the stream path (all
//! clients in) and the deadline path (CloseRound): fetch and verify the
//! inputs, run the numeric core, write round r+1's global model and server
//! state, and close the round under the lease.
//!
//! Safe to run again after a crash at any point: inputs are re-fetched, the
//! outputs go to deterministic keys (a retry rewrites the same objects) and
//! only the conditional close makes the outcome visible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstep_core::measurements::ClientStatus;
use fedstep_core::{AggregateError, AggregationRequest, UpdateMeta, UpdateSource};

use super::validate::check_against_round;
use super::workdir::WorkDir;
use super::{metrics, stop_rule, RoundEngine};
use crate::error::{CloudError, Result};
use crate::job::JobSpec;
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, ObjectStore, TaskCallback};
use crate::records::{RoundRecord, RoundResult, RoundStatus, UpdateRecord};

/// How an aggregation attempt ended.
pub(super) enum Closing {
    /// This engine closed the round with this result.
    Closed(RoundResult),
    /// Another engine took the round over (our lease expired); its result
    /// stands, ours was not recorded.
    LeaseLost,
    /// No update was usable; the round is FAILED with this reason.
    Failed(String),
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

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: ObjectStore,
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
        job: &JobSpec,
        row: &RoundRecord,
        closed_by: &str,
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
        job: &JobSpec,
        row: &RoundRecord,
        closed_by: &str,
    ) -> Result<Closing> {
        let (job_id, round) = (row.job_id.as_str(), row.round);
        let work = WorkDir::create(&self.config.workdir, job_id, round, &self.config.owner)?;

        let global = work.path().join("global.safetensors");
        let got = self.store.get_file(&row.global_model_key, &global).await?;
        if !got.sha256.eq_ignore_ascii_case(&row.global_checksum) {
            // Not the clients' fault and not fixable by retrying: say so.
            return Err(CloudError::Invalid(format!(
                "global model `{}` hashes to {} but round {round} of job `{job_id}` was opened with {}",
                row.global_model_key, got.sha256, row.global_checksum
            )));
        }

        let mut rejected = row.rejections.clone();
        let mut sources = Vec::new();
        let mut rows = BTreeMap::new();
        for client in participants(row) {
            match self.fetch_update(row, &client, work.path()).await? {
                Ok((source, update)) => {
                    sources.push(source);
                    rows.insert(client, update);
                }
                Err(reason) => {
                    self.ledger
                        .record_rejection(job_id, round, &client, &reason)
                        .await?;
                    rejected.insert(client, reason);
                }
            }
        }
        if sources.is_empty() {
            let detail: Vec<String> = rejected.iter().map(|(c, r)| format!("{c}: {r}")).collect();
            return self
                .fail(
                    job_id,
                    round,
                    format!("no usable update: {}", detail.join("; ")),
                )
                .await;
        }

        let state_key = keys::server_state(job_id, round);
        let state_in = match self.store.head(&state_key).await? {
            Some(_) => {
                let p = work.path().join("state_in.safetensors");
                self.store.get_file(&state_key, &p).await?;
                Some(p)
            }
            None => None,
        };
        let config = job.pipeline().map_err(CloudError::Invalid)?;
        let out = work.path().join("next_global.safetensors");
        let state_out = work.path().join("state_out.safetensors");
        let outcome = {
            let (out, state_out, global) = (out.clone(), state_out.clone(), global.clone());
            // The numeric core is synchronous and CPU-bound: keep it off the
            // async workers.
            tokio::task::spawn_blocking(move || {
                fedstep_core::aggregate(&AggregationRequest {
                    updates: &sources,
                    global: Some(&global),
                    config: &config,
                    out: &out,
                    state_in: state_in.as_deref(),
                    state_out: Some(&state_out),
                    round: u64::from(round),
                })
            })
            .await
            .map_err(|e| CloudError::Other(format!("the aggregation task panicked: {e}")))?
        };
        let measurements = match outcome {
            Ok(o) => o.measurements,
            Err(AggregateError::NoUsableUpdate(reason)) => {
                return self
                    .fail(job_id, round, format!("no usable update: {reason}"))
                    .await
            }
            Err(e) => return Err(e.into()),
        };
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
            self.ledger
                .record_rejection(job_id, round, &c.client_id, &reason)
                .await?;
            rejected.insert(c.client_id.clone(), reason);
        }

        let next_key = keys::global_model(job_id, round + 1);
        self.store.put_file(&next_key, &out).await?;
        if state_out.is_file() {
            self.store
                .put_file(&keys::server_state(job_id, round + 1), &state_out)
                .await?;
        }

        let metrics = metrics::round_metrics(&measurements, &rows, rejected.len());
        let history = self.stop_history(job, round).await?;
        let result = RoundResult {
            job_id: job_id.to_string(),
            round,
            global_model_key: next_key,
            continue_training: stop_rule::should_continue(job, round, &history, &metrics),
            metrics,
            closed_by: closed_by.to_string(),
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
        Ok(if closed {
            Closing::Closed(result)
        } else {
            Closing::LeaseLost
        })
    }

    /// Downloads one client's update and checks it against its row. The
    /// inner `Err` is a rejection of that client; the outer one a failure
    /// of the attempt (e.g. the store is unreachable: worth retrying).
    async fn fetch_update(
        &self,
        row: &RoundRecord,
        client: &str,
        work: &Path,
    ) -> Result<Result<(UpdateSource, UpdateRecord), String>> {
        let Some(update) = self
            .ledger
            .get_update(client, &row.job_id, row.round)
            .await?
        else {
            return Ok(Err(format!(
                "row: no update row for `{client}` in round {} although it was counted",
                row.round
            )));
        };
        if let Err(reason) = check_against_round(&update, row) {
            return Ok(Err(reason));
        }
        let path: PathBuf = work.join("updates").join(format!("{client}.safetensors"));
        let got = match self.store.get_file(&update.model_key, &path).await {
            Ok(info) => info,
            Err(CloudError::NotFound(_)) => {
                return Ok(Err(format!("model: no object at `{}`", update.model_key)))
            }
            Err(e) => return Err(e),
        };
        if !got.sha256.eq_ignore_ascii_case(&update.checksum) {
            return Ok(Err(format!(
                "checksum: the row says {} but the object at `{}` hashes to {}",
                update.checksum, update.model_key, got.sha256
            )));
        }
        let source = UpdateSource {
            path,
            meta: UpdateMeta {
                client_id: client.to_string(),
                num_examples: update.num_examples.clone(),
                llm_type: update.llm_type.clone(),
                metrics: update.metrics.clone(),
            },
        };
        Ok(Ok((source, update)))
    }

    async fn fail(&self, job_id: &str, round: u32, reason: String) -> Result<Closing> {
        self.ledger.fail_round(job_id, round, &reason).await?;
        Ok(Closing::Failed(reason))
    }

    /// The stop metric in the earlier closed rounds, oldest first.
    async fn stop_history(&self, job: &JobSpec, round: u32) -> Result<Vec<f64>> {
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

fn status_name(s: ClientStatus) -> &'static str {
    match s {
        ClientStatus::Accepted => "accepted",
        ClientStatus::Rejected => "rejected",
        ClientStatus::Excluded => "excluded",
        ClientStatus::Zeroed => "zeroed",
        ClientStatus::NotSelected => "not selected",
    }
}
