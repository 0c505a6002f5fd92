//! Fixed-length byte strings that travel as base64 in JSON.
//!
//! The length is part of the type, so a key, share or ciphertext of the
//! wrong length is refused when the message is parsed, once, at the
//! boundary; nothing downstream checks lengths again.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroize;

/// `N` bytes, serialized as standard base64 (with padding).
#[derive(Clone, PartialEq, Eq, Hash, Zeroize)]
pub struct FixedBytes<const N: usize>(pub [u8; N]);

impl<const N: usize> std::fmt::Debug for FixedBytes<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Short and enough to tell values apart in test output.
        write!(
            f,
            "FixedBytes<{N}>({})",
            STANDARD.encode(&self.0[..N.min(6)])
        )
    }
}

impl<const N: usize> FixedBytes<N> {
    /// Parses base64 that must decode to exactly `N` bytes.
    pub fn from_base64(text: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(text)
            .map_err(|e| format!("not base64: {e}"))?;
        let array: [u8; N] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("expected {N} bytes, got {}", bytes.len()))?;
        Ok(FixedBytes(array))
    }

    /// The base64 text.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl<const N: usize> Serialize for FixedBytes<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de, const N: usize> Deserialize<'de> for FixedBytes<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        FixedBytes::from_base64(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_wrong_lengths() {
        let b = FixedBytes([9u8; 32]);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<FixedBytes<32>>(&json).unwrap(), b);
        let err = serde_json::from_str::<FixedBytes<33>>(&json)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 33 bytes, got 32"), "{err}");
        assert!(serde_json::from_str::<FixedBytes<32>>("\"!!\"").is_err());
        assert!(serde_json::from_str::<FixedBytes<32>>("17").is_err());
    }
}
