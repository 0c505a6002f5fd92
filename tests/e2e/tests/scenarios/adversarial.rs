//! Issue #13, item 5: a hostile client beside honest ones. Two honest
//! clients run the real binary; `evil` is driven from this test and does
//! only what a client's role allows: put objects under its own update key
//! and put its own `updates` rows. Each round it tries one attack. The job
//! must SUCCEED, every round must close with both honest clients accepted,
//! and `evil` must be rejected with a bounded reason (or, where its update
//! is well-formed but its claims are outrageous, be accepted with no power
//! to end the job or take the weight).
//!
//! | round | attack | expected |
//! |---|---|---|
//! | 1 | the row claims fewer bytes than the object holds | rejected: size |
//! | 2 | the object is stored in GLACIER | rejected: cannot be read |
//! | 3 | the object is not what the row's checksum says (same size, valid model) | rejected: checksum |
//! | 4 | the object is not a safetensors file (its first bytes read as a huge header length); plus a row naming a job that does not exist | rejected: header; nothing written for that job |
//! | 5 | a copy of the global model claiming 9·10^8 examples and accuracy 1e120 (DynamoDB stores numbers up to 1e126) | accepted, share capped at 0.5; the stop rule (median) does not end the job |
//! | 6 | a row with a 100 KB `llm_type` and 200 metric names of 300 bytes | rejected: llm_type, reason ≤ 512 bytes |

use std::collections::BTreeMap;
use std::time::Duration;

use fedstep_aws::aws_sdk_s3::primitives::ByteStream;
use fedstep_aws::aws_sdk_s3::types::StorageClass;
use fedstep_cloud::checksum::Sha256Hasher;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::{RoundStatus, UpdateRecord, SCHEMA};
use fedstep_cloud::{bounded, keys};
use fedstep_e2e::client_config::{ClientSetup, Trainer};
use fedstep_e2e::{execution, launch, Binaries, Deployment};
use serde_json::json;

const ROUNDS: u32 = 6;
const EVIL: &str = "evil";

/// Job body: the stop rule's target is out of an honest accuracy's reach,
/// so only a mean that one client can move would end the job early.
fn body() -> String {
    format!(
        "rounds = {ROUNDS}\nclients = [\"site-a\", \"site-b\", \"{EVIL}\"]\nmin_clients = 2\n\
         round_timeout_seconds = 120\n\
         [stop]\nmetric = \"accuracy\"\ntarget = 2.0\nmode = \"max\"\n\
         [aggregation]\nweighting = \"examples\"\nmax_client_share = 0.5\n\
         [round_config]\nlocal_epochs = 1\n"
    )
}

fn sha256(bytes: &[u8]) -> String {
    let mut h = Sha256Hasher::default();
    h.update(bytes);
    h.finish_hex()
}

struct Evil<'a> {
    d: &'a Deployment,
    job: String,
}

impl Evil<'_> {
    fn row(&self, round: u32, body: &[u8]) -> UpdateRecord {
        UpdateRecord {
            client_id: EVIL.into(),
            job_round: format!("{}#{round:06}", self.job),
            job_id: self.job.clone(),
            round,
            model_key: keys::update(&self.job, round, EVIL),
            checksum: sha256(body),
            store_checksum: None,
            num_examples: json!(100),
            llm_type: None,
            metrics: BTreeMap::from([("accuracy".into(), json!(0.5))]),
            bytes: body.len() as u64,
            trained_at: "2026-11-29T00:00:00Z".into(),
            schema: Some(SCHEMA),
            variate_delta_checksum: None,
            base_round: None,
        }
    }

    async fn put_object(&self, round: u32, body: Vec<u8>, class: Option<StorageClass>) {
        self.d
            .s3
            .put_object()
            .bucket(self.d.bucket())
            .key(keys::update(&self.job, round, EVIL))
            .set_storage_class(class)
            .body(ByteStream::from(body))
            .send()
            .await
            .expect("evil's put of its own update key");
    }

    async fn put_row(&self, row: &UpdateRecord) {
        self.d
            .ledger()
            .put_update(row)
            .await
            .expect("evil's put of its own row");
    }

    /// The round's global model, as any client downloads it.
    async fn global(&self, round: u32) -> Vec<u8> {
        let path = self.d.path(&format!("evil-global-{round}.safetensors"));
        self.d
            .store()
            .get_file(&keys::global_model(&self.job, round), &path)
            .await
            .expect("the global model");
        std::fs::read(&path).unwrap()
    }

    /// Waits until `round` is OPEN (the announcement evil would receive).
    async fn wait_open(&self, round: u32) {
        let ledger = self.d.ledger();
        for _ in 0..1200 {
            if let Some(r) = ledger.get_round(&self.job, round).await.unwrap() {
                if r.status == RoundStatus::Open {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("round {round} never opened");
    }

    async fn attack(&self, round: u32) {
        let global = self.global(round).await;
        match round {
            1 => {
                let mut row = self.row(round, &global);
                row.bytes -= 1000;
                self.put_object(round, global, None).await;
                self.put_row(&row).await;
            }
            2 => {
                let row = self.row(round, &global);
                self.put_object(round, global, Some(StorageClass::Glacier))
                    .await;
                self.put_row(&row).await;
            }
            3 => {
                // The row's checksum is the global model's; the object is
                // the same size and still a valid model, one byte changed.
                let row = self.row(round, &global);
                let mut forged = global;
                let last = forged.len() - 1;
                forged[last] ^= 0x01;
                self.put_object(round, forged, None).await;
                self.put_row(&row).await;
            }
            4 => {
                let junk = b"this is not a safetensors file, though its row says it is".to_vec();
                let row = self.row(round, &junk);
                self.put_object(round, junk, None).await;
                let mut foreign = row.clone();
                foreign.job_id = format!("{}-other", self.job);
                foreign.job_round = format!("{}#{round:06}", foreign.job_id);
                self.put_row(&foreign).await;
                self.put_row(&row).await;
            }
            5 => {
                let mut row = self.row(round, &global);
                // Under limits.max_num_examples (10^9: above it is a rejection).
                row.num_examples = json!(900_000_000u64);
                row.metrics = BTreeMap::from([("accuracy".into(), json!(1e120))]);
                self.put_object(round, global, None).await;
                self.put_row(&row).await;
            }
            6 => {
                let mut row = self.row(round, &global);
                row.llm_type = Some("x".repeat(100_000));
                row.metrics = (0..200)
                    .map(|i| (format!("{i:0>300}"), json!(1.0)))
                    .collect();
                self.put_object(round, global, None).await;
                self.put_row(&row).await;
            }
            _ => unreachable!(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_client_is_rejected_every_round_and_the_job_succeeds() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("adv", &["site-a", "site-b", EVIL]).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-adv");
    let honest: Vec<_> = [
        ("site-a", vec![0, 1, 2, 3, 4]),
        ("site-b", vec![5, 6, 7, 8, 9]),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (id, classes))| {
        launch::client(
            &d,
            &bins,
            &ClientSetup {
                client_id: id.into(),
                exit_on_complete: true,
                trainer: Trainer::Builtin {
                    classes,
                    seed: i as u64 + 1,
                },
                personalization: None,
            },
        )
    })
    .collect();
    let job = fedstep_e2e::unique("adv");
    let file = launch::job_file(&d, &bins, &job, &body());
    launch::fedstep(&d, &bins, &["job", "start", "--config", &file]);
    let logs = || {
        let mut all = vec![&worker];
        all.extend(honest.iter());
        launch::logs(&all)
    };

    let evil = Evil {
        d: &d,
        job: job.clone(),
    };
    for round in 1..=ROUNDS {
        evil.wait_open(round).await;
        evil.attack(round).await;
    }

    let done = execution::wait_until_done(
        &d.sfn,
        &d.execution_arn(&job),
        Duration::from_secs(600),
        logs,
    )
    .await;
    execution::assert_succeeded(&done, logs);

    let ledger = d.ledger();
    let expected_reason = [
        (1, "bytes"),
        (2, "cannot be read"),
        (3, "checksum"),
        (4, "header"),
        (6, "llm_type"),
    ];
    for round in 1..=ROUNDS {
        let r = ledger.get_round(&job, round).await.unwrap().expect("round");
        assert_eq!(r.status, RoundStatus::Closed, "round {round}: {r:?}");
        let result = r.result.expect("a result");
        for honest in ["site-a", "site-b"] {
            assert!(
                result.accepted.iter().any(|c| c == honest),
                "round {round}: {honest} not accepted: {result:?}"
            );
        }
        match expected_reason.iter().find(|(n, _)| *n == round) {
            Some((_, want)) => {
                let reason = result
                    .rejected
                    .get(EVIL)
                    .unwrap_or_else(|| panic!("round {round}: evil not rejected: {result:?}"));
                eprintln!("round {round}: evil rejected: {reason}");
                assert!(reason.contains(want), "round {round}: {reason}");
                assert!(
                    reason.len() <= bounded::REASON_BYTES,
                    "round {round}: {reason}"
                );
            }
            None => {
                // Round 5: well-formed, so accepted, but capped and outvoted.
                assert!(
                    result.accepted.iter().any(|c| c == EVIL),
                    "round {round}: {result:?}"
                );
                let accuracy = result.metrics["accuracy"];
                assert!(accuracy <= 1.0, "median accuracy {accuracy}");
            }
        }
        assert!(
            result.metrics.keys().all(|k| k.len() <= 400),
            "round {round}: a metric name went through unbounded"
        );
    }
    // The row naming another job wrote nothing anywhere.
    assert!(ledger
        .list_rounds(&format!("{job}-other"))
        .await
        .unwrap()
        .is_empty());

    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}
