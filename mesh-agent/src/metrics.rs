//! Prometheus metrics: one registry, served at /metrics by the admin API. Per-connection
//! counters are fed by `proxy::ConnectionResult` when a connection ends; traffic-policy
//! decisions (retries, ejections, circuit refusals, rate limits, health checks) by the
//! pipeline and the health checker. Labels are bounded by workloads, services and policies,
//! never by ports or addresses. The agent's own memory, CPU and file descriptors are the
//! standard `process_*` series.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

pub struct Metrics {
    pub registry: Registry,
    config_reloads: IntCounterVec,
    kube_rejected: IntCounterVec,
    pub enrolled_pods: IntGauge,
    pub enroll_failures: IntCounter,
    connections: IntCounterVec,
    active_connections: IntGaugeVec,
    bytes: IntCounterVec,
    shaped_bytes: IntCounterVec,
    retries: IntCounterVec,
    ejections: IntCounterVec,
    circuit_open: IntCounterVec,
    rate_limited: IntCounterVec,
    health_checks: IntCounterVec,
    connect_latency: HistogramVec,
    certificate_expiry: IntGaugeVec,
    handshakes: IntCounterVec,
    tunnels: IntGaugeVec,
    tunnel_streams: IntGaugeVec,
    captured: IntCounterVec,
    client_ip_fallbacks: IntCounterVec,
    config_build: Histogram,
    ca_reachable: IntGauge,
    ca_requests: IntCounterVec,
    istio_opened: IntCounterVec,
    istio_closed: IntCounterVec,
    istio_sent: IntCounterVec,
    istio_received: IntCounterVec,
}

/// One side's tunnel figures (`client`: the pool of tunnels to other nodes; `server`: the
/// pods' tunnel servers), handed to the tunnel code so it counts as it goes.
#[derive(Clone, Debug)]
pub struct TunnelMetrics {
    pub handshakes_ok: IntCounter,
    pub handshakes_failed: IntCounter,
    /// Tunnel connections open now.
    pub connections: IntGauge,
    /// Streams (proxied connections) open now on those tunnels.
    pub streams: IntGauge,
}

impl TunnelMetrics {
    /// Counters registered nowhere: for tunnels made outside an agent (unit tests).
    pub fn unregistered() -> Self {
        let counter = || IntCounter::new("unregistered", "-").expect("static metric definition");
        let gauge = || IntGauge::new("unregistered", "-").expect("static metric definition");
        Self {
            handshakes_ok: counter(),
            handshakes_failed: counter(),
            connections: gauge(),
            streams: gauge(),
        }
    }

    /// A handshake begins: it counts as failed unless [`Handshake::succeeded`] is called
    /// (an error, a timeout or a cancelled task all count as failures).
    pub fn handshake(&self) -> Handshake {
        Handshake {
            ok: self.handshakes_ok.clone(),
            failed: Some(self.handshakes_failed.clone()),
        }
    }

    /// Counts `gauge` up until the returned guard drops.
    pub fn hold(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

/// One handshake under way; see [`TunnelMetrics::handshake`].
pub struct Handshake {
    ok: IntCounter,
    failed: Option<IntCounter>,
}

impl Handshake {
    pub fn succeeded(mut self) {
        self.failed = None;
        self.ok.inc();
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some(failed) = self.failed.take() {
            failed.inc();
        }
    }
}

/// Counts one up on a gauge while it lives.
pub struct GaugeGuard(IntGauge);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts a connection as active until dropped.
pub struct ActiveGuard(IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates and registers one family; the definitions are static, so failing is a bug.
fn family<T: Collector + Clone + 'static>(registry: &Registry, collector: T) -> T {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

/// The agent's own families are named `mesh_*`; Istio's keep Istio's names.
fn counters(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let opts = Opts::new(format!("mesh_{name}"), help);
    let vec = IntCounterVec::new(opts, labels).expect("static metric definition");
    family(registry, vec)
}

fn istio(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let vec =
        IntCounterVec::new(Opts::new(name, help), &ISTIO_LABELS).expect("static metric definition");
    family(registry, vec)
}

/// Istio's standard labels of its TCP metrics, in this order.
pub const ISTIO_LABELS: [&str; 17] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

impl Metrics {
    /// The Kubernetes source refused an object of `kind` (`Pod`, `RateLimit`, ...).
    pub fn kube_object_rejected(&self, kind: &str) {
        self.kube_rejected.with_label_values(&[kind]).inc();
    }

    /// How many objects of `kind` the Kubernetes source refused so far.
    pub fn kube_objects_rejected(&self, kind: &str) -> u64 {
        self.kube_rejected.with_label_values(&[kind]).get()
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        // The standard process_* series (resident memory, CPU seconds, open and maximum file
        // descriptors, threads, start time), read from /proc at each scrape.
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("metric names are unique");
        r.register(Box::new(crate::logging::DroppedLines::new()))
            .expect("metric names are unique");
        let enrolled_pods =
            IntGauge::new("mesh_enrolled_pods", "Pods whose traffic the agent steers")
                .expect("static metric definition");
        let enroll_failures = IntCounter::new(
            "mesh_enroll_failures_total",
            "Pods that could not be enrolled",
        )
        .expect("static metric definition");
        let active_connections = IntGaugeVec::new(
            Opts::new("mesh_active_connections", "Connections being copied now"),
            &["direction"],
        )
        .expect("static metric definition");
        let connect_latency = HistogramVec::new(
            HistogramOpts::new(
                "mesh_connect_duration_seconds",
                "Time to connect to a service endpoint (TCP from the pod, or a tunnel stream), \
                 by destination service",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["service"],
        )
        .expect("static metric definition");
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "mesh_certificate_expiry_timestamp_seconds",
                "When the certificate held for each local identity expires (Unix time)",
            ),
            &["identity"],
        )
        .expect("static metric definition");
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntGaugeVec::new(Opts::new(format!("mesh_{name}"), help), labels)
                .expect("static metric definition");
            family(r, vec)
        };
        let config_build = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_config_build_duration_seconds",
                "Time to build a configuration snapshot and apply it (parse, validate, sync \
                 balancers, limits and enrollment), at start and at each applied reload",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("static metric definition");
        let ca_reachable = IntGauge::new(
            "mesh_ca_reachable",
            "Whether the last exchange with the CA off the node reached it (1) or not (0); 1 \
             with a CA key on the node",
        )
        .expect("static metric definition");
        Self {
            handshakes: counters(
                r,
                "tls_handshakes_total",
                "mTLS handshakes of tunnel connections (TLS and HTTP/2), by role (client: to \
                 another node's pod; server: a pod's tunnel server) and result (ok, failed)",
                &["role", "result"],
            ),
            tunnels: gauges(
                "tunnel_connections",
                "mTLS tunnel connections open now, by role (client, server)",
                &["role"],
            ),
            tunnel_streams: gauges(
                "tunnel_streams",
                "Streams (proxied connections) open now on the tunnel connections, by role; \
                 divided by mesh_tunnel_connections: streams per tunnel",
                &["role"],
            ),
            captured: counters(
                r,
                "captured_connections_total",
                "Connects seen by the eBPF connect programs in each enrolled pod, by workload \
                 and result (captured: sent to the proxy; skipped: loopback or excluded; \
                 no_listener: no proxy listener was there)",
                &["workload", "result"],
            ),
            client_ip_fallbacks: counters(
                r,
                "client_ip_fallbacks_total",
                "Connections from another node's pod that reached a pod's app from the pod's own \
                 address instead of the client's, because the kernel refused the transparent \
                 path (see the pod's clientIp in status), by workload",
                &["workload"],
            ),
            config_build: family(r, config_build),
            ca_reachable: family(r, ca_reachable),
            ca_requests: counters(
                r,
                "ca_requests_total",
                "Certificate signing requests to the CA off the node, by outcome (issued, \
                 refused, unavailable)",
                &["outcome"],
            ),
            config_reloads: counters(
                r,
                "config_reloads_total",
                "Configuration reloads by result (applied, rejected)",
                &["result"],
            ),
            kube_rejected: counters(
                r,
                "kube_objects_rejected_total",
                "Kubernetes objects the Kubernetes source refused and skipped (malformed, \
                 invalid, or a second traffic policy for a service), by kind",
                &["kind"],
            ),
            enrolled_pods: family(r, enrolled_pods),
            enroll_failures: family(r, enroll_failures),
            connections: counters(
                r,
                "connections_total",
                "Connections handled, counted when they end, by direction (outbound, inbound, \
                 tunnel), route, security (mutual_tls across nodes, else plaintext) and outcome",
                &["direction", "route", "security", "outcome"],
            ),
            active_connections: family(r, active_connections),
            bytes: counters(
                r,
                "bytes_total",
                "Bytes copied, by direction and way (from_client: from the side that opened the \
                 connection; to_client: back to it)",
                &["direction", "way"],
            ),
            shaped_bytes: counters(
                r,
                "shaped_bytes_total",
                "Bytes that waited for a bandwidth limit, by direction",
                &["direction"],
            ),
            retries: counters(
                r,
                "retries_total",
                "Failed connects to a service endpoint by what followed: retried on another \
                 endpoint, budget_exhausted, attempts_exhausted",
                &["service", "result"],
            ),
            ejections: counters(
                r,
                "endpoint_ejections_total",
                "Endpoints ejected by outlier detection, by service",
                &["service"],
            ),
            circuit_open: counters(
                r,
                "circuit_open_total",
                "Connections refused by a service's circuit breaker",
                &["service"],
            ),
            rate_limited: counters(
                r,
                "rate_limited_total",
                "Connections refused by a rate limit, by policy and kind (ingress, egress)",
                &["policy", "kind"],
            ),
            health_checks: counters(
                r,
                "health_checks_total",
                "Active health checks by service and result (ok, failed)",
                &["service", "result"],
            ),
            connect_latency: family(r, connect_latency),
            certificate_expiry: family(r, certificate_expiry),
            istio_opened: istio(
                r,
                "istio_tcp_connections_opened_total",
                "TCP connections opened (Istio's metric and labels)",
            ),
            istio_closed: istio(
                r,
                "istio_tcp_connections_closed_total",
                "TCP connections closed (Istio's metric and labels)",
            ),
            istio_sent: istio(
                r,
                "istio_tcp_sent_bytes_total",
                "Bytes the server sent (the response), counted while the connection is open",
            ),
            istio_received: istio(
                r,
                "istio_tcp_received_bytes_total",
                "Bytes the server received (the request), counted while the connection is open",
            ),
            registry,
        }
    }

    /// The Istio series of one label set: opened, closed, sent and received.
    pub fn istio_tcp(&self, values: &[&str; 17]) -> [IntCounter; 4] {
        [
            self.istio_opened.with_label_values(values),
            self.istio_closed.with_label_values(values),
            self.istio_sent.with_label_values(values),
            self.istio_received.with_label_values(values),
        ]
    }

    /// A connection ended with `outcome` (see `proxy::Outcome`).
    pub fn connection(&self, direction: &str, route: &str, security: &str, outcome: &str) {
        self.connections
            .with_label_values(&[direction, route, security, outcome])
            .inc();
    }

    pub fn active(&self, direction: &str) -> ActiveGuard {
        let gauge = self.active_connections.with_label_values(&[direction]);
        gauge.inc();
        ActiveGuard(gauge)
    }

    pub fn bytes(&self, direction: &str, from_client: u64, to_client: u64) {
        self.bytes
            .with_label_values(&[direction, "from_client"])
            .inc_by(from_client);
        self.bytes
            .with_label_values(&[direction, "to_client"])
            .inc_by(to_client);
    }

    pub fn shaped_bytes(&self, direction: &str, bytes: u64) {
        if bytes > 0 {
            self.shaped_bytes
                .with_label_values(&[direction])
                .inc_by(bytes);
        }
    }

    pub fn retry(&self, service: &str, result: &str) {
        self.retries.with_label_values(&[service, result]).inc();
    }

    pub fn ejection(&self, service: &str) {
        self.ejections.with_label_values(&[service]).inc();
    }

    pub fn circuit_open(&self, service: &str) {
        self.circuit_open.with_label_values(&[service]).inc();
    }

    pub fn rate_limited(&self, policy: &str, kind: &str) {
        self.rate_limited.with_label_values(&[policy, kind]).inc();
    }

    pub fn health_check(&self, service: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.health_checks
            .with_label_values(&[service, result])
            .inc();
    }

    /// A connect to an endpoint of `service` took `latency`.
    pub fn connect_latency(&self, service: &str, latency: Duration) {
        self.connect_latency
            .with_label_values(&[service])
            .observe(latency.as_secs_f64());
    }

    /// Sets the expiry gauges to exactly these `(identity, not_after)`.
    pub fn observe_certificates(&self, certificates: impl Iterator<Item = (String, u64)>) {
        self.certificate_expiry.reset();
        for (identity, not_after) in certificates {
            self.certificate_expiry
                .with_label_values(&[&identity])
                .set(not_after as i64);
        }
    }

    /// The tunnel figures of one role, `client` or `server`.
    pub fn tunnel(&self, role: &str) -> TunnelMetrics {
        TunnelMetrics {
            handshakes_ok: self.handshakes.with_label_values(&[role, "ok"]),
            handshakes_failed: self.handshakes.with_label_values(&[role, "failed"]),
            connections: self.tunnels.with_label_values(&[role]),
            streams: self.tunnel_streams.with_label_values(&[role]),
        }
    }

    /// A tunnel connection to `workload`'s app could not keep its client's address.
    pub fn client_ip_fallback(&self, workload: &str) {
        self.client_ip_fallbacks
            .with_label_values(&[workload])
            .inc();
    }

    /// A snapshot was built and applied in `took`.
    pub fn config_built(&self, took: Duration) {
        self.config_build.observe(took.as_secs_f64());
    }

    /// Brings the capture counters up to the eBPF totals of the enrolled pods: `(workload,
    /// captured, skipped, no_listener)`. A pod that left loses its series; a pod enrolled
    /// anew (its counters restart at zero) starts its series again, which Prometheus reads as
    /// a counter reset.
    pub fn observe_capture(&self, pods: impl Iterator<Item = (String, [u64; 3])>) {
        let mut seen = std::collections::HashSet::new();
        for (workload, totals) in pods {
            for (result, total) in ["captured", "skipped", "no_listener"].iter().zip(totals) {
                let counter = self
                    .captured
                    .with_label_values(&[workload.as_str(), result]);
                if total < counter.get() {
                    counter.reset();
                }
                counter.inc_by(total - counter.get());
            }
            seen.insert(workload);
        }
        // Series of pods no longer enrolled.
        for family in self.captured.collect() {
            for metric in family.get_metric() {
                let workload = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "workload")
                    .map(|l| l.value().to_owned());
                if let Some(workload) = workload.filter(|w| !seen.contains(w)) {
                    for result in ["captured", "skipped", "no_listener"] {
                        let _ = self.captured.remove_label_values(&[&workload, result]);
                    }
                }
            }
        }
    }

    /// Sets the CA gauge and brings the request counters up to the signer's totals
    /// (`issued`, `refused`, `unavailable`).
    pub fn observe_ca(&self, reachable: bool, totals: [(&str, u64); 3]) {
        self.ca_reachable.set(i64::from(reachable));
        for (outcome, total) in totals {
            let counter = self.ca_requests.with_label_values(&[outcome]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// Brings the reload counters up to the watcher's totals.
    pub fn observe_reloads(&self, applied: u64, rejected: u64) {
        for (result, total) in [("applied", applied), ("rejected", rejected)] {
            let counter = self.config_reloads.with_label_values(&[result]);
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        // Encoding our own families into a Vec cannot fail.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}
