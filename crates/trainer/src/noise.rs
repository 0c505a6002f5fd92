//! Label noise, for simulating a careless or malicious client whose update
//! the aggregation's quality weighting or robust combiners should discount.

use rand::seq::SliceRandom;

use crate::dataset::Dataset;
use crate::seed::{rng, Purpose};

/// The same samples with their labels randomly permuted. A permutation
/// (rather than fresh random labels) keeps the label histogram, so the
/// client looks normal by its metadata and only its learning signal is
/// destroyed.
pub fn shuffle_labels(data: &Dataset, seed: u64) -> Dataset {
    let mut labels = data.labels().to_vec();
    labels.shuffle(&mut rng(seed, Purpose::LabelShuffle, 0));
    data.with_labels(labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digits::bundled_digits;

    #[test]
    fn keeps_histogram_and_features_but_breaks_pairing() {
        let d = bundled_digits().unwrap();
        let s = shuffle_labels(&d, 1);
        assert_eq!(s.features(), d.features());
        assert_eq!(s.class_counts(), d.class_counts());
        let same = s
            .labels()
            .iter()
            .zip(d.labels())
            .filter(|(a, b)| a == b)
            .count();
        // About 10% agree by chance.
        assert!(same < d.len() / 5, "{same}");
        assert_eq!(s, shuffle_labels(&d, 1));
    }
}
