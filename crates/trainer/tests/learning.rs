//! End-to-end checks that the trainer really learns, and does so
//! reproducibly. These guard the tuned defaults: if a change to the model,
//! the optimiser or the defaults breaks federation on the shipped data,
//! they fail.

use fedstep_trainer::{
    bundled_digits, default_clients, evaluate, federated_split, init_model, shuffle_labels,
    train_local, train_params, train_scaffold, train_test_split, MlpParams, MlpShape, TrainConfig,
    TrainerError,
};

fn average(models: &[Vec<u8>]) -> Vec<u8> {
    let params: Vec<MlpParams> = models
        .iter()
        .map(|m| MlpParams::from_safetensors(m).unwrap())
        .collect();
    let mut sum = params[0].tensors().clone();
    for p in &params[1..] {
        for (acc, t) in sum.iter_mut().zip(p.tensors()) {
            acc.iter_mut().zip(t).for_each(|(a, v)| *a += v);
        }
    }
    sum.iter_mut()
        .flatten()
        .for_each(|a| *a /= params.len() as f32);
    MlpParams::from_tensors(params[0].shape(), sum)
        .unwrap()
        .to_safetensors()
        .unwrap()
}

#[test]
fn centralised_training_learns_digits_and_noisy_labels_do_not() {
    let data = bundled_digits().unwrap();
    let (train, test) = train_test_split(&data, 0.25, 0).unwrap();
    let cfg = TrainConfig {
        local_epochs: 20,
        ..TrainConfig::default()
    };
    let init = init_model(data.dim(), cfg.hidden, data.classes(), cfg.seed).unwrap();
    let before = evaluate(&init, &test).unwrap();
    let out = train_local(&init, &train, &cfg, 1).unwrap();
    let after = evaluate(&out.model_bytes, &test).unwrap();
    assert!(before.accuracy < 0.3, "untrained model: {before:?}");
    assert!(after.accuracy > 0.9, "trained model: {after:?}");
    assert!(after.loss < before.loss / 2.0);
    assert_eq!(out.num_examples, train.len());
    assert!(
        out.metrics["accuracy"] > 0.9 && out.metrics["loss"] < 1.0,
        "{:?}",
        out.metrics
    );

    // Same budget on shuffled labels: nothing generalisable to learn.
    let noisy = train_local(&init, &shuffle_labels(&train, 3), &cfg, 1).unwrap();
    let noisy_eval = evaluate(&noisy.model_bytes, &test).unwrap();
    assert!(noisy_eval.accuracy < 0.3, "{noisy_eval:?}");
}

#[test]
fn training_is_bit_reproducible_and_seeded() {
    let data = bundled_digits().unwrap();
    let cfg = TrainConfig {
        local_epochs: 1,
        ..TrainConfig::default()
    };
    let init = init_model(data.dim(), cfg.hidden, data.classes(), 5).unwrap();
    let a = train_local(&init, &data, &cfg, 42).unwrap();
    let b = train_local(&init, &data, &cfg, 42).unwrap();
    assert_eq!(a, b);
    let c = train_local(&init, &data, &cfg, 43).unwrap();
    assert_ne!(a.model_bytes, c.model_bytes);
}

#[test]
fn rejects_models_that_do_not_fit_the_data_and_bad_configs() {
    let data = bundled_digits().unwrap();
    let mnist_sized = init_model(784, 64, 10, 0).unwrap();
    let err = train_local(&mnist_sized, &data, &TrainConfig::default(), 0).unwrap_err();
    assert!(matches!(err, TrainerError::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("784 inputs"), "{err}");
    assert!(evaluate(&mnist_sized, &data).is_err());

    let model = init_model(64, 8, 10, 0).unwrap();
    let bad = TrainConfig {
        learning_rate: f64::NAN,
        ..TrainConfig::default()
    };
    assert!(matches!(
        train_local(&model, &data, &bad, 0),
        Err(TrainerError::Config(_))
    ));
    let empty = data.subset(&[]).unwrap();
    assert!(train_local(&model, &empty, &TrainConfig::default(), 0).is_err());
    assert!(train_local(b"not a model", &data, &TrainConfig::default(), 0).is_err());
}

/// The headline claim of `fedstep simulate`, at the default settings and
/// seed: FedAvg over three skewed clients gets close to centralised
/// training; one skewed client alone does not.
#[test]
fn fedavg_of_non_iid_clients_approaches_centralised_accuracy() {
    let cfg = TrainConfig::default();
    let rounds = 10;
    let data = bundled_digits().unwrap();
    let fd = federated_split(&data, &default_clients(), 0.25, cfg.seed).unwrap();
    let init = init_model(data.dim(), cfg.hidden, data.classes(), cfg.seed).unwrap();

    let mut global = init.clone();
    for round in 1..=rounds {
        let updates: Vec<Vec<u8>> = fd
            .clients
            .iter()
            .enumerate()
            .map(|(k, c)| {
                train_local(&global, &c.train, &cfg, (round * 1000 + k) as u64)
                    .unwrap()
                    .model_bytes
            })
            .collect();
        global = average(&updates);
    }
    let budget = TrainConfig {
        local_epochs: rounds * cfg.local_epochs,
        ..cfg.clone()
    };
    let fed = evaluate(&global, &fd.test).unwrap().accuracy;
    let single_model = train_local(&init, &fd.clients[0].train, &budget, 1).unwrap();
    let single = evaluate(&single_model.model_bytes, &fd.test)
        .unwrap()
        .accuracy;
    let central_model = train_local(&init, &fd.train, &budget, 1).unwrap();
    let central = evaluate(&central_model.model_bytes, &fd.test)
        .unwrap()
        .accuracy;
    assert!(central > 0.9, "centralised {central}");
    assert!(
        fed >= 0.9 * central,
        "federated {fed} vs centralised {central}"
    );
    assert!(
        single <= 0.5 * central,
        "single {single} vs centralised {central}"
    );
    // The lone client is still good on its own distribution.
    let own = evaluate(&single_model.model_bytes, &fd.clients[0].test)
        .unwrap()
        .accuracy;
    assert!(own > 0.8, "single client on its own test data: {own}");
}

/// FedProx's pull: the larger μ, the closer the trained model stays to the
/// model it started from; μ = 0 is plain training bit for bit.
#[test]
fn proximal_term_keeps_local_models_near_the_global_one() {
    let data = bundled_digits().unwrap();
    let cfg = TrainConfig::default();
    let init = MlpParams::init(
        MlpShape {
            input: data.dim(),
            hidden: cfg.hidden,
            classes: data.classes(),
        },
        0,
    )
    .unwrap();
    let distance = |mu: f64| {
        let cfg = TrainConfig {
            proximal_mu: mu,
            ..cfg.clone()
        };
        let (p, _) = train_params(&init, &data, &cfg, 7).unwrap();
        p.tensors()
            .iter()
            .zip(init.tensors())
            .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)))
            .sum::<f64>()
            .sqrt()
    };
    let (d0, d1, d10) = (distance(0.0), distance(1.0), distance(10.0));
    assert!(d0 > d1 && d1 > d10 && d10 > 0.0, "{d0} {d1} {d10}");
    let bad = TrainConfig {
        proximal_mu: -1.0,
        ..cfg.clone()
    };
    assert!(matches!(
        train_params(&init, &data, &bad, 0),
        Err(TrainerError::Config(_))
    ));
}

/// SCAFFOLD with both variates at zero takes plain SGD's steps; its Δc_i
/// is then (x − y)/(K·η), the mean gradient it followed.
#[test]
fn scaffold_with_zero_variates_is_plain_sgd() {
    let data = bundled_digits().unwrap();
    let cfg = TrainConfig {
        local_epochs: 1,
        ..TrainConfig::default()
    };
    let shape = MlpShape {
        input: data.dim(),
        hidden: cfg.hidden,
        classes: data.classes(),
    };
    let init = MlpParams::init(shape, 0).unwrap();
    let zero = MlpParams::zeros(shape).unwrap();
    let (plain, _) = train_params(&init, &data, &cfg, 3).unwrap();
    let out = train_scaffold(&init, &data, &cfg, 3, &zero, &zero).unwrap();
    assert_eq!(out.trained, plain);
    assert_eq!(out.steps, data.len().div_ceil(cfg.batch_size));
    assert_eq!(out.client_variate, out.delta);
    let k_eta = out.steps as f64 * cfg.learning_rate;
    let (x, y, d) = (init.tensors(), plain.tensors(), out.delta.tensors());
    let want = (f64::from(x[3][0]) - f64::from(y[3][0])) / k_eta;
    assert!(
        (f64::from(d[3][0]) - want).abs() < 1e-4,
        "{} vs {want}",
        d[3][0]
    );
}
