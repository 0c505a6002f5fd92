//! Issue #6 on the emulators: the seeded fault schedules of
//! crates/cloud/tests/engine/fault_schedules.rs (the same harness, compiled from
//! its source) over the AWS adapters — S3Store, DynamoLedger (conditional
//! writes, leases and set-adds on DynamoDB), SnsNotifier publishing to SNS,
//! and one SQS queue per client subscribed to the topic with a job_id
//! filter. The Step Functions callback stays the harness's recording one
//! (driving real task tokens would need an execution per round whose own
//! timeouts race the schedule), and so does the manual clock: leases and
//! deadlines are compared against the time the engine passes in, which is
//! what lets a schedule expire a lease without waiting for it.
//!
//! Fewer schedules than in process (each costs a few hundred calls):
//!   FEDSTEP_EMU_FAULT_SCHEDULES=<n>   how many (default 12)
//!   FEDSTEP_FAULT_SEED=<n>            rerun exactly that one
//!   FEDSTEP_FAULT_FIRST_SEED=<n>      start the seeds there (default 1)
//! Job ids and queues are unique to the run, so it shares a deployment
//! with other tests. Setup: see common/mod.rs.

use crate::common;
use crate::harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::{str_at, unique, TestEnv};
use fedstep_aws::{DynamoLedger, S3Store, SnsNotifier, SqsQueue};
use fedstep_cloud::local::ManualClock;
use fedstep_cloud::ports::ClientQueue;
use harness::backend::Backend;
use harness::faults::{Mutant, RawPut};
use harness::{run_schedule_on, Tally};

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// The AWS adapters of one schedule, over a shared deployment.
struct Emulators {
    env: Arc<TestEnv>,
    /// Unique to this test run: job ids and queue names start with it.
    run: String,
    /// What `subscribe` made: (queue URL, subscription ARN).
    made: Vec<(String, String)>,
}

impl Backend for Emulators {
    type Store = S3Store;
    type Ledger = DynamoLedger;
    type Notifier = SnsNotifier;
    type Queue = SqsQueue;

    fn job_id(&self, seed: u64) -> String {
        format!("{}-s{seed}", self.run)
    }
    fn store(&self) -> S3Store {
        self.env.store()
    }
    fn ledger(&self) -> DynamoLedger {
        self.env.ledger()
    }
    fn notifier(&self) -> SnsNotifier {
        self.env.notifier()
    }
    fn raw_put(&self) -> Option<RawPut> {
        None
    }

    async fn subscribe(
        &mut self,
        clients: &[String],
        job_id: &str,
    ) -> Result<BTreeMap<String, SqsQueue>, String> {
        let topic = str_at(&self.env.deploy, "/topics/global_model_ready").to_string();
        let filter = serde_json::json!({ "job_id": [job_id] }).to_string();
        let mut queues = BTreeMap::new();
        for client in clients {
            // SQS names: up to 80 of A–Z a–z 0–9 - _.
            let name = format!("{job_id}-{client}");
            let url = self
                .env
                .sqs
                .create_queue()
                .queue_name(&name)
                .send()
                .await
                .map_err(|e| {
                    fedstep_aws::sdk_error(&format!("SQS CreateQueue {name}"), e).to_string()
                })?
                .queue_url
                .ok_or_else(|| format!("SQS CreateQueue {name}: no URL"))?;
            let arn = self
                .env
                .sqs
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(fedstep_aws::aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(|e| {
                    fedstep_aws::sdk_error(&format!("SQS GetQueueAttributes {url}"), e).to_string()
                })?
                .attributes
                .and_then(|a| {
                    a.get(&fedstep_aws::aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                        .cloned()
                })
                .ok_or_else(|| format!("{url}: no QueueArn"))?;
            let sub = self
                .env
                .sns
                .subscribe()
                .topic_arn(&topic)
                .protocol("sqs")
                .endpoint(&arn)
                // As the deployments do: the body is the notification itself.
                .attributes("RawMessageDelivery", "true")
                .attributes("FilterPolicy", &filter)
                .return_subscription_arn(true)
                .send()
                .await
                .map_err(|e| {
                    fedstep_aws::sdk_error(&format!("SNS Subscribe {arn}"), e).to_string()
                })?
                .subscription_arn
                .ok_or_else(|| format!("SNS Subscribe {arn}: no subscription ARN"))?;
            self.made.push((url.clone(), sub));
            queues.insert(client.clone(), SqsQueue::new(self.env.sqs.clone(), url));
        }
        Ok(queues)
    }

    fn receive_wait_seconds(&self) -> u32 {
        // SNS → SQS delivery is asynchronous; a long poll returns as soon
        // as the message is there.
        3
    }

    async fn lapse_visibility(
        &self,
        queue: &SqsQueue,
        receipt: Option<&str>,
    ) -> Result<(), String> {
        // The crashed client's message becomes visible now rather than
        // after the queue's visibility timeout of real seconds.
        match receipt {
            Some(r) => queue
                .extend_visibility(r, 0)
                .await
                .map_err(|e| format!("letting a crashed client's message come back: {e}")),
            None => Ok(()),
        }
    }

    async fn teardown(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (url, sub) in self.made.drain(..) {
            if let Err(e) = self
                .env
                .sns
                .unsubscribe()
                .subscription_arn(&sub)
                .send()
                .await
            {
                errors
                    .push(fedstep_aws::sdk_error(&format!("SNS Unsubscribe {sub}"), e).to_string());
            }
            if let Err(e) = self.env.sqs.delete_queue().queue_url(&url).send().await {
                errors
                    .push(fedstep_aws::sdk_error(&format!("SQS DeleteQueue {url}"), e).to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[test]
fn fault_schedules_on_the_emulators() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _topic = rt.block_on(crate::deployment_topic());
    let Some(env) = rt.block_on(common::env()) else {
        return;
    };
    let env = Arc::new(env);
    let seeds: Vec<u64> = match env_u64("FEDSTEP_FAULT_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env_u64("FEDSTEP_FAULT_FIRST_SEED").unwrap_or(1);
            let n = env_u64("FEDSTEP_EMU_FAULT_SCHEDULES").unwrap_or(12);
            (first..first + n).collect()
        }
    };
    let run = unique("fe");
    let started = Instant::now();
    let mut total = Tally::default();
    let mut failed = Vec::new();
    for &seed in &seeds {
        let t0 = Instant::now();
        let outcome = run_schedule_on(&rt, seed, Mutant::None, |_: &ManualClock, _| Emulators {
            env: Arc::clone(&env),
            run: run.clone(),
            made: Vec::new(),
        });
        match outcome {
            Ok(t) => {
                eprintln!(
                    "seed {seed}: ok in {:.1}s ({} rounds, {} deliveries, faults {:?})",
                    t0.elapsed().as_secs_f64(),
                    t.rounds,
                    t.deliveries,
                    t.fired
                );
                total.add(&t);
            }
            Err(why) => {
                eprintln!("fault schedule seed {seed} FAILED on the emulators: {why}");
                failed.push(seed);
            }
        }
    }
    println!(
        "emulator fault schedules: {} passed, {} failed in {:.1}s (job ids {run}-s<seed>); \
         {} rounds, {} deliveries ({} duplicates, {} races, {} failed and redelivered), \
         {} CloseRounds ({} racing), {} client crashes, {} late records, {} rejections; faults fired: {:?}",
        seeds.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64(),
        total.rounds,
        total.deliveries,
        total.duplicate_deliveries,
        total.races,
        total.failed_deliveries,
        total.deadline_closes,
        total.close_races,
        total.client_crashes,
        total.late_records,
        total.rejected,
        total.fired
    );
    assert!(
        failed.is_empty(),
        "failing seeds: {failed:?}; rerun one with\n  FEDSTEP_FAULT_SEED={} cargo test --release -p fedstep-aws \
         --test on_emulators fault_schedules -- --nocapture",
        failed.first().copied().unwrap_or_default()
    );
    if seeds.len() >= 10 {
        // The schedules must reach the adapters' conditional paths.
        for (what, n) in [
            ("races", total.races),
            ("failed deliveries", total.failed_deliveries),
            ("client crashes", total.client_crashes),
            ("rejections", total.rejected),
        ] {
            assert!(n > 0, "no {what} in {} schedules", seeds.len());
        }
    }
}
