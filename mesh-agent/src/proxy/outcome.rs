//! What happened to one connection: a [`ConnectionResult`] filled in by the pipeline as it
//! goes, from which the access-log line and every per-connection metric are produced, once,
//! when it drops. No other place in the proxy logs a connection or counts one, so the log
//! and the metrics cannot drift apart.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;

use super::{
    direction::Direction,
    route::RouteKind,
    telemetry::{self, Endpoints, IstioSeries, Peers},
};
use crate::{
    config::{AccessLog, Config},
    copy::Transferred,
    metrics::{ActiveGuard, Metrics},
    tls::SpiffeId,
};

/// How a connection ended; the `outcome` label and the log's `result`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Still in the pipeline (only seen if a task is cancelled mid-way).
    Aborted,
    /// Proxied and closed by its ends.
    Closed,
    /// Authorization refused it.
    Denied,
    /// Not ours to serve: a proxy port, an address that is not the pod's, a destination the
    /// source may not reach.
    Forbidden,
    /// No route: a service without endpoints, a pod that left the config.
    NoRoute,
    /// The connect program left no original destination (a direct connect to the listener).
    NoOrigDst,
    /// The node is at its connection limit.
    Overloaded,
    /// The service's circuit breaker refused it (too many connections or connects).
    CircuitOpen,
    /// Every endpoint of the service is ejected, unhealthy or at its limit.
    NoHealthyEndpoint,
    /// Over a rate limit (the destination's or the source's egress).
    RateLimited,
    /// Closed at the service's maximum connection lifetime.
    MaxLifetime,
    ConnectFailed,
    /// Copying stopped on an I/O error or reset.
    Reset,
    IdleTimeout,
    /// A policy change revoked it while open.
    Revoked,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Aborted => "aborted",
            Outcome::Closed => "closed",
            Outcome::Denied => "denied",
            Outcome::Forbidden => "forbidden",
            Outcome::NoRoute => "no_route",
            Outcome::NoOrigDst => "no_orig_dst",
            Outcome::Overloaded => "overloaded",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::NoHealthyEndpoint => "no_healthy_endpoint",
            Outcome::RateLimited => "rate_limited",
            Outcome::MaxLifetime => "max_lifetime",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::Reset => "reset",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::Revoked => "revoked",
        }
    }
}

/// Whether the connection crossed a network with mutual TLS, for the `security` label.
pub fn security(direction: Direction, tunnel_to: Option<&SpiffeId>) -> &'static str {
    match (direction, tunnel_to) {
        (Direction::Tunnel, _) | (Direction::Outbound, Some(_)) => "mutual_tls",
        (Direction::Outbound, None) | (Direction::Inbound, _) => "plaintext",
    }
}

/// One connection's record. Dropping it logs the access line and updates the metrics.
pub struct ConnectionResult {
    metrics: Arc<Metrics>,
    started: Instant,
    started_at: SystemTime,
    pub direction: Direction,
    /// `namespace/name` of the local pod whose listener took the connection.
    pub pod: Arc<str>,
    pub client: SocketAddr,
    /// The client's verified identity: the pod's own (outbound), the tunnel peer's
    /// (tunnel), none for a plaintext client (inbound).
    pub client_identity: Option<SpiffeId>,
    /// Where the client meant to go (original destination, CONNECT authority).
    pub destination: Option<SocketAddr>,
    pub route: RouteKind,
    pub service: Option<String>,
    /// Where the proxy connected.
    pub upstream: Option<SocketAddr>,
    /// The identity of the tunnel's server, when the upstream is a tunnel stream.
    pub tunnel_to: Option<SpiffeId>,
    /// The address of that tunnel's server.
    pub tunnel_addr: Option<SocketAddr>,
    /// The policy that decided, when one did.
    pub policy: Option<String>,
    pub outcome: Outcome,
    /// Details for the log (an error, a refusal's reason).
    pub reason: Option<String>,
    /// Shared with the registry of live connections, which shows them while it is open.
    pub moved: Arc<Transferred>,
    /// Connects retried on another endpoint.
    pub retries: u32,
    /// Bytes that waited for a bandwidth limit.
    pub shaped_bytes: u64,
    /// The snapshot it was routed by, until its telemetry is resolved from it.
    pub snapshot: Option<Arc<Config>>,
    istio: Option<IstioSeries>,
    /// Its pod's access log; logged in full until a snapshot says otherwise.
    log: AccessLog,
    peers: Option<Peers>,
    active: Option<ActiveGuard>,
}

impl ConnectionResult {
    pub fn new(
        metrics: Arc<Metrics>,
        direction: Direction,
        pod: Arc<str>,
        client: SocketAddr,
        client_identity: Option<SpiffeId>,
        destination: Option<SocketAddr>,
    ) -> Self {
        Self {
            metrics,
            started: Instant::now(),
            started_at: SystemTime::now(),
            direction,
            pod,
            client,
            client_identity,
            destination,
            route: RouteKind::None,
            service: None,
            upstream: None,
            tunnel_to: None,
            tunnel_addr: None,
            policy: None,
            outcome: Outcome::Aborted,
            reason: None,
            moved: Arc::default(),
            retries: 0,
            shaped_bytes: 0,
            snapshot: None,
            istio: None,
            log: AccessLog::default(),
            peers: None,
            active: None,
        }
    }

    /// When the proxy accepted it.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The connection is established both ways: count it as active until it ends.
    pub fn established(&mut self) {
        self.active = Some(self.metrics.active(self.direction.as_str()));
        self.resolve();
    }

    /// The Istio series, for the copy to add bytes to while the connection is open (the
    /// copy borrows `moved`, so the series goes out and comes back).
    pub fn take_istio(&mut self) -> Option<IstioSeries> {
        self.istio.take()
    }

    pub fn restore_istio(&mut self, istio: Option<IstioSeries>) {
        self.istio = istio;
    }

    /// Resolves its telemetry from the routing snapshot (then let go of) and counts the
    /// connection as opened.
    fn resolve(&mut self) {
        let Some(config) = self.snapshot.take() else {
            return;
        };
        let endpoints = Endpoints {
            direction: self.direction,
            pod: &self.pod,
            client: self.client,
            client_identity: self.client_identity.as_ref(),
            upstream: self.upstream,
            service: self.service.as_deref(),
            outcome: self.outcome,
            mutual_tls: security(self.direction, self.tunnel_to.as_ref()) == "mutual_tls",
        };
        let resolved = telemetry::resolve(&self.metrics, &config, &endpoints);
        self.istio = resolved.istio;
        self.log = resolved.log;
        self.peers = resolved.peers;
    }

    /// Whether this connection gets its access-log line: none when the log is off (in the
    /// config, or by the log filter: `RUST_LOG=access=off`), every refusal and failure, and
    /// the sampled share of those that ended normally.
    fn logged(&self) -> bool {
        self.log.enabled
            && tracing::enabled!(target: "access", tracing::Level::INFO)
            && (self.outcome != Outcome::Closed
                || self.log.sample_percent >= 100
                || fastrand::u8(0..100) < self.log.sample_percent)
    }

    /// The access-log line.
    fn log_line(&self, security: &str, (from_client, to_client): (u64, u64)) {
        let peers = self.peers.as_ref();
        // The server's identity: the verified tunnel peer's, else the workload's.
        let destination_identity = self
            .tunnel_to
            .as_ref()
            .or_else(|| peers.and_then(|p| p.destination_identity.as_ref()));
        let start = OffsetDateTime::from(self.started_at)
            .format(&Rfc3339)
            .unwrap_or_default();
        tracing::info!(
            target: "access",
            start,
            duration_ms = self.started.elapsed().as_millis() as u64,
            direction = self.direction.as_str(),
            pod = %self.pod,
            src_workload = peers.and_then(|p| p.source.as_deref()),
            src_identity = self.client_identity.as_ref().map(tracing::field::display),
            dst_workload = peers.and_then(|p| p.destination.as_deref()),
            dst_identity = destination_identity.map(tracing::field::display),
            client = %self.client,
            dst = self.destination.map(tracing::field::display),
            route = self.route.as_str(),
            service = self.service.as_deref(),
            endpoint = self.upstream.map(tracing::field::display),
            tunnel = self.tunnel_addr.map(tracing::field::display),
            security,
            policy = self.policy.as_deref(),
            from_client,
            to_client,
            retries = self.retries,
            shaped_bytes = self.shaped_bytes,
            response_flags = telemetry::response_flags(self.outcome),
            result = self.outcome.as_str(),
            reason = self.reason.as_deref(),
        );
    }

    /// Ends it with `outcome` and a reason for the log.
    pub fn fail(&mut self, outcome: Outcome, reason: impl Into<String>) {
        self.outcome = outcome;
        self.reason = Some(reason.into());
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        let direction = self.direction.as_str();
        let (from_client, to_client) = self.moved.get();
        let security = security(self.direction, self.tunnel_to.as_ref());
        self.metrics.connection(
            direction,
            self.route.as_str(),
            security,
            self.outcome.as_str(),
        );
        self.metrics.bytes(direction, from_client, to_client);
        self.metrics.shaped_bytes(direction, self.shaped_bytes);
        if self.active.is_none() {
            // Refused before it was established: opened and closed, with its flags.
            self.resolve();
        }
        if let Some(istio) = self.istio.take() {
            istio.close((from_client, to_client));
        }
        self.active = None;
        if self.logged() {
            self.log_line(security, (from_client, to_client));
        }
    }
}
