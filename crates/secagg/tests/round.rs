//! Whole rounds of SecAgg+ between one server and n clients, with drops,
//! faults and malformed messages injected between the phases.

use std::collections::BTreeMap;

use fedstep_secagg::client::{Client, ClientError, MaskedClient};
use fedstep_secagg::ids::{ClientId, RoundId, MAX_REASON_LEN};
use fedstep_secagg::masked_file::{encode, MaskedFile, MaskedFileError, TENSOR};
use fedstep_secagg::masked_sum::{mean_over_range, SumError};
use fedstep_secagg::messages::{MaskedInput, ShareKeys, Unmask, UnmaskRequest};
use fedstep_secagg::params::RoundParams;
use fedstep_secagg::quantize::QuantizationConfig;
use fedstep_secagg::recovered::RecoveredMasks;
use fedstep_secagg::server::{Exclusion, Phase, RoundError, Server};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// JSON messages with the sender the transport vouches for.
type Inbox = Vec<(ClientId, String)>;

/// Edits one phase's inbox.
type Hook<'a> = Box<dyn FnMut(&mut Inbox) + 'a>;

/// Edits the messages of each phase before the server sees them.
#[derive(Default)]
struct Hooks<'a> {
    advertise: Option<Hook<'a>>,
    share: Option<Hook<'a>>,
    masked: Option<Hook<'a>>,
    unmask: Option<Hook<'a>>,
}

fn apply(hook: &mut Option<Hook<'_>>, inbox: &mut Inbox) {
    if let Some(h) = hook {
        h(inbox);
    }
}

struct Outcome {
    result: Result<RecoveredMasks, RoundError>,
    exclusions: Vec<Exclusion>,
    /// Each client's input and weight.
    inputs: BTreeMap<ClientId, (Vec<f32>, u64)>,
    /// Each phase-3 sender's masked vector.
    masked: BTreeMap<ClientId, Vec<u64>>,
    /// The clients after phase 3, to ask for more.
    holders: BTreeMap<ClientId, MaskedClient>,
    requests: Vec<UnmaskRequest>,
    params: RoundParams,
}

impl Outcome {
    fn recovered(&self) -> &RecoveredMasks {
        match &self.result {
            Ok(r) => r,
            Err(e) => panic!("round failed: {e}; exclusions {:?}", self.exclusions),
        }
    }

    fn masked_sum(&self) -> Vec<u64> {
        let r = self.recovered();
        let ring = self.params.quantization.ring();
        ring.sum(
            self.params.vector_len as usize,
            r.summed_clients.iter().map(|c| self.masked[c].as_slice()),
        )
    }

    /// The mean from the protocol against the plaintext weighted mean of
    /// the summed clients, within the quantization bound.
    fn check_mean(&self) {
        let r = self.recovered();
        let mean = r.mean(&r.unmask(&self.masked_sum()).unwrap());
        let clip = self.params.quantization.clip() as f64;
        let total: u64 = r.summed_clients.iter().map(|c| self.inputs[c].1).sum();
        assert_eq!(total, r.total_weight);
        for (i, m) in mean.iter().enumerate() {
            let exact: f64 = r
                .summed_clients
                .iter()
                .map(|c| self.inputs[c].1 as f64 * (self.inputs[c].0[i] as f64).clamp(-clip, clip))
                .sum::<f64>()
                / total as f64;
            let bound = self.params.quantization.error_bound() + 1e-5;
            assert!(
                (*m as f64 - exact).abs() <= bound,
                "coordinate {i}: {m} vs {exact} (bound {bound})"
            );
        }
    }

    fn excluded(&self, client: u32) -> &Exclusion {
        self.exclusions
            .iter()
            .find(|e| e.client == ClientId(client))
            .unwrap_or_else(|| panic!("client {client} not excluded: {:?}", self.exclusions))
    }
}

fn params(n: u32, k: usize, len: u64) -> RoundParams {
    RoundParams {
        round: RoundId::new("job-1/round-3").unwrap(),
        neighbours: k,
        min_clients: 3,
        vector_len: len,
        quantization: QuantizationConfig::new(1.0, 16, 32, 50, n as u64).unwrap(),
    }
}

fn run(n: u32, k: usize, len: u64, seed: u64, hooks: &mut Hooks) -> Outcome {
    run_with(n, params(n, k, len), seed, hooks)
}

fn run_with(n: u32, params: RoundParams, seed: u64, hooks: &mut Hooks) -> Outcome {
    let len = params.vector_len;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let ids: Vec<ClientId> = (0..n).map(|i| ClientId(10 + 3 * i)).collect();
    let mut inputs = BTreeMap::new();
    for &id in &ids {
        let values: Vec<f32> = (0..len)
            .map(|_| (rng.next_u32() as f32 / u32::MAX as f32) * 2.4 - 1.2)
            .collect();
        let weight = 1 + rng.next_u64() % 50;
        inputs.insert(id, (values, weight));
    }
    run_on(params, inputs, rng, hooks)
}

/// The four phases over the given clients' vectors and weights.
fn run_on(
    params: RoundParams,
    inputs: BTreeMap<ClientId, (Vec<f32>, u64)>,
    mut rng: ChaCha20Rng,
    hooks: &mut Hooks,
) -> Outcome {
    let mut server = Server::new(params.clone());
    let ids: Vec<ClientId> = inputs.keys().copied().collect();
    let outcome = |result, server: Server, masked, holders, requests| Outcome {
        result,
        exclusions: server.exclusions().to_vec(),
        inputs: inputs.clone(),
        masked,
        holders,
        requests,
        params: params.clone(),
    };

    // Phase 1.
    let clients: BTreeMap<ClientId, Client> = ids
        .iter()
        .map(|&id| (id, Client::new(id, params.clone(), &mut rng)))
        .collect();
    let mut inbox: Inbox = clients
        .values()
        .map(|c| (c.id(), serde_json::to_string(&c.advertise()).unwrap()))
        .collect();
    apply(&mut hooks.advertise, &mut inbox);
    for (sender, json) in &inbox {
        server.receive_advertise_keys_json(*sender, json);
    }
    let roster = match server.close_advertise_keys() {
        Ok(r) => r,
        Err(e) => return outcome(Err(e), server, BTreeMap::new(), BTreeMap::new(), Vec::new()),
    };

    // Phase 2.
    let mut shared = BTreeMap::new();
    let mut inbox = Inbox::new();
    for (id, client) in clients {
        if !roster.clients.iter().any(|k| k.client == id) {
            continue;
        }
        let (s, message) = client.share_keys(&roster, &mut rng).unwrap();
        inbox.push((id, serde_json::to_string(&message).unwrap()));
        shared.insert(id, s);
    }
    apply(&mut hooks.share, &mut inbox);
    for (sender, json) in &inbox {
        server.receive_share_keys_json(*sender, json);
    }
    let forwarded = match server.close_share_keys() {
        Ok(f) => f,
        Err(e) => return outcome(Err(e), server, BTreeMap::new(), BTreeMap::new(), Vec::new()),
    };

    // Phase 3.
    let mut masked = BTreeMap::new();
    let mut holders = BTreeMap::new();
    let mut inbox = Inbox::new();
    for f in forwarded {
        let client = shared.remove(&f.to).unwrap();
        let (values, weight) = &inputs[&f.to];
        let (holder, message, vector) = client.mask_input(&f, values, *weight).unwrap();
        inbox.push((f.to, serde_json::to_string(&message).unwrap()));
        masked.insert(f.to, vector);
        holders.insert(f.to, holder);
    }
    apply(&mut hooks.masked, &mut inbox);
    for (sender, json) in &inbox {
        server.receive_masked_input_json(*sender, json);
    }
    let requests = match server.close_masked_input() {
        Ok(r) => r,
        Err(e) => return outcome(Err(e), server, masked, holders, Vec::new()),
    };

    // Phase 4.
    let mut inbox = Inbox::new();
    for request in &requests {
        let answer = holders[&request.to].unmask(request).unwrap();
        inbox.push((request.to, serde_json::to_string(&answer).unwrap()));
    }
    apply(&mut hooks.unmask, &mut inbox);
    for (sender, json) in &inbox {
        server.receive_unmask_json(*sender, json);
    }
    let result = server.close_unmask();
    outcome(result, server, masked, holders, requests)
}

fn drop_clients(ids: &'static [u32]) -> Box<dyn FnMut(&mut Inbox)> {
    Box::new(move |inbox: &mut Inbox| inbox.retain(|(c, _)| !ids.contains(&c.0)))
}

fn edit<T: serde::de::DeserializeOwned + serde::Serialize>(
    inbox: &mut Inbox,
    client: u32,
    change: impl FnOnce(&mut T),
) {
    let entry = inbox.iter_mut().find(|(c, _)| c.0 == client).unwrap();
    let mut message: T = serde_json::from_str(&entry.1).unwrap();
    change(&mut message);
    entry.1 = serde_json::to_string(&message).unwrap();
}

#[test]
fn unmasked_mean_matches_the_plaintext_mean_over_many_seeds() {
    for seed in 0..12 {
        let n = 3 + (seed as u32 % 6);
        let o = run(n, 100, 37, seed, &mut Hooks::default());
        assert!(o.exclusions.is_empty(), "{:?}", o.exclusions);
        assert_eq!(o.recovered().summed_clients.len(), n as usize);
        o.check_mean();
    }
}

#[test]
fn sparse_graph_rounds_work() {
    for seed in 0..4 {
        let o = run(14, 4, 25, 100 + seed, &mut Hooks::default());
        assert!(o.exclusions.is_empty(), "{:?}", o.exclusions);
        o.check_mean();
        // Each client masked with and holds shares of only its 4 neighbours.
        assert!(o.holders.values().all(|h| h.holds_shares_of().count() == 4));
    }
}

#[test]
fn a_client_dropping_after_sharing_keys_has_its_pairwise_masks_recovered() {
    // 13 is client index 1; sparse and complete graphs.
    for k in [4, 100] {
        let mut hooks = Hooks {
            masked: Some(drop_clients(&[13])),
            ..Hooks::default()
        };
        let o = run(9, k, 30, 7, &mut hooks);
        let r = o.recovered();
        assert!(!r.summed_clients.contains(&ClientId(13)));
        assert_eq!(r.summed_clients.len(), 8);
        assert!(o
            .requests
            .iter()
            .any(|q| q.secret_key_of.contains(&ClientId(13))));
        o.check_mean();
    }
}

#[test]
fn a_client_dropping_after_its_masked_input_stays_in_the_sum() {
    for k in [4, 100] {
        let mut hooks = Hooks {
            unmask: Some(drop_clients(&[16])),
            ..Hooks::default()
        };
        let o = run(9, k, 30, 8, &mut hooks);
        assert!(o.recovered().summed_clients.contains(&ClientId(16)));
        o.check_mean();
    }
}

#[test]
fn drops_in_every_phase_together() {
    let mut hooks = Hooks {
        share: Some(drop_clients(&[10])),
        masked: Some(drop_clients(&[13])),
        unmask: Some(drop_clients(&[16])),
        ..Hooks::default()
    };
    // Complete graph of 12: degree 11, threshold 8, so each client can
    // lose 3 shareholders.
    let o = run(12, 100, 20, 9, &mut hooks);
    assert_eq!(o.recovered().summed_clients.len(), 10);
    o.check_mean();
}

#[test]
fn too_few_survivors_fail_naming_the_phase_and_the_missing_clients() {
    let mut hooks = Hooks {
        masked: Some(drop_clients(&[10, 13])),
        ..Hooks::default()
    };
    let o = run(4, 100, 5, 10, &mut hooks);
    let err = o.result.unwrap_err();
    assert_eq!(
        err,
        RoundError::TooFewClients {
            phase: Phase::MaskedInput,
            needed: 3,
            have: 2,
            missing: vec![ClientId(10), ClientId(13)]
        }
    );
    assert!(err.to_string().contains("masked_input"), "{err}");

    let mut hooks = Hooks {
        share: Some(drop_clients(&[10, 13])),
        ..Hooks::default()
    };
    let err = run(4, 100, 5, 10, &mut hooks).result.unwrap_err();
    assert!(
        matches!(
            err,
            RoundError::TooFewClients {
                phase: Phase::ShareKeys,
                have: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn too_few_shares_in_the_last_phase_cannot_reconstruct() {
    // Complete graph of 5: degree 4, threshold 3. Two of the five drop
    // after their masked input: each summed client has 2 shareholders left.
    let mut hooks = Hooks {
        unmask: Some(drop_clients(&[10, 13])),
        ..Hooks::default()
    };
    let o = run(5, 100, 5, 11, &mut hooks);
    let err = o.result.unwrap_err();
    assert!(
        matches!(
            err,
            RoundError::CannotReconstruct {
                have: 2,
                needed: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_malformed_key_excludes_its_client_and_the_round_goes_on() {
    let mut hooks = Hooks {
        advertise: Some(Box::new(|inbox: &mut Inbox| {
            // Wrong length: 31 bytes.
            let e = inbox.iter_mut().find(|(c, _)| c.0 == 13).unwrap();
            let mut v: serde_json::Value = serde_json::from_str(&e.1).unwrap();
            v["c_pk"] =
                serde_json::Value::String("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==".into());
            e.1 = v.to_string();
            // Low-order point (all zero).
            let e = inbox.iter_mut().find(|(c, _)| c.0 == 16).unwrap();
            let mut v: serde_json::Value = serde_json::from_str(&e.1).unwrap();
            v["s_pk"] =
                serde_json::Value::String("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into());
            e.1 = v.to_string();
        })),
        ..Hooks::default()
    };
    let o = run(8, 4, 12, 12, &mut hooks);
    let e = o.excluded(13);
    assert_eq!(e.phase, Phase::AdvertiseKeys);
    assert!(e.reason.contains("expected 32 bytes"), "{}", e.reason);
    assert!(
        o.excluded(16).reason.contains("low-order"),
        "{}",
        o.excluded(16).reason
    );
    assert_eq!(o.recovered().summed_clients.len(), 6);
    o.check_mean();
}

#[test]
fn a_wrong_size_vector_or_weight_excludes_its_client() {
    let mut hooks = Hooks {
        masked: Some(Box::new(|inbox: &mut Inbox| {
            edit::<MaskedInput>(inbox, 13, |m| m.vector_len += 1);
            edit::<MaskedInput>(inbox, 19, |m| m.weight = 51);
        })),
        ..Hooks::default()
    };
    let o = run(8, 100, 12, 13, &mut hooks);
    assert!(
        o.excluded(13).reason.contains("13 elements"),
        "{}",
        o.excluded(13).reason
    );
    assert_eq!(o.excluded(13).phase, Phase::MaskedInput);
    assert!(
        o.excluded(19).reason.contains("weight 51"),
        "{}",
        o.excluded(19).reason
    );
    // Both are treated as dropped after sharing: their masks are recovered.
    assert_eq!(o.recovered().summed_clients.len(), 6);
    o.check_mean();
}

#[test]
fn a_share_that_fails_to_decrypt_excludes_its_dealer() {
    let mut hooks = Hooks {
        share: Some(Box::new(|inbox: &mut Inbox| {
            edit::<ShareKeys>(inbox, 13, |m| m.shares[0].ciphertext.0[5] ^= 0x40);
        })),
        ..Hooks::default()
    };
    let o = run(8, 4, 12, 14, &mut hooks);
    let e = o.excluded(13);
    assert_eq!(e.phase, Phase::ShareKeys);
    assert!(e.reason.contains("failed to decrypt"), "{}", e.reason);
    assert!(!o.recovered().summed_clients.contains(&ClientId(13)));
    assert_eq!(o.recovered().summed_clients.len(), 7);
    o.check_mean();
}

#[test]
fn a_duplicate_message_excludes_its_sender() {
    let mut hooks = Hooks {
        share: Some(Box::new(|inbox: &mut Inbox| {
            let again = inbox.iter().find(|(c, _)| c.0 == 16).unwrap().clone();
            inbox.push(again);
        })),
        unmask: Some(Box::new(|inbox: &mut Inbox| {
            let again = inbox.iter().find(|(c, _)| c.0 == 19).unwrap().clone();
            inbox.push(again);
        })),
        ..Hooks::default()
    };
    let o = run(8, 100, 12, 15, &mut hooks);
    assert_eq!(o.excluded(16).phase, Phase::ShareKeys);
    assert!(o.excluded(16).reason.contains("duplicate"));
    assert_eq!(o.excluded(19).phase, Phase::Unmask);
    // 19's input stays in the sum; its shares are not used.
    assert!(o.recovered().summed_clients.contains(&ClientId(19)));
    assert!(!o.recovered().summed_clients.contains(&ClientId(16)));
    o.check_mean();
}

#[test]
fn a_share_for_a_non_neighbour_excludes_its_dealer() {
    let mut hooks = Hooks {
        share: Some(Box::new(|inbox: &mut Inbox| {
            edit::<ShareKeys>(inbox, 10, |m| {
                let mut extra = m.shares[0].clone();
                // With k = 4 of 10 clients, 5 clients are not neighbours of 10.
                let neighbours: Vec<u32> = m.shares.iter().map(|s| s.to.0).collect();
                let stranger = (0..10)
                    .map(|i| 10 + 3 * i)
                    .find(|c| *c != 10 && !neighbours.contains(c))
                    .unwrap();
                extra.to = ClientId(stranger);
                m.shares.push(extra);
            });
        })),
        ..Hooks::default()
    };
    let o = run(10, 4, 12, 16, &mut hooks);
    assert!(
        o.excluded(10).reason.contains("non-neighbour"),
        "{}",
        o.excluded(10).reason
    );
    assert_eq!(o.recovered().summed_clients.len(), 9);
    o.check_mean();
}

#[test]
fn messages_from_impostors_and_unrequested_shares_are_excluded() {
    let mut hooks = Hooks {
        masked: Some(Box::new(|inbox: &mut Inbox| {
            // 22 sends a message that claims to be 25's.
            let forged = inbox.iter().find(|(c, _)| c.0 == 25).unwrap().1.clone();
            inbox.retain(|(c, _)| c.0 != 22);
            inbox.push((ClientId(22), forged));
        })),
        unmask: Some(Box::new(|inbox: &mut Inbox| {
            edit::<Unmask>(inbox, 10, |m| {
                let mut wrong = m.self_mask_shares[0].clone();
                wrong.of_client = ClientId(10);
                m.self_mask_shares.push(wrong);
            });
        })),
        ..Hooks::default()
    };
    let o = run(8, 100, 12, 17, &mut hooks);
    assert!(o
        .excluded(22)
        .reason
        .contains("claims to be from client 25"));
    assert!(o.excluded(10).reason.contains("unrequested"));
    o.check_mean();
}

#[test]
fn every_reason_is_bounded() {
    let mut hooks = Hooks {
        masked: Some(Box::new(|inbox: &mut Inbox| {
            let e = inbox.iter_mut().find(|(c, _)| c.0 == 13).unwrap();
            e.1 = format!("{{\"client\": 13, \"{}\": 1}}", "x".repeat(5000));
        })),
        ..Hooks::default()
    };
    let o = run(6, 100, 4, 18, &mut hooks);
    assert!(o
        .excluded(13)
        .reason
        .starts_with("malformed masked_input message"));
    assert!(o
        .exclusions
        .iter()
        .all(|e| e.reason.chars().count() <= MAX_REASON_LEN));
    o.check_mean();
}

#[test]
fn unmasking_shards_equals_unmasking_the_whole() {
    let o = run(
        7,
        4,
        2500,
        19,
        &mut Hooks {
            masked: Some(drop_clients(&[13])),
            ..Hooks::default()
        },
    );
    let r = o.recovered();
    let sum = o.masked_sum();
    let whole = r.unmask(&sum).unwrap();
    let mut pieces = Vec::new();
    for (a, b) in [(0usize, 700usize), (700, 1024), (1024, 1025), (1025, 2500)] {
        pieces.extend(r.unmask_range(&sum[a..b], a as u64).unwrap());
    }
    assert_eq!(pieces, whole);
    assert!(r.unmask_range(&sum[..10], 2495).is_err());
    assert!(r.unmask(&sum[1..]).is_err());
    // The mean of a shard is the shard of the mean.
    assert_eq!(r.mean(&whole[1024..1100]), r.mean(&whole)[1024..1100]);
}

#[test]
fn a_masked_vector_looks_nothing_like_its_plaintext() {
    let len = 4000;
    let o = run(5, 100, len, 20, &mut Hooks::default());
    let q = o.params.quantization;
    let (values, weight) = &o.inputs[&ClientId(10)];
    let plain = q.quantize(values, *weight).unwrap();
    let masked = &o.masked[&ClientId(10)];
    let equal = plain.iter().zip(masked).filter(|(a, b)| a == b).count();
    // A uniform element of Z_2^32 equals a given value with chance 2^-32.
    assert_eq!(equal, 0);
    let correlation = pearson(
        &plain.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        &masked.iter().map(|&x| x as f64).collect::<Vec<_>>(),
    );
    // For independent samples |r| is about 1/sqrt(len) = 0.016.
    assert!(correlation.abs() < 0.08, "correlation {correlation}");
    // And the masked elements spread over the whole ring.
    let mean = masked.iter().map(|&x| x as f64).sum::<f64>() / len as f64;
    assert!((mean / 2f64.powi(32) - 0.5).abs() < 0.03, "mean {mean}");
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

#[test]
fn a_client_refuses_to_reveal_both_shares_of_one_client() {
    let o = run(5, 100, 4, 21, &mut Hooks::default());
    let holder = &o.holders[&ClientId(10)];
    let victim = holder.holds_shares_of().next().unwrap();
    let request = UnmaskRequest {
        to: ClientId(10),
        self_mask_of: vec![victim],
        secret_key_of: vec![victim],
    };
    assert_eq!(
        holder.unmask(&request),
        Err(ClientError::RevealBoth(vec![victim]))
    );
    // Asked for one kind only, it answers.
    let request = UnmaskRequest {
        to: ClientId(10),
        self_mask_of: vec![victim],
        secret_key_of: vec![],
    };
    assert_eq!(holder.unmask(&request).unwrap().self_mask_shares.len(), 1);
}

#[test]
fn recovered_masks_survive_a_serde_round_trip() {
    let o = run(
        8,
        4,
        50,
        22,
        &mut Hooks {
            masked: Some(drop_clients(&[13])),
            ..Hooks::default()
        },
    );
    let r = o.recovered();
    let json = serde_json::to_string(r).unwrap();
    let back: RecoveredMasks = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, r);
    assert_eq!(
        back.unmask(&o.masked_sum()).unwrap(),
        r.unmask(&o.masked_sum()).unwrap()
    );
    // A seed of the wrong length is refused.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["corrections"][0]["seed"] = serde_json::Value::String("AAAA".into());
    assert!(serde_json::from_value::<RecoveredMasks>(v).is_err());
}

/// An in-memory object, as S3 or a file would serve it.
struct Bytes(Vec<u8>);

impl fedstep_core::ByteSource for Bytes {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

fn open_masked(bytes: Vec<u8>, params: &RoundParams) -> Result<MaskedFile, MaskedFileError> {
    MaskedFile::open(
        fedstep_core::Input::new(std::sync::Arc::new(Bytes(bytes))),
        params.quantization.ring(),
        params.vector_len,
        &fedstep_core::Limits::default(),
    )
}

/// The phase-3 vectors as the files clients upload, summed by shards of
/// any cut, in blocks, with a client that dropped after sharing keys: the
/// mean is the in-memory protocol's, bit for bit, for 32- and 64-bit rings.
#[test]
fn masked_files_summed_by_ranges_give_the_protocols_mean() {
    let len = 300_000u64; // more than two blocks
    for (seed, bits) in [(7u64, 32u32), (8, 64)] {
        let mut hooks = Hooks {
            masked: Some(drop_clients(&[13])),
            ..Hooks::default()
        };
        let mut p = params(5, 100, len);
        p.quantization = QuantizationConfig::new(1.0, 16, bits, 50, 5).unwrap();
        let o = run_with(5, p.clone(), seed, &mut hooks);
        let r = o.recovered();
        let want = r.mean(&r.unmask(&o.masked_sum()).unwrap());
        let files: BTreeMap<ClientId, MaskedFile> = r
            .summed_clients
            .iter()
            .map(|c| {
                let bytes = encode(&o.masked[c], p.quantization.ring()).unwrap();
                (*c, open_masked(bytes, &p).unwrap())
            })
            .collect();
        for cuts in [vec![0, len], vec![0, 1, 131_073, 200_000, len]] {
            let mut got = vec![f32::NAN; len as usize];
            for range in cuts.windows(2) {
                mean_over_range(&files, r, range[0]..range[1], |start, block| {
                    got[start as usize..start as usize + block.len()].copy_from_slice(block);
                    Ok(())
                })
                .unwrap();
            }
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "ring {bits}, cuts {cuts:?}"
            );
        }
        // Leaving out a summed client, or adding one the masks were not
        // recovered for, is refused: the masks would not cancel.
        let mut fewer = files.clone();
        fewer.pop_first();
        let err = mean_over_range(&fewer, r, 0..len, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, SumError::WrongClients { .. }), "{err}");
        let err = mean_over_range(&files, r, 0..len + 1, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, SumError::Range(_)), "{err}");
    }
}

/// A masked file is a client's upload: anything but exactly the round's
/// one integer tensor is refused when it is opened (phase 3, while the
/// client can still be excluded), with a reason.
#[test]
fn a_masked_file_of_the_wrong_layout_is_refused_when_opened() {
    let p = params(3, 100, 10);
    let ring = p.quantization.ring();
    let good = encode(&[1; 10], ring).unwrap();
    assert!(open_masked(good.clone(), &p).is_ok());
    let tensor = |name: &str, dtype: safetensors::Dtype, shape: Vec<usize>| {
        let bytes = vec![0u8; shape.iter().product::<usize>() * dtype.bitsize() / 8];
        let view = safetensors::tensor::TensorView::new(dtype, shape, &bytes).unwrap();
        safetensors::serialize([(name, view)], None).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a float tensor",
            tensor(TENSOR, safetensors::Dtype::F32, vec![10]),
            "F32",
        ),
        (
            "a wider ring's dtype",
            tensor(TENSOR, safetensors::Dtype::U64, vec![10]),
            "U64",
        ),
        ("the wrong length", encode(&[1; 9], ring).unwrap(), "[9]"),
        (
            "two dimensions",
            tensor(TENSOR, safetensors::Dtype::U32, vec![2, 5]),
            "[2, 5]",
        ),
        (
            "another name",
            tensor("weights", safetensors::Dtype::U32, vec![10]),
            "weights",
        ),
        ("truncated", good[..good.len() - 3].to_vec(), "masked input"),
        (
            "not safetensors",
            b"plain text, no header".to_vec(),
            "masked input",
        ),
        // A refusal quotes a few names and dimensions, each cut short.
        (
            "a huge name",
            tensor(&"x".repeat(5000), safetensors::Dtype::U32, vec![10]),
            "xxx",
        ),
        (
            "many dimensions",
            tensor(TENSOR, safetensors::Dtype::U32, vec![1; 500]),
            "[1, 1",
        ),
    ];
    for (what, bytes, says) in cases {
        let Err(err) = open_masked(bytes, &p) else {
            panic!("{what} was accepted")
        };
        assert!(!err.is_unavailable(), "{what}");
        let reason = err.to_string();
        assert!(
            reason.contains(says) && reason.len() < 300,
            "{what}: {reason}"
        );
    }
}

/// A model file as a client would upload it: a BF16 and an F32 tensor the
/// aggregation averages, and an I64 step counter it carries.
fn model_file(bf16: &[f64], f32s: &[f64], steps: i64) -> Vec<u8> {
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    let mut a = vec![0u8; 2 * bf16.len()];
    fedstep_core::float::encode_from(Dtype::BF16, bf16, &mut a);
    let mut b = vec![0u8; 4 * f32s.len()];
    fedstep_core::float::encode_from(Dtype::F32, f32s, &mut b);
    let c: Vec<u8> = [steps].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "layer.weight",
            TensorView::new(Dtype::BF16, vec![bf16.len()], &a).unwrap(),
        ),
        (
            "layer.bias",
            TensorView::new(Dtype::F32, vec![f32s.len()], &b).unwrap(),
        ),
        ("steps", TensorView::new(Dtype::I64, vec![1], &c).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// From model files to model file: each client turns its local model into
/// the round's vector (local − global over the global model's float
/// tensors), the round masks it, the masked files are summed over two
/// ranges that cut a tensor, and the mean is added back to the global
/// model range by range. With one client dropped after phase 3, the result
/// is FedAvg (examples-weighted) of the local models within the
/// quantization bound, and the integer tensor is the global model's.
#[test]
fn local_models_through_the_protocol_give_fedavg_of_the_models() {
    use fedstep_core::model::read_header_from;
    use fedstep_secagg::model_vector::VectorLayout;

    let (nb, nf) = (3000usize, 1001usize);
    let mut rng = ChaCha20Rng::seed_from_u64(41);
    let mut uniform = |scale: f64| (rng.next_u32() as f64 / u32::MAX as f64 - 0.5) * scale;
    let gb: Vec<f64> = (0..nb).map(|_| uniform(2.0)).collect();
    let gf: Vec<f64> = (0..nf).map(|_| uniform(2.0)).collect();
    let global = Bytes(model_file(&gb, &gf, 7));
    let layout =
        VectorLayout::of(&read_header_from(&global, &fedstep_core::Limits::default()).unwrap());
    assert_eq!(layout.len(), (nb + nf) as u64);

    // Five clients: a neighbourhood of 4 needs 3 shares, so one may drop.
    let ids: Vec<ClientId> = (0..5).map(|i| ClientId(10 + 3 * i)).collect();
    let mut locals = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for (i, &id) in ids.iter().enumerate() {
        let lb: Vec<f64> = gb.iter().map(|g| g + uniform(0.5)).collect();
        let lf: Vec<f64> = gf.iter().map(|g| g + uniform(0.5)).collect();
        let file = Bytes(model_file(&lb, &lf, 100 + i as i64));
        let header = read_header_from(&file, &fedstep_core::Limits::default()).unwrap();
        let vector = layout.update_vector(&global, &file, &header).unwrap();
        let examples = 10 + 7 * i as u64;
        inputs.insert(id, (vector, examples));
        locals.insert(id, file);
    }
    let mut p = params(5, 100, layout.len());
    p.quantization = QuantizationConfig::new(1.0, 16, 32, 50, 5).unwrap();
    let mut hooks = Hooks {
        unmask: Some(drop_clients(&[13])),
        ..Hooks::default()
    };
    let o = run_on(
        p.clone(),
        inputs,
        ChaCha20Rng::seed_from_u64(42),
        &mut hooks,
    );
    let r = o.recovered();
    assert!(
        r.summed_clients.contains(&ClientId(13)),
        "dropped after phase 3: still summed"
    );

    let files: BTreeMap<ClientId, MaskedFile> = r
        .summed_clients
        .iter()
        .map(|c| {
            (
                *c,
                open_masked(encode(&o.masked[c], p.quantization.ring()).unwrap(), &p).unwrap(),
            )
        })
        .collect();
    let mut next = global.0.clone();
    let cut = 1234u64; // inside the first float tensor in file order
    for range in [0..cut, cut..layout.len()] {
        mean_over_range(&files, r, range, |start, mean| {
            layout
                .add_mean(&global, start, mean, |at, bytes| {
                    next[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
                    Ok(())
                })
                .map_err(std::io::Error::other)
        })
        .unwrap();
    }

    // The same model written whole, in file order, as an upload in parts
    // takes it: byte for byte what the ranges wrote.
    let sink = InOrderSink::new(global.0.len());
    fedstep_secagg::next_model::write_next_model(
        &global,
        global.0.len() as u64,
        &layout,
        &files,
        r,
        &sink,
    )
    .unwrap();
    assert!(
        sink.bytes() == next,
        "write_next_model differs from add_mean by ranges"
    );

    // FedAvg of the models themselves, element by element.
    let next = Bytes(next);
    let header = read_header_from(&next, &fedstep_core::Limits::default()).unwrap();
    let total: u64 = o.inputs.values().map(|(_, w)| w).sum();
    let bound = p.quantization.error_bound();
    for t in &header.tensors {
        let values = |src: &Bytes| -> Vec<f64> {
            let entry = read_header_from(src, &fedstep_core::Limits::default())
                .unwrap()
                .find(&t.name)
                .unwrap()
                .clone();
            let mut raw = vec![0u8; (entry.end - entry.start) as usize];
            fedstep_core::ByteSource::read_exact_at(src, &mut raw, entry.start).unwrap();
            if t.dtype == safetensors::Dtype::I64 {
                return raw
                    .chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect();
            }
            let mut out = vec![0f64; entry.elements()];
            fedstep_core::float::decode_into(t.dtype, &raw, &mut out);
            out
        };
        let got = values(&next);
        if t.dtype == safetensors::Dtype::I64 {
            assert_eq!(got, [7.0], "the global model's integers are kept");
            continue;
        }
        let mut want = vec![0f64; got.len()];
        for (id, file) in &locals {
            let w = o.inputs[id].1 as f64 / total as f64;
            for (acc, v) in want.iter_mut().zip(values(file)) {
                *acc += w * v;
            }
        }
        // BF16 stores 8 bits of mantissa: |x| < 2 rounds within 2^-8.
        let storage = if t.dtype == safetensors::Dtype::BF16 {
            1.0 / 128.0
        } else {
            1e-6
        };
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= bound + storage,
                "{} [{i}]: {g} vs FedAvg {w} (bound {bound} + {storage})",
                t.name
            );
        }
    }
}

/// A sink that takes writes only at the end of what it holds (as an upload
/// in parts does) and fails the test on any other.
struct InOrderSink {
    bytes: std::sync::Mutex<Vec<u8>>,
    len: usize,
}

impl InOrderSink {
    fn new(len: usize) -> InOrderSink {
        InOrderSink {
            bytes: std::sync::Mutex::new(Vec::with_capacity(len)),
            len,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let bytes = self.bytes.lock().unwrap().clone();
        assert_eq!(bytes.len(), self.len, "the whole model was written");
        bytes
    }
}

impl fedstep_core::bytes::ByteSink for InOrderSink {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let mut held = self.bytes.lock().unwrap();
        assert_eq!(offset as usize, held.len(), "a write out of file order");
        held.extend_from_slice(bytes);
        Ok(())
    }

    fn finish(self: Box<Self>) -> std::io::Result<()> {
        Ok(())
    }
}
