//! Which classes each simulated client prefers: parsing `--classes` and the
//! default grouping when only `--clients` is given.

use anyhow::{bail, Result};

/// Parses `"1,2,3;4,5,6;7,8,9,0"`: groups separated by `;`, classes by `,`.
/// Whitespace is ignored; every group must be non-empty and may not repeat
/// a class. Range against the dataset is checked once it is loaded.
pub fn parse_groups(text: &str) -> Result<Vec<Vec<u8>>> {
    let mut groups = Vec::new();
    for (g, group) in text.split(';').enumerate() {
        let mut classes = Vec::new();
        for item in group.split(',') {
            let item = item.trim();
            if item.is_empty() {
                bail!(
                    "--classes {text:?}: group {} has an empty entry \
                     (expected e.g. \"1,2,3;4,5,6;7,8,9,0\")",
                    g + 1
                );
            }
            let class: u8 = item.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--classes {text:?}: `{item}` in group {} is not a class number (0-255)",
                    g + 1
                )
            })?;
            if classes.contains(&class) {
                bail!(
                    "--classes {text:?}: class {class} appears twice in group {}",
                    g + 1
                );
            }
            classes.push(class);
        }
        groups.push(classes);
    }
    Ok(groups)
}

/// The default preferences for `n` clients over `classes` labels.
///
/// Three or more clients take STADLE's three demo profiles in turn — the
/// labels in STADLE's order (1, 2, …, classes−1, 0) cut into three
/// contiguous groups, {1,2,3}, {4,5,6}, {7,8,9,0} for digits — so client 4
/// is like client 1, client 5 like client 2, and so on. One or two clients
/// split the labels between them.
///
/// Why repeat profiles rather than cut the labels into `n` disjoint
/// groups: quality weighting and robust combiners can only outweigh or
/// outvote a bad client if someone else holds similar data. With disjoint
/// groups the bad client is the only source of its classes, and every
/// aggregator that discounts it also discounts those classes (measured:
/// with `--classes "1,2;3,4;5,6,7;8,9,0" --noisy-clients 1`, quality
/// weighting loses to FedAvg on three seeds out of three).
pub fn default_groups(n: usize, classes: usize) -> Vec<Vec<u8>> {
    if n < 3 {
        return contiguous(n, classes);
    }
    let profiles = contiguous(3, classes);
    (0..n).map(|k| profiles[k % 3].clone()).collect()
}

/// The labels in STADLE's order cut into `n` contiguous groups, the larger
/// groups last; with more groups than labels, group k is label k mod
/// `classes`.
fn contiguous(n: usize, classes: usize) -> Vec<Vec<u8>> {
    let order: Vec<u8> = (1..classes)
        .chain(std::iter::once(0))
        .map(|c| c as u8)
        .collect();
    if n >= classes {
        return (0..n).map(|k| vec![order[k % classes]]).collect();
    }
    let (base, extra) = (classes / n, classes % n);
    let mut groups = Vec::with_capacity(n);
    let mut next = 0;
    for k in 0..n {
        let size = base + usize::from(k >= n - extra);
        groups.push(order[next..next + size].to_vec());
        next += size;
    }
    groups
}

/// `{1,2,3}` for tables and logs.
pub fn format_group(classes: &[u8]) -> String {
    let items: Vec<String> = classes.iter().map(u8::to_string).collect();
    format!("{{{}}}", items.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_stadle_demo_and_names_mistakes() {
        assert_eq!(
            parse_groups(" 1,2,3 ; 4,5,6;7,8,9,0").unwrap(),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 0]]
        );
        for (bad, want) in [
            ("1,2;;3", "group 2 has an empty entry"),
            ("1,x", "`x` in group 1"),
            ("1,2,2", "class 2 appears twice"),
            ("300", "`300`"),
            ("", "empty entry"),
        ] {
            let err = parse_groups(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn default_groups_match_the_demo_and_cover_every_class() {
        assert_eq!(
            default_groups(3, 10),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 0]]
        );
        assert_eq!(
            default_groups(5, 10),
            vec![
                vec![1, 2, 3],
                vec![4, 5, 6],
                vec![7, 8, 9, 0],
                vec![1, 2, 3],
                vec![4, 5, 6]
            ]
        );
        assert_eq!(
            default_groups(1, 10),
            vec![vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 0]]
        );
        assert_eq!(default_groups(2, 10)[1], vec![6, 7, 8, 9, 0]);
        assert_eq!(
            default_groups(4, 3),
            vec![vec![1], vec![2], vec![0], vec![1]]
        );
        assert_eq!(contiguous(12, 10)[10], vec![1]);
        for n in 1..=12 {
            let mut all: Vec<u8> = default_groups(n, 10).concat();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all, (0..10).collect::<Vec<u8>>(), "n = {n}");
        }
        assert_eq!(format_group(&[7, 8, 9, 0]), "{7,8,9,0}");
    }
}
