//! `ObjectStore` on S3. Models move as files and are streamed both ways:
//! nothing holds a whole model in memory.

use std::path::Path;
use std::sync::Arc;

use aws_sdk_s3::operation::head_object::HeadObjectError;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, CompletedMultipartUpload, CompletedPart, StorageClass,
};
use aws_smithy_types::base64;
use fedstep_cloud::error::Result;
use fedstep_cloud::ports::{
    ObjectInfo, ObjectReader, ObjectStat, ObjectStore, ObjectWriter, PartReceipt, StreamingStore,
    UploadParts,
};
use fedstep_cloud::CloudError;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{required, AwsConfig};
use crate::error::{code, sdk_error};
use crate::s3_reader::S3Reader;
use crate::s3_writer::S3Writer;

/// Object metadata key holding the whole object's SHA-256 (lowercase hex).
/// S3's own checksum of a multipart object is a checksum of the part
/// checksums, so it cannot answer "what is this file's SHA-256"; this can.
pub const SHA256_METADATA: &str = "fedstep-sha256";

/// Object tag holding the whole object's SHA-256 where the metadata cannot:
/// an object the aggregator streamed up in parts learns its hash only after
/// the last byte (`s3_writer.rs`); `head` reads it when the metadata has none.
pub const SHA256_TAG: &str = "fedstep-sha256";

/// Object tag (URL-query form, as S3's `x-amz-tagging` takes it) set on
/// client updates. The bucket's lifecycle rule expires objects under `jobs/`
/// carrying it (infra/lib/model-store.ts `UPDATE_TAG`; infra's tests check
/// the two agree). Putting an object with tags needs `s3:PutObjectTagging`
/// besides `s3:PutObject`, which the client roles have on their own keys.
pub const UPDATE_TAGGING: &str = "fedstep-kind=update";

/// Files at least this large go up as a multipart upload.
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 * 1024 * 1024;
/// Part size of a multipart upload (S3: 5 MiB ≤ part ≤ 5 GiB, ≤ 10 000 parts).
pub const DEFAULT_PART_SIZE: u64 = 64 * 1024 * 1024;

const READ_BUF: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    multipart_threshold: u64,
    part_size: u64,
}

impl S3Store {
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> S3Store {
        S3Store {
            client,
            bucket: bucket.into(),
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            part_size: DEFAULT_PART_SIZE,
        }
    }

    /// `FEDSTEP_BUCKET` with the configured S3 client.
    pub fn from_config(cfg: &AwsConfig) -> Result<S3Store> {
        let bucket = required(&cfg.settings.bucket, "FEDSTEP_BUCKET")?;
        Ok(S3Store::new(cfg.s3(), bucket))
    }

    /// Multipart above `threshold` bytes, in parts of `part_size` (clamped
    /// to S3's 5 MiB minimum).
    pub fn with_multipart(mut self, threshold: u64, part_size: u64) -> S3Store {
        self.multipart_threshold = threshold.max(1);
        self.part_size = part_size.max(5 * 1024 * 1024);
        self
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn open_reader(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
        hash_on_the_way: bool,
    ) -> Result<Arc<dyn ObjectReader>> {
        Ok(Arc::new(S3Reader::new(
            self.client.clone(),
            self.bucket.clone(),
            key.to_string(),
            stat,
            read_ahead,
            hash_on_the_way,
        )?))
    }

    pub(crate) fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The `fedstep-sha256` tag of a streamed object; empty when it has
    /// none. Empty matches no checksum, so an update uploaded without one
    /// is rejected by the validator with a clear reason.
    async fn sha256_tag(&self, key: &str, version: Option<&str>) -> Result<String> {
        let tags = self
            .client
            .get_object_tagging()
            .bucket(&self.bucket)
            .key(key)
            .set_version_id(version.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(&format!("S3 GetObjectTagging {key}"), e))?;
        Ok(tags
            .tag_set()
            .iter()
            .find(|t| t.key() == SHA256_TAG)
            .map(|t| t.value().to_ascii_lowercase())
            .filter(|v| fedstep_cloud::checksum::is_sha256_hex(v))
            .unwrap_or_default())
    }

    /// Uploads `path` to `key`, single-part or multipart by size, with the
    /// given object tags (S3 sets them atomically with the object).
    async fn put_tagged(
        &self,
        key: &str,
        path: &Path,
        tagging: Option<&str>,
    ) -> Result<ObjectInfo> {
        let digest = digest_file(path, self.part_size).await?;
        // S3 answers with the checksum it verified and stored (whole or
        // composite): the token a row commits to (`store_checksum`).
        let store_checksum = if digest.bytes >= self.multipart_threshold && digest.parts.len() > 1 {
            self.put_multipart(key, path, &digest, tagging).await?
        } else {
            self.put_single(key, path, &digest, tagging).await?
        };
        Ok(ObjectInfo {
            bytes: digest.bytes,
            sha256: hex(&digest.sha256),
            store_checksum,
        })
    }

    async fn put_single(
        &self,
        key: &str,
        path: &Path,
        digest: &FileDigest,
        tagging: Option<&str>,
    ) -> Result<Option<String>> {
        let body = ByteStream::from_path(path)
            .await
            .map_err(|e| CloudError::Io(std::io::Error::other(e)))?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body)
            .content_length(digest.bytes as i64)
            // The precomputed value is sent as x-amz-checksum-sha256: S3
            // verifies the bytes against it and stores it with the object.
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(base64::encode(digest.sha256))
            .metadata(SHA256_METADATA, hex(&digest.sha256))
            .set_tagging(tagging.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(&format!("S3 PutObject {key}"), e))?;
        Ok(out.checksum_sha256().map(str::to_string))
    }

    async fn put_multipart(
        &self,
        key: &str,
        path: &Path,
        digest: &FileDigest,
        tagging: Option<&str>,
    ) -> Result<Option<String>> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .metadata(SHA256_METADATA, hex(&digest.sha256))
            .set_tagging(tagging.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(&format!("S3 CreateMultipartUpload {key}"), e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| CloudError::Other("S3 CreateMultipartUpload: no upload id".into()))?
            .to_string();
        match self.upload_parts(key, path, digest, &upload_id).await {
            Ok(parts) => {
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await;
                match done {
                    Ok(out) => Ok(out.checksum_sha256().map(str::to_string)),
                    Err(e) => {
                        self.abort(key, &upload_id).await;
                        Err(sdk_error(&format!("S3 CompleteMultipartUpload {key}"), e))
                    }
                }
            }
            Err(e) => {
                // Parts of an unfinished upload are billed until aborted.
                self.abort(key, &upload_id).await;
                Err(e)
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        digest: &FileDigest,
        upload_id: &str,
    ) -> Result<Vec<CompletedPart>> {
        let mut parts = Vec::with_capacity(digest.parts.len());
        for (i, part_sha) in digest.parts.iter().enumerate() {
            let offset = i as u64 * self.part_size;
            let len = (digest.bytes - offset).min(self.part_size);
            let number = i as i32 + 1;
            // Each part streams from its file range; it is not buffered.
            let body = ByteStream::read_from()
                .path(path)
                .offset(offset)
                .length(Length::Exact(len))
                .build()
                .await
                .map_err(|e| CloudError::Io(std::io::Error::other(e)))?;
            let out = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(body)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(base64::encode(part_sha))
                .send()
                .await
                .map_err(|e| sdk_error(&format!("S3 UploadPart {key} #{number}"), e))?;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
                    .build(),
            );
        }
        Ok(parts)
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(key, upload_id, error = %sdk_error("S3 AbortMultipartUpload", e), "abort failed; a bucket lifecycle rule must clean it up");
        }
    }
}

/// The whole file's SHA-256 and, for multipart, each part's.
struct FileDigest {
    bytes: u64,
    sha256: [u8; 32],
    parts: Vec<[u8; 32]>,
}

/// One pass over the file: the whole-file digest and per-part digests.
async fn digest_file(path: &Path, part_size: u64) -> Result<FileDigest> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut whole = Sha256::new();
    let mut part = Sha256::new();
    let mut in_part = 0u64;
    let mut parts = Vec::new();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        whole.update(chunk);
        bytes += n as u64;
        while !chunk.is_empty() {
            let take = ((part_size - in_part) as usize).min(chunk.len());
            part.update(&chunk[..take]);
            in_part += take as u64;
            chunk = &chunk[take..];
            if in_part == part_size {
                parts.push(part.finalize_reset().into());
                in_part = 0;
            }
        }
    }
    if in_part > 0 || parts.is_empty() {
        parts.push(part.finalize().into());
    }
    Ok(FileDigest {
        bytes,
        sha256: whole.finalize().into(),
        parts,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl ObjectStore for S3Store {
    // The inner future is returned as is (no `async` wrapper): the engine's
    // futures are deeply nested already, and every level counts against
    // rustc's query depth limit when fedstep-lambda computes their layout.
    fn put_file(
        &self,
        key: &str,
        path: &Path,
    ) -> impl std::future::Future<Output = Result<ObjectInfo>> + Send {
        self.put_tagged(key, path, None)
    }

    fn put_update_file(
        &self,
        key: &str,
        path: &Path,
    ) -> impl std::future::Future<Output = Result<ObjectInfo>> + Send {
        self.put_tagged(key, path, Some(UPDATE_TAGGING))
    }

    async fn get_file(&self, key: &str, path: &Path) -> Result<ObjectInfo> {
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if matches!(code(&e), Some("NoSuchKey" | "NotFound")) => {
                return Err(CloudError::NotFound(format!("s3://{}/{key}", self.bucket)))
            }
            Err(e) => return Err(sdk_error(&format!("S3 GetObject {key}"), e)),
        };
        // A temporary file beside the target, renamed into place when
        // complete: a partial download never sits at `path`, and the rename
        // stays on one file system.
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".fedstep-download-")
            .tempfile_in(dir)?;
        let (std_file, tmp_path) = tmp.into_parts();
        let mut file = tokio::fs::File::from_std(std_file);
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            CloudError::Transient(format!("S3 GetObject {key}: reading the body: {e}"))
        })? {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tmp_path
            .persist(path)
            .map_err(|e| CloudError::Io(e.error))?;
        Ok(ObjectInfo {
            bytes,
            sha256: hex(&hasher.finalize()),
            // Computed over the bytes received, not told by the store.
            store_checksum: None,
        })
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if matches!(e.as_service_error(), Some(HeadObjectError::NotFound(_))) => {
                return Ok(None)
            }
            Err(e) => return Err(sdk_error(&format!("S3 HeadObject {key}"), e)),
        };
        let bytes = out.content_length().unwrap_or(0).max(0) as u64;
        let from_metadata = out
            .metadata()
            .and_then(|m| m.get(SHA256_METADATA))
            .map(|s| s.to_ascii_lowercase());
        // Objects put by other tools: S3's own checksum is the file's SHA-256
        // only for a single-part upload (a composite one ends in "-<parts>").
        let from_checksum = || {
            out.checksum_sha256()
                .filter(|c| !c.contains('-'))
                .and_then(|c| base64::decode(c).ok())
                .filter(|raw| raw.len() == 32)
                .map(|raw| hex(&raw))
        };
        let sha256 = match from_metadata.or_else(from_checksum) {
            Some(sha) => sha,
            None => self.sha256_tag(key, out.version_id()).await?,
        };
        Ok(Some(ObjectInfo {
            bytes,
            sha256,
            store_checksum: out.checksum_sha256().map(str::to_string),
        }))
    }
}

impl StreamingStore for S3Store {
    async fn stat(&self, key: &str) -> Result<Option<ObjectStat>> {
        let out = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if matches!(e.as_service_error(), Some(HeadObjectError::NotFound(_))) => {
                return Ok(None)
            }
            Err(e) => {
                return match sdk_error(&format!("S3 HeadObject {key}"), e) {
                    // A HEAD the object itself refuses (customer-provided
                    // encryption answers 400, a key policy 403): the object
                    // is there and cannot be read, which is its owner's doing.
                    CloudError::Other(reason) => Ok(Some(ObjectStat {
                        bytes: 0,
                        pin: None,
                        store_checksum: None,
                        unreadable: Some(reason),
                    })),
                    transient => Err(transient),
                };
            }
        };
        let archived = matches!(
            out.storage_class(),
            Some(StorageClass::Glacier | StorageClass::DeepArchive)
        ) && !out
            .restore()
            .is_some_and(|r| r.contains("ongoing-request=\"false\""));
        let unreadable = if archived {
            Some(format!(
                "stored in the archived class {:?} (not restored)",
                out.storage_class().map(|c| c.as_str()).unwrap_or_default()
            ))
        } else {
            out.sse_customer_algorithm()
                .map(|a| format!("encrypted with a customer-provided key ({a})"))
        };
        let pin = match (out.version_id(), out.e_tag()) {
            (Some(v), _) if v != "null" => Some(format!("v:{v}")),
            (_, Some(e)) => Some(format!("e:{e}")),
            _ => None,
        };
        Ok(Some(ObjectStat {
            bytes: out.content_length().unwrap_or(0).max(0) as u64,
            pin,
            store_checksum: out.checksum_sha256().map(str::to_string),
            unreadable,
        }))
    }

    fn reader(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        self.open_reader(key, stat, read_ahead, true)
    }

    fn reader_unhashed(
        &self,
        key: &str,
        stat: &ObjectStat,
        read_ahead: u64,
    ) -> Result<Arc<dyn ObjectReader>> {
        self.open_reader(key, stat, read_ahead, false)
    }

    fn writer(&self, key: &str) -> Result<Arc<dyn ObjectWriter>> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| CloudError::Other(format!("S3 writer outside a Tokio runtime: {e}")))?;
        Ok(Arc::new(S3Writer {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            handle,
            staged: Default::default(),
        }))
    }

    async fn create_upload(&self, key: &str) -> Result<String> {
        self.start_upload(key).await
    }

    fn upload_parts(&self, key: &str, upload_id: &str) -> Result<Arc<dyn UploadParts>> {
        Ok(Arc::new(self.part_writer(key, upload_id)?))
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        receipts: Vec<PartReceipt>,
    ) -> Result<ObjectInfo> {
        self.complete_parts(key, upload_id, receipts).await?;
        self.hash_and_tag(key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn digests_whole_file_and_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(5 * 1024 * 1024 * 2 + 17)).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let part = 5 * 1024 * 1024;
        let d = digest_file(&path, part).await.unwrap();
        assert_eq!(d.bytes, data.len() as u64);
        assert_eq!(hex(&d.sha256), hex(&Sha256::digest(&data)));
        assert_eq!(d.parts.len(), 3);
        assert_eq!(
            d.parts[2],
            <[u8; 32]>::from(Sha256::digest(&data[2 * part as usize..]))
        );
        let empty = dir.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        let d = digest_file(&empty, part).await.unwrap();
        assert_eq!(d.parts.len(), 1);
        assert_eq!(
            hex(&d.sha256),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
