//! An S3 object read in place by the aggregation: positioned reads served
//! from ranged GETs of fixed windows, fetched concurrently ahead of the
//! reader within a byte budget, every GET pinned to the version (or ETag)
//! the aggregator's HEAD saw. Nothing touches local disk.
//!
//! The numeric core reads each input front to back (tensors in file
//! order, blocks in order), so the windows after the one being read are
//! the ones it needs next; a read elsewhere drops the read-ahead and starts
//! again there. Bytes consumed in order are hashed on the way, so checking
//! the object's SHA-256 afterwards costs no second download.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aws_sdk_s3::error::ProvideErrorMetadata;
use bytes::Bytes;
use fedstep_cloud::ports::{ObjectReader, ObjectStat};
use fedstep_cloud::CloudError;
use fedstep_core::bytes::Unavailable;
use fedstep_core::ByteSource;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::error::sdk_error;
use crate::s3::hex;

/// Windows fetched ahead of the one being read (itself included).
const DEPTH: u64 = 4;
const MIN_WINDOW: u64 = 256 << 10;
/// The front of the object a read inside it fetches on its own, not as
/// part of window 0: the core opens every input by reading its header, and
/// a shard that aggregates a later slice should not fetch a whole window
/// for it.
const HEAD_BYTES: u64 = 64 << 10;
const MAX_WINDOW: u64 = 16 << 20;

/// What every GET of one reader is conditioned on.
#[derive(Debug, Clone)]
enum Pin {
    Version(String),
    ETag(String),
    None,
}

pub(crate) struct S3Reader {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    len: u64,
    pin: Pin,
    window: u64,
    handle: Handle,
    state: Mutex<State>,
    /// Hash what is read in order on the way (off for an object whose
    /// content the engine already bound by its store checksum).
    hash_on_the_way: bool,
    sha256: OnceLock<String>,
    /// Body bytes of every GET this reader made (read-ahead included).
    fetched: Arc<AtomicU64>,
}

type Fetch = JoinHandle<std::io::Result<Bytes>>;

#[derive(Default)]
struct State {
    /// Window index → its bytes, or the GET still under way.
    windows: BTreeMap<u64, Window>,
    /// The window the last read was served from, and how many windows in
    /// a row the reads have moved forward one at a time: without advice,
    /// read-ahead grows with that run (a header read fetches nothing
    /// ahead; a scan soon has [`DEPTH`] windows in flight).
    last_window: Option<u64>,
    run: u64,
    /// The object's first [`HEAD_BYTES`], once a read inside them came
    /// before window 0 was fetched.
    head: Option<Bytes>,
    /// The byte ranges the reads to come fall in ([`ByteSource::will_read`]),
    /// sorted; read-ahead then fetches only windows that overlap them.
    planned: Option<Vec<std::ops::Range<u64>>>,
    hasher: Sha256,
    /// Bytes `[0, hashed)` went through `hasher`, in order.
    hashed: u64,
}

enum Window {
    Pending(Fetch),
    Ready(Bytes),
}

impl S3Reader {
    /// `stat.pin` is `v:<version id>` or `e:<etag>` (see `S3Store::stat`).
    /// Must be called inside the Tokio runtime that will run the GETs.
    pub(crate) fn new(
        client: aws_sdk_s3::Client,
        bucket: String,
        key: String,
        stat: &ObjectStat,
        read_ahead: u64,
        hash_on_the_way: bool,
    ) -> Result<S3Reader, CloudError> {
        let handle = Handle::try_current()
            .map_err(|e| CloudError::Other(format!("S3 reader outside a Tokio runtime: {e}")))?;
        let pin = match stat.pin.as_deref() {
            Some(p) if p.starts_with("v:") => Pin::Version(p[2..].to_string()),
            Some(p) if p.starts_with("e:") => Pin::ETag(p[2..].to_string()),
            _ => Pin::None,
        };
        Ok(S3Reader {
            client,
            bucket,
            key,
            len: stat.bytes,
            pin,
            window: (read_ahead / DEPTH).clamp(MIN_WINDOW, MAX_WINDOW),
            handle,
            state: Mutex::new(State::default()),
            hash_on_the_way,
            sha256: OnceLock::new(),
            fetched: Arc::default(),
        })
    }

    fn windows(&self) -> u64 {
        self.len.div_ceil(self.window)
    }

    /// Starts the ranged GET of window `w`.
    fn fetch(&self, w: u64) -> Fetch {
        let start = w * self.window;
        let end = (start + self.window).min(self.len);
        self.handle
            .spawn(self.counted(get_range(self.request(), self.key.clone(), start, end)))
    }

    fn request(&self) -> aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder {
        let req = self.client.get_object().bucket(&self.bucket).key(&self.key);
        match &self.pin {
            Pin::Version(v) => req.version_id(v),
            Pin::ETag(e) => req.if_match(e),
            Pin::None => req,
        }
    }

    /// The windows to have requested while window `w` is read: `w`, then
    /// up to `DEPTH − 1` after it — the next planned ones when the reads
    /// to come were announced, else as many as the run of forward reads.
    fn keep(&self, st: &State, w: u64) -> Vec<u64> {
        let last = self.windows();
        let after = (w + 1)..last;
        let want = (DEPTH - 1) as usize;
        let ahead: Vec<u64> = match &st.planned {
            Some(ranges) => {
                // The planned ranges that end past window w, in order.
                let from = ranges.partition_point(|r| r.end <= after.start * self.window);
                let mut ahead = Vec::with_capacity(want);
                let mut next = after.start;
                for r in &ranges[from..] {
                    let first = (r.start / self.window).max(next);
                    let end = r.end.div_ceil(self.window).min(last);
                    ahead.extend((first..end).take(want - ahead.len()));
                    next = next.max(end);
                    if ahead.len() == want {
                        break;
                    }
                }
                ahead
            }
            None => after.take(st.run.min(DEPTH - 1) as usize).collect(),
        };
        std::iter::once(w).chain(ahead).collect()
    }

    /// The bytes of window `w`, keeping the windows [`Self::keep`] names
    /// requested and dropping every other one.
    fn window_bytes(&self, w: u64) -> std::io::Result<Bytes> {
        let pending = {
            let mut st = self.lock();
            // Another read from the same window leaves the read-ahead as it is.
            if st.last_window != Some(w) {
                st.run = if st.last_window.is_some_and(|l| l + 1 == w) {
                    st.run + 1
                } else {
                    0
                };
                st.last_window = Some(w);
                let keep = self.keep(&st, w);
                let stale: Vec<u64> = st
                    .windows
                    .keys()
                    .copied()
                    .filter(|i| !keep.contains(i))
                    .collect();
                for i in stale {
                    if let Some(Window::Pending(job)) = st.windows.remove(&i) {
                        job.abort();
                    }
                }
                for i in keep {
                    st.windows
                        .entry(i)
                        .or_insert_with(|| Window::Pending(self.fetch(i)));
                }
            }
            st.windows
                .entry(w)
                .or_insert_with(|| Window::Pending(self.fetch(w)));
            match st.windows.remove(&w) {
                Some(Window::Ready(b)) => {
                    st.windows.insert(w, Window::Ready(b.clone()));
                    return Ok(b);
                }
                Some(Window::Pending(job)) => job,
                None => unreachable!("window {w} was requested above"),
            }
        };
        // Wait without holding the lock.
        let bytes = self
            .handle
            .block_on(pending)
            .map_err(|e| std::io::Error::other(Unavailable(format!("S3 GET task: {e}"))))??;
        let mut st = self.lock();
        if self.hash_on_the_way && w * self.window == st.hashed {
            st.hasher.update(&bytes);
            st.hashed += bytes.len() as u64;
        }
        st.windows.insert(w, Window::Ready(bytes.clone()));
        Ok(bytes)
    }

    /// `get` with its body's bytes added to [`Self::fetched`].
    fn counted(
        &self,
        get: impl std::future::Future<Output = std::io::Result<Bytes>>,
    ) -> impl std::future::Future<Output = std::io::Result<Bytes>> {
        let fetched = self.fetched.clone();
        async move {
            let bytes = get.await?;
            fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(bytes)
        }
    }

    /// The object's front for a read inside it: window 0 if it is at hand,
    /// else [`HEAD_BYTES`] fetched once on their own; `None` when windows
    /// are no larger (window 0 is then the cheaper fetch).
    fn head(&self) -> std::io::Result<Option<Bytes>> {
        if self.window <= HEAD_BYTES {
            return Ok(None);
        }
        {
            let st = self.lock();
            if let Some(head) = &st.head {
                return Ok(Some(head.clone()));
            }
            if let Some(Window::Ready(w0)) = st.windows.get(&0) {
                return Ok(Some(w0.clone()));
            }
        }
        let end = HEAD_BYTES.min(self.len);
        let head = self.handle.block_on(self.counted(get_range(
            self.request(),
            self.key.clone(),
            0,
            end,
        )))?;
        self.lock().head = Some(head.clone());
        Ok(Some(head))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ByteSource for S3Reader {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if end > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {}..{end} past the end of {} bytes",
                    offset, self.len
                ),
            ));
        }
        if end <= HEAD_BYTES.min(self.len) {
            if let Some(head) = self.head()? {
                buf.copy_from_slice(&head[offset as usize..end as usize]);
                return Ok(());
            }
        }
        let mut pos = offset;
        while pos < end {
            let w = pos / self.window;
            let bytes = self.window_bytes(w)?;
            let from = (pos - w * self.window) as usize;
            let take = ((end - pos) as usize).min(bytes.len() - from);
            let at = (pos - offset) as usize;
            buf[at..at + take].copy_from_slice(&bytes[from..from + take]);
            pos += take as u64;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.key.clone()
    }

    fn will_read(&self, ranges: &[std::ops::Range<u64>]) {
        let mut st = self.lock();
        let mut planned: Vec<_> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
        planned.sort_by_key(|r| r.start);
        // Overlaps merged: ends then rise with starts (the search needs it).
        let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(planned.len());
        for r in planned {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        st.planned = Some(merged);
    }
}

impl ObjectReader for S3Reader {
    fn sha256(&self) -> std::io::Result<String> {
        if let Some(done) = self.sha256.get() {
            return Ok(done.clone());
        }
        // Whatever was not read in order: read now, front to back through
        // the windows, so the read-ahead keeps DEPTH GETs in flight (the
        // pass's announced ranges no longer apply).
        self.lock().planned = None;
        loop {
            let start = self.lock().hashed;
            if start >= self.len {
                break;
            }
            let bytes = self.window_bytes(start / self.window)?;
            let mut st = self.lock();
            // An unhashed reader's windows were not hashed on the way.
            if st.hashed == start {
                st.hasher.update(&bytes);
                st.hashed = start + bytes.len() as u64;
            }
        }
        let st = self.lock();
        let hex = hex(&st.hasher.clone().finalize());
        Ok(self.sha256.get_or_init(|| hex).clone())
    }

    fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

/// One ranged GET, as a read: the object's own problems (it changed since
/// the HEAD, vanished, is archived, is encrypted with a key we cannot use,
/// access denied) are plain errors, which reject its owner; the service
/// being busy or unreachable after the SDK's retries is [`Unavailable`].
async fn get_range(
    req: aws_sdk_s3::operation::get_object::builders::GetObjectFluentBuilder,
    key: String,
    start: u64,
    end: u64,
) -> std::io::Result<Bytes> {
    let want = end - start;
    let out = req
        .range(format!("bytes={start}-{}", end.saturating_sub(1)))
        .send()
        .await
        .map_err(|e| {
            let code = e.code().map(str::to_string);
            let mapped = sdk_error(&format!("S3 GetObject {key} bytes {start}-{end}"), e);
            read_error(code.as_deref(), mapped)
        })?;
    let body = out.body.collect().await.map_err(|e| {
        std::io::Error::other(Unavailable(format!(
            "S3 GetObject {key}: reading the body: {e}"
        )))
    })?;
    let bytes = body.into_bytes();
    if bytes.len() as u64 != want {
        return Err(std::io::Error::other(format!(
            "S3 GetObject {key}: asked for {want} bytes at {start}, got {} (the object changed?)",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Which side a failed GET is on (see [`get_range`]).
fn read_error(code: Option<&str>, err: CloudError) -> std::io::Error {
    match (code, err) {
        (Some("PreconditionFailed"), e) => {
            std::io::Error::other(format!("the object changed after it was checked ({e})"))
        }
        (_, CloudError::Transient(msg)) => std::io::Error::other(Unavailable(msg)),
        (_, e) => std::io::Error::other(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_services_are_the_systems_and_object_errors_the_clients() {
        let busy = read_error(
            Some("SlowDown"),
            CloudError::Transient("S3 GetObject k: SlowDown (HTTP 503)".into()),
        );
        assert!(fedstep_core::bytes::is_unavailable(&busy));
        for (code, err) in [
            (
                "PreconditionFailed",
                CloudError::Other("412 PreconditionFailed".into()),
            ),
            ("AccessDenied", CloudError::Other("403 AccessDenied".into())),
            (
                "InvalidObjectState",
                CloudError::Other("403 InvalidObjectState".into()),
            ),
            ("NoSuchVersion", CloudError::Other("404".into())),
        ] {
            let e = read_error(Some(code), err);
            assert!(!fedstep_core::bytes::is_unavailable(&e), "{code}");
        }
        assert!(
            read_error(Some("PreconditionFailed"), CloudError::Other("x".into()))
                .to_string()
                .contains("changed after it was checked")
        );
    }
}
