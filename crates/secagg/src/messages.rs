//! The messages of the four phases, as they travel (serde JSON).
//!
//! Fixed-length fields (keys, shares, ciphertexts) are [`FixedBytes`]: base64
//! whose decoded length is checked when the message is parsed, and unknown
//! fields are refused, so a message that parses is well-formed and only its
//! meaning (who sent it, to whom, how often) is left for the server to check.
//! Messages are authenticated only by the transport (the ledger's
//! IAM-authenticated rows): the sender id the transport vouches for is
//! passed to the server next to each message.
//!
//! [`FixedBytes`]: crate::bytes::FixedBytes

use serde::{Deserialize, Serialize};

use crate::ids::{ClientId, RoundId};
use crate::keys::PublicKeyBytes;
use crate::sealed_share::SealedShareBytes;
use crate::shamir::ShamirShare;

/// Phase 1, client → server: the client's two public keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertiseKeys {
    /// The sender.
    pub client: ClientId,
    /// Public key for sealing shares.
    pub c_pk: PublicKeyBytes,
    /// Public key for pairwise masks.
    pub s_pk: PublicKeyBytes,
}

/// End of phase 1, server → clients: everyone's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roster {
    /// The round.
    pub round: RoundId,
    /// The phase-1 survivors' keys, sorted by client id.
    pub clients: Vec<AdvertiseKeys>,
}

/// Phase 2, client → server: one sealed share bundle per neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareKeys {
    /// The dealer.
    pub from: ClientId,
    /// One entry per neighbour.
    pub shares: Vec<AddressedShare>,
}

/// One sealed share bundle and its recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressedShare {
    /// The neighbour it is for.
    pub to: ClientId,
    /// Sealed under the pairwise key of dealer and recipient.
    pub ciphertext: SealedShareBytes,
}

/// End of phase 2, server → one client: the bundles addressed to it by the
/// phase-2 survivors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedShares {
    /// The recipient.
    pub to: ClientId,
    /// One entry per surviving neighbour.
    pub shares: Vec<ReceivedShare>,
}

/// A sealed share bundle and its dealer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceivedShare {
    /// The dealer.
    pub from: ClientId,
    /// As the dealer sent it.
    pub ciphertext: SealedShareBytes,
}

/// Phase 3, client → server: the metadata of a masked input. The masked
/// vector itself (`vector_len` ring elements) travels separately as integers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskedInput {
    /// The sender.
    pub client: ClientId,
    /// The integer weight the quantized input was multiplied by.
    pub weight: u64,
    /// The masked vector's length.
    pub vector_len: u64,
    /// Forwarded bundles that did not open; the client did not mask with
    /// their dealers, and the server excludes those dealers.
    #[serde(default)]
    pub rejected_shares: Vec<ShareComplaint>,
}

/// A forwarded bundle the recipient could not use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareComplaint {
    /// The dealer.
    pub from: ClientId,
    /// Why (bounded by the server before it is recorded).
    pub reason: String,
}

/// End of phase 3, server → one client: which shares to reveal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnmaskRequest {
    /// The client asked.
    pub to: ClientId,
    /// Clients whose input is in the sum: reveal their self-mask shares.
    pub self_mask_of: Vec<ClientId>,
    /// Clients that dropped after sharing: reveal their secret-key shares.
    pub secret_key_of: Vec<ClientId>,
}

/// Phase 4, client → server: the requested shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unmask {
    /// The sender.
    pub client: ClientId,
    /// Shares of survivors' self-mask seeds.
    pub self_mask_shares: Vec<ShareOf>,
    /// Shares of dropped clients' `s` secret keys.
    pub secret_key_shares: Vec<ShareOf>,
}

/// A Shamir share of one client's secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareOf {
    /// Whose secret.
    pub of_client: ClientId,
    /// The share.
    pub share: ShamirShare,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::FixedBytes;

    fn round_trip<T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(m: &T) {
        let json = serde_json::to_string(m).unwrap();
        assert_eq!(&serde_json::from_str::<T>(&json).unwrap(), m, "{json}");
    }

    #[test]
    fn every_message_round_trips() {
        let a = AdvertiseKeys {
            client: ClientId(1),
            c_pk: FixedBytes([1; 32]),
            s_pk: FixedBytes([2; 32]),
        };
        round_trip(&a);
        round_trip(&Roster {
            round: RoundId::new("r").unwrap(),
            clients: vec![a],
        });
        let sealed = FixedBytes([3; crate::sealed_share::SEALED_SHARE_LEN]);
        round_trip(&ShareKeys {
            from: ClientId(1),
            shares: vec![AddressedShare {
                to: ClientId(2),
                ciphertext: sealed.clone(),
            }],
        });
        round_trip(&ForwardedShares {
            to: ClientId(2),
            shares: vec![ReceivedShare {
                from: ClientId(1),
                ciphertext: sealed,
            }],
        });
        round_trip(&MaskedInput {
            client: ClientId(1),
            weight: 3,
            vector_len: 10,
            rejected_shares: vec![ShareComplaint {
                from: ClientId(4),
                reason: "x".into(),
            }],
        });
        round_trip(&UnmaskRequest {
            to: ClientId(1),
            self_mask_of: vec![ClientId(2)],
            secret_key_of: vec![ClientId(3)],
        });
        let share = ShareOf {
            of_client: ClientId(2),
            share: FixedBytes([4; 33]),
        };
        round_trip(&Unmask {
            client: ClientId(1),
            self_mask_shares: vec![share.clone()],
            secret_key_shares: vec![share],
        });
    }

    #[test]
    fn wrong_lengths_and_unknown_fields_are_refused() {
        let short_share =
            serde_json::json!({"of_client": 2, "share": FixedBytes([4; 32]).to_base64()});
        let err = serde_json::from_value::<ShareOf>(short_share)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 33 bytes, got 32"), "{err}");
        let short_ct = serde_json::json!({"to": 2, "ciphertext": FixedBytes([0; 81]).to_base64()});
        assert!(serde_json::from_value::<AddressedShare>(short_ct).is_err());
        let long_key = serde_json::json!({
            "client": 1, "c_pk": FixedBytes([1; 33]).to_base64(), "s_pk": FixedBytes([2; 32]).to_base64()
        });
        assert!(serde_json::from_value::<AdvertiseKeys>(long_key).is_err());
        let extra =
            serde_json::json!({"client": 1, "weight": 1, "vector_len": 1, "vector": [1, 2]});
        assert!(serde_json::from_value::<MaskedInput>(extra).is_err());
    }
}
