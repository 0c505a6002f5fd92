//! A bench's own stack on the emulators (`bench clients`, `bench round
//! --mode deployed`): scripts/local-deploy.sh under a fresh prefix, read
//! back from its JSON, removed afterwards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use fedstep_aws::aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput;
use fedstep_aws::{AwsConfig, Settings};
use serde_json::Value;

pub struct Deployment {
    pub prefix: String,
    pub clients: Vec<String>,
    /// What the aggregator gets (FEDSTEP_* names of infra/lib/aggregator.ts).
    pub settings: Settings,
    pub queue_urls: BTreeMap<String, String>,
    /// The deploy JSON (`fedstep-lambda local --deploy` reads it).
    pub json_path: PathBuf,
    script: PathBuf,
}

/// scripts/local-deploy.sh, found from the working directory up.
fn find_script() -> Result<PathBuf> {
    let mut dir = std::env::current_dir()?;
    loop {
        let candidate = dir.join("scripts/local-deploy.sh");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if !dir.pop() {
            bail!(
                "scripts/local-deploy.sh not found from the working directory up: \
                 run `fedstep bench clients` from the fedstep checkout"
            );
        }
    }
}

fn run_script(script: &Path, args: &[&str], log: &Path) -> Result<()> {
    let log_file = std::fs::File::create(log)?;
    let status = Command::new(script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{} {}: {status}\n{text}", script.display(), args.join(" "));
    }
    Ok(())
}

impl Deployment {
    pub fn create(prefix: &str, clients: &[String], dir: &Path) -> Result<Deployment> {
        if std::env::var_os("AWS_ENDPOINT_URL").is_none() {
            bail!(
                "this bench deploys its own stack on the emulators and AWS_ENDPOINT_URL is not set: \
                 run `scripts/emulators.sh up` and `eval \"$(scripts/emulators.sh env)\"` first"
            );
        }
        let script = find_script()?;
        let out = dir.join("deploy.json");
        let list = clients.join(",");
        run_script(
            &script,
            &[
                "--prefix",
                prefix,
                "--clients",
                &list,
                "--out",
                out.to_str()
                    .ok_or_else(|| anyhow!("temp path is not UTF-8"))?,
            ],
            &dir.join("deploy.log"),
        )?;
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)
            .context("reading the deploy JSON")?;
        let env = json.get("aggregator_env").cloned().unwrap_or(Value::Null);
        let mut settings = Settings::from_lookup(|k| env.get(k)?.as_str().map(str::to_string));
        settings.s3_force_path_style = true;
        let mut queue_urls = BTreeMap::new();
        for c in clients {
            let url = json
                .pointer(&format!("/clients/{c}/queue_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the deploy JSON has no queue for {c}"))?;
            queue_urls.insert(c.clone(), url.to_string());
        }
        Ok(Deployment {
            prefix: prefix.to_string(),
            clients: clients.to_vec(),
            settings,
            queue_urls,
            json_path: out,
            script,
        })
    }

    pub fn delete(&self, dir: &Path) -> Result<()> {
        let list = self.clients.join(",");
        run_script(
            &self.script,
            &["--prefix", &self.prefix, "--clients", &list, "--delete"],
            &dir.join("delete.log"),
        )
    }
}

/// The job's execution once it is no longer RUNNING, or as it is at
/// `until`.
pub async fn execution_when_done(
    cfg: &AwsConfig,
    state_machine: &str,
    job_id: &str,
    until: Instant,
) -> Result<DescribeExecutionOutput> {
    let arn = crate::job_cmd::execution_arn(state_machine, job_id)?;
    let sfn = cfg.sfn();
    loop {
        let out = sfn
            .describe_execution()
            .execution_arn(&arn)
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "DescribeExecution: {}",
                    fedstep_aws::sdk_error("DescribeExecution", e)
                )
            })?;
        if out.status().as_str() != "RUNNING" || Instant::now() >= until {
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
