//! Issue #6, hostile inputs to the numeric core. What aggregate.rs
//! already covers through whole aggregations (a 500 MB header bomb from a
//! file, overlapping offsets, NaN/Inf, truncation, zeroing a huge update)
//! is not repeated; this file adds the bytes entry point
//! (`header_from_bytes`), out-of-bounds offsets, a 10^6× norm caught by
//! clipping as well as zeroing, hostile claims (num_examples, metrics,
//! llm_type) in one round that goes on, and property tests: random and
//! mutated bytes never panic the header path.

use fedstep_core::measurements::ClientStatus;
use fedstep_core::model::{check_compatible, header_from_bytes, open};
use fedstep_core::{Limits, ModelError, UpdateMeta};
use fedstep_test_support::aggregate::*;
use fedstep_test_support::assert_close;
use proptest::prelude::*;
use safetensors::Dtype;
use serde_json::Value;

fn file_with_header(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(data);
    v
}

/// A valid two-tensor model's bytes.
fn valid_model() -> Vec<u8> {
    let d = Dir::new();
    let p = d.model(
        "v.safetensors",
        Dtype::F32,
        &[("w", &[1.0, 2.0, 3.0]), ("b", &[4.0])],
    );
    std::fs::read(p).unwrap()
}

#[test]
fn header_bombs_cost_nothing_and_say_so() {
    let limits = Limits::default();
    for declared in [300u64 << 20, limits.max_header_bytes + 1, u64::MAX] {
        let mut bytes = declared.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = header_from_bytes(&bytes, &limits).unwrap_err();
        assert!(
            matches!(err, ModelError::HeaderTooLarge { declared: d, .. } if d == declared),
            "{declared}: {err}"
        );
        assert!(err.to_string().contains("header bomb"), "{err}");
    }
    // Under the limit but past the end of the bytes: not allocated either.
    let mut bytes = (limits.max_header_bytes - 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let err = header_from_bytes(&bytes, &limits).unwrap_err();
    assert!(matches!(err, ModelError::HeaderBeyondFile { .. }), "{err}");
    // The file path gives the same answer as the bytes path.
    let d = Dir::new();
    let mut bomb = (400u64 << 20).to_le_bytes().to_vec();
    bomb.extend_from_slice(b"{}");
    let p = d.bytes("bomb.safetensors", &bomb);
    assert!(matches!(
        open(&p, &limits).unwrap_err(),
        ModelError::HeaderTooLarge { .. }
    ));
}

#[test]
fn offsets_out_of_bounds_overlapping_or_with_gaps_are_rejected() {
    let limits = Limits::default();
    let cases: [(&[u8], usize); 5] = [
        // Claims 4000 bytes; the file holds 8.
        (
            br#"{"w":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#,
            8,
        ),
        // Offsets past the data that fit the shape.
        (
            br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}}"#,
            8,
        ),
        // Overlap.
        (
            br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
            12,
        ),
        // A gap between tensors.
        (
            br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
            12,
        ),
        // Shape × dtype disagrees with the offsets.
        (
            br#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        ),
    ];
    for (header, data_len) in cases {
        let bytes = file_with_header(header, &vec![0u8; data_len]);
        let err = header_from_bytes(&bytes, &limits).unwrap_err();
        assert!(
            matches!(
                err,
                ModelError::InvalidHeader(_) | ModelError::DataSizeMismatch { .. }
            ),
            "{}: {err}",
            String::from_utf8_lossy(header)
        );
    }
    // Huge shapes whose product overflows usize are an error, not a panic.
    let header =
        br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}"#;
    assert!(header_from_bytes(&file_with_header(header, &[]), &limits).is_err());
    // Too many tensors for the limit.
    let tight = Limits {
        max_tensors: 1,
        ..Limits::default()
    };
    let err = header_from_bytes(&valid_model(), &tight).unwrap_err();
    assert!(
        matches!(err, ModelError::TooManyTensors { count: 2, .. }),
        "{err}"
    );
}

/// A client whose update is 10^6 times the others' norm: zeroing drops it
/// with a reason, clipping scales it down to the bound; either way the
/// round goes on and the result stays near the honest clients.
#[test]
fn a_million_times_larger_update_is_zeroed_or_clipped() {
    let d = Dir::new();
    let g = d.model("g.safetensors", Dtype::F32, &[("w", &[0.0, 0.0])]);
    let a = d.model("a.safetensors", Dtype::F32, &[("w", &[0.6, 0.8])]); // norm 1
    let b = d.model("b.safetensors", Dtype::F32, &[("w", &[0.8, 0.6])]); // norm 1
    let evil = d.model("evil.safetensors", Dtype::F32, &[("w", &[6e5, 8e5])]); // norm 1e6
    let ups = [
        update(&a, UpdateMeta::new("a", 1)),
        update(&b, UpdateMeta::new("b", 1)),
        update(&evil, UpdateMeta::new("evil", 1)),
    ];

    let (o, m) = run(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"zeroing\"\nmax_norm = 10.0",
    )
    .unwrap();
    assert_close(&m["w"].values, &[0.7, 0.7], 1e-6);
    let c = &o.measurements.clients[2];
    assert_eq!(c.status, ClientStatus::Zeroed);
    assert!(
        c.reason.as_deref().unwrap().contains("zeroing bound 10"),
        "{c:?}"
    );

    let (o, m) = run(
        &d,
        &ups,
        Some(&g),
        "[[stages]]\nkind = \"clip\"\nmax_norm = 1.5",
    )
    .unwrap();
    // evil is scaled to norm 1.5, [0.9, 1.2]; a and b are under the bound.
    assert_close(&m["w"].values, &[2.3 / 3.0, 2.6 / 3.0], 1e-6);
    let c = &o.measurements.clients[2];
    assert_eq!(c.status, ClientStatus::Accepted);
    assert_close(&[c.update_norm.unwrap()], &[1e6], 1.0);
    assert_close(&[c.scale.unwrap()], &[1.5e-6], 1e-12);
    assert_eq!(o.measurements.stages["clip"]["clipped_count"], 1);
}

/// Every hostile claim is its own recorded, specific rejection (or, for an
/// unknown type, plain FedAvg / exclusion) and the round goes on.
#[test]
fn hostile_claims_are_rejected_one_by_one_while_the_round_goes_on() {
    let d = Dir::new();
    let m = |name: &str, v: f64| d.model(name, Dtype::F32, &[("w", &[v, v])]);
    let (good1, good2) = (m("good1.safetensors", 1.0), m("good2.safetensors", 3.0));
    let other = m("other.safetensors", 100.0);
    let text = |id: &str, n: u64| UpdateMeta::new(id, n).with_type("SpikingEvoTextLM");
    let with_examples = |id: &str, v: Value| {
        let mut meta = text(id, 1)
            .with_metric("perplexity", 2.0)
            .with_metric("loss", 1.0);
        meta.num_examples = v;
        meta
    };
    let mut non_numeric = text("non-numeric", 5).with_metric("perplexity", 2.0);
    non_numeric
        .metrics
        .insert("loss".into(), Value::from("low"));
    let cases: Vec<(UpdateMeta, &str)> = vec![
        (with_examples("zero", Value::from(0)), "num_examples is 0"),
        (
            with_examples("negative", Value::from(-7)),
            "num_examples is -7",
        ),
        (
            with_examples("trillion", Value::from(1_000_000_000_000u64)),
            "exceeds the cap",
        ),
        (with_examples("words", Value::from("lots")), "not a number"),
        (with_examples("null", Value::Null), "not a number"),
        (with_examples("fraction", Value::from(2.5)), "whole number"),
        (
            text("no-metrics", 5),
            "required metric `perplexity` is missing",
        ),
        (
            text("half-metrics", 5).with_metric("perplexity", 2.0),
            "required metric `loss` is missing",
        ),
        (non_numeric, "metric `loss` is not a number"),
    ];
    let mut ups = vec![
        update(
            &good1,
            text("good1", 10)
                .with_metric("perplexity", 2.0)
                .with_metric("loss", 1.0),
        ),
        update(
            &good2,
            text("good2", 10)
                .with_metric("perplexity", 2.0)
                .with_metric("loss", 1.0),
        ),
        // An unknown type with quality weighting and no filter: plain FedAvg.
        update(
            &good2,
            UpdateMeta::new("unknown-type", 10).with_type("GPT-9000"),
        ),
    ];
    for (meta, _) in &cases {
        ups.push(update(&other, meta.clone()));
    }
    let (o, model) = run(&d, &ups, None, "weighting = \"quality\"").unwrap();
    // good1 and good2 weigh 10·q (perplexity 2, loss 1); unknown-type
    // counts its 10 examples as they are.
    let q = (1.0 / (1.0 + 2f64.ln()) + 0.5) / 2.0;
    let want = (10.0 * q * 1.0 + 10.0 * q * 3.0 + 10.0 * 3.0) / (20.0 * q + 10.0);
    assert_close(&model["w"].values, &[want, want], 1e-5);
    assert_eq!(o.measurements.accepted, 3);
    assert_eq!(o.measurements.rejected, cases.len());
    for (i, (_, want)) in cases.iter().enumerate() {
        let c = &o.measurements.clients[i + 3];
        assert_eq!(c.status, ClientStatus::Rejected, "{}", c.client_id);
        let reason = c.reason.as_deref().unwrap();
        assert!(
            reason.contains(want),
            "{}: `{reason}` should say `{want}`",
            c.client_id
        );
    }

    // With an explicit target type, the unknown type is excluded, recorded.
    let (o, _) = run(
        &d,
        &ups,
        None,
        "weighting = \"quality\"\nllm_type = \"SpikingEvoTextLM\"",
    )
    .unwrap();
    let c = &o.measurements.clients[2];
    assert_eq!(c.status, ClientStatus::Excluded);
    assert!(c.reason.as_deref().unwrap().contains("`GPT-9000`"), "{c:?}");
    // Only unknown types present and asked for a known one: a clear error.
    let err = run(&d, &ups[2..3], None, "llm_type = \"SpikingEvoTextLM\"").unwrap_err();
    assert!(
        err.to_string()
            .contains("no valid update of the target llm_type"),
        "{err}"
    );
}

fn assert_model_error_or_ok(bytes: &[u8]) {
    let limits = Limits::default();
    if let Ok(h) = header_from_bytes(bytes, &limits) {
        assert_eq!(h.file_len, bytes.len() as u64);
        for t in &h.tensors {
            assert!(8 + h.header_len <= t.start && t.start <= t.end && t.end <= h.file_len);
        }
        let reference = header_from_bytes(&valid_model(), &limits).unwrap();
        let _ = check_compatible(&reference, &h);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    /// Random bytes: Ok or a ModelError, never a panic.
    #[test]
    fn random_bytes_never_panic_the_header_path(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        assert_model_error_or_ok(&bytes);
    }

    /// A random declared length over random JSON-ish text.
    #[test]
    fn random_length_prefixes_never_panic(len in any::<u64>(), body in "[{}\\[\\]\":,a-zA-Z0-9_ ]{0,200}") {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(body.as_bytes());
        assert_model_error_or_ok(&bytes);
    }

    /// A valid file with bytes flipped, truncated or extended.
    #[test]
    fn mutated_valid_files_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        extra in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut bytes = valid_model();
        for (at, b) in flips {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        } else {
            bytes.extend_from_slice(&extra);
        }
        assert_model_error_or_ok(&bytes);
    }

    /// Header text with numbers swapped for extreme ones.
    #[test]
    fn extreme_numbers_in_a_header_never_panic(
        a in any::<u64>(), b in any::<u64>(), dim in any::<u64>(), dtype in "(F32|F16|BF16|F64|I64|BOOL|U8|F8_E4M3|X)"
    ) {
        let header = format!(r#"{{"w":{{"dtype":"{dtype}","shape":[{dim}],"data_offsets":[{a},{b}]}}}}"#);
        assert_model_error_or_ok(&file_with_header(header.as_bytes(), &[0u8; 16]));
    }
}
