//! `ObjectStore` over a directory: key `a/b/c` is file `{root}/a/b/c`.
//!
//! Writes go to a temporary file beside the target and are renamed into
//! place, so a reader never sees half an object (as with S3). Files are
//! copied synchronously: this adapter serves local runs and tests, where
//! the runtime has nothing better to do meanwhile. Updates use the port's
//! default `put_update_file` (a plain put): local runs have no lifecycle
//! rule to mark them for.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use super::fs_objects::{FsReader, FsWriter};
use super::fs_parts::{self, FsParts};
use crate::checksum::{sha256_file, Sha256Hasher};
use crate::error::{CloudError, Result};
use crate::ports::{
    ObjectInfo, ObjectReader, ObjectStat, ObjectStore, ObjectWriter, PartReceipt, StreamingStore,
    UploadParts,
};

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// Creates `root` if needed.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(FsStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file behind a key. Keys are relative paths of plain segments: a
    /// key cannot reach outside the root (`..`, absolute, empty segments).
    pub fn path_of(&self, key: &str) -> Result<PathBuf> {
        let plain = !key.is_empty()
            && !key.contains('\\')
            && key
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
        if !plain {
            return Err(CloudError::Invalid(format!(
                "object key `{key}` must be a relative path of plain segments"
            )));
        }
        Ok(self.root.join(key))
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Copies `from` to `to` through a temporary file in `to`'s directory and
/// renames it into place; hashes the bytes on the way.
fn copy_atomic(from: &Path, to: &Path) -> std::io::Result<ObjectInfo> {
    let dir = to.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut src = File::open(from)?;
        let mut dst = File::create(&tmp)?;
        let mut h = Sha256Hasher::default();
        let mut buf = vec![0u8; 1 << 16];
        let mut bytes = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            dst.write_all(&buf[..n])?;
            bytes += n as u64;
        }
        dst.sync_all()?;
        std::fs::rename(&tmp, to)?;
        Ok(ObjectInfo {
            bytes,
            sha256: h.finish_hex(),
            store_checksum: None,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl ObjectStore for FsStore {
    async fn put_file(&self, key: &str, path: &Path) -> Result<ObjectInfo> {
        let dest = self.path_of(key)?;
        copy_atomic(path, &dest).map_err(|e| {
            CloudError::Io(std::io::Error::new(
                e.kind(),
                format!("uploading {} to `{key}`: {e}", path.display()),
            ))
        })
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<ObjectInfo> {
        let src = self.path_of(key)?;
        if !src.is_file() {
            return Err(CloudError::NotFound(format!("object `{key}`")));
        }
        copy_atomic(&src, path).map_err(|e| {
            CloudError::Io(std::io::Error::new(
                e.kind(),
                format!("downloading `{key}` to {}: {e}", path.display()),
            ))
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let p = self.path_of(key)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                bytes: m.len(),
                sha256: sha256_file(&p)?,
                store_checksum: None,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl StreamingStore for FsStore {
    async fn stat(&self, key: &str) -> Result<Option<ObjectStat>> {
        let p = self.path_of(key)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(Some(ObjectStat {
                bytes: m.len(),
                pin: None,
                // A directory verifies nothing when a file is written: the
                // engine hashes what it reads instead.
                store_checksum: None,
                unreadable: None,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn reader(
        &self,
        key: &str,
        stat: &ObjectStat,
        _read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        Ok(Arc::new(FsReader {
            key: key.to_string(),
            path: self.path_of(key)?,
            bytes: stat.bytes,
            fetched: Default::default(),
        }))
    }

    fn writer(&self, key: &str) -> Result<Arc<dyn ObjectWriter>> {
        Ok(Arc::new(FsWriter {
            dest: self.path_of(key)?,
            key: key.to_string(),
            staged: Default::default(),
        }))
    }

    async fn create_upload(&self, key: &str) -> Result<String> {
        self.path_of(key)?;
        let id = fs_parts::new_upload_id();
        std::fs::create_dir_all(fs_parts::upload_dir(&self.root, &id)?)?;
        Ok(id)
    }

    fn upload_parts(&self, key: &str, upload_id: &str) -> Result<Arc<dyn UploadParts>> {
        self.path_of(key)?;
        Ok(Arc::new(FsParts {
            dir: fs_parts::upload_dir(&self.root, upload_id)?,
            key: key.to_string(),
            receipts: Default::default(),
        }))
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        receipts: Vec<PartReceipt>,
    ) -> Result<ObjectInfo> {
        let dest = self.path_of(key)?;
        let dir = fs_parts::upload_dir(&self.root, upload_id)?;
        fs_parts::complete(&dir, &dest, key, receipts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_with_checksums_and_refuses_escaping_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("bucket")).unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, b"abc").unwrap();
        let put = store.put_file("jobs/j/x.bin", &src).await.unwrap();
        assert_eq!(put.bytes, 3);
        assert_eq!(store.head("jobs/j/x.bin").await.unwrap(), Some(put.clone()));
        // An update is an ordinary file here (a directory has no object tags).
        let update = store.put_update_file("jobs/j/u.bin", &src).await.unwrap();
        assert_eq!(update, put);
        assert_eq!(store.head("jobs/j/u.bin").await.unwrap(), Some(put.clone()));
        let out = dir.path().join("out/x.bin");
        assert_eq!(store.get_file("jobs/j/x.bin", &out).await.unwrap(), put);
        assert_eq!(std::fs::read(&out).unwrap(), b"abc");
        assert_eq!(store.head("jobs/j/none").await.unwrap(), None);
        assert!(matches!(
            store.get_file("jobs/j/none", &out).await,
            Err(CloudError::NotFound(_))
        ));
        for bad in ["../x", "/etc/passwd", "a//b", "", "a/./b", "a/"] {
            assert!(store.head(bad).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn reads_in_place_and_writes_whole_objects_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path().join("bucket")).unwrap();
        let src = dir.path().join("in.bin");
        std::fs::write(&src, b"abcdef").unwrap();
        let put = store.put_file("jobs/j/x.bin", &src).await.unwrap();
        let stat = store.stat("jobs/j/x.bin").await.unwrap().unwrap();
        assert_eq!((stat.bytes, stat.unreadable.as_deref()), (6, None));
        let r = store.reader("jobs/j/x.bin", &stat, 0).unwrap();
        let mut buf = [0u8; 3];
        r.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(&buf, b"cde");
        assert_eq!(r.sha256().unwrap(), put.sha256);
        // Changed underneath the reader: refused, not mixed.
        std::fs::write(store.path_of("jobs/j/x.bin").unwrap(), b"abcdefgh").unwrap();
        assert!(r.read_exact_at(&mut buf, 0).is_err());
        assert_eq!(store.stat("jobs/j/none").await.unwrap(), None);

        let w = store.writer("jobs/j/out/y.bin").unwrap();
        let sink = w.create(4).unwrap();
        sink.write_at(0, b"wxyz").unwrap();
        assert_eq!(
            store.head("jobs/j/out/y.bin").await.unwrap(),
            None,
            "not while written"
        );
        sink.finish().unwrap();
        assert_eq!(
            store.head("jobs/j/out/y.bin").await.unwrap(),
            None,
            "not before commit"
        );
        let info = w.commit().unwrap().unwrap();
        assert_eq!(store.head("jobs/j/out/y.bin").await.unwrap(), Some(info));
        assert_eq!(w.commit().unwrap(), None, "committed once");
        drop(w.create(4).unwrap());
        let staged = w.create(4).unwrap();
        staged.write_at(0, b"zzzz").unwrap();
        staged.finish().unwrap();
        drop(w);
        let names: Vec<_> = std::fs::read_dir(store.path_of("jobs/j/out").unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("y.bin")],
            "no partial or uncommitted attempt left"
        );
        assert_eq!(
            std::fs::read(store.path_of("jobs/j/out/y.bin").unwrap()).unwrap(),
            b"wxyz"
        );
    }
}
