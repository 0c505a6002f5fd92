//! Which elements of one tensor become personal: the top fraction by
//! |local − global|, the lottery-ticket criterion FedSelect uses (the
//! parameters local data moved most are the ones that encode what is
//! particular to this client).

use super::schedule::check_fraction;

/// The shared mask of one tensor (1 shared, 0 personal).
///
/// `floor(fraction × n)` elements are personal: every element that is
/// personal in `previous` (the personal set only grows, as in FedSelect),
/// then the shared elements with the largest |local − global|. Ties go to
/// the lower index, so the mask is a pure function of its inputs. When
/// `previous` already has at least that many personal elements it is
/// returned unchanged. `floor` means a tensor smaller than 1/fraction
/// elements (e.g. a 3-element bias at 0.2) stays fully shared.
///
/// Errors name the rule: lengths must agree, `fraction` must be in [0, 1),
/// values must be finite, `previous` must hold only 0/1.
pub fn compute_mask(
    local: &[f64],
    global: &[f64],
    fraction: f64,
    previous: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    check_fraction(fraction)?;
    let n = global.len();
    if local.len() != n {
        return Err(format!(
            "the local tensor has {} elements, the global one {n}",
            local.len()
        ));
    }
    let mut mask = match previous {
        Some(p) if p.len() != n => {
            return Err(format!(
                "the previous mask has {} elements, the tensor {n}",
                p.len()
            ))
        }
        Some(p) => {
            if let Some(j) = p.iter().position(|&m| m > 1) {
                return Err(format!(
                    "the previous mask holds {} at element {j}: masks hold only 0 (personal) or 1 (shared)",
                    p[j]
                ));
            }
            p.to_vec()
        }
        None => vec![1u8; n],
    };
    for (what, values) in [("local", local), ("global", global)] {
        if let Some(j) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "the {what} value at element {j} is {}: only finite values can be ranked",
                values[j]
            ));
        }
    }
    // The small epsilon keeps 0.3 × 10 = 3.0000000000000004 from being
    // read as 2.9999… by a neighbouring product.
    let want = (fraction * n as f64 + 1e-9).floor() as usize;
    let already = mask.iter().filter(|&&m| m == 0).count();
    if already >= want {
        return Ok(mask);
    }
    let mut candidates: Vec<usize> = (0..n).filter(|&j| mask[j] == 1).collect();
    let take = want - already;
    let moved = |j: usize| (local[j] - global[j]).abs();
    // Larger movement first, then lower index: a total order (no NaN by
    // the check above), so the selection is deterministic.
    let order = |a: &usize, b: &usize| moved(*b).total_cmp(&moved(*a)).then(a.cmp(b));
    if take < candidates.len() {
        candidates.select_nth_unstable_by(take - 1, order);
    }
    for &j in &candidates[..take] {
        mask[j] = 0;
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_movements_become_personal() {
        let global = [0.0, 0.0, 0.0, 0.0, 0.0];
        let local = [0.1, -3.0, 0.5, 2.0, -0.2];
        // floor(0.4 × 5) = 2: elements 1 (|−3|) and 3 (|2|).
        assert_eq!(
            compute_mask(&local, &global, 0.4, None).unwrap(),
            vec![1, 0, 1, 0, 1]
        );
    }

    #[test]
    fn movement_is_measured_from_the_global_value() {
        let global = [1.0, -3.0, 0.0, 2.0, 0.0];
        let local = [0.1, -3.0, 0.5, 2.0, -0.2];
        // |Δ| = 0.9, 0, 0.5, 0, 0.2 → element 0.
        assert_eq!(
            compute_mask(&local, &global, 0.2, None).unwrap(),
            vec![0, 1, 1, 1, 1]
        );
    }

    #[test]
    fn ties_go_to_the_lower_index() {
        let global = [0.0; 6];
        let local = [1.0, -2.0, 2.0, 1.0, -2.0, 2.0];
        // |Δ| = 1,2,2,1,2,2; take floor(0.5 × 6) = 3 of the four 2s: 1, 2, 4.
        assert_eq!(
            compute_mask(&local, &global, 0.5, None).unwrap(),
            vec![1, 0, 0, 1, 0, 1]
        );
        // All equal: the first k.
        assert_eq!(
            compute_mask(&[5.0; 4], &[0.0; 4], 0.5, None).unwrap(),
            vec![0, 0, 1, 1]
        );
    }

    #[test]
    fn zero_fraction_and_tiny_tensors_share_everything() {
        let local = [9.0, -9.0, 1.0];
        assert_eq!(
            compute_mask(&local, &[0.0; 3], 0.0, None).unwrap(),
            vec![1, 1, 1]
        );
        // floor(0.2 × 3) = 0.
        assert_eq!(
            compute_mask(&local, &[0.0; 3], 0.2, None).unwrap(),
            vec![1, 1, 1]
        );
        assert_eq!(compute_mask(&[], &[], 0.5, None).unwrap(), Vec::<u8>::new());
        // 0.3 × 10 is 3.0000000000000004 in floating point; still 3.
        let ten: Vec<f64> = (0..10).map(f64::from).collect();
        let m = compute_mask(&ten, &[0.0; 10], 0.3, None).unwrap();
        assert_eq!(m.iter().filter(|&&v| v == 0).count(), 3);
        assert_eq!(&m[7..], &[0, 0, 0]);
    }

    #[test]
    fn the_personal_set_only_grows() {
        let global = [0.0; 5];
        let local = [5.0, 4.0, 3.0, 2.0, 1.0];
        // Element 4 (smallest movement) was personal before; it stays, and
        // floor(0.4 × 5) = 2 needs one more: element 0.
        assert_eq!(
            compute_mask(&local, &global, 0.4, Some(&[1, 1, 1, 1, 0])).unwrap(),
            vec![0, 1, 1, 1, 0]
        );
        // Already more personal elements than the fraction asks: unchanged.
        assert_eq!(
            compute_mask(&local, &global, 0.2, Some(&[0, 0, 1, 1, 0])).unwrap(),
            vec![0, 0, 1, 1, 0]
        );
    }

    #[test]
    fn bad_inputs_are_refused_with_the_rule() {
        for (local, global, fraction, prev, want) in [
            (&[1.0][..], &[1.0, 2.0][..], 0.1, None, "local tensor has 1"),
            (&[1.0, 2.0][..], &[1.0, 2.0][..], 1.0, None, "in [0, 1)"),
            (&[1.0, 2.0][..], &[1.0, 2.0][..], -0.5, None, "in [0, 1)"),
            (
                &[1.0, f64::NAN][..],
                &[1.0, 2.0][..],
                0.5,
                None,
                "local value at element 1 is NaN",
            ),
            (
                &[1.0, 2.0][..],
                &[f64::INFINITY, 2.0][..],
                0.5,
                None,
                "global value at element 0 is inf",
            ),
            (
                &[1.0, 2.0][..],
                &[1.0, 2.0][..],
                0.5,
                Some(&[1u8][..]),
                "previous mask has 1",
            ),
            (
                &[1.0, 2.0][..],
                &[1.0, 2.0][..],
                0.5,
                Some(&[1u8, 2][..]),
                "holds 2 at element 1",
            ),
        ] {
            let err = compute_mask(local, global, fraction, prev).unwrap_err();
            assert!(err.contains(want), "{want}: {err}");
        }
    }
}
