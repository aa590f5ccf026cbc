//! Prometheus metrics: one registry, served at /metrics by the admin API.
//! Later issues add their families here (balancing, limits, tunnels).

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, core::Collector,
};

pub struct Metrics {
    pub registry: Registry,
    config_reloads: IntCounterVec,
    pub enrolled_pods: IntGauge,
    pub enroll_failures: IntCounter,
    connections: IntCounterVec,
    active_connections: IntGaugeVec,
    bytes: IntCounterVec,
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

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("mesh".into()), None).expect("static prefix is valid");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads by result (applied, rejected)",
            ),
            &["result"],
        )
        .expect("static metric definition");
        let enrolled_pods = IntGauge::new("enrolled_pods", "Pods whose traffic the agent steers")
            .expect("static metric definition");
        let enroll_failures =
            IntCounter::new("enroll_failures_total", "Pods that could not be enrolled")
                .expect("static metric definition");
        let connections = IntCounterVec::new(
            Opts::new(
                "connections_total",
                "Connections handled, counted when they end, by direction (outbound, inbound, \
                 tunnel), route, security (mutual_tls across nodes, else plaintext) and outcome",
            ),
            &["direction", "route", "security", "outcome"],
        )
        .expect("static metric definition");
        let active_connections = IntGaugeVec::new(
            Opts::new("active_connections", "Connections being copied now"),
            &["direction"],
        )
        .expect("static metric definition");
        let bytes = IntCounterVec::new(
            Opts::new(
                "bytes_total",
                "Bytes copied, by direction and way (from_client: from the side that opened the \
                 connection; to_client: back to it)",
            ),
            &["direction", "way"],
        )
        .expect("static metric definition");
        let collectors: [Box<dyn Collector>; 6] = [
            Box::new(config_reloads.clone()),
            Box::new(enrolled_pods.clone()),
            Box::new(enroll_failures.clone()),
            Box::new(connections.clone()),
            Box::new(active_connections.clone()),
            Box::new(bytes.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            config_reloads,
            enrolled_pods,
            enroll_failures,
            connections,
            active_connections,
            bytes,
        }
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
