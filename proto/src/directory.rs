//! The directory: which long-term keys belong to which organisation or gateway, per country.
//!
//! Certificates say who; the directory says which keys are theirs (DESIGN.md). A key is used
//! only inside its validity window, judged at the time the signature claims (`at`), so
//! envelopes signed before a rotation stay verifiable.

use std::collections::BTreeMap;

use crate::ids::{CountryCode, IdError, OrgId, SpiffeId};
use crate::pb;
use crate::UnixMillis;

/// Why a directory is refused or a key is not found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirectoryError {
    /// An id inside the directory does not parse.
    #[error("directory entry: {0}")]
    Id(#[from] IdError),
    /// An entry names a country other than the directory's own.
    #[error("directory of {directory} lists {entry}, which belongs to another country")]
    ForeignEntry { directory: String, entry: String },
    /// Two directories claim the same country.
    #[error("two directories for country {0}")]
    DuplicateCountry(String),
    /// The id is not in any directory.
    #[error("{0} is not in the directory")]
    UnknownParty(String),
    /// The party has no key with this id valid at that time.
    #[error("{party} has no key {key_id:?} valid at {at_ms}")]
    NoValidKey {
        party: String,
        key_id: String,
        at_ms: UnixMillis,
    },
    /// A public key is not 32 bytes.
    #[error("key {0:?} is not 32 bytes")]
    BadKeyLength(String),
    /// A signed directory does not decode, or its bytes are not canonical.
    #[error("signed directory is malformed: {0}")]
    Malformed(&'static str),
    /// No trusted directory key of that country, valid now, has this key id.
    #[error("no trusted directory key {key_id:?} for country {country}")]
    UntrustedKey { country: String, key_id: String },
    /// The directory's signature does not verify.
    #[error("directory of {0} is not signed by its country's directory key")]
    BadSignature(String),
    /// A directory older than the one already held.
    #[error("directory of {country} version {offered} is older than version {held}")]
    Older {
        country: String,
        offered: u64,
        held: u64,
    },
    /// Two different directories claim the same country and version.
    #[error("a different directory of {country} with the same version {version}")]
    SameVersionDiffers { country: String, version: u64 },
}

/// Signs a country's directory: `"accord/v1/directory" ‖ u64be(len) ‖ directory bytes`.
pub fn sign(directory: &pb::Directory, key: &crate::crypto::SigningKey) -> pb::SignedDirectory {
    use prost::Message;
    let bytes = directory.encode_to_vec();
    let signature = key.sign(
        crate::crypto::Domain::Directory,
        &[&crate::crypto::len_be(&bytes), &bytes],
    );
    pb::SignedDirectory {
        directory: bytes,
        key_id: key.key_id().to_owned(),
        signature: signature.to_vec(),
    }
}

/// The country a signed directory claims, read without verifying anything: for routing and
/// authorisation checks before the signature is verified.
pub fn country_of(signed: &pb::SignedDirectory) -> Result<CountryCode, DirectoryError> {
    use prost::Message;
    let dir = pb::Directory::decode(signed.directory.as_slice())
        .map_err(|_| DirectoryError::Malformed("directory bytes"))?;
    Ok(dir.country.parse()?)
}

/// Verifies a signed directory against the pinned directory keys of its country, valid at
/// `now`; returns the directory.
pub fn verify_signed(
    signed: &pb::SignedDirectory,
    trust: &[pb::DirectoryTrust],
    now: UnixMillis,
) -> Result<pb::Directory, DirectoryError> {
    use prost::Message;
    let dir = pb::Directory::decode(signed.directory.as_slice())
        .map_err(|_| DirectoryError::Malformed("directory bytes"))?;
    if dir.encode_to_vec() != signed.directory {
        return Err(DirectoryError::Malformed(
            "directory bytes are not canonical",
        ));
    }
    let untrusted = || DirectoryError::UntrustedKey {
        country: dir.country.clone(),
        key_id: signed.key_id.clone(),
    };
    let key = trust
        .iter()
        .filter(|t| t.country == dir.country)
        .flat_map(|t| &t.keys)
        .find(|k| k.key_id == signed.key_id && valid_at(k, now))
        .ok_or_else(untrusted)?;
    crate::crypto::verify(
        &key.public_key,
        crate::crypto::Domain::Directory,
        &[&crate::crypto::len_be(&signed.directory), &signed.directory],
        &signed.signature,
    )
    .map_err(|_| DirectoryError::BadSignature(dir.country.clone()))?;
    Ok(dir)
}

/// The directories of every country a gateway or client knows, checked on load.
#[derive(Clone, Debug, Default)]
pub struct Directories {
    countries: BTreeMap<CountryCode, pb::Directory>,
    signed: BTreeMap<CountryCode, pb::SignedDirectory>,
}

impl Directories {
    /// Checks that every entry belongs to its directory's country and every key is 32 bytes.
    pub fn new(dirs: impl IntoIterator<Item = pb::Directory>) -> Result<Self, DirectoryError> {
        let mut countries = BTreeMap::new();
        for dir in dirs {
            let cc: CountryCode = dir.country.parse()?;
            let keys = dir
                .orgs
                .iter()
                .flat_map(|o| o.signing_keys.iter().chain(&o.encryption_keys))
                .chain(dir.gateways.iter().flat_map(|g| &g.signing_keys));
            for key in keys {
                if key.public_key.len() != 32 {
                    return Err(DirectoryError::BadKeyLength(key.key_id.clone()));
                }
            }
            let ids = dir
                .orgs
                .iter()
                .map(|o| &o.id)
                .chain(dir.gateways.iter().map(|g| &g.id));
            for id in ids {
                let parsed: SpiffeId = id.parse()?;
                if parsed.country() != &cc {
                    return Err(DirectoryError::ForeignEntry {
                        directory: cc.to_string(),
                        entry: id.clone(),
                    });
                }
            }
            if countries.insert(cc.clone(), dir).is_some() {
                return Err(DirectoryError::DuplicateCountry(cc.to_string()));
            }
        }
        Ok(Self {
            countries,
            signed: BTreeMap::new(),
        })
    }

    /// Verifies every signed directory against the pinned keys and checks the result.
    pub fn from_signed(
        signed: impl IntoIterator<Item = pb::SignedDirectory>,
        trust: &[pb::DirectoryTrust],
        now: UnixMillis,
    ) -> Result<Self, DirectoryError> {
        let mut dirs = Vec::new();
        let mut keep = BTreeMap::new();
        for s in signed {
            let dir = verify_signed(&s, trust, now)?;
            keep.insert(dir.country.parse()?, s);
            dirs.push(dir);
        }
        let mut out = Self::new(dirs)?;
        out.signed = keep;
        Ok(out)
    }

    /// The signed forms, for serving to clients and peers.
    pub fn signed(&self) -> Vec<pb::SignedDirectory> {
        self.signed.values().cloned().collect()
    }

    /// A copy with `signed` taking its country's place if it verifies and is newer. Returns
    /// `None` when it is the version already held (identical), an error when it is older or
    /// a different directory under the same version.
    pub fn with_update(
        &self,
        signed: pb::SignedDirectory,
        trust: &[pb::DirectoryTrust],
        now: UnixMillis,
    ) -> Result<Option<Self>, DirectoryError> {
        // Peers offer their directory on every checkpoint beat; the usual answer, "the same
        // bytes we hold", needs no signature check.
        let cc = country_of(&signed)?;
        if self.signed.get(&cc) == Some(&signed) {
            return Ok(None);
        }
        let dir = verify_signed(&signed, trust, now)?;
        if let Some(held) = self.countries.get(&cc) {
            if dir.version < held.version {
                return Err(DirectoryError::Older {
                    country: cc.to_string(),
                    offered: dir.version,
                    held: held.version,
                });
            }
            if dir.version == held.version {
                return if &dir == held {
                    Ok(None)
                } else {
                    Err(DirectoryError::SameVersionDiffers {
                        country: cc.to_string(),
                        version: dir.version,
                    })
                };
            }
        }
        // The others were verified when they were taken: only the structure is re-checked.
        let mut dirs = self.countries.clone();
        dirs.insert(cc.clone(), dir);
        let mut updated = Self::new(dirs.into_values())?;
        updated.signed = self.signed.clone();
        updated.signed.insert(cc, signed);
        Ok(Some(updated))
    }

    pub fn countries(&self) -> impl Iterator<Item = &CountryCode> {
        self.countries.keys()
    }

    pub fn to_wire(&self) -> Vec<pb::Directory> {
        self.countries.values().cloned().collect()
    }

    pub fn org(&self, id: &OrgId) -> Option<&pb::OrgEntry> {
        let want = id.to_string();
        self.countries
            .get(id.country())?
            .orgs
            .iter()
            .find(|o| o.id == want)
    }

    fn signing_keys(&self, party: &SpiffeId) -> Option<&[pb::PublicKey]> {
        let dir = self.countries.get(party.country())?;
        let want = party.to_string();
        let org = dir.orgs.iter().find(|o| o.id == want);
        let gw = dir.gateways.iter().find(|g| g.id == want);
        org.map(|o| o.signing_keys.as_slice())
            .or(gw.map(|g| g.signing_keys.as_slice()))
    }

    /// The Ed25519 key `key_id` of `party`, if valid at `at_ms`.
    pub fn signing_key(
        &self,
        party: &SpiffeId,
        key_id: &str,
        at_ms: UnixMillis,
    ) -> Result<[u8; 32], DirectoryError> {
        let keys = self
            .signing_keys(party)
            .ok_or_else(|| DirectoryError::UnknownParty(party.to_string()))?;
        find_valid(keys, party, key_id, at_ms)
    }

    /// The X25519 key `key_id` of `org`, if valid at `at_ms`.
    pub fn encryption_key(
        &self,
        org: &OrgId,
        key_id: &str,
        at_ms: UnixMillis,
    ) -> Result<[u8; 32], DirectoryError> {
        let entry = self
            .org(org)
            .ok_or_else(|| DirectoryError::UnknownParty(org.to_string()))?;
        find_valid(&entry.encryption_keys, org.spiffe(), key_id, at_ms)
    }

    /// The newest X25519 key of `org` valid at `now`: the one a sender seals to.
    pub fn current_encryption_key(
        &self,
        org: &OrgId,
        now: UnixMillis,
    ) -> Result<(String, [u8; 32]), DirectoryError> {
        let entry = self
            .org(org)
            .ok_or_else(|| DirectoryError::UnknownParty(org.to_string()))?;
        let key = entry
            .encryption_keys
            .iter()
            .filter(|k| valid_at(k, now))
            .max_by_key(|k| k.not_before_ms)
            .ok_or_else(|| DirectoryError::NoValidKey {
                party: org.to_string(),
                key_id: "<any>".into(),
                at_ms: now,
            })?;
        let pk = key_bytes(key)?;
        Ok((key.key_id.clone(), pk))
    }
}

fn valid_at(key: &pb::PublicKey, at_ms: UnixMillis) -> bool {
    key.not_before_ms <= at_ms && at_ms < key.not_after_ms
}

fn key_bytes(key: &pb::PublicKey) -> Result<[u8; 32], DirectoryError> {
    key.public_key
        .as_slice()
        .try_into()
        .map_err(|_| DirectoryError::BadKeyLength(key.key_id.clone()))
}

fn find_valid(
    keys: &[pb::PublicKey],
    party: &SpiffeId,
    key_id: &str,
    at_ms: UnixMillis,
) -> Result<[u8; 32], DirectoryError> {
    let key = keys
        .iter()
        .find(|k| k.key_id == key_id && valid_at(k, at_ms))
        .ok_or_else(|| DirectoryError::NoValidKey {
            party: party.to_string(),
            key_id: key_id.to_owned(),
            at_ms,
        })?;
    key_bytes(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, from: i64, to: i64) -> pb::PublicKey {
        pb::PublicKey {
            key_id: id.into(),
            public_key: vec![1; 32],
            not_before_ms: from,
            not_after_ms: to,
        }
    }

    fn vn() -> pb::Directory {
        pb::Directory {
            country: "vn".into(),
            version: 1,
            orgs: vec![pb::OrgEntry {
                id: "spiffe://vn.accord/org/c02".into(),
                name: "C02".into(),
                signing_keys: vec![key("s1", 0, 100), key("s2", 90, 200)],
                encryption_keys: vec![key("e1", 0, 100), key("e2", 90, 200)],
                roles: vec![],
                province: String::new(),
            }],
            gateways: vec![],
        }
    }

    #[test]
    fn keys_are_found_only_inside_their_validity() {
        let d = Directories::new([vn()]).unwrap();
        let org: OrgId = "spiffe://vn.accord/org/c02".parse().unwrap();
        assert!(d.signing_key(org.spiffe(), "s1", 50).is_ok());
        assert!(d.signing_key(org.spiffe(), "s1", 100).is_err());
        assert!(d.signing_key(org.spiffe(), "s2", 150).is_ok());
        assert!(d.signing_key(org.spiffe(), "nope", 50).is_err());
        assert_eq!(d.current_encryption_key(&org, 95).unwrap().0, "e2");
        assert_eq!(d.current_encryption_key(&org, 10).unwrap().0, "e1");
        assert!(d.current_encryption_key(&org, 500).is_err());
    }

    #[test]
    fn a_directory_cannot_list_another_countrys_org() {
        let mut dir = vn();
        dir.orgs[0].id = "spiffe://kh.accord/org/ahtd".into();
        assert!(matches!(
            Directories::new([dir]),
            Err(DirectoryError::ForeignEntry { .. })
        ));
    }

    fn trust(key: &crate::crypto::SigningKey) -> Vec<pb::DirectoryTrust> {
        vec![pb::DirectoryTrust {
            country: "vn".into(),
            keys: vec![pb::PublicKey {
                key_id: key.key_id().into(),
                public_key: key.public_key().to_vec(),
                not_before_ms: 0,
                not_after_ms: 1000,
            }],
        }]
    }

    #[test]
    fn a_signed_directory_verifies_only_with_its_countrys_pinned_key() {
        let key = crate::crypto::SigningKey::from_seed("vn-dir-1", [5; 32]).unwrap();
        let signed = sign(&vn(), &key);
        assert_eq!(verify_signed(&signed, &trust(&key), 10).unwrap(), vn());
        // Expired pin, other key, other country's pin, tampered bytes or signature.
        assert!(matches!(
            verify_signed(&signed, &trust(&key), 1000),
            Err(DirectoryError::UntrustedKey { .. })
        ));
        let rogue = crate::crypto::SigningKey::from_seed("vn-dir-1", [6; 32]).unwrap();
        assert!(matches!(
            verify_signed(&sign(&vn(), &rogue), &trust(&key), 10),
            Err(DirectoryError::BadSignature(_))
        ));
        let mut kh_trust = trust(&key);
        kh_trust[0].country = "kh".into();
        assert!(matches!(
            verify_signed(&signed, &kh_trust, 10),
            Err(DirectoryError::UntrustedKey { .. })
        ));
        for i in 0..signed.directory.len() {
            let mut t = signed.clone();
            t.directory[i] ^= 1;
            assert!(verify_signed(&t, &trust(&key), 10).is_err(), "byte {i}");
        }
        let mut t = signed.clone();
        t.signature[0] ^= 1;
        assert!(verify_signed(&t, &trust(&key), 10).is_err());
        let mut unsigned = signed;
        unsigned.signature.clear();
        assert!(verify_signed(&unsigned, &trust(&key), 10).is_err());
    }

    #[test]
    fn only_a_newer_directory_version_replaces_the_held_one() {
        let key = crate::crypto::SigningKey::from_seed("vn-dir-1", [5; 32]).unwrap();
        let trust = trust(&key);
        let v1 = Directories::from_signed([sign(&vn(), &key)], &trust, 10).unwrap();
        let mut newer = vn();
        newer.version = 2;
        newer.orgs[0].name = "C02 renamed".into();
        let v2 = v1
            .with_update(sign(&newer, &key), &trust, 10)
            .unwrap()
            .unwrap();
        assert_eq!(v2.to_wire()[0].version, 2);
        assert!(v2
            .with_update(sign(&newer, &key), &trust, 10)
            .unwrap()
            .is_none());
        assert!(matches!(
            v2.with_update(sign(&vn(), &key), &trust, 10),
            Err(DirectoryError::Older { .. })
        ));
        let mut forked = newer.clone();
        forked.orgs[0].name = "other".into();
        assert!(matches!(
            v2.with_update(sign(&forked, &key), &trust, 10),
            Err(DirectoryError::SameVersionDiffers { .. })
        ));
    }

    #[test]
    fn short_keys_and_duplicate_countries_are_refused() {
        let mut dir = vn();
        dir.orgs[0].signing_keys[0].public_key = vec![1; 31];
        assert!(matches!(
            Directories::new([dir]),
            Err(DirectoryError::BadKeyLength(_))
        ));
        assert!(matches!(
            Directories::new([vn(), vn()]),
            Err(DirectoryError::DuplicateCountry(_))
        ));
    }
}
