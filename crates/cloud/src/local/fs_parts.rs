//! Uploads in parts over a directory, for `FsStore`: each part is a file
//! of its own under `{root}/.fedstep-uploads/{upload id}/`, written whole
//! (temporary file, then rename) so a retried part replaces the earlier
//! one as S3 does; completing concatenates them in order into the object,
//! through a temporary file renamed into place, hashing on the way.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use fedstep_core::bytes::temp_beside;
use fedstep_core::shard::{PartStore, MIN_PART_BYTES};

use crate::checksum::{sha256_file, Sha256Hasher};
use crate::error::{CloudError, Result};
use crate::ports::{ObjectInfo, PartReceipt, UploadParts};

/// Where a store under `root` keeps its uploads in progress (the
/// engine's keys all start with `jobs/`, so no object lives here).
pub(super) const UPLOADS_DIR: &str = ".fedstep-uploads";

static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// A fresh upload id: unique in this process and across processes
/// sharing the directory (pid and time).
pub(super) fn new_upload_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        UPLOADS.fetch_add(1, Ordering::Relaxed)
    )
}

/// Upload ids travel through task payloads and documents: keep them to a
/// safe alphabet so one cannot name a path outside the uploads directory.
pub(super) fn upload_dir(root: &Path, upload_id: &str) -> Result<PathBuf> {
    let plain = !upload_id.is_empty()
        && upload_id.len() <= 128
        && upload_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain {
        return Err(CloudError::Invalid(format!(
            "upload id `{}` is not one this store made",
            upload_id.chars().take(64).collect::<String>()
        )));
    }
    Ok(root.join(UPLOADS_DIR).join(upload_id))
}

/// One task's handle on an upload.
pub(super) struct FsParts {
    pub(super) dir: PathBuf,
    pub(super) key: String,
    pub(super) receipts: Mutex<Vec<PartReceipt>>,
}

impl PartStore for FsParts {
    fn put_part(&self, number: u32, bytes: &[u8]) -> std::io::Result<()> {
        if !self.dir.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the upload of `{}` no longer exists", self.key),
            ));
        }
        let path = self.dir.join(format!("{number:05}"));
        let tmp = temp_beside(&path);
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        let mut h = Sha256Hasher::default();
        h.update(bytes);
        let receipt = PartReceipt {
            number,
            etag: h.finish_hex(),
            sha256: None,
        };
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        receipts.retain(|r| r.number != number);
        receipts.push(receipt);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("`{}` (parts)", self.key)
    }
}

impl UploadParts for FsParts {
    fn receipts(&self) -> Vec<PartReceipt> {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Concatenates the parts in `dir` named by `receipts` into `dest`, then
/// removes `dir`. A part whose bytes no longer match its receipt (written
/// again by another task since) is refused rather than mixed in.
pub(super) fn complete(
    dir: &Path,
    dest: &Path,
    key: &str,
    mut receipts: Vec<PartReceipt>,
) -> Result<ObjectInfo> {
    if !dir.is_dir() {
        // Completed before (a retried commit): what is at the key.
        return match std::fs::metadata(dest) {
            Ok(m) if m.is_file() => Ok(ObjectInfo {
                bytes: m.len(),
                sha256: sha256_file(dest)?,
                store_checksum: None,
            }),
            _ => Err(CloudError::NotFound(format!("the upload of `{key}`"))),
        };
    }
    receipts.sort_by_key(|r| r.number);
    for (i, r) in receipts.iter().enumerate() {
        if r.number as usize != i + 1 {
            return Err(CloudError::Other(format!(
                "upload of `{key}`: part {} is missing",
                i + 1
            )));
        }
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = temp_beside(dest);
    let done = (|| -> Result<ObjectInfo> {
        let mut out = File::create(&tmp)?;
        let mut h = Sha256Hasher::default();
        let mut bytes = 0u64;
        for r in &receipts {
            let mut part = Vec::new();
            File::open(dir.join(format!("{:05}", r.number)))?.read_to_end(&mut part)?;
            let mut ph = Sha256Hasher::default();
            ph.update(&part);
            if ph.finish_hex() != r.etag {
                return Err(CloudError::Other(format!(
                    "upload of `{key}`: part {} is not the one its receipt names",
                    r.number
                )));
            }
            // S3's rule, kept here so that local runs refuse what S3 would.
            if (part.len() as u64) < MIN_PART_BYTES && r.number as usize != receipts.len() {
                return Err(CloudError::Other(format!(
                    "upload of `{key}`: part {} is {} bytes; every part but the last must hold at least {MIN_PART_BYTES} (S3's EntityTooSmall)",
                    r.number,
                    part.len()
                )));
            }
            h.update(&part);
            out.write_all(&part)?;
            bytes += part.len() as u64;
        }
        out.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        Ok(ObjectInfo {
            bytes,
            sha256: h.finish_hex(),
            store_checksum: None,
        })
    })();
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return done;
    }
    std::fs::remove_dir_all(dir)?;
    // The uploads directory goes too once no upload is in progress.
    if let Some(uploads) = dir.parent() {
        let _ = std::fs::remove_dir(uploads);
    }
    done
}
