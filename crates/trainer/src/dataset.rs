//! The in-memory labelled dataset every other module works on.
//!
//! Features are stored row-major in one flat `Vec<f32>` because that is the
//! layout a minibatch tensor needs: building a batch is a handful of
//! `extend_from_slice` calls, with no per-sample allocation.

use crate::error::{Result, TrainerError};

/// A classification dataset with features already scaled to `[0, 1]`.
///
/// Fields are private so the invariants checked in [`Dataset::new`] (row
/// length, label range, finite features) hold for every value of this type;
/// the trainer relies on them instead of re-checking per batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u8>,
    dim: usize,
    classes: usize,
}

impl Dataset {
    /// Builds a dataset, rejecting inconsistent input up front so a bad
    /// loader shows up here rather than as a shape error deep in training.
    pub fn new(features: Vec<f32>, labels: Vec<u8>, dim: usize, classes: usize) -> Result<Self> {
        if dim == 0 {
            return Err(TrainerError::Dataset(
                "feature dimension must be > 0".into(),
            ));
        }
        if classes == 0 || classes > usize::from(u8::MAX) + 1 {
            return Err(TrainerError::Dataset(format!(
                "class count must be in 1..=256, got {classes}"
            )));
        }
        let expected = labels.len().checked_mul(dim).ok_or_else(|| {
            TrainerError::Dataset(format!(
                "{} samples x {dim} features overflows",
                labels.len()
            ))
        })?;
        if features.len() != expected {
            return Err(TrainerError::Dataset(format!(
                "{} feature values for {} samples of dimension {dim} (expected {expected})",
                features.len(),
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| usize::from(l) >= classes)
        {
            return Err(TrainerError::Dataset(format!(
                "sample {i} has label {l}, but there are only {classes} classes"
            )));
        }
        if let Some(i) = features.iter().position(|v| !v.is_finite()) {
            return Err(TrainerError::Dataset(format!(
                "sample {} feature {} is not finite",
                i / dim,
                i % dim
            )));
        }
        Ok(Self {
            features,
            labels,
            dim,
            classes,
        })
    }

    /// Row-major features, `len() * dim()` values.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// One label per sample, each `< classes()`.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Number of features per sample (the model's input width).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of classes (the model's output width). Kept even when some
    /// class has no sample, so every client of a federation builds the same
    /// architecture from its own, possibly skewed, data.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features of sample `i`.
    ///
    /// # Panics
    /// If `i >= len()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The samples at `indices`, in that order (repeats allowed). Used by
    /// splits and partitions, which decide membership by index.
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(TrainerError::Dataset(format!(
                    "subset index {i} out of range for {} samples",
                    self.len()
                )));
            }
            features.extend_from_slice(self.row(i));
            labels.push(self.labels[i]);
        }
        Ok(Self {
            features,
            labels,
            dim: self.dim,
            classes: self.classes,
        })
    }

    /// Samples per class, indexed by label; what a simulation prints to show
    /// how skewed each client's data is.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// Same samples, labels replaced by `labels`. Crate-internal: callers
    /// outside go through helpers that preserve the label range.
    pub(crate) fn with_labels(&self, labels: Vec<u8>) -> Self {
        debug_assert_eq!(labels.len(), self.labels.len());
        Self {
            features: self.features.clone(),
            labels,
            dim: self.dim,
            classes: self.classes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset::new(vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5], vec![0, 2, 1], 2, 3).unwrap()
    }

    #[test]
    fn rejects_inconsistent_input() {
        assert!(Dataset::new(vec![0.0; 5], vec![0, 1, 2], 2, 3).is_err());
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 3], 2, 3).is_err());
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 2], 0, 3).is_err());
        assert!(Dataset::new(vec![0.0, f32::NAN], vec![0], 2, 3).is_err());
    }

    #[test]
    fn subset_and_counts() {
        let d = tiny();
        let s = d.subset(&[2, 2, 0]).unwrap();
        assert_eq!(s.labels(), &[1, 1, 0]);
        assert_eq!(s.row(0), &[0.4, 0.5]);
        assert_eq!(s.class_counts(), vec![1, 2, 0]);
        assert!(d.subset(&[3]).is_err());
    }
}
