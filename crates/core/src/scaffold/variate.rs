//! A control variate: one F32 tensor per float tensor of the model, same
//! name and shape. Kept in F32 whatever the model's float dtype (an F16
//! variate would lose the small corrections it accumulates).
//!
//! Untrusted bytes (a client's Δc_i) become a [`ControlVariate`] only
//! through [`ControlVariate::parse`], which checks the header within the
//! limits, the names and shapes against the model's layout, the dtype and
//! that every value is finite; a failure is a reason, bounded, naming the
//! tensor and the rule.

use std::collections::BTreeMap;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::limits::Limits;
use crate::model::{header_from_bytes, ModelHeader};
use crate::personalization::layout::is_float;

/// Longest piece of client text a reason quotes.
const QUOTE_CHARS: usize = 64;

fn quote(s: &str) -> String {
    if s.chars().count() <= QUOTE_CHARS {
        format!("`{}`", s.escape_debug())
    } else {
        let head: String = s.chars().take(QUOTE_CHARS).collect();
        format!("`{}…`", head.escape_debug())
    }
}

/// The tensors a variate has: the model's float tensors, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct VariateLayout {
    tensors: Vec<(String, Vec<usize>)>,
}

impl VariateLayout {
    /// The float tensors of a model header (integer and bool tensors are
    /// carried over by the aggregation, never trained: no variate).
    pub fn of(model: &ModelHeader) -> VariateLayout {
        VariateLayout {
            tensors: model
                .tensors
                .iter()
                .filter(|t| is_float(t.dtype))
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// The layout of a model file's bytes (the global model: trusted, but
    /// parsed within the limits all the same).
    pub fn of_model_bytes(bytes: &[u8], limits: &Limits) -> Result<VariateLayout, String> {
        let header = header_from_bytes(bytes, limits).map_err(|e| e.to_string())?;
        Ok(VariateLayout::of(&header))
    }

    pub fn tensors(&self) -> &[(String, Vec<usize>)] {
        &self.tensors
    }
}

/// A checked control variate, in its layout's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVariate {
    layout: VariateLayout,
    values: Vec<Vec<f32>>,
}

impl ControlVariate {
    /// All zeros: every variate before the first round.
    pub fn zeros(layout: &VariateLayout) -> ControlVariate {
        let values = layout
            .tensors
            .iter()
            .map(|(_, s)| vec![0.0; s.iter().product()])
            .collect();
        ControlVariate {
            layout: layout.clone(),
            values,
        }
    }

    /// Builds a variate from values in layout order (checked like parsed
    /// bytes: lengths and finiteness).
    pub fn from_values(
        layout: &VariateLayout,
        values: Vec<Vec<f32>>,
    ) -> Result<ControlVariate, String> {
        if values.len() != layout.tensors.len() {
            return Err(format!(
                "{} tensors, the model has {} float tensors",
                values.len(),
                layout.tensors.len()
            ));
        }
        for ((name, shape), v) in layout.tensors.iter().zip(&values) {
            let n: usize = shape.iter().product();
            if v.len() != n {
                return Err(format!("{}: {} values, expected {n}", quote(name), v.len()));
            }
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(format!("{}: element {i} is not finite", quote(name)));
            }
        }
        Ok(ControlVariate {
            layout: layout.clone(),
            values,
        })
    }

    /// Parses untrusted safetensors bytes against `layout`; returns the
    /// variate and the file's metadata. The error is a bounded reason.
    pub fn parse(
        bytes: &[u8],
        layout: &VariateLayout,
        limits: &Limits,
    ) -> Result<(ControlVariate, BTreeMap<String, String>), String> {
        let header = header_from_bytes(bytes, limits)
            .map_err(|e| format!("not a control variate file: {e}"))?;
        if header.tensors.len() != layout.tensors.len() {
            return Err(format!(
                "{} tensors, the model has {} float tensors",
                header.tensors.len(),
                layout.tensors.len()
            ));
        }
        let mut values = Vec::with_capacity(layout.tensors.len());
        for (name, shape) in &layout.tensors {
            let Some(e) = header.find(name) else {
                return Err(format!("{} is missing", quote(name)));
            };
            if e.dtype != Dtype::F32 || &e.shape != shape {
                return Err(format!(
                    "{} is {:?} {:?}, expected F32 {:?}",
                    quote(name),
                    e.dtype,
                    e.shape,
                    shape
                ));
            }
            // Offsets were checked against the file length by the header
            // parser.
            let data = &bytes[e.start as usize..e.end as usize];
            values.push(
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
        let variate = ControlVariate::from_values(layout, values)?;
        Ok((variate, header.metadata))
    }

    /// Safetensors bytes with `metadata`.
    pub fn to_bytes(&self, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, String> {
        let bytes: Vec<Vec<u8>> = self
            .values
            .iter()
            .map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = self
            .layout
            .tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape), data)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (name.as_str(), v))
                    .map_err(|e| format!("{name}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
        safetensors::serialize(views, meta).map_err(|e| e.to_string())
    }

    pub fn layout(&self) -> &VariateLayout {
        &self.layout
    }

    /// Values per tensor, in layout order.
    pub fn values(&self) -> &[Vec<f32>] {
        &self.values
    }

    /// Values by tensor name.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        let i = self.layout.tensors.iter().position(|(n, _)| n == name)?;
        Some(&self.values[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> VariateLayout {
        VariateLayout {
            tensors: vec![("w".into(), vec![2, 2]), ("b".into(), vec![2])],
        }
    }

    fn variate(w: [f32; 4], b: [f32; 2]) -> ControlVariate {
        ControlVariate::from_values(&layout(), vec![w.to_vec(), b.to_vec()]).unwrap()
    }

    #[test]
    fn round_trips_with_metadata() {
        let v = variate([1.0, -2.0, 0.5, 0.0], [3.0, 4.0]);
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let (back, m) =
            ControlVariate::parse(&v.to_bytes(&meta).unwrap(), &layout(), &Limits::default())
                .unwrap();
        assert_eq!(back, v);
        assert_eq!(m, meta);
        assert_eq!(back.get("b"), Some(&[3.0f32, 4.0][..]));
    }

    #[test]
    fn bad_files_are_reasons() {
        let limits = Limits::default();
        let parse = |bytes: &[u8]| ControlVariate::parse(bytes, &layout(), &limits).unwrap_err();
        assert!(parse(b"garbage").contains("not a control variate file"));
        // A tensor of the wrong shape.
        let other = VariateLayout {
            tensors: vec![("w".into(), vec![4]), ("b".into(), vec![2])],
        };
        let v = ControlVariate::zeros(&other);
        let r = parse(&v.to_bytes(&BTreeMap::new()).unwrap());
        assert!(r.contains("`w` is F32 [4], expected F32 [2, 2]"), "{r}");
        // A missing tensor, under a very long name: quoted, cut.
        let long = "x".repeat(10_000);
        let other = VariateLayout {
            tensors: vec![("w".into(), vec![2, 2]), (long, vec![2])],
        };
        let r = parse(
            &ControlVariate::zeros(&other)
                .to_bytes(&BTreeMap::new())
                .unwrap(),
        );
        assert!(r.contains("`b` is missing"), "{r}");
        // NaN: rejected, naming the tensor and the element.
        let nan = ControlVariate {
            layout: layout(),
            values: vec![vec![0.0; 4], vec![0.0, f32::NAN]],
        };
        let r = parse(&nan.to_bytes(&BTreeMap::new()).unwrap());
        assert!(r.contains("`b`: element 1 is not finite"), "{r}");
        assert!(quote(&"y".repeat(500)).chars().count() < 80);
    }
}
