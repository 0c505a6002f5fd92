//! Builds the AWS adapters from client.toml: region and endpoint from the
//! file when given, otherwise the standard AWS chain (AWS_PROFILE,
//! AWS_REGION, AWS_ENDPOINT_URL[_<SERVICE>]).

use fedstep_aws::aws_config::Region;
use fedstep_aws::{AwsConfig, DynamoLedger, S3Store, Settings, SqsQueue};
use fedstep_client::ClientConfig;

pub async fn connect(cfg: &ClientConfig) -> (SqsQueue, S3Store, DynamoLedger) {
    let mut loader = fedstep_aws::sdk_defaults();
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &cfg.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let aws = AwsConfig::new(
        loader.load().await,
        Settings {
            s3_force_path_style: cfg.s3_force_path_style,
            ..Settings::default()
        },
    );
    let queue = SqsQueue::new(aws.sqs(), &cfg.queue_url);
    let store = S3Store::new(aws.s3(), &cfg.bucket);
    // A client only reads and writes its own `updates` rows; the rounds
    // table belongs to the aggregator, so no name is configured for it.
    let ledger = DynamoLedger::new(aws.dynamodb(), "", &cfg.updates_table);
    (queue, store, ledger)
}
