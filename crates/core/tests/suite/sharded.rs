//! Sharded aggregation writes the same bytes as one pass: the model and
//! the stages' state, for every kind of stage (statistics summed per stripe,
//! noise keyed by element, optimizer state written slot by slot), with a
//! client rejected mid-stream, whatever the number of shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstep_core::aggregate::aggregate_sharded;
use fedstep_core::float::encode_all_f64;
use fedstep_core::measurements::{ClientMeasurement, ClientStatus};
use fedstep_core::shard::{ShardPlan, STRIPE_ELEMENTS};
use fedstep_core::{AggregationOutcome, AggregationRequest, FileTarget, Input, Limits};
use fedstep_core::{OutputTarget, PipelineConfig, UpdateMeta, UpdateSource};
use fedstep_test_support::aggregate::Dir;
use safetensors::Dtype;

type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

/// Several stripes per large tensor, every dtype class, a carried-over
/// tensor between averaged ones.
const LAYOUT: &[(&str, Dtype, usize)] = &[
    ("emb", Dtype::F32, 2 * STRIPE_ELEMENTS + 12_345),
    ("step", Dtype::I64, 3),
    ("w", Dtype::BF16, STRIPE_ELEMENTS + 77),
    ("b", Dtype::F64, 1000),
    ("h", Dtype::F16, 300),
];

/// A small deterministic generator (xorshift): no dependency for test data.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

fn tensors(seed: u64, scale: f64, base: Option<&[Vec<f64>]>) -> (Vec<Raw>, Vec<Vec<f64>>) {
    let mut g = Gen(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut values = Vec::new();
    let raws = LAYOUT
        .iter()
        .enumerate()
        .map(|(i, &(name, dtype, n))| {
            let v: Vec<f64> = (0..n)
                .map(|j| base.map_or(0.0, |b| b[i][j]) + scale * g.next())
                .collect();
            let bytes = if dtype == Dtype::I64 {
                (0..n as i64)
                    .flat_map(|k| (k + seed as i64).to_le_bytes())
                    .collect()
            } else {
                encode_all_f64(dtype, &v)
            };
            values.push(v);
            (name.to_string(), dtype, vec![n], bytes)
        })
        .collect();
    (raws, values)
}

/// The FedSelect mask tensors: client `seed` shares about half the elements.
fn masks(seed: u64) -> Vec<Raw> {
    LAYOUT
        .iter()
        .filter(|(_, dtype, _)| *dtype != Dtype::I64)
        .map(|&(name, _, n)| {
            let m: Vec<u8> = (0..n)
                .map(|j| u8::from(!(j as u64 + seed).is_multiple_of(3)))
                .collect();
            (
                format!("__fedselect_shared__/{name}"),
                Dtype::U8,
                vec![n],
                m,
            )
        })
        .collect()
}

struct Federation {
    dir: Dir,
    global: PathBuf,
    updates: Vec<UpdateSource>,
}

/// A global model and five updates; client e moved far (clipping,
/// zeroing and Krum have something to do). With `masked`, updates carry
/// FedSelect masks and hold the global value where personal.
fn federation(masked: bool, nan_in: Option<(usize, usize)>) -> Federation {
    let dir = Dir::new();
    let (graw, gvals) = tensors(1, 1.0, None);
    let global = dir.raw("global.safetensors", graw);
    let updates = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let scale = if *id == "e" { 0.5 } else { 0.01 };
            let (mut raw, _) = tensors(10 + i as u64, scale, Some(&gvals));
            if masked {
                for (t, r) in raw.iter_mut().enumerate() {
                    if r.1 == Dtype::I64 {
                        continue;
                    }
                    let personal: Vec<bool> = masks(i as u64)
                        .into_iter()
                        .find(|m| m.0.ends_with(&format!("/{}", r.0)))
                        .unwrap()
                        .3
                        .iter()
                        .map(|&s| s == 0)
                        .collect();
                    let mut v = decode(r.1, &r.3);
                    for (j, p) in personal.iter().enumerate() {
                        if *p {
                            v[j] = gvals[t][j];
                        }
                    }
                    r.3 = encode_all_f64(r.1, &v);
                }
                raw.extend(masks(i as u64));
            }
            if let Some((_, element)) = nan_in.filter(|(c, _)| *c == i) {
                // Far into the model: found by a late shard's pass.
                let emb = raw.iter_mut().find(|r| r.0 == "emb").unwrap();
                emb.3[element * 4..element * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            let path = dir.raw(&format!("{id}.safetensors"), raw);
            UpdateSource::file(&path, UpdateMeta::new(*id, 100 + 10 * i as u64))
        })
        .collect();
    Federation {
        dir,
        global,
        updates,
    }
}

fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    let eb = fedstep_core::float::elem_bytes(dtype);
    (0..bytes.len() / eb)
        .map(|i| match dtype {
            Dtype::F32 => f32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()) as f64,
            Dtype::F64 => f64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap()),
            Dtype::BF16 => {
                half::bf16::from_le_bytes(bytes[i * 2..i * 2 + 2].try_into().unwrap()).to_f64()
            }
            Dtype::F16 => {
                half::f16::from_le_bytes(bytes[i * 2..i * 2 + 2].try_into().unwrap()).to_f64()
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

/// Runs one aggregation with `shards`; returns the model's and the state's
/// bytes and the outcome.
fn run(
    fed: &Federation,
    config: &str,
    shards: usize,
    state_in: Option<&Path>,
) -> (Vec<u8>, Option<Vec<u8>>, AggregationOutcome) {
    let cfg = PipelineConfig::from_toml(config).unwrap();
    let out = fed.dir.path(&format!("out-{shards}.safetensors"));
    let state = fed.dir.path(&format!("state-{shards}.safetensors"));
    let state_target = FileTarget::new(&state);
    let stateful = cfg.pipeline().is_stateful();
    let outcome = aggregate_sharded(
        &AggregationRequest {
            updates: &fed.updates,
            global: Some(Input::file(&fed.global)),
            config: &cfg,
            out: &FileTarget::new(&out),
            state_in: state_in.map(Input::file),
            state_out: stateful.then_some(&state_target as &dyn OutputTarget),
            round: 3,
        },
        shards,
    )
    .unwrap();
    let model = std::fs::read(&out).unwrap();
    let state = stateful.then(|| std::fs::read(&state).unwrap());
    (model, state, outcome)
}

fn client<'a>(o: &'a AggregationOutcome, id: &str) -> &'a ClientMeasurement {
    o.measurements
        .clients
        .iter()
        .find(|c| c.client_id == id)
        .unwrap()
}

/// What must not depend on the shards: everything but timing.
fn records(o: &AggregationOutcome) -> String {
    let mut m = serde_json::to_value(&o.measurements).unwrap();
    let obj = m.as_object_mut().unwrap();
    obj.remove("seconds");
    obj.remove("passes");
    // Reads depend on where a bad value is found: effort, not result.
    obj.remove("bytes_read");
    serde_json::to_string(&m).unwrap()
}

fn assert_same_for_every_sharding(fed: &Federation, config: &str, state_in: Option<&Path>) {
    let (model, state, outcome) = run(fed, config, 1, state_in);
    let reference = {
        let (_, h) = fedstep_core::model::open(&fed.global, &Limits::default()).unwrap();
        h.tensors
    };
    for shards in [2, 3, 5] {
        assert_eq!(ShardPlan::even(&reference, shards, 0).len(), shards);
        let (m, s, o) = run(fed, config, shards, state_in);
        assert!(
            m == model,
            "{config:?}: the model differs with {shards} shards"
        );
        assert!(
            s == state,
            "{config:?}: the state differs with {shards} shards"
        );
        assert_eq!(
            records(&o),
            records(&outcome),
            "{config:?}, {shards} shards"
        );
    }
}

#[test]
fn plain_fedavg_is_the_same_with_any_number_of_shards() {
    assert_same_for_every_sharding(&federation(false, None), "", None);
}

#[test]
fn clipping_and_seeded_dp_noise_are_the_same_with_any_number_of_shards() {
    let fed = federation(false, None);
    let cfg = "[[stages]]\nkind = \"clip\"\nmax_norm = 20.0\n\
               [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 0.5\nseed = 11";
    let (_, _, o) = run(&fed, cfg, 1, None);
    let e = client(&o, "e");
    assert!(e.scale.unwrap() < 1.0, "e is clipped: {:?}", e.scale);
    assert_same_for_every_sharding(&fed, cfg, None);
}

#[test]
fn robust_combiners_are_the_same_with_any_number_of_shards() {
    let fed = federation(false, None);
    for cfg in [
        "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 3",
        "[[stages]]\nkind = \"median\"",
        "[[stages]]\nkind = \"zeroing\"\nmax_norm = 100.0\n[[stages]]\nkind = \"trimmed_mean\"\nbeta = 0.2",
    ] {
        assert_same_for_every_sharding(&fed, cfg, None);
    }
    let (_, _, o) = run(
        &fed,
        "[[stages]]\nkind = \"krum\"\nbyzantine = 1\nselect = 3",
        4,
        None,
    );
    let e = client(&o, "e");
    assert_eq!(
        e.status,
        ClientStatus::NotSelected,
        "Krum leaves the outlier out"
    );
}

#[test]
fn server_optimizer_state_is_the_same_with_any_number_of_shards() {
    let fed = federation(false, None);
    let cfg = "[[stages]]\nkind = \"adaptive_clip\"\ninitial_norm = 30.0\n\
               [[stages]]\nkind = \"fedadam\"\nlearning_rate = 0.1";
    assert_same_for_every_sharding(&fed, cfg, None);
    // A second round reads the first one's state shard by shard.
    let (_, state, _) = run(&fed, cfg, 1, None);
    let prev = fed.dir.path("state-round-1.safetensors");
    std::fs::write(&prev, state.unwrap()).unwrap();
    assert_same_for_every_sharding(&fed, cfg, Some(&prev));
}

#[test]
fn fedselect_is_the_same_with_any_number_of_shards() {
    let fed = federation(true, None);
    let cfg = "personalization = \"fedselect\"\n[[stages]]\nkind = \"clip\"\nmax_norm = 20.0";
    assert_same_for_every_sharding(&fed, cfg, None);
}

#[test]
fn a_client_rejected_in_a_late_shard_is_rejected_the_same_way() {
    // Client c has a NaN in the last stripe of `emb`: only the last
    // shards' passes see it.
    let fed = federation(false, Some((2, 2 * STRIPE_ELEMENTS + 5)));
    for cfg in ["", "[[stages]]\nkind = \"clip\"\nmax_norm = 20.0"] {
        let (_, _, o) = run(&fed, cfg, 3, None);
        let c = client(&o, "c");
        assert_eq!(c.status, ClientStatus::Rejected, "{cfg:?}");
        assert!(
            c.reason.as_deref().unwrap().contains("non-finite"),
            "{:?}",
            c.reason
        );
        assert_same_for_every_sharding(&fed, cfg, None);
    }
}

#[test]
fn the_state_file_keeps_each_slot_in_one_run_of_bytes() {
    // Slot-major: every `m.*` before every `v.*`, so one shard's slice of
    // a slot is contiguous.
    let fed = federation(false, None);
    let (_, state, _) = run(&fed, "[[stages]]\nkind = \"fedadam\"", 1, None);
    let path = fed.dir.path("state-check.safetensors");
    std::fs::write(&path, state.unwrap()).unwrap();
    let (_, h) = fedstep_core::model::open(&path, &Limits::default()).unwrap();
    let mut by_offset: BTreeMap<u64, String> = BTreeMap::new();
    for t in &h.tensors {
        by_offset.insert(t.start, t.name.clone());
    }
    let names: Vec<&str> = by_offset.values().map(String::as_str).collect();
    assert_eq!(
        names,
        ["m.emb", "m.w", "m.b", "m.h", "v.emb", "v.w", "v.b", "v.h"]
    );
}

/// The workflow's tasks, each from a fresh `prepare` as a Lambda would
/// (statistics per shard, the decision from them, each shard's parts
/// uploaded whole), with everything between tasks passed as JSON: the
/// parts put together are the file one pass writes.
#[test]
fn the_steps_run_as_separate_tasks_put_together_the_same_files() {
    use fedstep_core::aggregate::{prepare, Decision, ShardDone, ShardStatistics, Sharding};
    use fedstep_core::shard::{MemoryParts, PartDest};
    use std::sync::Arc;

    let fed = federation(false, None);
    let cfg_text = "[[stages]]\nkind = \"clip\"\nmax_norm = 20.0\n\
                    [[stages]]\nkind = \"dp_noise\"\nnoise_multiplier = 0.5\nseed = 11\n\
                    [[stages]]\nkind = \"fedadam\"";
    let (model, state, one_pass) = run(&fed, cfg_text, 1, None);
    let cfg = PipelineConfig::from_toml(cfg_text).unwrap();
    let out = FileTarget::new(fed.dir.path("unused.safetensors"));
    let state_target = FileTarget::new(fed.dir.path("unused-state.safetensors"));
    let req = AggregationRequest {
        updates: &fed.updates,
        global: Some(Input::file(&fed.global)),
        config: &cfg,
        out: &out,
        state_in: None,
        state_out: Some(&state_target as &dyn OutputTarget),
        round: 3,
    };
    let none = BTreeMap::new();
    let sharding = Sharding {
        shards: 4,
        min_shard_bytes: 0,
    };
    let shards = prepare(&req, sharding, &none).unwrap().shards().len();
    assert_eq!(shards, 4);
    let stats: Vec<ShardStatistics> = (0..shards)
        .map(|s| {
            let task = prepare(&req, sharding, &none).unwrap();
            let json = serde_json::to_string(&task.statistics(s).unwrap()).unwrap();
            serde_json::from_str(&json).unwrap()
        })
        .collect();
    let decision: Decision = {
        let task = prepare(&req, sharding, &none).unwrap();
        serde_json::from_str(&serde_json::to_string(&task.decide(&stats).unwrap()).unwrap())
            .unwrap()
    };
    let model_parts = Arc::new(MemoryParts::default());
    let state_parts = Arc::new(MemoryParts::default());
    // Out of order, as a Map runs them.
    let done: Vec<ShardDone> = [2, 0, 3, 1]
        .into_iter()
        .map(|s| {
            let task = prepare(&req, sharding, &none).unwrap();
            let outputs = task.outputs(&decision).unwrap();
            task.combine_shard(
                &decision,
                &outputs,
                s,
                PartDest::Whole(model_parts.clone()),
                Some(PartDest::Whole(state_parts.clone())),
            )
            .unwrap()
        })
        .collect();
    let task = prepare(&req, sharding, &none).unwrap();
    let outputs = task.outputs(&decision).unwrap();
    let concat = |parts: BTreeMap<u32, Vec<u8>>| -> Vec<u8> {
        let numbers: Vec<u32> = parts.keys().copied().collect();
        assert_eq!(numbers, (1..=numbers.len() as u32).collect::<Vec<_>>());
        parts.into_values().flatten().collect()
    };
    assert!(
        concat(model_parts.take()) == model,
        "the model's parts make the model"
    );
    assert!(
        Some(concat(state_parts.take())) == state,
        "the state's parts make the state"
    );
    // Each shard's bytes fit one 16 MiB part.
    assert_eq!(outputs.model_parts.len(), 4);
    let outcome = task.outcome(
        &decision,
        &outputs,
        &done,
        Default::default(),
        Default::default(),
    );
    assert_eq!(records(&outcome), records(&one_pass));
}

/// A decision made over other updates (a task that opened its attempt
/// after a client was rejected, and a stale decision from before) is
/// refused with a reason, never indexed into.
#[test]
fn a_decision_over_other_updates_is_refused() {
    use fedstep_core::aggregate::{prepare, Sharding, StepError};
    use fedstep_core::shard::{MemoryParts, PartDest};
    use std::sync::Arc;

    let fed = federation(false, None);
    let cfg = PipelineConfig::default();
    let out = FileTarget::new(fed.dir.path("unused.safetensors"));
    let req = AggregationRequest {
        updates: &fed.updates,
        global: Some(Input::file(&fed.global)),
        config: &cfg,
        out: &out,
        state_in: None,
        state_out: None,
        round: 1,
    };
    let sharding = Sharding {
        shards: 2,
        min_shard_bytes: 0,
    };
    let all = prepare(&req, sharding, &BTreeMap::new()).unwrap();
    let decision = all.decide(&[]).unwrap();
    let without_b = BTreeMap::from([(1, "rejected earlier".to_string())]);
    let fewer = prepare(&req, sharding, &without_b).unwrap();
    let outputs = fewer.outputs(&decision).unwrap();
    let dest = PartDest::Whole(Arc::new(MemoryParts::default()));
    match fewer.combine_shard(&decision, &outputs, 0, dest, None) {
        Err(StepError::Fatal(e)) => {
            assert!(e.to_string().contains("different set of updates"), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
