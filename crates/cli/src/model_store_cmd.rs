//! `fedstep model list|pull`: the model registry (S3 + the ledger's
//! artifact index). Every pulled file is checked against its recorded
//! SHA-256 before it appears at the output path.
//!
//! Needs `FEDSTEP_BUCKET`, `FEDSTEP_ROUNDS_TABLE`, `FEDSTEP_UPDATES_TABLE`
//! (plus the standard AWS chain), as printed by
//! `scripts/local-deploy.sh --print-env` for the emulators.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use fedstep_aws::{AwsConfig, DynamoLedger, S3Store};
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{Artifact, RoundStatus};

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only artifacts of this llm_type.
    #[arg(long)]
    llm_type: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// An artifact id (`JOB:ROUND`, see `fedstep model list`) or a job id
    /// (its registered final model, or else its latest aggregated model).
    target: String,
    /// With a job id: the model that round R produced (0 = the initial model).
    #[arg(long)]
    round: Option<u32>,
    /// Where to write the model.
    #[arg(long, short)]
    output: PathBuf,
}

/// What `pull` was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullTarget {
    Artifact(String),
    Job { job_id: String, round: Option<u32> },
}

impl PullTarget {
    pub fn parse(target: &str, round: Option<u32>) -> Result<PullTarget> {
        if let Some((job, r)) = target.split_once(':') {
            if round.is_some() {
                bail!("`{target}` is an artifact id: it names its round already, drop --round");
            }
            keys::check_id("job id", job).map_err(anyhow::Error::msg)?;
            r.parse::<u32>()
                .map_err(|_| anyhow!("artifact id `{target}` should be JOB:ROUND"))?;
            return Ok(PullTarget::Artifact(target.to_string()));
        }
        keys::check_id("job id", target).map_err(anyhow::Error::msg)?;
        Ok(PullTarget::Job {
            job_id: target.to_string(),
            round,
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

pub fn list(args: ListArgs) -> Result<()> {
    runtime()?.block_on(async {
        let aws = AwsConfig::from_env().await;
        let ledger = DynamoLedger::from_config(&aws)?;
        let artifacts = ledger
            .list_artifacts(args.llm_type.as_deref())
            .await
            .context("listing artifacts")?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&artifacts)?);
        } else {
            print!("{}", render_artifacts(&artifacts));
        }
        Ok(())
    })
}

/// Newest first, as the ledger returns them.
pub fn render_artifacts(artifacts: &[Artifact]) -> String {
    if artifacts.is_empty() {
        return "no artifacts registered\n".into();
    }
    let w = artifacts
        .iter()
        .map(|a| a.artifact_id.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let t = artifacts
        .iter()
        .map(|a| a.llm_type.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = format!(
        "{:<w$}  {:<t$}  {:<20}  metrics\n",
        "artifact", "llm_type", "created"
    );
    for a in artifacts {
        let metrics: Vec<String> = a
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect();
        out += &format!(
            "{:<w$}  {:<t$}  {:<20}  {}\n",
            a.artifact_id,
            a.llm_type,
            a.created_at,
            metrics.join(" ")
        );
    }
    out
}

pub fn pull(args: PullArgs) -> Result<()> {
    let target = PullTarget::parse(&args.target, args.round)?;
    runtime()?.block_on(async {
        let aws = AwsConfig::from_env().await;
        let ledger = DynamoLedger::from_config(&aws)?;
        let store = S3Store::from_config(&aws)?;
        let (key, checksum) = resolve(&ledger, &target).await?;
        let checksum = match checksum {
            Some(c) => c,
            // No checksum in the ledger (an aggregated model whose next
            // round never opened): S3 stored one at upload.
            None => {
                store
                    .head(&key)
                    .await?
                    .ok_or_else(|| anyhow!("{key} does not exist in the bucket"))?
                    .sha256
            }
        };
        let bytes = download_verified(&store, &key, &checksum, &args.output).await?;
        println!(
            "{key} → {} ({bytes} bytes, sha256 {checksum} verified)",
            args.output.display()
        );
        Ok(())
    })
}

/// The model's key and, when the ledger records it, its SHA-256.
async fn resolve(ledger: &impl Ledger, target: &PullTarget) -> Result<(String, Option<String>)> {
    match target {
        PullTarget::Artifact(id) => {
            let a = ledger
                .list_artifacts(None)
                .await?
                .into_iter()
                .find(|a| &a.artifact_id == id)
                .ok_or_else(|| anyhow!("no artifact `{id}` (see `fedstep model list`)"))?;
            Ok((a.model_key, Some(a.checksum)))
        }
        PullTarget::Job {
            job_id,
            round: None,
        } => {
            let artifacts = ledger.list_artifacts(None).await?;
            if let Some(a) = artifacts.into_iter().find(|a| &a.job_id == job_id) {
                return Ok((a.model_key, Some(a.checksum)));
            }
            let rounds = ledger.list_rounds(job_id).await?;
            let Some(last) = rounds
                .iter()
                .rev()
                .find(|r| r.status == RoundStatus::Closed)
            else {
                bail!("job {job_id} has no registered artifact and no closed round yet");
            };
            produced_by(ledger, job_id, last.round).await
        }
        PullTarget::Job {
            job_id,
            round: Some(r),
        } => produced_by(ledger, job_id, *r).await,
    }
}

/// The global model round `r` produced (round r+1's), with the checksum
/// round r+1's row recorded if it opened.
async fn produced_by(
    ledger: &impl Ledger,
    job_id: &str,
    r: u32,
) -> Result<(String, Option<String>)> {
    if r >= 1 {
        let row = ledger
            .get_round(job_id, r)
            .await?
            .ok_or_else(|| anyhow!("job {job_id} has no round {r}"))?;
        if row.status != RoundStatus::Closed {
            bail!(
                "round {r} of {job_id} is {:?}: it has produced no model (yet); --round {} is the model it trains from",
                row.status,
                r - 1
            );
        }
    }
    let next = r
        .checked_add(1)
        .ok_or_else(|| anyhow!("round {r} is out of range"))?;
    let key = keys::global_model(job_id, next);
    let checksum = ledger
        .get_round(job_id, next)
        .await?
        .filter(|row| row.global_model_key == key)
        .map(|row| row.global_checksum);
    Ok((key, checksum))
}

/// Downloads next to `output`, verifies, then renames: a file at `output`
/// is always a verified one.
async fn download_verified(
    store: &impl ObjectStore,
    key: &str,
    checksum: &str,
    output: &Path,
) -> Result<u64> {
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let part = tempfile::Builder::new()
        .prefix(".fedstep-pull-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?
        .into_temp_path();
    let got = store
        .get_file(key, &part)
        .await
        .with_context(|| format!("downloading {key}"))?;
    if got.sha256 != checksum {
        bail!(
            "{key}: downloaded SHA-256 {} does not match the recorded {checksum}; nothing written",
            got.sha256
        );
    }
    part.persist(output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(got.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_targets() {
        assert_eq!(
            PullTarget::parse("digits-001:3", None).unwrap(),
            PullTarget::Artifact("digits-001:3".into())
        );
        assert_eq!(
            PullTarget::parse("digits-001", Some(2)).unwrap(),
            PullTarget::Job {
                job_id: "digits-001".into(),
                round: Some(2)
            }
        );
        assert!(PullTarget::parse("digits-001:3", Some(1)).is_err());
        assert!(PullTarget::parse("digits-001:x", None).is_err());
        assert!(PullTarget::parse("../etc", None).is_err());
    }

    #[test]
    fn artifacts_table() {
        let a = Artifact {
            artifact_id: "j:3".into(),
            job_id: "j".into(),
            round: 3,
            llm_type: "SpikingEvoTextLM".into(),
            model_key: "jobs/j/rounds/4/global.safetensors".into(),
            checksum: "0".repeat(64),
            created_at: "2026-11-21T10:00:00Z".into(),
            metrics: [("loss".to_string(), 0.25)].into(),
        };
        let text = render_artifacts(&[a]);
        assert!(
            text.contains("j:3") && text.contains("loss=0.2500"),
            "{text}"
        );
        assert!(render_artifacts(&[]).contains("no artifacts"));
    }
}
