//! A federation in one process over the local adapters: tiny f32 models,
//! clients that upload a file and write their `updates` row, and engines
//! that share one store, ledger, bus, callback recorder and clock.

use std::path::PathBuf;
use std::sync::Arc;

use fedstep_cloud::local::{FsStore, LocalBus, ManualClock, MemLedger, RecordingCallback};
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{UpdateRecord, SCHEMA};
use fedstep_cloud::{keys, EngineConfig, Job, JobSpec, RoundEngine};

pub type Engine = RoundEngine<FsStore, MemLedger, LocalBus, RecordingCallback, ManualClock>;

pub const LEASE: i64 = 60;

pub struct Fed {
    pub dir: tempfile::TempDir,
    pub store: FsStore,
    pub ledger: MemLedger,
    pub bus: LocalBus,
    pub callback: RecordingCallback,
    pub clock: ManualClock,
}

impl Default for Fed {
    fn default() -> Self {
        Self::new()
    }
}

impl Fed {
    pub fn new() -> Fed {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_800_000_000);
        Fed {
            store: FsStore::new(dir.path().join("bucket")).unwrap(),
            ledger: MemLedger::new(),
            bus: LocalBus::new(Arc::new(clock.clone())),
            callback: RecordingCallback::new(),
            clock,
            dir,
        }
    }

    pub fn engine(&self, owner: &str) -> Engine {
        RoundEngine::new(
            self.store.clone(),
            self.ledger.clone(),
            self.bus.clone(),
            self.callback.clone(),
            self.clock.clone(),
            EngineConfig {
                read_ahead_bytes: fedstep_cloud::DEFAULT_READ_AHEAD_BYTES,
                owner: owner.into(),
                lease_seconds: LEASE,
            },
        )
    }

    /// Writes a one-tensor f32 model to a local file.
    pub fn model_file(&self, name: &str, values: &[f32]) -> PathBuf {
        let path = self
            .dir
            .path()
            .join("files")
            .join(format!("{name}.safetensors"));
        crate::model::write_f32_model(&path, values).unwrap();
        path
    }

    /// What `fedstep job start` does before the first StartRound.
    pub async fn upload_initial(&self, job: &Job, values: &[f32]) {
        let f = self.model_file(&format!("{}-init", job.job_id), values);
        self.store
            .put_file(&keys::global_model(&job.job_id, 1), &f)
            .await
            .unwrap();
    }

    /// What a client does after training: upload, then write its row.
    pub async fn submit(
        &self,
        job: &Job,
        round: u32,
        client: &str,
        values: &[f32],
        num_examples: u64,
        metrics: &[(&str, f64)],
    ) -> UpdateRecord {
        self.submit_from(job, round, None, client, values, num_examples, metrics)
            .await
    }

    /// [`Fed::submit`] for an async job's client that trained from
    /// version `base_round` (None: from `round` itself).
    #[allow(clippy::too_many_arguments)]
    pub async fn submit_from(
        &self,
        job: &Job,
        round: u32,
        base_round: Option<u32>,
        client: &str,
        values: &[f32],
        num_examples: u64,
        metrics: &[(&str, f64)],
    ) -> UpdateRecord {
        let f = self.model_file(&format!("{}-{round}-{client}", job.job_id), values);
        let key = keys::update(&job.job_id, round, client);
        let info = self.store.put_file(&key, &f).await.unwrap();
        let row = UpdateRecord {
            client_id: client.into(),
            job_round: keys::job_round(&job.job_id, round),
            job_id: job.job_id.clone(),
            round,
            model_key: key,
            checksum: info.sha256,
            store_checksum: info.store_checksum,
            num_examples: num_examples.into(),
            llm_type: None,
            metrics: metrics
                .iter()
                .map(|(k, v)| (k.to_string(), (*v).into()))
                .collect(),
            bytes: info.bytes,
            trained_at: "2027-01-15T08:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round,
        };
        assert_eq!(
            self.ledger.put_update(&row).await.unwrap(),
            PutUpdate::Created
        );
        row
    }

    pub async fn global(&self, job: &Job, round: u32) -> Vec<f32> {
        self.values(&keys::global_model(&job.job_id, round)).await
    }

    /// The `w` tensor of the one-tensor model stored at `key`.
    pub async fn values(&self, key: &str) -> Vec<f32> {
        let out = self
            .dir
            .path()
            .join(format!("read-{}", key.replace('/', "_")));
        self.store.get_file(key, &out).await.unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("w")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

pub fn job(job_id: &str, rounds: u32, clients: &[&str], min_clients: u32) -> Job {
    JobSpec::from_toml(&format!(
        r#"
job_id = "{job_id}"
rounds = {rounds}
clients = [{}]
min_clients = {min_clients}
round_timeout_seconds = 600
[aggregation]
weighting = "examples"
[round_config]
local_epochs = 1
"#,
        clients
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .unwrap()
}

/// Σ nᵢ·xᵢ / Σ nᵢ, elementwise.
pub fn weighted_mean(models: &[(&[f32], u64)]) -> Vec<f32> {
    let total: f64 = models.iter().map(|(_, n)| *n as f64).sum();
    (0..models[0].0.len())
        .map(|i| {
            (models
                .iter()
                .map(|(m, n)| f64::from(m[i]) * *n as f64)
                .sum::<f64>()
                / total) as f32
        })
        .collect()
}
