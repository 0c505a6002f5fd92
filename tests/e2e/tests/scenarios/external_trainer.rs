//! Issue #3, scenario (d): a client whose trainer is an external program
//! (examples/external_trainer.py, Python + numpy) takes part with two
//! built-in clients; its update is accepted and averaged in. The job
//! trains SCAFFOLD (issue #19) for two rounds, so both trainers also go
//! through the control-variate contract: the server variate the
//! aggregator wrote after each round is recomputed here from the Δc_i in
//! S3 (c⁺ = c + (|S|/N)·mean Δc_i, this file's own arithmetic), each Δc_i
//! is checked against the checksum its row committed to, and each
//! client's kept c_i is the sum of the Δc_i it sent.
//!
//! The Python comes from FEDSTEP_PYTHON (scripts/test.sh sets it to a venv
//! with numpy), else .emu/tools/bin/python, else python3. Without numpy the
//! test fails under CI=true and skips otherwise, like the emulators.

use std::time::{Duration, Instant};

use fedstep_cloud::checksum::Sha256Hasher;
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::RoundStatus;
use fedstep_e2e::client_config::{ClientSetup, Trainer};
use fedstep_e2e::fedavg::{read_f32, Tensors};
use fedstep_e2e::{emulators, execution, fedavg, launch, Binaries, Deployment};

pub(crate) fn python_with_numpy() -> Option<String> {
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
async fn an_external_trainer_joins_two_builtin_clients_in_a_scaffold_job() {
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
        "rounds = 2\nclients = [\"site-a\", \"site-b\", \"site-py\"]\nmin_clients = 3\n\
         round_timeout_seconds = 120\n[aggregation]\nweighting = \"examples\"\n\
         [round_config]\nlocal_epochs = 1\nalgorithm = \"scaffold\"\n",
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
        Duration::from_secs(240),
        logs,
    )
    .await;
    eprintln!("mixed round: {:?} in {:.1?}", done.status(), t0.elapsed());
    execution::assert_succeeded(&done, logs);

    let ledger = d.ledger();
    for r in 1..=2 {
        let round = ledger.get_round(&job_id, r).await.unwrap().unwrap();
        assert_eq!(round.status, RoundStatus::Closed);
        let result = round.result.unwrap();
        let mut accepted = result.accepted.clone();
        accepted.sort();
        assert_eq!(
            accepted, clients,
            "round {r} rejected: {:?}",
            result.rejected
        );
    }

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
    check_server_variates(&d, &job_id, &clients).await;
    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}

/// SCAFFOLD's server variate, recomputed: c₁ is zeros; after round r, with
/// all N clients accepted (|S| = N), c_{r+1} = c_r + (1/N)·Σ Δc_i. Each
/// Δc_i must hash to its row's `variate_delta_checksum` and every client's
/// kept c_i must be Δc_i(1) + Δc_i(2), summed in F32 as the client does.
async fn check_server_variates(d: &fedstep_e2e::Deployment, job_id: &str, clients: &[&str]) {
    let (store, ledger) = (d.store(), d.ledger());
    let get = |key: String| {
        let path = d.path(&key.replace('/', "_"));
        let store = &store;
        async move {
            store
                .get_file(&key, &path)
                .await
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            std::fs::read(&path).unwrap()
        }
    };
    let mut c = read_f32(&get(keys::server_variate(job_id, 1)).await);
    assert!(
        c.values().all(|(_, v)| v.iter().all(|x| *x == 0.0)),
        "round 1's server variate is zeros"
    );
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"],
        "one variate tensor per float tensor of the model"
    );
    let mut sent: Vec<Tensors> = vec![Tensors::new(); clients.len()];
    for round in 1..=2u32 {
        let mut expected = c.clone();
        for (i, client) in clients.iter().enumerate() {
            let row = ledger
                .get_update(client, job_id, round)
                .await
                .unwrap()
                .unwrap();
            let bytes = get(keys::variate_delta(job_id, round, client)).await;
            let mut h = Sha256Hasher::default();
            h.update(&bytes);
            assert_eq!(
                row.variate_delta_checksum.as_deref(),
                Some(h.finish_hex().as_str()),
                "{client} round {round}: the row commits to the Δc_i in S3"
            );
            let delta = read_f32(&bytes);
            for (name, (_, e)) in expected.iter_mut() {
                let d = &delta[name].1;
                e.iter_mut()
                    .zip(d)
                    .for_each(|(e, d)| *e += d / clients.len() as f64);
            }
            // c_i as the client keeps it: F32 sums of what it sent.
            let kept = &mut sent[i];
            for (name, (shape, d)) in delta {
                let entry = kept
                    .entry(name)
                    .or_insert_with(|| (shape, vec![0.0; d.len()]));
                entry
                    .1
                    .iter_mut()
                    .zip(&d)
                    .for_each(|(k, d)| *k = f64::from(*k as f32 + *d as f32));
            }
        }
        let stored = read_f32(&get(keys::server_variate(job_id, round + 1)).await);
        let mut worst = 0.0f64;
        let mut norm = 0.0f64;
        for (name, (_, e)) in &expected {
            for (x, y) in e.iter().zip(&stored[name].1) {
                worst = worst.max((x - y).abs());
                norm += y * y;
            }
        }
        eprintln!(
            "round {round}: server variate |c| = {:.4}, max deviation from the recomputation {worst:e}",
            norm.sqrt()
        );
        assert!(norm > 0.0, "round {}'s server variate moved", round + 1);
        assert!(worst <= 1e-6, "round {round}: deviation {worst:e}");
        c = stored;
    }
    for (i, client) in clients.iter().enumerate() {
        let file = fedstep_e2e::client_config::workdir(d, client)
            .join("scaffold")
            .join(format!("{job_id}.safetensors"));
        let kept = read_f32(&std::fs::read(&file).unwrap_or_else(|e| panic!("{file:?}: {e}")));
        assert_eq!(kept, sent[i], "{client}'s c_i is the sum of its Δc_i");
    }
}
