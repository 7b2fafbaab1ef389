//! Every cryptographic primitive Accord uses, in one place a reviewer reads in one sitting.
//!
//! - Signatures: Ed25519 (`ring`), always through [`SigningKey::sign`] with a [`Domain`], so no
//!   signature of one kind can be replayed as another.
//! - Hashing: SHA-256 (`ring`).
//! - Sealing: HPKE base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM ([`hpke`]).
//! - Randomness: the operating system's CSPRNG through `ring`.

pub mod hpke;

use std::fmt;

use ring::rand::SecureRandom;
use ring::signature::{self, KeyPair};
use zeroize::Zeroizing;

/// Why a cryptographic operation failed. Deliberately carries no detail an attacker could use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CryptoError {
    /// The signature does not verify under the given key and domain.
    #[error("signature does not verify")]
    BadSignature,
    /// A key has the wrong length or is not a valid point.
    #[error("malformed key")]
    BadKey,
    /// The operating system's random source failed.
    #[error("random source failed")]
    Random,
}

/// Domain separation: every signature of the system starts with its own prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// Sender signature over an envelope.
    Envelope,
    /// Gateway or organisation signature over a receipt body.
    Receipt,
    /// A country's signature over its directory.
    Directory,
    /// C2SP signed-note signature by a gateway's log key. The spec fixes the message (the
    /// note text itself), so the prefix is empty; separation comes from the log key signing
    /// nothing else and from the note key id binding the signature type (0x01).
    SignedNote,
    /// C2SP tlog-cosignature by a witness key: the spec's `cosignature/v1` header line.
    Cosignature,
}

impl Domain {
    pub fn prefix(self) -> &'static [u8] {
        match self {
            Domain::Envelope => b"accord/v1/envelope",
            Domain::Receipt => b"accord/v1/receipt",
            Domain::Directory => b"accord/v1/directory",
            Domain::SignedNote => b"",
            Domain::Cosignature => b"cosignature/v1\n",
        }
    }
}

/// SHA-256 of the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// `u64be(len)`: the 8-byte big-endian length prefix of DESIGN.md.
pub fn len_be(bytes: &[u8]) -> [u8; 8] {
    (bytes.len() as u64).to_be_bytes()
}

/// Fills a fresh array from the operating system's CSPRNG.
pub fn random<const N: usize>() -> Result<[u8; N], CryptoError> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| CryptoError::Random)?;
    Ok(out)
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// An Ed25519 signing key. Its seed is zeroized on drop and never printed.
pub struct SigningKey {
    key_id: String,
    seed: Zeroizing<[u8; 32]>,
    pair: signature::Ed25519KeyPair,
}

impl SigningKey {
    /// Builds the key from its 32-byte seed (RFC 8032 private key).
    pub fn from_seed(key_id: impl Into<String>, seed: [u8; 32]) -> Result<Self, CryptoError> {
        let seed = Zeroizing::new(seed);
        let pair = signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .map_err(|_| CryptoError::BadKey)?;
        Ok(Self {
            key_id: key_id.into(),
            seed,
            pair,
        })
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(key_id: impl Into<String>) -> Result<Self, CryptoError> {
        Self::from_seed(key_id, random()?)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The seed, for writing the key to its owner-only file. Handle with care.
    pub fn to_seed_bytes(&self) -> Zeroizing<[u8; 32]> {
        self.seed.clone()
    }

    /// Signs `prefix(domain) ‖ parts...`. The only way the system signs anything.
    pub fn sign(&self, domain: Domain, parts: &[&[u8]]) -> [u8; 64] {
        let msg = signed_message(domain, parts);
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(&msg).as_ref());
        out
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

fn signed_message(domain: Domain, parts: &[&[u8]]) -> Vec<u8> {
    let len = domain.prefix().len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(domain.prefix());
    for p in parts {
        msg.extend_from_slice(p);
    }
    msg
}

/// Verifies an Ed25519 signature over `prefix(domain) ‖ parts...`.
pub fn verify(
    public_key: &[u8],
    domain: Domain,
    parts: &[&[u8]],
    signature: &[u8],
) -> Result<(), CryptoError> {
    if public_key.len() != 32 {
        return Err(CryptoError::BadKey);
    }
    let msg = signed_message(domain, parts);
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&msg, signature)
        .map_err(|_| CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_in_its_own_domain() {
        let key = SigningKey::from_seed("k1", [3; 32]).unwrap();
        let sig = key.sign(Domain::Envelope, &[b"abc"]);
        assert!(verify(&key.public_key(), Domain::Envelope, &[b"abc"], &sig).is_ok());
        assert_eq!(
            verify(&key.public_key(), Domain::Receipt, &[b"abc"], &sig),
            Err(CryptoError::BadSignature)
        );
        assert_eq!(
            verify(&key.public_key(), Domain::Envelope, &[b"abd"], &sig),
            Err(CryptoError::BadSignature)
        );
        let other = SigningKey::from_seed("k2", [4; 32]).unwrap();
        assert_eq!(
            verify(&other.public_key(), Domain::Envelope, &[b"abc"], &sig),
            Err(CryptoError::BadSignature)
        );
    }

    #[test]
    fn no_accord_domain_prefix_extends_another() {
        let all = [
            Domain::Envelope,
            Domain::Receipt,
            Domain::Directory,
            Domain::SignedNote,
            Domain::Cosignature,
        ];
        for a in all {
            for b in all {
                if a != b && !a.prefix().is_empty() && !b.prefix().is_empty() {
                    assert!(!b.prefix().starts_with(a.prefix()), "{a:?} / {b:?}");
                }
            }
        }
    }

    #[test]
    fn signing_key_debug_does_not_show_the_seed() {
        let key = SigningKey::from_seed("k1", [0x5a; 32]).unwrap();
        let dbg = format!("{key:?}");
        assert!(!dbg.contains(&hex::encode([0x5a; 32])));
        assert!(dbg.contains("k1"));
    }

    #[test]
    fn ct_eq_compares_contents_and_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
