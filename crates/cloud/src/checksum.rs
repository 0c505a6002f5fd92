//! SHA-256 checksums as the ledger stores them: 64 lowercase hex digits.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Incremental hasher, for adapters that hash while they copy.
#[derive(Default)]
pub struct Sha256Hasher(Sha256);

impl Sha256Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish_hex(self) -> String {
        to_hex(&self.0.finalize())
    }
}

/// SHA-256 of a file, streamed (models can be large).
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256Hasher::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish_hex())
}

/// True for a SHA-256 written as this system writes and stores it: 64
/// lowercase hex digits (`to_hex` here; the S3 adapter lowercases the tag
/// it reads). The one check of that format, on every path: the client's
/// announcement decoder, the aggregator's update-row rule and the S3
/// adapter. Uppercase is refused, not folded: the client compares the
/// announced checksum with the downloaded model's byte for byte, so a
/// checksum in another spelling could never verify.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest_and_shape() {
        let mut h = Sha256Hasher::default();
        h.update(b"abc");
        let d = h.finish_hex();
        assert_eq!(
            d,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sha256_hex(&d));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"g".repeat(64)));
        assert!(!is_sha256_hex(&d.to_ascii_uppercase()));
    }
}
