//! Node authentication: who is asking the CA. A seam, so the server does not know how nodes
//! prove who they are: it hands each request's [`Caller`] (the client certificate of the
//! handshake, if any, and the request's headers) to the [`NodeAuthenticator`] in force.
//!
//! Local mode authenticates by the node certificate the TLS handshake already verified (a
//! chain to the CA's roots, client authentication, a `spiffe://<td>/node/<name>` URI SAN):
//! [`NodeCertificate`] only reads the name back. In Kubernetes, the agent's projected
//! service-account token in `Authorization: Bearer`, checked with a TokenReview
//! ([`super::token::TokenReviewer`]).

use std::{future::Future, pin::Pin};

use http::HeaderMap;
use rustls::pki_types::CertificateDer;

use crate::tls::{self, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no node identity: {0}")]
    Certificate(#[from] ConfigError),
    #[error("{0} is not a node")]
    NotANode(String),
    #[error("no bearer token in the request")]
    NoToken,
    /// The credential was checked and is not a node's.
    #[error("{0}")]
    Refused(String),
    /// The credential could not be checked now (the API server unreachable, the CA's pod
    /// list not in yet, too many reviews at once): the node should try again.
    #[error("{0}")]
    Unavailable(String),
}

/// What a request shows of who sent it.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The client certificate the handshake verified (leaf), if the client presented one.
    pub certificate: Option<&'a CertificateDer<'static>>,
    pub headers: &'a HeaderMap,
}

/// The future a [`NodeAuthenticator`] returns (a TokenReview is a network call).
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthError>> + Send + 'a>>;

/// Names the node that sent a request to the CA.
pub trait NodeAuthenticator: Send + Sync {
    /// The node's name, from what the request shows.
    fn authenticate<'a>(&'a self, caller: Caller<'a>) -> AuthFuture<'a>;
}

/// Local mode: the node certificate issued by `mesh-agent ca issue-node`.
pub struct NodeCertificate;

impl NodeAuthenticator for NodeCertificate {
    fn authenticate<'a>(&'a self, caller: Caller<'a>) -> AuthFuture<'a> {
        Box::pin(async move {
            let id = tls::peer_node(caller.certificate)?;
            id.node_name()
                .map(str::to_owned)
                .ok_or_else(|| AuthError::NotANode(id.to_string()))
        })
    }
}
