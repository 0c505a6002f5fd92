//! An S3 object written by the aggregation as it produces it: one
//! multipart upload per attempt, each part uploaded as soon as every byte
//! of it has been written, a few uploads in flight, nothing on local disk.
//! A finished attempt stays an incomplete upload (invisible) until the
//! engine commits it with CompleteMultipartUpload.
//!
//! The model writer produces a global model front to back, so parts
//! complete in order and are hashed on the way: the whole object's SHA-256
//! is known when the upload completes, and is stored as the object tag
//! `fedstep-sha256` (a multipart object's metadata must be given before its
//! first byte, when the hash is not known yet; `S3Store::head` reads the
//! tag back). Outputs written out of order (optimizer state: two moment
//! tensors filled side by side) are uploaded as their parts complete and
//! carry no hash. An attempt that is dropped before `finish` is aborted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Tag, Tagging};
use aws_smithy_types::base64;
use fedstep_cloud::ports::{ObjectInfo, ObjectWriter};
use fedstep_core::{ByteSink, OutputTarget};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::sdk_error;
use crate::s3::{hex, SHA256_TAG};

/// Smallest part (S3's minimum is 5 MiB for every part but the last).
const MIN_PART: u64 = 8 << 20;
/// S3's largest part count.
const MAX_PARTS: u64 = 10_000;
/// Part uploads in flight at once.
const IN_FLIGHT: usize = 4;

pub(crate) struct S3Writer {
    pub(crate) client: aws_sdk_s3::Client,
    pub(crate) bucket: String,
    pub(crate) key: String,
    pub(crate) handle: Handle,
    pub(crate) staged: Arc<Mutex<Option<Staged>>>,
}

/// A finished attempt: every part uploaded, the upload not yet completed.
pub(crate) struct Staged {
    upload_id: String,
    parts: Vec<CompletedPart>,
    len: u64,
    sha256: String,
}

/// The part size for an object of `len` bytes: at least 8 MiB, and large
/// enough that the object fits S3's 10 000 parts (rounded to whole MiB).
pub(crate) fn part_size(len: u64) -> u64 {
    let needed = len.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    needed.max(MIN_PART)
}

impl OutputTarget for S3Writer {
    fn create(&self, len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        let created = self
            .handle
            .block_on(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .send(),
            )
            .map_err(|e| {
                io(sdk_error(
                    &format!("S3 CreateMultipartUpload {}", self.key),
                    e,
                ))
            })?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| std::io::Error::other("S3 CreateMultipartUpload: no upload id"))?
            .to_string();
        Ok(Box::new(S3Sink {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            handle: self.handle.clone(),
            upload_id,
            len,
            part: part_size(len),
            staged: self.staged.clone(),
            state: Mutex::new(SinkState {
                next_hashed: Some(0),
                ..SinkState::default()
            }),
            finished: false,
        }))
    }

    fn describe(&self) -> String {
        self.key.clone()
    }
}

impl ObjectWriter for S3Writer {
    fn commit(&self) -> std::io::Result<Option<ObjectInfo>> {
        let Some(staged) = self.staged.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(None);
        };
        let completed = self
            .handle
            .block_on(
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&staged.upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(staged.parts))
                            .build(),
                    )
                    .send(),
            )
            .map_err(|e| {
                io(sdk_error(
                    &format!("S3 CompleteMultipartUpload {}", self.key),
                    e,
                ))
            })?;
        if !staged.sha256.is_empty() {
            let tagging = Tagging::builder()
                .tag_set(
                    Tag::builder()
                        .key(SHA256_TAG)
                        .value(&staged.sha256)
                        .build()
                        .map_err(std::io::Error::other)?,
                )
                .build()
                .map_err(std::io::Error::other)?;
            self.handle
                .block_on(
                    self.client
                        .put_object_tagging()
                        .bucket(&self.bucket)
                        .key(&self.key)
                        .set_version_id(completed.version_id().map(str::to_string))
                        .tagging(tagging)
                        .send(),
                )
                .map_err(|e| io(sdk_error(&format!("S3 PutObjectTagging {}", self.key), e)))?;
        }
        Ok(Some(ObjectInfo {
            bytes: staged.len,
            sha256: staged.sha256,
            store_checksum: None,
        }))
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Finished but never committed: the attempt was abandoned.
        let staged = self.staged.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(staged) = staged {
            abort(
                &self.client,
                &self.bucket,
                &self.key,
                staged.upload_id,
                &self.handle,
            );
        }
    }
}

/// Aborts an upload in the background, best effort: parts of an unfinished
/// upload are billed until aborted, and the bucket's lifecycle rule aborts
/// what this misses.
fn abort(client: &aws_sdk_s3::Client, bucket: &str, key: &str, upload_id: String, handle: &Handle) {
    let req = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id);
    handle.spawn(async move {
        let _ = req.send().await;
    });
}

struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    handle: Handle,
    upload_id: String,
    len: u64,
    part: u64,
    staged: Arc<Mutex<Option<Staged>>>,
    state: Mutex<SinkState>,
    finished: bool,
}

#[derive(Default)]
struct SinkState {
    /// Parts being filled: index → (bytes, how many written).
    filling: BTreeMap<u64, (Vec<u8>, u64)>,
    /// Uploads under way, in the order they were started.
    uploads: Vec<JoinHandle<std::io::Result<CompletedPart>>>,
    done: Vec<CompletedPart>,
    hasher: Sha256,
    /// The next part the hash expects; `None` once a part completed out
    /// of order (the object then gets no hash).
    next_hashed: Option<u64>,
    completed_parts: u64,
}

impl S3Sink {
    fn part_len(&self, i: u64) -> u64 {
        (self.len - i * self.part).min(self.part)
    }

    fn parts(&self) -> u64 {
        self.len.div_ceil(self.part).max(1)
    }

    /// Hashes (if in order) and starts uploading a complete part, waiting
    /// for the oldest upload first when too many are in flight.
    fn ship(&self, st: &mut SinkState, i: u64, data: Vec<u8>) -> std::io::Result<()> {
        match st.next_hashed {
            Some(n) if n == i => {
                st.hasher.update(&data);
                st.next_hashed = Some(i + 1);
            }
            _ => st.next_hashed = None,
        }
        while st.uploads.len() >= IN_FLIGHT {
            let oldest = st.uploads.remove(0);
            let part = self
                .handle
                .block_on(oldest)
                .map_err(std::io::Error::other)??;
            st.done.push(part);
        }
        let sha = Sha256::digest(&data);
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(i as i32 + 1)
            .content_length(data.len() as i64)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(base64::encode(sha))
            .body(data.into());
        let key = self.key.clone();
        st.uploads.push(self.handle.spawn(async move {
            let out = req
                .send()
                .await
                .map_err(|e| io(sdk_error(&format!("S3 UploadPart {key} #{}", i + 1), e)))?;
            Ok(CompletedPart::builder()
                .part_number(i as i32 + 1)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_sha256(out.checksum_sha256().map(str::to_string))
                .build())
        }));
        st.completed_parts += 1;
        Ok(())
    }
}

impl ByteSink for S3Sink {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let end = offset + bytes.len() as u64;
        if end > self.len {
            return Err(std::io::Error::other(format!(
                "write of {offset}..{end} past the end of `{}` ({} bytes)",
                self.key, self.len
            )));
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut pos = offset;
        while pos < end {
            let i = pos / self.part;
            let part_start = i * self.part;
            let plen = self.part_len(i);
            let from = (pos - part_start) as usize;
            let take = ((end - pos) as usize).min(plen as usize - from);
            let src = &bytes[(pos - offset) as usize..][..take];
            let entry = st
                .filling
                .entry(i)
                .or_insert_with(|| (vec![0u8; plen as usize], 0));
            entry.0[from..from + take].copy_from_slice(src);
            entry.1 += take as u64;
            if entry.1 >= plen {
                let (data, _) = st.filling.remove(&i).expect("present");
                self.ship(&mut st, i, data)?;
            }
            pos += take as u64;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> std::io::Result<()> {
        let mut st = std::mem::take(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()));
        if self.len == 0 {
            // An empty object still needs one (empty) part.
            self.ship(&mut st, 0, Vec::new())?;
        }
        if st.completed_parts != self.parts() || !st.filling.is_empty() {
            return Err(std::io::Error::other(format!(
                "`{}`: {} of {} parts were written in full",
                self.key,
                st.completed_parts,
                self.parts()
            )));
        }
        for job in std::mem::take(&mut st.uploads) {
            let part = self.handle.block_on(job).map_err(std::io::Error::other)??;
            st.done.push(part);
        }
        st.done.sort_by_key(|p| p.part_number());
        self.finished = true;
        let sha256 = match st.next_hashed {
            Some(_) => hex(&st.hasher.finalize()),
            None => String::new(),
        };
        let previous = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Staged {
                upload_id: self.upload_id.clone(),
                parts: std::mem::take(&mut st.done),
                len: self.len,
                sha256,
            });
        // A newer finished attempt replaces an older one.
        if let Some(old) = previous {
            abort(
                &self.client,
                &self.bucket,
                &self.key,
                old.upload_id,
                &self.handle,
            );
        }
        Ok(())
    }
}

impl Drop for S3Sink {
    fn drop(&mut self) {
        if !self.finished {
            let id = std::mem::take(&mut self.upload_id);
            abort(&self.client, &self.bucket, &self.key, id, &self.handle);
        }
    }
}

fn io(e: fedstep_cloud::CloudError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_respect_s3s_limits() {
        assert_eq!(part_size(0), MIN_PART);
        assert_eq!(part_size(100 << 20), MIN_PART);
        // 200 GB needs parts of 20 MB at 10 000 parts: rounded up to MiB.
        let p = part_size(200_000_000_000);
        assert!(p * MAX_PARTS >= 200_000_000_000);
        assert_eq!(p % (1 << 20), 0);
        assert!(p < MIN_PART * 3);
    }
}
