//! `ClientQueue` on SQS.

use aws_sdk_sqs::types::MessageSystemAttributeName;
use fedstep_cloud::error::Result;
use fedstep_cloud::ports::{ClientQueue, QueueMessage};

use crate::error::sdk_error;

#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> SqsQueue {
        SqsQueue {
            client,
            queue_url: queue_url.into(),
        }
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }
}

impl ClientQueue for SqsQueue {
    async fn receive(&self, max: u32, wait_seconds: u32) -> Result<Vec<QueueMessage>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            // SQS limits: 1..=10 messages, 0..=20 s long poll.
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait_seconds.min(20) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("SQS ReceiveMessage {}", self.queue_url), e))?;
        let messages = out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                // Without a receipt handle a message can be neither deleted
                // nor extended; SQS always sends one, so this only drops junk.
                Some(QueueMessage {
                    // SQS always sends one; "?" keeps a log line readable if not.
                    message_id: m.message_id.unwrap_or_else(|| "?".to_string()),
                    body: m.body.unwrap_or_default(),
                    receipt: m.receipt_handle?,
                    receive_count,
                })
            })
            .collect();
        Ok(messages)
    }

    async fn delete(&self, receipt: &str) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("SQS DeleteMessage {}", self.queue_url), e))?;
        Ok(())
    }

    async fn extend_visibility(&self, receipt: &str, seconds: u32) -> Result<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            // SQS maximum: 12 hours.
            .visibility_timeout(seconds.min(43_200) as i32)
            .send()
            .await
            .map_err(|e| {
                sdk_error(
                    &format!("SQS ChangeMessageVisibility {}", self.queue_url),
                    e,
                )
            })?;
        Ok(())
    }
}
