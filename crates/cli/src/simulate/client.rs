//! One simulated client taking part in one round, over the same ports a
//! real client uses (docs/design.md §3 step 2): take `global_model_ready` from
//! its queue, download the global model through the store and verify its
//! checksum, train with fedstep-trainer, upload to `keys::update`, put its
//! `updates` row through the ledger, and only then delete the message.
//!
//! Why not `fedstep_client::Worker`: the simulator needs clients that
//! misbehave on purpose (shuffled labels, sign-flipped updates) and that
//! report metrics from a held-out validation slice, and its own round
//! progress bar; the worker's per-round spinner would draw over it. The
//! protocol steps are the same few port calls.
//!
//! What a simulated client reports: `llm_type = "SpikingEvoTextLM"` with
//! `loss` = cross-entropy on its validation slice and `perplexity` =
//! exp(loss), so `quality` weighting (docs/design.md §4) gives it
//! (1/(1+ln ppl) + 1/(1+loss))/2 = 1/(1+loss): a client whose labels are
//! garbage measures a high loss on its own held-out data and weighs less.
//! `accuracy`, `train_loss` and `train_accuracy` ride along for the report.
//! A byzantine client reports the metrics of its honest model (it lies).
//!
//! With FedSelect (`personal`), a client trains from the global model
//! merged with its personal values, splits the result with fedstep-core's
//! `split_update`, uploads the masked file through the same key and row,
//! and keeps `personal.safetensors` in its work directory across rounds.
//! The metrics it reports are its personalized model's.
//!
//! With SCAFFOLD (`algorithm = Scaffold`), a client also downloads the
//! round's server variate c (the message names it and its checksum),
//! trains with the drift correction c − c_i, uploads Δc_i to
//! `keys::variate_delta` before its row (which commits to its checksum;
//! the engine's commit updates c), and only once the row is in replaces its own c_i
//! (`scaffold_variate.safetensors` in its work directory, renamed into
//! place: a crash leaves the old variate or the new one, never half).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use fedstep_cloud::keys;
use fedstep_cloud::ports::{ClientQueue, Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{GlobalModelReady, Notification, UpdateRecord, SCHEMA};
use fedstep_core::personalization::{merge_personal, split_update, Ramp};
use fedstep_core::Limits;
use fedstep_trainer::{evaluate, train_local, train_scaffold, MlpParams, TrainConfig};
use serde_json::Value;

use super::args::Algorithm;
use super::attack::sign_flip;
use super::data::ClientShare;
use super::timestamp::rfc3339_now;

/// The model type simulated clients claim (see the module docs).
pub const LLM_TYPE: &str = "SpikingEvoTextLM";

pub struct SimClient {
    pub index: usize,
    pub share: ClientShare,
    pub cfg: TrainConfig,
    pub byzantine_scale: f64,
    /// FedSelect's schedule, when the client personalizes.
    pub personal: Option<Ramp>,
    /// This client's directory: per-round scratch and, with FedSelect, its
    /// personal file (which never leaves it).
    pub workdir: PathBuf,
    /// fedavg, fedprox (μ is in `cfg`) or scaffold.
    pub algorithm: Algorithm,
}

/// What local training handed back: the file to upload, the metrics to
/// report, the claimed example count and, with SCAFFOLD, the variate files.
struct Trained {
    upload: PathBuf,
    metrics: BTreeMap<String, f64>,
    num_examples: usize,
    variates: Option<VariateFiles>,
}

/// What a SCAFFOLD client produced beside its model.
struct VariateFiles {
    /// Δc_i, to upload.
    delta: PathBuf,
    /// c_i⁺, to keep once the row is in.
    next: PathBuf,
}

/// What one client did in one round: the row it wrote (the driver hands it
/// to the engine as the DynamoDB stream would) and how long it took.
pub struct ClientRound {
    pub record: UpdateRecord,
    pub seconds: f64,
}

/// Async: an update trained from version `base_round`, not yet submitted.
pub struct Pending {
    trained: Trained,
    pub base_round: u32,
    dir: PathBuf,
}

impl SimClient {
    /// Takes the next message from `queue` and, for `global_model_ready`
    /// of `job_id`'s round `round`, takes part in that round.
    pub async fn take_part<Q, S, L>(
        self: Arc<Self>,
        queue: &Q,
        store: &S,
        ledger: &L,
        job_id: &str,
        round: u32,
    ) -> Result<ClientRound>
    where
        Q: ClientQueue,
        S: ObjectStore,
        L: Ledger,
    {
        let started = Instant::now();
        let id = self.share.id.clone();
        let mut messages = queue.receive(1, 0).await?;
        let Some(message) = messages.pop() else {
            bail!("{id}: no global_model_ready on its queue for round {round}");
        };
        let ready = match serde_json::from_str::<Notification>(&message.body)
            .with_context(|| format!("{id}: malformed message {:?}", message.body))?
        {
            Notification::GlobalModelReady(m) if m.job_id == job_id && m.round == round => m,
            other => {
                bail!("{id}: expected global_model_ready for {job_id} round {round}, got {other:?}")
            }
        };

        let dir = self.workdir.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let global_path = dir.join("global.safetensors");
        let got = store.get_file(&ready.model_key, &global_path).await?;
        if got.sha256 != ready.checksum {
            bail!(
                "{id}: global model {} has sha256 {} but the message says {}",
                ready.model_key,
                got.sha256,
                ready.checksum
            );
        }
        let server_variate = if self.algorithm == Algorithm::Scaffold {
            let Some(c) = &ready.server_variate else {
                bail!("{id}: round {round}'s global_model_ready names no server variate");
            };
            let path = dir.join("server_variate.safetensors");
            let got = store
                .get_file(&c.key, &path)
                .await
                .with_context(|| format!("{id}: downloading round {round}'s server variate"))?;
            if got.sha256 != c.checksum {
                bail!(
                    "{id}: server variate {} has sha256 {} but the message says {}",
                    c.key,
                    got.sha256,
                    c.checksum
                );
            }
            Some(path)
        } else {
            None
        };
        let me = Arc::clone(&self);
        let scratch = dir.clone();
        let trained = tokio::task::spawn_blocking(move || {
            me.train(&global_path, server_variate.as_deref(), &scratch, round)
        })
        .await
        .map_err(|e| anyhow!("{id}: training task: {e}"))??;
        let record = self
            .submit(store, ledger, job_id, round, None, &trained)
            .await?;
        let variates = trained.variates;
        // The row is in: the server will count this Δc_i, so c_i moves on.
        if let Some(v) = &variates {
            std::fs::rename(&v.next, self.variate_path())
                .with_context(|| format!("{id}: keeping its control variate"))?;
        }
        queue.delete(&message.receipt).await?;
        std::fs::remove_dir_all(&dir).ok();
        Ok(ClientRound {
            record,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Uploads what was trained (Δc_i first, with SCAFFOLD) and writes the
    /// row for `round`; `base_round`: an async client's version it trained
    /// from, when older.
    async fn submit<S, L>(
        &self,
        store: &S,
        ledger: &L,
        job_id: &str,
        round: u32,
        base_round: Option<u32>,
        trained: &Trained,
    ) -> Result<UpdateRecord>
    where
        S: ObjectStore,
        L: Ledger,
    {
        let id = &self.share.id;
        let variate_delta_checksum = match &trained.variates {
            Some(v) => Some(
                store
                    .put_update_file(&keys::variate_delta(job_id, round, id), &v.delta)
                    .await?
                    .sha256,
            ),
            None => None,
        };
        let key = keys::update(job_id, round, id);
        let put = store.put_file(&key, &trained.upload).await?;
        let record = UpdateRecord {
            client_id: id.clone(),
            job_round: keys::job_round(job_id, round),
            job_id: job_id.to_string(),
            round,
            model_key: key,
            checksum: put.sha256,
            store_checksum: put.store_checksum,
            num_examples: Value::from(trained.num_examples as u64),
            llm_type: Some(LLM_TYPE.to_string()),
            metrics: trained
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
            bytes: put.bytes,
            trained_at: rfc3339_now(),
            schema: Some(SCHEMA),
            variate_delta_checksum,
            base_round,
        };
        match ledger.put_update(&record).await? {
            PutUpdate::Created | PutUpdate::AlreadyThere => Ok(record),
            PutUpdate::Conflict(other) => bail!(
                "{id}: a different update (sha256 {}) is already recorded for round {round}",
                other.checksum
            ),
        }
    }

    /// Async: downloads version `ready` (checksum verified) and trains from
    /// it; the result waits in this client's directory until the driver's
    /// clock says it is done.
    pub async fn train_version<S: ObjectStore>(
        self: Arc<Self>,
        store: &S,
        ready: &GlobalModelReady,
    ) -> Result<Pending> {
        let id = self.share.id.clone();
        let version = ready.round;
        let dir = self.workdir.join(format!("version-{version}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let global_path = dir.join("global.safetensors");
        let got = store.get_file(&ready.model_key, &global_path).await?;
        if got.sha256 != ready.checksum {
            bail!(
                "{id}: version {version} {} has sha256 {} but the message says {}",
                ready.model_key,
                got.sha256,
                ready.checksum
            );
        }
        let me = Arc::clone(&self);
        let scratch = dir.clone();
        let trained =
            tokio::task::spawn_blocking(move || me.train(&global_path, None, &scratch, version))
                .await
                .map_err(|e| anyhow!("{id}: training task: {e}"))??;
        Ok(Pending {
            trained,
            base_round: version,
            dir,
        })
    }

    /// Async: writes `pending` as this client's row for `round` (the version
    /// being buffered), naming the version it was trained from.
    pub async fn submit_pending<S, L>(
        &self,
        store: &S,
        ledger: &L,
        job_id: &str,
        round: u32,
        pending: Pending,
    ) -> Result<UpdateRecord>
    where
        S: ObjectStore,
        L: Ledger,
    {
        let record = self
            .submit(
                store,
                ledger,
                job_id,
                round,
                Some(pending.base_round),
                &pending.trained,
            )
            .await?;
        std::fs::remove_dir_all(&pending.dir).ok();
        Ok(record)
    }

    /// This client's personal file (FedSelect).
    pub fn personal_path(&self) -> PathBuf {
        self.workdir.join("personal.safetensors")
    }

    /// This client's SCAFFOLD variate c_i (private; zeros until its first
    /// round).
    pub fn variate_path(&self) -> PathBuf {
        self.workdir.join("scaffold_variate.safetensors")
    }

    /// Local training (CPU-bound; runs on a blocking thread). Writes the
    /// file to send into `dir`.
    fn train(
        &self,
        global_path: &Path,
        server_variate: Option<&Path>,
        dir: &Path,
        round: u32,
    ) -> Result<Trained> {
        let id = &self.share.id;
        let limits = Limits::default();
        let personal = self.personal_path();
        let global = std::fs::read(global_path)?;
        // FedSelect: start from the global model with the personal values
        // put back (none yet in the first round).
        let start = if self.personal.is_some() && personal.exists() {
            let merged = dir.join("merged.safetensors");
            merge_personal(global_path, &personal, &merged, &limits)
                .with_context(|| format!("{id}: merging its personal values"))?;
            std::fs::read(&merged)?
        } else {
            global.clone()
        };
        // A distinct, reproducible minibatch order per client and round.
        let round_seed = u64::from(round) * 1000 + self.index as u64;
        let (out, variates) = match server_variate {
            None => (
                train_local(&start, &self.share.train, &self.cfg, round_seed)
                    .with_context(|| format!("{id}: local training"))?,
                None,
            ),
            Some(c_path) => self.train_scaffold(&start, c_path, dir, round_seed)?,
        };
        let val = evaluate(&out.model_bytes, &self.share.validation)?;
        let mut metrics = BTreeMap::from([
            ("loss".to_string(), val.loss),
            // Capped so a diverged client still reports a finite number.
            ("perplexity".to_string(), val.loss.min(700.0).exp()),
            ("accuracy".to_string(), val.accuracy),
        ]);
        for (k, v) in &out.metrics {
            metrics.insert(format!("train_{k}"), *v);
        }
        let upload = dir.join("update.safetensors");
        match (&self.personal, self.share.byzantine) {
            (_, true) => std::fs::write(
                &upload,
                sign_flip(&global, &out.model_bytes, self.byzantine_scale)?,
            )?,
            (None, false) => std::fs::write(&upload, &out.model_bytes)?,
            (Some(ramp), false) => {
                let local = dir.join("local.safetensors");
                std::fs::write(&local, &out.model_bytes)?;
                let next = dir.join("personal.safetensors");
                let previous = personal.exists().then_some(personal.as_path());
                let split = split_update(
                    global_path,
                    &local,
                    &ramp.at(round),
                    previous,
                    &upload,
                    &next,
                    &limits,
                )
                .with_context(|| format!("{id}: splitting its update"))?;
                std::fs::rename(&next, &personal)
                    .with_context(|| format!("{id}: keeping {}", personal.display()))?;
                metrics.insert(
                    "personal_fraction".to_string(),
                    split.personal_elements as f64 / split.float_elements.max(1) as f64,
                );
            }
        }
        Ok(Trained {
            upload,
            metrics,
            num_examples: out.num_examples,
            variates,
        })
    }

    /// SCAFFOLD's local round: c from the round's file, c_i from this
    /// client's own (zeros at first), Δc_i and c_i⁺ written into `dir`.
    fn train_scaffold(
        &self,
        global: &[u8],
        server_variate: &Path,
        dir: &Path,
        round_seed: u64,
    ) -> Result<(fedstep_trainer::TrainOutcome, Option<VariateFiles>)> {
        let id = &self.share.id;
        let params = MlpParams::from_safetensors(global)?;
        let c = MlpParams::from_safetensors(&std::fs::read(server_variate)?)
            .with_context(|| format!("{id}: the round's server variate"))?;
        let mine = self.variate_path();
        let c_i = if mine.exists() {
            MlpParams::from_safetensors(&std::fs::read(&mine)?)
                .with_context(|| format!("{id}: its own variate {}", mine.display()))?
        } else {
            MlpParams::zeros(params.shape())?
        };
        let out = train_scaffold(&params, &self.share.train, &self.cfg, round_seed, &c, &c_i)
            .with_context(|| format!("{id}: local training (scaffold)"))?;
        let files = VariateFiles {
            delta: dir.join("scaffold_delta.safetensors"),
            next: dir.join("scaffold_variate.next.safetensors"),
        };
        std::fs::write(&files.delta, out.delta.to_safetensors()?)?;
        std::fs::write(&files.next, out.client_variate.to_safetensors()?)?;
        let outcome = fedstep_trainer::TrainOutcome {
            model_bytes: out.trained.to_safetensors()?,
            num_examples: self.share.train.len(),
            metrics: BTreeMap::from([
                ("loss".to_string(), out.eval.loss),
                ("accuracy".to_string(), out.eval.accuracy),
            ]),
        };
        Ok((outcome, Some(files)))
    }
}
