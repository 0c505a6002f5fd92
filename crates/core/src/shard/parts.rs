//! Writing one shard's parts of an output: an [`OutputTarget`] that takes
//! the model writer's positioned writes, keeps only the bytes of this
//! shard's parts, and either hands each part over whole as soon as it is
//! complete (an S3 `UploadPart`: [`PartStore`]) or writes the bytes in
//! place into the whole output ([`InPlace`]: one process writing every
//! shard, or the only one). Writes come in file order, so only the parts
//! being filled are in memory, and in place nothing is buffered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::plan::Part;
use crate::bytes::{ByteSink, OutputTarget};

/// Where a shard's complete parts go (an upload in parts).
pub trait PartStore: Send + Sync {
    fn put_part(&self, number: u32, bytes: &[u8]) -> std::io::Result<()>;
    fn describe(&self) -> String;
}

/// The whole output, shared by the shards that write into it in place;
/// `finish` makes it visible once every shard is done.
pub struct InPlace {
    sink: Mutex<Option<Box<dyn ByteSink>>>,
    name: String,
}

impl InPlace {
    /// Starts the whole output at `target`.
    pub fn create(target: &dyn OutputTarget, len: u64) -> std::io::Result<Arc<InPlace>> {
        Ok(Arc::new(InPlace {
            sink: Mutex::new(Some(target.create(len)?)),
            name: target.describe(),
        }))
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        match &*self.sink.lock().expect("no panics while held") {
            Some(sink) => sink.write_at(offset, bytes),
            None => Err(std::io::Error::other("the output is already finished")),
        }
    }

    /// Makes the output visible (every shard's writer finished first).
    pub fn finish(&self) -> std::io::Result<()> {
        match self.sink.lock().expect("no panics while held").take() {
            Some(sink) => sink.finish(),
            None => Err(std::io::Error::other("the output is already finished")),
        }
    }
}

/// Where a shard's bytes go.
#[derive(Clone)]
pub enum PartDest {
    Whole(Arc<dyn PartStore>),
    InPlace(Arc<InPlace>),
}

/// The parts of one output that one shard writes.
pub struct ShardOutput {
    parts: Vec<Part>,
    dest: PartDest,
}

impl ShardOutput {
    /// `parts` are every part of the output; only shard `shard`'s are kept.
    pub fn new(parts: &[Part], shard: usize, dest: PartDest) -> ShardOutput {
        ShardOutput {
            parts: parts.iter().filter(|p| p.shard == shard).cloned().collect(),
            dest,
        }
    }
}

impl OutputTarget for ShardOutput {
    fn create(&self, _len: u64) -> std::io::Result<Box<dyn ByteSink>> {
        Ok(Box::new(ShardSink {
            filling: Mutex::new(vec![Filling::default(); self.parts.len()]),
            parts: self.parts.clone(),
            dest: self.dest.clone(),
        }))
    }
    fn describe(&self) -> String {
        match &self.dest {
            PartDest::Whole(store) => store.describe(),
            PartDest::InPlace(out) => out.name.clone(),
        }
    }
}

/// One part being written.
#[derive(Clone, Default)]
struct Filling {
    /// Its bytes so far, when it is handed over whole (freed once sent).
    buf: Vec<u8>,
    /// How many of its bytes were written.
    written: u64,
}

struct ShardSink {
    parts: Vec<Part>,
    filling: Mutex<Vec<Filling>>,
    dest: PartDest,
}

impl ByteSink for ShardSink {
    /// Bytes outside this shard's parts are dropped: the writer of every
    /// shard writes the header, which only the first part keeps.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        let end = offset + bytes.len() as u64;
        let mut filling = self.filling.lock().expect("no panics while held");
        for (p, f) in self.parts.iter().zip(filling.iter_mut()) {
            let (lo, hi) = (offset.max(p.bytes.start), end.min(p.bytes.end));
            if lo >= hi {
                continue;
            }
            let piece = &bytes[(lo - offset) as usize..(hi - offset) as usize];
            let len = p.bytes.end - p.bytes.start;
            f.written += hi - lo;
            match &self.dest {
                PartDest::InPlace(out) => out.write_at(lo, piece)?,
                PartDest::Whole(store) => {
                    f.buf.resize(len as usize, 0);
                    let at = (lo - p.bytes.start) as usize;
                    f.buf[at..at + piece.len()].copy_from_slice(piece);
                    if f.written == len {
                        store.put_part(p.number, &std::mem::take(&mut f.buf))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails unless every part of this shard was written whole.
    fn finish(self: Box<Self>) -> std::io::Result<()> {
        let filling = self.filling.into_inner().expect("no panics while held");
        for (p, f) in self.parts.iter().zip(&filling) {
            let len = p.bytes.end - p.bytes.start;
            if f.written != len {
                return Err(std::io::Error::other(format!(
                    "part {} got {} of its {len} bytes",
                    p.number, f.written
                )));
            }
        }
        Ok(())
    }
}

/// Parts kept in memory (tests).
#[derive(Default)]
pub struct MemoryParts {
    parts: Mutex<BTreeMap<u32, Vec<u8>>>,
}

impl MemoryParts {
    /// The parts put so far, by number.
    pub fn take(&self) -> BTreeMap<u32, Vec<u8>> {
        std::mem::take(&mut self.parts.lock().expect("no panics while held"))
    }
}

impl PartStore for MemoryParts {
    fn put_part(&self, number: u32, bytes: &[u8]) -> std::io::Result<()> {
        self.parts
            .lock()
            .expect("no panics while held")
            .insert(number, bytes.to_vec());
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::FileTarget;

    fn parts() -> Vec<Part> {
        vec![
            Part {
                number: 1,
                shard: 0,
                bytes: 0..4,
            },
            Part {
                number: 2,
                shard: 1,
                bytes: 4..6,
            },
            Part {
                number: 3,
                shard: 1,
                bytes: 6..10,
            },
        ]
    }

    #[test]
    fn a_shard_keeps_its_parts_and_hands_each_over_when_whole() {
        let store = Arc::new(MemoryParts::default());
        let target = ShardOutput::new(&parts(), 1, PartDest::Whole(store.clone()));
        let sink = target.create(10).unwrap();
        sink.write_at(0, b"head").unwrap(); // shard 0's: dropped
        sink.write_at(3, b"xyz").unwrap(); // 3 is shard 0's, 4..6 ours
        assert_eq!(store.take(), BTreeMap::from([(2, b"yz".to_vec())]));
        sink.write_at(8, b"89").unwrap();
        assert!(store.take().is_empty(), "part 3 is not whole yet");
        sink.write_at(6, b"67").unwrap();
        sink.finish().unwrap();
        assert_eq!(store.take(), BTreeMap::from([(3, b"6789".to_vec())]));
    }

    #[test]
    fn finishing_with_a_part_unwritten_fails() {
        let store = Arc::new(MemoryParts::default());
        let sink = ShardOutput::new(&parts(), 1, PartDest::Whole(store))
            .create(10)
            .unwrap();
        sink.write_at(4, b"456").unwrap();
        let err = sink.finish().unwrap_err();
        assert!(
            err.to_string().contains("part 3 got 1 of its 4 bytes"),
            "{err}"
        );
    }

    #[test]
    fn shards_in_place_make_one_file_visible_only_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("m.bin");
        let whole = InPlace::create(&FileTarget::new(&dest), 10).unwrap();
        for shard in [1, 0] {
            let sink = ShardOutput::new(&parts(), shard, PartDest::InPlace(whole.clone()))
                .create(10)
                .unwrap();
            sink.write_at(0, b"0123456789").unwrap();
            sink.finish().unwrap();
        }
        assert!(!dest.exists());
        whole.finish().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"0123456789");
    }
}
