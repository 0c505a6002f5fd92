//! One S3 object written in parts by several writers: the shards of a
//! sharded aggregation, each in its own process (a Lambda of the Map). The
//! upload is created once ([`S3Store::start_upload`]), every shard
//! uploads its own parts through an [`S3Parts`] (fedstep-core's
//! `PartStore`, fed by `ShardOutput`) and reports their receipts, and
//! whoever commits completes the upload from all of them
//! ([`S3Store::complete_parts`]). Until then nothing is visible; an
//! upload never completed is aborted by the bucket's lifecycle rule.

use std::sync::Mutex;

use aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadError;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::types::{Tag, Tagging};
use aws_smithy_types::base64;
use fedstep_cloud::error::Result;
use fedstep_cloud::ports::{ObjectInfo, ObjectStore, PartReceipt, StreamingStore, UploadParts};
use fedstep_cloud::CloudError;
use fedstep_core::shard::PartStore;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use crate::error::sdk_error;
use crate::s3::{S3Store, SHA256_TAG};

/// Read-ahead of the one pass that hashes a completed object.
const HASH_READ_AHEAD: u64 = 32 << 20;

/// One writer's handle on an upload in parts.
pub struct S3Parts {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: String,
    handle: Handle,
    receipts: Mutex<Vec<PartReceipt>>,
}

impl S3Store {
    /// Starts an upload in parts of `key` (parts carry SHA-256 checksums);
    /// returns its upload id.
    pub async fn start_upload(&self, key: &str) -> Result<String> {
        let created = self
            .client()
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("S3 CreateMultipartUpload {key}"), e))?;
        created
            .upload_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::Other("S3 CreateMultipartUpload: no upload id".into()))
    }

    /// A writer's handle on upload `upload_id` of `key`, for the blocking
    /// code of the aggregation (it must run inside this Tokio runtime's
    /// `spawn_blocking`).
    pub fn part_writer(&self, key: &str, upload_id: &str) -> Result<S3Parts> {
        let handle = Handle::try_current()
            .map_err(|e| CloudError::Other(format!("S3 parts outside a Tokio runtime: {e}")))?;
        Ok(S3Parts {
            client: self.client().clone(),
            bucket: self.bucket().to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            handle,
            receipts: Mutex::new(Vec::new()),
        })
    }

    /// Completes upload `upload_id` of `key` from every writer's receipts
    /// (in any order; numbers must run from 1 without a gap): the object
    /// becomes visible whole. An upload S3 no longer knows while an object
    /// is at `key` was completed before (a retried commit: only the
    /// commit completes, and nobody else holds this upload id).
    pub async fn complete_parts(
        &self,
        key: &str,
        upload_id: &str,
        mut receipts: Vec<PartReceipt>,
    ) -> Result<()> {
        receipts.sort_by_key(|r| r.number);
        if let Some((i, r)) = receipts
            .iter()
            .enumerate()
            .find(|(i, r)| r.number as usize != i + 1)
        {
            return Err(CloudError::Other(format!(
                "upload of `{key}`: part {} is missing (found {} at position {})",
                i + 1,
                r.number,
                i + 1
            )));
        }
        let parts: Vec<CompletedPart> = receipts
            .into_iter()
            .map(|r| {
                CompletedPart::builder()
                    .part_number(r.number as i32)
                    .e_tag(r.etag)
                    .set_checksum_sha256(r.sha256)
                    .build()
            })
            .collect();
        let completed = self
            .client()
            .complete_multipart_upload()
            .bucket(self.bucket())
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match completed {
            Ok(_) => Ok(()),
            Err(e) if is_no_such_upload(&e) && self.stat(key).await?.is_some() => Ok(()),
            Err(e) => {
                // Name what S3 holds: which parts, of which sizes.
                let held = self
                    .client()
                    .list_parts()
                    .bucket(self.bucket())
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await
                    .map(|l| {
                        l.parts()
                            .iter()
                            .map(|p| {
                                format!(
                                    "#{}: {} B",
                                    p.part_number().unwrap_or(0),
                                    p.size().unwrap_or(0)
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                Err(sdk_error(
                    &format!("S3 CompleteMultipartUpload {key} (parts held: {held})"),
                    e,
                ))
            }
        }
    }

    /// The SHA-256 of the object at `key`: its tag, or (none yet) one pass
    /// over its bytes, then kept as the tag `head` reads.
    pub async fn hash_and_tag(&self, key: &str) -> Result<ObjectInfo> {
        if let Some(info) = self.head(key).await? {
            if !info.sha256.is_empty() {
                return Ok(info);
            }
        }
        let stat = self
            .stat(key)
            .await?
            .ok_or_else(|| CloudError::NotFound(format!("object `{key}`")))?;
        let reader = self.reader(key, &stat, HASH_READ_AHEAD)?;
        let sha256 = tokio::task::spawn_blocking(move || reader.sha256())
            .await
            .map_err(|e| CloudError::Other(format!("the hashing task panicked: {e}")))?
            .map_err(|e| CloudError::Transient(format!("hashing `{key}`: {e}")))?;
        let tag = Tag::builder()
            .key(SHA256_TAG)
            .value(&sha256)
            .build()
            .map_err(|e| CloudError::Other(format!("tagging `{key}`: {e}")))?;
        let tagging = Tagging::builder()
            .tag_set(tag)
            .build()
            .map_err(|e| CloudError::Other(format!("tagging `{key}`: {e}")))?;
        self.client()
            .put_object_tagging()
            .bucket(self.bucket())
            .key(key)
            .set_version_id(
                stat.pin
                    .as_deref()
                    .and_then(|p| p.strip_prefix("v:"))
                    .map(str::to_string),
            )
            .tagging(tagging)
            .send()
            .await
            .map_err(|e| sdk_error(&format!("S3 PutObjectTagging {key}"), e))?;
        Ok(ObjectInfo {
            bytes: stat.bytes,
            sha256,
            store_checksum: stat.store_checksum.clone(),
        })
    }
}

fn is_no_such_upload(
    e: &aws_sdk_s3::error::SdkError<
        CompleteMultipartUploadError,
        aws_smithy_runtime_api::http::Response,
    >,
) -> bool {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "NoSuchUpload")
}

impl UploadParts for S3Parts {
    fn receipts(&self) -> Vec<PartReceipt> {
        self.receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl PartStore for S3Parts {
    /// Uploads one whole part (a retried part simply replaces the earlier
    /// upload of the same number).
    fn put_part(&self, number: u32, bytes: &[u8]) -> std::io::Result<()> {
        let sha = base64::encode(Sha256::digest(bytes));
        let out = self
            .handle
            .block_on(
                self.client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .upload_id(&self.upload_id)
                    .part_number(number as i32)
                    .content_length(bytes.len() as i64)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .checksum_sha256(sha)
                    .body(bytes.to_vec().into())
                    .send(),
            )
            .map_err(|e| {
                std::io::Error::other(sdk_error(
                    &format!("S3 UploadPart {} #{number}", self.key),
                    e,
                ))
            })?;
        let etag = out
            .e_tag()
            .ok_or_else(|| std::io::Error::other("S3 UploadPart: no ETag"))?
            .to_string();
        let mut receipts = self.receipts.lock().unwrap_or_else(|p| p.into_inner());
        receipts.retain(|r| r.number != number);
        receipts.push(PartReceipt {
            number,
            etag,
            sha256: out.checksum_sha256().map(str::to_string),
        });
        Ok(())
    }

    fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}
