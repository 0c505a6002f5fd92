//! SCAFFOLD's server side in the round engine (issue #19): StartRound
//! names round 1's zero variate (and its checksum) in the message, and the
//! commit sets c₂ = c₁ + (|S|/N)·mean Δc_i over the accepted clients whose
//! Δc_i is the one their row committed to. A Δc_i that was swapped after
//! the row, or a row that commits to none, leaves that client out of c
//! with a reason; its model still counts, and the round goes on.

use std::collections::BTreeMap;

use fedstep_cloud::checksum::Sha256Hasher;
use fedstep_cloud::keys;
use fedstep_cloud::ports::{Ledger, ObjectStore, PutUpdate};
use fedstep_cloud::records::{ClosedBy, Notification, ServerVariateRef, UpdateRecord, SCHEMA};
use fedstep_cloud::round_measurements::RoundMeasurements;
use fedstep_cloud::{JobSpec, UpdateOutcome};
use fedstep_core::scaffold::{ControlVariate, VariateLayout};
use fedstep_core::Limits;
use fedstep_test_support::federation::*;

const JOB: &str = "scaf";

fn scaffold_job() -> fedstep_cloud::Job {
    JobSpec::from_toml(&format!(
        "job_id = \"{JOB}\"\nrounds = 2\nclients = [\"a\", \"b\", \"c\", \"d\"]\nmin_clients = 2\n\
         round_timeout_seconds = 600\n[round_config]\nalgorithm = \"scaffold\"\n"
    ))
    .unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    let mut h = Sha256Hasher::default();
    h.update(bytes);
    h.finish_hex()
}

async fn read(fed: &Fed, key: &str) -> Vec<u8> {
    let path = fed.dir.path().join(key.replace('/', "_"));
    fed.store.get_file(key, &path).await.unwrap();
    std::fs::read(&path).unwrap()
}

fn announced(fed: &Fed, round: u32) -> ServerVariateRef {
    fed.bus
        .published()
        .into_iter()
        .find_map(|n| match n {
            Notification::GlobalModelReady(m) if m.round == round => m.server_variate,
            _ => None,
        })
        .expect("the round's message names its server variate")
}

/// `client`'s Δc_i uploaded beside its update, and the row committing to
/// it (`commit`: false leaves the row's checksum out).
async fn submit(fed: &Fed, client: &str, delta: [f32; 2], commit: bool) -> UpdateRecord {
    let layout = VariateLayout::of_model_bytes(
        &read(fed, &keys::global_model(JOB, 1)).await,
        &Limits::default(),
    )
    .unwrap();
    let bytes = ControlVariate::from_values(&layout, vec![delta.to_vec()])
        .unwrap()
        .to_bytes(&BTreeMap::new())
        .unwrap();
    let file = fed.dir.path().join(format!("delta-{client}"));
    std::fs::write(&file, &bytes).unwrap();
    let put = fed
        .store
        .put_update_file(&keys::variate_delta(JOB, 1, client), &file)
        .await
        .unwrap();
    assert_eq!(put.sha256, sha256(&bytes));
    let model = fed.model_file(&format!("{client}-1"), &[1.0, 1.0]);
    let up = fed
        .store
        .put_file(&keys::update(JOB, 1, client), &model)
        .await
        .unwrap();
    let row = UpdateRecord {
        client_id: client.into(),
        job_round: keys::job_round(JOB, 1),
        job_id: JOB.into(),
        round: 1,
        model_key: keys::update(JOB, 1, client),
        checksum: up.sha256,
        store_checksum: None,
        num_examples: 10.into(),
        llm_type: None,
        metrics: BTreeMap::new(),
        bytes: up.bytes,
        trained_at: "2027-01-15T08:00:00Z".into(),
        schema: Some(SCHEMA),
        variate_delta_checksum: commit.then_some(put.sha256),
        base_round: None,
    };
    assert_eq!(
        fed.ledger.put_update(&row).await.unwrap(),
        PutUpdate::Created
    );
    row
}

#[tokio::test]
async fn the_commit_updates_c_from_the_deltas_the_rows_committed_to() {
    let fed = Fed::new();
    let engine = fed.engine("agg");
    let job = scaffold_job();
    assert!(job.scaffold());
    fed.upload_initial(&job, &[0.0, 0.0]).await;
    engine.start_round(&job, 1, "t1").await.unwrap();

    // Round 1's c: zeros, announced with the checksum of what is stored.
    let c1 = announced(&fed, 1);
    assert_eq!(c1.key, keys::server_variate(JOB, 1));
    let c1_bytes = read(&fed, &c1.key).await;
    assert_eq!(c1.checksum, sha256(&c1_bytes));

    let a = submit(&fed, "a", [0.4, 0.2], true).await;
    let b = submit(&fed, "b", [100.0, 100.0], true).await;
    // b's Δc_i is replaced after its row committed to the first one.
    let swapped = fed.dir.path().join("swapped");
    std::fs::write(&swapped, b"not what the row says").unwrap();
    fed.store
        .put_file(&keys::variate_delta(JOB, 1, "b"), &swapped)
        .await
        .unwrap();
    let c = submit(&fed, "c", [50.0, 50.0], false).await;
    let d = submit(&fed, "d", [0.0, 0.6], true).await;
    let mut outcome = None;
    for row in [&a, &b, &c, &d] {
        outcome = Some(engine.on_update(row).await.unwrap());
    }
    assert!(matches!(outcome, Some(UpdateOutcome::HandedOver { .. })));
    let result = engine.close_round(JOB, 1, ClosedBy::Stream).await.unwrap();
    // Every model counts: a bad Δc_i is not a bad update.
    assert_eq!(result.accepted, ["a", "b", "c", "d"]);
    assert!(result.rejected.is_empty(), "{:?}", result.rejected);

    // c₂ = c₁ + (|S|/N)·mean Δc_i = 0 + (2/4)·([0.4, 0.2] + [0, 0.6])/2.
    let c2 = read(&fed, &keys::server_variate(JOB, 2)).await;
    let layout = VariateLayout::of_model_bytes(
        &read(&fed, &keys::global_model(JOB, 1)).await,
        &Limits::default(),
    )
    .unwrap();
    let (c2_values, meta) = ControlVariate::parse(&c2, &layout, &Limits::default()).unwrap();
    let w = c2_values.get("w").unwrap();
    assert!(
        (w[0] - 0.1).abs() < 1e-7 && (w[1] - 0.2).abs() < 1e-7,
        "{w:?}"
    );
    assert_eq!(meta["fedstep.scaffold.step"], "1");

    let key = keys::round_measurements(JOB, 2);
    let kept = RoundMeasurements::from_json_bytes(&key, &read(&fed, &key).await).unwrap();
    let m = kept
        .scaffold
        .expect("the round's measurements say what c got");
    assert_eq!(m.used, ["a", "d"]);
    assert_eq!((m.total_clients, m.participation), (4, 0.5));
    let reasons: BTreeMap<_, _> = m.rejected.into_iter().collect();
    assert!(reasons["b"].contains("the row committed to"), "{reasons:?}");
    assert!(
        reasons["c"].contains("names no variate_delta_checksum"),
        "{reasons:?}"
    );

    // Round 2 announces c₂ with its checksum.
    engine.start_round(&job, 2, "t2").await.unwrap();
    let c2_ref = announced(&fed, 2);
    assert_eq!(c2_ref.checksum, sha256(&c2));
    let round = fed.ledger.get_round(JOB, 2).await.unwrap().unwrap();
    assert_eq!(round.round, 2);
}

#[test]
fn a_scaffold_job_needs_a_pipeline_scaffold_is_defined_for() {
    let base = "job_id = \"j\"\nrounds = 1\nclients = [\"a\", \"b\", \"c\"]\nmin_clients = 3\n\
                round_timeout_seconds = 60\n";
    let krum = format!(
        "{base}[aggregation]\n[[aggregation.stages]]\nkind = \"krum\"\nbyzantine = 0\n\
         [round_config]\nalgorithm = \"scaffold\"\n"
    );
    let err = JobSpec::from_toml(&krum).unwrap_err();
    assert!(err.contains("scaffold") && err.contains("krum"), "{err}");
    let not_a_name = format!("{base}[round_config]\nalgorithm = 3\n");
    let err = JobSpec::from_toml(&not_a_name).unwrap_err();
    assert!(
        err.contains("round_config.algorithm must be a string"),
        "{err}"
    );
    // Other names are the trainers' business.
    let fedprox = format!("{base}[round_config]\nalgorithm = \"fedprox\"\nmu = 0.1\n");
    assert!(!JobSpec::from_toml(&fedprox).unwrap().scaffold());
}
