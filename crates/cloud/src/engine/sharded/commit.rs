//! CommitRound, the last task of an attempt: once every shard is done,
//! either send the round back to the plan (a shard rejected a client: its
//! rejection is recorded, the lease given up, and the plan opens a new
//! attempt without it) or make the outputs visible (the state first: a
//! model whose state is missing would restart the optimizer's moments;
//! with SCAFFOLD, the next server variate after the model), write the
//! measurements beside them and close the round under the attempt's
//! lease, with `continue`.

use std::collections::BTreeMap;
use std::time::Duration;

use fedstep_core::aggregate::{Effort, ShardStatistics};
use fedstep_core::measurements::ClientStatus;
use serde::{Deserialize, Serialize};

use super::attempt::{
    decision_key, get_json, load_plan, shard_key, statistics_key, unix_ms, Decided, Opened,
    ShardOutcome, StatisticsDone,
};
use super::tasks::{blocking, with_attempt};
use crate::engine::{metrics, stop_rule, RoundEngine};
use crate::error::{CloudError, Result};
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{RoundResult, RoundStatus, UpdateRecord};
use crate::round_figures::RoundFigures;
use crate::round_measurements::RoundMeasurements;

/// CommitRound's answer, the workflow's `$.result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CommitOutcome {
    /// The round is closed (by this attempt, or before: a retry).
    Closed(RoundResult),
    /// The attempt ended without closing the round: a client was rejected
    /// on the way (named here), or another attempt holds the round. The
    /// workflow runs PlanRound again.
    Replan {
        replan: bool,
        rejected: BTreeMap<String, String>,
    },
}

impl CommitOutcome {
    fn replan(rejected: BTreeMap<String, String>) -> CommitOutcome {
        CommitOutcome::Replan {
            replan: true,
            rejected,
        }
    }
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// CommitRound task (see the module doc).
    pub async fn commit_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> Result<CommitOutcome> {
        let row = self
            .ledger
            .get_round(job_id, round)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("round {round} of job `{job_id}`")))?;
        match row.status {
            RoundStatus::Closed => {
                return row.result.map(CommitOutcome::Closed).ok_or_else(|| {
                    CloudError::Other(format!(
                        "round {round} of job `{job_id}` is CLOSED without a result"
                    ))
                })
            }
            RoundStatus::Failed => return Err(crate::engine::close::stored_failure(&row).into()),
            RoundStatus::Open | RoundStatus::Aggregating => {}
        }
        if row.lease_owner.as_deref() != Some(attempt) || row.status != RoundStatus::Aggregating {
            // Another attempt took the round over: the plan waits for it.
            return Ok(CommitOutcome::replan(BTreeMap::new()));
        }
        let plan = load_plan(&self.store, job_id, round, attempt).await?;
        let decided: Decided = get_json(&self.store, &decision_key(job_id, round, attempt))
            .await?
            .ok_or_else(|| CloudError::Other(format!("attempt `{attempt}` has no decision")))?;
        let mut rejected_now = BTreeMap::new();
        let mut done = Vec::with_capacity(plan.shards);
        let (mut model_receipts, mut state_receipts) = (Vec::new(), Vec::new());
        let mut shard_bytes_fetched = Vec::with_capacity(plan.shards);
        if let Decided::Rejected { client, reason } = &decided {
            rejected_now.insert(client.clone(), reason.clone());
        }
        for shard in 0..plan.shards {
            let key = shard_key(job_id, round, attempt, shard);
            match get_json::<_, ShardOutcome>(&self.store, &key).await? {
                Some(ShardOutcome::Done {
                    done: d,
                    model,
                    state,
                    bytes_fetched,
                }) => {
                    done.push(d);
                    shard_bytes_fetched.push(bytes_fetched);
                    model_receipts.extend(model);
                    state_receipts.extend(state);
                }
                Some(ShardOutcome::Rejected { client, reason }) => {
                    rejected_now.entry(client).or_insert(reason);
                }
                Some(ShardOutcome::Skipped) => {}
                None => {
                    return Err(CloudError::Other(format!(
                        "shard {shard} of attempt `{attempt}` stored no outcome at `{key}`"
                    )))
                }
            }
        }
        if !rejected_now.is_empty() {
            let mut rejected = row.rejections.clone();
            for (client, reason) in &rejected_now {
                self.reject(&row, client, reason, &mut rejected).await?;
            }
            // The next plan leaves out whom the ledger says was rejected: a
            // rejection it did not keep would send the round round and round.
            let kept = self.ledger.get_round(job_id, round).await?;
            if let Some(lost) = rejected_now
                .keys()
                .find(|c| !kept.as_ref().is_some_and(|r| r.rejections.contains_key(*c)))
            {
                return Err(CloudError::Other(format!(
                    "the ledger did not keep the rejection of `{lost}` in round {round} of job `{job_id}`"
                )));
            }
            self.release_lease(&row).await;
            return Ok(CommitOutcome::replan(rejected_now));
        }
        let Decided::Decision(decision) = decided else {
            unreachable!("a rejecting decision ends the attempt above")
        };

        // The record, from the same opened attempt every shard had.
        let mut effort = Effort {
            passes: 1 + u32::from(plan.statistics),
            bytes_read: done.iter().map(|d| d.bytes_read).sum(),
        };
        if plan.statistics {
            for shard in 0..plan.shards {
                let key = statistics_key(job_id, round, attempt, shard);
                if let Some(StatisticsDone::Statistics(ShardStatistics { bytes_read, .. })) =
                    get_json(&self.store, &key).await?
                {
                    effort.bytes_read += bytes_read;
                }
            }
        }
        let elapsed = Duration::from_millis(unix_ms().saturating_sub(plan.started_ms));
        let job = self.job_of(job_id).await?;
        let opened = Opened::open(
            &self.store,
            &plan,
            self.config.read_ahead_bytes,
            job.pipeline().limits(),
        )?;
        let (p, j) = (plan.clone(), job.clone());
        let measurements = blocking(move || {
            with_attempt(&p, &j, &opened, |a| {
                let outputs = a.outputs(&decision).map_err(super::core_error)?;
                Ok(a.outcome(&decision, &outputs, &done, effort, elapsed)
                    .measurements)
            })
        })
        .await?;

        // Every shard is done and every input proven: the outputs appear.
        if let Some(upload) = &plan.state_upload {
            self.store
                .complete_upload(
                    &keys::server_state(job_id, round + 1),
                    upload,
                    state_receipts,
                )
                .await?;
        }
        let model = self
            .store
            .complete_upload(
                &keys::global_model(job_id, round + 1),
                &plan.model_upload,
                model_receipts,
            )
            .await?;
        if model.sha256.is_empty() {
            return Err(CloudError::Other(format!(
                "the committed model at `{}` has no SHA-256",
                keys::global_model(job_id, round + 1)
            )));
        }

        // The core's own rejections (claims, headers, robust stages) join
        // the engine's; those the engine made were never measured.
        let mut rejected = plan.engine_rejected.clone();
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
            self.reject(&row, &c.client_id, &reason, &mut rejected)
                .await?;
        }
        let mut stored = RoundMeasurements::new(job_id, round, measurements, &plan.engine_rejected);
        stored.shard_bytes_fetched = shard_bytes_fetched;
        let rows: BTreeMap<String, UpdateRecord> = plan
            .updates
            .iter()
            .map(|u| (u.row.client_id.clone(), u.row.clone()))
            .collect();
        let accepted: Vec<String> = stored
            .measurements
            .clients
            .iter()
            .filter(|c| c.status == ClientStatus::Accepted)
            .map(|c| c.client_id.clone())
            .collect();
        if job.scaffold() {
            stored.scaffold = Some(
                self.next_server_variate(&job, round, &accepted, &rows)
                    .await?,
            );
        }
        self.write_measurements(&keys::round_measurements(job_id, round + 1), &stored)
            .await?;
        let measurements = stored.measurements;
        let metrics = metrics::round_metrics(&measurements, &rows, rejected.len());
        let history = self.stop_history(&job, round).await?;
        let result = RoundResult {
            job_id: job_id.to_string(),
            round,
            global_model_key: keys::global_model(job_id, round + 1),
            continue_training: stop_rule::should_continue(&job, round, &history, &metrics)
                && self.async_goes_on(&job, round, accepted.len()).await?,
            metrics,
            closed_by: plan.closed_by,
            accepted,
            rejected,
        };
        if !self
            .ledger
            .close_round(job_id, round, attempt, &result)
            .await?
        {
            return Ok(CommitOutcome::replan(BTreeMap::new()));
        }
        if let Some(observe) = &self.round_observer {
            let opened_at = row
                .deadline
                .saturating_sub(i64::try_from(job.round_timeout_seconds).unwrap_or(i64::MAX));
            observe(&RoundFigures {
                job_id: job_id.to_string(),
                round,
                closed_by: plan.closed_by,
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
        Ok(CommitOutcome::Closed(result))
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
