//! Placement: which identities may be issued to which node. The CA signs an identity for a
//! node only if a pod running as that service account is placed on that node, so a node's
//! agent — or whoever owns the node — gets the identities of its own pods and no other.
//!
//! A seam, as authentication is: the Kubernetes variant answers from the CA's own watch of
//! pods (`spec.nodeName`, `spec.serviceAccountName`; [`super::pods::PodWatch`]). Local mode answers from the mesh
//! configuration file (`workloads[].node`, `namespace`, `serviceAccount`), reloaded when it
//! changes like the agents' ([`crate::config::watch`]): moving a pod is editing its `node`.

use std::path::Path;

use crate::{
    config::{
        Config, ConfigError,
        watch::{self, ConfigWatch},
    },
    tls::SpiffeId,
};

/// The placement cannot answer yet (the CA's first list of pods is not in): the CA answers
/// `503` and the node tries again.
#[derive(Debug, thiserror::Error)]
#[error("the CA does not know the cluster's pods yet")]
pub struct NotSynced;

/// Answers the CA's one question about the cluster.
pub trait Placement: Send + Sync {
    /// Whether a pod running as `identity` is placed on `node`.
    fn placed(&self, node: &str, identity: &SpiffeId) -> Result<bool, NotSynced>;
}

/// Local mode: the workloads of the mesh configuration file, as in force now.
pub struct ConfigPlacement {
    watch: ConfigWatch,
}

impl ConfigPlacement {
    /// Loads `path` (refusing an invalid file) and watches it; a later invalid version is
    /// logged and the one in force stays, as in the agent.
    pub fn watch(path: &Path) -> Result<Self, ConfigError> {
        Ok(Self {
            watch: watch::load(path, None)?,
        })
    }

    /// The trust domain of the configuration (`agent.trustDomain`) in force.
    pub fn trust_domain(&self) -> String {
        self.watch.snapshot().agent().startup.trust_domain.clone()
    }
}

impl Placement for ConfigPlacement {
    fn placed(&self, node: &str, identity: &SpiffeId) -> Result<bool, NotSynced> {
        Ok(placed(&self.watch.snapshot(), node, identity))
    }
}

fn placed(config: &Config, node: &str, identity: &SpiffeId) -> bool {
    config
        .workloads()
        .iter()
        .any(|w| w.node == node && &w.identity == identity)
}

#[cfg(test)]
mod tests {
    use super::placed;
    use crate::{config::Config, tls::SpiffeId};

    #[test]
    fn an_identity_is_placed_where_its_pods_run() {
        let config = Config::from_yaml_str(
            "agent: {node: ca-host}\n\
             workloads:\n\
             - {name: a, namespace: shop, serviceAccount: api, ips: [10.0.0.1], node: n1}\n\
             - {name: b, namespace: shop, serviceAccount: api, ips: [10.0.0.2], node: n2}\n\
             - {name: c, namespace: shop, serviceAccount: db, ips: [10.0.0.3], node: n2}\n",
            "mesh.yaml",
        )
        .expect("config");
        let id = |sa: &str| SpiffeId::new("cluster.local", "shop", sa).expect("id");
        assert!(placed(&config, "n1", &id("api")));
        assert!(placed(&config, "n2", &id("api")));
        assert!(placed(&config, "n2", &id("db")));
        assert!(!placed(&config, "n1", &id("db")), "db runs on n2 only");
        assert!(!placed(&config, "n3", &id("api")), "no pod on n3");
        let other_ns = SpiffeId::new("cluster.local", "other", "api").expect("id");
        assert!(!placed(&config, "n1", &other_ns));
        let other_td = SpiffeId::new("other.td", "shop", "api").expect("id");
        assert!(!placed(&config, "n1", &other_td));
    }
}
