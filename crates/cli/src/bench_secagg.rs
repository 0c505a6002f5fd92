//! `fedstep bench secagg`: what SecAgg+ (issue #18, `fedstep-secagg`)
//! costs a round, against plain FedAvg over the same vectors, in one run.
//!
//! Every participant runs in this process, one after another, so each
//! figure is one participant's own work: a client's four phases (keys,
//! sealed shares, quantize and mask, reveal shares) and the aggregator's
//! (checking and relaying messages, summing the masked vectors as they
//! arrive, reconstructing the dropped clients' masks and removing them,
//! dequantizing). Plain FedAvg is the weighted mean of the same f32 vectors,
//! also summed as they arrive. Bytes are what crosses the network: messages
//! as the JSON they travel as, vectors as ring elements of the field's width
//! (plain: 4 bytes an f32). The global model a client downloads is the same
//! in both and left out. `within_bound` checks the unmasked mean against
//! the plaintext weighted mean within the quantization bound.
//!
//! The masked vectors are also written as the files clients upload
//! (`fedstep_secagg::masked_file`), and the aggregator's sum is redone from
//! them the way a shard task does it (`masked_sum`, block by block):
//! `aggregator_files_s` against reading those files once
//! (`files_read_floor_s`), and `files_identical` (the same mean, bit for
//! bit, or the bench fails).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fedstep_secagg::masked_file::{encode, MaskedFile};
use fedstep_secagg::masked_sum::mean_over_range;
use fedstep_secagg::messages::Unmask;
use fedstep_secagg::params::default_neighbours;
use fedstep_secagg::{Client, ClientId, QuantizationConfig, RoundId, RoundParams, Server};
use rand_core::OsRng;

use crate::bench::parse_count;

#[derive(clap::Args)]
pub struct SecaggBench {
    /// Clients in the round.
    #[arg(long, default_value_t = 8)]
    clients: u32,
    /// Parameters per update (suffixes k, M, G allowed: 1M).
    #[arg(long, default_value = "1M", value_parser = parse_count)]
    params: u64,
    /// Neighbours per client, k [default: 2⌈log₂ n⌉, at most n − 1].
    #[arg(long)]
    neighbours: Option<usize>,
    /// Clients that drop after sharing keys, so the aggregator recovers
    /// their pairwise masks from their neighbours' shares.
    #[arg(long, default_value_t = 0)]
    dropouts: u32,
    /// Quantization levels 2^q − 1 over the clip range.
    #[arg(long, default_value_t = 16)]
    quant_bits: u32,
}

/// The clip range of the synthetic values (they lie in [−1, 1]) and the
/// largest weight a client is given.
const CLIP: f32 = 1.0;
const MAX_WEIGHT: u64 = 100;

/// One client's deterministic synthetic update and weight.
fn input(client: u32, len: u64) -> (Vec<f32>, u64) {
    let values = (0..len)
        .map(|i| {
            let h = (i.wrapping_mul(2_654_435_761) ^ u64::from(client).wrapping_mul(97_531)) % 2001;
            h as f32 / 1000.0 - 1.0
        })
        .collect();
    (values, 1 + u64::from(client) * 37 % MAX_WEIGHT)
}

/// Time and bytes one side spent.
#[derive(Default)]
struct Cost {
    time: Duration,
    sent: u64,
    received: u64,
}

impl Cost {
    fn timed<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = f();
        self.time += started.elapsed();
        out
    }
}

fn json<T: serde::Serialize>(message: &T) -> String {
    serde_json::to_string(message).expect("messages serialize")
}

pub fn run(b: SecaggBench) -> Result<()> {
    let n = b.clients;
    if n < 3 {
        bail!("--clients must be at least 3 (SecAgg+ sums no fewer)");
    }
    if b.dropouts > n - 3 {
        bail!(
            "--dropouts {} leaves fewer than 3 of {n} clients",
            b.dropouts
        );
    }
    let len = b.params;
    let k = b
        .neighbours
        .unwrap_or_else(|| default_neighbours(n as usize));
    let quantization = QuantizationConfig::narrowest(CLIP, b.quant_bits, MAX_WEIGHT, n.into())
        .context("--quant-bits")?;
    let params = RoundParams {
        round: RoundId::new("bench/round-1").expect("a short round id"),
        neighbours: k,
        min_clients: 3,
        vector_len: len,
        quantization,
    };
    let element_bytes = u64::from(quantization.ring().bits()).div_ceil(8);
    let ids: Vec<ClientId> = (0..n).map(ClientId).collect();
    let inputs: BTreeMap<ClientId, (Vec<f32>, u64)> =
        ids.iter().map(|&id| (id, input(id.0, len))).collect();
    let dropped: Vec<ClientId> = ids[..b.dropouts as usize].to_vec();

    let mut clients: BTreeMap<ClientId, Cost> =
        ids.iter().map(|&id| (id, Cost::default())).collect();
    let mut server = Cost::default();
    let mut aggregator = Server::new(params.clone());

    // Phase 1: advertise keys.
    let mut phase1 = BTreeMap::new();
    for &id in &ids {
        let cost = clients.get_mut(&id).expect("every client has a cost");
        let (client, message) = cost.timed(|| {
            let client = Client::new(id, params.clone(), &mut OsRng);
            let message = json(&client.advertise());
            (client, message)
        });
        cost.sent += message.len() as u64;
        server.received += message.len() as u64;
        server.timed(|| aggregator.receive_advertise_keys_json(id, &message));
        phase1.insert(id, client);
    }
    let roster = server.timed(|| aggregator.close_advertise_keys())?;
    let roster_json = json(&roster);

    // Phase 2: share keys.
    let mut phase2 = BTreeMap::new();
    for (id, client) in phase1 {
        let cost = clients.get_mut(&id).expect("every client has a cost");
        cost.received += roster_json.len() as u64;
        server.sent += roster_json.len() as u64;
        let (shared, message) = cost.timed(|| {
            let (shared, message) = client.share_keys(&roster, &mut OsRng)?;
            anyhow::Ok((shared, json(&message)))
        })?;
        cost.sent += message.len() as u64;
        server.received += message.len() as u64;
        server.timed(|| aggregator.receive_share_keys_json(id, &message));
        phase2.insert(id, shared);
    }
    let forwarded = server.timed(|| aggregator.close_share_keys())?;

    // Phase 3: masked inputs; the dropouts go silent here. The aggregator
    // sums each masked vector as it arrives and keeps only the sum.
    let ring = quantization.ring();
    let mut masked_sum = vec![0u64; len as usize];
    let upload_dir = tempfile::tempdir().context("a directory for the masked files")?;
    let masked_path = |id: ClientId| {
        upload_dir
            .path()
            .join(format!("masked-{}.safetensors", id.0))
    };
    let mut phase3 = BTreeMap::new();
    for f in forwarded {
        let message = json(&f);
        server.sent += message.len() as u64;
        if dropped.contains(&f.to) {
            continue;
        }
        let cost = clients.get_mut(&f.to).expect("every client has a cost");
        cost.received += message.len() as u64;
        let shared = phase2.remove(&f.to).expect("a forward for each sharer");
        let (values, weight) = &inputs[&f.to];
        let (holder, message, vector) = cost.timed(|| {
            let (holder, message, vector) = shared.mask_input(&f, values, *weight)?;
            anyhow::Ok((holder, json(&message), vector))
        })?;
        let vector_bytes = len * element_bytes;
        cost.sent += message.len() as u64 + vector_bytes;
        server.received += message.len() as u64 + vector_bytes;
        // The upload, as the file a shard task reads (not timed: the
        // network's, not the client's work).
        let file = encode(&vector, ring).context("encoding a masked file")?;
        std::fs::write(masked_path(f.to), file)?;
        server.timed(|| {
            aggregator.receive_masked_input_json(f.to, &message);
            ring.add_assign(&mut masked_sum, &vector);
        });
        phase3.insert(f.to, holder);
    }
    let requests = server.timed(|| aggregator.close_masked_input())?;

    // Phase 4: unmask.
    for request in &requests {
        let message = json(request);
        server.sent += message.len() as u64;
        let cost = clients
            .get_mut(&request.to)
            .expect("every client has a cost");
        cost.received += message.len() as u64;
        let answer =
            cost.timed(|| anyhow::Ok(json::<Unmask>(&phase3[&request.to].unmask(request)?)))?;
        cost.sent += answer.len() as u64;
        server.received += answer.len() as u64;
        server.timed(|| aggregator.receive_unmask_json(request.to, &answer));
    }
    let recovered = server.timed(|| aggregator.close_unmask())?;
    let mean = server.timed(|| anyhow::Ok(recovered.mean(&recovered.unmask(&masked_sum)?)))?;

    // The aggregator's sum again, from the uploaded files as a shard task
    // reads them (masked_sum.rs: in blocks, nothing held but a block),
    // beside reading those files once.
    let started = Instant::now();
    for id in &recovered.summed_clients {
        std::hint::black_box(std::fs::read(masked_path(*id))?);
    }
    let files_read_floor = started.elapsed();
    let started = Instant::now();
    let mut files = BTreeMap::new();
    for id in &recovered.summed_clients {
        let input = fedstep_core::Input::file(masked_path(*id));
        let file = MaskedFile::open(input, ring, len, &fedstep_core::Limits::default())?;
        files.insert(*id, file);
    }
    let mut from_files = vec![f32::NAN; len as usize];
    mean_over_range(&files, &recovered, 0..len, |start, block| {
        let start = start as usize;
        from_files[start..start + block.len()].copy_from_slice(block);
        Ok(())
    })?;
    let files_aggregate = started.elapsed();
    let files_identical = from_files
        .iter()
        .zip(&mean)
        .all(|(f, m)| f.to_bits() == m.to_bits());
    if !aggregator.exclusions().is_empty() {
        bail!(
            "honest clients were excluded: {:?}",
            aggregator.exclusions()
        );
    }

    // Plain FedAvg over the same survivors' vectors, summed as they arrive.
    let survivors: Vec<&(Vec<f32>, u64)> = ids
        .iter()
        .filter(|id| !dropped.contains(id))
        .map(|id| &inputs[id])
        .collect();
    let started = Instant::now();
    let mut plain_sum = vec![0f64; len as usize];
    let mut plain_weight = 0u64;
    for (values, weight) in &survivors {
        for (acc, x) in plain_sum.iter_mut().zip(values) {
            *acc += *weight as f64 * f64::from(*x);
        }
        plain_weight += weight;
    }
    let plain_mean: Vec<f64> = plain_sum.iter().map(|s| s / plain_weight as f64).collect();
    let plain_aggregate = started.elapsed();

    let error = mean
        .iter()
        .zip(&plain_mean)
        .map(|(m, p)| (f64::from(*m) - p).abs())
        .fold(0.0, f64::max);
    // The bound is on the mean before it is rounded to f32 for the output.
    let bound = quantization.error_bound() + f64::from(CLIP) * f64::from(f32::EPSILON);

    let active: Vec<&Cost> = clients
        .iter()
        .filter(|(id, _)| !dropped.contains(id))
        .map(|(_, c)| c)
        .collect();
    let per_client =
        |f: fn(&Cost) -> f64| active.iter().map(|c| f(c)).sum::<f64>() / active.len() as f64;
    let client_s = per_client(|c| c.time.as_secs_f64());
    let client_sent = per_client(|c| c.sent as f64);
    let client_received = per_client(|c| c.received as f64);
    let plain_upload = (len * 4) as f64;
    let plain_in = plain_upload * survivors.len() as f64;
    let plain_s = plain_aggregate.as_secs_f64();

    println!("clients: {n}");
    println!("params: {len}");
    println!("neighbours: {k}");
    println!("threshold: {}", aggregator.threshold());
    println!("dropouts: {}", b.dropouts);
    println!("field_bits: {}", quantization.ring().bits());
    println!("client_s: {client_s:.4}");
    println!("client_sent_bytes: {client_sent:.0}");
    println!("client_received_bytes: {client_received:.0}");
    println!("client_sent_ratio: {:.3}", client_sent / plain_upload);
    println!("aggregator_s: {:.4}", server.time.as_secs_f64());
    println!("aggregator_received_bytes: {}", server.received);
    println!("aggregator_sent_bytes: {}", server.sent);
    println!("plain_aggregator_s: {plain_s:.4}");
    println!(
        "aggregator_time_ratio: {:.2}",
        server.time.as_secs_f64() / plain_s
    );
    println!(
        "aggregator_received_ratio: {:.3}",
        server.received as f64 / plain_in
    );
    println!("aggregator_files_s: {:.4}", files_aggregate.as_secs_f64());
    println!("files_read_floor_s: {:.4}", files_read_floor.as_secs_f64());
    println!(
        "aggregator_files_ratio: {:.2}",
        files_aggregate.as_secs_f64() / files_read_floor.as_secs_f64()
    );
    println!("files_identical: {files_identical}");
    println!("max_error: {error:.3e}");
    println!("error_bound: {bound:.3e}");
    println!("within_bound: {}", error <= bound);
    if error > bound {
        bail!("the unmasked mean is {error:e} from the plaintext mean, past the bound {bound:e}");
    }
    if !files_identical {
        bail!("the mean summed from the masked files differs from the in-memory one");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_round_unmasks_within_the_bound_with_a_dropout() {
        run(SecaggBench {
            clients: 6,
            params: 1000,
            neighbours: None,
            dropouts: 1,
            quant_bits: 16,
        })
        .unwrap();
    }
}
