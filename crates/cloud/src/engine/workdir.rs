//! Scratch directory of one aggregation attempt, removed when dropped (on
//! success, error or panic), so a long-lived worker does not fill its disk.

use std::path::{Path, PathBuf};

pub(super) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// `{root}/{job}/{round}/{owner}`: the owner level keeps a stale
    /// aggregator and the one that took over from it out of each other's
    /// files when they share a disk.
    pub(super) fn create(
        root: &Path,
        job_id: &str,
        round: u32,
        owner: &str,
    ) -> std::io::Result<Self> {
        let owner: String = owner
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = root.join(job_id).join(round.to_string()).join(owner);
        if path.exists() {
            // Leftovers of a crashed attempt by the same owner.
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(path.join("updates"))?;
        Ok(WorkDir { path })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        // Remove the round and job levels too when nothing else is in them.
        if let Some(round_dir) = self.path.parent() {
            if std::fs::remove_dir(round_dir).is_ok() {
                if let Some(job_dir) = round_dir.parent() {
                    let _ = std::fs::remove_dir(job_dir);
                }
            }
        }
    }
}
