//! What every connection handler shares, and the one admission step (register, then
//! authorize against the snapshot in force) that every way in goes through.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Semaphore;

use super::{
    SocketReserve,
    client_ip::ClientIpPath,
    registry::{ConnectionInfo, Registry, Subject, Tracked},
};
use crate::{
    authz::{self, Decision},
    balance::Balancers,
    config::Config,
    ebpf::{Datapath, EbpfError, FastPathCredits, OrigDstTable, TransparentSources},
    limit::Limits,
    metrics::Metrics,
    sys::{NetnsError, NetnsThread},
    tls::SpiffeId,
    tunnel::{MeshTls, MeshTlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("opening listener {addr} in {netns}: {source}")]
    Listen {
        addr: SocketAddr,
        netns: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Ebpf(#[from] Box<EbpfError>),
    #[error(transparent)]
    MeshTls(#[from] MeshTlsError),
    #[error("no certificate within {0:?} (the CA is slow or unreachable); tried again later")]
    CertificateWait(std::time::Duration),
}

pub struct ProxyContext {
    /// The current config snapshot; swapped whole on reload.
    pub config: Arc<ArcSwap<Config>>,
    /// Enrollment's handle on the eBPF maps; never taken per connection.
    pub datapath: Arc<Mutex<Datapath>>,
    /// The hot path's own handle: original destinations of captured connects.
    pub orig_dst: Arc<OrigDstTable>,
    /// The hot path's other handle: where transparent connects come from, for sk_lookup.
    pub transparent_sources: Arc<TransparentSources>,
    /// The eBPF fast path's read counts (present when `agent.fastPath` is on).
    pub fast_path: Option<Arc<FastPathCredits>>,
    /// Per service port: endpoint state, picking, retry budgets, circuit limits.
    pub balancers: Arc<Balancers>,
    /// Node-wide rate limits.
    pub limits: Arc<Limits>,
    /// The enrolled pods by `namespace/name` (the health checker connects from them).
    pub pods: RwLock<HashMap<Arc<str>, PodHandle>>,
    pub metrics: Arc<Metrics>,
    /// Live connections: what the connections view shows, and what each was authorized as
    /// (for revocation on reload).
    pub connections: Arc<Registry>,
    /// Certificates, tunnels to other nodes, tunnel server options.
    pub mesh_tls: Arc<MeshTls>,
    /// One permit per connection being proxied (`agent.maxConnections`).
    pub connection_slots: Arc<Semaphore>,
}

/// Why [`ProxyContext::admit`] refused.
#[derive(Debug)]
pub enum Refused {
    Denied(Decision),
    /// The destination workload left the configuration.
    Gone,
}

impl ProxyContext {
    /// Registers `subject` for revocation first, then authorizes it against the snapshot in
    /// force *now*: a reload that lands before the registration is seen by this check, one
    /// that lands after it finds the registration and revokes it. No window lets a
    /// connection the new policy denies through.
    pub fn admit(
        &self,
        subject: Subject,
        info: ConnectionInfo,
    ) -> Result<(Tracked, Decision), Refused> {
        admit(&self.connections, &self.config, subject, info)
    }

    /// Closes the established connections `config` no longer authorizes; returns how many.
    pub fn revoke_denied(&self, config: &Config) -> usize {
        revoke_denied(&self.connections, config)
    }
}

/// [`ProxyContext::admit`], on its two parts.
fn admit(
    registry: &Arc<Registry>,
    config: &ArcSwap<Config>,
    subject: Subject,
    info: ConnectionInfo,
) -> Result<(Tracked, Decision), Refused> {
    let tracked = registry.track(Some(subject.clone()), info);
    let config = config.load();
    let Some(workload) = config.local_workload(&subject.destination) else {
        return Err(Refused::Gone);
    };
    let decision = authz::authorize(&config, subject.source.as_ref(), workload, subject.port);
    if decision.allowed {
        Ok((tracked, decision))
    } else {
        Err(Refused::Denied(decision))
    }
}

fn revoke_denied(registry: &Registry, config: &Config) -> usize {
    registry.revoke(|subject| {
        let Some(workload) = config.local_workload(&subject.destination) else {
            // The workload left the config: not a policy decision; its pod goes away.
            return true;
        };
        authz::authorize(config, subject.source.as_ref(), workload, subject.port).allowed
    })
}

/// One enrolled pod as the proxy sees it.
#[derive(Clone)]
pub struct PodHandle {
    /// `namespace/name`, the key of the workload in the config.
    pub key: Arc<str>,
    /// Its SPIFFE identity: what it presents to other nodes' pods.
    pub identity: SpiffeId,
    pub netns: NetnsThread,
    /// Ready upstream sockets made in the pod's netns.
    pub sockets: Arc<SocketReserve>,
    /// Its addresses (a change enrolls it again): what it claims as a tunnel's client.
    pub ips: Arc<[IpAddr]>,
    /// Whether its app can see the address of clients from other nodes.
    pub client_ip: Arc<ClientIpPath>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Pod `srv` on this node; with `deny`, a policy denying everything to it.
    fn config(deny: bool) -> Arc<Config> {
        let mut yaml = String::from(
            "agent: {node: a}\n\
             workloads:\n\
             \x20 - {name: srv, namespace: demo, ips: [10.1.0.4], node: a, netns: /n/s}\n",
        );
        if deny {
            yaml.push_str(
                "policies:\n  authorization:\n    - {name: shut, namespace: demo, action: deny}\n",
            );
        }
        Arc::new(Config::from_yaml_str(&yaml, "admit.yaml").unwrap_or_else(|e| panic!("{e}")))
    }

    fn info() -> ConnectionInfo {
        let addr = std::net::SocketAddr::from(([10, 1, 0, 4], 8080));
        ConnectionInfo {
            direction: crate::proxy::Direction::Tunnel,
            pod: "demo/srv".into(),
            client: addr,
            client_identity: None,
            destination: Some(addr),
            upstream: addr,
            tunnel_to: None,
            service: None,
            started: tokio::time::Instant::now(),
            moved: Arc::default(),
        }
    }

    fn subject() -> Subject {
        Subject {
            source: Some(
                "spiffe://cluster.local/ns/demo/sa/client"
                    .parse()
                    .expect("id"),
            ),
            destination: "demo/srv".into(),
            port: 8080,
        }
    }

    #[test]
    fn a_reload_landing_between_routing_and_admission_is_honoured() {
        let registry = Arc::new(Registry::default());
        let snapshots = ArcSwap::new(config(false));
        // Routed by the allowing snapshot, then the denying one is stored.
        let routed_with = snapshots.load_full();
        assert!(routed_with.local_workload("demo/srv").is_some());
        snapshots.store(config(true));
        let refused = admit(&registry, &snapshots, subject(), info()).err();
        assert!(matches!(refused, Some(Refused::Denied(d)) if !d.allowed));
        assert!(
            registry.is_empty(),
            "a refused connection is not left registered"
        );
    }

    #[tokio::test]
    async fn a_reload_right_after_admission_revokes_the_connection() {
        let registry = Arc::new(Registry::default());
        let snapshots = ArcSwap::new(config(false));
        let (tracked, decision) = admit(&registry, &snapshots, subject(), info()).expect("allowed");
        assert!(decision.allowed);
        let denying = config(true);
        snapshots.store(denying.clone());
        assert_eq!(revoke_denied(&registry, &denying), 1);
        tokio::time::timeout(Duration::from_secs(1), tracked.revoked())
            .await
            .expect("the admitted connection is told to close");
    }
}
