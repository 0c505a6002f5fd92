//! The tasks between the plan and the commit, each run once per shard (or
//! once) by the workflow, each in whatever process: a shard's statistics
//! pass, the decision from all shards' statistics, and a shard's combine
//! pass, which uploads its parts of the next global model (and state) and
//! hashes its share of the inputs. Every task reopens the aggregation from
//! the attempt's plan and stores its answer in the attempt's folder; run
//! again, it computes and stores the same answer (parts of the same
//! numbers replace the earlier ones).

use std::collections::BTreeMap;
use std::sync::Arc;

use fedstep_core::aggregate::{prepare, Prepared, Sharding, StepError};
use fedstep_core::shard::{PartDest, PartStore, MIN_PART_BYTES};
use fedstep_core::AggregationRequest;
use serde::{Deserialize, Serialize};

use super::attempt::{
    decision_key, get_json, load_plan, put_json, shard_key, statistics_key, Decided, Opened, Plan,
    ShardOutcome, StatisticsDone,
};
use crate::engine::RoundEngine;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, ObjectReader, StreamingStore, TaskCallback};

/// What a shard task did, as the workflow sees it (it keeps nothing of it:
/// the answer is in the attempt's folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardTaskDone {
    pub shard: usize,
    /// The attempt no longer holds the round (another attempt took it
    /// over): nothing was computed; the commit sends the round back to
    /// the plan.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// Whether `attempt` still holds round `round` (AGGREGATING under its
    /// lease), renewing the lease when it does: one conditional write. A
    /// task of an attempt that lost the round does nothing; a task of one
    /// that holds it has a whole lease ahead (the lease outlasts any one
    /// task), so a Map of many waves is never taken over mid-way.
    pub(super) async fn holds_round(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
    ) -> Result<bool> {
        self.ledger
            .renew_lease(
                job_id,
                round,
                attempt,
                self.clock.now(),
                self.config.lease_seconds,
            )
            .await
    }

    /// ShardStatistics task: shard `shard`'s statistics pass (norms, the
    /// partial Gram matrix), stored for the decide task.
    pub async fn shard_statistics(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone> {
        let plan = load_plan(&self.store, job_id, round, attempt).await?;
        check_shard(&plan, shard)?;
        if !self.holds_round(job_id, round, attempt).await? {
            return Ok(ShardTaskDone {
                shard,
                superseded: true,
            });
        }
        let job = self.job_of(job_id).await?;
        let opened = Opened::open(
            &self.store,
            &plan,
            self.config.read_ahead_bytes,
            job.pipeline().limits(),
        )?;
        let p = plan.clone();
        let done = blocking(move || {
            with_attempt(&p, &job, &opened, |a| match a.statistics(shard) {
                Ok(s) => Ok(StatisticsDone::Statistics(s)),
                Err(StepError::Reject { input, reason }) => Ok(StatisticsDone::Rejected {
                    client: p.updates[input].row.client_id.clone(),
                    reason: format!("rejected: {reason}"),
                }),
                Err(StepError::Fatal(e)) => Err(super::core_error(e)),
            })
        })
        .await?;
        put_json(
            &self.store,
            &statistics_key(job_id, round, attempt, shard),
            &done,
        )
        .await?;
        Ok(ShardTaskDone {
            shard,
            superseded: false,
        })
    }

    /// DecideRound task: the decision from every shard's statistics (who
    /// is in, with which scale and weight; the noise key), stored for the
    /// shard tasks. A shard that rejected a client decides the attempt:
    /// it ends, and the commit plans a new one without that client.
    pub async fn decide_round(&self, job_id: &str, round: u32, attempt: &str) -> Result<()> {
        let plan = load_plan(&self.store, job_id, round, attempt).await?;
        if !self.holds_round(job_id, round, attempt).await? {
            return Ok(());
        }
        let mut stats = Vec::with_capacity(plan.shards);
        let mut refused = None;
        for shard in 0..plan.shards {
            let key = statistics_key(job_id, round, attempt, shard);
            match get_json::<_, StatisticsDone>(&self.store, &key).await? {
                Some(StatisticsDone::Statistics(s)) => stats.push(s),
                Some(StatisticsDone::Rejected { client, reason }) => {
                    refused.get_or_insert(Decided::Rejected { client, reason });
                }
                None => {
                    return Err(CloudError::Other(format!(
                        "shard {shard} of attempt `{attempt}` stored no statistics at `{key}`"
                    )))
                }
            }
        }
        let decided = match refused {
            Some(refused) => refused,
            None => {
                let job = self.job_of(job_id).await?;
                let opened = Opened::open(
                    &self.store,
                    &plan,
                    self.config.read_ahead_bytes,
                    job.pipeline().limits(),
                )?;
                let p = plan.clone();
                blocking(move || {
                    with_attempt(&p, &job, &opened, |a| match a.decide(&stats) {
                        Ok(d) => Ok(Decided::Decision(d)),
                        Err(StepError::Reject { input, reason }) => Ok(Decided::Rejected {
                            client: p.updates[input].row.client_id.clone(),
                            reason: format!("rejected: {reason}"),
                        }),
                        Err(StepError::Fatal(e)) => Err(super::core_error(e)),
                    })
                })
                .await?
            }
        };
        put_json(&self.store, &decision_key(job_id, round, attempt), &decided).await
    }

    /// AggregateShard task: shard `shard`'s combine pass, its parts of the
    /// next global model (and state) uploaded, and its share of the
    /// checksums: inputs `i` with `i mod shards == shard` must hash to
    /// what their rows committed to (the global model, input number `n`,
    /// to what the round was opened with), hashed after the pass with its
    /// readers. Bad values or a mismatched hash reject that client; the
    /// commit plans again.
    pub async fn aggregate_shard(
        &self,
        job_id: &str,
        round: u32,
        attempt: &str,
        shard: usize,
    ) -> Result<ShardTaskDone> {
        let plan = load_plan(&self.store, job_id, round, attempt).await?;
        check_shard(&plan, shard)?;
        if !self.holds_round(job_id, round, attempt).await? {
            return Ok(ShardTaskDone {
                shard,
                superseded: true,
            });
        }
        let decided: Decided = get_json(&self.store, &decision_key(job_id, round, attempt))
            .await?
            .ok_or_else(|| CloudError::Other(format!("attempt `{attempt}` has no decision yet")))?;
        let outcome = match decided {
            Decided::Rejected { .. } => ShardOutcome::Skipped,
            Decided::Decision(decision) => {
                let job = self.job_of(job_id).await?;
                let model = self
                    .store
                    .upload_parts(&keys::global_model(job_id, round + 1), &plan.model_upload)?;
                let state = match &plan.state_upload {
                    Some(id) => Some(
                        self.store
                            .upload_parts(&keys::server_state(job_id, round + 1), id)?,
                    ),
                    None => None,
                };
                let opened = Opened::open(
                    &self.store,
                    &plan,
                    self.config.read_ahead_bytes,
                    job.pipeline().limits(),
                )?;
                let p = plan.clone();
                let (m, st) = (model.clone(), state.clone());
                let (combined, hashed, bytes_fetched) = blocking(move || {
                    let combined = with_attempt(&p, &job, &opened, |a| {
                        let outputs = a.outputs(&decision).map_err(super::core_error)?;
                        let model_dest: Arc<dyn PartStore> = m;
                        let state_dest = st.map(|s| PartDest::Whole(s as Arc<dyn PartStore>));
                        match a.combine_shard(
                            &decision,
                            &outputs,
                            shard,
                            PartDest::Whole(model_dest),
                            state_dest,
                        ) {
                            Ok(done) => Ok(Ok(done)),
                            Err(StepError::Reject { input, reason }) => Ok(Err((
                                p.updates[input].row.client_id.clone(),
                                format!("rejected: {reason}"),
                            ))),
                            Err(StepError::Fatal(e)) => Err(super::core_error(e)),
                        }
                    })?;
                    // After the pass, with its readers: what it read in
                    // order is hashed already.
                    let hashed = hash_share(&p, &opened, shard)?;
                    let fetched = opened.all_readers.iter().map(|r| r.bytes_fetched()).sum();
                    Ok((combined, hashed, fetched))
                })
                .await?;
                match (combined, hashed) {
                    (Err((client, reason)), _) | (Ok(_), Some((client, reason))) => {
                        ShardOutcome::Rejected { client, reason }
                    }
                    (Ok(done), None) => ShardOutcome::Done {
                        done,
                        model: model.receipts(),
                        state: state.map(|s| s.receipts()).unwrap_or_default(),
                        bytes_fetched,
                    },
                }
            }
        };
        put_json(
            &self.store,
            &shard_key(job_id, round, attempt, shard),
            &outcome,
        )
        .await?;
        Ok(ShardTaskDone {
            shard,
            superseded: false,
        })
    }

    pub(super) async fn job_of(&self, job_id: &str) -> Result<Job> {
        self.ledger
            .get_job(job_id)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("job `{job_id}`")))
    }
}

/// An object a shard hashes: a client's update (`client`), or the global
/// model (`None`), and the SHA-256 it must have.
struct ToHash<'a> {
    client: Option<&'a str>,
    key: &'a str,
    want: &'a str,
    reader: &'a Arc<dyn ObjectReader>,
}

/// Hashes shard `shard`'s share of the inputs (input `i` when `i mod K`
/// is `shard`; the global model counts as input `n`) with the readers the
/// combine pass used; the first client whose object does not hash to its
/// row's checksum, with the reason. The global model not hashing to the
/// round's checksum is not a client's doing: an error. Blocking.
fn hash_share(plan: &Plan, opened: &Opened, shard: usize) -> Result<Option<(String, String)>> {
    let mine = |i: usize| i % plan.shards == shard;
    let updates = plan.updates.iter().zip(&opened.update_readers).enumerate();
    // A store-verified object is bound to its row already: never hashed.
    let mut share: Vec<ToHash<'_>> = updates
        .filter(|(i, (u, _))| mine(*i) && !u.object.store_verified)
        .map(|(_, (u, reader))| ToHash {
            client: Some(u.row.client_id.as_str()),
            key: &u.object.key,
            want: &u.row.checksum,
            reader,
        })
        .collect();
    if mine(plan.updates.len()) && !plan.global.store_verified {
        share.push(ToHash {
            client: None,
            key: &plan.global.key,
            want: &plan.global_checksum,
            reader: &opened.global_reader,
        });
    }
    for ToHash {
        client,
        key,
        want,
        reader,
    } in share
    {
        let reason = match (reader.sha256(), client) {
            (Ok(sha), _) if sha.eq_ignore_ascii_case(want) => continue,
            (Ok(sha), None) => {
                return Err(CloudError::Invalid(format!(
                    "global model `{key}` hashes to {sha} but round {} of job `{}` was opened with {want}",
                    plan.round, plan.job_id
                )))
            }
            (Ok(sha), Some(_)) => {
                format!("checksum: the row says {want} but the object at `{key}` hashes to {sha}")
            }
            (Err(e), None) => return Err(CloudError::Transient(format!("hashing `{key}`: {e}"))),
            (Err(e), Some(_)) if fedstep_core::bytes::is_unavailable(&e) => {
                return Err(CloudError::Transient(format!("hashing `{key}`: {e}")))
            }
            (Err(e), Some(_)) => format!("model: reading it to verify its checksum failed: {e}"),
        };
        return Ok(client.map(|c| (c.to_string(), reason)));
    }
    Ok(None)
}

fn check_shard(plan: &Plan, shard: usize) -> Result<()> {
    if shard < plan.shards {
        Ok(())
    } else {
        Err(CloudError::Invalid(format!(
            "shard {shard} is not one of the {} shards of attempt `{}`",
            plan.shards, plan.attempt
        )))
    }
}

/// Runs `f` on a blocking thread (the core is synchronous and its reads
/// block on the store).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CloudError::Other(format!("the aggregation task panicked: {e}")))?
}

/// Opens the attempt `plan` describes (the same cut every task makes) and
/// runs `f` on it.
pub(super) fn with_attempt<T>(
    plan: &Plan,
    job: &Job,
    opened: &Opened,
    f: impl FnOnce(&Prepared<'_>) -> Result<T>,
) -> Result<T> {
    let req = AggregationRequest {
        updates: &opened.sources,
        global: Some(opened.global.clone()),
        config: job.pipeline(),
        out: &opened.out,
        state_in: opened.state_in.clone(),
        state_out: Some(&opened.state_out),
        round: u64::from(plan.round),
    };
    let sharding = Sharding {
        shards: plan.shards_requested,
        min_shard_bytes: MIN_PART_BYTES,
    };
    let attempt = prepare(&req, sharding, &BTreeMap::new()).map_err(super::core_error)?;
    if attempt.shards().len() != plan.shards {
        return Err(CloudError::Other(format!(
            "attempt `{}` reopened as {} shards, planned as {}",
            plan.attempt,
            attempt.shards().len(),
            plan.shards
        )));
    }
    f(&attempt)
}
