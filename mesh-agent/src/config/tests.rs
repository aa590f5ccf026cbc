//! Tests of the file source: valid documents, defaults and resolution here, with the helpers
//! every topic uses; refused documents (each error with its exact
//! `file:line:column: field: message`) in `errors`; one file per topic for the rest (mTLS,
//! start-up settings, authorization, rate limits, traffic policy, sources).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::tls::SpiffeId;

/// Parses with `agent.node` defaulting to `host-node`.
fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str_with_node(text, "mesh.yaml", || "host-node".to_owned())
}

/// The document made of `lines`: line N of the YAML is `lines[N - 1]`.
fn doc(lines: &[&str]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[track_caller]
fn error(lines: &[&str]) -> String {
    match parse(&doc(lines)) {
        Ok(config) => panic!("accepted: {config:#?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn ok(lines: &[&str]) -> Config {
    match parse(&doc(lines)) {
        Ok(config) => config,
        Err(e) => panic!("refused: {e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn sock(s: &str) -> SocketAddr {
    s.parse().expect("test socket address")
}

#[track_caller]
fn spiffe(text: &str) -> SpiffeId {
    SpiffeId::parse(text).unwrap_or_else(|e| panic!("{e}"))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A valid two-workload, one-service document; tests replace or append lines.
const BASE: &[&str] = &[
    "agent:",                          // 1
    "  node: node-a",                  // 2
    "workloads:",                      // 3
    "  - name: web-1",                 // 4
    "    ips: [10.1.0.2]",             // 5
    "    netns: /var/run/netns/web-1", // 6
    "    labels: {app: web}",          // 7
    "  - name: web-2",                 // 8
    "    ips: [10.1.0.3]",             // 9
    "    node: node-b",                // 10
    "    labels: {app: web}",          // 11
    "services:",                       // 12
    "  - name: web",                   // 13
    "    vips: [10.96.0.10]",          // 14
    "    endpoints:",                  // 15
    "      selector: {app: web}",      // 16
    "    ports:",                      // 17
    "      - port: 80",                // 18
];

fn base_with(replace: &[(usize, &'static str)], append: &[&'static str]) -> Vec<&'static str> {
    edited(BASE, replace, append)
}

/// The error of BASE with `field` in place of `agent.node` (line 2).
#[track_caller]
fn agent_error(field: &'static str) -> String {
    error(&base_with(&[(2, field)], &[]))
}

/// `document` with its lines `replace`d (numbered from 1), then `append` after it.
fn edited(
    document: &[&'static str],
    replace: &[(usize, &'static str)],
    append: &[&'static str],
) -> Vec<&'static str> {
    let mut lines = document.to_vec();
    for (line, text) in replace {
        lines[line - 1] = text;
    }
    lines.extend_from_slice(append);
    lines
}

/// The rules of a subdomain name (everything but namespaces and the trust domain).
const SUBDOMAIN_RULE: &str = "use 1 to 253 lowercase letters, digits, '-' or '.', each \
                              dot-separated part starting and ending with a letter or digit";
/// The rules of a namespace.
const LABEL_RULE: &str = "use 1 to 63 lowercase letters, digits or '-' (no '.'), starting and \
                          ending with a letter or digit";

/// BASE, then `policies:` and `authorization:` (lines 19 and 20), then `lines` from line 21.
fn with_policies(lines: &[&'static str]) -> Vec<&'static str> {
    let mut all = base_with(&[], &["policies:", "  authorization:"]);
    all.extend_from_slice(lines);
    all
}

// ---- valid documents ----------------------------------------------------------------------

#[test]
fn example_file_parses() {
    let config = Config::from_yaml_str(
        include_str!("../../../deploy/examples/local.yaml"),
        "local.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.startup.node, "node-a");
    let names: Vec<&str> = config.workloads().iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["client", "server-1", "server-2"]);
    assert!(
        config
            .workloads()
            .iter()
            .all(|w| w.namespace == "demo" && w.local)
    );
    assert_eq!(config.local_workloads().count(), 3);

    let (service, port) = config
        .service_by_vip(sock("10.96.0.10:80"))
        .expect("echo VIP");
    assert_eq!(service.qualified_name().to_string(), "demo/echo");
    assert_eq!((port.port, port.target_port), (80, 8080));
    assert_eq!(port.name.as_deref(), Some("http"));
    let endpoints: Vec<SocketAddr> = port.endpoints.iter().map(|e| e.addr).collect();
    assert_eq!(endpoints, [sock("10.1.0.3:8080"), sock("10.1.0.4:8080")]);
    assert!(
        port.endpoints
            .iter()
            .all(|e| e.local && e.node.as_deref() == Some("node-a"))
    );
    assert_eq!(
        config.workload_by_ip(ip("10.1.0.4")).map(|w| w.fail_mode),
        Some(FailMode::Closed)
    );
}

#[test]
fn full_document() {
    let config = ok(&[
        "agent:",
        "  node: node-a",
        "  cgroup: /sys/fs/cgroup/unified",
        "  bpfName: mesh-test",
        "  outboundPort: 16001",
        "  inboundPort: 16006",
        "  tunnelPort: 16008",
        "  adminAddr: '[::1]:16000'",
        "  proxyMark: 0x540",
        "  transparentMark: 0x541",
        "  replyTable: 100",
        "  excludedPorts: [443, 22]",
        "  excludedCidrs: [10.0.0.0/8, 'fd00::/16']",
        "  connectTimeoutMs: 250",
        "  idleTimeoutMs: 60000",
        "  bufferBytes: 16384",
        "  maxConnections: 100",
        "  trustDomain: mesh.example.org",
        "  caCertFile: /etc/mesh/ca.pem",
        "  caKeyFile: /etc/mesh/ca-key.pem",
        "  trustRootFiles: [/etc/mesh/old-root.pem, /etc/mesh/new-root.pem]",
        "  certLifetimeMinutes: 90",
        "  tunnelIdleTimeoutMs: 2500",
        "  tunnelConnectionsPerPeer: 3",
        "  drainTimeoutMs: 0",
        "  accessLog: {samplePercent: 25}",
        "  istioMetrics: false",
        "  splice: false",
        "  fastPath: true",
        "workloads:",
        "  - name: web-1",
        "    namespace: shop",
        "    serviceAccount: web",
        "    ips: [10.1.0.2, \"fd00:1::2\"]",
        "    node: node-a",
        "    netns: /var/run/netns/web-1",
        "    labels: {app: web, tier: front}",
        "    failMode: closed",
        "    unknownDestination: deny",
        "    accessLog: {enabled: false}",
        "  - name: web-2",
        "    namespace: shop",
        "    ips: [10.2.0.2]",
        "    node: node-b",
        "    labels: {app: web}",
        "services:",
        "  - name: web",
        "    namespace: shop",
        "    vips: [10.96.0.10, \"fd00:96::10\"]",
        "    ports:",
        "      - port: 80",
        "        targetPort: 8080",
        "        name: http",
        "      - port: 443",
        "    endpoints:",
        "      selector: {app: web}",
        "  - name: db",
        "    namespace: shop",
        "    vips: [10.96.0.20]",
        "    ports: [{port: 5432}]",
        "    endpoints:",
        "      addresses: [192.168.7.9]",
        "policies: {}",
    ]);
    let a = &config.agent;
    assert_eq!(
        *a,
        AgentConfig {
            startup: StartupSettings {
                node: "node-a".into(),
                cgroup: Some(PathBuf::from("/sys/fs/cgroup/unified")),
                bpf_name: "mesh-test".into(),
                outbound_port: 16001,
                inbound_port: 16006,
                tunnel_port: 16008,
                admin_addr: sock("[::1]:16000"),
                proxy_mark: 0x540,
                transparent_mark: 0x541,
                reply_table: 100,
                max_connections: 100,
                trust_domain: "mesh.example.org".into(),
                ca_cert_file: Some(PathBuf::from("/etc/mesh/ca.pem")),
                ca_key_file: Some(PathBuf::from("/etc/mesh/ca-key.pem")),
                trust_root_files: vec![
                    PathBuf::from("/etc/mesh/old-root.pem"),
                    PathBuf::from("/etc/mesh/new-root.pem"),
                ],
                cert_lifetime: Duration::from_secs(90 * 60),
                tunnel_idle_timeout: Duration::from_millis(2500),
                tunnel_connections_per_peer: Some(3),
                drain_timeout: Duration::ZERO,
                ca: None,
                fast_path: true,
            },
            live: LiveSettings {
                excluded_ports: vec![22, 443],
                excluded_cidrs: vec![
                    Cidr {
                        addr: "10.0.0.0".parse().expect("ip"),
                        prefix: 8
                    },
                    Cidr {
                        addr: "fd00::".parse().expect("ip"),
                        prefix: 16
                    },
                ],
                connect_timeout: Duration::from_millis(250),
                idle_timeout: Duration::from_secs(60),
                buffer_bytes: 16384,
                access_log: AccessLog {
                    enabled: true,
                    sample_percent: 25,
                },
                istio_metrics: false,
                splice: false,
            },
        }
    );
    assert_eq!(a.startup.proxy_port_range(), (16001, 16008));

    let web1 = &config.workloads()[0];
    assert_eq!(
        **web1,
        Workload {
            name: "web-1".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            identity: spiffe("spiffe://mesh.example.org/ns/shop/sa/web"),
            ips: vec![ip("10.1.0.2"), ip("fd00:1::2")],
            node: "node-a".into(),
            netns: Some(PathBuf::from("/var/run/netns/web-1")),
            labels: labels(&[("app", "web"), ("tier", "front")]),
            fail_mode: FailMode::Closed,
            unknown_destination: UnknownDestination::Deny,
            // Its own `enabled`, the agent's sampling.
            access_log: AccessLog {
                enabled: false,
                sample_percent: 25,
            },
            local: true,
        }
    );
    let web2 = &config.workloads()[1];
    assert!(!web2.local);
    assert_eq!(
        web2.access_log,
        AccessLog {
            enabled: true,
            sample_percent: 25
        }
    );
    assert_eq!(web2.netns, None);
    assert_eq!(web2.service_account, "default");

    // Lookups.
    assert_eq!(
        config
            .workload_by_ip(ip("fd00:1::2"))
            .map(|w| w.name.as_str()),
        Some("web-1")
    );
    assert_eq!(
        config
            .workload_by_ip(ip("::ffff:10.2.0.2"))
            .map(|w| w.name.as_str()),
        Some("web-2")
    );
    assert!(config.workload_by_ip(ip("10.9.9.9")).is_none());
    assert_eq!(
        config.workload(WorkloadId(1)).map(|w| w.name.as_str()),
        Some("web-2")
    );
    let local: Vec<&str> = config.local_workloads().map(|w| w.name.as_str()).collect();
    assert_eq!(local, ["web-1"]);

    let (svc, port) = config
        .service_by_vip(sock("[fd00:96::10]:443"))
        .expect("v6 VIP");
    assert_eq!(
        (svc.name.as_str(), port.port, port.target_port),
        ("web", 443, 443)
    );
    let (_, port) = config
        .service_by_vip(sock("[::ffff:10.96.0.10]:80"))
        .expect("mapped VIP");
    assert_eq!(port.target_port, 8080);
    assert!(config.service_by_vip(sock("10.96.0.10:81")).is_none());
    assert!(config.service("shop", "db").is_some());
    assert!(config.service("default", "db").is_none());

    // Selector: both workloads, every IP, with node and locality.
    assert_eq!(
        port.endpoints,
        [
            Endpoint {
                addr: sock("10.1.0.2:8080"),
                node: Some("node-a".into()),
                local: true,
                weight: 1,
                zone: None,
            },
            Endpoint {
                addr: sock("[fd00:1::2]:8080"),
                node: Some("node-a".into()),
                local: true,
                weight: 1,
                zone: None,
            },
            Endpoint {
                addr: sock("10.2.0.2:8080"),
                node: Some("node-b".into()),
                local: false,
                weight: 1,
                zone: None,
            },
        ]
    );
    // Raw address outside the mesh.
    let db = config.service("shop", "db").expect("db");
    assert_eq!(
        db.selection,
        EndpointSelection::Addresses(vec![ip("192.168.7.9")])
    );
    assert_eq!(
        db.ports[0].endpoints,
        [Endpoint {
            addr: sock("192.168.7.9:5432"),
            node: None,
            local: false,
            weight: 1,
            zone: None,
        }]
    );
    assert_eq!(config.policies, Policies::default());
}

#[test]
fn defaults() {
    let config = ok(&[
        "workloads:",
        "  - name: w",
        "    ips: [10.1.0.2]",
        "    netns: /run/netns/w",
        "services:",
        "  - name: s",
        "    vips: [10.96.0.1]",
        "    ports: [{port: 80}]",
        "    endpoints: {workloads: [w]}",
    ]);
    let w = &config.workloads()[0];
    assert_eq!(
        config.agent,
        AgentConfig {
            startup: StartupSettings {
                node: "host-node".into(),
                cgroup: None,
                bpf_name: "mesh".into(),
                outbound_port: 15001,
                inbound_port: 15006,
                tunnel_port: 15008,
                admin_addr: sock("127.0.0.1:15000"),
                proxy_mark: 0x539,
                transparent_mark: 0x4000_0539,
                reply_table: 1337,
                max_connections: 16384,
                trust_domain: "cluster.local".into(),
                ca_cert_file: None,
                ca_key_file: None,
                trust_root_files: vec![],
                cert_lifetime: Duration::from_secs(24 * 3600),
                tunnel_idle_timeout: Duration::from_secs(60),
                tunnel_connections_per_peer: None,
                drain_timeout: Duration::from_secs(25),
                ca: None,
                fast_path: false,
            },
            live: LiveSettings {
                excluded_ports: vec![],
                excluded_cidrs: vec![],
                connect_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_secs(3600),
                buffer_bytes: 65536,
                access_log: AccessLog::default(),
                istio_metrics: true,
                splice: true,
            },
        }
    );
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert!(config.policies.authorization.is_empty());
    assert_eq!(w.namespace, "default");
    assert_eq!(w.service_account, "default");
    assert_eq!(w.node, "host-node");
    assert!(w.local);
    assert!(w.labels.is_empty());
    assert_eq!(w.fail_mode, FailMode::Open);
    assert_eq!(w.unknown_destination, UnknownDestination::Passthrough);
    let s = &config.services[0];
    assert_eq!(s.namespace, "default");
    assert_eq!(s.ports[0].target_port, 80);
    assert_eq!(s.ports[0].name, None);
    assert_eq!(s.ports[0].endpoints[0].addr, sock("10.1.0.2:80"));
}

#[test]
fn empty_documents_are_empty_configs() {
    for text in [
        "",
        "# nothing yet\n",
        "agent:\nworkloads:\nservices:\npolicies:\n",
    ] {
        let config = parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!(config.workloads().is_empty() && config.services.is_empty());
        assert_eq!(config.agent.startup.node, "host-node");
    }
}

#[test]
fn the_node_given_on_the_command_line_wins_over_the_file() {
    let text = doc(BASE);
    let on = |node| Config::from_yaml_str_on_node(&text, "mesh.yaml", node);
    // The file says node-a: web-1 (no node of its own) is local, web-2 (node-b) is not.
    let config = on(None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.startup.node, "node-a");
    let local: Vec<&str> = config.local_workloads().map(|w| w.name.as_str()).collect();
    assert_eq!(local, ["web-1"]);
    // On node-b, web-2 is local, and validation sees it: a local workload needs its netns.
    let err = on(Some("node-b"))
        .expect_err("web-2 has no netns")
        .to_string();
    assert!(
        err.contains("netns is required for a workload on this agent's node (node-b)"),
        "{err}"
    );
    // Workloads without a node of their own follow the overriding node.
    let config = on(Some("node-c")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.startup.node, "node-c");
    assert_eq!(config.workloads()[0].node, "node-c");
    assert_eq!(config.local_workloads().count(), 1);
    // With no agent block at all, the override is still the node.
    let config = Config::from_yaml_str_on_node("", "mesh.yaml", Some("node-d"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.startup.node, "node-d");
}

#[test]
fn load_reads_the_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, include_str!("../../../deploy/examples/local.yaml")).expect("write");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.services.len(), 1);

    std::fs::write(&path, "agent:\n  proxyMark: 0\n").expect("write");
    let err = Config::load(&path).expect_err("proxyMark 0");
    assert_eq!(
        err.to_string(),
        format!("{}:2:14: agent.proxyMark: must be non-zero", path.display())
    );
    assert_eq!(err.position(), Some((2, 14)));
    assert_eq!(err.path(), "agent.proxyMark");

    let missing = dir.path().join("absent.yaml");
    let err = Config::load(&missing).expect_err("missing file");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!(
            "{}: cannot read configuration: ",
            missing.display()
        )),
        "{err}"
    );
}

// ---- resolution ---------------------------------------------------------------------------

#[test]
fn selector_takes_same_namespace_workloads_having_all_labels() {
    let config = ok(&[
        "agent: {node: n1}",
        "workloads:",
        "  - {name: a, namespace: ns, ips: [10.0.0.1], node: n2, labels: {app: web, v: '1'}}",
        "  - {name: b, namespace: ns, ips: [10.0.0.2], node: n2, labels: {app: web}}",
        "  - {name: c, namespace: other, ips: [10.0.0.3], node: n2, labels: {app: web, v: '1'}}",
        "  - {name: d, namespace: ns, ips: [10.0.0.4], node: n2, labels: {app: db, v: '1'}}",
        "  - {name: e, namespace: ns, ips: [10.0.0.5], node: n2, labels: {app: web, v: '1', x: y}}",
        "services:",
        "  - name: web-v1",
        "    namespace: ns",
        "    vips: [10.96.0.1]",
        "    ports: [{port: 80}, {port: 81, targetPort: 9000}]",
        "    endpoints: {selector: {app: web, v: '1'}}",
        "  - name: nothing",
        "    namespace: ns",
        "    vips: [10.96.0.2]",
        "    ports: [{port: 80}]",
        "    endpoints: {selector: {app: none}}",
    ]);
    let s = &config.services[0];
    assert_eq!(
        s.selection,
        EndpointSelection::Selector(std::sync::Arc::new(labels(&[("app", "web"), ("v", "1")])))
    );
    let names = |p: &ServicePort| -> Vec<String> {
        p.endpoints
            .iter()
            .map(|e| {
                let w = config.endpoint_workload(e).expect("workload");
                format!("{}@{}", w.name, e.addr)
            })
            .collect()
    };
    assert_eq!(names(&s.ports[0]), ["a@10.0.0.1:80", "e@10.0.0.5:80"]);
    assert_eq!(names(&s.ports[1]), ["a@10.0.0.1:9000", "e@10.0.0.5:9000"]);
    assert!(
        s.ports[0]
            .endpoints
            .iter()
            .all(|e| !e.local && e.node.as_deref() == Some("n2"))
    );
    // A selector may match nothing (scaled to zero).
    assert!(config.services[1].ports[0].endpoints.is_empty());
}

#[test]
fn explicit_workloads_and_addresses() {
    let config = ok(&base_with(
        &[],
        &[
            "  - name: pinned",                                   // 19
            "    vips: [10.96.0.11]",                             // 20
            "    ports: [{port: 80, targetPort: 8080}]",          // 21
            "    endpoints: {workloads: [web-2, web-1]}",         // 22
            "  - name: raw",                                      // 23
            "    vips: [10.96.0.12]",                             // 24
            "    ports: [{port: 80}]",                            // 25
            "    endpoints: {addresses: [10.1.0.3, 172.16.0.1]}", // 26
        ],
    ));
    let pinned = config.service("default", "pinned").expect("pinned");
    assert_eq!(
        pinned.selection,
        EndpointSelection::Workloads(vec!["web-2".into(), "web-1".into()])
    );
    let addrs: Vec<(SocketAddr, Option<&str>, bool)> = pinned.ports[0]
        .endpoints
        .iter()
        .map(|e| {
            let owner = config.endpoint_workload(e).map(|w| w.name.as_str());
            (e.addr, owner, e.local)
        })
        .collect();
    assert_eq!(
        addrs,
        [
            (sock("10.1.0.3:8080"), Some("web-2"), false),
            (sock("10.1.0.2:8080"), Some("web-1"), true),
        ]
    );
    // A raw address that is a workload's IP is attributed to it.
    let raw = config.service("default", "raw").expect("raw");
    assert_eq!(
        raw.ports[0].endpoints,
        [
            Endpoint {
                addr: sock("10.1.0.3:80"),
                node: Some("node-b".into()),
                local: false,
                weight: 1,
                zone: None,
            },
            Endpoint {
                addr: sock("172.16.0.1:80"),
                node: None,
                local: false,
                weight: 1,
                zone: None,
            },
        ]
    );
    let owners: Vec<Option<&str>> = raw.ports[0]
        .endpoints
        .iter()
        .map(|e| config.endpoint_workload(e).map(|w| w.name.as_str()))
        .collect();
    assert_eq!(owners, [Some("web-2"), None]);
    assert_eq!(raw.vips, [IpAddr::V4(Ipv4Addr::new(10, 96, 0, 12))]);
}

mod authorization;
mod errors;
mod mtls;
mod rate_limits;
mod settings;
mod sources;
mod traffic_policy;
