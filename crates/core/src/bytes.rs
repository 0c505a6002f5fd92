//! Where aggregation's bytes come from and go to, as two small traits, so
//! the core streams models from anything with positioned reads (a local
//! file, an S3 object read with ranged GETs) and writes its output to
//! anything that takes positioned writes (a file, an S3 multipart upload),
//! while staying synchronous and free of AWS. Nothing is staged on disk.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// An input with positioned reads. Calls come from the aggregation's
/// reader thread, so implementations are `Send + Sync`; a read that blocks
/// on the network simply blocks that thread.
pub trait ByteSource: Send + Sync {
    /// Total size in bytes.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` with the bytes starting at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// What to call this input in messages (a path, an object key).
    fn describe(&self) -> String;
    /// A hint: the reads to come fall within `ranges`. A source that reads
    /// ahead (an S3 object) may fetch only what they cover, so a shard
    /// fetches its share of an input and not the bytes after it. Reads
    /// outside them still work. The default ignores it.
    fn will_read(&self, ranges: &[std::ops::Range<u64>]) {
        let _ = ranges;
    }
}

/// The marker of a read that failed for reasons of the system's, not the
/// input's (the store throttled or was unreachable after its retries). The
/// core rejects an input whose read fails, since a vanished or unreadable
/// object is its owner's doing; a source wraps a failure in this type
/// (`std::io::Error::other(Unavailable(..))`) to say "retry the whole
/// aggregation instead": [`AggregateError::Unavailable`](crate::AggregateError).
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Whether `e` carries [`Unavailable`].
pub fn is_unavailable(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unavailable>())
}

/// A shared handle to an input: cheap to clone, readable from any thread.
#[derive(Clone)]
pub struct Input(Arc<dyn ByteSource>);

impl Input {
    pub fn new(source: Arc<dyn ByteSource>) -> Input {
        Input(source)
    }
    /// A local file, opened on first use (so a missing file is reported
    /// where it is read, as that input's problem).
    pub fn file(path: impl Into<PathBuf>) -> Input {
        Input(Arc::new(FileBytes {
            path: path.into(),
            file: OnceLock::new(),
        }))
    }
    pub fn source(&self) -> &dyn ByteSource {
        self.0.as_ref()
    }
}

impl fmt::Debug for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Input({})", self.0.describe())
    }
}

/// A local file read with `pread` (never mmapped: mapped pages would count
/// as resident memory, and N mapped models is what streaming must avoid).
struct FileBytes {
    path: PathBuf,
    file: OnceLock<Result<File, (std::io::ErrorKind, String)>>,
}

impl FileBytes {
    fn file(&self) -> std::io::Result<&File> {
        self.file
            .get_or_init(|| File::open(&self.path).map_err(|e| (e.kind(), e.to_string())))
            .as_ref()
            .map_err(|(kind, msg)| std::io::Error::new(*kind, msg.clone()))
    }
}

impl ByteSource for FileBytes {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.file()?.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file()?.read_exact_at(buf, offset)
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Where an output goes. `create` is called once per attempt at writing
/// it (a pass that restarts without a rejected input starts a new one); an
/// attempt becomes visible only through [`ByteSink::finish`].
pub trait OutputTarget: Sync {
    /// Starts an output of exactly `len` bytes.
    fn create(&self, len: u64) -> std::io::Result<Box<dyn ByteSink>>;
    fn describe(&self) -> String;
}

/// One output being written. The model writer writes each tensor in file
/// order (the header first), so a sink that needs order (an upload in
/// parts) buffers only what is in flight; positioned writes out of order
/// (the optimizer's two moment tensors side by side) are allowed. Dropping
/// a sink without `finish` discards what was written.
pub trait ByteSink: Send + Sync {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()>;
    /// Makes the whole output visible at its destination.
    fn finish(self: Box<Self>) -> std::io::Result<()>;
}

/// A local file, written under a temporary name beside it and renamed into
/// place on `finish`, so a reader never sees a half-written model.
pub struct FileTarget {
    path: PathBuf,
}

impl FileTarget {
    pub fn new(path: impl Into<PathBuf>) -> FileTarget {
        FileTarget { path: path.into() }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A fresh temporary path beside `dest` (same directory, so the final
/// rename stays on one file system), unique per call: two attempts at the
/// same output (racing aggregators in one process) never share one.
pub fn temp_beside(dest: &Path) -> PathBuf {
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    dir.join(format!(
        ".{name}.{}-{}.partial",
        std::process::id(),
        ATTEMPT.fetch_add(1, Ordering::Relaxed)
    ))
}

impl OutputTarget for FileTarget {
    fn create(&self, len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        let tmp = temp_beside(&self.path);
        let file = File::create(&tmp)?;
        file.set_len(len)?;
        Ok(Box::new(FileSink {
            file,
            tmp,
            dest: self.path.clone(),
            done: false,
        }))
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

struct FileSink {
    file: File,
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl ByteSink for FileSink {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }
    fn finish(mut self: Box<Self>) -> std::io::Result<()> {
        self.file.sync_all()?;
        std::fs::rename(&self.tmp, &self.dest)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_an_error_of_that_input_when_read() {
        let input = Input::file("/nonexistent/fedstep/x.safetensors");
        let err = input.source().size().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(!is_unavailable(&err));
        assert!(format!("{input:?}").contains("x.safetensors"));
    }

    #[test]
    fn unavailable_is_recognised_through_io_error() {
        let e = std::io::Error::other(Unavailable("throttled".into()));
        assert!(is_unavailable(&e));
        assert!(!is_unavailable(&std::io::Error::other("gone")));
    }

    #[test]
    fn file_sink_is_visible_only_after_finish() {
        let dir = tempfile::tempdir().unwrap();
        let target = FileTarget::new(dir.path().join("m.bin"));
        let sink = target.create(4).unwrap();
        sink.write_at(2, b"cd").unwrap();
        sink.write_at(0, b"ab").unwrap();
        assert!(!dir.path().join("m.bin").exists());
        sink.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("m.bin")).unwrap(), b"abcd");
        drop(target.create(4).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
