//! Where the adapters get their clients and resource names from.

use aws_config::SdkConfig;
use fedstep_cloud::CloudError;

/// fedstep's resource names: the `FEDSTEP_*` variables the CDK stack gives
/// the aggregator Lambda (infra/lib/aggregator.ts) and that
/// `scripts/local-deploy.sh --print-env` prints for the emulators. Each is
/// optional here; an adapter that needs one fails with a message naming the
/// variable (a client needs the bucket and its queue, not the state machine).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// `FEDSTEP_BUCKET`
    pub bucket: Option<String>,
    /// `FEDSTEP_ROUNDS_TABLE`
    pub rounds_table: Option<String>,
    /// `FEDSTEP_UPDATES_TABLE`
    pub updates_table: Option<String>,
    /// `FEDSTEP_TOPIC_ARN` (global_model_ready)
    pub topic_arn: Option<String>,
    /// `FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN`
    pub training_complete_topic_arn: Option<String>,
    /// `FEDSTEP_STATE_MACHINE_ARN`
    pub state_machine_arn: Option<String>,
    /// `FEDSTEP_S3_FORCE_PATH_STYLE=1`: emulators serve no `bucket.host`
    /// names, and the SDK has no environment variable for it.
    pub s3_force_path_style: bool,
    /// Emulator worker only (fedstep-lambda local mode):
    /// `FEDSTEP_{ACTION}_ACTIVITY_ARN` for each task action (START_ROUND,
    /// PLAN_ROUND, SHARD_STATISTICS, DECIDE_ROUND, AGGREGATE_SHARD,
    /// COMMIT_ROUND, FINALIZE, REPORT_FAILURE), `FEDSTEP_UPDATES_STREAM_ARN`.
    pub start_round_activity_arn: Option<String>,
    pub plan_round_activity_arn: Option<String>,
    pub shard_statistics_activity_arn: Option<String>,
    pub decide_round_activity_arn: Option<String>,
    pub aggregate_shard_activity_arn: Option<String>,
    pub commit_round_activity_arn: Option<String>,
    pub finalize_activity_arn: Option<String>,
    pub report_failure_activity_arn: Option<String>,
    pub updates_stream_arn: Option<String>,
}

impl Settings {
    /// From the process environment.
    pub fn from_env() -> Settings {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any name → value lookup (the environment, or the
    /// `aggregator_env` object of a local deploy JSON). Empty values count
    /// as unset so that `FEDSTEP_X=` does not produce an empty table name.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Settings {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        Settings {
            bucket: get("FEDSTEP_BUCKET"),
            rounds_table: get("FEDSTEP_ROUNDS_TABLE"),
            updates_table: get("FEDSTEP_UPDATES_TABLE"),
            topic_arn: get("FEDSTEP_TOPIC_ARN"),
            training_complete_topic_arn: get("FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN"),
            state_machine_arn: get("FEDSTEP_STATE_MACHINE_ARN"),
            s3_force_path_style: get("FEDSTEP_S3_FORCE_PATH_STYLE")
                .is_some_and(|v| matches!(v.trim(), "1" | "true" | "yes")),
            start_round_activity_arn: get("FEDSTEP_START_ROUND_ACTIVITY_ARN"),
            plan_round_activity_arn: get("FEDSTEP_PLAN_ROUND_ACTIVITY_ARN"),
            shard_statistics_activity_arn: get("FEDSTEP_SHARD_STATISTICS_ACTIVITY_ARN"),
            decide_round_activity_arn: get("FEDSTEP_DECIDE_ROUND_ACTIVITY_ARN"),
            aggregate_shard_activity_arn: get("FEDSTEP_AGGREGATE_SHARD_ACTIVITY_ARN"),
            commit_round_activity_arn: get("FEDSTEP_COMMIT_ROUND_ACTIVITY_ARN"),
            finalize_activity_arn: get("FEDSTEP_FINALIZE_ACTIVITY_ARN"),
            report_failure_activity_arn: get("FEDSTEP_REPORT_FAILURE_ACTIVITY_ARN"),
            updates_stream_arn: get("FEDSTEP_UPDATES_STREAM_ARN"),
        }
    }
}

/// A required setting, or an error naming its variable.
pub(crate) fn required<'a>(value: &'a Option<String>, var: &str) -> Result<&'a str, CloudError> {
    value
        .as_deref()
        .ok_or_else(|| CloudError::Invalid(format!("{var} is not set")))
}

/// The SDK configuration plus fedstep's settings.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub sdk: SdkConfig,
    pub settings: Settings,
}

impl AwsConfig {
    /// The standard chain (AWS_PROFILE, AWS_REGION, credentials,
    /// `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_<SERVICE>`) and `FEDSTEP_*`.
    pub async fn from_env() -> AwsConfig {
        let sdk = crate::sdk_defaults().load().await;
        AwsConfig::new(sdk, Settings::from_env())
    }

    pub fn new(sdk: SdkConfig, settings: Settings) -> AwsConfig {
        AwsConfig { sdk, settings }
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        // Responses are not checked against S3's checksums by the SDK: a
        // ranged GET gets none, and a multipart object's is a checksum of
        // its parts the SDK cannot check (it logged a warning for every
        // such GET). fedstep hashes what it reads itself (the aggregator
        // every input, clients the global model) against the SHA-256 the
        // ledger holds.
        let conf = aws_sdk_s3::config::Builder::from(&self.sdk)
            .force_path_style(self.settings.s3_force_path_style)
            .response_checksum_validation(
                aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
            )
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk)
    }

    pub fn dynamodb_streams(&self) -> aws_sdk_dynamodbstreams::Client {
        aws_sdk_dynamodbstreams::Client::new(&self.sdk)
    }

    pub fn sns(&self) -> aws_sdk_sns::Client {
        aws_sdk_sns::Client::new(&self.sdk)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk)
    }

    pub fn sfn(&self) -> aws_sdk_sfn::Client {
        aws_sdk_sfn::Client::new(&self.sdk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_lookup() {
        let s = Settings::from_lookup(|k| match k {
            "FEDSTEP_BUCKET" => Some("b".into()),
            "FEDSTEP_ROUNDS_TABLE" => Some("  ".into()),
            "FEDSTEP_S3_FORCE_PATH_STYLE" => Some("1".into()),
            _ => None,
        });
        assert_eq!(s.bucket.as_deref(), Some("b"));
        assert_eq!(s.rounds_table, None, "blank counts as unset");
        assert!(s.s3_force_path_style);
        let err = required(&s.rounds_table, "FEDSTEP_ROUNDS_TABLE").unwrap_err();
        assert!(err.to_string().contains("FEDSTEP_ROUNDS_TABLE"));
    }
}
