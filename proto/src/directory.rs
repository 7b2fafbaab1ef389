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
}

/// The directories of every country a gateway or client knows, checked on load.
#[derive(Clone, Debug, Default)]
pub struct Directories {
    countries: BTreeMap<CountryCode, pb::Directory>,
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
        Ok(Self { countries })
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
