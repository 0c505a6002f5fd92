//! The aggregator's in-place S3 I/O against the emulators: ranged,
//! pinned, read-ahead reads (`StreamingStore::reader`) and outputs
//! uploaded in parts as they are produced (`StreamingStore::writer`).
//! Setup: see common/mod.rs.

use crate::common;

use std::sync::Arc;

use common::unique;
use fedstep_aws::aws_sdk_s3::primitives::ByteStream;
use fedstep_aws::aws_sdk_s3::types::StorageClass;
use fedstep_cloud::ports::{ObjectStore, ObjectWriter, StreamingStore};
use fedstep_core::bytes::is_unavailable;
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reproducible, incompressible bytes.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn put(env: &common::TestEnv, key: &str, bytes: &[u8]) {
    env.s3
        .put_object()
        .bucket(env.store().bucket())
        .key(key)
        .body(ByteStream::from(bytes.to_vec()))
        .send()
        .await
        .unwrap();
}

/// Runs blocking reader/writer calls where the aggregation runs them.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_serves_positioned_reads_from_ranged_gets_and_hashes_on_the_way() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!("jobs/{}/rounds/1/updates/site-a.safetensors", unique("rd"));
    // Several 256 KiB windows (the smallest) and a ragged end.
    let data = content(1_300_017, 3);
    put(&env, &key, &data).await;
    let stat = store.stat(&key).await.unwrap().expect("the object");
    assert_eq!(stat.bytes, data.len() as u64);
    assert!(stat.pin.is_some(), "reads are pinned: {stat:?}");
    assert_eq!(stat.unreadable, None);

    // Front to back, in blocks that straddle windows: the hash comes free.
    let reader = store.reader(&key, &stat, 1 << 20).unwrap();
    let expect = data.clone();
    let r = reader.clone();
    let (got, sha) = blocking(move || {
        let mut got = vec![0u8; expect.len()];
        for (i, chunk) in got.chunks_mut(100_003).enumerate() {
            r.read_exact_at(chunk, (i * 100_003) as u64).unwrap();
        }
        (got, r.sha256().unwrap())
    })
    .await;
    assert!(got == data, "the bytes read back differ");
    assert_eq!(sha, hex(&Sha256::digest(&data)));

    // Out of order (a tensor layout unlike the reference's): still right,
    // and the hash reads what was skipped.
    let reader = store.reader(&key, &stat, 1 << 20).unwrap();
    let expect = data.clone();
    let sha = blocking(move || {
        let mut buf = vec![0u8; 5000];
        for off in [900_000u64, 10, 1_295_017, 400_000] {
            reader.read_exact_at(&mut buf, off).unwrap();
            assert_eq!(buf, expect[off as usize..off as usize + 5000], "at {off}");
        }
        let mut past = vec![0u8; 10];
        let err = reader.read_exact_at(&mut past, 1_300_010).unwrap_err();
        assert!(!is_unavailable(&err), "past the end is the input's problem");
        reader.sha256().unwrap()
    })
    .await;
    assert_eq!(sha, hex(&Sha256::digest(&data)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_replaced_after_its_stat_never_mixes_into_a_read() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!("jobs/{}/rounds/1/updates/site-b.safetensors", unique("pin"));
    let first = content(600_000, 5);
    put(&env, &key, &first).await;
    let stat = store.stat(&key).await.unwrap().unwrap();
    let reader = store.reader(&key, &stat, 1 << 20).unwrap();
    // The client overwrites its object between our HEAD and our reads.
    let second = content(600_000, 6);
    put(&env, &key, &second).await;
    let result = blocking(move || {
        let mut buf = vec![0u8; 600_000];
        reader.read_exact_at(&mut buf, 0).map(|_| buf)
    })
    .await;
    match result {
        // Versioned bucket: the read is pinned to the version we checked.
        Ok(buf) => assert!(buf == first, "read bytes of the replacement"),
        // ETag pin: the read is refused, as the object's (its owner's) fault.
        Err(e) => {
            assert!(!is_unavailable(&e), "{e}");
            assert!(e.to_string().contains("changed"), "{e}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_objects_are_reported_unreadable_before_any_read() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!(
        "jobs/{}/rounds/1/updates/site-c.safetensors",
        unique("arch")
    );
    env.s3
        .put_object()
        .bucket(store.bucket())
        .key(&key)
        .storage_class(StorageClass::Glacier)
        .body(ByteStream::from(content(1000, 7)))
        .send()
        .await
        .unwrap();
    let stat = store.stat(&key).await.unwrap().expect("it exists");
    let why = stat.unreadable.expect("a GLACIER object cannot be read");
    assert!(why.contains("archived"), "{why}");
    assert_eq!(store.stat(&format!("{key}.none")).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_uploads_parts_as_they_fill_and_tags_the_hash() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!("jobs/{}/rounds/2/global.safetensors", unique("wr"));
    // Three 8 MiB parts, the last one short.
    let data = content(20 * (1 << 20) + 123, 9);
    let writer: Arc<dyn ObjectWriter> = store.writer(&key).unwrap();
    let (w, d) = (writer.clone(), data.clone());
    blocking(move || {
        let sink = w.create(d.len() as u64).unwrap();
        for (i, chunk) in d.chunks(1_000_003).enumerate() {
            sink.write_at((i * 1_000_003) as u64, chunk).unwrap();
        }
        sink.finish().unwrap();
    })
    .await;
    // Finished is not visible: the engine commits after proving its inputs.
    assert_eq!(store.head(&key).await.unwrap(), None);
    let w = writer.clone();
    let written = blocking(move || w.commit())
        .await
        .unwrap()
        .expect("finished");
    let sha = hex(&Sha256::digest(&data));
    assert_eq!(
        (written.bytes, written.sha256.as_str()),
        (data.len() as u64, sha.as_str())
    );
    // head() finds the hash in the tag (a multipart object's metadata
    // could not hold it), and the bytes are the ones written.
    let head = store.head(&key).await.unwrap().unwrap();
    assert_eq!(head.sha256, sha);
    let dir = tempfile::tempdir().unwrap();
    let got = store.get_file(&key, &dir.path().join("g")).await.unwrap();
    assert_eq!(got.sha256, sha);

    // Written out of order (the back half first, so the last part completes
    // before the first): the same bytes arrive, without a hash.
    let key2 = format!("{key}.state");
    let writer = store.writer(&key2).unwrap();
    let (w, d) = (writer.clone(), data.clone());
    blocking(move || {
        let sink = w.create(d.len() as u64).unwrap();
        let half = d.len() / 2;
        for range in [half..d.len(), 0..half] {
            for start in range.clone().step_by(700_001) {
                let end = (start + 700_001).min(range.end);
                sink.write_at(start as u64, &d[start..end]).unwrap();
            }
        }
        sink.finish().unwrap();
    })
    .await;
    let w = writer.clone();
    assert_eq!(
        blocking(move || w.commit()).await.unwrap().unwrap().sha256,
        ""
    );
    let got = store.get_file(&key2, &dir.path().join("s")).await.unwrap();
    assert_eq!(got.sha256, sha);

    // An attempt dropped before `finish` leaves no object.
    let key3 = format!("{key}.abandoned");
    let writer = store.writer(&key3).unwrap();
    blocking(move || {
        let sink = writer.create(10 << 20).unwrap();
        sink.write_at(0, &[1u8; 9 << 20]).unwrap();
        let short = writer.create(4).unwrap();
        short.write_at(0, b"ab").unwrap();
        assert!(short.finish().is_err(), "2 of 4 bytes written");
        // Finished but never committed: dropping the writer abandons it.
        let staged = writer.create(3).unwrap();
        staged.write_at(0, b"abc").unwrap();
        staged.finish().unwrap();
    })
    .await;
    assert_eq!(store.head(&key3).await.unwrap(), None);
}

/// One object written in parts by several writers (the shards of an
/// aggregation, each in its own process): parts uploaded out of order by
/// whoever owns them, invisible until the upload is completed from all
/// the writers' receipts; a missing part is named, not guessed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_writers_upload_one_object_in_parts() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!("jobs/{}/rounds/3/global.safetensors", unique("parts"));
    let data = content(11 * (1 << 20) + 77, 5);
    let cuts = [0, 5 << 20, 10 << 20, data.len()];
    let upload_id = store.create_upload(&key).await.unwrap();
    let first = store.upload_parts(&key, &upload_id).unwrap();
    let second = store.upload_parts(&key, &upload_id).unwrap();
    let (a, b, d) = (first.clone(), second.clone(), data.clone());
    blocking(move || {
        // The second writer's part first, then the first writer's two.
        b.put_part(2, &d[cuts[1]..cuts[2]]).unwrap();
        a.put_part(3, &d[cuts[2]..cuts[3]]).unwrap();
        a.put_part(1, &d[cuts[0]..cuts[1]]).unwrap();
    })
    .await;
    assert_eq!(
        store.head(&key).await.unwrap(),
        None,
        "invisible until completed"
    );
    let mut receipts = first.receipts();
    assert_eq!(receipts.len(), 2);
    let err = store
        .complete_upload(&key, &upload_id, receipts.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("part 2 is missing"), "{err}");
    receipts.extend(second.receipts());
    let completed = store
        .complete_upload(&key, &upload_id, receipts.clone())
        .await
        .unwrap();
    let want = hex(&Sha256::digest(&data));
    assert_eq!(
        (completed.bytes, completed.sha256.as_str()),
        (data.len() as u64, want.as_str())
    );
    // Its hash is where HEAD-time checks look (the tag), and a retried
    // commit completing the same upload again finds the object, not an error.
    assert_eq!(store.head(&key).await.unwrap(), Some(completed.clone()));
    assert_eq!(
        store
            .complete_upload(&key, &upload_id, receipts)
            .await
            .unwrap(),
        completed
    );
    let dir = tempfile::tempdir().unwrap();
    let got = store.get_file(&key, &dir.path().join("o")).await.unwrap();
    assert_eq!(got.bytes, data.len() as u64);
    assert_eq!(got.sha256, want);
}

/// What a client's upload answers as the store's checksum is what the
/// aggregator's HEADs report, for one part and for many (S3's composite
/// `…-N`); a replacement of the same size reports another, so the plan
/// rejects it without reading a byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploads_store_checksum_is_what_head_and_stat_report_until_it_is_replaced() {
    let Some(env) = common::env().await else {
        return;
    };
    // Parts of 5 MiB (S3's smallest) above 6 MiB: 12 MiB is 3 parts.
    let store = env.store().with_multipart(6 << 20, 5 << 20);
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("single", 300_001usize), ("parts", 12 << 20)] {
        let key = format!("jobs/{}/rounds/1/updates/site-a.safetensors", unique(name));
        let file = dir.path().join(name);
        std::fs::write(&file, content(len, 7)).unwrap();
        let put = store.put_update_file(&key, &file).await.unwrap();
        let told = put
            .store_checksum
            .clone()
            .expect("S3 answers the checksum it verified");
        assert_eq!(told.ends_with("-3"), name == "parts", "{name}: {told}");
        let stat = store.stat(&key).await.unwrap().unwrap();
        assert_eq!(
            stat.store_checksum.as_deref(),
            Some(told.as_str()),
            "{name}"
        );
        let head = store.head(&key).await.unwrap().unwrap();
        assert_eq!(
            head.store_checksum.as_deref(),
            Some(told.as_str()),
            "{name}"
        );
        assert_eq!(head.sha256, put.sha256, "{name}");

        std::fs::write(&file, content(len, 8)).unwrap();
        store.put_update_file(&key, &file).await.unwrap();
        let replaced = store.stat(&key).await.unwrap().unwrap();
        assert_eq!(replaced.bytes, stat.bytes);
        assert_ne!(replaced.store_checksum, stat.store_checksum, "{name}");
    }
}

/// A reader told which ranges will be read fetches those and the 64 KiB
/// its header read fell in, none of the read-ahead past them; an unhashed
/// reader still hashes on request, by reading the object through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_told_its_ranges_fetches_only_them() {
    let Some(env) = common::env().await else {
        return;
    };
    let store = env.store();
    let key = format!("jobs/{}/rounds/1/updates/site-a.safetensors", unique("adv"));
    // 256 KiB windows (1 MiB of read-ahead over 4), 40 of them.
    let data = content(10 << 20, 9);
    put(&env, &key, &data).await;
    let stat = store.stat(&key).await.unwrap().unwrap();
    let window = 256u64 << 10;
    // Windows 2 to 5, then window 30.
    let ranges = [2 * window + 100..5 * window + 7, 30 * window..31 * window];
    let reader = store.reader_unhashed(&key, &stat, 1 << 20).unwrap();
    let (r, expect) = (reader.clone(), data.clone());
    let fetched = blocking(move || {
        // A header read first, as the core opens an input.
        let mut head = vec![0u8; 8];
        r.read_exact_at(&mut head, 0).unwrap();
        r.will_read(&ranges);
        for range in &ranges {
            for at in (range.start..range.end).step_by(65_536) {
                let mut buf = vec![0u8; (range.end - at).min(65_536) as usize];
                r.read_exact_at(&mut buf, at).unwrap();
                assert!(buf[..] == expect[at as usize..at as usize + buf.len()]);
            }
        }
        r.bytes_fetched()
    })
    .await;
    assert_eq!(
        fetched,
        (64 << 10) + 5 * window,
        "64 KiB for the header, windows 2 to 5 and 30"
    );
    let sha = blocking(move || reader.sha256().unwrap()).await;
    assert_eq!(sha, hex(&Sha256::digest(&data)));
}
