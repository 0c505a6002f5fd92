//! Test setup against the emulators (or any AWS-compatible endpoint).
//!
//! The tests read `FEDSTEP_TEST_DEPLOY`: the path of a deploy JSON written
//! by `scripts/local-deploy.sh --prefix <p>` (`.emu/deploy-<p>.json`).
//! Endpoints, region and credentials come from the standard AWS_*
//! variables (`eval "$(scripts/emulators.sh env)"`); unset ones are filled
//! from the deploy JSON, so the JSON alone is enough to run them.
//!
//! Unreachable emulators or no deploy JSON: with `CI=true` the tests FAIL;
//! otherwise they print why and skip.

#![allow(dead_code)] // each test binary uses a different part of this

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use fedstep_aws::aws_config::Region;
use fedstep_aws::{aws_sdk_dynamodb, aws_sdk_s3, aws_sdk_sfn, aws_sdk_sns, aws_sdk_sqs};
use fedstep_aws::{DynamoLedger, S3Store, SfnCallback, SnsNotifier, SqsQueue};
use serde_json::Value;

pub struct TestEnv {
    pub deploy: Value,
    pub s3: aws_sdk_s3::Client,
    pub ddb: aws_sdk_dynamodb::Client,
    pub sns: aws_sdk_sns::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub sfn: aws_sdk_sfn::Client,
}

fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

fn unavailable(reason: String) -> Option<TestEnv> {
    if in_ci() {
        panic!("CI=true and the emulators are not usable: {reason}");
    }
    eprintln!("SKIPPED (emulators not usable; CI would fail): {reason}");
    None
}

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("deploy JSON has no string at {pointer}"))
}

/// The configured endpoint for a service: its AWS_ENDPOINT_URL_<SERVICE>,
/// else AWS_ENDPOINT_URL, else the deploy JSON's.
fn endpoint(deploy: &Value, env_name: &str, json_key: &str) -> Option<String> {
    std::env::var(env_name)
        .ok()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| {
            deploy
                .pointer(&format!("/endpoints/{json_key}"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

pub async fn env() -> Option<TestEnv> {
    let Ok(path) = std::env::var("FEDSTEP_TEST_DEPLOY") else {
        return unavailable(
            "FEDSTEP_TEST_DEPLOY is not set (path of .emu/deploy-<prefix>.json)".into(),
        );
    };
    env_at(&path).await
}

/// The deployment described by the deploy JSON at `path`.
pub async fn env_at(path: &str) -> Option<TestEnv> {
    let deploy: Value = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return unavailable(format!("{path}: {e}")),
    };
    let mut loader = fedstep_aws::sdk_defaults();
    if std::env::var_os("AWS_REGION").is_none() {
        let region = deploy
            .get("region")
            .and_then(Value::as_str)
            .unwrap_or("us-east-1");
        loader = loader.region(Region::new(region.to_string()));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() && std::env::var_os("AWS_PROFILE").is_none()
    {
        loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "fedstep-tests",
        ));
    }
    let sdk = loader.load().await;
    let default = endpoint(&deploy, "AWS_ENDPOINT_URL", "default");
    let ddb_ep = endpoint(&deploy, "AWS_ENDPOINT_URL_DYNAMODB", "dynamodb");

    let mut s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true);
    let mut ddb = aws_sdk_dynamodb::config::Builder::from(&sdk);
    let mut sns = aws_sdk_sns::config::Builder::from(&sdk);
    let mut sqs = aws_sdk_sqs::config::Builder::from(&sdk);
    let mut sfn = aws_sdk_sfn::config::Builder::from(&sdk);
    if let Some(ep) = &default {
        s3 = s3.endpoint_url(ep);
        sns = sns.endpoint_url(ep);
        sqs = sqs.endpoint_url(ep);
        sfn = sfn.endpoint_url(ep);
    }
    if let Some(ep) = &ddb_ep {
        ddb = ddb.endpoint_url(ep);
    }
    let env = TestEnv {
        s3: aws_sdk_s3::Client::from_conf(s3.build()),
        ddb: aws_sdk_dynamodb::Client::from_conf(ddb.build()),
        sns: aws_sdk_sns::Client::from_conf(sns.build()),
        sqs: aws_sdk_sqs::Client::from_conf(sqs.build()),
        sfn: aws_sdk_sfn::Client::from_conf(sfn.build()),
        deploy,
    };
    // Reachability: one cheap call per emulator, bounded in time.
    let bucket = str_at(&env.deploy, "/bucket").to_string();
    let table = str_at(&env.deploy, "/tables/rounds").to_string();
    let probe = async {
        env.s3
            .head_bucket()
            .bucket(&bucket)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "S3 HeadBucket {bucket}: {}",
                    fedstep_aws::sdk_error("probe", e)
                )
            })?;
        env.ddb
            .describe_table()
            .table_name(&table)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "DynamoDB DescribeTable {table}: {}",
                    fedstep_aws::sdk_error("probe", e)
                )
            })?;
        Ok::<(), String>(())
    };
    match tokio::time::timeout(Duration::from_secs(20), probe).await {
        Ok(Ok(())) => Some(env),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable("emulators did not answer within 20 s".into()),
    }
}

impl TestEnv {
    pub fn store(&self) -> S3Store {
        S3Store::new(self.s3.clone(), str_at(&self.deploy, "/bucket"))
    }

    pub fn ledger(&self) -> DynamoLedger {
        DynamoLedger::new(
            self.ddb.clone(),
            str_at(&self.deploy, "/tables/rounds"),
            str_at(&self.deploy, "/tables/updates"),
        )
    }

    pub fn notifier(&self) -> SnsNotifier {
        SnsNotifier::new(
            self.sns.clone(),
            str_at(&self.deploy, "/topics/global_model_ready"),
            self.deploy
                .pointer("/topics/training_complete")
                .and_then(Value::as_str)
                .map(str::to_string),
        )
    }

    pub fn callback(&self) -> SfnCallback {
        SfnCallback::new(self.sfn.clone())
    }

    /// The first client queue of the deployment.
    pub fn queue(&self) -> (String, SqsQueue) {
        let clients = self
            .deploy
            .get("clients")
            .and_then(Value::as_object)
            .expect("deploy JSON: clients");
        let (id, c) = clients
            .iter()
            .next()
            .expect("deploy JSON: at least one client");
        let url = c
            .get("queue_url")
            .and_then(Value::as_str)
            .expect("queue_url");
        (id.clone(), SqsQueue::new(self.sqs.clone(), url))
    }
}

/// Ids unique across test runs against the same deployment.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}",
        nanos % 1_000_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
