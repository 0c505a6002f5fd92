//! Issue #7's emulator test: one FedSelect client among plain ones, all as
//! real processes (the emulator worker, three `fedstep-client run`, `fedstep
//! job start`) on a job whose `[aggregation]` says `personalization =
//! "fedselect"`. site-a keeps 20% of every float tensor personal from round
//! 1 (ramp_rounds 1), except `fc2.bias`, set to 50% in its client.toml's
//! `[personalization.tensor_fractions]`; site-b and site-c upload whole
//! models.
//!
//! Checked from what the binaries left in S3, DynamoDB and site-a's workdir:
//! the job succeeds with every round CLOSED and all three accepted; site-a's
//! uploads carry a mask per float tensor with floor(f·n) personal elements
//! (f = 0.2, or 0.5 for fc2.bias),
//! holding that round's global value bit for bit (nothing personal is sent),
//! and the personal set never shrinks; b's and c's uploads carry no mask;
//! each next global model is the masked, example-weighted mean recomputed
//! here in f64 (site-a's personal elements averaged over b and c only), and
//! the plain mean or another weighting would not pass the same check;
//! site-a's personal file holds its last upload's masks and values that
//! differ from what it uploaded at the personal elements, and the model it
//! wrote on training_complete is the final global model with those
//! personal values put back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fedstep_cloud::keys;
use fedstep_cloud::ports::ObjectStore;
use fedstep_cloud::records::ClosedBy;
use fedstep_e2e::client_config::{self, Personalize};
use fedstep_e2e::masked_fedavg::{self, MaskedFile};
use fedstep_e2e::{execution, launch, Binaries, Deployment};

const CLIENTS: [&str; 3] = ["site-a", "site-b", "site-c"];
const PERSONALIZING: &str = "site-a";
const PERSONAL_FRACTION: f64 = 0.2;
/// site-a's per-tensor override.
const OVERRIDE: (&str, f64) = ("fc2.bias", 0.5);
const ROUNDS: u32 = 3;
/// As full_job.rs: the aggregator accumulates in f32 (a few ulps over three
/// inputs, ~5e-7 relative); 2e-6 is far below what a wrong mask or
/// weighting produces (both checked below).
const TOLERANCE: f64 = 2e-6;

/// Personal elements of an n-element tensor at `fraction`: fedstep-core's
/// mask.rs takes floor(fraction × n) (with a 1e-9 nudge so 0.3 × 10 is 3).
fn personal_count(n: usize, fraction: f64) -> usize {
    (fraction * n as f64 + 1e-9).floor() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fedselect_client_among_plain_ones() {
    let _one_at_a_time = crate::one_at_a_time().await;
    let bins = Binaries::find();
    let Some(d) = Deployment::create("p", &CLIENTS).await else {
        return;
    };
    let mut worker = launch::worker(&d, &bins, "worker-p");
    let mut clients = launch::digits_clients(&d, &bins, &CLIENTS, |id| {
        (id == PERSONALIZING).then(|| Personalize {
            personal_fraction: PERSONAL_FRACTION,
            ramp_rounds: 1,
            tensor_fractions: vec![(OVERRIDE.0.to_string(), OVERRIDE.1)],
        })
    });

    let job_id = fedstep_e2e::unique("fedselect");
    let job = launch::job_file(
        &d,
        &bins,
        &job_id,
        &format!(
            "rounds = {ROUNDS}\nclients = {CLIENTS:?}\nmin_clients = 3\nround_timeout_seconds = 120\n\
             [aggregation]\npersonalization = \"fedselect\"\nweighting = \"examples\"\n\
             [round_config]\nlocal_epochs = 2\nbatch_size = 32\nlearning_rate = 0.1\n"
        ),
    );
    let t0 = Instant::now();
    let started = launch::fedstep(&d, &bins, &["job", "start", "--config", &job]);
    assert!(
        started.contains(&format!("started job {job_id}")),
        "{started}"
    );

    let arn = d.execution_arn(&job_id);
    let logs = || {
        let mut all = vec![&worker];
        all.extend(clients.iter());
        launch::logs(&all)
    };
    let done = execution::wait_until_done(&d.sfn, &arn, Duration::from_secs(300), logs).await;
    eprintln!(
        "{ROUNDS} rounds: {:?} in {:.1?}",
        done.status(),
        t0.elapsed()
    );
    execution::assert_succeeded(&done, logs);
    for c in clients.iter_mut() {
        c.expect_exit_zero(Duration::from_secs(60)).await;
    }

    // The ledger: every round CLOSED by the stream, all three accepted.
    d.closed_rounds(&job_id, ROUNDS, &CLIENTS, ClosedBy::Stream)
        .await;

    let store = d.store();
    let mut previous_personal: Option<Vec<(String, BTreeSet<usize>)>> = None;
    let mut last_upload: Option<MaskedFile> = None;
    let mut final_global: Option<MaskedFile> = None;
    for round in 1..=ROUNDS {
        // This round's global model (round 1: the initial model job start put there).
        let path = d.path(&format!("{job_id}-global{round}.safetensors"));
        store
            .get_file(&keys::global_model(&job_id, round), &path)
            .await
            .unwrap_or_else(|e| panic!("round {round}'s global model: {e}"));
        let global = masked_fedavg::read(
            &format!("global model {round}"),
            &std::fs::read(&path).unwrap(),
        );
        assert!(
            global.masks.is_empty(),
            "round {round}: a global model with masks"
        );
        let (next, uploads) = d.round_inputs(&job_id, round, &CLIENTS).await;
        let next = masked_fedavg::read(&format!("global model {}", round + 1), &next);
        assert!(
            next.masks.is_empty(),
            "round {}: a global model with masks",
            round + 1
        );
        let uploads: Vec<(f64, MaskedFile)> = CLIENTS
            .iter()
            .zip(uploads)
            .map(|(c, (n, bytes))| {
                (
                    n,
                    masked_fedavg::read(&format!("{c} round {round}"), &bytes),
                )
            })
            .collect();

        // site-a: a mask per float tensor, floor(f·n) personal elements,
        // each holding this round's global value exactly.
        let a = &uploads[0].1;
        assert_eq!(
            a.masks.keys().collect::<Vec<_>>(),
            a.tensors.keys().collect::<Vec<_>>(),
            "round {round}: site-a's upload must carry a mask for every (float) tensor"
        );
        let mut personal_sets = Vec::new();
        let mut shares = Vec::new();
        for (name, (_, values)) in &a.tensors {
            let personal = a.personal(name);
            let n = values.len();
            let fraction = if name == OVERRIDE.0 {
                OVERRIDE.1
            } else {
                PERSONAL_FRACTION
            };
            let want = personal_count(n, fraction);
            assert_eq!(
                personal.len(),
                want,
                "round {round}: {name} has {} of {n} elements personal, expected floor({fraction} × {n}) = {want}",
                personal.len()
            );
            let g = &global.tensors[name].1;
            for &j in &personal {
                assert_eq!(
                    values[j].to_bits(),
                    g[j].to_bits(),
                    "round {round}: site-a uploaded {} at personal element {name}[{j}], not the global value {}",
                    values[j],
                    g[j]
                );
            }
            shares.push(format!("{name} {}/{n}", personal.len()));
            personal_sets.push((name.clone(), personal.into_iter().collect::<BTreeSet<_>>()));
        }
        eprintln!(
            "round {round}: site-a personal elements per tensor: {}",
            shares.join(", ")
        );
        // The personal set only grows (here it is full from round 1, so it stays).
        if let Some(prev) = &previous_personal {
            for ((name, before), (_, now)) in prev.iter().zip(&personal_sets) {
                assert!(
                    before.is_subset(now),
                    "round {round}: {name}: an element personal in the round before is shared again"
                );
            }
        }
        previous_personal = Some(personal_sets);
        for (c, (_, u)) in CLIENTS.iter().zip(&uploads).skip(1) {
            assert!(
                u.masks.is_empty(),
                "round {round}: plain client {c} uploaded masks for {:?}",
                u.masks.keys().collect::<Vec<_>>()
            );
        }

        // The next global model = the masked, example-weighted mean.
        let expected = masked_fedavg::masked_mean(&global, &uploads);
        let deviation = masked_fedavg::max_deviation(&next, &expected, |_, _| true);
        let on_personal = |name: &str, j: usize| !a.shared(name, j);
        let personal_deviation = masked_fedavg::max_deviation(&next, &expected, on_personal);
        // What would have passed had the server ignored the masks, or used
        // the clients' weights wrongly: the check must tell them apart.
        let plain: Vec<(f64, MaskedFile)> = uploads
            .iter()
            .map(|(n, u)| (*n, u.without_masks()))
            .collect();
        let if_plain = masked_fedavg::max_deviation(
            &next,
            &masked_fedavg::masked_mean(&global, &plain),
            on_personal,
        );
        let uniform: Vec<(f64, MaskedFile)> =
            uploads.iter().map(|(_, u)| (1.0, u.clone())).collect();
        let if_uniform = masked_fedavg::max_deviation(
            &next,
            &masked_fedavg::masked_mean(&global, &uniform),
            |_, _| true,
        );
        let counts: Vec<f64> = uploads.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "round {round}: num_examples {counts:?}; max relative deviation from the masked mean {deviation:.2e} \
             (on site-a's personal elements {personal_deviation:.2e}); from the unmasked mean on those \
             elements {if_plain:.2e}; from the unweighted masked mean {if_uniform:.2e}"
        );
        assert!(
            deviation <= TOLERANCE,
            "round {round}: the global model deviates from the masked mean by {deviation:e}"
        );
        assert!(
            if_plain > 100.0 * TOLERANCE,
            "round {round}: the check cannot tell the masked mean from the plain one ({if_plain:e})"
        );
        assert!(
            if_uniform > 100.0 * TOLERANCE,
            "round {round}: the check cannot tell the weighting apart ({if_uniform:e})"
        );
        last_upload = Some(uploads.into_iter().next().unwrap().1);
        final_global = Some(next);
    }

    // site-a's personal file: the masks of its last upload, personal values
    // that are not what it uploaded there, 0 at the shared elements.
    let last_upload = last_upload.expect("at least one round");
    let personal_path = client_config::workdir(&d, PERSONALIZING)
        .join("personal")
        .join(format!("{job_id}.safetensors"));
    let bytes = std::fs::read(&personal_path)
        .unwrap_or_else(|e| panic!("site-a's personal file {}: {e}", personal_path.display()));
    let kept = masked_fedavg::read("site-a's personal file", &bytes);
    assert_eq!(
        kept.masks, last_upload.masks,
        "the personal file's masks are not the last upload's"
    );
    let mut differing = Vec::new();
    for (name, (_, values)) in &kept.tensors {
        let uploaded = &last_upload.tensors[name].1;
        let personal = kept.personal(name);
        let differ = personal
            .iter()
            .filter(|&&j| values[j].to_bits() != uploaded[j].to_bits())
            .count();
        assert_eq!(
            differ,
            personal.len(),
            "{name}: {} personal values equal what site-a uploaded there",
            personal.len() - differ
        );
        for j in (0..values.len()).filter(|&j| kept.shared(name, j)) {
            assert_eq!(
                values[j], 0.0,
                "{name}[{j}]: the personal file holds a value at a shared element"
            );
        }
        differing.push(format!("{name} {differ}/{}", personal.len()));
    }
    eprintln!(
        "site-a's personal file: personal values differing from the upload: {}",
        differing.join(", ")
    );

    // On training_complete site-a wrote the model it serves: the final
    // global model with its personal values put back, bit for bit.
    let final_global = final_global.expect("at least one round");
    let served_path = client_config::workdir(&d, PERSONALIZING)
        .join("personal")
        .join(format!("{job_id}.personalized.safetensors"));
    let bytes = std::fs::read(&served_path)
        .unwrap_or_else(|e| panic!("site-a's personalized model {}: {e}", served_path.display()));
    let served = masked_fedavg::read("site-a's personalized model", &bytes);
    assert!(served.masks.is_empty(), "a served model carries no masks");
    assert_eq!(
        served.tensors.keys().collect::<Vec<_>>(),
        final_global.tensors.keys().collect::<Vec<_>>()
    );
    for (name, (_, values)) in &served.tensors {
        let from_global = &final_global.tensors[name].1;
        let personal = &kept.tensors[name].1;
        for (j, v) in values.iter().enumerate() {
            let (want, source) = if kept.shared(name, j) {
                (from_global[j], "the final global model")
            } else {
                (personal[j], "the personal file")
            };
            assert_eq!(
                v.to_bits(),
                want.to_bits(),
                "{name}[{j}]: the personalized model holds {v}, {source} {want}"
            );
        }
    }

    let status = worker.terminate(Duration::from_secs(30)).await;
    assert!(
        status.success(),
        "worker exit {status}\n{}",
        worker.log_tail(30)
    );
}
