//! The identities a round is about: clients and the round itself.

use serde::{Deserialize, Serialize};

/// A client's id in a round. Ids order the clients canonically (pairwise
/// mask signs, key-derivation labels, the neighbour graph), so both ends of
/// a pair agree on every derived value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub u32);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The longest round id accepted, in bytes.
pub const MAX_ROUND_ID_LEN: usize = 256;

/// A round's public id. It labels every derived key and seeds the neighbour
/// graph, so no key, nonce or mask is ever reused across rounds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoundId(String);

/// A round id that is empty or too long.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("round id must be 1..={MAX_ROUND_ID_LEN} bytes, got {0}")]
pub struct RoundIdError(pub usize);

impl RoundId {
    /// Checks the length.
    pub fn new(id: impl Into<String>) -> Result<Self, RoundIdError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_ROUND_ID_LEN {
            return Err(RoundIdError(id.len()));
        }
        Ok(RoundId(id))
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RoundId {
    type Error = RoundIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        RoundId::new(s)
    }
}

impl From<RoundId> for String {
    fn from(r: RoundId) -> String {
        r.0
    }
}

/// Clips a reason to at most `MAX_REASON_LEN` characters, so a reason built
/// from untrusted input (a parser's message, say) stays bounded.
pub fn bounded_reason(reason: impl AsRef<str>) -> String {
    let reason = reason.as_ref();
    if reason.chars().count() <= MAX_REASON_LEN {
        return reason.to_owned();
    }
    let mut s: String = reason.chars().take(MAX_REASON_LEN - 1).collect();
    s.push('…');
    s
}

/// The longest exclusion reason, in characters.
pub const MAX_REASON_LEN: usize = 200;
