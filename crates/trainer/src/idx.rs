//! MNIST in its original IDX format (uncompressed `*-ubyte` files).
//!
//! IDX is a big-endian header (magic, then one u32 per dimension) followed
//! by raw bytes. Every header field is checked against the actual length
//! because a truncated download otherwise yields a plausible-looking but
//! shifted dataset.

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Result, TrainerError};

/// Magic of an unsigned-byte, 3-dimensional IDX file (images).
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic of an unsigned-byte, 1-dimensional IDX file (labels).
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
/// MNIST has ten digit classes; labels outside are rejected.
pub const MNIST_CLASSES: usize = 10;

/// Reads an MNIST images/labels pair from disk. Pixels are scaled to
/// `[0, 1]` by dividing by 255.
pub fn load_mnist_idx(images: impl AsRef<Path>, labels: impl AsRef<Path>) -> Result<Dataset> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TrainerError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let (images, labels) = (images.as_ref(), labels.as_ref());
    parse_mnist_idx(
        &read(images)?,
        &images.display().to_string(),
        &read(labels)?,
        &labels.display().to_string(),
    )
}

/// Parses in-memory IDX images and labels; the names only label errors.
pub fn parse_mnist_idx(
    images: &[u8],
    images_name: &str,
    labels: &[u8],
    labels_name: &str,
) -> Result<Dataset> {
    let img_err = |message: String| TrainerError::Idx {
        file: images_name.to_string(),
        message,
    };
    let lbl_err = |message: String| TrainerError::Idx {
        file: labels_name.to_string(),
        message,
    };

    let (img_dims, pixels) = split_idx(images, IDX_IMAGES_MAGIC, 3).map_err(img_err)?;
    let (lbl_dims, label_bytes) = split_idx(labels, IDX_LABELS_MAGIC, 1).map_err(lbl_err)?;
    let (count, rows, cols) = (img_dims[0], img_dims[1], img_dims[2]);
    if rows == 0 || cols == 0 {
        return Err(img_err(format!("image size {rows}x{cols} is empty")));
    }
    if lbl_dims[0] != count {
        return Err(lbl_err(format!(
            "{} labels but {images_name} holds {count} images",
            lbl_dims[0]
        )));
    }
    if let Some(i) = label_bytes
        .iter()
        .position(|&l| usize::from(l) >= MNIST_CLASSES)
    {
        return Err(lbl_err(format!(
            "label {} at index {i} is outside 0..={}",
            label_bytes[i],
            MNIST_CLASSES - 1
        )));
    }
    let features = pixels.iter().map(|&p| f32::from(p) / 255.0).collect();
    Dataset::new(features, label_bytes.to_vec(), rows * cols, MNIST_CLASSES)
}

/// Checks magic and length of an IDX file with `ndims` dimensions and
/// returns the dimensions and the payload.
fn split_idx(bytes: &[u8], magic: u32, ndims: usize) -> Result<(Vec<usize>, &[u8]), String> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Err("file is gzip-compressed; decompress it first (e.g. `gunzip`)".into());
    }
    let word = |i: usize| {
        u32::from_be_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ])
    };
    // Magic first: a swapped images/labels pair should say so, not report
    // a confusing length problem.
    if bytes.len() < 4 {
        return Err(format!("truncated header: {} bytes", bytes.len()));
    }
    let found = word(0);
    if found != magic {
        return Err(format!(
            "bad magic number 0x{found:08x}, expected 0x{magic:08x}"
        ));
    }
    let header_len = 4 * (1 + ndims);
    if bytes.len() < header_len {
        return Err(format!(
            "truncated header: {} bytes, need {header_len}",
            bytes.len()
        ));
    }
    let dims: Vec<usize> = (1..=ndims).map(|i| word(i) as usize).collect();
    let payload_len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    let payload = &bytes[header_len..];
    if payload.len() != payload_len {
        return Err(format!(
            "header dimensions {dims:?} need {payload_len} data bytes, file has {}{}",
            payload.len(),
            if payload.len() < payload_len {
                " (truncated)"
            } else {
                " (trailing data)"
            }
        ));
    }
    Ok((dims, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    /// Three 2x3 images with labels 7, 0, 9.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let pixels: Vec<u8> = (0..18).map(|i| (i * 15) as u8).collect();
        (
            idx(IDX_IMAGES_MAGIC, &[3, 2, 3], &pixels),
            idx(IDX_LABELS_MAGIC, &[3], &[7, 0, 9]),
        )
    }

    #[test]
    fn round_trip_through_files() {
        let (images, labels) = sample();
        let dir = tempfile::tempdir().unwrap();
        let (ip, lp) = (
            dir.path().join("img-idx3-ubyte"),
            dir.path().join("lbl-idx1-ubyte"),
        );
        std::fs::write(&ip, &images).unwrap();
        std::fs::write(&lp, &labels).unwrap();
        let d = load_mnist_idx(&ip, &lp).unwrap();
        assert_eq!((d.len(), d.dim(), d.classes()), (3, 6, 10));
        assert_eq!(d.labels(), &[7, 0, 9]);
        assert_eq!(d.row(1)[0], 90.0 / 255.0);
        assert_eq!(d.row(2)[5], 255.0 / 255.0);
    }

    fn err(images: &[u8], labels: &[u8]) -> String {
        parse_mnist_idx(images, "img", labels, "lbl")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rejects_bad_headers_and_lengths() {
        let (images, labels) = sample();
        // Swapped files: each has the other's magic.
        assert!(err(&labels, &images).contains("bad magic"));
        let mut truncated = images.clone();
        truncated.pop();
        let msg = err(&truncated, &labels);
        assert!(
            msg.starts_with("img:") && msg.contains("truncated"),
            "{msg}"
        );
        let mut trailing = labels.clone();
        trailing.push(1);
        assert!(err(&images, &trailing).contains("trailing"));
        assert!(err(&images[..10], &labels).contains("truncated header"));
        let fewer = idx(IDX_LABELS_MAGIC, &[2], &[1, 2]);
        assert!(err(&images, &fewer).contains("2 labels but img holds 3 images"));
        let bad_label = idx(IDX_LABELS_MAGIC, &[3], &[1, 10, 2]);
        assert!(err(&images, &bad_label).contains("label 10 at index 1"));
        let empty = idx(IDX_IMAGES_MAGIC, &[3, 0, 3], &[]);
        assert!(err(&empty, &labels).contains("empty"));
        assert!(err(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0], &labels).contains("gzip"));
        let huge = idx(IDX_IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(err(&huge, &labels).starts_with("img:"));
    }
}
