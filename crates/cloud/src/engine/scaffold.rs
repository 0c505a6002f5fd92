//! SCAFFOLD's server side as the round engine runs it (issue #19): the
//! server control variate c beside each round's global model, and its
//! update from the clients' Δc_i when the round commits. The arithmetic is
//! fedstep-core's (`fedstep_core::scaffold`); this file decides which
//! objects it reads and writes, and which failures are a client's.
//!
//! - **StartRound** names the round's c (key and SHA-256) in
//!   `global_model_ready`, so clients verify it as they verify the model.
//!   Round 1's c is zeros, written here from the global model's header when
//!   absent (idempotent: the same bytes each time); a later round's must
//!   have been written by the previous commit, else the round cannot start
//!   (the system's failure).
//! - **CommitRound** sets c ← c + (|S|/N)·mean Δc_i over the clients the
//!   round accepted and writes it as round r+1's, before the round closes
//!   (like the model: a closed round's outputs are all there). A Δc_i that
//!   is missing, larger than a variate of this model can be, not the bytes
//!   the client's row committed to (`variate_delta_checksum`), or that
//!   does not parse, or that changed or vanished between its HEAD and its
//!   read, is left out of c with a bounded reason; the client's model
//!   still counts. A store that fails to answer (`Unavailable`) is the
//!   system's failure: the task is retried.
//! - **Memory**: c, the running sum (f64) and one Δc_i at a time, about
//!   5× the model's float tensors as F32: c is not cut into shards.

use std::collections::BTreeMap;

use fedstep_core::bytes::is_unavailable;
use fedstep_core::model::read_header_from;
use fedstep_core::scaffold::{
    read_state, write_state, ServerState, ServerUpdateMeasurement, VariateLayout, VariateSum,
};
use fedstep_core::Limits;

use super::RoundEngine;
use crate::bounded;
use crate::checksum::Sha256Hasher;
use crate::error::{CloudError, Result};
use crate::job::Job;
use crate::keys;
use crate::ports::{Clock, Ledger, Notifier, ObjectStat, StreamingStore, TaskCallback};
use crate::records::{ServerVariateRef, UpdateRecord};

/// Room for a variate file's header beyond its F32 values.
const HEADER_SLACK_BYTES: u64 = 1 << 20;

impl<S, L, N, C, K> RoundEngine<S, L, N, C, K>
where
    S: StreamingStore,
    L: Ledger,
    N: Notifier,
    C: TaskCallback,
    K: Clock,
{
    /// The round's c for `global_model_ready`; round 1's written if absent.
    pub(super) async fn round_server_variate(
        &self,
        job: &Job,
        round: u32,
    ) -> Result<ServerVariateRef> {
        let key = keys::server_variate(&job.job_id, round);
        // Its hash as the store keeps it, like the global model's (the
        // writer tags what it wrote in order).
        if let Some(stored) = self.store.head(&key).await? {
            if stored.sha256.is_empty() {
                return Err(CloudError::Other(format!("`{key}` has no SHA-256")));
            }
            return Ok(ServerVariateRef {
                key,
                checksum: stored.sha256,
            });
        }
        if round != 1 {
            return Err(CloudError::NotFound(format!(
                "round {round}'s SCAFFOLD server variate is not at `{key}` \
                 (round {}'s commit writes it)",
                round - 1
            )));
        }
        let layout = self.variate_layout(job, round).await?;
        let bytes = write_state(&ServerState::initial(&layout, job.clients.len()))
            .map_err(CloudError::Other)?;
        let checksum = sha256(&bytes);
        super::sharded::put_bytes(&self.store, &key, bytes).await?;
        Ok(ServerVariateRef { key, checksum })
    }

    /// Round r+1's c from round r's and the Δc_i of `accepted`, written
    /// at its key; returns what happened, for the round's measurements.
    pub(super) async fn next_server_variate(
        &self,
        job: &Job,
        round: u32,
        accepted: &[String],
        rows: &BTreeMap<String, UpdateRecord>,
    ) -> Result<ServerUpdateMeasurement> {
        let limits = Limits::default();
        let layout = self.variate_layout(job, round).await?;
        let current_key = keys::server_variate(&job.job_id, round);
        let current = self.read_own(&current_key).await?.ok_or_else(|| {
            CloudError::NotFound(format!("the SCAFFOLD server variate `{current_key}`"))
        })?;
        let state = read_state(&current, &layout, job.clients.len(), &limits).map_err(|e| {
            CloudError::Other(format!("the server variate at `{current_key}`: {e}"))
        })?;
        drop(current);

        let most = variate_bytes(&layout) + HEADER_SLACK_BYTES;
        let mut sum = VariateSum::new(&layout);
        for client in accepted {
            let key = keys::variate_delta(&job.job_id, round, client);
            let Some(want) = rows
                .get(client)
                .and_then(|r| r.variate_delta_checksum.clone())
            else {
                sum.reject(
                    client,
                    "scaffold Δc: the row names no variate_delta_checksum".into(),
                );
                continue;
            };
            let Some(stat) = self.store.stat(&key).await? else {
                sum.reject(client, format!("scaffold Δc: nothing at `{key}`"));
                continue;
            };
            if stat.bytes > most {
                sum.reject(
                    client,
                    format!(
                        "scaffold Δc: {} bytes, more than a variate of this model can be ({most})",
                        stat.bytes
                    ),
                );
                continue;
            }
            let (bytes, got) = match self.read_delta(&key, &stat).await? {
                Ok(read) => read,
                Err(reason) => {
                    sum.reject(client, bounded::reason(&format!("scaffold Δc: {reason}")));
                    continue;
                }
            };
            if got != want {
                sum.reject(
                    client,
                    bounded::reason(&format!(
                        "scaffold Δc: `{key}` has SHA-256 {got}, the row committed to {}",
                        bounded::quote(&want)
                    )),
                );
                continue;
            }
            sum.add(client, &bytes, &limits);
        }
        let update = sum
            .finish(&state.variate, job.clients.len())
            .map_err(CloudError::Other)?;
        let next = ServerState {
            variate: update.variate,
            step: state.step + 1,
            total_clients: job.clients.len(),
        };
        let bytes = write_state(&next).map_err(CloudError::Other)?;
        super::sharded::put_bytes(
            &self.store,
            &keys::server_variate(&job.job_id, round + 1),
            bytes,
        )
        .await?;
        let mut measurement = update.measurement;
        for (_, reason) in &mut measurement.rejected {
            *reason = bounded::reason(reason);
        }
        Ok(measurement)
    }

    /// The variate's tensors: the float tensors of round `round`'s global
    /// model, from its header alone.
    async fn variate_layout(&self, job: &Job, round: u32) -> Result<VariateLayout> {
        let key = keys::global_model(&job.job_id, round);
        let stat = self
            .store
            .stat(&key)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("the global model `{key}`")))?;
        let reader = self.store.reader(&key, &stat, 0)?;
        let header = tokio::task::spawn_blocking(move || {
            read_header_from(&*reader, &Limits::default()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| CloudError::Other(format!("reading `{key}` panicked: {e}")))?
        .map_err(|e| CloudError::Other(format!("the global model `{key}`: {e}")))?;
        Ok(VariateLayout::of(&header))
    }

    /// A client's Δc_i and its SHA-256, read as pinned by `stat`. A read
    /// the store could not serve (`Unavailable`: throttled, unreachable) is
    /// the system's failure, retried; any other (the object changed or
    /// vanished since its HEAD) is the client's, a reason.
    async fn read_delta(
        &self,
        key: &str,
        stat: &ObjectStat,
    ) -> Result<std::result::Result<(Vec<u8>, String), String>> {
        let reader = self.store.reader(key, stat, stat.bytes.min(8 << 20))?;
        let (key_owned, size) = (key.to_string(), stat.bytes as usize);
        tokio::task::spawn_blocking(move || {
            let read = |e: std::io::Error| {
                if is_unavailable(&e) {
                    Err(CloudError::Transient(format!("reading `{key_owned}`: {e}")))
                } else {
                    Ok(Err(format!("reading `{key_owned}`: {e}")))
                }
            };
            let mut buf = vec![0u8; size];
            if let Err(e) = reader.read_exact_at(&mut buf, 0) {
                return read(e);
            }
            match reader.sha256() {
                Ok(sha) => Ok(Ok((buf, sha))),
                Err(e) => read(e),
            }
        })
        .await
        .map_err(|e| CloudError::Other(format!("reading `{key}` panicked: {e}")))?
    }

    /// One of the system's own objects (c, written by the engine), whole;
    /// `None` if absent. Any read failure is the system's.
    async fn read_own(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(stat) = self.store.stat(key).await? else {
            return Ok(None);
        };
        let reader = self.store.reader(key, &stat, stat.bytes.min(8 << 20))?;
        let key_owned = key.to_string();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; stat.bytes as usize];
            reader
                .read_exact_at(&mut buf, 0)
                .map_err(|e| CloudError::Transient(format!("reading `{key_owned}`: {e}")))?;
            Ok(Some(buf))
        })
        .await
        .map_err(|e| CloudError::Other(format!("reading `{key}` panicked: {e}")))?
    }
}

/// The F32 values of a variate of `layout`, in bytes.
fn variate_bytes(layout: &VariateLayout) -> u64 {
    layout
        .tensors()
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64 * 4)
        .sum()
}

fn sha256(bytes: &[u8]) -> String {
    let mut h = Sha256Hasher::default();
    h.update(bytes);
    h.finish_hex()
}
