//! Fixed-iteration property tests of the Lambda's stream-record decoder
//! (CI's stand-in for fuzz/fuzz_targets/update_record.rs, which runs the
//! same decoder under libFuzzer outside CI): it never panics on any JSON,
//! a record it decodes carries exactly the row in its NEW_IMAGE, and a bad
//! record says why.

use fedstep_lambda::stream_record::decode;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Any JSON value, a few levels deep.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[A-Za-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A DynamoDB attribute value, sometimes of the wrong type for its field.
fn arb_attribute() -> impl Strategy<Value = Value> {
    prop_oneof![
        "\\PC{0,16}".prop_map(|s| json!({"S": s})),
        any::<i64>().prop_map(|n| json!({"N": n.to_string()})),
        "[-0-9.eE+a-z]{0,12}".prop_map(|n| json!({"N": n})),
        any::<bool>().prop_map(|b| json!({"BOOL": b})),
        Just(json!({"NULL": true})),
        arb_json(),
    ]
}

fn image() -> Value {
    json!({
        "client_id": {"S": "site-a"}, "job_round": {"S": "j1#000001"}, "job_id": {"S": "j1"},
        "round": {"N": "1"}, "model_key": {"S": "jobs/j1/rounds/1/updates/site-a.safetensors"},
        "checksum": {"S": "a".repeat(64)}, "num_examples": {"N": "10"},
        "metrics": {"M": {"loss": {"N": "0.5"}}}, "bytes": {"N": "4"},
        "trained_at": {"S": "2026-01-01T00:00:00Z"}, "schema": {"N": "1"}
    })
}

fn record(image: Value) -> Value {
    json!({
        "eventID": "e1", "eventName": "INSERT", "eventVersion": "1.1",
        "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
        "dynamodb": {"ApproximateCreationDateTime": 1.7e9, "Keys": {}, "NewImage": image,
                     "SequenceNumber": "100", "SizeBytes": 100, "StreamViewType": "NEW_IMAGE"},
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:1:table/t/stream/x"
    })
}

const FIELDS: [&str; 11] = [
    "client_id",
    "job_round",
    "job_id",
    "round",
    "model_key",
    "checksum",
    "num_examples",
    "metrics",
    "bytes",
    "trained_at",
    "schema",
];

#[test]
fn a_well_formed_record_decodes_to_its_row() {
    let item = decode(&record(image()));
    assert_eq!(
        (item.id.as_str(), item.event_name.as_str()),
        ("100", "INSERT")
    );
    let row = item.update.unwrap();
    assert_eq!(
        (row.client_id.as_str(), row.round, row.bytes),
        ("site-a", 1, 4)
    );
    assert_eq!(row.num_examples, json!(10));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_json(v in arb_json()) {
        let item = decode(&v);
        if let Err(why) = &item.update {
            prop_assert!(!why.is_empty());
        }
    }

    #[test]
    fn never_panics_on_a_record_with_any_image(image in arb_json()) {
        let _ = decode(&record(image));
    }

    #[test]
    fn edited_images_decode_to_exactly_their_fields_or_say_why(
        edits in proptest::collection::vec((0..FIELDS.len(), proptest::option::of(arb_attribute())), 0..4),
    ) {
        let mut img = image();
        for (i, edit) in &edits {
            match edit {
                Some(v) => img[FIELDS[*i]] = v.clone(),
                None => { img.as_object_mut().unwrap().remove(FIELDS[*i]); }
            }
        }
        let item = decode(&record(img.clone()));
        prop_assert_eq!(item.id.as_str(), "100");
        match item.update {
            Ok(row) => {
                // What was decoded is what the image says, field by field.
                for (field, got) in [
                    ("client_id", &row.client_id),
                    ("job_id", &row.job_id),
                    ("job_round", &row.job_round),
                    ("model_key", &row.model_key),
                    ("checksum", &row.checksum),
                ] {
                    // A string attribute (S), or a number's digits (N) if
                    // the decoder reads those as text.
                    let held = img[field].get("S").or_else(|| img[field].get("N"));
                    prop_assert_eq!(held.and_then(Value::as_str), Some(got.as_str()), "{}", field);
                }
                prop_assert_eq!(img["round"]["N"].as_str().map(str::parse::<u32>), Some(Ok(row.round)));
            }
            Err(why) => prop_assert!(why.starts_with("update row:") || why.starts_with("stream record:"), "{}", why),
        }
    }
}
