//! The directory store's in-place reader and writer: what the aggregation
//! streams from and to when it runs over local adapters (simulate, the
//! fault harness). The reader reads the file where it lies; the writer
//! writes a temporary file beside the destination and renames it into
//! place when the engine commits.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fedstep_core::bytes::temp_beside;
use fedstep_core::{ByteSink, ByteSource, OutputTarget};

use crate::checksum::sha256_file;
use crate::ports::{ObjectInfo, ObjectReader, ObjectWriter};

pub(super) struct FsReader {
    pub(super) key: String,
    pub(super) path: PathBuf,
    /// The size the stat saw: a file that changed size since is refused.
    pub(super) bytes: u64,
    /// Bytes read from the file so far.
    pub(super) fetched: AtomicU64,
}

impl FsReader {
    fn file(&self) -> std::io::Result<File> {
        let f = File::open(&self.path)?;
        let now = f.metadata()?.len();
        if now != self.bytes {
            return Err(std::io::Error::other(format!(
                "object `{}` changed size since it was checked ({} → {now} bytes)",
                self.key, self.bytes
            )));
        }
        Ok(f)
    }
}

impl ByteSource for FsReader {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.bytes)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file()?.read_exact_at(buf, offset)?;
        self.fetched.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn describe(&self) -> String {
        self.key.clone()
    }
}

impl ObjectReader for FsReader {
    fn sha256(&self) -> std::io::Result<String> {
        self.file()?;
        let sha = sha256_file(&self.path)?;
        self.fetched.fetch_add(self.bytes, Ordering::Relaxed);
        Ok(sha)
    }

    fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

pub(super) struct FsWriter {
    pub(super) dest: PathBuf,
    pub(super) key: String,
    /// The last finished attempt, not yet renamed into place.
    pub(super) staged: Staged,
}

/// Shared by a writer and its sinks: the temporary file of the last
/// finished attempt.
pub(super) type Staged = Arc<Mutex<Option<PathBuf>>>;

fn take(slot: &Staged) -> Option<PathBuf> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

impl OutputTarget for FsWriter {
    fn create(&self, len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        if let Some(dir) = self.dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = temp_beside(&self.dest);
        let file = File::create(&tmp)?;
        file.set_len(len)?;
        Ok(Box::new(FsSink {
            file,
            tmp: Some(tmp),
            staged: self.staged.clone(),
        }))
    }
    fn describe(&self) -> String {
        self.key.clone()
    }
}

impl ObjectWriter for FsWriter {
    fn commit(&self) -> std::io::Result<Option<ObjectInfo>> {
        let Some(tmp) = take(&self.staged) else {
            return Ok(None);
        };
        std::fs::rename(&tmp, &self.dest)?;
        Ok(Some(ObjectInfo {
            bytes: std::fs::metadata(&self.dest)?.len(),
            sha256: sha256_file(&self.dest)?,
            store_checksum: None,
        }))
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // Staged and never committed: the attempt is abandoned.
        if let Some(tmp) = take(&self.staged) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

struct FsSink {
    file: File,
    /// `None` once finished (then the writer owns the file).
    tmp: Option<PathBuf>,
    staged: Staged,
}

impl ByteSink for FsSink {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }
    fn finish(mut self: Box<Self>) -> std::io::Result<()> {
        self.file.sync_all()?;
        let tmp = self.tmp.take().expect("finished once");
        // A newer finished attempt replaces an older one.
        if let Some(old) = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(tmp)
        {
            let _ = std::fs::remove_file(old);
        }
        Ok(())
    }
}

impl Drop for FsSink {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}
