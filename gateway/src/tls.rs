//! Mutual TLS policy, in one module: rustls with the `ring` provider, TLS 1.3 only.
//!
//! Identity is the SPIFFE URI SAN of a verified certificate, nothing else in it. A chain is
//! verified against the root of the country its SPIFFE id names, so a Cambodian root can
//! never vouch for a Vietnamese identity. The same check runs on both sides: the listeners
//! verify clients and peer gateways ([`SpiffeClientVerifier`]), a dialer verifies the
//! gateway it expects ([`SpiffeServerVerifier`]).
//!
//! Revocation: each country's root may come with CRLs ([`CountryRoots::add_crls`]), PEM
//! files signed by that root (one signed by anything else is refused at load). Every chain
//! is checked against the CRLs of its country; a revoked certificate fails the handshake
//! with `CertificateError::Revoked`. The CRLs sit behind a lock shared by every clone of a
//! [`CountryRoots`], so [`CountryRoots::reload_crls`] changes what new handshakes see
//! without a restart (the gateway polls the files, see `server.rs`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use accord_proto::ids::{CountryCode, Role, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why TLS material or a certificate was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {problem}")]
    Pem { path: String, problem: String },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate has no single Accord SPIFFE URI SAN.
    #[error("certificate carries no valid Accord SPIFFE id: {0}")]
    NoIdentity(String),
    /// A CRL file is unreadable, malformed, or not signed by its country's root.
    #[error("CRL {path}: {problem}")]
    Crl { path: String, problem: String },
    /// A renewed certificate names another identity than the one in force.
    #[error("the new certificate names {now}, the one in force {was}: a process keeps its identity; restart to change it")]
    IdentityChanged { was: String, now: String },
    /// Our own certificate is not accepted by its country's root (chain, validity, CRL, EKU).
    #[error("certificate refused: {0}")]
    Refused(rustls::Error),
}

/// The longest certificate chain we present: end entity, intermediates (no root needed).
const MAX_CHAIN: usize = 4;

/// id-kp-clientAuth (RFC 5280 §4.2.1.12), DER-encoded OID contents.
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];
/// id-kp-serverAuth.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

/// The process-wide crypto provider: ring, never aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default, for libraries that ask for the default provider.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |problem: String| TlsError::Pem {
        path: path.display().to_string(),
        problem,
    };
    let bytes = crate::server::read_credential_file(path, false).map_err(err)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

/// Reads a TLS private key (PEM), which must be owner-only.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let err = |problem: String| TlsError::Pem {
        path: path.display().to_string(),
        problem,
    };
    let bytes = crate::server::read_credential_file(path, true).map_err(err)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| err(e.to_string()))
}

/// The one function that turns a certificate into an identity: exactly one URI SAN, which
/// must parse as an Accord SPIFFE id. Everything else in the certificate is ignored.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| TlsError::NoIdentity("unparseable certificate".into()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| TlsError::NoIdentity("bad SAN extension".into()))?
        .ok_or_else(|| TlsError::NoIdentity("no SAN".into()))?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => uri
            .parse()
            .map_err(|e: accord_proto::ids::IdError| TlsError::NoIdentity(e.to_string())),
        _ => Err(TlsError::NoIdentity("expected exactly one URI SAN".into())),
    }
}

/// Trust anchors per country: which root may vouch for which country's identities, and the
/// CRLs each root has published.
///
/// Clones share the CRLs: a reload through one is seen by every verifier built from any.
#[derive(Clone, Debug, Default)]
pub struct CountryRoots {
    roots: BTreeMap<CountryCode, Vec<rustls_pki_types::TrustAnchor<'static>>>,
    /// The root certificates themselves, to check CRL signatures against.
    root_certs: BTreeMap<CountryCode, Vec<CertificateDer<'static>>>,
    /// The CRL files of each country, as configured (reloaded from these paths).
    crl_files: BTreeMap<CountryCode, Vec<PathBuf>>,
    crls: Arc<RwLock<CrlTable>>,
}

/// Each country's CRLs in force, and the newest `thisUpdate` among them (Unix seconds): a
/// reload that would put an older CRL in force (a rollback un-revoking certificates) is
/// refused.
type CrlTable = BTreeMap<CountryCode, (Vec<webpki::CertRevocationList<'static>>, i64)>;

impl CountryRoots {
    pub fn add(&mut self, country: CountryCode, path: &Path) -> Result<(), TlsError> {
        for cert in load_certs(path)? {
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| TlsError::Pem {
                    path: path.display().to_string(),
                    problem: format!("not a usable root: {e}"),
                })?
                .to_owned();
            self.roots.entry(country.clone()).or_default().push(anchor);
            self.root_certs
                .entry(country.clone())
                .or_default()
                .push(cert);
        }
        Ok(())
    }

    /// Adds CRL files for `country` (whose root must already be added) and loads them: a
    /// file that is unreadable, malformed or not signed by that root is refused.
    pub fn add_crls(&mut self, country: CountryCode, paths: &[PathBuf]) -> Result<(), TlsError> {
        if paths.is_empty() {
            return Ok(());
        }
        let previous = self.crl_files.get(&country).cloned();
        self.crl_files
            .entry(country.clone())
            .or_default()
            .extend(paths.iter().cloned());
        let result = self.reload_crls(&country);
        if result.is_err() {
            match previous {
                Some(p) => self.crl_files.insert(country, p),
                None => self.crl_files.remove(&country),
            };
        }
        result
    }

    /// Every configured CRL file, with its country.
    pub fn crl_files(&self) -> impl Iterator<Item = (&CountryCode, &PathBuf)> {
        self.crl_files
            .iter()
            .flat_map(|(c, paths)| paths.iter().map(move |p| (c, p)))
    }

    /// Reads all CRL files of `country` again and puts them in force at once, for new
    /// handshakes. On any error nothing changes: the previous CRLs stay in force.
    pub fn reload_crls(&self, country: &CountryCode) -> Result<(), TlsError> {
        let mut loaded = Vec::new();
        let mut issued = i64::MIN;
        let mut newest_path = None;
        for path in self.crl_files.get(country).into_iter().flatten() {
            for (crl, this_update) in self.load_crl_file(country, path)? {
                if this_update > issued {
                    issued = this_update;
                    newest_path = Some(path);
                }
                loaded.push(crl);
            }
        }
        let mut table = self.crls.write().unwrap_or_else(|e| e.into_inner());
        if let (Some((_, in_force)), Some(path)) = (table.get(country), newest_path) {
            if issued < *in_force {
                return Err(TlsError::Crl {
                    path: path.display().to_string(),
                    problem: format!(
                        "issued at {issued} (Unix seconds), before the CRL in force (issued at \
                         {in_force}): an older CRL could un-revoke certificates; publish a newer one"
                    ),
                });
            }
        }
        table.insert(country.clone(), (loaded, issued));
        Ok(())
    }

    fn load_crl_file(
        &self,
        country: &CountryCode,
        path: &Path,
    ) -> Result<Vec<(webpki::CertRevocationList<'static>, i64)>, TlsError> {
        let err = |problem: String| TlsError::Crl {
            path: path.display().to_string(),
            problem,
        };
        // Through the same capped, regular-file-only read as certificates and keys.
        let pem = crate::server::read_credential_file(path, false).map_err(err)?;
        let ders = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if ders.is_empty() {
            return Err(err("no X509 CRL in file".into()));
        }
        let roots = self
            .root_certs
            .get(country)
            .ok_or_else(|| err(format!("no root for {country}")))?;
        let mut crls = Vec::new();
        for der in ders {
            let (_, parsed) = x509_parser::parse_x509_crl(der.as_ref())
                .map_err(|e| err(format!("unparseable CRL: {e}")))?;
            let signed_by_root = roots.iter().any(|root| {
                x509_parser::parse_x509_certificate(root.as_ref()).is_ok_and(|(_, root)| {
                    root.subject() == parsed.issuer()
                        && parsed.verify_signature(root.public_key()).is_ok()
                })
            });
            if !signed_by_root {
                return Err(err(format!("not signed by the root of {country}")));
            }
            if let Some(next) = parsed.next_update() {
                if next.timestamp() < UnixTime::now().as_secs() as i64 {
                    tracing::warn!(
                        path = %path.display(),
                        next_update = %next,
                        "CRL is past its next update; still applied, publish a fresh one"
                    );
                }
            }
            let this_update = parsed.last_update().timestamp();
            let owned = webpki::OwnedCertRevocationList::from_der(der.as_ref())
                .map_err(|e| err(format!("refused by webpki: {e}")))?;
            crls.push((webpki::CertRevocationList::from(owned), this_update));
        }
        Ok(crls)
    }

    /// Verifies `end_entity`'s chain to the root of the country its SPIFFE id names, and
    /// checks every certificate of the chain against that country's CRLs.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        algs: &WebPkiSupportedAlgorithms,
    ) -> Result<SpiffeId, rustls::Error> {
        let id = spiffe_id(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        let anchors = self
            .roots
            .get(id.country())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let table = self.crls.read().unwrap_or_else(|e| e.into_inner());
        let crls: Vec<&webpki::CertRevocationList<'_>> = table
            .get(id.country())
            .into_iter()
            .flat_map(|(crls, _)| crls)
            .collect();
        // Whole chain; a certificate whose issuer published no CRL is not refused for that
        // (Allow). Expiry of a CRL (next_update) is ignored: the files are distributed by the
        // operator, not fetched, so a stale CRL still holds every revocation known when it
        // was signed, and enforcing next_update would turn a late re-publication into an
        // outage for every organisation of the country. Loading a stale CRL logs a warning.
        let revocation = webpki::RevocationOptionsBuilder::new(&crls).ok().map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                .build()
        });
        cert.verify_for_usage(
            algs.all,
            anchors,
            intermediates,
            now,
            usage,
            revocation,
            None,
        )
        .map_err(webpki_error)?;
        Ok(id)
    }
}

fn webpki_error(e: webpki::Error) -> rustls::Error {
    use rustls::CertificateError as C;
    rustls::Error::InvalidCertificate(match e {
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::CertRevoked => C::Revoked,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        _ => C::ApplicationVerificationFailure,
    })
}

/// Which identities a listener admits.
#[derive(Clone, Debug)]
pub enum Admission {
    /// Any holder of `role` from one of `countries` (the client listener: own organisations).
    Any {
        role: Role,
        countries: Vec<CountryCode>,
    },
    /// Exactly these identities (the peer listener: the configured peer gateways).
    Exactly(Vec<SpiffeId>),
}

impl Admission {
    fn admits(&self, id: &SpiffeId) -> bool {
        match self {
            Admission::Any { role, countries } => {
                id.role() == *role && countries.contains(id.country())
            }
            Admission::Exactly(ids) => ids.contains(id),
        }
    }
}

/// Server-side verifier: the client's chain must lead to the root of its own country, and
/// its identity must have the listener's role and one of its countries.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    roots: CountryRoots,
    admission: Admission,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::required(EKU_CLIENT_AUTH),
            &self.algs,
        )?;
        if !self.admission.admits(&id) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client-side verifier: the server must prove exactly the SPIFFE id we dialled.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: CountryRoots,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.roots.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::required(EKU_SERVER_AUTH),
            &self.algs,
        )?;
        if id != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOfferedOrEnabled,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The certificate chain and key this process presents, with the identity the certificate
/// names; rustls asks it for the pair at every handshake, so [`Credentials::reload`] swaps
/// in a renewed certificate for new handshakes while open connections keep theirs.
#[derive(Debug)]
pub struct Credentials {
    pub id: SpiffeId,
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Credentials {
    /// Loads a chain and its key; the key file must be owner-only, like every private key,
    /// and must hold the private half of the certificate's key.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, TlsError> {
        let (id, pair) = Self::read(cert, key)?;
        Ok(Arc::new(Self {
            id,
            cert_file: cert.to_path_buf(),
            key_file: key.to_path_buf(),
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    fn read(cert: &Path, key: &Path) -> Result<(SpiffeId, CertifiedKey), TlsError> {
        let chain = load_certs(cert)?;
        if chain.len() > MAX_CHAIN {
            return Err(TlsError::Pem {
                path: cert.display().to_string(),
                problem: format!("more than {MAX_CHAIN} certificates"),
            });
        }
        let id = spiffe_id(&chain[0])?;
        let signer = provider().key_provider.load_private_key(load_key(key)?)?;
        let pair = CertifiedKey::new(chain, signer);
        // Strict: a key whose public half cannot be compared (possible with other providers)
        // is refused too, where rustls' from_der would let it pass.
        pair.keys_match().map_err(|e| TlsError::Pem {
            path: key.display().to_string(),
            problem: format!("not the key of the certificate in {}: {e}", cert.display()),
        })?;
        Ok((id, pair))
    }

    /// The certificate and key files, as loaded (and reloaded) from.
    pub fn files(&self) -> [&Path; 2] {
        [&self.cert_file, &self.key_file]
    }

    /// Reads the files again and, if they hold a certificate for the same identity that
    /// `roots` accept now (chain, validity, CRLs, the EKUs of its role) and its own key,
    /// presents it from the next handshake on. On any error nothing changes.
    pub fn reload(&self, roots: &CountryRoots) -> Result<(), TlsError> {
        let (id, pair) = Self::read(&self.cert_file, &self.key_file)?;
        if id != self.id {
            return Err(TlsError::IdentityChanged {
                was: self.id.to_string(),
                now: id.to_string(),
            });
        }
        Self::accepted_by(&pair, &id, roots)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(())
    }

    /// Checks the certificate in force as a peer would: a gateway refuses to start with one
    /// its own country's root does not accept, rather than fail every handshake later.
    pub fn check(&self, roots: &CountryRoots) -> Result<(), TlsError> {
        Self::accepted_by(&self.certified(), &self.id, roots)
    }

    /// Whether `roots` accept `pair` for every use of `id`'s role: a gateway listens and
    /// dials (server and client auth), an organisation dials.
    fn accepted_by(
        pair: &CertifiedKey,
        id: &SpiffeId,
        roots: &CountryRoots,
    ) -> Result<(), TlsError> {
        let usages: &[&[u8]] = match id.role() {
            Role::Gateway => &[EKU_SERVER_AUTH, EKU_CLIENT_AUTH],
            Role::Org => &[EKU_CLIENT_AUTH],
        };
        let (end_entity, intermediates) = pair
            .cert
            .split_first()
            .ok_or_else(|| TlsError::NoIdentity("empty certificate chain".into()))?;
        let algs = provider().signature_verification_algorithms;
        for usage in usages {
            roots
                .verify(
                    end_entity,
                    intermediates,
                    UnixTime::now(),
                    webpki::KeyUsage::required(usage),
                    &algs,
                )
                .map_err(TlsError::Refused)?;
        }
        Ok(())
    }

    fn certified(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for Credentials {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl rustls::client::ResolvesClientCert for Credentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A listener's rustls config: TLS 1.3 only, client certificates required.
pub fn server_config(
    creds: &Arc<Credentials>,
    roots: CountryRoots,
    admission: Admission,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = SpiffeClientVerifier {
        roots,
        admission,
        algs: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(creds.clone());
    // No resumption: a resumed session skips the verifier, so a certificate revoked after
    // the first handshake would still get in. Connections are long-lived gRPC channels.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A dialer's rustls config: TLS 1.3 only, presenting `creds`, expecting `expected`.
pub fn client_config(
    creds: &Arc<Credentials>,
    roots: CountryRoots,
    expected: SpiffeId,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots,
        expected,
        algs: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(creds.clone());
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A connection to a peer that could not be made (TCP, TLS, or no answer within
/// [`CONNECT_LIMIT`]): a call that fails with it as its cause never left this gateway
/// ([`never_left`]).
#[derive(Debug, thiserror::Error)]
#[error("peer not reached: {0}")]
pub struct PeerNotReached(#[source] std::io::Error);

/// How long a connection to a peer may take to open, TLS handshake included.
const CONNECT_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether the call that failed with `status` never left this gateway: its connection to
/// the peer could not be made, so no byte of the request reached the peer. Anything else
/// (a connection dropped, a deadline, an error status) may have come after the peer took
/// the request.
///
/// Sound while the channel is as [`channel`] builds it: connected lazily (tonic's reconnect
/// hands a failed connection's error to the next call instead of sending it), with no
/// retry layer that could resend a call over a new connection, and no TLS early data
/// (resumption is off in [`client_config`]).
pub fn never_left(status: &tonic::Status) -> bool {
    let mut cause = std::error::Error::source(status);
    while let Some(e) = cause {
        if e.is::<PeerNotReached>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A lazily connecting gRPC channel over our own TLS: tonic's built-in TLS would allow
/// TLS 1.2 and check DNS names, where we check SPIFFE ids.
pub fn channel(addr: SocketAddr, config: rustls::ClientConfig) -> tonic::transport::Channel {
    channel_connecting_within(addr, config, CONNECT_LIMIT)
}

/// [`channel`], whose connections must open within `limit` (at most [`CONNECT_LIMIT`]): for
/// calls with a shorter limit of their own, so that a connection that never opened still
/// fails as one ([`PeerNotReached`]) before the call's own limit runs out, which would not
/// tell whether the peer took the call.
pub fn channel_connecting_within(
    addr: SocketAddr,
    config: rustls::ClientConfig,
    limit: std::time::Duration,
) -> tonic::transport::Channel {
    let limit = limit.min(CONNECT_LIMIT);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let service = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        let connect = async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The name is unused for verification (SPIFFE ids are); an IP sends no SNI.
            let name = ServerName::IpAddress(addr.ip().into());
            connector.connect(name, tcp).await
        };
        async move {
            let tls = match tokio::time::timeout(limit, connect).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return Err(PeerNotReached(e)),
                Err(_) => {
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no connection");
                    return Err(PeerNotReached(e));
                }
            };
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The URI only satisfies the builder; the connector above decides where to go.
    // HTTP/2 pings find a peer gone without closing the connection (a cut link, a host
    // down) within 40 s, idle or not, instead of when TCP gives up.
    tonic::transport::Endpoint::from_static("http://accord.invalid")
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect_with_connector_lazy(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp, root) = dev_pki();
        let org = root.join("vn/orgs/org");
        assert!(Credentials::load(&org.join("cert.pem"), &org.join("key.pem")).is_ok());
        std::fs::set_permissions(org.join("key.pem"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let err = Credentials::load(&org.join("cert.pem"), &org.join("key.pem")).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn the_peer_listener_admits_exactly_the_configured_gateways() {
        let admission = Admission::Exactly(vec!["spiffe://kh.accord/gateway/phnom-penh"
            .parse()
            .unwrap()]);
        assert!(admission.admits(&"spiffe://kh.accord/gateway/phnom-penh".parse().unwrap()));
        for other in [
            "spiffe://kh.accord/gateway/rogue",
            "spiffe://kh.accord/org/phnom-penh",
            "spiffe://la.accord/gateway/phnom-penh",
        ] {
            assert!(!admission.admits(&other.parse().unwrap()), "{other}");
        }
    }

    #[test]
    fn the_client_listener_admits_only_organisations_of_its_country() {
        let admission = Admission::Any {
            role: Role::Org,
            countries: vec!["vn".parse().unwrap()],
        };
        assert!(admission.admits(&"spiffe://vn.accord/org/c02".parse().unwrap()));
        assert!(!admission.admits(&"spiffe://vn.accord/gateway/hanoi".parse().unwrap()));
        assert!(!admission.admits(&"spiffe://kh.accord/org/ahtd".parse().unwrap()));
    }

    fn dev_pki() -> (tempfile::TempDir, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ["vn", "kh"].map(|cc| accord_certs::CountrySpec {
            country: cc.parse().unwrap(),
            gateway: "gw".into(),
            orgs: vec!["org".into()],
        });
        accord_certs::DevPki::write(tmp.path(), &spec, 1_750_000_000_000).unwrap();
        let root = tmp.path().to_owned();
        (tmp, root)
    }

    #[test]
    fn a_crl_signed_by_another_root_is_refused_at_load() {
        let (_tmp, pki) = dev_pki();
        let vn: CountryCode = "vn".parse().unwrap();
        let mut roots = CountryRoots::default();
        roots.add(vn.clone(), &pki.join("vn/ca.pem")).unwrap();
        let err = roots
            .add_crls(vn.clone(), &[pki.join("kh/crl.pem")])
            .unwrap_err();
        assert!(
            err.to_string().contains("not signed by the root of vn"),
            "{err}"
        );
        // Its own root's CRL is taken.
        roots
            .add_crls(vn.clone(), &[pki.join("vn/crl.pem")])
            .unwrap();
        // A CRL path that is a FIFO is refused at once (opening it would block), and one
        // beyond the credential size cap is not read.
        let fifo = pki.join("fifo.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let err = roots.add_crls(vn.clone(), &[fifo]).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let huge = pki.join("huge-crl.pem");
        std::fs::write(&huge, vec![b'A'; (1 << 20) + 1]).unwrap();
        let err = roots.add_crls(vn, &[huge]).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn a_revoked_certificate_fails_verification_as_revoked_after_a_reload() {
        let (_tmp, pki) = dev_pki();
        let vn: CountryCode = "vn".parse().unwrap();
        let mut roots = CountryRoots::default();
        roots.add(vn.clone(), &pki.join("vn/ca.pem")).unwrap();
        roots
            .add_crls(vn.clone(), &[pki.join("vn/crl.pem")])
            .unwrap();
        let verifier_roots = roots.clone();
        let cert = load_certs(&pki.join("vn/orgs/org/cert.pem")).unwrap();
        let algs = provider().signature_verification_algorithms;
        let verify = || {
            verifier_roots.verify(
                &cert[0],
                &[],
                UnixTime::now(),
                webpki::KeyUsage::required(EKU_CLIENT_AUTH),
                &algs,
            )
        };
        verify().unwrap();

        let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
        let serial = accord_certs::serial_of(&read("vn/orgs/org/cert.pem")).unwrap();
        let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
        let bad = accord_certs::revoke(
            &read("kh/ca.pem"),
            &read("kh/ca.key"),
            std::slice::from_ref(&serial),
            now,
        )
        .unwrap();
        std::fs::write(pki.join("vn/crl.pem"), bad).unwrap();
        assert!(roots.reload_crls(&vn).is_err());
        verify().unwrap(); // the previous CRL stays in force

        let crl =
            accord_certs::revoke(&read("vn/ca.pem"), &read("vn/ca.key"), &[serial], now).unwrap();
        std::fs::write(pki.join("vn/crl.pem"), crl).unwrap();
        roots.reload_crls(&vn).unwrap();
        let revoked = || {
            matches!(
                verify(),
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            )
        };
        assert!(revoked(), "{:?}", verify());

        // Rolling back to an older CRL (one that predates the revocation) would un-revoke
        // the certificate: refused, and the revocation stays in force.
        let older = accord_certs::revoke(
            &read("vn/ca.pem"),
            &read("vn/ca.key"),
            &[],
            now - time::Duration::minutes(10),
        )
        .unwrap();
        std::fs::write(pki.join("vn/crl.pem"), older).unwrap();
        let err = roots.reload_crls(&vn).unwrap_err();
        assert!(err.to_string().contains("before the CRL in force"), "{err}");
        assert!(revoked(), "{:?}", verify());
    }

    /// A gateway's renewed credentials, issued by `ca` (a country folder of the dev PKI) for
    /// `id`, written over the gateway's files; returns the new certificate's PEM.
    fn renew(pki: &Path, ca: &str, id: &str, key: Option<&str>) -> String {
        let read = |p: String| std::fs::read_to_string(pki.join(p)).unwrap();
        let issued = accord_certs::reissue(
            &read(format!("{ca}/ca.pem")),
            &read(format!("{ca}/ca.key")),
            &id.parse().unwrap(),
        )
        .unwrap();
        let gw = pki.join("vn/gateway");
        std::fs::write(gw.join("cert.pem"), &issued.cert_pem).unwrap();
        let key_pem = key.map_or(issued.key_pem, str::to_owned);
        accord_certs::write_file(&gw.join("key.pem"), key_pem.as_bytes(), true).unwrap();
        issued.cert_pem
    }

    #[test]
    fn renewed_credentials_are_presented_only_if_same_identity_own_key_and_accepted_by_the_root() {
        let (_tmp, pki) = dev_pki();
        let vn: CountryCode = "vn".parse().unwrap();
        let gw = pki.join("vn/gateway");
        let mut roots = CountryRoots::default();
        roots.add(vn.clone(), &pki.join("vn/ca.pem")).unwrap();
        roots
            .add_crls(vn.clone(), &[pki.join("vn/crl.pem")])
            .unwrap();
        let creds = Credentials::load(&gw.join("cert.pem"), &gw.join("key.pem")).unwrap();
        creds.check(&roots).unwrap();
        let presented = || creds.certified().cert[0].to_vec();
        let original = presented();
        let original_key = std::fs::read_to_string(gw.join("key.pem")).unwrap();
        let der = |pem: &str| {
            CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .to_vec()
        };

        // Another identity of the same country: refused, the one in force stays.
        renew(&pki, "vn", "spiffe://vn.accord/gateway/rogue", None);
        let err = creds.reload(&roots).unwrap_err();
        assert!(matches!(err, TlsError::IdentityChanged { .. }), "{err}");
        // Our identity, issued by another country's root.
        renew(&pki, "kh", "spiffe://vn.accord/gateway/gw", None);
        let err = creds.reload(&roots).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Refused(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{err}"
        );
        // A new certificate next to the old key (written before its key, say).
        renew(
            &pki,
            "vn",
            "spiffe://vn.accord/gateway/gw",
            Some(&original_key),
        );
        let err = creds.reload(&roots).unwrap_err();
        assert!(
            err.to_string().contains("not the key of the certificate"),
            "{err}"
        );
        // A key others may read.
        renew(&pki, "vn", "spiffe://vn.accord/gateway/gw", None);
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(gw.join("key.pem"), std::fs::Permissions::from_mode(0o640))
                .unwrap();
        }
        let err = creds.reload(&roots).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Our identity from our root, but without one of the two uses a gateway needs.
        for only in [
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ] {
            let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
            let ca_key = rcgen::KeyPair::from_pem(&read("vn/ca.key")).unwrap();
            let issuer = rcgen::Issuer::from_ca_cert_pem(&read("vn/ca.pem"), ca_key).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://vn.accord/gateway/gw".try_into().unwrap(),
            )];
            params.extended_key_usages = vec![only.clone()];
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(gw.join("cert.pem"), cert.pem()).unwrap();
            accord_certs::write_file(&gw.join("key.pem"), key.serialize_pem().as_bytes(), true)
                .unwrap();
            let err = creds.reload(&roots).unwrap_err();
            assert!(matches!(err, TlsError::Refused(_)), "{only:?}: {err}");
        }
        assert_eq!(presented(), original);

        // A proper renewal is taken...
        let renewed = renew(&pki, "vn", "spiffe://vn.accord/gateway/gw", None);
        creds.reload(&roots).unwrap();
        assert_eq!(presented(), der(&renewed));
        // ...and a revoked one is not: the renewal in force stays.
        let read = |p: &str| std::fs::read_to_string(pki.join(p)).unwrap();
        let revoked = renew(&pki, "vn", "spiffe://vn.accord/gateway/gw", None);
        let crl = accord_certs::revoke(
            &read("vn/ca.pem"),
            &read("vn/ca.key"),
            &[accord_certs::serial_of(&revoked).unwrap()],
            time::OffsetDateTime::now_utc() - time::Duration::minutes(1),
        )
        .unwrap();
        std::fs::write(pki.join("vn/crl.pem"), crl).unwrap();
        roots.reload_crls(&vn).unwrap();
        let err = creds.reload(&roots).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::Refused(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::Revoked
                ))
            ),
            "{err}"
        );
        assert_eq!(presented(), der(&renewed));
    }
}
