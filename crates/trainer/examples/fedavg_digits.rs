//! Proves the trainer's defaults make federation worthwhile on the bundled
//! digits: three non-IID clients averaged for 10 rounds versus one client
//! alone versus centralised training, all with the same epoch budget.
//!
//! Run: `cargo run --release -p fedstep-trainer --example fedavg_digits`
//! (optional args: rounds, local_epochs, learning_rate, batch_size, hidden,
//! seed).

use std::time::Instant;

use fedstep_trainer::{
    bundled_digits, default_clients, evaluate, federated_split, init_model, train_local, MlpParams,
    Result, TrainConfig,
};

/// Plain (unweighted) average of the clients' tensors, the simplest FedAvg.
fn average(models: &[Vec<u8>]) -> Result<Vec<u8>> {
    let params = models
        .iter()
        .map(|m| MlpParams::from_safetensors(m))
        .collect::<Result<Vec<_>>>()?;
    let shape = params[0].shape();
    let mut sum = params[0].tensors().clone();
    for p in &params[1..] {
        p.expect_shape(shape)?;
        for (acc, t) in sum.iter_mut().zip(p.tensors()) {
            acc.iter_mut().zip(t).for_each(|(a, v)| *a += v);
        }
    }
    let n = params.len() as f32;
    sum.iter_mut().flatten().for_each(|a| *a /= n);
    MlpParams::from_tensors(shape, sum)?.to_safetensors()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let defaults = TrainConfig::default();
    let rounds: usize = arg(0).map_or(10, |s| s.parse().expect("rounds"));
    let cfg = TrainConfig {
        local_epochs: arg(1).map_or(defaults.local_epochs, |s| s.parse().expect("local_epochs")),
        learning_rate: arg(2).map_or(defaults.learning_rate, |s| {
            s.parse().expect("learning_rate")
        }),
        batch_size: arg(3).map_or(defaults.batch_size, |s| s.parse().expect("batch_size")),
        hidden: arg(4).map_or(defaults.hidden, |s| s.parse().expect("hidden")),
        seed: arg(5).map_or(defaults.seed, |s| s.parse().expect("seed")),
        ..defaults.clone()
    };
    println!("{rounds} rounds, {cfg:?}");

    let start = Instant::now();
    let data = bundled_digits()?;
    let fd = federated_split(&data, &default_clients(), 0.25, cfg.seed)?;
    for (k, c) in fd.clients.iter().enumerate() {
        println!(
            "client {k} classes {:?}: {} train / {} test samples, per class {:?}",
            c.spec.classes,
            c.train.len(),
            c.test.len(),
            c.train.class_counts()
        );
    }
    let init = init_model(data.dim(), cfg.hidden, data.classes(), cfg.seed)?;

    // Federated: every client starts each round from the global model.
    let mut global = init.clone();
    let mut client_round_secs = Vec::new();
    for round in 1..=rounds {
        let mut updates = Vec::new();
        for (k, c) in fd.clients.iter().enumerate() {
            let t = Instant::now();
            let out = train_local(&global, &c.train, &cfg, (round * 1000 + k) as u64)?;
            client_round_secs.push(t.elapsed().as_secs_f64());
            updates.push(out.model_bytes);
        }
        global = average(&updates)?;
        let e = evaluate(&global, &fd.test)?;
        println!(
            "round {round:2}: global test accuracy {:.4} loss {:.4}",
            e.accuracy, e.loss
        );
    }
    let federated = evaluate(&global, &fd.test)?;

    // Same epoch budget without averaging: rounds x local_epochs epochs.
    let budget = TrainConfig {
        local_epochs: rounds * cfg.local_epochs,
        ..cfg.clone()
    };
    let single = train_local(&init, &fd.clients[0].train, &budget, 1)?;
    let single_eval = evaluate(&single.model_bytes, &fd.test)?;
    let central = train_local(&init, &fd.train, &budget, 1)?;
    let central_eval = evaluate(&central.model_bytes, &fd.test)?;

    let mean_ms = 1000.0 * client_round_secs.iter().sum::<f64>() / client_round_secs.len() as f64;
    println!(
        "--- test accuracy on the global test split ({} samples)",
        fd.test.len()
    );
    println!("federated (3 clients, FedAvg): {:.4}", federated.accuracy);
    println!(
        "single agent {{1,2,3}}:          {:.4}",
        single_eval.accuracy
    );
    println!(
        "centralised:                   {:.4}",
        central_eval.accuracy
    );
    println!(
        "federated/centralised = {:.3} (target >= 0.9), single/centralised = {:.3} (target <= 0.5)",
        federated.accuracy / central_eval.accuracy,
        single_eval.accuracy / central_eval.accuracy
    );
    println!(
        "train_local per client-round: mean {mean_ms:.1} ms; total wall time {:.2} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
