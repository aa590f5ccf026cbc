//! The Istio TCP metrics of one connection (`istio_tcp_connections_opened_total` and the
//! rest, with Istio's standard labels), so existing Istio and Kiali dashboards and queries
//! read this agent unchanged. The labels are resolved once per connection from the config
//! snapshot it was routed by; the series handles are then kept, and bytes are added as they
//! move (flushed every few seconds while the connection is open, and at its end).

use std::{collections::BTreeMap, net::SocketAddr};

use prometheus::IntCounter;

use super::{direction::Direction, outcome::Outcome};
use crate::{
    config::{AccessLog, Config, Service, Workload},
    metrics::{ISTIO_LABELS, Metrics},
    tls::SpiffeId,
};

/// What Istio calls a workload's canonical service and revision, in its order of precedence.
const APP_LABELS: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
const VERSION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
const UNKNOWN: &str = "unknown";

/// The connection's four series, and the bytes already added to them.
pub struct IstioSeries {
    closed: IntCounter,
    sent: IntCounter,
    received: IntCounter,
    /// Bytes already counted: (from the client, to the client).
    flushed: (u64, u64),
}

/// What the labels are made of.
pub struct Endpoints<'a> {
    pub direction: Direction,
    /// The local pod whose listener took the connection.
    pub pod: &'a str,
    pub client: SocketAddr,
    pub client_identity: Option<&'a SpiffeId>,
    /// The upstream the proxy connected to (or tried last).
    pub upstream: Option<SocketAddr>,
    pub service: Option<&'a str>,
    pub outcome: Outcome,
    pub mutual_tls: bool,
}

/// Both ends as the snapshot names them, for the access log.
pub struct Peers {
    /// `namespace/name` of the source workload, when the snapshot knows it.
    pub source: Option<String>,
    pub destination: Option<String>,
    /// The destination workload's identity (what a tunnel to it verifies).
    pub destination_identity: Option<SpiffeId>,
}

/// What the snapshot decides for one connection's telemetry, resolved once.
pub struct Resolved {
    /// `None` when Istio's metrics are off.
    pub istio: Option<IstioSeries>,
    /// The access log of the pod that took it.
    pub log: AccessLog,
    /// `None` when its access log is off.
    pub peers: Option<Peers>,
}

/// Resolves the connection's telemetry from `config` and counts it as opened.
pub fn resolve(metrics: &Metrics, config: &Config, e: &Endpoints<'_>) -> Resolved {
    let (source, destination) = match e.direction {
        Direction::Outbound => (
            config.local_workload(e.pod),
            e.upstream.and_then(|u| config.workload_by_ip(u.ip())),
        ),
        // A tunnel's TCP connection leaves from the source pod, so its address names it.
        Direction::Inbound | Direction::Tunnel => (
            config.workload_by_ip(e.client.ip()),
            config.local_workload(e.pod),
        ),
    };
    let live = &config.agent().live;
    let log = config
        .local_workload(e.pod)
        .map_or(live.access_log, |w| w.access_log);
    let qualified = |w: &Workload| w.qualified_name().to_string();
    Resolved {
        istio: live.istio_metrics.then(|| {
            // The server side knows the pod address the connection came to, not the VIP.
            let served = match (e.service, e.direction) {
                (None, Direction::Inbound | Direction::Tunnel) => {
                    e.upstream.and_then(|u| config.service_by_endpoint(u))
                }
                _ => None,
            };
            IstioSeries::open(metrics, source, destination, served, e)
        }),
        log,
        peers: log.enabled.then(|| Peers {
            source: source.map(qualified),
            destination: destination.map(qualified),
            destination_identity: destination.map(|w| w.identity.clone()),
        }),
    }
}

impl IstioSeries {
    /// Resolves the labels and counts the connection as opened.
    fn open(
        metrics: &Metrics,
        source: Option<&Workload>,
        destination: Option<&Workload>,
        served: Option<&Service>,
        e: &Endpoints<'_>,
    ) -> Self {
        let source_principal = e
            .client_identity
            .map(ToString::to_string)
            .or_else(|| source.map(|w| w.identity.to_string()))
            .unwrap_or_else(|| UNKNOWN.to_owned());
        let destination_principal = destination
            .map(|w| w.identity.to_string())
            .unwrap_or_else(|| UNKNOWN.to_owned());
        let (service_host, service_name, service_namespace) = match e.service {
            Some(qualified) => match qualified.split_once('/') {
                Some((namespace, name)) => (
                    format!("{name}.{namespace}.svc.cluster.local"),
                    name.to_owned(),
                    namespace.to_owned(),
                ),
                None => (
                    qualified.to_owned(),
                    qualified.to_owned(),
                    UNKNOWN.to_owned(),
                ),
            },
            None => match served {
                Some(service) => (
                    format!("{}.{}.svc.cluster.local", service.name, service.namespace),
                    service.name.clone(),
                    service.namespace.clone(),
                ),
                None => (UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()),
            },
        };
        let reporter = match e.direction {
            Direction::Outbound => "source",
            Direction::Inbound | Direction::Tunnel => "destination",
        };
        let security = if e.mutual_tls { "mutual_tls" } else { "none" };
        let values: [&str; ISTIO_LABELS.len()] = [
            reporter,
            name(source),
            namespace(source),
            &source_principal,
            label(source, &APP_LABELS),
            label(source, &VERSION_LABELS),
            name(destination),
            namespace(destination),
            &destination_principal,
            label(destination, &APP_LABELS),
            label(destination, &VERSION_LABELS),
            &service_host,
            &service_name,
            &service_namespace,
            "tcp",
            response_flags(e.outcome),
            security,
        ];
        let [opened, closed, sent, received] = metrics.istio_tcp(&values);
        opened.inc();
        Self {
            closed,
            sent,
            received,
            flushed: (0, 0),
        }
    }

    /// Adds the bytes moved since the last flush: `(from_client, to_client)` so far.
    pub fn flush(&mut self, (from_client, to_client): (u64, u64)) {
        // Istio: "received" is what the server received (the request), "sent" what it sent.
        self.received
            .inc_by(from_client.saturating_sub(self.flushed.0));
        self.sent.inc_by(to_client.saturating_sub(self.flushed.1));
        self.flushed = (
            from_client.max(self.flushed.0),
            to_client.max(self.flushed.1),
        );
    }

    /// The connection ended.
    pub fn close(mut self, moved: (u64, u64)) {
        self.flush(moved);
        self.closed.inc();
    }
}

fn name(workload: Option<&Workload>) -> &str {
    workload.map_or(UNKNOWN, |w| w.name.as_str())
}

fn namespace(workload: Option<&Workload>) -> &str {
    workload.map_or(UNKNOWN, |w| w.namespace.as_str())
}

/// The first of `keys` among the workload's labels; its name (app) or `latest` (version)
/// as Istio defaults them.
fn label<'w>(workload: Option<&'w Workload>, keys: &[&str]) -> &'w str {
    let Some(workload) = workload else {
        return UNKNOWN;
    };
    let labels: &BTreeMap<String, String> = &workload.labels;
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .unwrap_or(if keys == VERSION_LABELS {
            "latest"
        } else {
            workload.name.as_str()
        })
}

/// Envoy's response flags where one fits, ztunnel's for an authorization denial and a
/// failed connect; `-` for none.
pub fn response_flags(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Aborted | Outcome::Closed => "-",
        Outcome::Denied | Outcome::Forbidden => "DENY",
        Outcome::ConnectFailed => "CONNECT",
        Outcome::NoRoute | Outcome::NoOrigDst => "NR",
        Outcome::NoHealthyEndpoint => "UH",
        Outcome::CircuitOpen | Outcome::Overloaded => "UO",
        Outcome::RateLimited => "RL",
        Outcome::IdleTimeout => "SI",
        Outcome::MaxLifetime => "DT",
        Outcome::Revoked => "DENY",
        Outcome::Reset => "UC",
    }
}
