//! What the admin API reports (`/status` and its views, as JSON): the report types, shared by
//! the agent that fills them and by `mesh-agent status` that reads them, and the two things
//! worked out from them here, once for both: the health verdict and how a live connection of
//! the proxy's registry is shown.
//!
//! New fields are added with `#[serde(default)]`, so a newer `mesh-agent status` still reads
//! an older agent's report.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    balance::ServiceStatus,
    config::Config,
    limit::LimitStatus,
    pods::{FailedPod, PodStatus},
    proxy::{
        Direction,
        registry::{Counts, LiveConnection, Registry},
    },
};

/// How many connections `/status` lists (the oldest); `/status/connections` takes a limit.
pub const STATUS_CONNECTIONS: usize = 100;
/// The most connections one `/status/connections` answer lists, whatever the limit asked.
pub const MAX_CONNECTIONS: usize = 10_000;
/// A certificate that expires sooner than this makes the node degraded (they rotate at half
/// their lifetime, so one this close to its end failed to rotate).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(5 * 60);

/// `/status`: the first screen's data, and the lists the views show. A view's answer
/// (`/status/pods`...) has only its own fields; the others read as empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusReport {
    pub node: String,
    pub cgroup: String,
    /// The verdict, worked out by the agent from the rest of the report.
    pub health: Health,
    pub config: ConfigStatus,
    pub programs: Vec<ProgramStatus>,
    /// The enrolled pods with their capture counters.
    pub workloads: Vec<PodStatus>,
    /// Local pods the agent could not enroll, with the reason.
    pub failed_pods: Vec<FailedPod>,
    /// Certificates held for the identities of this node's pods.
    pub certificates: Vec<CertificateStatus>,
    pub tunnels: TunnelStatus,
    /// The oldest live connections, at most [`STATUS_CONNECTIONS`]; all of them are counted
    /// in `connectionCounts`.
    pub connections: Vec<ConnectionStatus>,
    pub connection_counts: ConnectionCounts,
    /// Each service port this node's pods call: its endpoints and their state.
    pub services: Vec<ServiceStatus>,
    /// Each rate limit and its current use.
    pub limits: Vec<LimitStatus>,
    /// Where certificates come from, and whether that CA is reachable.
    #[serde(default)]
    pub ca: CaStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// `remote` (the CA off the node, `agent.ca`) or `local` (a CA key on the node).
    pub mode: String,
    /// The CA's address, when remote.
    pub address: Option<String>,
    /// Whether the last exchange with the CA reached it; absent before the first, and for a
    /// local CA.
    pub reachable: Option<bool>,
    /// When the CA last answered (seconds since the Unix epoch).
    pub last_contact: Option<u64>,
    pub last_error: Option<String>,
    /// Signing requests: certificates issued, refused by the CA, CA unreachable or busy.
    pub issued: u64,
    pub refused: u64,
    pub unavailable: u64,
}

/// `healthy`, or what is wrong, in a few words each.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub healthy: bool,
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub identity: String,
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
}

/// One live connection. `source`, `destination` and `port` keep their first meaning (the
/// connections authorized here); the rest says where it runs and how much it carried.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The client's SPIFFE identity; absent for plaintext clients.
    pub source: Option<String>,
    /// `namespace/name` of the destination workload, or the address connected to when it
    /// is not a workload of the mesh.
    pub destination: String,
    /// The destination port (the pod's port).
    pub port: u16,
    #[serde(default)]
    pub direction: Option<Direction>,
    /// `namespace/name` of the local pod whose listener took it.
    #[serde(default)]
    pub pod: String,
    /// `namespace/name` of the client's workload, when it is one.
    #[serde(default)]
    pub source_workload: Option<String>,
    /// The client's address (the app's socket, the remote client, the tunnel peer).
    #[serde(default)]
    pub client: Option<SocketAddr>,
    /// Where the client meant to go (a service VIP, a pod).
    #[serde(default)]
    pub original_destination: Option<SocketAddr>,
    /// Where the proxy connected.
    #[serde(default)]
    pub upstream: Option<SocketAddr>,
    /// The server's SPIFFE identity: the tunnel's proven peer, or the destination workload's.
    #[serde(default)]
    pub destination_identity: Option<String>,
    /// `namespace/name` of the service it was balanced for.
    #[serde(default)]
    pub service: Option<String>,
    /// Carried by a tunnel stream (mutual TLS between nodes), either end.
    #[serde(default)]
    pub tunneled: bool,
    /// When the proxy accepted it, seconds since the Unix epoch.
    #[serde(default)]
    pub started_at: u64,
    #[serde(default)]
    pub age_ms: u64,
    /// Bytes the client sent, and bytes it received, so far.
    #[serde(default)]
    pub bytes_from_client: u64,
    #[serde(default)]
    pub bytes_to_client: u64,
}

/// Live connections, by the way they came in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionCounts {
    pub total: usize,
    pub outbound: usize,
    pub inbound: usize,
    pub tunnel: usize,
    /// Outbound connections carried by a tunnel stream to another node.
    #[serde(default)]
    pub through_tunnels: usize,
}

/// `/status/connections`: the oldest live connections, and how many more there are.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionsReport {
    pub counts: ConnectionCounts,
    pub connections: Vec<ConnectionStatus>,
    /// Live connections not listed (past the limit).
    pub omitted: usize,
}

/// Tunnels to other nodes' pods, from this node's client pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TunnelStatus {
    /// Tunnel connections (mutual TLS, HTTP/2) open now.
    pub connections: usize,
    /// Outbound connections carried by them now, one stream each.
    pub streams: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    pub file: String,
    /// Reloads applied and refused since the agent started.
    pub applied: u64,
    pub rejected: u64,
    /// Why the file on disk is refused now (`file:line:column: field: message`), until a
    /// valid file is seen again.
    pub last_error: Option<String>,
    /// The snapshot in force: 1 at start, one more at each applied reload.
    #[serde(default)]
    pub generation: u64,
    /// When it was put in force, seconds since the Unix epoch.
    #[serde(default)]
    pub since: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    pub name: String,
    pub pin: String,
}

/// The snapshot in force, and which one it is.
#[derive(Clone)]
pub struct InForce {
    /// 1 at start, one more at each applied reload.
    pub generation: u64,
    /// When it was put in force, seconds since the Unix epoch.
    pub since: u64,
    pub config: Arc<Config>,
}

/// `/config_dump`: the snapshot in force, under the YAML's names, and which one it is.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump<'a> {
    pub generation: u64,
    pub since: u64,
    pub file: &'a str,
    pub config: &'a Config,
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl StatusReport {
    /// What makes the node's mesh unhealthy now: no eBPF programs, pods not enrolled, the
    /// file on disk refused, certificates expired or about to.
    pub fn assess(&self, now: u64) -> Health {
        let mut problems = Vec::new();
        if self.programs.is_empty() {
            problems.push("no eBPF programs attached".to_owned());
        }
        if !self.failed_pods.is_empty() {
            problems.push(plural(self.failed_pods.len(), "pod", "failed to enroll"));
        }
        if self.config.last_error.is_some() {
            problems.push("last config rejected".to_owned());
        }
        let expiring = self
            .certificates
            .iter()
            .filter(|c| c.not_after < now.saturating_add(EXPIRY_WARNING.as_secs()))
            .count();
        if expiring > 0 {
            problems.push(plural(expiring, "certificate", "expired or expiring"));
        }
        if self.ca.reachable == Some(false) {
            problems.push("CA unreachable".to_owned());
        }
        Health {
            healthy: problems.is_empty(),
            problems,
        }
    }
}

fn plural(n: usize, noun: &str, rest: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{n} {noun}{s} {rest}")
}

impl From<Counts> for ConnectionCounts {
    fn from(counts: Counts) -> Self {
        Self {
            total: counts.total(),
            outbound: counts.outbound,
            inbound: counts.inbound,
            tunnel: counts.tunnel,
            through_tunnels: counts.through_tunnels,
        }
    }
}

/// The `limit` oldest live connections of `registry`, named with the workloads of `config`
/// (the snapshot in force now), and all of them counted by direction.
pub fn connections(registry: &Registry, config: &Config, limit: usize) -> ConnectionsReport {
    let (live, counts) = registry.oldest(limit.min(MAX_CONNECTIONS));
    let now = (SystemTime::now(), tokio::time::Instant::now());
    let connections: Vec<ConnectionStatus> = live
        .iter()
        .map(|c| ConnectionStatus::new(c, config, now))
        .collect();
    ConnectionsReport {
        omitted: counts.total().saturating_sub(connections.len()),
        counts: counts.into(),
        connections,
    }
}

impl ConnectionStatus {
    fn new(
        live: &LiveConnection,
        config: &Config,
        (now, instant): (SystemTime, tokio::time::Instant),
    ) -> Self {
        let info = &live.info;
        let name = |w: &crate::config::Workload| w.qualified_name().to_string();
        let upstream_workload = config.workload_by_ip(info.upstream.ip());
        let destination = match (&live.subject, upstream_workload) {
            (Some(subject), _) => subject.destination.clone(),
            (None, Some(workload)) => name(workload),
            (None, None) => info.upstream.to_string(),
        };
        let destination_identity = match (&info.tunnel_to, info.direction) {
            (Some(proven), _) => Some(proven.to_string()),
            (None, Direction::Inbound | Direction::Tunnel) => config
                .local_workload(&info.pod)
                .map(|w| w.identity.to_string()),
            (None, Direction::Outbound) => upstream_workload.map(|w| w.identity.to_string()),
        };
        let source_workload = match info.direction {
            Direction::Outbound => Some(info.pod.to_string()),
            Direction::Inbound | Direction::Tunnel => {
                config.workload_by_ip(info.client.ip()).map(name)
            }
        };
        let age = instant.saturating_duration_since(info.started);
        let (from_client, to_client) = info.moved.get();
        Self {
            source: info.client_identity.as_ref().map(ToString::to_string),
            destination,
            port: info.upstream.port(),
            direction: Some(info.direction),
            pod: info.pod.to_string(),
            source_workload,
            client: Some(canonical(info.client)),
            original_destination: info.destination,
            upstream: Some(canonical(info.upstream)),
            destination_identity,
            service: info.service.clone(),
            tunneled: info.tunnel_to.is_some() || info.direction == Direction::Tunnel,
            started_at: unix_seconds(now.checked_sub(age).unwrap_or(UNIX_EPOCH)),
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            bytes_from_client: from_client,
            bytes_to_client: to_client,
        }
    }
}

/// `[::ffff:10.1.0.2]:80` (a dual-stack socket's view of an IPv4 peer) as `10.1.0.2:80`.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> StatusReport {
        StatusReport {
            programs: vec![ProgramStatus {
                name: "mesh_connect4".into(),
                pin: "/sys/fs/bpf/mesh/v1/links/mesh_connect4".into(),
            }],
            ..StatusReport::default()
        }
    }

    #[test]
    fn a_node_with_programs_and_nothing_wrong_is_healthy() {
        assert_eq!(
            report().assess(1000),
            Health {
                healthy: true,
                problems: vec![]
            }
        );
    }

    #[test]
    fn each_problem_is_named() {
        let mut report = report();
        report.programs.clear();
        report.failed_pods = vec![FailedPod::default(), FailedPod::default()];
        report.config.last_error = Some("c.yaml:1:1: bad".into());
        report.certificates = vec![
            CertificateStatus {
                not_after: 1100,
                ..CertificateStatus::default()
            },
            CertificateStatus {
                not_after: 1_000_000,
                ..CertificateStatus::default()
            },
        ];
        let health = report.assess(1000);
        assert!(!health.healthy);
        assert_eq!(
            health.problems,
            [
                "no eBPF programs attached",
                "2 pods failed to enroll",
                "last config rejected",
                "1 certificate expired or expiring",
            ]
        );
    }

    /// Pod `a` (10.1.0.2) on this node, `b` (10.2.0.2) on another; service `web`.
    fn config() -> Config {
        let yaml = "agent: {node: n1}\n\
             workloads:\n\
             \x20 - {name: a, namespace: t, serviceAccount: a, ips: [10.1.0.2], node: n1, netns: /n/a, labels: {app: a}}\n\
             \x20 - {name: b, namespace: t, serviceAccount: b, ips: [10.2.0.2], node: n2, labels: {app: b}}\n\
             services:\n\
             \x20 - {name: web, namespace: t, vips: [10.96.0.1], ports: [{port: 80, targetPort: 8080}], endpoints: {selector: {app: b}}}\n";
        Config::from_yaml_str(yaml, "view.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn info(
        direction: Direction,
        client: &str,
        upstream: &str,
    ) -> crate::proxy::registry::ConnectionInfo {
        let addr = |s: &str| {
            s.parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{s}: {e}"))
        };
        crate::proxy::registry::ConnectionInfo {
            direction,
            pod: "t/a".into(),
            client: addr(client),
            client_identity: None,
            destination: None,
            upstream: addr(upstream),
            tunnel_to: None,
            service: None,
            started: tokio::time::Instant::now(),
            moved: Arc::default(),
        }
    }

    #[tokio::test]
    async fn connections_are_named_with_the_workloads_and_bounded() {
        let config = config();
        let registry = Arc::new(Registry::default());
        let id = |s: &str| s.parse::<crate::tls::SpiffeId>().ok();
        // a -> web, balanced to b on the other node, through a tunnel.
        let mut out = info(Direction::Outbound, "127.0.0.1:40000", "10.2.0.2:8080");
        out.client_identity = id("spiffe://cluster.local/ns/t/sa/a");
        out.tunnel_to = id("spiffe://cluster.local/ns/t/sa/b");
        out.service = Some("t/web".into());
        out.destination = Some("10.96.0.1:80".parse().unwrap_or_else(|e| panic!("{e}")));
        out.moved
            .downstream_to_upstream
            .store(7, std::sync::atomic::Ordering::Relaxed);
        let _out = registry.track(None, out);
        // From b through a tunnel into a, seen by a dual-stack listener.
        let mut tunnel = info(Direction::Tunnel, "[::ffff:10.2.0.2]:5000", "10.1.0.2:9090");
        tunnel.client_identity = id("spiffe://cluster.local/ns/t/sa/b");
        let subject = crate::proxy::registry::Subject {
            source: tunnel.client_identity.clone(),
            destination: "t/a".into(),
            port: 9090,
        };
        let _tunnel = registry.track(Some(subject), tunnel);
        // From a to somewhere outside the mesh.
        let _away = registry.track(
            None,
            info(Direction::Outbound, "127.0.0.1:40001", "192.0.2.9:443"),
        );

        let report = connections(&registry, &config, 10);
        assert_eq!((report.counts.total, report.counts.outbound), (3, 2));
        assert_eq!(
            (report.counts.tunnel, report.counts.through_tunnels),
            (1, 1)
        );
        let [out, tunnel, away] = &report.connections[..] else {
            panic!("three connections: {report:?}");
        };
        assert_eq!(out.destination, "t/b");
        assert_eq!(out.port, 8080);
        assert_eq!(out.source_workload.as_deref(), Some("t/a"));
        assert_eq!(
            out.destination_identity.as_deref(),
            Some("spiffe://cluster.local/ns/t/sa/b")
        );
        assert!(out.tunneled);
        assert_eq!(out.bytes_from_client, 7);

        assert_eq!(tunnel.destination, "t/a");
        assert_eq!(tunnel.source_workload.as_deref(), Some("t/b"));
        assert_eq!(tunnel.client, "10.2.0.2:5000".parse().ok());
        assert_eq!(
            tunnel.destination_identity.as_deref(),
            Some("spiffe://cluster.local/ns/t/sa/a")
        );

        // Not a workload: named by its address, no identity.
        assert_eq!(away.destination, "192.0.2.9:443");
        assert_eq!(away.destination_identity, None);
        assert!(!away.tunneled);

        let first = connections(&registry, &config, 1);
        assert_eq!((first.connections.len(), first.omitted), (1, 2));
        assert_eq!(first.connections[0].destination, "t/b", "the oldest first");
    }
}
