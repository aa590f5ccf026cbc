//! Node authentication: who is asking the CA. A seam, so the Kubernetes variant (the agent's
//! projected service-account token, checked with a TokenReview and bound to its pod and node)
//! plugs in beside the local one without touching the server.
//!
//! Local mode authenticates by the node certificate the TLS handshake already verified (a
//! chain to the CA's roots, client authentication, a `spiffe://<td>/node/<name>` URI SAN):
//! [`NodeCertificate`] only reads the name back.

use std::{future::Future, pin::Pin};

use rustls::CommonState;

use crate::tls::{self, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no node identity: {0}")]
    Certificate(#[from] ConfigError),
    #[error("{0} is not a node")]
    NotANode(String),
}

/// The future a [`NodeAuthenticator`] returns (a TokenReview is a network call).
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthError>> + Send + 'a>>;

/// Names the node at the other end of a connection to the CA.
pub trait NodeAuthenticator: Send + Sync {
    /// The node's name, from the finished handshake `connection`.
    fn authenticate<'a>(&'a self, connection: &'a CommonState) -> AuthFuture<'a>;
}

/// Local mode: the node certificate issued by `mesh-agent ca issue-node`.
pub struct NodeCertificate;

impl NodeAuthenticator for NodeCertificate {
    fn authenticate<'a>(&'a self, connection: &'a CommonState) -> AuthFuture<'a> {
        Box::pin(async move {
            let id = tls::peer_node(connection)?;
            id.node_name()
                .map(str::to_owned)
                .ok_or_else(|| AuthError::NotANode(id.to_string()))
        })
    }
}
