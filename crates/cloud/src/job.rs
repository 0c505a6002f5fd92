//! A federated training job: one TOML file (`examples/job.toml`).
//!
//! ```toml
//! job_id = "digits-001"
//! rounds = 10                    # at most this many rounds
//! clients = ["site-a", "site-b", "site-c"]
//! min_clients = 2                # quorum at the deadline
//! round_timeout_seconds = 600
//! initial_model = "init.safetensors"   # uploaded by `fedstep job start`
//!
//! [stop]                         # optional early stop, decided in Rust
//! metric = "accuracy"            # a key of the round's aggregated metrics
//! target = 0.95                  # stop when metric ≥ target ("min" mode: ≤)
//! mode = "max"
//! patience = 3                   # stop after this many rounds without improvement
//!
//! [aggregation]                  # fedstep-core's PipelineConfig
//! weighting = "examples"
//! max_client_share = 0.5         # optional; at least 1/min_clients
//!
//! [round_config]                 # passed to clients untouched
//! local_epochs = 2
//!
//! [sharding]                     # optional: how the aggregation is cut
//! shard_mib = 512                # model bytes per shard task
//! concurrency = 8                # shard tasks at once
//! ```
//!
//! `mode = "async"` with an `[async]` table makes versions from the first
//! K updates instead of rounds that wait for every client
//! (`crate::asynchronous`). A `[secure_aggregation]` table is checked
//! (`crate::secure`) but cannot run yet.

use std::collections::BTreeSet;
use std::ops::Deref;

use fedstep_core::PipelineConfig;
use serde::{Deserialize, Serialize};

use crate::asynchronous::{self, AsyncSettings, AsyncSpec, JobMode};
use crate::capacity;
use crate::keys::check_id;
use crate::secure::{self, SecureSettings, SecureSpec};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub job_id: String,
    pub rounds: u32,
    pub clients: Vec<String>,
    pub min_clients: u32,
    pub round_timeout_seconds: u64,
    /// Local path of the initial model (used by `fedstep job start` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopRule>,
    /// The aggregation pipeline, as TOML text is parsed by fedstep-core.
    #[serde(default)]
    pub aggregation: toml::Table,
    #[serde(default)]
    pub round_config: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "ShardingSpec::is_default")]
    pub sharding: ShardingSpec,
    /// `sync` (rounds wait for every client) or `async` (versions).
    #[serde(default, skip_serializing_if = "JobMode::is_sync")]
    pub mode: JobMode,
    /// Async jobs' settings (defaults when absent).
    #[serde(default, rename = "async", skip_serializing_if = "Option::is_none")]
    pub asynchronous: Option<AsyncSpec>,
    /// Secure aggregation (`crate::secure`); absent: plain FedAvg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureSpec>,
}

/// How a round's aggregation is cut into shard tasks (the workflow's Map,
/// issue #14). A model up to `shard_mib` is one shard: the ordinary case.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardingSpec {
    /// Model bytes (MiB) one shard task aggregates; each task reads about
    /// this much of every client's update and writes this much output.
    #[serde(default = "ShardingSpec::default_shard_mib")]
    pub shard_mib: u64,
    /// How many shard tasks run at once.
    #[serde(default = "ShardingSpec::default_concurrency")]
    pub concurrency: u32,
}

impl ShardingSpec {
    /// 512 MiB: a shard of 8 clients' updates is 4 GiB of ranged reads,
    /// about a minute at S3's throughput per Lambda, well inside its 15.
    const DEFAULT_SHARD_MIB: u64 = 512;
    const DEFAULT_CONCURRENCY: u32 = 8;
    /// An upload's parts (but the last) are at least 5 MiB.
    const MIN_SHARD_MIB: u64 = 5;
    /// An inline Map runs at most 40 iterations at once.
    const MAX_CONCURRENCY: u32 = 40;
    /// The plan lists the shards in the workflow's state: keep it small.
    pub const MAX_SHARDS: usize = 256;

    fn default_shard_mib() -> u64 {
        Self::DEFAULT_SHARD_MIB
    }

    fn default_concurrency() -> u32 {
        Self::DEFAULT_CONCURRENCY
    }

    fn is_default(&self) -> bool {
        *self == ShardingSpec::default()
    }

    fn check(&self) -> Result<(), String> {
        if !(Self::MIN_SHARD_MIB..=1 << 20).contains(&self.shard_mib) {
            return Err(format!(
                "[sharding] shard_mib = {} must be between {} (S3's smallest part) and {}",
                self.shard_mib,
                Self::MIN_SHARD_MIB,
                1u64 << 20
            ));
        }
        if !(1..=Self::MAX_CONCURRENCY).contains(&self.concurrency) {
            return Err(format!(
                "[sharding] concurrency = {} must be between 1 and {} (Step Functions' inline Map)",
                self.concurrency,
                Self::MAX_CONCURRENCY
            ));
        }
        Ok(())
    }

    /// How many shards a model of `model_bytes` is cut into (at most
    /// [`Self::MAX_SHARDS`]; the plan may make fewer, see
    /// `fedstep_core::shard::ShardPlan::even`).
    pub fn shards_for(&self, model_bytes: u64) -> usize {
        let shard = self.shard_mib << 20;
        (model_bytes.div_ceil(shard).max(1) as usize).min(Self::MAX_SHARDS)
    }
}

impl Default for ShardingSpec {
    fn default() -> Self {
        ShardingSpec {
            shard_mib: Self::DEFAULT_SHARD_MIB,
            concurrency: Self::DEFAULT_CONCURRENCY,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StopRule {
    pub metric: String,
    #[serde(default)]
    pub target: Option<f64>,
    #[serde(default)]
    pub mode: StopMode,
    #[serde(default)]
    pub patience: Option<u32>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    #[default]
    Max,
    Min,
}

/// A job that passed every rule of [`JobSpec::check`], with its
/// aggregation pipeline parsed. `check` is the only way to make one, and it
/// runs where a job enters a program: a job file (`fedstep job start`,
/// `from_toml`), the workflow's execution input (the Lambda handlers), a
/// stored job (the ledger decodes rows into this type). Everything past
/// that takes a `Job` and trusts it. It serializes as the JobSpec it came
/// from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "JobSpec", into = "JobSpec")]
pub struct Job {
    spec: JobSpec,
    pipeline: PipelineConfig,
    scaffold: bool,
    asynchronous: Option<AsyncSettings>,
    secure_aggregation: Option<SecureSettings>,
}

impl Job {
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// The aggregation pipeline of `[aggregation]`.
    pub fn pipeline(&self) -> &PipelineConfig {
        &self.pipeline
    }

    /// Whether the clients train SCAFFOLD (`round_config.algorithm =
    /// "scaffold"`): the server then keeps the control variate c beside
    /// each round's global model and updates it from the clients' Δc_i.
    pub fn scaffold(&self) -> bool {
        self.scaffold
    }

    /// An async job's settings; `None` for a sync job.
    pub fn asynchronous(&self) -> Option<&AsyncSettings> {
        self.asynchronous.as_ref()
    }

    /// A secure job's SecAgg+ settings; `None` for plain FedAvg.
    pub fn secure_aggregation(&self) -> Option<&SecureSettings> {
        self.secure_aggregation.as_ref()
    }

    /// Whether `round` is one of the job's rounds (1..=rounds).
    pub fn check_round(&self, round: u32) -> Result<(), String> {
        if round == 0 || round > self.spec.rounds {
            return Err(format!(
                "round {round} is outside 1..={} of job `{}`",
                self.spec.rounds, self.spec.job_id
            ));
        }
        Ok(())
    }
}

impl Deref for Job {
    type Target = JobSpec;

    fn deref(&self) -> &JobSpec {
        &self.spec
    }
}

impl TryFrom<JobSpec> for Job {
    type Error = String;

    fn try_from(spec: JobSpec) -> Result<Job, String> {
        spec.check()
    }
}

impl From<Job> for JobSpec {
    fn from(job: Job) -> JobSpec {
        job.spec
    }
}

impl JobSpec {
    /// Parses and checks a job file; every contradiction is named.
    pub fn from_toml(text: &str) -> Result<Job, String> {
        let job: JobSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        job.check()
    }

    /// Every rule a job must pass; the checked job if it does.
    pub fn check(self) -> Result<Job, String> {
        check_id("job_id", &self.job_id)?;
        if self.rounds == 0 {
            return Err("rounds must be at least 1".into());
        }
        if self.clients.is_empty() {
            return Err("clients is empty: a federation needs at least one client".into());
        }
        let mut seen = BTreeSet::new();
        for c in &self.clients {
            check_id("client id", c)?;
            if !seen.insert(c) {
                return Err(format!("client `{c}` is listed twice"));
            }
        }
        if self.clients.len() > capacity::MAX_CLIENTS {
            return Err(format!(
                "{} clients listed; a job may list at most {}: a round's DynamoDB item (400 KB) \
                 and the workflow's state (256 KiB) hold every client's id and rejection reason \
                 (ARCHITECTURE.md, \"How many clients a job holds\")",
                self.clients.len(),
                capacity::MAX_CLIENTS
            ));
        }
        if self.min_clients == 0 {
            return Err("min_clients must be at least 1".into());
        }
        if self.min_clients as usize > self.clients.len() {
            return Err(format!(
                "min_clients = {} exceeds the {} clients listed",
                self.min_clients,
                self.clients.len()
            ));
        }
        if self.round_timeout_seconds == 0 || self.round_timeout_seconds > 365 * 24 * 3600 {
            return Err("round_timeout_seconds must be between 1 and one year".into());
        }
        if let Some(s) = &self.stop {
            if s.target.is_none() && s.patience.is_none() {
                return Err("[stop] needs a target, a patience, or both".into());
            }
            if s.target.is_some_and(|t| !t.is_finite()) {
                return Err("[stop] target must be a finite number".into());
            }
        }
        self.sharding.check()?;
        self.check_state_size()?;
        let mut pipeline = self.parse_pipeline()?;
        self.check_krum(&pipeline)?;
        self.check_share_cap(&pipeline)?;
        let scaffold = self.check_algorithm(&pipeline)?;
        let asynchronous = asynchronous::check(
            self.mode,
            self.asynchronous.as_ref(),
            self.clients.len(),
            self.min_clients,
            scaffold,
            &pipeline,
        )?;
        let secure_aggregation = secure::check(
            self.secure_aggregation.as_ref(),
            self.clients.len(),
            self.min_clients,
            self.mode,
            scaffold,
            &pipeline,
        )?;
        if let Some(settings) = &asynchronous {
            pipeline = pipeline
                .with_server_learning_rate(settings.server_learning_rate)
                .map_err(|e| format!("[async] {e}"))?;
        }
        Ok(Job {
            spec: self,
            pipeline,
            scaffold,
            asynchronous,
            secure_aggregation,
        })
    }

    /// `round_config.algorithm` is the trainers' business, except SCAFFOLD,
    /// whose server side runs here and needs a pipeline it is defined for
    /// (`fedstep_core::scaffold::check_pipeline`). Returns whether it is
    /// SCAFFOLD. Other names pass to the trainers, which refuse those they
    /// do not run.
    fn check_algorithm(&self, pipeline: &PipelineConfig) -> Result<bool, String> {
        match self.round_config.get("algorithm") {
            None => Ok(false),
            Some(serde_json::Value::String(a)) if a == "scaffold" => {
                fedstep_core::scaffold::check_pipeline(pipeline)
                    .map_err(|e| format!("round_config.algorithm = \"scaffold\": {e}"))?;
                Ok(true)
            }
            Some(serde_json::Value::String(_)) => Ok(false),
            Some(other) => Err(format!(
                "round_config.algorithm must be a string (fedavg, fedprox, scaffold), not {}",
                crate::bounded::quote(&other.to_string())
            )),
        }
    }

    /// Shares of at most s over n clients sum to at most n·s, so a cap
    /// below 1/min_clients could never hold in a round closed at its
    /// quorum. Refused here rather than degraded every such round; fewer
    /// clients after run-time rejections still degrade (the core records
    /// it).
    fn check_share_cap(&self, pipeline: &PipelineConfig) -> Result<(), String> {
        let Some(cap) = pipeline.max_client_share() else {
            return Ok(());
        };
        if cap.holds_for(self.min_clients as usize) {
            return Ok(());
        }
        Err(format!(
            "[aggregation] max_client_share = {s} cannot hold in a round that closes at \
             its quorum of min_clients = {n} ({n} × {s} < 1: one of them must hold more): \
             raise max_client_share to at least 1/{n} or min_clients to at least {need}",
            s = cap.get(),
            n = self.min_clients,
            need = cap.min_clients()
        ))
    }

    /// The workflow's state carries the job and a round's result between
    /// tasks; both must fit in it together, whatever the clients report.
    fn check_state_size(&self) -> Result<(), String> {
        let job = serde_json::to_string(self)
            .map_err(|e| format!("the job does not encode as JSON: {e}"))?
            .len();
        let result = capacity::worst_result_json_bytes(&self.clients);
        if job + result > capacity::STATE_BYTES {
            return Err(format!(
                "the job is {job} bytes as JSON and a round result of its {} clients can reach \
                 {result}: together more than the {} bytes (256 KiB) Step Functions allows a \
                 state (round_config or [aggregation] too large?)",
                self.clients.len(),
                capacity::STATE_BYTES
            ));
        }
        Ok(())
    }

    /// Krum scores each update by its distances to its n − f − 2 nearest
    /// others, which needs n ≥ 2f + 3 updates. The deadline path aggregates
    /// with as few as min_clients, so a smaller quorum would let a round
    /// open that cannot be aggregated when it closes at its quorum.
    fn check_krum(&self, pipeline: &PipelineConfig) -> Result<(), String> {
        if let Some((need, why)) = pipeline.pipeline().min_updates() {
            if (self.min_clients as usize) < need {
                return Err(format!(
                    "min_clients = {} is too small for [aggregation] {why}, so min_clients must be at least {need}",
                    self.min_clients
                ));
            }
        }
        Ok(())
    }

    fn parse_pipeline(&self) -> Result<PipelineConfig, String> {
        let text = toml::to_string(&self.aggregation).map_err(|e| e.to_string())?;
        PipelineConfig::from_toml(&text).map_err(|e| format!("[aggregation]: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
job_id = "digits-001"
rounds = 3
clients = ["site-a", "site-b", "site-c"]
min_clients = 2
round_timeout_seconds = 60
[aggregation]
weighting = "uniform"
[round_config]
local_epochs = 2
"#;

    #[test]
    fn parses_a_job() {
        let j = JobSpec::from_toml(GOOD).unwrap();
        assert_eq!(j.clients.len(), 3);
        assert_eq!(
            j.pipeline().weighting(),
            fedstep_core::weighting::Weighting::Uniform
        );
        assert_eq!(j.round_config["local_epochs"], 2);
    }

    #[test]
    fn contradictions_are_named() {
        for (from, to, want) in [
            (
                "min_clients = 2",
                "min_clients = 4",
                "exceeds the 3 clients",
            ),
            ("rounds = 3", "rounds = 0", "rounds must be at least 1"),
            ("\"site-c\"]", "\"site-a\"]", "listed twice"),
            ("job_id = \"digits-001\"", "job_id = \"../x\"", "job_id"),
            (
                "weighting = \"uniform\"",
                "weighting = \"best\"",
                "[aggregation]",
            ),
            (
                "round_timeout_seconds = 60",
                "round_timeout_seconds = 0",
                "round_timeout_seconds",
            ),
        ] {
            let err = JobSpec::from_toml(&GOOD.replace(from, to)).unwrap_err();
            assert!(err.contains(want), "{to}: {err}");
        }
    }

    /// `n` client ids of the longest allowed length.
    fn long_ids(n: usize) -> String {
        (0..n)
            .map(|i| format!("\"{:0>64}\"", i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    #[test]
    fn a_thousand_clients_with_the_longest_ids_fit_and_one_more_does_not() {
        let with = |n: usize| {
            JobSpec::from_toml(&GOOD.replace(
                r#"clients = ["site-a", "site-b", "site-c"]"#,
                &format!("clients = [{}]", long_ids(n)),
            ))
        };
        let job = with(capacity::MAX_CLIENTS).unwrap();
        let state = serde_json::to_string(&job).unwrap().len()
            + capacity::worst_result_json_bytes(&job.clients);
        assert!(state <= capacity::STATE_BYTES, "{state}");
        let err = with(capacity::MAX_CLIENTS + 1).unwrap_err();
        assert!(err.contains("at most 1000"), "{err}");
    }

    #[test]
    fn a_job_whose_round_config_leaves_no_room_for_results_is_refused() {
        let big = format!("{}\nnote = \"{}\"\n", GOOD, "x".repeat(200 * 1024));
        let err = JobSpec::from_toml(&big.replace(
            r#"clients = ["site-a", "site-b", "site-c"]"#,
            &format!("clients = [{}]", long_ids(300)),
        ))
        .unwrap_err();
        assert!(err.contains("256"), "{err}");
        assert!(err.contains("round_config"), "{err}");
    }

    #[test]
    fn max_client_share_must_hold_for_a_quorum_sized_round() {
        let with = |min_clients: u32, cap: &str| {
            JobSpec::from_toml(
                &GOOD
                    .replace("min_clients = 2", &format!("min_clients = {min_clients}"))
                    .replace(
                        "weighting = \"uniform\"",
                        &format!("weighting = \"uniform\"\nmax_client_share = {cap}"),
                    ),
            )
        };
        let err = with(2, "0.4").unwrap_err();
        for want in [
            "[aggregation] max_client_share = 0.4",
            "min_clients = 2",
            "at least 1/2",
            "min_clients to at least 3",
        ] {
            assert!(err.contains(want), "{want}: {err}");
        }
        let err = with(3, "0.3").unwrap_err();
        assert!(err.contains("min_clients to at least 4"), "{err}");
        for (min_clients, cap) in [(2, "0.5"), (3, "0.34"), (1, "1.0"), (3, "1")] {
            let job = with(min_clients, cap).unwrap();
            assert!(job.pipeline().max_client_share().is_some());
        }
        // The core's own check still speaks first for a share that is no
        // fraction at all.
        let err = with(3, "1.5").unwrap_err();
        assert!(
            err.contains("[aggregation]") && err.contains("max_client_share"),
            "{err}"
        );
    }

    #[test]
    fn krum_needs_min_clients_of_at_least_2f_plus_3() {
        let with = |min_clients: u32, byzantine: u32| {
            JobSpec::from_toml(
                &GOOD
                    .replace(
                        "[\"site-a\", \"site-b\", \"site-c\"]",
                        "[\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\"]",
                    )
                    .replace("min_clients = 2", &format!("min_clients = {min_clients}"))
                    .replace(
                        "[round_config]",
                        &format!("[[aggregation.stages]]\nkind = \"krum\"\nbyzantine = {byzantine}\n[round_config]"),
                    ),
            )
        };
        for (min_clients, byzantine, need) in [(4, 1, 5), (2, 0, 3), (6, 2, 7)] {
            let err = with(min_clients, byzantine).unwrap_err();
            for want in [
                format!("min_clients = {min_clients}"),
                format!("byzantine = {byzantine}"),
                format!("2·byzantine + 3 = {need}"),
                "stages[0]".to_string(),
            ] {
                assert!(err.contains(&want), "{want}: {err}");
            }
        }
        for (min_clients, byzantine) in [(5, 1), (3, 0), (7, 2)] {
            let job = with(min_clients, byzantine).unwrap();
            assert_eq!(job.pipeline().pipeline().combiner_name(), "krum");
        }
    }

    #[test]
    fn an_async_job_is_parsed_once_with_defaults() {
        use fedstep_core::staleness::Staleness;
        let sync = JobSpec::from_toml(GOOD).unwrap();
        assert!(sync.asynchronous().is_none());
        let job = JobSpec::from_toml(&format!("mode = \"async\"\n{GOOD}")).unwrap();
        let a = job.asynchronous().unwrap();
        assert_eq!((a.buffer_size, a.max_staleness), (2, 20));
        assert_eq!(a.staleness, Staleness::default());
        // The job as the workflow carries it parses back to the same.
        let again: JobSpec = serde_json::from_str(&serde_json::to_string(&*job).unwrap()).unwrap();
        assert_eq!(again.check().unwrap().asynchronous(), Some(a));
        let hinge = JobSpec::from_toml(&format!(
            "mode = \"async\"\n{GOOD}\n[async]\nbuffer_size = 3\nstaleness = \"hinge\"\nhinge_cutoff = 2\nmax_staleness = 5\n"
        ))
        .unwrap();
        let a = hinge.asynchronous().unwrap();
        assert_eq!((a.buffer_size, a.max_staleness), (3, 5));
        assert_eq!(
            a.staleness,
            Staleness::Hinge {
                slope: 1.0,
                cutoff: 2
            }
        );
    }

    #[test]
    fn an_async_server_learning_rate_is_the_pipelines_last_stage() {
        let with = |table: &str, stages: &str| {
            JobSpec::from_toml(&format!(
                "mode = \"async\"\n{GOOD}\n[async]\n{table}\n{stages}\n"
            ))
        };
        let job = with("server_learning_rate = 0.5", "").unwrap();
        assert_eq!(job.asynchronous().unwrap().server_learning_rate, 0.5);
        let optimizer = job.pipeline().pipeline().optimizer.as_ref().unwrap();
        assert_eq!(optimizer.kind(), "fedavgm");
        // At the default η = 1 the pipeline is the job's own.
        let plain = with("", "").unwrap();
        assert!(plain.pipeline().pipeline().optimizer.is_none());
        // The job as the workflow carries it checks to the same pipeline.
        let again: JobSpec = serde_json::from_str(&serde_json::to_string(&*job).unwrap()).unwrap();
        assert_eq!(again.check().unwrap().pipeline(), job.pipeline());
        let adam = "[[aggregation.stages]]\nkind = \"fedadam\"";
        let err = with("server_learning_rate = 0.5", adam).unwrap_err();
        assert!(
            err.starts_with("[async] ") && err.contains("`fedadam`"),
            "{err}"
        );
        assert!(
            with("", adam).is_ok(),
            "η = 1 leaves the job's optimizer alone"
        );
        let err = with("server_learning_rate = 0.0", "").unwrap_err();
        assert!(err.contains("must be positive"), "{err}");
    }

    #[test]
    fn async_contradictions_are_named() {
        let async_job = |table: &str| format!("mode = \"async\"\n{GOOD}\n[async]\n{table}\n");
        for (text, want) in [
            (
                format!("{GOOD}\n[async]\nbuffer_size = 2\n"),
                "mode is \"sync\"",
            ),
            (async_job("buffer_size = 4"), "between 1 and the 3 clients"),
            (async_job("buffer_size = 0"), "between 1 and the 3 clients"),
            (
                async_job("buffer_size = 1"),
                "min_clients = 2 exceeds [async] buffer_size = 1",
            ),
            (async_job("staleness_exponent = -1.0"), "staleness_exponent"),
            (
                async_job("staleness = \"constant\"\nhinge_cutoff = 1"),
                "hinge",
            ),
            (
                async_job("staleness = \"hinge\"\nstaleness_exponent = 1.0"),
                "polynomial",
            ),
            (async_job("stale = 1"), "unknown field"),
            (
                async_job("max_staleness = 32"),
                "max_staleness = 32 is more than 31",
            ),
            (
                format!(
                    "mode = \"async\"\n{}",
                    GOOD.replace("local_epochs = 2", "algorithm = \"scaffold\"")
                ),
                "SCAFFOLD",
            ),
        ] {
            let err = JobSpec::from_toml(&text).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
