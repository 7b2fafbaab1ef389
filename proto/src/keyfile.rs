//! Private key files: the JSON an organisation or gateway keeps next to its certificate.
//!
//! ```json
//! {"owner": "spiffe://vn.accord/org/c02",
//!  "signing_key_id": "...", "signing_seed": "<base64 32 bytes>",
//!  "encryption_key_id": "...", "encryption_secret": "<base64 32 bytes, orgs only>"}
//! ```
//! Parsing only: reading the file (and refusing loose permissions) is the caller's job.
//! A signer backed by an HSM would replace this file, not the types it yields.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::hpke::RecipientKey;
use crate::crypto::SigningKey;

/// Why a key file is refused. Never carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Not the JSON layout above.
    #[error("key file is not valid: {0}")]
    Format(String),
    /// A key is not 32 bytes of base64.
    #[error("key {0} is not 32 bytes of base64")]
    Key(&'static str),
    /// The file holds no encryption key but one is needed.
    #[error("key file holds no encryption key")]
    NoEncryptionKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    owner: String,
    signing_key_id: String,
    signing_seed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption_secret: Option<String>,
}

/// The private keys of one organisation or gateway.
#[derive(Debug)]
pub struct KeyFile {
    pub owner: String,
    pub signing: SigningKey,
    pub encryption: Option<(String, RecipientKey)>,
}

fn key32(what: &'static str, b64: &str) -> Result<Zeroizing<[u8; 32]>, KeyFileError> {
    let bytes = Zeroizing::new(B64.decode(b64).map_err(|_| KeyFileError::Key(what))?);
    let mut out = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(KeyFileError::Key(what));
    }
    out.copy_from_slice(&bytes);
    Ok(out)
}

impl KeyFile {
    pub fn from_json(bytes: &[u8]) -> Result<Self, KeyFileError> {
        let raw: Raw =
            serde_json::from_slice(bytes).map_err(|e| KeyFileError::Format(e.to_string()))?;
        let seed = key32("signing_seed", &raw.signing_seed)?;
        let signing = SigningKey::from_seed(raw.signing_key_id, *seed)
            .map_err(|_| KeyFileError::Key("signing_seed"))?;
        let encryption = match (raw.encryption_key_id, raw.encryption_secret) {
            (Some(id), Some(secret)) => Some((
                id,
                RecipientKey::from_bytes(*key32("encryption_secret", &secret)?),
            )),
            (None, None) => None,
            _ => return Err(KeyFileError::Format("encryption key id without key".into())),
        };
        Ok(Self {
            owner: raw.owner,
            signing,
            encryption,
        })
    }

    pub fn to_json(&self) -> Zeroizing<String> {
        let raw = Raw {
            owner: self.owner.clone(),
            signing_key_id: self.signing.key_id().to_owned(),
            signing_seed: B64.encode(*self.signing.to_seed_bytes()),
            encryption_key_id: self.encryption.as_ref().map(|(id, _)| id.clone()),
            encryption_secret: self
                .encryption
                .as_ref()
                .map(|(_, k)| B64.encode(*k.to_secret_bytes())),
        };
        // Serializing plain strings and optional strings cannot fail.
        Zeroizing::new(serde_json::to_string_pretty(&raw).unwrap_or_default())
    }

    pub fn encryption_key(&self) -> Result<(&str, &RecipientKey), KeyFileError> {
        self.encryption
            .as_ref()
            .map(|(id, k)| (id.as_str(), k))
            .ok_or(KeyFileError::NoEncryptionKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let kf = KeyFile {
            owner: "spiffe://vn.accord/org/c02".into(),
            signing: SigningKey::from_seed("s1", [1; 32]).unwrap(),
            encryption: Some(("e1".into(), RecipientKey::from_bytes([2; 32]))),
        };
        let back = KeyFile::from_json(kf.to_json().as_bytes()).unwrap();
        assert_eq!(back.signing.public_key(), kf.signing.public_key());
        assert_eq!(
            back.encryption_key().unwrap().1.public_key(),
            kf.encryption_key().unwrap().1.public_key()
        );
    }

    #[test]
    fn short_keys_and_unknown_fields_are_refused() {
        assert!(
            KeyFile::from_json(br#"{"owner":"x","signing_key_id":"s","signing_seed":"AAAA"}"#)
                .is_err()
        );
        assert!(KeyFile::from_json(
            br#"{"owner":"x","signing_key_id":"s","signing_seed":"AAAA","extra":1}"#
        )
        .is_err());
    }
}
