//! Mutual TLS policy, in one module: rustls with the `ring` provider, TLS 1.3 only.
//!
//! Identity is the SPIFFE URI SAN of a verified certificate, nothing else in it. A chain is
//! verified against the root of the country its SPIFFE id names, so a Cambodian root can
//! never vouch for a Vietnamese identity. The same check runs on both sides: the listeners
//! verify clients and peer gateways ([`SpiffeClientVerifier`]), a dialer verifies the
//! gateway it expects ([`SpiffeServerVerifier`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use accord_proto::ids::{CountryCode, Role, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
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
}

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

pub fn load_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |problem: String| TlsError::Pem {
        path: path.display().to_string(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        problem: e.to_string(),
    })
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

/// Trust anchors per country: which root may vouch for which country's identities.
#[derive(Clone, Debug, Default)]
pub struct CountryRoots {
    roots: BTreeMap<CountryCode, Vec<rustls_pki_types::TrustAnchor<'static>>>,
}

impl CountryRoots {
    pub fn add(&mut self, country: CountryCode, path: &std::path::Path) -> Result<(), TlsError> {
        for cert in load_certs(path)? {
            let anchor = webpki::anchor_from_trusted_cert(&cert)
                .map_err(|e| TlsError::Pem {
                    path: path.display().to_string(),
                    problem: format!("not a usable root: {e}"),
                })?
                .to_owned();
            self.roots.entry(country.clone()).or_default().push(anchor);
        }
        Ok(())
    }

    /// Verifies `end_entity`'s chain to the root of the country its SPIFFE id names.
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
        cert.verify_for_usage(algs.all, anchors, intermediates, now, usage, None, None)
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

/// A certificate chain and key, with the identity the certificate names.
#[derive(Debug)]
pub struct Credentials {
    pub id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Credentials {
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, TlsError> {
        let chain = load_certs(cert)?;
        let id = spiffe_id(&chain[0])?;
        Ok(Self {
            id,
            chain,
            key: load_key(key)?,
        })
    }
}

/// A listener's rustls config: TLS 1.3 only, client certificates required.
pub fn server_config(
    creds: &Credentials,
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
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A dialer's rustls config: TLS 1.3 only, presenting `creds`, expecting `expected`.
pub fn client_config(
    creds: &Credentials,
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
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A lazily connecting gRPC channel over our own TLS: tonic's built-in TLS would allow
/// TLS 1.2 and check DNS names, where we check SPIFFE ids.
pub fn channel(addr: SocketAddr, config: rustls::ClientConfig) -> tonic::transport::Channel {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let service = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // The name is unused for verification (SPIFFE ids are); an IP sends no SNI.
            let name = ServerName::IpAddress(addr.ip().into());
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The URI only satisfies the builder; the connector above decides where to go.
    tonic::transport::Endpoint::from_static("http://accord.invalid")
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_with_connector_lazy(service)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
