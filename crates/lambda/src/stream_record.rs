//! The stream-record decoder: one record of a DynamoDB stream batch (the
//! JSON Lambda hands the function) → the `updates` row it carries. The row
//! was written by a client, so the bytes are untrusted: every failure is a
//! `StreamItem` whose `update` says why, never a panic, and one bad record
//! never fails the batch around it.
//!
//! Self-contained on purpose (fedstep-cloud, serde_json, aws_lambda_events,
//! serde_dynamo only): fuzz/fuzz_targets/update_record.rs compiles this very
//! file without building the AWS SDK under the sanitizer.

use aws_lambda_events::event::dynamodb::EventRecord;
use fedstep_cloud::records::UpdateRecord;
use serde_json::Value;

/// One record of a DynamoDB stream batch, decoded as far as it could be.
#[derive(Debug, Clone)]
pub struct StreamItem {
    /// The sequence number: the batch item identifier Lambda retries from.
    pub id: String,
    /// INSERT / MODIFY / REMOVE.
    pub event_name: String,
    /// The new image as an update row, or why it is not one.
    pub update: Result<UpdateRecord, String>,
}

/// One stream record, decoded record by record so that one malformed
/// record is rejected alone instead of failing (and blocking) the batch.
pub fn decode(raw: &Value) -> StreamItem {
    let fallback_id = raw
        .pointer("/dynamodb/SequenceNumber")
        .or_else(|| raw.get("eventID"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let event_name = raw
        .get("eventName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let record: EventRecord = match serde_json::from_value(raw.clone()) {
        Ok(r) => r,
        Err(e) => {
            return StreamItem {
                id: fallback_id,
                event_name,
                update: Err(format!("stream record: {e}")),
            };
        }
    };
    let id = record.change.sequence_number.clone().unwrap_or(fallback_id);
    let update = serde_dynamo::from_item::<_, UpdateRecord>(record.change.new_image)
        .map_err(|e| format!("update row: {e}"));
    StreamItem {
        id,
        event_name: record.event_name,
        update,
    }
}
