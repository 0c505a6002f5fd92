//! Train/test splits and the non-IID client partition used by simulations.
//!
//! The partition follows STADLE's simulation recipe: each client "prefers"
//! some classes. A training sample goes to client k with probability
//! `sel_prob` if its label is one of k's classes and `def_prob` otherwise,
//! drawn independently per client, so a sample may land on several clients
//! or none. With the defaults every client sees mostly three or four digits
//! and only a trickle of the rest, which is what makes federation pay off.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::dataset::Dataset;
use crate::error::{Result, TrainerError};
use crate::seed::{rng, Purpose};

/// Shuffled, stratified train/test split: every class keeps (up to
/// rounding) the same share in both halves, so a small test set is not
/// accidentally missing a digit. Returns `(train, test)`.
pub fn train_test_split(
    data: &Dataset,
    test_fraction: f64,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(TrainerError::Split(format!(
            "test fraction must be in (0, 1), got {test_fraction}"
        )));
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); data.classes()];
    for (i, &l) in data.labels().iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    let mut train = Vec::with_capacity(data.len());
    let mut test = Vec::new();
    for (class, members) in by_class.iter_mut().enumerate() {
        members.shuffle(&mut rng(seed, Purpose::TrainTestSplit, class as u64));
        let n_test = (members.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&members[..n_test]);
        train.extend_from_slice(&members[n_test..]);
    }
    // Interleave classes again; training reshuffles anyway, but a class-sorted
    // dataset is a trap for anyone who takes a prefix.
    train.shuffle(&mut rng(seed, Purpose::TrainTestSplit, u64::MAX));
    test.shuffle(&mut rng(seed, Purpose::TrainTestSplit, u64::MAX - 1));
    if train.is_empty() || test.is_empty() {
        return Err(TrainerError::Split(format!(
            "{} samples are too few for a {test_fraction} test split",
            data.len()
        )));
    }
    Ok((data.subset(&train)?, data.subset(&test)?))
}

/// Which data one simulated client receives.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSpec {
    /// The client's preferred ("selected") labels.
    pub classes: Vec<u8>,
    /// Probability of taking a sample whose label is in `classes`.
    pub sel_prob: f64,
    /// Probability of taking any other sample.
    pub def_prob: f64,
}

impl ClientSpec {
    fn validate(&self, index: usize, classes: usize) -> Result<()> {
        for (name, p) in [("sel_prob", self.sel_prob), ("def_prob", self.def_prob)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(TrainerError::Split(format!(
                    "client {index}: {name} must be in [0, 1], got {p}"
                )));
            }
        }
        if let Some(&c) = self.classes.iter().find(|&&c| usize::from(c) >= classes) {
            return Err(TrainerError::Split(format!(
                "client {index}: class {c} does not exist (dataset has {classes} classes)"
            )));
        }
        Ok(())
    }
}

/// The three STADLE demo agents: digits {1,2,3}, {4,5,6}, {7,8,9,0}; each
/// takes all of its own digits and 5% of the others.
pub fn default_clients() -> Vec<ClientSpec> {
    [vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 0]]
        .into_iter()
        .map(|classes| ClientSpec {
            classes,
            sel_prob: 1.0,
            def_prob: 0.05,
        })
        .collect()
}

/// Sample indices per client under the non-IID rule. Client k's draws use
/// their own random stream, so adding a client leaves the others' data
/// unchanged.
pub fn partition_indices(
    data: &Dataset,
    clients: &[ClientSpec],
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    partition_with(data, clients, seed, Purpose::PartitionTrain)
}

/// [`partition_indices`] materialised as datasets.
pub fn partition(data: &Dataset, clients: &[ClientSpec], seed: u64) -> Result<Vec<Dataset>> {
    partition_indices(data, clients, seed)?
        .iter()
        .map(|idx| data.subset(idx))
        .collect()
}

fn partition_with(
    data: &Dataset,
    clients: &[ClientSpec],
    seed: u64,
    purpose: Purpose,
) -> Result<Vec<Vec<usize>>> {
    clients
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            spec.validate(k, data.classes())?;
            let mut selected = vec![false; data.classes()];
            for &c in &spec.classes {
                selected[usize::from(c)] = true;
            }
            let mut rng = rng(seed, purpose, k as u64);
            Ok(data
                .labels()
                .iter()
                .enumerate()
                .filter(|&(_, &l)| {
                    let p = if selected[usize::from(l)] {
                        spec.sel_prob
                    } else {
                        spec.def_prob
                    };
                    // One draw per sample regardless of p keeps the stream
                    // aligned across different probability settings.
                    rng.random::<f64>() < p
                })
                .map(|(i, _)| i)
                .collect())
        })
        .collect()
}

/// One simulated client's data.
#[derive(Debug, Clone)]
pub struct ClientData {
    pub spec: ClientSpec,
    /// The client's share of the global training split.
    pub train: Dataset,
    /// The same rule applied to the global test split: a test set "from the
    /// client's own distribution", for judging personalised models.
    pub test: Dataset,
}

/// Everything a federated simulation needs from one dataset.
#[derive(Debug, Clone)]
pub struct FederatedData {
    /// Global training split; centralised baselines train on this.
    pub train: Dataset,
    /// Global test split; all headline accuracies are measured on this.
    pub test: Dataset,
    pub clients: Vec<ClientData>,
}

/// Splits `data` into train/test, then partitions both per client.
pub fn federated_split(
    data: &Dataset,
    clients: &[ClientSpec],
    test_fraction: f64,
    seed: u64,
) -> Result<FederatedData> {
    let (train, test) = train_test_split(data, test_fraction, seed)?;
    let train_parts = partition_with(&train, clients, seed, Purpose::PartitionTrain)?;
    let test_parts = partition_with(&test, clients, seed, Purpose::PartitionTest)?;
    let clients = clients
        .iter()
        .zip(train_parts.iter().zip(&test_parts))
        .map(|(spec, (tr, te))| {
            Ok(ClientData {
                spec: spec.clone(),
                train: train.subset(tr)?,
                test: test.subset(te)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(FederatedData {
        train,
        test,
        clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digits::bundled_digits;

    #[test]
    fn split_is_deterministic_stratified_and_disjoint() {
        let d = bundled_digits().unwrap();
        let (tr1, te1) = train_test_split(&d, 0.25, 7).unwrap();
        let (tr2, te2) = train_test_split(&d, 0.25, 7).unwrap();
        assert_eq!((&tr1, &te1), (&tr2, &te2));
        let (tr3, _) = train_test_split(&d, 0.25, 8).unwrap();
        assert_ne!(tr1, tr3);
        assert_eq!(tr1.len() + te1.len(), d.len());
        assert!((te1.len() as f64 - 0.25 * d.len() as f64).abs() < 10.0);
        for (c, (&n_test, &n_all)) in te1.class_counts().iter().zip(&d.class_counts()).enumerate() {
            let want = (n_all as f64 * 0.25).round() as usize;
            assert_eq!(n_test, want, "class {c}");
        }
        // Disjoint: the digits set has no duplicate rows across halves that
        // we would confuse with leakage, so compare multisets of rows.
        let mut rows: Vec<Vec<u32>> = (0..tr1.len())
            .map(|i| tr1.row(i).iter().map(|v| v.to_bits()).collect())
            .chain((0..te1.len()).map(|i| te1.row(i).iter().map(|v| v.to_bits()).collect()))
            .collect();
        let mut all: Vec<Vec<u32>> = (0..d.len())
            .map(|i| d.row(i).iter().map(|v| v.to_bits()).collect())
            .collect();
        rows.sort();
        all.sort();
        assert_eq!(rows, all);
        assert!(train_test_split(&d, 1.0, 0).is_err());
        assert!(train_test_split(&d, f64::NAN, 0).is_err());
    }

    #[test]
    fn zero_def_prob_keeps_only_selected_classes() {
        let d = bundled_digits().unwrap();
        let clients: Vec<ClientSpec> = default_clients()
            .into_iter()
            .map(|c| ClientSpec { def_prob: 0.0, ..c })
            .collect();
        let parts = partition(&d, &clients, 3).unwrap();
        for (spec, part) in clients.iter().zip(&parts) {
            let counts = part.class_counts();
            for (c, &n) in counts.iter().enumerate() {
                let selected = spec.classes.contains(&(c as u8));
                // sel_prob 1.0: every sample of a selected class, nothing else.
                assert_eq!(n, if selected { d.class_counts()[c] } else { 0 });
            }
        }
    }

    #[test]
    fn default_rule_is_skewed_deterministic_and_independent_per_client() {
        let d = bundled_digits().unwrap();
        let clients = default_clients();
        let a = partition_indices(&d, &clients, 11).unwrap();
        assert_eq!(a, partition_indices(&d, &clients, 11).unwrap());
        assert_ne!(a, partition_indices(&d, &clients, 12).unwrap());
        // Client 0's draws do not depend on the other clients.
        assert_eq!(a[0], partition_indices(&d, &clients[..1], 11).unwrap()[0]);
        let counts = d.subset(&a[0]).unwrap().class_counts();
        let others: usize = [0, 4, 5, 6, 7, 8, 9].iter().map(|&c| counts[c]).sum();
        let expected = 0.05 * (d.len() - 182 - 177 - 183) as f64;
        assert!(
            (others as f64 - expected).abs() < 25.0,
            "{others} vs {expected}"
        );
        assert_eq!(counts[1] + counts[2] + counts[3], 182 + 177 + 183);
    }

    #[test]
    fn federated_split_partitions_test_split_with_the_same_rule() {
        let d = bundled_digits().unwrap();
        let clients: Vec<ClientSpec> = default_clients()
            .into_iter()
            .map(|c| ClientSpec { def_prob: 0.0, ..c })
            .collect();
        let fd = federated_split(&d, &clients, 0.25, 5).unwrap();
        assert_eq!(fd.clients.len(), 3);
        for c in &fd.clients {
            for (label, &n) in c.test.class_counts().iter().enumerate() {
                assert_eq!(n > 0, c.spec.classes.contains(&(label as u8)));
            }
        }
        let total: usize = fd.clients.iter().map(|c| c.train.len()).sum();
        assert_eq!(total, fd.train.len());
    }

    #[test]
    fn rejects_bad_specs() {
        let d = bundled_digits().unwrap();
        let bad_class = ClientSpec {
            classes: vec![10],
            sel_prob: 1.0,
            def_prob: 0.0,
        };
        assert!(partition(&d, &[bad_class], 0)
            .unwrap_err()
            .to_string()
            .contains("class 10"));
        let bad_p = ClientSpec {
            classes: vec![1],
            sel_prob: 1.5,
            def_prob: 0.0,
        };
        assert!(partition(&d, &[bad_p], 0)
            .unwrap_err()
            .to_string()
            .contains("sel_prob"));
    }
}
