//! The UCI 8x8 handwritten digits in scikit-learn's `digits.csv` layout.
//!
//! The CSV is embedded in the binary (about 260 KB) so `fedstep simulate`
//! works from any working directory without locating the repository; the
//! file loader exists for edited or alternative copies. See
//! `data/digits/README.md` for provenance and licence (CC BY 4.0).

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Result, TrainerError};

/// Pixels per image (8x8).
pub const DIGITS_DIM: usize = 64;
/// Digits 0..=9.
pub const DIGITS_CLASSES: usize = 10;
/// Largest pixel value: each pixel counts the "on" bits of a 4x4 block.
pub const DIGITS_MAX_PIXEL: u8 = 16;

/// The shipped copy of `data/digits/digits.csv`.
pub const BUNDLED_DIGITS_CSV: &str = include_str!("../../../data/digits/digits.csv");

/// The bundled digits dataset (1,797 samples). Returns a `Result` rather
/// than panicking so a corrupted checkout surfaces as an ordinary error.
pub fn bundled_digits() -> Result<Dataset> {
    parse_digits_csv(BUNDLED_DIGITS_CSV, "data/digits/digits.csv (bundled)")
}

/// Reads a digits CSV file; errors name the file, line and field.
pub fn load_digits_csv(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_digits_csv(&text, &path.display().to_string())
}

/// Parses digits CSV text: no header, one sample per line, 64 integer
/// pixels in `0..=16` then the label in `0..=9`, comma separated.
///
/// Deliberately strict (no blank lines, no spaces, no floats): the file is
/// a fixed, known artefact, so anything unexpected means a wrong or damaged
/// file, and silently skipping lines would quietly change experiments.
/// `source` is only used in error messages.
pub fn parse_digits_csv(text: &str, source: &str) -> Result<Dataset> {
    let err = |line: usize, field: Option<usize>, message: String| TrainerError::Csv {
        file: source.to_string(),
        line,
        field,
        message,
    };
    let mut features = Vec::new();
    let mut labels = Vec::new();
    // `lines()` accepts a final line with or without a trailing newline and
    // strips `\r\n`, so files edited on Windows still load.
    for (idx, line) in text.lines().enumerate() {
        let line_no = idx + 1;
        if line.is_empty() {
            return Err(err(line_no, None, "empty line".into()));
        }
        let n_fields = line.split(',').count();
        if n_fields != DIGITS_DIM + 1 {
            return Err(err(
                line_no,
                None,
                format!(
                    "expected {} fields (64 pixels + label), found {n_fields}",
                    DIGITS_DIM + 1
                ),
            ));
        }
        for (f, raw) in line.split(',').enumerate() {
            let field_no = f + 1;
            let value: u8 = raw.parse().map_err(|_| {
                err(
                    line_no,
                    Some(field_no),
                    format!("{raw:?} is not a non-negative integer"),
                )
            })?;
            if f < DIGITS_DIM {
                if value > DIGITS_MAX_PIXEL {
                    return Err(err(
                        line_no,
                        Some(field_no),
                        format!("pixel value {value} is outside 0..={DIGITS_MAX_PIXEL}"),
                    ));
                }
                features.push(f32::from(value) / f32::from(DIGITS_MAX_PIXEL));
            } else {
                if usize::from(value) >= DIGITS_CLASSES {
                    return Err(err(
                        line_no,
                        Some(field_no),
                        format!("label {value} is outside 0..={}", DIGITS_CLASSES - 1),
                    ));
                }
                labels.push(value);
            }
        }
    }
    if labels.is_empty() {
        return Err(err(0, None, "no samples".into()));
    }
    Dataset::new(features, labels, DIGITS_DIM, DIGITS_CLASSES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(pixel: u8, label: u8) -> String {
        let mut v: Vec<String> = (0..DIGITS_DIM).map(|_| pixel.to_string()).collect();
        v.push(label.to_string());
        v.join(",")
    }

    #[test]
    fn bundled_file_has_the_documented_shape() {
        let d = bundled_digits().unwrap();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.dim(), 64);
        assert_eq!(d.classes(), 10);
        // Class sizes as documented for sklearn's load_digits.
        assert_eq!(
            d.class_counts(),
            vec![178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
        );
        assert!(d.features().iter().all(|&v| (0.0..=1.0).contains(&v)));
        assert_eq!(d.labels()[..3], [0, 1, 2]);
    }

    #[test]
    fn parses_good_text_and_scales_pixels() {
        let text = format!("{}\r\n{}", line(16, 3), line(8, 9));
        let d = parse_digits_csv(&text, "t.csv").unwrap();
        assert_eq!(d.labels(), &[3, 9]);
        assert_eq!(d.row(0)[0], 1.0);
        assert_eq!(d.row(1)[63], 0.5);
    }

    fn error_of(text: &str) -> String {
        parse_digits_csv(text, "t.csv").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let good = line(0, 1);
        let mut bad_pixel: Vec<String> = good.split(',').map(str::to_string).collect();
        bad_pixel[4] = "17".into();
        let msg = error_of(&format!("{good}\n{}\n", bad_pixel.join(",")));
        assert!(msg.starts_with("t.csv:2: field 5:"), "{msg}");
        assert!(msg.contains("17"), "{msg}");

        let mut bad_label: Vec<String> = good.split(',').map(str::to_string).collect();
        bad_label[64] = "10".into();
        let msg = error_of(&bad_label.join(","));
        assert!(msg.starts_with("t.csv:1: field 65:"), "{msg}");

        let mut not_int: Vec<String> = good.split(',').map(str::to_string).collect();
        not_int[9] = "1.5".into();
        let msg = error_of(&format!("{good}\n{good}\n{}", not_int.join(",")));
        assert!(msg.starts_with("t.csv:3: field 10:"), "{msg}");

        let msg = error_of(&format!("{good}\n1,2,3\n"));
        assert!(msg.starts_with("t.csv:2: expected 65 fields"), "{msg}");

        let msg = error_of(&format!("{good}\n\n{good}\n"));
        assert!(msg.starts_with("t.csv:2: empty line"), "{msg}");

        assert!(error_of("").contains("no samples"));
        let negative = good.replacen('0', "-1", 1);
        assert!(error_of(&negative).starts_with("t.csv:1: field 1:"));
    }

    #[test]
    fn missing_file_is_an_io_error_naming_the_path() {
        let msg = load_digits_csv("/nonexistent/digits.csv")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/digits.csv"), "{msg}");
    }
}
