//! Taking part in one round (docs/design.md §3 step 2): skip if our row is
//! already there, download and verify the global model (and, SCAFFOLD, the
//! server variate), train, check the output, upload it to our key (and
//! Δc_i to its own), and write our `updates` row. Every step is
//! safe to repeat: the key is deterministic and the row is a conditional
//! put, so a crash between any two steps only means doing some of them
//! again on redelivery.

use std::path::Path;

use fedstep_cloud::keys;
use fedstep_cloud::ports::{ClientQueue, Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{GlobalModelReady, UpdateRecord, SCHEMA};
use fedstep_core::model;
use serde_json::Value;

use crate::error::ClientError;
use crate::output_check::check_output;
use crate::progress::Progress;
use crate::retry::retry;
use crate::scaffold::ClientVariates;
use crate::trainer::{TrainRequest, Trainer};
use crate::version::Destination;
use crate::worker::Worker;
use fedstep_cloud::timefmt::rfc3339_utc;

/// How a round ended for this client. Every variant means "the message can
/// be deleted"; failures are errors.
#[derive(Debug, Clone, PartialEq)]
pub enum RoundOutcome {
    /// Our model is uploaded and our row written, in `round` (async: the
    /// newest version when we finished; else the message's round).
    Submitted {
        checksum: String,
        bytes: u64,
        round: u32,
    },
    /// Our row was already there before we started: the round is done.
    AlreadyDone,
    /// We trained again, but the identical row was already there (a retry
    /// after a crash between the row and the delete): a no-op.
    AlreadyThere,
    /// A different row exists for us in this round; it stays.
    Conflict { existing_checksum: String },
    /// Async: the job ended while the update waited for a version to go to.
    JobEnded,
}

impl<Q, S, L, T> Worker<Q, S, L, T>
where
    Q: ClientQueue + 'static,
    S: ObjectStore,
    L: Ledger,
    T: Trainer,
{
    pub(crate) async fn take_part(
        &self,
        m: &GlobalModelReady,
    ) -> Result<RoundOutcome, ClientError> {
        let me = self.opts.client_id.as_str();
        let b = &self.opts.backoff;
        let existing = retry("get_update", b, || {
            self.ledger.get_update(me, &m.job_id, m.round)
        })
        .await?;
        // Async: a row of ours in this version that was trained from an
        // older one does not mean we trained from this one.
        if existing.is_some_and(|row| row.base_round.is_none_or(|b| b == row.round)) {
            return Ok(RoundOutcome::AlreadyDone);
        }

        crate::workdir::prepare(&self.opts.workdir)?;
        // A fresh directory per attempt, removed when this function returns
        // or is dropped (abandoned): nothing stale is ever re-read.
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-r{}-", m.job_id, m.round))
            .tempdir_in(&self.opts.workdir)
            .map_err(ClientError::io(&self.opts.workdir))?;
        let global = dir.path().join("global.safetensors");
        let output = dir.path().join("update.safetensors");
        let metrics_out = dir.path().join("metrics.json");
        let progress = Progress::new(format!("{} round {}", m.job_id, m.round));

        progress.stage("downloading the global model");
        let got = retry("download global model", b, || {
            self.store.get_file(&m.model_key, &global)
        })
        .await?;
        if got.sha256 != m.checksum {
            return Err(ClientError::Checksum {
                key: m.model_key.clone(),
                expected: m.checksum.clone(),
                actual: got.sha256,
            });
        }
        let global_header = open_global(&global, &m.model_key, &self.opts.limits)?;

        // FedSelect: train from the global model with our personal values.
        let personal = self.opts.personalization.as_ref();

        // SCAFFOLD: the round's server variate, verified like the model,
        // and our own variate (zeros before our first SCAFFOLD round).
        let variates = ClientVariates::new(&self.opts.workdir);
        let scaffold = match &m.server_variate {
            None => None,
            Some(_) if personal.is_some() => {
                return Err(ClientError::Scaffold(
                    "this client personalizes (FedSelect) and the job trains SCAFFOLD: \
                     the two do not run together (ARCHITECTURE.md, \"Client drift\")"
                        .into(),
                ))
            }
            Some(c) => {
                progress.stage("downloading the server variate");
                let path = dir.path().join("server_variate.safetensors");
                let got = retry("download server variate", b, || {
                    self.store.get_file(&c.key, &path)
                })
                .await?;
                if got.sha256 != c.checksum {
                    return Err(ClientError::Checksum {
                        key: c.key.clone(),
                        expected: c.checksum.clone(),
                        actual: got.sha256,
                    });
                }
                Some(variates.files(&m.job_id, &global_header, path, dir.path())?)
            }
        };
        let start = match personal {
            Some(p) => p.start_from(&m.job_id, &global, dir.path(), &self.opts.limits)?,
            None => global.clone(),
        };

        progress.stage("training");
        let report = self
            .trainer
            .train(TrainRequest {
                job_id: m.job_id.clone(),
                round: m.round,
                global_model: start,
                output_model: output.clone(),
                metrics_out,
                round_config: m.round_config.clone(),
                scaffold: scaffold.clone(),
            })
            .await?;
        check_output(&global_header, &output, &report, &self.opts.limits)
            .map_err(ClientError::Output)?;
        let pending_variate = match &scaffold {
            Some(files) => Some((
                files.delta_out.clone(),
                variates.next(&m.job_id, &global_header, files, &self.opts.limits)?,
            )),
            None => None,
        };

        // FedSelect: upload the shared values and masks; the personal
        // values stay here (kept once our row is in).
        let (upload, pending) = match personal {
            Some(p) => {
                let (upload, pending) = p.split(
                    &m.job_id,
                    m.round,
                    &global,
                    &output,
                    dir.path(),
                    &self.opts.limits,
                )?;
                (upload, Some(pending))
            }
            None => (output.clone(), None),
        };

        // Async: the newest version announced by now (version.rs).
        let round = if m.asynchronous {
            progress.stage("finding the newest version");
            match self.destination(m).await? {
                Destination::Version(v) => v,
                Destination::JobEnded => return Ok(RoundOutcome::JobEnded),
            }
        } else {
            m.round
        };

        progress.stage("uploading the local model");
        let key = keys::update(&m.job_id, round, me);
        let put = retry("upload local model", b, || {
            self.store.put_update_file(&key, &upload)
        })
        .await?;

        // SCAFFOLD: Δc_i beside the update, before the row that commits
        // to its checksum (expired with the updates: tagged like them).
        let variate_delta_checksum = match &pending_variate {
            Some((delta, _)) => {
                progress.stage("uploading Δc_i");
                let key = keys::variate_delta(&m.job_id, round, me);
                let put = retry("upload Δc_i", b, || {
                    self.store.put_update_file(&key, delta)
                })
                .await?;
                Some(put.sha256)
            }
            None => None,
        };

        progress.stage("recording the update");
        let record = UpdateRecord {
            client_id: me.to_string(),
            job_round: keys::job_round(&m.job_id, round),
            job_id: m.job_id.clone(),
            round,
            model_key: key,
            checksum: put.sha256.clone(),
            store_checksum: put.store_checksum.clone(),
            num_examples: Value::from(report.num_examples),
            llm_type: report.llm_type,
            metrics: report
                .metrics
                .into_iter()
                .map(|(k, v)| (k, Value::from(v)))
                .collect(),
            bytes: put.bytes,
            trained_at: rfc3339_utc(self.clock.now()),
            schema: Some(SCHEMA),
            variate_delta_checksum,
            base_round: (round != m.round).then_some(m.round),
        };
        let outcome = match retry("put_update", b, || self.ledger.put_update(&record)).await? {
            PutUpdate::Created => RoundOutcome::Submitted {
                checksum: put.sha256,
                bytes: put.bytes,
                round,
            },
            PutUpdate::AlreadyThere => RoundOutcome::AlreadyThere,
            PutUpdate::Conflict(other) => RoundOutcome::Conflict {
                existing_checksum: other.checksum,
            },
        };
        // The personal values that go with the row the server has: ours
        // unless another row (a different checksum) got there first.
        if let (Some(p), Some(pending)) = (personal, pending) {
            if !matches!(outcome, RoundOutcome::Conflict { .. }) {
                p.keep(pending)?;
            }
        }
        // SCAFFOLD: likewise c_i⁺, so c_i stays the sum of the Δc_i the
        // server was told about.
        if let Some((_, pending)) = pending_variate {
            if !matches!(outcome, RoundOutcome::Conflict { .. }) {
                variates.keep(pending)?;
            }
        }
        Ok(outcome)
    }
}

fn open_global(
    path: &Path,
    key: &str,
    limits: &fedstep_core::Limits,
) -> Result<model::ModelHeader, ClientError> {
    model::open(path, limits)
        .map(|(_, header)| header)
        .map_err(|e| ClientError::BadGlobalModel {
            key: key.to_string(),
            reason: e.to_string(),
        })
}
