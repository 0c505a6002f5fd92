//! Stream records as the Lambda event source mapping hands them over.
//!
//! The records are read from the emulator's real DynamoDB stream of the
//! `updates` table (rows the test wrote, so sequence numbers, keys and
//! images are the stream's own), then written out in the JSON of a Lambda
//! DynamoDB event: the fields of `GetRecords` plus `eventSourceARN`, images
//! in DynamoDB JSON, absent fields absent (aws_lambda_events'
//! example-dynamodb-event.json has the same shape).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fedstep_aws::aws_sdk_dynamodbstreams as streams;
use serde_json::{json, Map, Value};
use streams::types::{AttributeValue, ShardIteratorType};

/// Every record of the stream whose key `job_round` starts with one of
/// `jobs` (followed by `#`), in stream order; waits up to 20 s for
/// `expected` of them.
pub async fn read(
    client: &streams::Client,
    stream_arn: &str,
    jobs: &[&str],
    expected: usize,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut found = Vec::new();
        let desc = client
            .describe_stream()
            .stream_arn(stream_arn)
            .send()
            .await
            .expect("DescribeStream")
            .stream_description
            .expect("a stream description");
        for shard in desc.shards.unwrap_or_default() {
            let mut iterator = client
                .get_shard_iterator()
                .stream_arn(stream_arn)
                .shard_id(shard.shard_id.unwrap_or_default())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("GetShardIterator")
                .shard_iterator;
            // Bounded: the stream of a test deployment holds a few thousand
            // records at most.
            for _ in 0..100 {
                let Some(it) = iterator.take() else { break };
                let out = client
                    .get_records()
                    .shard_iterator(it)
                    .limit(1000)
                    .send()
                    .await
                    .expect("GetRecords");
                let records = out.records.unwrap_or_default();
                if records.is_empty() {
                    break;
                }
                found.extend(
                    records
                        .into_iter()
                        .map(|r| lambda_record(r, stream_arn))
                        .filter(|r| of_jobs(r, jobs)),
                );
                iterator = out.next_shard_iterator;
            }
        }
        if found.len() >= expected || Instant::now() > deadline {
            assert_eq!(found.len(), expected, "stream records of {jobs:?}");
            return found;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn of_jobs(record: &Value, jobs: &[&str]) -> bool {
    let key = record
        .pointer("/dynamodb/Keys/job_round/S")
        .and_then(Value::as_str)
        .unwrap_or("");
    jobs.iter()
        .any(|job| key.strip_prefix(job).is_some_and(|r| r.starts_with('#')))
}

/// One `GetRecords` record in the Lambda event's JSON.
fn lambda_record(r: streams::types::Record, stream_arn: &str) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            out.insert(k.into(), v);
        }
    };
    put("eventID", r.event_id.map(Value::from));
    put(
        "eventName",
        r.event_name.map(|n| Value::from(n.as_str().to_string())),
    );
    put("eventVersion", r.event_version.map(Value::from));
    put("eventSource", r.event_source.map(Value::from));
    put("awsRegion", r.aws_region.map(Value::from));
    let mut change = Map::new();
    if let Some(d) = r.dynamodb {
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                change.insert(k.into(), v);
            }
        };
        put(
            "ApproximateCreationDateTime",
            d.approximate_creation_date_time.map(|t| json!(t.secs())),
        );
        put("Keys", d.keys.map(image));
        // moto gives a REMOVE of a NEW_IMAGE stream `"NewImage": {}`; DynamoDB
        // gives no NewImage at all, and so does the Lambda event.
        put("NewImage", d.new_image.filter(|i| !i.is_empty()).map(image));
        put("OldImage", d.old_image.filter(|i| !i.is_empty()).map(image));
        put("SequenceNumber", d.sequence_number.map(Value::from));
        put("SizeBytes", d.size_bytes.map(Value::from));
        put(
            "StreamViewType",
            d.stream_view_type
                .map(|v| Value::from(v.as_str().to_string())),
        );
    }
    out.insert("dynamodb".into(), Value::Object(change));
    out.insert("eventSourceARN".into(), Value::from(stream_arn));
    Value::Object(out)
}

/// An item in DynamoDB JSON (`{"S": ...}`, `{"N": "..."}`, ...).
fn image(item: HashMap<String, AttributeValue>) -> Value {
    let item: HashMap<String, serde_dynamo::AttributeValue> =
        item.into_iter().map(|(k, v)| (k, v.into())).collect();
    serde_json::to_value(item).unwrap()
}
