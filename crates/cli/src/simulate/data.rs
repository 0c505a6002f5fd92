//! The simulation's data: load the dataset, split off the global test set,
//! give every client its non-IID share (STADLE's sel_prob/def_prob rule),
//! and hold out a validation slice of each share for the metrics the
//! client reports.

use anyhow::{bail, Context, Result};
use fedstep_trainer::{
    bundled_digits, federated_split, load_mnist_idx, shuffle_labels, train_test_split, ClientSpec,
    Dataset,
};
use serde::Serialize;

use super::args::{DataSource, Settings};
use super::classes::default_groups;

/// One simulated client's data and role.
#[derive(Debug, Clone)]
pub struct ClientShare {
    pub id: String,
    pub spec: ClientSpec,
    /// What it trains on.
    pub train: Dataset,
    /// Held out from its own share: the metrics it reports are measured
    /// here, so a client with bad labels reports bad numbers.
    pub validation: Dataset,
    /// The client's own test distribution: the same sel_prob/def_prob rule
    /// applied to the held-out global test split (personalized models are
    /// judged here). Never trained on.
    pub test: Dataset,
    pub noisy: bool,
    pub byzantine: bool,
}

#[derive(Debug, Clone)]
pub struct SimData {
    pub name: String,
    /// The global training split (the centralized bound trains on it).
    pub train: Dataset,
    /// The global test split: every headline accuracy is measured here.
    pub test: Dataset,
    pub clients: Vec<ClientShare>,
}

/// For report.json: who holds what.
#[derive(Debug, Clone, Serialize)]
pub struct ShareSummary {
    pub client_id: String,
    pub classes: Vec<u8>,
    pub train_examples: usize,
    pub validation_examples: usize,
    /// Size of the client's own test distribution.
    pub test_examples: usize,
    pub class_counts: Vec<usize>,
    pub noisy: bool,
    pub byzantine: bool,
}

impl ClientShare {
    pub fn summary(&self) -> ShareSummary {
        ShareSummary {
            client_id: self.id.clone(),
            classes: self.spec.classes.clone(),
            train_examples: self.train.len(),
            validation_examples: self.validation.len(),
            test_examples: self.test.len(),
            class_counts: self.train.class_counts(),
            noisy: self.noisy,
            byzantine: self.byzantine,
        }
    }
}

pub fn client_id(k: usize) -> String {
    format!("agent-{}", k + 1)
}

pub fn load(settings: &mut Settings) -> Result<SimData> {
    let (name, full) = match &settings.data {
        DataSource::Digits => (
            "UCI digits (bundled, 8x8)".to_string(),
            bundled_digits().context("loading the bundled digits")?,
        ),
        DataSource::Mnist { images, labels } => (
            format!("MNIST IDX ({})", images.display()),
            load_mnist_idx(images, labels).with_context(|| {
                format!(
                    "loading MNIST from {} and {}",
                    images.display(),
                    labels.display()
                )
            })?,
        ),
    };
    if settings.default_groups {
        settings.groups = default_groups(settings.clients(), full.classes());
    }
    for (k, group) in settings.groups.iter().enumerate() {
        if let Some(&c) = group.iter().find(|&&c| usize::from(c) >= full.classes()) {
            bail!(
                "--classes: class {c} of client {} does not exist (the dataset has classes 0-{})",
                k + 1,
                full.classes() - 1
            );
        }
    }
    let specs: Vec<ClientSpec> = settings
        .groups
        .iter()
        .map(|classes| ClientSpec {
            classes: classes.clone(),
            sel_prob: settings.sel_prob,
            def_prob: settings.def_prob,
        })
        .collect();
    let fd = federated_split(&full, &specs, settings.test_fraction, settings.seed)
        .context("splitting the data")?;
    let mut clients = Vec::with_capacity(fd.clients.len());
    for (k, c) in fd.clients.into_iter().enumerate() {
        let noisy = settings.is_noisy(k);
        // Noise is in the client's data, so it also shows in the client's
        // own validation slice (and hence in what it reports).
        let share = if noisy {
            shuffle_labels(&c.train, settings.seed.wrapping_add(k as u64))
        } else {
            c.train
        };
        let classes = super::classes::format_group(&c.spec.classes);
        if share.len() < 2 {
            bail!(
                "client {} ({classes}) received {} training samples: raise --sel-prob/--def-prob \
                 or give it other classes",
                k + 1,
                share.len()
            );
        }
        let (train, validation) = train_test_split(
            &share,
            settings.validation_fraction,
            settings.seed.wrapping_add(1000 + k as u64),
        )
        .with_context(|| format!("client {} ({classes}): validation split", k + 1))?;
        clients.push(ClientShare {
            id: client_id(k),
            spec: c.spec,
            train,
            validation,
            test: c.test,
            noisy,
            byzantine: settings.is_byzantine(k),
        });
    }
    Ok(SimData {
        name,
        train: fd.train,
        test: fd.test,
        clients,
    })
}
