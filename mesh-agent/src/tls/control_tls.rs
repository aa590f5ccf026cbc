//! rustls configurations of the CA's API: TLS 1.3 only, ALPN `http/1.1`, mutual
//! authentication with [`ControlId`]s. The node presents its node certificate and accepts
//! only a server holding the CA identity; the CA accepts only node certificates (client
//! authentication, a chain to its own roots), so a workload certificate — which the node holds
//! the keys of — can never stand in for the node. Session resumption is off on both sides, as
//! for the tunnel: a resumed session would skip the certificate checks.

use std::{fmt, sync::Arc};

use rustls::{
    ClientConfig, CommonState, DistinguishedName, ServerConfig,
    client::{
        Resumption,
        danger::{ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        NoServerSessionStorage, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{
    bundle::TrustBundle,
    cert,
    config::{ConfigError, other_error, verify_path},
    control::ControlId,
    provider,
};

/// The application protocol of the CA's API.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a peer of the CA's API was refused; carried inside the rustls error.
#[derive(Debug)]
pub struct ControlMismatch {
    /// What was expected: "the CA of cluster.local", "a node of cluster.local".
    pub expected: String,
    pub presented: String,
}

impl fmt::Display for ControlMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not {}", self.presented, self.expected)
    }
}

impl std::error::Error for ControlMismatch {}

/// A node agent's side: presents `chain` (its node certificate, leaf first) with `key`;
/// accepts only a server chaining to `bundle` whose identity is exactly `expected` (the CA).
pub fn ca_client_config(
    bundle: TrustBundle,
    expected: ControlId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaVerifier { bundle, expected }))
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The CA's side: presents what `resolver` gives; requires a client certificate chaining to
/// `bundle`, for client authentication, naming a node of `trust_domain`. Read the node back
/// with [`peer_node`].
pub fn ca_server_config(
    bundle: TrustBundle,
    trust_domain: &str,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(NodeVerifier {
            bundle,
            trust_domain: trust_domain.to_owned(),
        }))
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The verified node identity of the client of a finished handshake.
pub fn peer_node(connection: &CommonState) -> Result<ControlId, ConfigError> {
    let leaf = connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(ConfigError::NoPeerCertificate)?;
    Ok(cert::control_id_of(leaf)?)
}

#[derive(Debug)]
struct CaVerifier {
    bundle: TrustBundle,
    expected: ControlId,
}

impl ServerCertVerifier for CaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_path(
            &self.bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let presented = cert::control_id_of(end_entity).map_err(other_error)?;
        if presented != self.expected {
            return Err(other_error(ControlMismatch {
                expected: self.expected.to_string(),
                presented: presented.to_string(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    super::config::tls13_only_signatures!();
}

#[derive(Debug)]
struct NodeVerifier {
    bundle: TrustBundle,
    trust_domain: String,
}

impl ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
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
        verify_path(
            &self.bundle,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        let presented = cert::control_id_of(end_entity).map_err(other_error)?;
        if presented.node_name().is_none() || presented.trust_domain() != self.trust_domain {
            return Err(other_error(ControlMismatch {
                expected: format!("a node of {}", self.trust_domain),
                presented: presented.to_string(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    super::config::tls13_only_signatures!();
}
