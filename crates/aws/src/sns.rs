//! `Notifier` on SNS.

use aws_sdk_sns::types::MessageAttributeValue;
use fedstep_cloud::error::Result;
use fedstep_cloud::ports::Notifier;
use fedstep_cloud::records::Notification;
use fedstep_cloud::CloudError;

use crate::config::{required, AwsConfig};
use crate::error::sdk_error;

/// Publishes every kind to the clients' topic (the deployed stack has one
/// topic for all, infra/lib/messaging.ts; operators filter on the `type`
/// attribute), or the job ends (`training_complete`, `job_failed`) to a
/// topic of their own when one is configured
/// (`FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN`, as the emulator deployment does;
/// every client queue is subscribed to both there).
#[derive(Debug, Clone)]
pub struct SnsNotifier {
    client: aws_sdk_sns::Client,
    topic_arn: String,
    training_complete_topic_arn: Option<String>,
}

impl SnsNotifier {
    pub fn new(
        client: aws_sdk_sns::Client,
        topic_arn: impl Into<String>,
        training_complete_topic_arn: Option<String>,
    ) -> SnsNotifier {
        SnsNotifier {
            client,
            topic_arn: topic_arn.into(),
            training_complete_topic_arn,
        }
    }

    /// `FEDSTEP_TOPIC_ARN` (+ optional `FEDSTEP_TRAINING_COMPLETE_TOPIC_ARN`).
    pub fn from_config(cfg: &AwsConfig) -> Result<SnsNotifier> {
        let s = &cfg.settings;
        Ok(SnsNotifier::new(
            cfg.sns(),
            required(&s.topic_arn, "FEDSTEP_TOPIC_ARN")?,
            s.training_complete_topic_arn.clone(),
        ))
    }

    fn topic_for(&self, message: &Notification) -> &str {
        match message {
            Notification::GlobalModelReady(_) => &self.topic_arn,
            // Both end the job: wherever job ends go.
            Notification::TrainingComplete(_) | Notification::JobFailed(_) => self
                .training_complete_topic_arn
                .as_deref()
                .unwrap_or(&self.topic_arn),
        }
    }
}

fn string_attribute(value: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| CloudError::Other(format!("SNS message attribute: {e}")))
}

impl Notifier for SnsNotifier {
    async fn publish(&self, message: &Notification) -> Result<()> {
        let body = serde_json::to_string(message)
            .map_err(|e| CloudError::Other(format!("encoding notification: {e}")))?;
        let kind = match message {
            Notification::GlobalModelReady(_) => "global_model_ready",
            Notification::TrainingComplete(_) => "training_complete",
            Notification::JobFailed(_) => "job_failed",
        };
        let topic = self.topic_for(message);
        self.client
            .publish()
            .topic_arn(topic)
            .message(body)
            // Each client queue's subscription filter policy matches on
            // job_id (infra/lib/client-access.ts); `type` lets a subscriber
            // filter by kind.
            .message_attributes("job_id", string_attribute(message.job_id())?)
            .message_attributes("type", string_attribute(kind)?)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("SNS Publish {topic}"), e))?;
        Ok(())
    }
}
