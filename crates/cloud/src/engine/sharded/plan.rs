//! PlanRound, the first task of a round's aggregation (after the hand-over
//! or the deadline): claim the round under a lease named after the new
//! attempt, judge the quorum, check every input against its row before
//! reading a byte of it, open the aggregation once to cut the model into
//! shards, decide at once when no stage needs statistics, start the
//! uploads the shards write into, and store all of it as the attempt's
//! plan. The workflow then runs the shards ([`super::tasks`]) and the
//! commit ([`super::commit`]).

use std::collections::BTreeMap;
use std::time::Duration;

use fedstep_core::aggregate::{prepare, Decision, Sharding, StepError};
use fedstep_core::shard::MIN_PART_BYTES;
use fedstep_core::{AggregateError, AggregationRequest};
use serde::{Deserialize, Serialize};

use super::attempt::{
    decision_key, new_attempt_id, plan_key, put_json, unix_ms, Decided, Opened, Pinned,
    PinnedUpdate, Plan, RebaseFrom,
};
use crate::engine::aggregation::participants;
use crate::engine::close::{quorum_not_met, stored_failure};
use crate::engine::RoundEngine;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, StreamingStore, TaskCallback};
use crate::records::{ClosedBy, RoundRecord, RoundResult, RoundStatus, UpdateRecord};
use crate::round_failure::RoundFailure;

/// How often to look again while another attempt holds the round.
const POLL: Duration = Duration::from_millis(250);

/// PlanRound's answer, the workflow's `$.plan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PlanOutcome {
    /// The round is closed already (a retry, or another attempt won): its
    /// result, and nothing to run.
    Closed { closed: RoundResult },
    /// An attempt to run: its shards, whether a statistics Map and a
    /// decide task come first, and how many shard tasks at once.
    Planned {
        attempt: String,
        shards: Vec<usize>,
        statistics: bool,
        concurrency: u32,
    },
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// PlanRound task. CLOSED → its result. FAILED → the stored failure
    /// again. OPEN (or AGGREGATING under an expired lease) → claim it for a
    /// new attempt; fewer than min_clients usable updates → FAILED with
    /// `QuorumNotMet`. AGGREGATING under a live lease → wait for it (up to
    /// the lease), then report a transient error for the retry.
    pub async fn plan_round(
        &self,
        job_id: &str,
        round: u32,
        closed_by: ClosedBy,
    ) -> Result<PlanOutcome> {
        let job = self
            .ledger
            .get_job(job_id)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("job `{job_id}`")))?;
        let started = tokio::time::Instant::now();
        let max_wait = Duration::from_secs(self.config.lease_seconds.clamp(1, 900) as u64);
        loop {
            let row =
                self.ledger.get_round(job_id, round).await?.ok_or_else(|| {
                    CloudError::NotFound(format!("round {round} of job `{job_id}`"))
                })?;
            match row.status {
                RoundStatus::Closed => {
                    let closed = row.result.ok_or_else(|| {
                        CloudError::Other(format!(
                            "round {round} of job `{job_id}` is CLOSED without a result"
                        ))
                    })?;
                    return Ok(PlanOutcome::Closed { closed });
                }
                RoundStatus::Failed => return Err(stored_failure(&row).into()),
                RoundStatus::Open | RoundStatus::Aggregating => {}
            }
            let attempt = new_attempt_id(&self.config.owner);
            let claimed = self
                .ledger
                .claim_round(
                    job_id,
                    round,
                    &attempt,
                    self.clock.now(),
                    self.config.lease_seconds,
                )
                .await?;
            if let Some(claimed) = claimed {
                let usable = participants(&claimed);
                if usable.len() < claimed.min_clients as usize {
                    let failure = quorum_not_met(&claimed, &usable);
                    self.ledger.fail_round(job_id, round, &failure).await?;
                    return Err(failure.into());
                }
                let planned = self.plan_claimed(&job, &claimed, closed_by, &attempt).await;
                if planned.is_err() {
                    // A retried PlanRound can then start at once.
                    self.release_lease(&claimed).await;
                }
                return planned;
            }
            if started.elapsed() >= max_wait {
                return Err(CloudError::Transient(format!(
                    "round {round} of job `{job_id}` is being aggregated by attempt `{}` (lease until {}); try again",
                    row.lease_owner.as_deref().unwrap_or("?"),
                    row.lease_expires_at.unwrap_or(0)
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn plan_claimed(
        &self,
        job: &Job,
        row: &RoundRecord,
        closed_by: ClosedBy,
        attempt: &str,
    ) -> Result<PlanOutcome> {
        let (job_id, round) = (row.job_id.as_str(), row.round);
        let global_key = &row.global_model_key;
        let global_stat = self.store.stat(global_key).await?.ok_or_else(|| {
            CloudError::NotFound(format!(
                "the global model of round {round} of job `{job_id}` is gone from `{global_key}`"
            ))
        })?;
        let mut rejected = row.rejections.clone();
        let mut updates = Vec::new();
        for client in participants(row) {
            match self.check_update(row, &client).await? {
                Ok((checked, stat)) => {
                    let row = checked.row();
                    let object = Pinned::new(&row.model_key, &stat, row.store_checksum.as_deref());
                    let rebase = self.rebase_from(job, checked.row()).await?;
                    updates.push(PinnedUpdate {
                        row: checked.into_row(),
                        object,
                        rebase,
                    });
                }
                Err(reason) => self.reject(row, &client, &reason, &mut rejected).await?,
            }
        }
        let state_key = keys::server_state(job_id, round);
        let state_in = self
            .store
            .stat(&state_key)
            .await?
            .map(|stat| Pinned::new(&state_key, &stat, None));
        let shards_requested = job.sharding.shards_for(global_stat.bytes);
        let mut plan = Plan {
            job_id: job_id.to_string(),
            round,
            attempt: attempt.to_string(),
            closed_by,
            started_ms: unix_ms(),
            global: Pinned::new(
                global_key,
                &global_stat,
                row.global_store_checksum.as_deref(),
            ),
            global_checksum: row.global_checksum.clone(),
            state_in,
            updates,
            engine_rejected: BTreeMap::new(),
            shards_requested,
            shards: 0,
            statistics: false,
            model_upload: String::new(),
            state_upload: None,
        };
        // Open the aggregation: the cut, and (no statistics needed) the
        // decision. A client whose values the decision refuses is
        // rejected and the aggregation opened again without it.
        let cut = loop {
            if plan.updates.is_empty() {
                let detail: Vec<String> =
                    rejected.iter().map(|(c, r)| format!("{c}: {r}")).collect();
                let failure = RoundFailure::no_usable_update(&detail.join("; "));
                self.ledger.fail_round(job_id, round, &failure).await?;
                return Err(failure.into());
            }
            let opened = Opened::open(
                &self.store,
                &plan,
                self.config.read_ahead_bytes,
                job.pipeline().limits(),
            )?;
            let config = job.pipeline().clone();
            let (requested, r) = (plan.shards_requested, u64::from(round));
            let outcome = tokio::task::spawn_blocking(move || {
                let req = AggregationRequest {
                    updates: &opened.sources,
                    global: Some(opened.global.clone()),
                    config: &config,
                    out: &opened.out,
                    state_in: opened.state_in.clone(),
                    state_out: Some(&opened.state_out),
                    round: r,
                };
                let sharding = Sharding {
                    shards: requested,
                    min_shard_bytes: MIN_PART_BYTES,
                };
                let attempt =
                    prepare(&req, sharding, &BTreeMap::new()).map_err(StepError::Fatal)?;
                let decision = if attempt.needs_statistics() {
                    None
                } else {
                    Some(attempt.decide(&[])?)
                };
                Ok::<_, StepError>(Cut {
                    shards: attempt.shards().len(),
                    statistics: attempt.needs_statistics(),
                    writes_state: attempt.writes_state(),
                    decision,
                })
            })
            .await
            .map_err(|e| CloudError::Other(format!("the plan task panicked: {e}")))?;
            match outcome {
                Ok(cut) => break cut,
                Err(StepError::Reject { input, reason }) => {
                    let client = plan.updates.remove(input).row.client_id;
                    self.reject(row, &client, &format!("rejected: {reason}"), &mut rejected)
                        .await?;
                }
                Err(StepError::Fatal(AggregateError::NoUsableUpdate(reason))) => {
                    let failure = RoundFailure::no_usable_update(&reason);
                    self.ledger.fail_round(job_id, round, &failure).await?;
                    return Err(failure.into());
                }
                Err(StepError::Fatal(e)) => return Err(super::core_error(e)),
            }
        };
        plan.shards = cut.shards;
        plan.statistics = cut.statistics;
        plan.engine_rejected = rejected;
        plan.model_upload = self
            .store
            .create_upload(&keys::global_model(job_id, round + 1))
            .await?;
        if cut.writes_state {
            plan.state_upload = Some(
                self.store
                    .create_upload(&keys::server_state(job_id, round + 1))
                    .await?,
            );
        }
        if let Some(decision) = cut.decision {
            put_json(
                &self.store,
                &decision_key(job_id, round, attempt),
                &Decided::Decision(decision),
            )
            .await?;
        }
        put_json(&self.store, &plan_key(job_id, round, attempt), &plan).await?;
        Ok(PlanOutcome::Planned {
            attempt: attempt.to_string(),
            shards: (0..cut.shards).collect(),
            statistics: cut.statistics,
            concurrency: job.sharding.concurrency,
        })
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
    /// Async: where a row trained from an older version is rebased from
    /// (that version's global model, pinned now) and its staleness
    /// discount. The row's base_round was checked against the round.
    async fn rebase_from(&self, job: &Job, row: &UpdateRecord) -> Result<Option<RebaseFrom>> {
        let (Some(base), Some(settings)) = (row.base_round, job.asynchronous()) else {
            return Ok(None);
        };
        if base >= row.round {
            return Ok(None);
        }
        let key = keys::global_model(&row.job_id, base);
        // The server's own output, kept in the registry: gone is a system
        // failure, not the client's.
        let stat = self.store.stat(&key).await?.ok_or_else(|| {
            CloudError::NotFound(format!(
                "version {base} of job `{}` (the model `{}` trained from) is gone from `{key}`",
                row.job_id, row.client_id
            ))
        })?;
        Ok(Some(RebaseFrom {
            model: Pinned::new(&key, &stat, None),
            weight: settings.staleness.weight(row.round - base),
        }))
    }
}

/// How the opened aggregation is cut, and its decision when no
/// statistics are needed.
struct Cut {
    shards: usize,
    statistics: bool,
    writes_state: bool,
    decision: Option<Decision>,
}
