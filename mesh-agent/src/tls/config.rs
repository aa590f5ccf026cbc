//! rustls configurations for the tunnel: TLS 1.3 only, ALPN `h2`, mutual authentication with
//! SPIFFE identities. Peers are checked against the store's trust bundle at every handshake
//! (so a bundle swap applies to new connections) and identified by their URI SAN, never by a
//! DNS name: the expected server identity is fixed in the client config itself.
//!
//! Session resumption is off on both sides: a resumed TLS 1.3 session skips certificate
//! verification, which would let a connection outlive a removed root or an expired peer
//! certificate, and the tunnel pool already amortises handshakes over many streams.

use std::{fmt, sync::Arc};

use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, NoServerSessionStorage, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{
    bundle::TrustBundle,
    cert::{self, CertError},
    identity::SpiffeId,
    provider,
    store::CertStore,
};

/// The only application protocol the tunnel speaks.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no certificate for {0} (call CertStore::ensure first)")]
    NotIssued(SpiffeId),
    #[error("building the TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("the peer certificate has no usable identity: {0}")]
    PeerIdentity(#[from] CertError),
}

/// The server side of a tunnel listener serving `identity` (one listener per pod): presents
/// that identity's current certificate and requires a client certificate chaining to the
/// bundle and carrying a SPIFFE identity. Read it back with [`peer_identity`].
pub fn server_config(
    store: &Arc<CertStore>,
    identity: &SpiffeId,
) -> Result<Arc<ServerConfig>, ConfigError> {
    if store.info(identity).is_none() {
        return Err(ConfigError::NotIssued(identity.clone()));
    }
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(ClientVerifier {
            store: store.clone(),
        }))
        .with_cert_resolver(Arc::new(StoreResolver {
            store: store.clone(),
            identity: identity.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The client side of a tunnel from `source` to a server that must be `expected_server`:
/// presents `source`'s certificate; accepts only a chain to the bundle whose leaf's URI SAN is
/// exactly `expected_server`. The server name given to the connector is not checked.
pub fn client_config(
    store: &Arc<CertStore>,
    source: &SpiffeId,
    expected_server: &SpiffeId,
) -> Result<Arc<ClientConfig>, ConfigError> {
    if store.info(source).is_none() {
        return Err(ConfigError::NotIssued(source.clone()));
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            store: store.clone(),
            expected: expected_server.clone(),
        }))
        .with_client_cert_resolver(Arc::new(StoreResolver {
            store: store.clone(),
            identity: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The verified SPIFFE identity of the peer of a finished handshake.
pub fn peer_identity(connection: &CommonState) -> Result<SpiffeId, ConfigError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(ConfigError::NoPeerCertificate)?;
    Ok(cert::identity_of(leaf)?)
}

/// Why a server's identity was refused; carried inside the rustls error.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub expected: SpiffeId,
    pub presented: String,
}

impl fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server identity {} is not the expected {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for IdentityMismatch {}

/// Presents the store's current certificate for one identity; loaded per handshake, so a
/// rotation applies to the next handshake.
#[derive(Debug)]
struct StoreResolver {
    store: Arc<CertStore>,
    identity: SpiffeId,
}

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.certified_key(&self.identity)
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.certified_key(&self.identity)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore").finish_non_exhaustive()
    }
}

/// Chain to one of the bundle's roots, valid now, with the given extended key usage; the
/// leaf's workload identity.
fn verify_chain(
    store: &CertStore,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, rustls::Error> {
    verify_path(&store.bundle(), end_entity, intermediates, now, usage)?;
    cert::identity_of(end_entity).map_err(other_error)
}

/// Chain to one of `bundle`'s roots, valid now, with the given extended key usage.
pub(super) fn verify_path(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<(), rustls::Error> {
    let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    leaf.verify_for_usage(
        provider().signature_verification_algorithms.all,
        bundle.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    Ok(())
}

/// Our own reason for refusing a certificate, carried inside the rustls error.
pub(super) fn other_error(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// The webpki errors worth telling apart in a log line; the rest are carried as they are.
fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let cert_error = match error {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey
        | E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

#[derive(Debug)]
struct ClientVerifier {
    store: Arc<CertStore>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The client has one certificate per identity; hints would only leak the roots.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        verify_chain(
            &self.store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

#[derive(Debug)]
struct ServerVerifier {
    store: Arc<CertStore>,
    expected: SpiffeId,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = verify_chain(
            &self.store,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if presented != self.expected {
            return Err(other_error(IdentityMismatch {
                expected: self.expected.clone(),
                presented: presented.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// The handshake-signature methods of every verifier of the mesh, the same for all: TLS 1.3
/// only, with the provider's algorithms. Expands inside an `impl ServerCertVerifier` or
/// `impl ClientCertVerifier`.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls::pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            $crate::tls::config::tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            $crate::tls::config::verify_schemes()
        }
    };
}
pub(super) use tls13_only_signatures;

/// Handshake signatures, the same for every verifier: the provider's algorithms.
pub(super) fn tls13_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

pub(super) fn verify_schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}
