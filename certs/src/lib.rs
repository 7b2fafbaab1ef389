//! Dev PKI for Accord: country root CAs, SPIFFE-named certificates, organisation keys and the
//! directory files that list their public halves.
//!
//! For demos and tests only: keys are generated in-process and written unencrypted with
//! owner-only permissions. A real deployment uses the national CA (see `certs/README.md`).
//!
//! Layout written by [`DevPki::write`], one folder per country:
//! ```text
//! <root>/<cc>/ca.pem                     country root certificate (trust anchor)
//! <root>/<cc>/ca.key                     root private key (PKCS#8 PEM)
//! <root>/<cc>/crl.pem                    the root's CRL, empty at first (see [`revoke`])
//! <root>/directory-trust.json            every country's directory key (what to pin)
//! <root>/<cc>/directory.json             the country's directory (accord.v1.Directory, JSON)
//! <root>/<cc>/directory.signed.json      the same, signed (accord.v1.SignedDirectory, JSON)
//! <root>/<cc>/directory-key.json         the country's directory signing key
//! <root>/<cc>/gateway/{cert,key}.pem     gateway TLS certificate and key
//! <root>/<cc>/gateway/keys.json          gateway receipt signing key
//! <root>/<cc>/gateway/log-key.json       gateway log key (signs checkpoints)
//! <root>/<cc>/gateway/witness-key.json   gateway witness key (cosigns peers' checkpoints)
//! <root>/<cc>/orgs/<org>/{cert,key}.pem  organisation client certificate and key
//! <root>/<cc>/orgs/<org>/keys.json       organisation signing and encryption keys
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use accord_proto::crypto::hpke::RecipientKey;
use accord_proto::crypto::{self, SigningKey};
use accord_proto::ids::{CountryCode, Role, SpiffeId};
use accord_proto::keyfile::KeyFile;
use accord_proto::{note, pb};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

/// Why the dev PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A key could not be generated.
    #[error("key generation: {0}")]
    Crypto(#[from] crypto::CryptoError),
    /// A checkpoint key could not be named.
    #[error("log key: {0}")]
    Note(#[from] note::NoteError),
    /// An id is not a valid SPIFFE id.
    #[error("identity: {0}")]
    Id(#[from] accord_proto::ids::IdError),
    /// A certificate could not be parsed.
    #[error("certificate: {0}")]
    Parse(String),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How long dev certificates and keys stay valid.
const VALIDITY_DAYS: i64 = 365;

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

/// A CRL signed by the CA of `ca_cert_pem`/`ca_key_pem` revoking `serials` (as returned by
/// [`serial_of`]) as of `now`, valid for a year; PEM. With no serials it is an empty CRL.
pub fn revoke(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    serials: &[Vec<u8>],
    now: time::OffsetDateTime,
) -> Result<String, CertsError> {
    let key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key)?;
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(VALIDITY_DAYS),
        // Increases with time, so a newer CRL has a larger number.
        crl_number: SerialNumber::from(now.unix_timestamp().max(0) as u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.pem()?)
}

/// The serial number of a PEM certificate, big-endian bytes as in the certificate.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>, CertsError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CertsError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertsError::Parse(e.to_string()))?;
    Ok(cert.raw_serial().to_vec())
}

/// A country's root certificate authority.
#[derive(Debug)]
pub struct CountryCa {
    country: CountryCode,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, both PEM.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl CountryCa {
    /// A fresh self-signed root for `country`.
    pub fn new(country: &CountryCode) -> Result<Self, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, country.as_str().to_uppercase());
        dn.push(
            DnType::CommonName,
            format!("Accord {country} root CA (dev)"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let key = KeyPair::generate()?;
        Ok(Self {
            country: country.clone(),
            issuer: CertifiedIssuer::self_signed(params, key)?,
        })
    }

    pub fn country(&self) -> &CountryCode {
        &self.country
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate naming `id` in a URI SAN (see [`issue_with`]).
    pub fn issue(&self, id: &SpiffeId) -> Result<IssuedCert, CertsError> {
        issue_with(&self.issuer, id)
    }
}

/// Issues a fresh certificate and key for `id` from the CA of `ca_cert_pem`/`ca_key_pem`, as
/// the root's operator does to renew a certificate (e.g. before the old one is revoked).
pub fn reissue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    id: &SpiffeId,
) -> Result<IssuedCert, CertsError> {
    let key = KeyPair::from_pem(ca_key_pem)?;
    issue_with(&Issuer::from_ca_cert_pem(ca_cert_pem, key)?, id)
}

/// A certificate naming `id` in a URI SAN, with a new key. Gateways get server and client
/// auth (they listen and dial peers); organisations get client auth only.
fn issue_with(issuer: &Issuer<'_, KeyPair>, id: &SpiffeId) -> Result<IssuedCert, CertsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, id.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match id.role() {
        Role::Gateway => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Role::Org => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// One country of a dev PKI: its gateway's name and its organisations.
///
/// An organisation is `name`, `name:role` or `name:role:province`; roles are
/// `focal_point` (the default), `hotline` or `auditor`, and go into the directory with the
/// province (for hotlines, e.g. `tayninh-police:hotline:tay-ninh`).
#[derive(Clone, Debug)]
pub struct CountrySpec {
    pub country: CountryCode,
    pub gateway: String,
    pub orgs: Vec<String>,
}

/// Where [`DevPki::write`] put one country's files.
#[derive(Clone, Debug)]
pub struct CountryFiles {
    pub dir: PathBuf,
    pub gateway_id: SpiffeId,
}

impl CountryFiles {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    pub fn directory(&self) -> PathBuf {
        self.dir.join("directory.json")
    }
    pub fn signed_directory(&self) -> PathBuf {
        self.dir.join("directory.signed.json")
    }
    pub fn gateway_dir(&self) -> PathBuf {
        self.dir.join("gateway")
    }
    pub fn org_dir(&self, org: &str) -> PathBuf {
        self.dir.join("orgs").join(org)
    }
}

/// Writes a complete dev PKI: roots, certificates, keys and directories.
#[derive(Debug)]
pub struct DevPki;

impl DevPki {
    /// Generates every country of `spec` under `root`; `now_ms` starts key validity.
    pub fn write(
        root: &Path,
        spec: &[CountrySpec],
        now_ms: i64,
    ) -> Result<Vec<CountryFiles>, CertsError> {
        let mut files = Vec::new();
        let mut trust = Vec::new();
        for c in spec {
            let (f, t) = write_country(root, c, now_ms)?;
            files.push(f);
            trust.push(t);
        }
        write_json(&Self::trust_file(root), &trust)?;
        Ok(files)
    }

    /// The pinned directory keys of every country written under `root`.
    pub fn trust_file(root: &Path) -> PathBuf {
        root.join("directory-trust.json")
    }
}

fn public_key(key_id: &str, pk: [u8; 32], now_ms: i64) -> pb::PublicKey {
    const DAY_MS: i64 = 86_400_000;
    pb::PublicKey {
        key_id: key_id.to_owned(),
        public_key: pk.to_vec(),
        not_before_ms: now_ms - DAY_MS,
        not_after_ms: now_ms + VALIDITY_DAYS * DAY_MS,
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), CertsError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| CertsError::Io {
        path: path.to_owned(),
        source: e.into(),
    })?;
    write_file(path, &json, false)
}

fn write_country(
    root: &Path,
    c: &CountrySpec,
    now_ms: i64,
) -> Result<(CountryFiles, pb::DirectoryTrust), CertsError> {
    let dir = root.join(c.country.as_str());
    let ca = CountryCa::new(&c.country)?;
    write_file(&dir.join("ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_file(&dir.join("ca.key"), ca.key_pem().as_bytes(), true)?;
    let crl = revoke(
        &ca.cert_pem(),
        &ca.key_pem(),
        &[],
        time::OffsetDateTime::now_utc() - time::Duration::minutes(5),
    )?;
    write_file(&dir.join("crl.pem"), crl.as_bytes(), false)?;

    let gateway_id = SpiffeId::new(c.country.clone(), Role::Gateway, &c.gateway)?;
    let gw_dir = dir.join("gateway");
    write_identity(&gw_dir, &ca.issue(&gateway_id)?)?;
    let gw_key = SigningKey::generate(format!("{}-{}-receipt-1", c.country, c.gateway))?;
    let origin = format!("accord.{}/{}", c.country, c.gateway);
    let log_key = SigningKey::generate(format!("{}-{}-log-1", c.country, c.gateway))?;
    let witness_key = SigningKey::generate(format!("{}-{}-witness-1", c.country, c.gateway))?;
    let log_verifier = note::NoteVerifier::from_public_key(&origin, log_key.public_key())?;
    let witness_verifier =
        note::CosignatureVerifier::from_public_key(&origin, witness_key.public_key())?;
    for (file, key) in [("log-key.json", log_key), ("witness-key.json", witness_key)] {
        let kf = KeyFile {
            owner: gateway_id.to_string(),
            signing: key,
            encryption: None,
            previous_encryption: vec![],
        };
        write_file(&gw_dir.join(file), kf.to_json().as_bytes(), true)?;
    }
    let gw_entry = pb::GatewayEntry {
        id: gateway_id.to_string(),
        signing_keys: vec![public_key(gw_key.key_id(), gw_key.public_key(), now_ms)],
        log_origin: origin,
        log_verifier_key: log_verifier.to_string(),
        witness_verifier_key: witness_verifier.to_string(),
    };
    let gw_keys = KeyFile {
        owner: gateway_id.to_string(),
        signing: gw_key,
        encryption: None,
        previous_encryption: vec![],
    };
    write_file(
        &gw_dir.join("keys.json"),
        gw_keys.to_json().as_bytes(),
        true,
    )?;

    let mut orgs = Vec::new();
    for spec in &c.orgs {
        let mut parts = spec.splitn(3, ':');
        let org = &parts.next().unwrap_or_default().to_owned();
        let role = parts.next().unwrap_or("focal_point");
        let province = parts.next().unwrap_or_default();
        let id = SpiffeId::new(c.country.clone(), Role::Org, org)?;
        let org_dir = dir.join("orgs").join(org);
        write_identity(&org_dir, &ca.issue(&id)?)?;
        let signing = SigningKey::generate(format!("{}-{org}-sig-1", c.country))?;
        let enc_id = format!("{}-{org}-enc-1", c.country);
        let enc = RecipientKey::from_bytes(crypto::random()?);
        orgs.push(pb::OrgEntry {
            id: id.to_string(),
            name: org.clone(),
            signing_keys: vec![public_key(signing.key_id(), signing.public_key(), now_ms)],
            encryption_keys: vec![public_key(&enc_id, enc.public_key(), now_ms)],
            roles: vec![role.to_owned()],
            province: province.to_owned(),
        });
        let keys = KeyFile {
            owner: id.to_string(),
            signing,
            encryption: Some((enc_id, enc)),
            previous_encryption: vec![],
        };
        write_file(&org_dir.join("keys.json"), keys.to_json().as_bytes(), true)?;
    }
    let directory = pb::Directory {
        country: c.country.to_string(),
        version: 1,
        orgs,
        gateways: vec![gw_entry],
    };
    write_json(&dir.join("directory.json"), &directory)?;
    let directory_key = SigningKey::generate(format!("{}-directory-1", c.country))?;
    let signed = accord_proto::directory::sign(&directory, &directory_key);
    write_json(&dir.join("directory.signed.json"), &signed)?;
    let trust = pb::DirectoryTrust {
        country: c.country.to_string(),
        keys: vec![public_key(
            directory_key.key_id(),
            directory_key.public_key(),
            now_ms,
        )],
    };
    let kf = KeyFile {
        owner: format!("directory of {}", c.country),
        signing: directory_key,
        encryption: None,
        previous_encryption: vec![],
    };
    write_file(
        &dir.join("directory-key.json"),
        kf.to_json().as_bytes(),
        true,
    )?;
    Ok((CountryFiles { dir, gateway_id }, trust))
}

fn write_identity(dir: &Path, cert: &IssuedCert) -> Result<(), CertsError> {
    write_file(&dir.join("cert.pem"), cert.cert_pem.as_bytes(), false)?;
    write_file(&dir.join("key.pem"), cert.key_pem.as_bytes(), true)
}

/// Writes `bytes` to `path` by renaming a new file over it, creating parents; secrets are
/// owner-only (0600) from their first byte.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CertsError> {
    let io = |source| CertsError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io)?;
    // A new file beside the target, renamed over it: the target is never half written, a
    // file or symlink already there is replaced rather than written through, and a secret
    // is never in a file that anyone else has open or may read.
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    // Unique per process and call, so concurrent writers never share (or remove) one.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = parent.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let _ = secret;
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(parent)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_written_over_a_readable_file_or_a_symlink_replaces_it_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key.pem");
        write_file(&path, b"public", false).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        // A reader that opened the old file keeps seeing the old bytes, not the secret.
        let mut held = fs::File::open(&path).unwrap();
        write_file(&path, b"secret", true).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        let mut old = String::new();
        std::io::Read::read_to_string(&mut held, &mut old).unwrap();
        assert_eq!(old, "public");

        // A symlink at the target is replaced, its target left alone.
        let elsewhere = tmp.path().join("elsewhere");
        fs::write(&elsewhere, b"untouched").unwrap();
        let link = tmp.path().join("link.pem");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        write_file(&link, b"secret", true).unwrap();
        assert_eq!(fs::read(&elsewhere).unwrap(), b"untouched");
        assert!(!fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&link).unwrap(), b"secret");
    }

    #[test]
    fn a_dev_pki_has_every_file_and_a_valid_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = [CountrySpec {
            country: "vn".parse().unwrap(),
            gateway: "hanoi".into(),
            orgs: vec!["c02".into()],
        }];
        let files = DevPki::write(tmp.path(), &spec, 1_750_000_000_000).unwrap();
        let vn = &files[0];
        for p in [
            vn.ca(),
            vn.crl(),
            vn.directory(),
            vn.gateway_dir().join("cert.pem"),
            vn.gateway_dir().join("keys.json"),
            vn.org_dir("c02").join("key.pem"),
            vn.org_dir("c02").join("keys.json"),
        ] {
            assert!(p.exists(), "{}", p.display());
        }
        let dir: pb::Directory =
            serde_json::from_slice(&fs::read(vn.directory()).unwrap()).unwrap();
        accord_proto::directory::Directories::new([dir]).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(vn.org_dir("c02").join("keys.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "key file readable by others");
        }
    }
}
