//! Issue #6, engine side: hostile `updates` rows and job configs that
//! tests/rejections.rs (prefix, unknown client, malformed and wrong
//! checksum, job_round) and job.rs's unit tests (min_clients, rounds,
//! duplicate clients, ids, weighting, timeout) do not cover yet, and
//! fixed-iteration property tests of the decoders the fuzz targets run
//! (fuzz/fuzz_targets/update_record.rs, notification.rs).

use fedstep_cloud::error::CloudError;
use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, Notification, RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::{JobSpec, UpdateOutcome};
use fedstep_test_support::assert_close_f32;
use fedstep_test_support::federation::*;
use proptest::prelude::*;
use serde_json::Value;

fn rejected(o: UpdateOutcome) -> String {
    match o {
        UpdateOutcome::Rejected(r) => r,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn rows_naming_no_round_a_closed_round_or_bad_ids_are_rejected_with_the_rule() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("rows", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let good = fed.submit(&job, 1, "a", &[1.0], 1, &[]).await;

    let with = |f: &dyn Fn(&mut UpdateRecord)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(UpdateRecord, &str)> = vec![
        (with(&|r| r.round = 0), "round: rounds are numbered from 1"),
        (with(&|r| r.round = 99), "round: job `rows` has no round 99"),
        (with(&|r| r.job_id = "nope".into()), "job: no job `nope`"),
        (with(&|r| r.client_id = "../b".into()), "client_id:"),
        (with(&|r| r.client_id = String::new()), "client_id:"),
        (with(&|r| r.job_id = "rows/../x".into()), "job_id:"),
        (with(&|r| r.schema = Some(SCHEMA + 1)), "schema:"),
        (
            with(&|r| r.model_key = "jobs/rows/rounds/1/updates/../../../../etc/passwd".into()),
            "model_key:",
        ),
        (
            with(&|r| r.model_key = "jobs/rows/rounds/2/updates/a.safetensors".into()),
            "model_key:",
        ),
        (with(&|r| r.checksum = "A".repeat(63)), "checksum:"),
    ];
    for (row, want) in &cases {
        let reason = rejected(engine.on_update(row).await.unwrap());
        assert!(
            reason.starts_with(want),
            "{row:?}: `{reason}` should start with `{want}`"
        );
    }
    // Rules that could be pinned to round 1 are recorded there, and the
    // round is still OPEN for the others.
    let row = fed.ledger.get_round("rows", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Open);
    assert!(
        row.rejections["a"].starts_with("checksum:"),
        "{:?}",
        row.rejections
    );
    let b = fed.submit(&job, 1, "b", &[2.0], 1, &[]).await;
    assert!(matches!(
        engine.on_update(&b).await.unwrap(),
        UpdateOutcome::Recorded { usable: 1, .. }
    ));
    // A rejection is final for the round (a client has one row per round;
    // the rows above could only have come from `a` itself): its stored
    // row, delivered now, does not make it usable again.
    assert!(matches!(
        engine.on_update(&good).await.unwrap(),
        UpdateOutcome::Recorded { usable: 1, .. }
    ));
}

#[tokio::test]
async fn rows_for_a_closed_or_failed_round_are_recorded_late() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("past", 3, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    for (c, v) in [("a", 1.0), ("b", 3.0)] {
        let r = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        engine.on_update(&r).await.unwrap();
    }
    fed.clock.advance(601);
    engine
        .close_round("past", 1, ClosedBy::Deadline)
        .await
        .unwrap();
    let c = fed.submit(&job, 1, "c", &[100.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&c).await.unwrap() else {
        panic!("late")
    };
    assert!(reason.starts_with("late: round 1 is Closed"), "{reason}");
    let row = fed.ledger.get_round("past", 1).await.unwrap().unwrap();
    assert!(row.rejections["c"].starts_with("late:"));
    assert_close_f32(&fed.global(&job, 2).await, &[2.0]);

    // Round 2 fails its quorum; a row arriving afterwards is late too.
    engine.start_round(&job, 2, "t2").await.unwrap();
    let a = fed.submit(&job, 2, "a", &[1.0], 1, &[]).await;
    engine.on_update(&a).await.unwrap();
    fed.clock.advance(601);
    let err = engine
        .close_round("past", 2, ClosedBy::Deadline)
        .await
        .unwrap_err();
    assert!(matches!(err, CloudError::QuorumNotMet(_)), "{err}");
    let b = fed.submit(&job, 2, "b", &[1.0], 1, &[]).await;
    let UpdateOutcome::Late(reason) = engine.on_update(&b).await.unwrap() else {
        panic!("late")
    };
    assert!(reason.starts_with("late: round 2 is Failed"), "{reason}");
    // A replay of a counted row is not re-recorded as late.
    let UpdateOutcome::Late(reason) = engine.on_update(&a).await.unwrap() else {
        panic!("replay")
    };
    assert!(reason.starts_with("replay:"), "{reason}");
    let row = fed.ledger.get_round("past", 2).await.unwrap().unwrap();
    assert!(!row.rejections.contains_key("a"), "{:?}", row.rejections);
}

/// Regression (found by the fault schedules): a row rejected for a rule
/// while the round was OPEN, redelivered after the close, used to have its
/// reason overwritten with "late: …" in the round row.
#[tokio::test]
async fn a_rejected_row_redelivered_after_the_close_keeps_its_reason() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = job("keep", 2, &["a", "b", "c"], 2);
    fed.upload_initial(&job, &[0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();
    let mut a = fed.submit(&job, 1, "a", &[1.0], 1, &[]).await;
    a.job_round = "keep#000002".into();
    let first = rejected(engine.on_update(&a).await.unwrap());
    assert!(first.starts_with("job_round:"), "{first}");
    for (c, v) in [("b", 1.0), ("c", 3.0)] {
        let r = fed.submit(&job, 1, c, &[v], 1, &[]).await;
        engine.on_update(&r).await.unwrap();
    }
    engine
        .close_round("keep", 1, ClosedBy::Stream)
        .await
        .unwrap();
    let row = fed.ledger.get_round("keep", 1).await.unwrap().unwrap();
    assert_eq!(row.status, RoundStatus::Closed);
    let UpdateOutcome::Late(reason) = engine.on_update(&a).await.unwrap() else {
        panic!("a replay after the close is Late")
    };
    assert!(
        reason.starts_with("replay:") && reason.contains("job_round:"),
        "{reason}"
    );
    let row = fed.ledger.get_round("keep", 1).await.unwrap().unwrap();
    assert_eq!(row.rejections["a"], first);
    assert_eq!(row.result.unwrap().rejected["a"], first);
}

#[tokio::test]
async fn contradictory_jobs_are_refused_before_anything_is_written() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let good = job("cfg", 2, &["a", "b"], 2);
    fed.upload_initial(&good, &[0.0]).await;

    // The engine takes only a checked `Job`: a contradictory spec is
    // refused by the check, the only way to one.
    let mut too_many = good.spec().clone();
    too_many.min_clients = 3;
    let mut no_clients = good.spec().clone();
    no_clients.clients.clear();
    let mut bad_pipeline = good.spec().clone();
    bad_pipeline
        .aggregation
        .insert("weighting".into(), toml::Value::String("vibes".into()));
    for (bad, want) in [
        (too_many, "exceeds the 2 clients"),
        (no_clients, "clients is empty"),
        (bad_pipeline, "[aggregation]"),
    ] {
        let err = bad.check().unwrap_err();
        assert!(err.contains(want), "{err}");
    }
    for round in [0, 3] {
        let err = engine.start_round(&good, round, "t").await.unwrap_err();
        assert!(err.to_string().contains("outside 1..=2"), "{err}");
    }
    let err = engine.start_round(&good, 1, "").await.unwrap_err();
    assert!(err.to_string().contains("task token is empty"), "{err}");
    assert!(fed.ledger.get_job("cfg").await.unwrap().is_none());

    // Once a job exists, another spec under the same id is refused.
    engine.start_round(&good, 1, "t1").await.unwrap();
    let mut changed = good.spec().clone();
    changed.rounds = 5;
    let changed = changed.check().unwrap();
    let err = engine.start_round(&changed, 1, "t2").await.unwrap_err();
    assert!(matches!(err, CloudError::ConditionFailed(_)), "{err}");

    // Job files: typos and contradictions in [stop] are named.
    let base = "job_id = \"j\"\nrounds = 2\nclients = [\"a\"]\nmin_clients = 1\nround_timeout_seconds = 60\n";
    for (extra, want) in [
        ("min_client = 1\n", "min_client"),
        ("[stop]\nmetric = \"loss\"\n", "needs a target, a patience"),
        ("[stop]\nmetric = \"loss\"\ntarget = nan\n", "finite"),
        (
            "[stop]\nmetric = \"loss\"\ntarget = 1.0\nmode = \"sideways\"\n",
            "sideways",
        ),
    ] {
        let err = JobSpec::from_toml(&format!("{base}{extra}")).unwrap_err();
        assert!(err.contains(want), "{extra}: {err}");
    }
    let err = JobSpec::from_toml(&base.replace(
        "round_timeout_seconds = 60",
        "round_timeout_seconds = 99999999999",
    ))
    .unwrap_err();
    assert!(err.contains("round_timeout_seconds"), "{err}");
}

fn valid_row_json() -> Value {
    serde_json::json!({
        "client_id": "a", "job_round": "fz#000001", "job_id": "fz", "round": 1,
        "model_key": "jobs/fz/rounds/1/updates/a.safetensors",
        "checksum": "ab".repeat(32), "num_examples": 10, "llm_type": null,
        "metrics": {"loss": 0.5}, "bytes": 100, "trained_at": "2027-01-15T08:00:00Z", "schema": 1
    })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z0-9#/._-]{0,20}".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const FIELDS: [&str; 12] = [
    "client_id",
    "job_round",
    "job_id",
    "round",
    "model_key",
    "checksum",
    "num_examples",
    "llm_type",
    "metrics",
    "bytes",
    "trained_at",
    "schema",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random bytes: the record and message decoders return Ok or Err.
    #[test]
    fn decoders_never_panic_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<UpdateRecord>(&bytes);
        let _ = serde_json::from_slice::<Notification>(&bytes);
    }

    /// A valid row with fields replaced by arbitrary JSON or removed: it
    /// decodes or not, and whatever decodes goes through `on_update`
    /// (against an OPEN round in the in-memory ledger) to an outcome,
    /// never an error or a panic.
    #[test]
    fn mutated_rows_get_an_outcome(
        edits in proptest::collection::vec((0..FIELDS.len(), proptest::option::of(arb_json())), 0..4)
    ) {
        let mut v = valid_row_json();
        for (i, value) in edits {
            let obj = v.as_object_mut().unwrap();
            match value {
                Some(x) => { obj.insert(FIELDS[i].into(), x); }
                None => { obj.remove(FIELDS[i]); }
            }
        }
        let bytes = serde_json::to_vec(&v).unwrap();
        if let Ok(row) = serde_json::from_slice::<UpdateRecord>(&bytes) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let fed = Fed::new();
                let engine = fed.engine("p");
                let job = job("fz", 2, &["a", "b", "c"], 2);
                fed.upload_initial(&job, &[0.0]).await;
                engine.start_round(&job, 1, "t1").await.unwrap();
                let outcome = engine.on_update(&row).await;
                prop_assert!(outcome.is_ok(), "{row:?}: {outcome:?}");
                if let Ok(UpdateOutcome::Recorded { usable, .. }) = outcome {
                    prop_assert_eq!(usable, 1);
                    prop_assert_eq!(&row.job_round, "fz#000001");
                    prop_assert_eq!(&row.client_id, "a");
                }
                Ok(())
            })?;
        }
    }

    /// Valid notifications with fields replaced: decode or not, never panic;
    /// what decodes re-encodes to the same message.
    #[test]
    fn mutated_notifications_round_trip(
        edits in proptest::collection::vec(("[a-z_]{1,12}", proptest::option::of(arb_json())), 0..4),
        complete in any::<bool>(),
    ) {
        let mut v = if complete {
            serde_json::json!({"type": "training_complete", "schema": 1, "job_id": "j",
                               "final_round": 3, "final_model_key": "k", "artifact_id": "j:3"})
        } else {
            serde_json::json!({"type": "global_model_ready", "schema": 1, "job_id": "j", "round": 1,
                               "model_key": "k", "checksum": "ab", "deadline": 5,
                               "round_config": {"epochs": 1}})
        };
        for (k, value) in edits {
            let obj = v.as_object_mut().unwrap();
            match value {
                Some(x) => { obj.insert(k, x); }
                None => { obj.remove(&k); }
            }
        }
        if let Ok(n) = serde_json::from_value::<Notification>(v) {
            let again: Notification = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
            prop_assert_eq!(again, n);
        }
    }
}
