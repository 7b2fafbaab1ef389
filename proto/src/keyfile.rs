//! Private key files: the JSON an organisation or gateway keeps next to its certificate.
//!
//! ```json
//! {"owner": "spiffe://vn.accord/org/c02",
//!  "signing_key_id": "...", "signing_seed": "<base64 32 bytes>",
//!  "encryption_key_id": "...", "encryption_secret": "<base64 32 bytes, orgs only>",
//!  "previous_encryption_keys": [{"key_id": "...", "secret": "<base64>"}]}
//! ```
//!
//! `previous_encryption_keys` (optional) keeps rotated-out encryption keys, so envelopes
//! sealed to them before a rotation still open. Signing keys need no such list: signatures
//! are verified with public keys from the directory.
//!
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous_encryption_keys: Vec<RawKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    key_id: String,
    secret: String,
}

// The base64 forms of secrets are wiped like the secrets themselves.
impl Drop for Raw {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.signing_seed.zeroize();
        self.encryption_secret.zeroize();
    }
}

impl Drop for RawKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

/// The private keys of one organisation or gateway.
#[derive(Debug)]
pub struct KeyFile {
    pub owner: String,
    pub signing: SigningKey,
    pub encryption: Option<(String, RecipientKey)>,
    /// Rotated-out encryption keys, still needed to open what was sealed to them.
    pub previous_encryption: Vec<(String, RecipientKey)>,
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
        // serde's messages can quote the offending value, which may be key material: report
        // only where and what kind of problem it is.
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| {
            KeyFileError::Format(format!(
                "{:?} error at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let seed = key32("signing_seed", &raw.signing_seed)?;
        let signing = SigningKey::from_seed(raw.signing_key_id.clone(), *seed)
            .map_err(|_| KeyFileError::Key("signing_seed"))?;
        let encryption = match (&raw.encryption_key_id, &raw.encryption_secret) {
            (Some(id), Some(secret)) => Some((
                id.clone(),
                RecipientKey::from_bytes(*key32("encryption_secret", secret)?),
            )),
            (None, None) => None,
            _ => return Err(KeyFileError::Format("encryption key id without key".into())),
        };
        let previous_encryption = raw
            .previous_encryption_keys
            .iter()
            .map(|k| {
                Ok((
                    k.key_id.clone(),
                    RecipientKey::from_bytes(*key32("previous secret", &k.secret)?),
                ))
            })
            .collect::<Result<_, KeyFileError>>()?;
        Ok(Self {
            owner: raw.owner.clone(),
            signing,
            encryption,
            previous_encryption,
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
            previous_encryption_keys: self
                .previous_encryption
                .iter()
                .map(|(id, k)| RawKey {
                    key_id: id.clone(),
                    secret: B64.encode(*k.to_secret_bytes()),
                })
                .collect(),
        };
        // Serializing plain strings and optional strings cannot fail.
        Zeroizing::new(serde_json::to_string_pretty(&raw).unwrap_or_default())
    }

    /// The encryption key with this id, current or previous.
    pub fn encryption_key_by_id(&self, key_id: &str) -> Option<&RecipientKey> {
        self.encryption
            .iter()
            .chain(&self.previous_encryption)
            .find(|(id, _)| id == key_id)
            .map(|(_, k)| k)
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
            encryption: Some(("e2".into(), RecipientKey::from_bytes([2; 32]))),
            previous_encryption: vec![("e1".into(), RecipientKey::from_bytes([3; 32]))],
        };
        let back = KeyFile::from_json(kf.to_json().as_bytes()).unwrap();
        assert_eq!(back.signing.public_key(), kf.signing.public_key());
        assert_eq!(
            back.encryption_key().unwrap().1.public_key(),
            kf.encryption_key().unwrap().1.public_key()
        );
        let old = back.encryption_key_by_id("e1").unwrap();
        assert_eq!(
            old.public_key(),
            RecipientKey::from_bytes([3; 32]).public_key()
        );
        assert!(back.encryption_key_by_id("e9").is_none());
    }

    #[test]
    fn a_malformed_key_file_error_never_quotes_its_contents() {
        let bad = br#"{"owner":"x","signing_key_id":"s","signing_seed":"AAAA","previous_encryption_keys":"SECRET-MATERIAL-XYZ"}"#;
        let err = KeyFile::from_json(bad).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(err.contains("line 1"), "{err}");
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
