//! Issue #6, the client's side: whatever arrives on its queue, a malformed
//! or oversized message gets a specific rejection (the rule it broke) and
//! is deleted — it can never become valid, so leaving it for the DLQ would
//! only delay the messages behind it by maxReceiveCount deliveries — and the
//! worker goes on with the next message. Only a newer schema stays (an
//! upgraded client can use it; the redrive policy ends its loop).

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fedstep_client::message::MAX_MESSAGE_BYTES;
use fedstep_client::{Outcome, RunEnd, Worker};
use serde_json::{json, Value};

type W = Worker<MemQueue, DirStore, MemLedger, CopyTrainer>;

struct Rig {
    _dir: tempfile::TempDir,
    queue: Arc<MemQueue>,
    store: Arc<DirStore>,
    ledger: Arc<MemLedger>,
    trainer: Arc<CopyTrainer>,
    worker: W,
}

fn rig(jobs: Option<Vec<String>>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let queue = MemQueue::new();
    let store = DirStore::new(&store_dir);
    let ledger = MemLedger::new();
    let trainer = Arc::new(CopyTrainer::default());
    let mut opts = options(&dir.path().join("work"));
    opts.jobs = jobs;
    opts.exit_on_complete = true;
    let worker = Worker::new(
        opts,
        queue.clone(),
        store.clone(),
        ledger.clone(),
        trainer.clone(),
    )
    .with_clock(Arc::new(FixedClock(NOW)));
    Rig {
        _dir: dir,
        queue,
        store,
        ledger,
        trainer,
        worker,
    }
}

async fn one(r: &Rig) -> Outcome {
    let mut out = r.worker.poll_once().await.unwrap();
    assert_eq!(out.len(), 1, "{out:?}");
    out.remove(0)
}

/// A valid announcement of j1 round 1 as JSON, to be broken one rule at a time.
fn ready(r: &Rig) -> Value {
    serde_json::from_str(&announce(&r.store, "j1", 1, &global_model())).unwrap()
}

fn with(mut v: Value, field: &str, value: Value) -> String {
    v[field] = value;
    v.to_string()
}

fn without(mut v: Value, field: &str) -> String {
    v.as_object_mut().unwrap().remove(field);
    v.to_string()
}

/// Every body here breaks exactly one rule; the reason must name it.
fn malformed_bodies(r: &Rig) -> Vec<(String, String, &'static str)> {
    let good = ready(r);
    let mut envelope_bad_inner = json!({"Type": "Notification", "TopicArn": "arn:aws:sns:x",
                                         "Message": "{\"schema\": 1, \"type\": \"global_model_ready\""});
    envelope_bad_inner["MessageId"] = json!("m-1");
    vec![
        (
            "too large".into(),
            format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_MESSAGE_BYTES)),
            "bytes, more than the",
        ),
        (
            // Large but otherwise a perfectly good announcement.
            "too large, otherwise valid".into(),
            with(good.clone(), "pad", json!("y".repeat(MAX_MESSAGE_BYTES))),
            "bytes, more than the",
        ),
        ("not JSON".into(), "hello".into(), "not JSON"),
        ("empty body".into(), String::new(), "not JSON"),
        (
            "truncated JSON".into(),
            good.to_string()[..40].into(),
            "not JSON",
        ),
        ("nested too deep".into(), "[".repeat(10_000), "not JSON"),
        (
            "SNS envelope around garbage".into(),
            envelope_bad_inner.to_string(),
            "SNS envelope's Message is not JSON",
        ),
        (
            "no schema".into(),
            without(good.clone(), "schema"),
            "no schema field",
        ),
        (
            "schema is a string".into(),
            with(good.clone(), "schema", json!("1")),
            "schema is \"1\", not a number",
        ),
        (
            "schema is negative".into(),
            with(good.clone(), "schema", json!(-1)),
            "not a small non-negative integer",
        ),
        (
            "older schema".into(),
            with(good.clone(), "schema", json!(0)),
            "schema 0 is not supported",
        ),
        (
            "unknown type".into(),
            with(good.clone(), "type", json!("delete_everything")),
            "not a notification",
        ),
        (
            "no type".into(),
            without(good.clone(), "type"),
            "not a notification",
        ),
        (
            "round is a string".into(),
            with(good.clone(), "round", json!("1")),
            "not a notification",
        ),
        (
            "no checksum".into(),
            without(good.clone(), "checksum"),
            "not a notification",
        ),
        (
            "round 0".into(),
            with(good.clone(), "round", json!(0)),
            "round 0 is outside",
        ),
        (
            "job id with a path".into(),
            with(good.clone(), "job_id", json!("../j1")),
            "job_id `../j1` must be",
        ),
        (
            "model key of another job".into(),
            with(
                good.clone(),
                "model_key",
                json!("jobs/j2/rounds/1/global.safetensors"),
            ),
            "is not this round's global model key",
        ),
        (
            "model key escaping the prefix".into(),
            with(
                good.clone(),
                "model_key",
                json!("jobs/j1/rounds/1/../../../etc/passwd"),
            ),
            "is not this round's global model key",
        ),
        (
            "model key of another round".into(),
            with(
                good.clone(),
                "model_key",
                json!("jobs/j1/rounds/2/global.safetensors"),
            ),
            "is not this round's global model key",
        ),
        (
            "checksum not hex".into(),
            with(good.clone(), "checksum", json!("Z".repeat(64))),
            "is not a SHA-256 in lowercase hex",
        ),
        (
            "deadline not a time".into(),
            with(good.clone(), "deadline", json!(0)),
            "deadline 0 is not a Unix time",
        ),
        (
            "training_complete outside its job".into(),
            json!({"type": "training_complete", "schema": 1, "job_id": "j1", "final_round": 1,
                   "final_model_key": "jobs/j2/rounds/2/global.safetensors", "artifact_id": "j1:1"})
            .to_string(),
            "final_model_key `jobs/j2/rounds/2/global.safetensors` is not under `jobs/j1/`",
        ),
    ]
}

#[tokio::test]
async fn each_malformed_message_is_rejected_for_its_rule_and_deleted() {
    let r = rig(None);
    for (what, body, rule) in malformed_bodies(&r) {
        r.queue.send(body);
        match one(&r).await {
            Outcome::Rejected { reason } => {
                assert!(
                    reason.contains(rule),
                    "{what}: `{reason}` does not name `{rule}`"
                );
                assert!(
                    reason.len() < 1000,
                    "{what}: the reason echoes the body: {reason}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(Outcome::Rejected {
            reason: String::new()
        }
        .deletes());
        assert_eq!(r.queue.len(), 0, "{what}: not deleted");
    }
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);
    assert!(r.ledger.rows().is_empty());
}

#[tokio::test]
async fn a_job_we_are_not_in_is_dropped_without_training() {
    let r = rig(Some(vec!["j1".into()]));
    r.queue.send(announce(&r.store, "j9", 1, &global_model()));
    assert_eq!(
        one(&r).await,
        Outcome::NotOurJob {
            job_id: "j9".into()
        }
    );
    assert_eq!(r.queue.len(), 0);
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_round_already_done_is_dropped_without_training_again() {
    let r = rig(None);
    r.queue.send(announce(&r.store, "j1", 2, &global_model()));
    assert!(matches!(one(&r).await, Outcome::Submitted { round: 2, .. }));
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 1);
    // The same round again (SNS delivers at least once; a retried StartRound).
    r.queue.send(announce(&r.store, "j1", 2, &global_model()));
    assert_eq!(
        one(&r).await,
        Outcome::AlreadyDone {
            job_id: "j1".into(),
            round: 2
        }
    );
    // An older round, announced again after its deadline.
    let stale = with(ready(&r), "deadline", json!(NOW - 1));
    r.queue.send(stale);
    assert_eq!(
        one(&r).await,
        Outcome::DeadlinePassed {
            job_id: "j1".into(),
            round: 1
        }
    );
    assert_eq!(
        r.trainer.calls.load(Ordering::SeqCst),
        1,
        "trained once only"
    );
    assert_eq!(r.ledger.rows().len(), 1);
    assert_eq!(r.queue.len(), 0);
}

#[tokio::test]
async fn the_worker_goes_on_past_every_bad_message() {
    let r = rig(Some(vec!["j1".into()]));
    // Bad messages first, the good one behind them, then the job's end.
    for (_, body, _) in malformed_bodies(&r) {
        r.queue.send(body);
    }
    r.queue.send(announce(&r.store, "j9", 1, &global_model()));
    r.queue.send(announce(&r.store, "j1", 1, &global_model()));
    r.queue.send(
        json!({"type": "training_complete", "schema": 1, "job_id": "j1", "final_round": 1,
               "final_model_key": "jobs/j1/rounds/2/global.safetensors", "artifact_id": "j1:1"})
        .to_string(),
    );
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let end = tokio::time::timeout(Duration::from_secs(60), r.worker.run(stopped))
        .await
        .expect("the worker got stuck on a bad message")
        .unwrap();
    assert_eq!(end, RunEnd::JobComplete("j1".into()));
    assert_eq!(r.trainer.calls.load(Ordering::SeqCst), 1);
    let rows = r.ledger.rows();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!((rows[0].job_id.as_str(), rows[0].round), ("j1", 1));
    assert_eq!(r.queue.len(), 0, "every message handled and deleted");
}
