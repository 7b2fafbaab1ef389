//! Non-repudiation log entries and RFC 6962 / RFC 9162 §2.1.1 hashing.
//!
//! An entry (`pb::LogEntry`) records ids, hashes, actors and times, never contents. Entries are
//! serialized once and stored; the Merkle leaf is `SHA-256(0x00 ‖ entry bytes)` and an interior
//! node `SHA-256(0x01 ‖ left ‖ right)`. Trees, proofs and checkpoints build on these two.

use crate::crypto::sha256;

/// Index of an entry in a gateway's log, starting at 0.
pub type LogIndex = u64;

/// RFC 6962 leaf hash: `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> [u8; 32] {
    sha256(&[&[0x00], entry])
}

/// RFC 6962 interior node hash: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    sha256(&[&[0x01], left, right])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_leaf_hash_matches_rfc6962() {
        // SHA-256(0x00), the leaf hash of an empty entry in RFC 6962 test data.
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn node_hash_is_domain_separated_from_leaves() {
        let l = leaf_hash(b"a");
        let r = leaf_hash(b"b");
        let n = node_hash(&l, &r);
        assert_ne!(n, leaf_hash(&[l, r].concat()));
    }
}
