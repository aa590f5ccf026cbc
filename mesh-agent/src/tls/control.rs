//! Identities of the mesh's own parts, as opposed to workloads: a node agent authenticating to
//! the certificate authority (`spiffe://<trust-domain>/node/<node>`) and the CA's API
//! (`spiffe://<trust-domain>/ca`).
//!
//! Their paths can never parse as a workload identity (`/ns/<namespace>/sa/<sa>`, see
//! [`super::SpiffeId`]) and the reverse: a node certificate cannot be presented as a workload
//! (the tunnel refuses it), and a workload certificate cannot authenticate a node to the CA.
//! Parsing is as strict as for workloads, for the same reason: the text is compared with a
//! certificate's URI SAN.

use std::fmt;

use crate::names::{self, NameError};

const SCHEME: &str = "spiffe://";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlIdError {
    #[error("{0:?} is not spiffe://<trust-domain>/node/<node> nor spiffe://<trust-domain>/ca")]
    Path(String),
    #[error("{id:?}: bad trust domain: {reason}")]
    TrustDomain { id: String, reason: NameError },
    #[error("{id:?}: bad node name: {reason}")]
    Node { id: String, reason: NameError },
}

/// A node agent or the CA: who is at either end of the CA's API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControlId {
    /// A node agent, named as the node (`agent.node`, the Kubernetes node name).
    Node { trust_domain: String, node: String },
    /// The certificate authority's API.
    Ca { trust_domain: String },
}

impl ControlId {
    /// The identity of the agent of `node`.
    pub fn node(trust_domain: &str, node: &str) -> Result<Self, ControlIdError> {
        Self::parse(&format!("{SCHEME}{trust_domain}/node/{node}"))
    }

    /// The identity of the CA's API.
    pub fn ca(trust_domain: &str) -> Result<Self, ControlIdError> {
        Self::parse(&format!("{SCHEME}{trust_domain}/ca"))
    }

    pub fn parse(id: &str) -> Result<Self, ControlIdError> {
        let owned = || id.to_owned();
        let (trust_domain, path) = id
            .strip_prefix(SCHEME)
            .and_then(|rest| rest.split_once('/'))
            .ok_or_else(|| ControlIdError::Path(owned()))?;
        names::Kind::TrustDomain
            .check(trust_domain)
            .map_err(|reason| ControlIdError::TrustDomain {
                id: owned(),
                reason,
            })?;
        let trust_domain = trust_domain.to_owned();
        if path == "ca" {
            return Ok(Self::Ca { trust_domain });
        }
        let node = path
            .strip_prefix("node/")
            .ok_or_else(|| ControlIdError::Path(owned()))?;
        names::Kind::Node
            .check(node)
            .map_err(|reason| ControlIdError::Node {
                id: owned(),
                reason,
            })?;
        Ok(Self::Node {
            trust_domain,
            node: node.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        match self {
            Self::Node { trust_domain, .. } | Self::Ca { trust_domain } => trust_domain,
        }
    }

    /// The node's name, for a node identity.
    pub fn node_name(&self) -> Option<&str> {
        match self {
            Self::Node { node, .. } => Some(node),
            Self::Ca { .. } => None,
        }
    }
}

impl fmt::Display for ControlId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node { trust_domain, node } => write!(f, "{SCHEME}{trust_domain}/node/{node}"),
            Self::Ca { trust_domain } => write!(f, "{SCHEME}{trust_domain}/ca"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ControlId;
    use crate::tls::SpiffeId;

    #[test]
    fn round_trips_and_never_parses_as_a_workload() {
        let node = ControlId::node("cluster.local", "node-1.zone").expect("node");
        assert_eq!(node.to_string(), "spiffe://cluster.local/node/node-1.zone");
        assert_eq!(node.node_name(), Some("node-1.zone"));
        assert_eq!(ControlId::parse(&node.to_string()), Ok(node.clone()));
        let ca = ControlId::ca("cluster.local").expect("ca");
        assert_eq!(ca.to_string(), "spiffe://cluster.local/ca");
        assert_eq!(ca.node_name(), None);
        for id in [&node, &ca] {
            assert!(SpiffeId::parse(&id.to_string()).is_err(), "{id}");
        }
        let workload = "spiffe://cluster.local/ns/a/sa/b";
        assert!(ControlId::parse(workload).is_err());
    }

    #[test]
    fn rejects_near_misses() {
        for bad in [
            "",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe://cluster.local/ca/",
            "spiffe://cluster.local/CA",
            "spiffe://cluster.local/node/",
            "spiffe://cluster.local/node/a/b",
            "spiffe://cluster.local/node/Node1",
            "spiffe://cluster.local/nodes/a",
            "spiffe://Cluster.local/node/a",
            "spiffe://cluster.local:1/node/a",
            "https://cluster.local/node/a",
        ] {
            assert!(ControlId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ControlId::node("td", "a/b").is_err());
    }
}
