//! FedSelect on the client (issue #7): keep the elements local training
//! moved most, share the rest. The numeric work is fedstep-core's
//! (`fedstep_core::personalization`); this file only decides which files
//! go where and when the personal file becomes the one to keep.
//!
//! The personal file of a job lives at `<workdir>/personal/<job_id>.safetensors`
//! and never leaves the machine. It is replaced only after the round's
//! `updates` row is written, so a crash or a rejected attempt never leaves
//! a personal file that disagrees with what the server has.
//!
//! When the job completes, the final global model with the personal values
//! put back is this client's model to serve:
//! `<workdir>/personal/<job_id>.personalized.safetensors`.

use std::path::{Path, PathBuf};

use fedstep_core::personalization::{merge_personal, split_update, Ramp};
use fedstep_core::Limits;

use crate::config::PersonalizationConfig;
use crate::error::ClientError;

/// The client's FedSelect settings and where its personal files live.
#[derive(Debug, Clone)]
pub struct Personalizer {
    ramp: Ramp,
    dir: PathBuf,
}

/// A split that is uploaded but not yet kept: see [`Personalizer::keep`].
#[derive(Debug)]
pub struct PendingPersonal {
    job_id: String,
    file: PathBuf,
}

impl Personalizer {
    pub fn new(cfg: &PersonalizationConfig, workdir: &Path) -> Result<Personalizer, String> {
        Ok(Personalizer {
            ramp: Ramp::new(cfg.fractions()?, cfg.ramp_rounds),
            dir: workdir.join("personal"),
        })
    }

    /// Where this job's personal values are kept.
    pub fn personal_file(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.safetensors"))
    }

    /// Where the job's final personalized model is written.
    pub fn personalized_file(&self, job_id: &str) -> PathBuf {
        self.dir.join(format!("{job_id}.personalized.safetensors"))
    }

    /// Whether we kept personal values for this job (took part with them).
    pub fn has_personal(&self, job_id: &str) -> bool {
        self.personal_file(job_id).is_file()
    }

    /// Merges the job's final global model with our personal values into
    /// [`Self::personalized_file`] (whole or absent: written beside it,
    /// then renamed). The merge checks that both files have the same
    /// tensors, so a final model of another architecture is refused.
    pub fn finish(
        &self,
        job_id: &str,
        final_global: &Path,
        limits: &Limits,
    ) -> Result<PathBuf, ClientError> {
        let target = self.personalized_file(job_id);
        let tmp = self.dir.join(format!(".{job_id}.personalized.tmp"));
        merge_personal(final_global, &self.personal_file(job_id), &tmp, limits)
            .map_err(|e| ClientError::Personalization(e.to_string()))?;
        std::fs::rename(&tmp, &target).map_err(ClientError::io(&target))?;
        Ok(target)
    }

    /// The model to train from: the global model with our personal values
    /// put back, or the global model itself before we have any.
    pub fn start_from(
        &self,
        job_id: &str,
        global: &Path,
        scratch: &Path,
        limits: &Limits,
    ) -> Result<PathBuf, ClientError> {
        let personal = self.personal_file(job_id);
        if !personal.is_file() {
            return Ok(global.to_path_buf());
        }
        let merged = scratch.join("merged.safetensors");
        merge_personal(global, &personal, &merged, limits)
            .map_err(|e| ClientError::Personalization(e.to_string()))?;
        Ok(merged)
    }

    /// Splits the trained model: returns the file to upload (shared values
    /// and masks) and the personal file to keep once the row is written.
    pub fn split(
        &self,
        job_id: &str,
        round: u32,
        global: &Path,
        trained: &Path,
        scratch: &Path,
        limits: &Limits,
    ) -> Result<(PathBuf, PendingPersonal), ClientError> {
        let previous = self.personal_file(job_id);
        let upload = scratch.join("upload.safetensors");
        let personal = scratch.join("personal.safetensors");
        split_update(
            global,
            trained,
            &self.ramp.at(round),
            previous.is_file().then_some(previous.as_path()),
            &upload,
            &personal,
            limits,
        )
        .map_err(|e| ClientError::Personalization(e.to_string()))?;
        Ok((
            upload,
            PendingPersonal {
                job_id: job_id.to_string(),
                file: personal,
            },
        ))
    }

    /// Makes a split's personal file the one to keep (after the row is in;
    /// whole or absent: `workdir::keep_file`).
    pub fn keep(&self, pending: PendingPersonal) -> Result<(), ClientError> {
        crate::workdir::keep_file(&pending.file, &self.personal_file(&pending.job_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use fedstep_core::personalization::read_masked;
    use fedstep_core::writer::write_model;
    use safetensors::Dtype;

    fn f32_model(path: &Path, values: &[f32]) {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_model(
            path,
            &[("w".into(), Dtype::F32, vec![values.len()], raw)],
            &BTreeMap::new(),
        )
        .unwrap();
    }

    fn values(path: &Path) -> Vec<f32> {
        let m = fedstep_core::model::load_dense(path, &Limits::default()).unwrap();
        m["w"].values.iter().map(|&v| v as f32).collect()
    }

    #[test]
    fn keeps_what_moved_most_and_merges_it_back_next_round() {
        let work = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let p = Personalizer::new(
            &PersonalizationConfig {
                mode: crate::config::PersonalizationMode::Fedselect,
                personal_fraction: 0.25,
                tensor_fractions: BTreeMap::new(),
                ramp_rounds: 0,
            },
            work.path(),
        )
        .unwrap();
        let limits = Limits::default();
        let global = scratch.path().join("g.safetensors");
        let trained = scratch.path().join("t.safetensors");
        f32_model(&global, &[0.0, 0.0, 0.0, 0.0]);
        // Element 2 moved most: it becomes personal (25% of 4 = 1 element).
        f32_model(&trained, &[0.1, -0.2, 5.0, 0.3]);

        // Before any personal file: train from the global model itself.
        let start = p.start_from("j", &global, scratch.path(), &limits).unwrap();
        assert_eq!(start, global);

        let (upload, pending) = p
            .split("j", 1, &global, &trained, scratch.path(), &limits)
            .unwrap();
        let up = read_masked(&upload, &limits).unwrap();
        assert_eq!(up.masks["w"], vec![1, 1, 0, 1]);
        assert!(!p.personal_file("j").exists(), "kept only after the row");
        p.keep(pending).unwrap();
        assert!(p.personal_file("j").is_file());

        // Next round: the new global model gets our personal value back.
        let global2 = scratch.path().join("g2.safetensors");
        f32_model(&global2, &[1.0, 1.0, 1.0, 1.0]);
        let start = p
            .start_from("j", &global2, scratch.path(), &limits)
            .unwrap();
        assert_eq!(values(&start), vec![1.0, 1.0, 5.0, 1.0]);

        // The job ends: the final model with our personal value is ours to serve.
        let last = scratch.path().join("final.safetensors");
        f32_model(&last, &[2.0, 2.0, 2.0, 2.0]);
        let served = p.finish("j", &last, &limits).unwrap();
        assert_eq!(served, p.personalized_file("j"));
        assert_eq!(values(&served), vec![2.0, 2.0, 5.0, 2.0]);
        // A final model of another shape is refused by name.
        f32_model(&last, &[2.0; 3]);
        let err = p.finish("j", &last, &limits).unwrap_err().to_string();
        assert!(
            err.contains("final.safetensors") && err.contains("`w` is F32 [4]"),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_personal_file_is_a_named_error_not_a_silent_global_start() {
        let work = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let p = Personalizer::new(
            &PersonalizationConfig {
                mode: crate::config::PersonalizationMode::Fedselect,
                personal_fraction: 0.2,
                tensor_fractions: BTreeMap::new(),
                ramp_rounds: 3,
            },
            work.path(),
        )
        .unwrap();
        std::fs::create_dir_all(work.path().join("personal")).unwrap();
        std::fs::write(p.personal_file("j"), b"not a model").unwrap();
        let global = scratch.path().join("g.safetensors");
        f32_model(&global, &[0.0; 4]);
        let err = p
            .start_from("j", &global, scratch.path(), &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("j.safetensors"), "{err}");
    }
}
