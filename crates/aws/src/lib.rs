//! fedstep-aws: the AWS adapters of fedstep-cloud's ports (docs/design.md §2–3).
//!
//! | port            | adapter          | service        |
//! |-----------------|------------------|----------------|
//! | `ObjectStore`   | [`S3Store`]      | S3             |
//! | `Ledger`        | [`DynamoLedger`] | DynamoDB       |
//! | `Notifier`      | [`SnsNotifier`]  | SNS            |
//! | `TaskCallback`  | [`SfnCallback`]  | Step Functions |
//! | `ClientQueue`   | [`SqsQueue`]     | SQS            |
//!
//! Every adapter is built from an [`AwsConfig`]: the SDK's standard chain
//! (`AWS_PROFILE`, `AWS_REGION`, `AWS_ENDPOINT_URL[_<SERVICE>]`) plus fedstep's
//! resource names from `FEDSTEP_*` variables. Emulators need no code path of
//! their own; only S3 path-style addressing is a setting. Every SDK
//! configuration starts from [`sdk_defaults`], which brings the one HTTPS
//! client ([`https_client`]).

mod config;
mod dynamo;
mod error;
mod https_client;
mod s3;
mod s3_parts;
mod s3_reader;
mod s3_writer;
mod sfn;
mod sns;
mod sqs;

pub use config::{AwsConfig, Settings};
pub use dynamo::DynamoLedger;
pub use error::sdk_error;
pub use https_client::{https_client, sdk_defaults};
pub use s3::{S3Store, DEFAULT_MULTIPART_THRESHOLD, DEFAULT_PART_SIZE};
pub use s3_parts::S3Parts;
pub use sfn::SfnCallback;
pub use sns::SnsNotifier;
pub use sqs::SqsQueue;

// Re-exported so that fedstep-lambda's local mode (activities, the stream)
// and the tests use exactly these SDK versions without naming them again.
pub use aws_config;
pub use aws_sdk_dynamodb;
pub use aws_sdk_dynamodbstreams;
pub use aws_sdk_s3;
pub use aws_sdk_sfn;
pub use aws_sdk_sns;
pub use aws_sdk_sqs;
