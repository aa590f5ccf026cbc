//! The client's address across nodes. On the same node the agent connects to the app from
//! inside the client pod, so the app sees the client's address; a stream from another node
//! arrives at the destination pod, so the agent there connects from a transparent socket
//! bound to the client pod's address instead (its reply route is `sys::reply_route`, set up
//! at enrollment).
//!
//! Which address: the one the stream claims (`Forwarded: for=`), believed only when the
//! snapshot vouches for it ([`vouched`]). Whether the pod can: [`ClientIpPath`], per address
//! family; where the kernel refused, connections go on from the pod's own address, counted,
//! with one warning per pod.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::{config::Config, metrics::Metrics, sys::reply_route::Family, tls::SpiffeId};

/// Whether one address family of a pod can keep the client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FamilyPath {
    /// The reply route is in place.
    Ready,
    /// The pod has no address of this family: no stream can come for it.
    Absent,
    /// The kernel refused the reply route: the reason.
    Refused(String),
}

/// One pod's transparent path, decided at enrollment.
pub struct ClientIpPath {
    transparent_mark: u32,
    /// IPv4, IPv6.
    families: [FamilyPath; 2],
    /// One warning per pod, not per connection.
    warned: AtomicBool,
    fallbacks: AtomicU64,
}

impl ClientIpPath {
    /// `warned`: a refusal was already logged (by enrollment).
    pub fn new(transparent_mark: u32, families: [FamilyPath; 2], warned: bool) -> Self {
        Self {
            transparent_mark,
            families,
            warned: AtomicBool::new(warned),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub fn transparent_mark(&self) -> u32 {
        self.transparent_mark
    }

    pub fn family(&self, family: Family) -> &FamilyPath {
        &self.families[usize::from(family == Family::V6)]
    }

    /// Why some clients from other nodes are not seen with their address, if so.
    pub fn refused(&self) -> Option<String> {
        let reasons: Vec<&str> = self
            .families
            .iter()
            .filter_map(|f| match f {
                FamilyPath::Refused(reason) => Some(reason.as_str()),
                FamilyPath::Ready | FamilyPath::Absent => None,
            })
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Connections that reached the app from the pod's own address instead.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// Counts a connection of `pod` that falls back to the pod's own address, and warns
    /// the first time.
    pub fn fell_back(&self, pod: &str, metrics: &Metrics, reason: impl fmt::Display) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        metrics.client_ip_fallback(pod);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(%pod, %reason, "the app sees this pod's own address instead of the client's for connections from other nodes");
        }
    }
}

/// Why a claimed client address is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unvouched {
    #[error("{0} is not the address family of the target")]
    Family(IpAddr),
    #[error("{0} is no workload's address")]
    Unknown(IpAddr),
    #[error("{ip} belongs to a workload of another identity than {identity}")]
    Identity { ip: IpAddr, identity: SpiffeId },
    #[error("{0} belongs to a workload of this node")]
    Local(IpAddr),
    #[error("the tunnel comes from {peer}, not from a workload on {node}")]
    Node { peer: IpAddr, node: String },
}

/// The client address a tunnel stream may be given, checked against `config`: the claimed
/// address must be of the target's family and belong to a workload that (1) has the identity
/// the peer authenticated with (mutual TLS), (2) runs on another node, (3) the same node as
/// the workload the tunnel connection itself comes from (its TCP peer: tunnel connections
/// leave from a pod). So a node can claim only addresses of its own pods with an identity it
/// holds a certificate for. A stream that claims nothing, or fails a check, is connected
/// from the pod's own address, as before.
pub fn vouched(
    config: &Config,
    identity: &SpiffeId,
    peer: SocketAddr,
    claimed: SocketAddr,
    target: SocketAddr,
) -> Result<SocketAddr, Unvouched> {
    let ip = claimed.ip().to_canonical();
    if ip.is_ipv4() != target.ip().to_canonical().is_ipv4() {
        return Err(Unvouched::Family(ip));
    }
    let client = config.workload_by_ip(ip).ok_or(Unvouched::Unknown(ip))?;
    if &client.identity != identity {
        return Err(Unvouched::Identity {
            ip,
            identity: identity.clone(),
        });
    }
    if client.local {
        return Err(Unvouched::Local(ip));
    }
    let peer = peer.ip().to_canonical();
    if config
        .workload_by_ip(peer)
        .is_none_or(|from| from.node != client.node)
    {
        return Err(Unvouched::Node {
            peer,
            node: client.node.clone(),
        });
    }
    Ok(SocketAddr::new(ip, claimed.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This node `b` with `srv`; node `a` with `web-1` and `web-2` (identity `web`) and `db`.
    fn config() -> Config {
        Config::from_yaml_str(
            "agent: {node: b}\n\
             workloads:\n\
             \x20 - {name: srv, namespace: t, ips: [10.2.0.2, 'fd00:2::2'], node: b, netns: /n/s}\n\
             \x20 - {name: web-1, namespace: t, serviceAccount: web, ips: [10.1.0.2, 'fd00:1::2'], node: a}\n\
             \x20 - {name: web-2, namespace: t, serviceAccount: web, ips: [10.1.0.3], node: a}\n\
             \x20 - {name: db, namespace: t, serviceAccount: db, ips: [10.1.0.4], node: a}\n\
             \x20 - {name: web-3, namespace: t, serviceAccount: web, ips: [10.3.0.2], node: c}\n\
             \x20 - {name: web-4, namespace: t, serviceAccount: web, ips: [10.2.0.9], node: b, netns: /n/w}\n",
            "vouch.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_pod_of_the_peers_node_and_identity_is_believed() {
        let config = config();
        let web: SpiffeId = "spiffe://cluster.local/ns/t/sa/web".parse().expect("id");
        let target = addr("10.2.0.2:8080");
        let vouch = |peer: &str, claimed: &str, target: SocketAddr| {
            vouched(&config, &web, addr(peer), addr(claimed), target)
        };
        // The tunnel connection came from web-2 (a pool shared by web's pods on node a).
        assert_eq!(
            vouch("[::ffff:10.1.0.3]:50000", "10.1.0.2:40000", target),
            Ok(addr("10.1.0.2:40000"))
        );
        assert_eq!(
            vouch("10.1.0.2:50000", "[fd00:1::2]:4", addr("[fd00:2::2]:8080")),
            Ok(addr("[fd00:1::2]:4"))
        );
        assert_eq!(
            vouch("10.1.0.2:50000", "[fd00:1::2]:4", target),
            Err(Unvouched::Family("fd00:1::2".parse().expect("ip")))
        );
        assert!(matches!(
            vouch("10.1.0.2:50000", "10.1.0.99:4", target),
            Err(Unvouched::Unknown(_))
        ));
        assert!(
            matches!(
                vouch("10.1.0.2:50000", "10.1.0.4:4", target),
                Err(Unvouched::Identity { .. })
            ),
            "db's address, claimed with web's certificate"
        );
        assert!(matches!(
            vouch("10.1.0.2:50000", "10.2.0.9:4", target),
            Err(Unvouched::Local(_))
        ));
        assert!(
            matches!(
                vouch("10.1.0.2:50000", "10.3.0.2:4", target),
                Err(Unvouched::Node { .. })
            ),
            "a web pod of node c, claimed by a tunnel from node a"
        );
        assert!(
            matches!(
                vouch("192.168.100.1:50000", "10.1.0.2:4", target),
                Err(Unvouched::Node { .. })
            ),
            "a tunnel from no pod at all"
        );
    }

    #[test]
    fn refusals_are_reported_and_warned_once() {
        let path = ClientIpPath::new(
            0x4000_0539,
            [
                FamilyPath::Refused("table in use".into()),
                FamilyPath::Absent,
            ],
            false,
        );
        assert_eq!(path.refused().as_deref(), Some("table in use"));
        assert_eq!(path.family(Family::V6), &FamilyPath::Absent);
        let metrics = Metrics::new();
        path.fell_back("t/srv", &metrics, "table in use");
        path.fell_back("t/srv", &metrics, "table in use");
        assert_eq!(path.fallbacks(), 2);
        assert!(path.warned.load(Ordering::Relaxed));
        let ready = ClientIpPath::new(1, [FamilyPath::Ready, FamilyPath::Ready], false);
        assert_eq!(ready.refused(), None);
    }
}
