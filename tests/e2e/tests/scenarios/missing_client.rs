//! Issue #3, scenario (b): one client never answers. With min_clients = 2
//! the round closes at its deadline with the other two (and the next global
//! model is their weighted mean); with min_clients = 3 the job fails with
//! QuorumNotMet and a cause that says so, and the workflow's ReportFailure
//! step tells the clients (`job_failed`). Both jobs run at once on one
//! deployment: two live clients, site-c never started.

use std::time::{Duration, Instant};

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::{ClosedBy, RoundStatus};
use fedstep_e2e::client_config::{ClientSetup, Trainer};
use fedstep_e2e::{execution, fedavg, launch, Binaries, Deployment};

const BODY: &str = "rounds = 1\nclients = [\"site-a\", \"site-b\", \"site-c\"]\n\
    [aggregation]\nweighting = \"examples\"\n[round_config]\nlocal_epochs = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_closes_the_round_at_the_deadline_or_fails_the_quorum() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("b", &["site-a", "site-b", "site-c"]).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-b");
    let clients: Vec<_> = [
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
                exit_on_complete: false,
                trainer: Trainer::Builtin {
                    classes,
                    seed: i as u64 + 1,
                },
                personalization: None,
            },
        )
    })
    .collect();

    // 20 s leaves the two clients ample time to train one epoch of a small
    // MLP on a shared 2-core machine; the quorum job needs no client at all.
    let quorum2 = fedstep_e2e::unique("deadline");
    let quorum3 = fedstep_e2e::unique("quorum");
    let job2 = launch::job_file(
        &d,
        &bins,
        &quorum2,
        &format!("min_clients = 2\nround_timeout_seconds = 20\n{BODY}"),
    );
    let job3 = launch::job_file(
        &d,
        &bins,
        &quorum3,
        &format!("min_clients = 3\nround_timeout_seconds = 10\n{BODY}"),
    );
    let t0 = Instant::now();
    launch::fedstep(&d, &bins, &["job", "start", "--config", &job2]);
    launch::fedstep(&d, &bins, &["job", "start", "--config", &job3]);
    let logs = || {
        let mut all = vec![&worker];
        all.extend(clients.iter());
        launch::logs(&all)
    };

    let failed = execution::wait_until_done(
        &d.sfn,
        &d.execution_arn(&quorum3),
        Duration::from_secs(120),
        logs,
    )
    .await;
    eprintln!(
        "min_clients = 3: {:?} {:?} after {:.1?}",
        failed.status(),
        failed.error(),
        t0.elapsed()
    );
    assert_eq!(failed.status().as_str(), "FAILED", "{}", logs());
    assert_eq!(
        failed.error(),
        Some("QuorumNotMet"),
        "cause {:?}",
        failed.cause()
    );
    let cause = failed.cause().unwrap_or_default();
    assert!(
        cause.contains("quorum"),
        "cause does not say quorum: {cause}"
    );
    assert!(
        cause.contains("site-c"),
        "cause does not name the missing client: {cause}"
    );
    // ReportFailure ran once before the execution failed; the round keeps
    // the quorum as its reason, and both live clients heard of the failure.
    let events = execution::events_by_state(&d.sfn, &d.execution_arn(&quorum3)).await;
    assert_eq!(
        execution::count(&events, "ReportFailure", "ActivitySucceeded"),
        1,
        "{events:?}"
    );
    let failed_round = d
        .ledger()
        .get_round(&quorum3, 1)
        .await
        .unwrap()
        .expect("round 1");
    assert_eq!(failed_round.status, RoundStatus::Failed);
    assert!(
        failed_round
            .failure
            .as_ref()
            .is_some_and(|f| f.to_string().starts_with("quorum not met")),
        "{:?}",
        failed_round.failure
    );
    let told = format!("job {quorum3} failed in round 1: QuorumNotMet: quorum not met");
    let heard_by = Instant::now();
    while !clients.iter().all(|c| c.log_text().contains(&told)) {
        assert!(
            heard_by.elapsed() < Duration::from_secs(60),
            "not every client logged `{told}`:\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let done = execution::wait_until_done(
        &d.sfn,
        &d.execution_arn(&quorum2),
        Duration::from_secs(120),
        logs,
    )
    .await;
    eprintln!(
        "min_clients = 2: {:?} after {:.1?}",
        done.status(),
        t0.elapsed()
    );
    execution::assert_succeeded(&done, logs);
    let elapsed = t0.elapsed();
    assert!(
        elapsed >= Duration::from_secs(19),
        "closed after {elapsed:?}, before the 20 s deadline"
    );

    let ledger = d.ledger();
    let round = ledger
        .get_round(&quorum2, 1)
        .await
        .unwrap()
        .expect("round 1");
    assert_eq!(round.status, RoundStatus::Closed);
    let result = round.result.expect("a result");
    assert_eq!(result.closed_by, ClosedBy::Deadline);
    let mut accepted = result.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, ["site-a", "site-b"]);
    let events = execution::events_by_state(&d.sfn, &d.execution_arn(&quorum2)).await;
    // The deadline is StartRound's TimeoutSeconds: its activity times out
    // once and the Catch on States.Timeout runs PlanRound.
    assert_eq!(
        execution::count(&events, "StartRound", "ActivityTimedOut"),
        1,
        "{events:?}"
    );
    assert!(
        execution::count(&events, "PlanRound", "ActivitySucceeded") == 1
            && execution::count(&events, "CommitRound", "ActivitySucceeded") == 1,
        "the deadline path did not run once: {events:?}"
    );

    // The deadline path aggregates the same way: the two uploads' weighted mean.
    let (global, weighted) = d.round_inputs(&quorum2, 1, &["site-a", "site-b"]).await;
    let deviation = fedavg::max_deviation(&global, &weighted);
    assert!(deviation <= 2e-6, "deviation {deviation:e}");
    assert!(ledger
        .get_update("site-c", &quorum2, 1)
        .await
        .unwrap()
        .is_none());

    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}
