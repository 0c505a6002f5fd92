//! The deployed artifact's way of running, on the emulators: the
//! `fedstep-lambda` bootstrap behind a Lambda Runtime API (`cargo lambda
//! watch --only-lambda-apis`), invoked with the events AWS sends it:
//!
//! * the Step Functions task payloads of the AWS state machine (StartRound's
//!   `lambda:invoke.waitForTaskToken` Payload, the direct-invoke Parameters
//!   of PlanRound, the Map's AggregateShard iterations, CommitRound and
//!   Finalize), taken from a real execution on LocalStack
//!   where the emulator deployment runs the ASL with activities;
//! * DynamoDB stream batches built from real rows read back from the
//!   `updates` table's stream: INSERT, MODIFY and REMOVE records, NEW_IMAGE
//!   and NEW_AND_OLD_IMAGES views, a row that does not decode, and a record
//!   whose processing meets a failing DynamoDB (fault_proxy.rs).
//!
//! It checks the answers (`batchItemFailures`, task outputs, error shapes)
//! and their effects in DynamoDB, S3 and Step Functions. Setup: as
//! crates/aws/tests/common/mod.rs (FEDSTEP_TEST_DEPLOY), plus cargo-lambda
//! (FEDSTEP_CARGO_LAMBDA or PATH; scripts/test.sh installs it). With
//! CI=true a missing prerequisite fails the test instead of skipping it.

#[path = "../../../aws/tests/common/mod.rs"]
mod common;
mod fault_proxy;
mod harness;
mod stream_events;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{str_at, unique, TestEnv};
use fedstep_aws::aws_sdk_dynamodb::types::AttributeValue;
use fedstep_aws::aws_sdk_sfn::types::ExecutionStatus;
use fedstep_aws::{aws_sdk_dynamodbstreams, aws_sdk_sfn};
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::{keys, Job, JobSpec};
use serde_json::{json, Value};

use fault_proxy::FaultProxy;
use harness::{Answer, Runtime};

fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

#[tokio::test]
async fn the_bootstrap_serves_aws_shaped_tasks_and_stream_batches() {
    // The shared deployment says whether the emulators are usable; the test
    // then deploys its own. A `fedstep-lambda local` worker of an earlier
    // test leaves a long poll on the shared deployment's activities behind
    // when it is killed, and LocalStack hands the next task to that dead
    // poll (seen in scripts/test.sh, right after local_smoke).
    let Some(shared) = common::env().await else {
        return;
    };
    drop(shared);
    let own = OwnDeployment::create();
    let env = common::env_at(own.json.to_str().unwrap())
        .await
        .expect("the test's own deployment");
    let Some(cargo_lambda) = harness::cargo_lambda() else {
        let why = "cargo-lambda not found (FEDSTEP_CARGO_LAMBDA, PATH); \
                   PATH=\"$(infra/lambda-tools.sh):$PATH\" installs it";
        assert!(!in_ci(), "CI=true: {why}");
        eprintln!("SKIPPED: {why}");
        return;
    };
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let proxy = FaultProxy::start(host_port(&endpoint(&env, "DYNAMODB", "dynamodb")));
    let mut lambda = Runtime::start(&cargo_lambda, &lambda_env(&env, &proxy), dir.path());
    let store = env.store();
    let ledger = env.ledger();

    // --- Shapes that are no round task: bounded errors, named. ----------------
    let answer = lambda.invoke(&json!({"hello": 1}));
    expect_error(&answer, "UnknownEvent", "neither", &lambda);
    let answer = lambda.invoke(&json!(["not", "an", "object"]));
    expect_error(&answer, "UnknownEvent", "neither", &lambda);

    // --- Job A: a real execution; the Lambda answers its tasks. ---------------
    let job_a = job(&unique("rt-a"), &["site-a", "site-b"], 2);
    put_initial_model(&store, &job_a, dir.path()).await;
    let exec = env
        .sfn
        .start_execution()
        .state_machine_arn(str_at(&env.deploy, "/state_machine/arn"))
        .name(&job_a.job_id)
        .input(serde_json::to_string(&job_a).unwrap())
        .send()
        .await
        .unwrap();
    // StartRound: on AWS the event is the `Payload` of the
    // lambda:invoke.waitForTaskToken Parameters, whose context object ($$)
    // has Task.Token. The emulator deployment hands the same Parameters to
    // an activity, with the activity's token beside them.
    let (token, input) = activity_task(
        &env.sfn,
        str_at(&env.deploy, "/activities/start_round"),
        &job_a.job_id,
    )
    .await;
    let mut payload = input["Payload"].clone();
    assert_eq!(payload["action"], "start_round", "{input}");
    assert!(payload.pointer("/context/Task").is_none(), "{payload}");
    payload["context"]["Task"] = json!({"Token": token});
    let answer = lambda.invoke(&payload);
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    assert_eq!(answer.body["status"], "OPEN", "{answer:?}");
    let round = ledger.get_round(&job_a.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Open);
    assert_eq!(round.task_token.as_deref(), Some(token.as_str()));
    // The same task without its token is refused, not half done.
    let mut tokenless = payload.clone();
    tokenless["context"].as_object_mut().unwrap().remove("Task");
    let answer = lambda.invoke(&tokenless);
    expect_error(&answer, "InvalidTaskInput", "Task.Token", &lambda);

    // --- Stream batch 1: every record kind; the last update hands round 1 over.
    let row_a = client_update(&store, &ledger, &job_a, "site-a", dir.path()).await;
    let broken_key = [
        ("client_id", AttributeValue::S("zz-broken".into())),
        (
            "job_round",
            AttributeValue::S(keys::job_round(&job_a.job_id, 1)),
        ),
    ];
    // A row a client got wrong (no checksum, model_key, ...): INSERT, then
    // MODIFY, then REMOVE of it.
    let table = str_at(&env.deploy, "/tables/updates");
    let mut broken = env.ddb.put_item().table_name(table);
    for (k, v) in broken_key.iter().cloned() {
        broken = broken.item(k, v);
    }
    broken
        .clone()
        .item("job_id", AttributeValue::S(job_a.job_id.clone()))
        .item("round", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    broken
        .item("job_id", AttributeValue::S(job_a.job_id.clone()))
        .item("round", AttributeValue::N("1".into()))
        .item("note", AttributeValue::S("rewritten".into()))
        .send()
        .await
        .unwrap();
    let mut delete = env.ddb.delete_item().table_name(table);
    for (k, v) in broken_key.iter().cloned() {
        delete = delete.key(k, v);
    }
    delete.send().await.unwrap();
    let row_b = client_update(&store, &ledger, &job_a, "site-b", dir.path()).await;

    let streams = streams_client(&env).await;
    let stream_arn = str_at(&env.deploy, "/tables/updates_stream_arn").to_string();
    let mut records = stream_events::read(&streams, &stream_arn, &[&job_a.job_id], 5).await;
    let names: Vec<&str> = records
        .iter()
        .map(|r| r["eventName"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["INSERT", "INSERT", "MODIFY", "REMOVE", "INSERT"]);
    assert_eq!(client_of(&records[0]), row_a.client_id);
    assert_eq!(client_of(&records[4]), row_b.client_id);
    // The table's view is NEW_IMAGE: a REMOVE comes without any image.
    assert!(
        records[3]["dynamodb"].get("NewImage").is_none(),
        "{}",
        records[3]
    );
    assert!(
        records[3]["dynamodb"].get("OldImage").is_none(),
        "{}",
        records[3]
    );
    // The same records as a NEW_AND_OLD_IMAGES stream delivers them: the
    // MODIFY with the image it replaced, the INSERT with no old image.
    let replaced = records[1]["dynamodb"]["NewImage"].clone();
    records[2]["dynamodb"]["OldImage"] = replaced;
    for i in [2, 4] {
        records[i]["dynamodb"]["StreamViewType"] = json!("NEW_AND_OLD_IMAGES");
    }
    let answer = lambda.invoke(&json!({ "Records": records }));
    expect_no_failures(&answer, &lambda);
    // The stream invocation counted and handed over; it read no model.
    let round = ledger.get_round(&job_a.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Open, "{}", lambda.logs());
    assert_eq!(round.received, set(&["site-a", "site-b"]));
    assert!(round.rejections.is_empty(), "{:?}", round.rejections);
    let next = keys::global_model(&job_a.job_id, 2);
    assert!(store.head(&next).await.unwrap().is_none(), "{next} already");

    // The hand-over (SendTaskSuccess) moved the execution on to PlanRound,
    // whose event on AWS is the direct-invoke Parameters: the activity input,
    // with `closed_by` from the hand-over. Then the Map's AggregateShard
    // iterations (one shard: a small model) and CommitRound, each answered
    // with what the bootstrap returned, as Step Functions would take it.
    let plan = run_activity(&env, &mut lambda, "plan_round", &job_a.job_id).await;
    assert_eq!(plan["shards"], json!([0]), "{plan}");
    assert_eq!(plan["statistics"], false, "{plan}");
    let attempt = plan["attempt"].as_str().unwrap().to_string();
    let shard = run_activity(&env, &mut lambda, "aggregate_shard", &job_a.job_id).await;
    assert_eq!(shard, json!({"shard": 0}));
    assert!(
        store.head(&next).await.unwrap().is_none(),
        "{next} before the commit"
    );
    let answer = run_activity(&env, &mut lambda, "commit_round", &job_a.job_id).await;
    assert_eq!(answer["closed_by"], "stream", "{answer:?}");
    let round = ledger.get_round(&job_a.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Closed, "{}", lambda.logs());
    assert_eq!(round.lease_owner.as_deref(), Some(attempt.as_str()));
    assert!(store.head(&next).await.unwrap().is_some(), "no {next}");

    // Then Finalize, likewise.
    let (token, finalize) = activity_task(
        &env.sfn,
        str_at(&env.deploy, "/activities/finalize"),
        &job_a.job_id,
    )
    .await;
    assert_eq!(finalize["action"], "finalize", "{finalize}");
    assert_eq!(finalize["result"]["closed_by"], "stream", "{finalize}");
    let answer = lambda.invoke(&finalize);
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    assert!(answer.body.is_object(), "{answer:?}");
    env.sfn
        .send_task_success()
        .task_token(token)
        .output(answer.body.to_string())
        .send()
        .await
        .unwrap();
    let done = finished(&env.sfn, exec.execution_arn()).await;
    assert_eq!(done.status(), &ExecutionStatus::Succeeded, "{done:?}");
    let output: Value = serde_json::from_str(done.output().unwrap_or("{}")).unwrap();
    assert_eq!(output["final"], answer.body);
    assert_eq!(output["result"]["global_model_key"], next.as_str());

    // --- Stream batch 2: DynamoDB fails for one record's job. ------------------
    let job_c = job(&unique("rt-c"), &["c1", "c2", "c3"], 1);
    start_round(&mut lambda, &store, &job_c, dir.path()).await;
    let poisoned = unique("rt-poison");
    let job_p = job(&poisoned, &["p1"], 1);
    client_update(&store, &ledger, &job_c, "c1", dir.path()).await;
    client_update(&store, &ledger, &job_p, "p1", dir.path()).await;
    client_update(&store, &ledger, &job_c, "c2", dir.path()).await;
    let records = stream_events::read(&streams, &stream_arn, &[&job_c.job_id, &poisoned], 3).await;
    let seq = |r: &Value| {
        r["dynamodb"]["SequenceNumber"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        records.iter().map(client_of).collect::<Vec<_>>(),
        ["c1", "p1", "c2"]
    );
    proxy.poison(Some(&poisoned));
    let answer = lambda.invoke(&json!({ "Records": records }));
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    // Lambda retries from the failed record on: it and everything after it
    // in the batch, which is why c2 was not processed now.
    assert_eq!(
        answer.body,
        json!({"batchItemFailures": [
            {"itemIdentifier": seq(&records[1])},
            {"itemIdentifier": seq(&records[2])},
        ]}),
        "{}",
        lambda.logs()
    );
    assert!(proxy.injected() > 0);
    let round = ledger.get_round(&job_c.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.received, set(&["c1"]));
    // The retry, once DynamoDB is back: the poisoned job does not exist, a
    // rejection (not retried); c2 is counted.
    proxy.poison(None);
    let answer = lambda.invoke(&json!({ "Records": records[1..] }));
    expect_no_failures(&answer, &lambda);
    let round = ledger.get_round(&job_c.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.received, set(&["c1", "c2"]));
    assert_eq!(round.status, RoundStatus::Open);

    // --- The deadline path: the direct-invoke Parameters of each task. ------
    let answer = lambda.invoke(&json!({
        "action": "plan_round", "job_id": job_c.job_id, "round": 1, "closed_by": "deadline",
        "context": context(&job_c, "PlanRound", None),
    }));
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    let attempt = answer.body["attempt"].clone();
    for shard in answer.body["shards"].as_array().unwrap() {
        let done = lambda.invoke(&json!({
            "action": "aggregate_shard", "job_id": job_c.job_id, "round": 1,
            "attempt": attempt, "shard": shard,
            "context": context(&job_c, "AggregateShardTask", None),
        }));
        assert_eq!(done.status, 200, "{done:?}\n{}", lambda.logs());
    }
    let answer = lambda.invoke(&json!({
        "action": "commit_round", "job_id": job_c.job_id, "round": 1, "attempt": attempt,
        "closed_by": "deadline", "context": context(&job_c, "CommitRound", None),
    }));
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    assert_eq!(answer.body["continue"], false, "{answer:?}");
    assert_eq!(answer.body["closed_by"], "deadline", "{answer:?}");
    assert_eq!(answer.body["accepted"], json!(["c1", "c2"]), "{answer:?}");
    let next = keys::global_model(&job_c.job_id, 2);
    assert_eq!(answer.body["global_model_key"], next.as_str());
    assert!(store.head(&next).await.unwrap().is_some(), "no {next}");
    let round = ledger.get_round(&job_c.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Closed);

    // --- PlanRound without a quorum: the error Step Functions matches on. -----
    let job_e = job(&unique("rt-e"), &["e1"], 1);
    start_round(&mut lambda, &store, &job_e, dir.path()).await;
    let answer = lambda.invoke(&json!({
        "action": "plan_round", "job_id": job_e.job_id, "round": 1, "closed_by": "deadline",
        "context": context(&job_e, "PlanRound", None),
    }));
    expect_error(&answer, "QuorumNotMet", "quorum not met", &lambda);
    let round = ledger.get_round(&job_e.job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Failed);

    eprintln!("runtime API test: {:?}", t0.elapsed());
}

/// The function's environment as the CDK stack sets it (infra/lib/
/// aggregator.ts), pointed at the emulators, plus what Lambda itself adds
/// (credentials, region, log names). DynamoDB goes through the proxy.
fn lambda_env(env: &TestEnv, proxy: &FaultProxy) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [
        "FEDSTEP_BUCKET",
        "FEDSTEP_ROUNDS_TABLE",
        "FEDSTEP_UPDATES_TABLE",
        "FEDSTEP_TOPIC_ARN",
        "FEDSTEP_STATE_MACHINE_ARN",
    ]
    .iter()
    .map(|k| {
        let v = str_at(&env.deploy, &format!("/aggregator_env/{k}"));
        (k.to_string(), v.to_string())
    })
    .collect();
    let region =
        std::env::var("AWS_REGION").unwrap_or_else(|_| str_at(&env.deploy, "/region").to_string());
    vars.extend(
        [
            ("FEDSTEP_LEASE_SECONDS", "960".to_string()),
            ("RUST_LOG", "info".to_string()),
            ("AWS_REGION", region.clone()),
            ("AWS_DEFAULT_REGION", region),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_SESSION_TOKEN", "test".to_string()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/rt".to_string()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/30/[1]rt".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
            // Emulator-only: LocalStack's S3 needs path-style addressing.
            ("FEDSTEP_S3_FORCE_PATH_STYLE", "true".to_string()),
            ("AWS_ENDPOINT_URL", endpoint(env, "", "default")),
            ("AWS_ENDPOINT_URL_DYNAMODB", proxy.url()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    vars
}

/// AWS_ENDPOINT_URL_<service> (or AWS_ENDPOINT_URL), else the deploy JSON's.
fn endpoint(env: &TestEnv, service: &str, json_key: &str) -> String {
    let name = if service.is_empty() {
        "AWS_ENDPOINT_URL".to_string()
    } else {
        format!("AWS_ENDPOINT_URL_{service}")
    };
    std::env::var(name)
        .ok()
        .unwrap_or_else(|| str_at(&env.deploy, &format!("/endpoints/{json_key}")).to_string())
}

fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.trim_end_matches('/').to_string()
}

async fn streams_client(env: &TestEnv) -> aws_sdk_dynamodbstreams::Client {
    let sdk = fedstep_aws::sdk_defaults()
        .region(fedstep_aws::aws_config::Region::new(
            std::env::var("AWS_REGION")
                .unwrap_or_else(|_| str_at(&env.deploy, "/region").to_string()),
        ))
        .credentials_provider(aws_sdk_dynamodbstreams::config::Credentials::new(
            "test", "test", None, None, "rt",
        ))
        .endpoint_url(endpoint(env, "DYNAMODB_STREAMS", "dynamodb_streams"))
        .load()
        .await;
    aws_sdk_dynamodbstreams::Client::new(&sdk)
}

/// A stream batch answered with nothing to retry.
fn expect_no_failures(answer: &Answer, lambda: &Runtime) {
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    assert_eq!(
        answer.body,
        json!({"batchItemFailures": []}),
        "{}",
        lambda.logs()
    );
}

fn expect_error(answer: &Answer, error_type: &str, message: &str, lambda: &Runtime) {
    // On AWS an Invoke of a failed function is HTTP 200 with
    // X-Amz-Function-Error; `cargo lambda watch` answers 500. The body is
    // the runtime's error document either way.
    assert_ne!(answer.status, 200, "{answer:?}");
    let keys: BTreeSet<&str> = answer
        .body
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(
        keys,
        BTreeSet::from(["errorType", "errorMessage"]),
        "{answer:?}"
    );
    assert_eq!(
        answer.body["errorType"],
        error_type,
        "{answer:?}\n{}",
        lambda.logs()
    );
    let text = answer.body["errorMessage"].as_str().unwrap_or("");
    assert!(text.contains(message), "{answer:?}");
}

fn job(job_id: &str, clients: &[&str], min_clients: u32) -> Job {
    let clients: Vec<String> = clients.iter().map(|c| format!("\"{c}\"")).collect();
    JobSpec::from_toml(&format!(
        "job_id = \"{job_id}\"\nrounds = 1\nclients = [{}]\nmin_clients = {min_clients}\n\
         round_timeout_seconds = 600\n[aggregation]\nweighting = \"examples\"\n",
        clients.join(", ")
    ))
    .unwrap()
}

/// The Step Functions context object (`$$`) as a task on AWS sees it.
fn context(job: &Job, state: &str, token: Option<&str>) -> Value {
    let sm = "arn:aws:states:us-east-1:000000000000:stateMachine:rt";
    let mut ctx = json!({
        "Execution": {
            "Id": format!("arn:aws:states:us-east-1:000000000000:execution:rt:{}", job.job_id),
            "Input": job, "Name": job.job_id, "RoleArn": "arn:aws:iam::000000000000:role/rt",
            "StartTime": "2026-11-30T06:00:00.000Z", "RedriveCount": 0,
        },
        "State": {"EnteredTime": "2026-11-30T06:00:01.000Z", "Name": state, "RetryCount": 0},
        "StateMachine": {"Id": sm, "Name": "rt"},
    });
    if let Some(token) = token {
        ctx["Task"] = json!({ "Token": token });
    }
    ctx
}

/// StartRound as AWS invokes it, without an execution behind it (nothing
/// calls back on these rounds' made-up tokens).
async fn start_round(lambda: &mut Runtime, store: &impl ObjectStore, job: &Job, dir: &Path) {
    put_initial_model(store, job, dir).await;
    let answer = lambda.invoke(&json!({
        "action": "start_round", "job_id": job.job_id, "round": 1,
        "round_timeout_seconds": job.round_timeout_seconds,
        "context": context(job, "StartRound", Some(&format!("token-{}", job.job_id))),
    }));
    assert_eq!(answer.status, 200, "{answer:?}\n{}", lambda.logs());
    assert_eq!(answer.body["status"], "OPEN", "{answer:?}");
}

fn model(path: &Path, values: [f32; 4]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &bytes).unwrap();
    let data = safetensors::serialize([("w", view)], None).unwrap();
    std::fs::write(path, data).unwrap();
}

async fn put_initial_model(store: &impl ObjectStore, job: &Job, dir: &Path) {
    let path = dir.join(format!("{}-init.safetensors", job.job_id));
    model(&path, [0.0, 1.0, 2.0, 3.0]);
    store
        .put_file(&keys::global_model(&job.job_id, 1), &path)
        .await
        .unwrap();
}

/// What a client does after training: upload its model, write its row.
async fn client_update(
    store: &impl ObjectStore,
    ledger: &impl Ledger,
    job: &Job,
    client: &str,
    dir: &Path,
) -> UpdateRecord {
    let path = dir.join(format!("{}-{client}.safetensors", job.job_id));
    model(&path, [1.0, 2.0, 3.0, 4.0]);
    let key = keys::update(&job.job_id, 1, client);
    let up = store.put_file(&key, &path).await.unwrap();
    let row = UpdateRecord {
        client_id: client.into(),
        job_round: keys::job_round(&job.job_id, 1),
        job_id: job.job_id.clone(),
        round: 1,
        model_key: key,
        checksum: up.sha256,
        store_checksum: None,
        num_examples: 10.into(),
        llm_type: None,
        metrics: [("loss".to_string(), Value::from(0.5))].into(),
        bytes: up.bytes,
        trained_at: "2026-11-30T06:00:00Z".into(),
        schema: Some(SCHEMA),
        variate_delta_checksum: None,
        base_round: None,
    };
    assert_eq!(ledger.put_update(&row).await.unwrap(), PutUpdate::Created);
    row
}

fn client_of(record: &Value) -> &str {
    record
        .pointer("/dynamodb/Keys/client_id/S")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The next task of an activity for `job_id`, as (token, input). Tasks of
/// other executions (left by earlier tests on the shared deployment) are
/// taken and left to time out.
/// Takes `action`'s next activity task of `job_id` from the running
/// execution, invokes the bootstrap with it (the event AWS would send) and
/// answers the task with the bootstrap's output; returns that output.
async fn run_activity(env: &TestEnv, lambda: &mut Runtime, action: &str, job_id: &str) -> Value {
    let (token, event) = activity_task(
        &env.sfn,
        str_at(&env.deploy, &format!("/activities/{action}")),
        job_id,
    )
    .await;
    assert_eq!(event["action"], action, "{event}");
    let answer = lambda.invoke(&event);
    assert_eq!(
        answer.status,
        200,
        "{action}: {answer:?}\n{}",
        lambda.logs()
    );
    env.sfn
        .send_task_success()
        .task_token(token)
        .output(answer.body.to_string())
        .send()
        .await
        .unwrap();
    answer.body
}

async fn activity_task(sfn: &aws_sdk_sfn::Client, arn: &str, job_id: &str) -> (String, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let task = sfn
            .get_activity_task()
            .activity_arn(arn)
            .worker_name("runtime-api-test")
            .send()
            .await
            .unwrap();
        let (Some(token), Some(input)) = (task.task_token, task.input) else {
            continue;
        };
        let input: Value = serde_json::from_str(&input).unwrap();
        let of_job = input
            .pointer("/Payload/job_id")
            .or_else(|| input.get("job_id"))
            .and_then(Value::as_str)
            == Some(job_id);
        if of_job && !token.is_empty() {
            return (token, input);
        }
    }
    panic!("no task of {arn} for {job_id} within 60 s");
}

async fn finished(
    sfn: &aws_sdk_sfn::Client,
    arn: &str,
) -> aws_sdk_sfn::operation::describe_execution::DescribeExecutionOutput {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = sfn
            .describe_execution()
            .execution_arn(arn)
            .send()
            .await
            .unwrap();
        if d.status() != &ExecutionStatus::Running || Instant::now() > deadline {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A deployment of this test's own on the emulators (scripts/local-deploy.sh
/// with a unique prefix), deleted when dropped.
struct OwnDeployment {
    prefix: String,
    _dir: tempfile::TempDir,
    json: std::path::PathBuf,
}

impl OwnDeployment {
    fn script() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/local-deploy.sh")
    }

    fn create() -> OwnDeployment {
        let prefix = unique("rtapi");
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("deploy.json");
        let out = std::process::Command::new(Self::script())
            .args(["--prefix", &prefix, "--out"])
            .arg(&json)
            .output()
            .expect("running scripts/local-deploy.sh");
        assert!(
            out.status.success(),
            "scripts/local-deploy.sh --prefix {prefix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        OwnDeployment {
            prefix,
            _dir: dir,
            json,
        }
    }
}

impl Drop for OwnDeployment {
    fn drop(&mut self) {
        let _ = std::process::Command::new(Self::script())
            .args(["--prefix", &self.prefix, "--delete"])
            .output();
    }
}
