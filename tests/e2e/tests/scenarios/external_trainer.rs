//! Issue #3, scenario (d): a client whose trainer is an external program
//! (examples/external_trainer.py, Python + numpy) takes part in a round
//! with two built-in clients; its update is accepted and averaged in.
//!
//! The Python comes from FEDSTEP_PYTHON (scripts/test.sh sets it to a venv
//! with numpy), else .emu/tools/bin/python, else python3. Without numpy the
//! test fails under CI=true and skips otherwise, like the emulators.

use std::time::{Duration, Instant};

use fedstep_cloud::ports::Ledger;
use fedstep_cloud::records::RoundStatus;
use fedstep_e2e::client_config::{ClientSetup, Trainer};
use fedstep_e2e::{emulators, execution, fedavg, launch, Binaries, Deployment};

fn python_with_numpy() -> Option<String> {
    let root = fedstep_e2e::repo_root();
    let candidates = [
        std::env::var("FEDSTEP_PYTHON").ok(),
        Some(root.join(".emu/tools/bin/python").display().to_string()),
        Some("python3".to_string()),
    ];
    for py in candidates.into_iter().flatten() {
        let ok = std::process::Command::new(&py)
            .args(["-c", "import numpy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_trainer_joins_two_builtin_clients() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(python) = python_with_numpy() else {
        let _: Option<()> = emulators::unavailable(
            "no python with numpy (set FEDSTEP_PYTHON; scripts/test.sh installs .emu/tools)",
        );
        return;
    };
    let clients = ["site-a", "site-b", "site-py"];
    let Some(d) = Deployment::create("d", &clients).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-d");
    let setups = [
        ClientSetup {
            client_id: "site-a".into(),
            exit_on_complete: true,
            trainer: Trainer::Builtin {
                classes: vec![0, 1, 2, 3],
                seed: 1,
            },
            personalization: None,
        },
        ClientSetup {
            client_id: "site-b".into(),
            exit_on_complete: true,
            trainer: Trainer::Builtin {
                classes: vec![4, 5, 6],
                seed: 2,
            },
            personalization: None,
        },
        ClientSetup {
            client_id: "site-py".into(),
            exit_on_complete: true,
            trainer: Trainer::External {
                command: vec![
                    python,
                    "examples/external_trainer.py".into(),
                    "--classes".into(),
                    "7,8,9".into(),
                    "--seed".into(),
                    "3".into(),
                ],
            },
            personalization: None,
        },
    ];
    let mut procs: Vec<_> = setups
        .iter()
        .map(|s| launch::client(&d, &bins, s))
        .collect();

    let job_id = fedstep_e2e::unique("mixed");
    let job = launch::job_file(
        &d,
        &bins,
        &job_id,
        "rounds = 1\nclients = [\"site-a\", \"site-b\", \"site-py\"]\nmin_clients = 3\n\
         round_timeout_seconds = 120\n[aggregation]\nweighting = \"examples\"\n[round_config]\nlocal_epochs = 1\n",
    );
    let t0 = Instant::now();
    launch::fedstep(&d, &bins, &["job", "start", "--config", &job]);
    let logs = || {
        let mut all = vec![&worker];
        all.extend(procs.iter());
        launch::logs(&all)
    };
    let done = execution::wait_until_done(
        &d.sfn,
        &d.execution_arn(&job_id),
        Duration::from_secs(180),
        logs,
    )
    .await;
    eprintln!("mixed round: {:?} in {:.1?}", done.status(), t0.elapsed());
    execution::assert_succeeded(&done, logs);

    let ledger = d.ledger();
    let round = ledger.get_round(&job_id, 1).await.unwrap().unwrap();
    assert_eq!(round.status, RoundStatus::Closed);
    let result = round.result.unwrap();
    let mut accepted = result.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, clients, "rejected: {:?}", result.rejected);

    let py_row = ledger
        .get_update("site-py", &job_id, 1)
        .await
        .unwrap()
        .expect("site-py's row");
    eprintln!(
        "external trainer's row: num_examples {} metrics {:?}",
        py_row.num_examples, py_row.metrics
    );
    assert!(py_row.num_examples.as_u64().is_some_and(|n| n > 0));

    let (global, weighted) = d.round_inputs(&job_id, 1, &clients).await;
    let deviation = fedavg::max_deviation(&global, &weighted);
    assert!(deviation <= 2e-6, "deviation {deviation:e}");

    for p in procs.iter_mut() {
        p.expect_exit_zero(Duration::from_secs(60)).await;
    }
    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}
