//! One scenario's own deployment: `scripts/local-deploy.sh --prefix <unique>`
//! on the way in, `--delete` on drop, and SDK clients pointed at it.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedstep_aws::aws_config::Region;
use fedstep_aws::{aws_sdk_dynamodb, aws_sdk_s3, aws_sdk_sfn};
use fedstep_aws::{DynamoLedger, S3Store};
use serde_json::Value;

use crate::emulators::{self, AwsEnv};

pub struct Deployment {
    pub prefix: String,
    pub clients: Vec<String>,
    /// The deploy JSON (scripts/local_deploy.py documents its keys).
    pub json: Value,
    pub json_path: PathBuf,
    /// AWS_* variables for every process of the scenario.
    pub aws_env: AwsEnv,
    pub s3: aws_sdk_s3::Client,
    pub ddb: aws_sdk_dynamodb::Client,
    pub sfn: aws_sdk_sfn::Client,
    /// Scratch space: deploy JSON, configs, logs, downloaded models.
    pub dir: tempfile::TempDir,
}

impl Deployment {
    /// `None` (after a message) when the emulators are not reachable outside
    /// CI; under CI=true that panics. A deploy that fails although the
    /// emulators answer is a failure everywhere.
    pub async fn create(scenario: &str, clients: &[&str]) -> Option<Deployment> {
        let aws_env = match emulators::aws_env() {
            Ok(e) => e,
            Err(why) => return emulators::unavailable(&why),
        };
        if let Err(why) = emulators::reachable(&aws_env) {
            return emulators::unavailable(&why);
        }
        let prefix = crate::unique(&format!("e2e{scenario}"));
        let dir = tempfile::Builder::new()
            .prefix(&format!("fedstep-{prefix}-"))
            .tempdir()
            .expect("a temp dir");
        let json_path = dir.path().join("deploy.json");
        let out = deploy_script(&aws_env)
            .args([
                "--prefix",
                &prefix,
                "--clients",
                &clients.join(","),
                "--out",
            ])
            .arg(&json_path)
            .output()
            .expect("running scripts/local-deploy.sh");
        assert!(
            out.status.success(),
            "scripts/local-deploy.sh --prefix {prefix} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));

        let region = aws_env["AWS_REGION"].clone();
        let mut loader = fedstep_aws::sdk_defaults().region(Region::new(region));
        if let (Some(id), Some(secret)) = (
            aws_env.get("AWS_ACCESS_KEY_ID"),
            aws_env.get("AWS_SECRET_ACCESS_KEY"),
        ) {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
                id,
                secret,
                None,
                None,
                "fedstep-e2e",
            ));
        }
        let sdk = loader.load().await;
        let default_ep = aws_env["AWS_ENDPOINT_URL"].clone();
        let s3 = aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(&default_ep)
            .force_path_style(true)
            .build();
        let ddb = aws_sdk_dynamodb::config::Builder::from(&sdk)
            .endpoint_url(emulators::dynamodb_endpoint(&aws_env))
            .build();
        let sfn = aws_sdk_sfn::config::Builder::from(&sdk)
            .endpoint_url(&default_ep)
            .build();
        eprintln!("deployed {prefix} ({} clients)", clients.len());
        Some(Deployment {
            prefix,
            clients: clients.iter().map(|c| c.to_string()).collect(),
            json,
            json_path,
            aws_env,
            s3: aws_sdk_s3::Client::from_conf(s3),
            ddb: aws_sdk_dynamodb::Client::from_conf(ddb),
            sfn: aws_sdk_sfn::Client::from_conf(sfn),
            dir,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn str_at(&self, pointer: &str) -> String {
        self.json
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("deploy JSON has no string at {pointer}"))
            .to_string()
    }

    pub fn bucket(&self) -> String {
        self.str_at("/bucket")
    }

    pub fn state_machine_arn(&self) -> String {
        self.str_at("/state_machine/arn")
    }

    /// The execution of a job (executions are named after their job).
    pub fn execution_arn(&self, job_id: &str) -> String {
        format!(
            "{}:{job_id}",
            self.state_machine_arn()
                .replacen(":stateMachine:", ":execution:", 1)
        )
    }

    pub fn queue_url(&self, client: &str) -> String {
        self.str_at(&format!("/clients/{client}/queue_url"))
    }

    pub fn store(&self) -> S3Store {
        S3Store::new(self.s3.clone(), self.bucket())
    }

    pub fn ledger(&self) -> DynamoLedger {
        DynamoLedger::new(
            self.ddb.clone(),
            self.str_at("/tables/rounds"),
            self.str_at("/tables/updates"),
        )
    }

    /// The environment of `fedstep` (the operator CLI): AWS_* plus the
    /// FEDSTEP_* names the deployment's aggregator gets.
    pub fn cli_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.aws_env.clone().into_iter().collect();
        if let Some(map) = self.json.get("aggregator_env").and_then(Value::as_object) {
            for (k, v) in map {
                if let Some(v) = v.as_str() {
                    env.push((k.clone(), v.to_string()));
                }
            }
        }
        env.push(("FEDSTEP_S3_FORCE_PATH_STYLE".into(), "1".into()));
        env
    }
}

fn deploy_script(aws_env: &AwsEnv) -> Command {
    let mut cmd = Command::new(crate::repo_root().join("scripts/local-deploy.sh"));
    cmd.envs(aws_env);
    cmd
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::env::var_os("FEDSTEP_E2E_KEEP").is_some() {
            eprintln!(
                "FEDSTEP_E2E_KEEP: leaving deployment {} and {}",
                self.prefix,
                self.dir.path().display()
            );
            self.dir.disable_cleanup(true);
            return;
        }
        let out = deploy_script(&self.aws_env)
            .args([
                "--prefix",
                &self.prefix,
                "--clients",
                &self.clients.join(","),
                "--delete",
                "--out",
            ])
            .arg(&self.json_path)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: deleting deployment {} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("warning: deleting deployment {}: {e}", self.prefix),
        }
    }
}

/// Shown in failure messages: the last lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Deployment {
    /// The job's round rows, after checking there are `rounds` of them,
    /// each CLOSED by `closed_by` with every one of `clients` accepted and
    /// nobody rejected.
    pub async fn closed_rounds(
        &self,
        job_id: &str,
        rounds: u32,
        clients: &[&str],
        closed_by: fedstep_cloud::records::ClosedBy,
    ) -> Vec<fedstep_cloud::records::RoundRecord> {
        use fedstep_cloud::ports::Ledger;
        use fedstep_cloud::records::RoundStatus;
        let rows = self.ledger().list_rounds(job_id).await.unwrap();
        assert_eq!(rows.len(), rounds as usize, "{rows:?}");
        for r in &rows {
            assert_eq!(r.status, RoundStatus::Closed, "round {}: {r:?}", r.round);
            let result = r.result.as_ref().expect("a closed round has a result");
            assert_eq!(result.closed_by, closed_by, "round {}", r.round);
            let mut accepted = result.accepted.clone();
            accepted.sort();
            assert_eq!(accepted, clients, "round {}", r.round);
            assert!(
                result.rejected.is_empty(),
                "round {}: {:?}",
                r.round,
                result.rejected
            );
        }
        rows
    }

    /// What a FedAvg check needs from round `round` of `job_id`: the next
    /// global model's bytes and, per client, (num_examples, upload bytes),
    /// downloaded from S3 through the rows the clients wrote.
    pub async fn round_inputs(
        &self,
        job_id: &str,
        round: u32,
        clients: &[&str],
    ) -> (Vec<u8>, Vec<(f64, Vec<u8>)>) {
        use fedstep_cloud::keys;
        use fedstep_cloud::ports::{Ledger, ObjectStore};
        let (store, ledger) = (self.store(), self.ledger());
        let global = self.path(&format!("{job_id}-global{}.safetensors", round + 1));
        store
            .get_file(&keys::global_model(job_id, round + 1), &global)
            .await
            .unwrap_or_else(|e| panic!("{job_id} round {}: global model: {e}", round + 1));
        let mut weighted = Vec::new();
        for c in clients {
            let row = ledger
                .get_update(c, job_id, round)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("no updates row for {c} round {round}"));
            let path = self.path(&format!("{job_id}-{c}-r{round}.safetensors"));
            store
                .get_file(&row.model_key, &path)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", row.model_key));
            let n = row
                .num_examples
                .as_f64()
                .unwrap_or_else(|| panic!("{c}: num_examples {:?}", row.num_examples));
            weighted.push((n, std::fs::read(&path).unwrap()));
        }
        (std::fs::read(&global).unwrap(), weighted)
    }
}
