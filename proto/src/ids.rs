//! Identities and ids, each parsed in exactly one place.
//!
//! A SPIFFE-style URI names every certificate holder (DESIGN.md, "Identities and trust"):
//! `spiffe://<cc>.accord/gateway/<name>` or `spiffe://<cc>.accord/org/<org>`.

use std::fmt;
use std::str::FromStr;

/// Why an id did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdError {
    /// Not `spiffe://<cc>.accord/<gateway|org>/<name>`.
    #[error("not an Accord SPIFFE id (spiffe://<cc>.accord/<gateway|org>/<name>): {0:?}")]
    Spiffe(String),
    /// A country code must be two lowercase ASCII letters (ISO 3166 alpha-2).
    #[error("not an ISO 3166 alpha-2 country code in lowercase: {0:?}")]
    Country(String),
    /// The SPIFFE id names a gateway where an organisation is required, or the reverse.
    #[error("{0} is not an organisation id")]
    NotAnOrg(String),
    /// A message id must be 16 bytes of a version 7 UUID.
    #[error("not a UUIDv7 message id")]
    MessageId,
    /// An envelope hash must be 32 bytes.
    #[error("an envelope hash is 32 bytes")]
    EnvelopeHash,
}

/// ISO 3166 alpha-2 country code, lowercase (`vn`, `kh`, `la`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountryCode(String);

impl CountryCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CountryCode {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Country(s.to_owned()))
        }
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of holder a SPIFFE id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Gateway,
    Org,
}

impl Role {
    fn segment(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Org => "org",
        }
    }
}

/// A parsed `spiffe://<cc>.accord/<role>/<name>` identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    country: CountryCode,
    role: Role,
    name: String,
}

impl SpiffeId {
    pub fn new(country: CountryCode, role: Role, name: &str) -> Result<Self, IdError> {
        let s = format!("spiffe://{country}.accord/{}/{name}", role.segment());
        s.parse()
    }
    pub fn country(&self) -> &CountryCode {
        &self.country
    }
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Names are short, lowercase and unambiguous: no dots or slashes that could alias a path.
fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError::Spiffe(s.chars().take(120).collect());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let (host, path) = rest.split_once('/').ok_or_else(err)?;
        let cc = host.strip_suffix(".accord").ok_or_else(err)?;
        let country: CountryCode = cc.parse().map_err(|_| err())?;
        let (role, name) = path.split_once('/').ok_or_else(err)?;
        let role = match role {
            "gateway" => Role::Gateway,
            "org" => Role::Org,
            _ => return Err(err()),
        };
        if !valid_name(name) {
            return Err(err());
        }
        Ok(Self {
            country,
            role,
            name: name.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}.accord/{}/{}",
            self.country,
            self.role.segment(),
            self.name
        )
    }
}

/// An organisation's identity: a [`SpiffeId`] with the `org` role.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrgId(SpiffeId);

impl OrgId {
    pub fn country(&self) -> &CountryCode {
        self.0.country()
    }
    pub fn spiffe(&self) -> &SpiffeId {
        &self.0
    }
}

impl TryFrom<SpiffeId> for OrgId {
    type Error = IdError;
    fn try_from(id: SpiffeId) -> Result<Self, IdError> {
        match id.role() {
            Role::Org => Ok(Self(id)),
            Role::Gateway => Err(IdError::NotAnOrg(id.to_string())),
        }
    }
}

impl FromStr for OrgId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.parse::<SpiffeId>()?.try_into()
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A message id: the 16 raw bytes of a UUIDv7 (time-ordered).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId([u8; 16]);

impl MessageId {
    /// Builds a UUIDv7 from a Unix-millisecond time and 10 random bytes (RFC 9562 §5.7).
    pub fn new_v7(unix_ms: u64, random: [u8; 10]) -> Self {
        let uuid = uuid::Builder::from_unix_timestamp_millis(unix_ms, &random).into_uuid();
        Self(*uuid.as_bytes())
    }
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let raw: [u8; 16] = bytes.try_into().map_err(|_| IdError::MessageId)?;
        let uuid = uuid::Uuid::from_bytes(raw);
        if uuid.get_version_num() != 7 || uuid.get_variant() != uuid::Variant::RFC4122 {
            return Err(IdError::MessageId);
        }
        Ok(Self(raw))
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let uuid = uuid::Uuid::parse_str(s).map_err(|_| IdError::MessageId)?;
        Self::from_slice(uuid.as_bytes())
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_bytes(self.0).fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// SHA-256 envelope hash: the id receipts, log entries and proofs refer to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EnvelopeHash(pub [u8; 32]);

impl EnvelopeHash {
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| IdError::EnvelopeHash)
    }
}

impl FromStr for EnvelopeHash {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bytes = hex::decode(s).map_err(|_| IdError::EnvelopeHash)?;
        Self::from_slice(&bytes)
    }
}

impl fmt::Display for EnvelopeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for EnvelopeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvelopeHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_through_display() {
        for s in [
            "spiffe://vn.accord/org/c02",
            "spiffe://kh.accord/gateway/phnom-penh",
            "spiffe://la.accord/org/hotline_1",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
        }
    }

    #[test]
    fn malformed_spiffe_ids_are_refused() {
        for s in [
            "",
            "spiffe://vn.accord/org/",
            "spiffe://vn.accord/org/a/b",
            "spiffe://vn.accord/org/../x",
            "spiffe://VN.accord/org/c02",
            "spiffe://vnm.accord/org/c02",
            "spiffe://vn.other/org/c02",
            "spiffe://vn.accord/admin/c02",
            "https://vn.accord/org/c02",
            "spiffe://vn.accord/org/C02",
        ] {
            assert!(s.parse::<SpiffeId>().is_err(), "{s} parsed");
        }
    }

    #[test]
    fn a_gateway_id_is_not_an_org_id() {
        assert!(matches!(
            "spiffe://vn.accord/gateway/hanoi".parse::<OrgId>(),
            Err(IdError::NotAnOrg(_))
        ));
    }

    #[test]
    fn message_ids_are_uuidv7_and_round_trip() {
        let id = MessageId::new_v7(1_700_000_000_000, [7; 10]);
        let s = id.to_string();
        assert_eq!(s.parse::<MessageId>().unwrap(), id);
        assert_eq!(MessageId::from_slice(id.as_bytes()).unwrap(), id);
        // A v4 UUID is not a message id.
        let v4 = uuid::Builder::from_random_bytes([1; 16]).into_uuid();
        assert_eq!(
            MessageId::from_slice(v4.as_bytes()),
            Err(IdError::MessageId)
        );
        assert_eq!(MessageId::from_slice(&[0; 15]), Err(IdError::MessageId));
    }

    #[test]
    fn envelope_hashes_round_trip_through_hex() {
        let h = EnvelopeHash([0xab; 32]);
        assert_eq!(h.to_string().parse::<EnvelopeHash>().unwrap(), h);
        assert!("abcd".parse::<EnvelopeHash>().is_err());
    }
}
