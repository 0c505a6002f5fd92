//! Issue #17 on the emulators: an async job (K = 2) of two built-in clients
//! and one client several times slower (an external trainer that sleeps
//! six seconds before each training). Versions advance without the slow
//! client; its update, trained from an early version, lands in a later one
//! as stale and is rebased and discounted there; the job finalizes. The
//! version with the stale update is recomputed here from S3:
//! g_{v+1} = g_v + Σᵢ wᵢ·s(τᵢ)·(xᵢ − g_{v−τᵢ}), s(τ) = 1/(1+τ)^0.5, with
//! the weights the version's stored measurements name. A row of the slow
//! client that came late for its version (the fast ones filled it first)
//! must have been carried into a later version, not lost.

use std::time::{Duration, Instant};

use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore};
use fedstep_cloud::records::RoundStatus;
use fedstep_e2e::client_config::{ClientSetup, Trainer};
use fedstep_e2e::fedavg::{read_f32, Tensors};
use fedstep_e2e::{emulators, execution, launch, Binaries, Deployment};

const VERSIONS: u32 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_advance_without_the_slow_client_and_its_stale_update_is_rebased() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(python) = crate::external_trainer::python_with_numpy() else {
        let _: Option<()> = emulators::unavailable(
            "no python with numpy (set FEDSTEP_PYTHON; scripts/test.sh installs .emu/tools)",
        );
        return;
    };
    let clients = ["site-a", "site-b", "site-slow"];
    let Some(d) = Deployment::create("async", &clients).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-async");
    // Several seconds a training, against about one for the built-in
    // clients: versions take the emulators' workflow a few seconds each.
    let slow_command =
        format!("sleep 6; exec '{python}' examples/external_trainer.py --classes 7,8,9 --seed 3");
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
            client_id: "site-slow".into(),
            exit_on_complete: true,
            trainer: Trainer::External {
                command: vec!["sh".into(), "-c".into(), slow_command],
            },
            personalization: None,
        },
    ];
    let mut procs: Vec<_> = setups
        .iter()
        .map(|s| launch::client(&d, &bins, s))
        .collect();

    let job_id = fedstep_e2e::unique("buffered");
    let job = launch::job_file(
        &d,
        &bins,
        &job_id,
        &format!(
            "rounds = {VERSIONS}\nclients = [\"site-a\", \"site-b\", \"site-slow\"]\nmin_clients = 1\n\
             round_timeout_seconds = 120\nmode = \"async\"\n[aggregation]\nweighting = \"examples\"\n\
             [round_config]\nlocal_epochs = 1\n[async]\nbuffer_size = 2\n"
        ),
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
        Duration::from_secs(300),
        logs,
    )
    .await;
    eprintln!("async job: {:?} in {:.1?}", done.status(), t0.elapsed());
    execution::assert_succeeded(&done, logs);

    let (store, ledger) = (d.store(), d.ledger());
    let rows = ledger.list_rounds(&job_id).await.unwrap();
    assert_eq!(rows.len(), VERSIONS as usize, "{rows:?}");
    let mut stale_version = None;
    for r in &rows {
        assert_eq!(r.status, RoundStatus::Closed, "version {}: {r:?}", r.round);
        let result = r.result.as_ref().unwrap();
        eprintln!(
            "version {}: accepted {:?} rejected {:?}",
            r.round, result.accepted, result.rejected
        );
        if !result.accepted.iter().any(|c| c == "site-slow") {
            continue;
        }
        let row = ledger
            .get_update("site-slow", &job_id, r.round)
            .await
            .unwrap()
            .unwrap();
        if row.base_round.is_some_and(|b| b < r.round) && stale_version.is_none() {
            stale_version = Some((r.round, row.base_round.unwrap()));
        }
    }
    // No update of the slow client lost to the race with the fast ones: a
    // row that came late for its version was carried into a later one.
    let mut carried = 0;
    for r in &rows {
        let Some(reason) = r.rejections.get("site-slow") else {
            continue;
        };
        eprintln!("version {}: site-slow rejected: {reason}", r.round);
        if !reason.starts_with("late:") || r.round == VERSIONS {
            continue;
        }
        let into: u32 = reason
            .rsplit("carried into version ")
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("version {}: a late row not carried: {reason}", r.round));
        let late = ledger
            .get_update("site-slow", &job_id, r.round)
            .await
            .unwrap()
            .unwrap();
        let copy = ledger
            .get_update("site-slow", &job_id, into)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            copy.checksum, late.checksum,
            "version {into} holds the carried row"
        );
        carried += 1;
    }
    eprintln!("site-slow: {carried} late rows carried into a later version");

    // Version 1 did not wait for the slow client.
    let first = rows[0].result.as_ref().unwrap();
    let mut accepted = first.accepted.clone();
    accepted.sort();
    assert_eq!(accepted, ["site-a", "site-b"]);
    let (v, base) = stale_version.expect("the slow client's update lands stale in a later version");
    eprintln!("site-slow: trained from version {base}, counted in version {v}");

    // Version v, recomputed from S3.
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
    let measured: serde_json::Value =
        serde_json::from_slice(&get(keys::round_measurements(&job_id, v + 1)).await).unwrap();
    let g = read_f32(&get(keys::global_model(&job_id, v)).await);
    let next = read_f32(&get(keys::global_model(&job_id, v + 1)).await);
    let mut want: Tensors = g.clone();
    // At least K: rows counted before the version was claimed are in too.
    let clients_measured = measured["measurements"]["clients"].as_array().unwrap();
    assert!(clients_measured.len() >= 2, "{measured}");
    for c in clients_measured {
        let id = c["client_id"].as_str().unwrap();
        let w = c["weight"].as_f64().unwrap();
        let row = ledger.get_update(id, &job_id, v).await.unwrap().unwrap();
        let b = row.base_round.unwrap_or(v);
        let s = (1.0 + f64::from(v - b)).powf(-0.5);
        let x = read_f32(&get(row.model_key.clone()).await);
        let gb = read_f32(&get(keys::global_model(&job_id, b)).await);
        for (name, (_, values)) in want.iter_mut() {
            for (k, value) in values.iter_mut().enumerate() {
                *value += w * s * (x[name].1[k] - gb[name].1[k]);
            }
        }
    }
    let mut deviation = 0f64;
    for (name, (_, values)) in &want {
        for (k, value) in values.iter().enumerate() {
            deviation = deviation.max((next[name].1[k] - value).abs());
        }
    }
    eprintln!("version {v} recomputed: max deviation {deviation:e}");
    assert!(deviation <= 1e-5, "deviation {deviation:e}");

    for p in procs.iter_mut() {
        p.expect_exit_zero(Duration::from_secs(90)).await;
    }
    eprintln!("site-slow's log:\n{}", procs[2].log_tail(40));
    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}
