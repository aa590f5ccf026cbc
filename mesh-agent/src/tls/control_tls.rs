//! rustls configurations of the CA's API: TLS 1.3 only, ALPN `http/1.1`, authentication with
//! [`ControlId`]s. The node accepts only a server holding the CA identity. Locally the node
//! presents its node certificate and the CA accepts only node certificates (client
//! authentication, a chain to its own roots), so a workload certificate — which the node holds
//! the keys of — can never stand in for the node; in Kubernetes the node presents none and
//! proves who it is with its service-account token in each request instead. Session resumption is off on both sides, as
//! for the tunnel: a resumed session would skip the certificate checks.

use std::{fmt, sync::Arc};

use rustls::{
    ClientConfig, DistinguishedName, ServerConfig,
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

/// A node agent's side: accepts only a server chaining to `bundle` whose identity is exactly
/// `expected` (the CA); presents `node` (its node certificate, leaf first, and key) when it
/// has one. Without (Kubernetes), the TLS authenticates the server only and the node proves
/// who it is with a bearer token in each request.
pub fn ca_client_config(
    bundle: TrustBundle,
    expected: ControlId,
    node: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, ConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaVerifier { bundle, expected }));
    let mut config = match node {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    config.resumption = Resumption::disabled();
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// The CA's side: presents what `resolver` gives. With `node_roots`, requires a client
/// certificate chaining to them, for client authentication, naming a node of
/// `trust_domain` (read the node back with [`peer_node`]); without (Kubernetes), asks for no
/// client certificate: every request then carries a token the CA checks.
pub fn ca_server_config(
    node_roots: Option<TrustBundle>,
    trust_domain: &str,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match node_roots {
        Some(bundle) => builder.with_client_cert_verifier(Arc::new(NodeVerifier {
            bundle,
            trust_domain: trust_domain.to_owned(),
        })),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The verified node identity in the client certificate `leaf` of a finished handshake.
pub fn peer_node(leaf: Option<&CertificateDer<'_>>) -> Result<ControlId, ConfigError> {
    let leaf = leaf.ok_or(ConfigError::NoPeerCertificate)?;
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
