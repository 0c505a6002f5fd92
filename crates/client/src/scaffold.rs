//! SCAFFOLD on the client (issue #19): the files a trainer reads and
//! writes, and this client's own control variate c_i, which never leaves
//! the machine.
//!
//! A SCAFFOLD round's message names the server variate c (downloaded and
//! checksummed like the model). The trainer reads c and c_i and writes
//! Δc_i = c_i⁺ − c_i; this file checks that Δc_i like any trainer output
//! (fedstep-core parses it against the model's float tensors: names,
//! shapes, F32, finite), computes c_i⁺ = c_i + Δc_i itself, and keeps it
//! only once the round's row is written, so the c_i kept here is always
//! the sum of the Δc_i the server was told about.
//!
//! c_i of a job lives at `<workdir>/scaffold/<job_id>.safetensors`; before
//! the client's first SCAFFOLD round it is zeros (written into the round's
//! scratch directory for the trainer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fedstep_core::model::ModelHeader;
use fedstep_core::scaffold::{ControlVariate, VariateLayout};
use fedstep_core::Limits;

use crate::error::ClientError;

/// The files of one SCAFFOLD round, as a trainer sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaffoldFiles {
    /// c, the round's server variate (read only).
    pub server_variate: PathBuf,
    /// c_i, this client's variate (read only).
    pub client_variate: PathBuf,
    /// Where the trainer writes Δc_i.
    pub delta_out: PathBuf,
}

/// Where a client keeps its variates.
#[derive(Debug, Clone)]
pub struct ClientVariates {
    dir: PathBuf,
}

/// A c_i⁺ computed but not yet kept: see [`ClientVariates::keep`].
#[derive(Debug)]
pub struct PendingVariate {
    job_id: String,
    file: PathBuf,
}

impl ClientVariates {
    pub fn new(workdir: &Path) -> ClientVariates {
        ClientVariates {
            dir: workdir.join("scaffold"),
        }
    }

    /// This job's c_i.
    pub fn variate_file(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.safetensors"))
    }

    /// The trainer's files for a round whose c was downloaded to
    /// `server_variate`; c_i is the kept one, or zeros shaped like the
    /// model's float tensors written into `scratch`.
    pub fn files(
        &self,
        job_id: &str,
        global: &ModelHeader,
        server_variate: PathBuf,
        scratch: &Path,
    ) -> Result<ScaffoldFiles, ClientError> {
        let kept = self.variate_file(job_id);
        let client_variate = if kept.is_file() {
            kept
        } else {
            let zeros = scratch.join("client_variate.safetensors");
            let bytes = ControlVariate::zeros(&VariateLayout::of(global))
                .to_bytes(&BTreeMap::new())
                .map_err(ClientError::Scaffold)?;
            std::fs::write(&zeros, bytes).map_err(ClientError::io(&zeros))?;
            zeros
        };
        Ok(ScaffoldFiles {
            server_variate,
            client_variate,
            delta_out: scratch.join("scaffold_delta.safetensors"),
        })
    }

    /// Checks the Δc_i the trainer wrote and computes c_i⁺ = c_i + Δc_i
    /// (in F32, as the trainer's own arithmetic) into the scratch
    /// directory. A Δc_i that does not fit the model is the trainer's
    /// failure: nothing is uploaded.
    pub fn next(
        &self,
        job_id: &str,
        global: &ModelHeader,
        files: &ScaffoldFiles,
        limits: &Limits,
    ) -> Result<PendingVariate, ClientError> {
        let layout = VariateLayout::of(global);
        let read = |path: &Path, what: &str| -> Result<ControlVariate, ClientError> {
            let bytes = std::fs::read(path)
                .map_err(|e| ClientError::Output(format!("{what} at {}: {e}", path.display())))?;
            ControlVariate::parse(&bytes, &layout, limits)
                .map(|(v, _)| v)
                .map_err(|e| ClientError::Output(format!("{what} at {}: {e}", path.display())))
        };
        let delta = read(
            &files.delta_out,
            "the trainer's Δc_i (FEDSTEP_VARIATE_DELTA_OUT)",
        )?;
        let current = read(&files.client_variate, "this client's variate c_i")?;
        let values = current
            .values()
            .iter()
            .zip(delta.values())
            .map(|(c, d)| c.iter().zip(d).map(|(c, d)| c + d).collect())
            .collect();
        let next = ControlVariate::from_values(&layout, values)
            .map_err(|e| ClientError::Output(format!("c_i + Δc_i: {e}")))?;
        let file = files
            .delta_out
            .with_file_name("client_variate.next.safetensors");
        let bytes = next
            .to_bytes(&BTreeMap::new())
            .map_err(ClientError::Scaffold)?;
        std::fs::write(&file, bytes).map_err(ClientError::io(&file))?;
        Ok(PendingVariate {
            job_id: job_id.to_string(),
            file,
        })
    }

    /// Makes c_i⁺ the variate to keep (after the row is in; whole or
    /// absent: `workdir::keep_file`).
    pub fn keep(&self, pending: PendingVariate) -> Result<(), ClientError> {
        crate::workdir::keep_file(&pending.file, &self.variate_file(&pending.job_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedstep_core::model::header_from_bytes;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    fn model() -> Vec<u8> {
        let w = [0u8; 8];
        let steps = [0u8; 8];
        safetensors::serialize(
            [
                ("w", TensorView::new(Dtype::F32, vec![2], &w).unwrap()),
                (
                    "steps",
                    TensorView::new(Dtype::I64, vec![1], &steps).unwrap(),
                ),
            ],
            None,
        )
        .unwrap()
    }

    fn variate(header: &ModelHeader, w: [f32; 2]) -> Vec<u8> {
        ControlVariate::from_values(&VariateLayout::of(header), vec![w.to_vec()])
            .unwrap()
            .to_bytes(&BTreeMap::new())
            .unwrap()
    }

    #[test]
    fn zeros_first_then_c_i_plus_delta_kept_only_when_asked() {
        let work = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let header = header_from_bytes(&model(), &Limits::default()).unwrap();
        let v = ClientVariates::new(work.path());
        let c = scratch.path().join("c.safetensors");
        let files = v.files("j", &header, c.clone(), scratch.path()).unwrap();
        // First round: c_i is zeros over the float tensor only.
        let zeros = std::fs::read(&files.client_variate).unwrap();
        assert_eq!(zeros, variate(&header, [0.0, 0.0]));

        std::fs::write(&files.delta_out, variate(&header, [0.5, -1.0])).unwrap();
        let pending = v.next("j", &header, &files, &Limits::default()).unwrap();
        assert!(!v.variate_file("j").exists(), "kept before the row is in");
        v.keep(pending).unwrap();
        assert_eq!(
            std::fs::read(v.variate_file("j")).unwrap(),
            variate(&header, [0.5, -1.0])
        );

        // Next round reads the kept c_i: c_i⁺ = [0.5, -1] + [0.25, 0.25].
        let files = v.files("j", &header, c, scratch.path()).unwrap();
        assert_eq!(files.client_variate, v.variate_file("j"));
        std::fs::write(&files.delta_out, variate(&header, [0.25, 0.25])).unwrap();
        v.keep(v.next("j", &header, &files, &Limits::default()).unwrap())
            .unwrap();
        assert_eq!(
            std::fs::read(v.variate_file("j")).unwrap(),
            variate(&header, [0.75, -0.75])
        );
    }

    #[test]
    fn a_delta_that_does_not_fit_the_model_is_the_trainers_failure() {
        let work = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let header = header_from_bytes(&model(), &Limits::default()).unwrap();
        let v = ClientVariates::new(work.path());
        let files = v
            .files("j", &header, scratch.path().join("c"), scratch.path())
            .unwrap();
        // A NaN cannot even be built as a variate: raw tensors.
        let data: Vec<u8> = [f32::NAN, 0.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let nan = safetensors::serialize(
            [("w", TensorView::new(Dtype::F32, vec![2], &data).unwrap())],
            None,
        )
        .unwrap();
        for (bytes, word) in [
            (b"garbage".to_vec(), "not a control variate"),
            (nan, "not finite"),
        ] {
            std::fs::write(&files.delta_out, bytes).unwrap();
            let err = v
                .next("j", &header, &files, &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("FEDSTEP_VARIATE_DELTA_OUT") && err.contains(word),
                "{err}"
            );
        }
        // Nothing written: none of it is kept.
        assert!(!v.variate_file("j").exists());
    }
}
