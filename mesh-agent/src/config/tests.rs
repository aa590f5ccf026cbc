//! Tests of the file source: parsing, validation (each error with its exact
//! `file:line:column: field: message`), resolution and defaults.

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
    let mut lines = BASE.to_vec();
    for (line, text) in replace {
        lines[line - 1] = text;
    }
    lines.extend_from_slice(append);
    lines
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

// ---- parse errors -------------------------------------------------------------------------

#[test]
fn unknown_fields_are_refused_with_position_and_path() {
    assert_eq!(
        error(&base_with(&[], &["    lb: roundRobin"])),
        "mesh.yaml:19:5: services[0].lb: unknown field `lb`, expected one of name, namespace, \
         vips, ports, endpoints, trafficPolicy"
    );
    assert_eq!(
        error(&base_with(&[(2, "  nodeName: node-a")], &[])),
        "mesh.yaml:2:3: agent.nodeName: unknown field `nodeName`, expected one of node, cgroup, \
         bpfName, outboundPort, inboundPort, tunnelPort, adminAddr, proxyMark, transparentMark, \
         replyTable, excludedPorts, excludedCidrs, \
         connectTimeoutMs, idleTimeoutMs, bufferBytes, maxConnections, trustDomain, caCertFile, caKeyFile, \
         trustRootFiles, certLifetimeMinutes, tunnelIdleTimeoutMs, tunnelConnectionsPerPeer, drainTimeoutMs, accessLog, \
         istioMetrics, splice, ca, fastPath"
    );
    assert_eq!(
        error(&base_with(&[], &["        tagetPort: 8080"])),
        "mesh.yaml:19:9: services[0].ports[0].tagetPort: unknown field `tagetPort`, expected one \
         of port, targetPort, name"
    );
    assert_eq!(
        error(&base_with(&[], &["polices: {}"])),
        "mesh.yaml:19:1: polices: unknown field `polices`, expected one of agent, nodes, \
         workloads, services, policies"
    );
    assert_eq!(
        error(&base_with(&[], &["policies: {allow: []}"])),
        "mesh.yaml:19:12: policies.allow: unknown field `allow`, expected one of authorization, \
         rateLimits, egressLimits"
    );
}

#[test]
fn type_and_syntax_errors_are_refused_with_position_and_path() {
    assert_eq!(
        error(&base_with(&[(18, "      - port: http")], &[])),
        "mesh.yaml:18:15: services[0].ports[0].port: invalid u64"
    );
    assert_eq!(
        error(&base_with(&[], &["    failMode: half"])),
        "mesh.yaml:19:5: services[0].failMode: unknown field `failMode`, expected one of name, \
         namespace, vips, ports, endpoints, trafficPolicy"
    );
    assert_eq!(
        error(&base_with(&[(7, "    failMode: half")], &[])),
        "mesh.yaml:7:15: workloads[0].failMode: unknown variant `half`, expected one of open, \
         closed"
    );
    assert_eq!(
        error(&base_with(&[(14, "    name: web")], &[])),
        "mesh.yaml:14:5: services[0]: duplicate mapping key `name` is not allowed here"
    );
    assert_eq!(
        error(&base_with(&[(14, "    vip: [10.96.0.10]")], &[])),
        "mesh.yaml:14:5: services[0].vip: unknown field `vip`, expected one of name, namespace, \
         vips, ports, endpoints, trafficPolicy"
    );
    assert_eq!(
        error(&base_with(&[(5, "    # no ips")], &[])),
        "mesh.yaml:7:5: workloads[0]: missing field `ips`"
    );
    let err = parse("services: [\n").expect_err("unterminated flow sequence");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert!(err.to_string().starts_with("mesh.yaml:"), "{err}");
    assert!(err.position().is_some(), "{err}");
}

// ---- validation errors --------------------------------------------------------------------

#[test]
fn bad_ip() {
    assert_eq!(
        error(&base_with(&[(5, "    ips: [10.1.0.2, 10.1.0.256]")], &[])),
        "mesh.yaml:5:21: workloads[0].ips[1]: `10.1.0.256` is not an IP address"
    );
    assert_eq!(
        error(&base_with(&[(14, "    vips: [0.0.0.0]")], &[])),
        "mesh.yaml:14:12: services[0].vips[0]: 0.0.0.0 is not a unicast address usable by a \
         workload or service"
    );
    assert_eq!(
        error(&base_with(&[(16, "      addresses: [web-1]")], &[])),
        "mesh.yaml:16:19: services[0].endpoints.addresses[0]: `web-1` is not an IP address"
    );
}

#[test]
fn port_out_of_range() {
    assert_eq!(
        error(&base_with(&[(18, "      - port: 0")], &[])),
        "mesh.yaml:18:15: services[0].ports[0].port: port 0 is out of range 1..=65535"
    );
    assert_eq!(
        error(&base_with(&[], &["        targetPort: 65536"])),
        "mesh.yaml:19:21: services[0].ports[0].targetPort: port 65536 is out of range 1..=65535"
    );
    assert_eq!(
        error(&base_with(&[(2, "  outboundPort: 70000")], &[])),
        "mesh.yaml:2:17: agent.outboundPort: port 70000 is out of range 1..=65535"
    );
    assert_eq!(
        error(&base_with(&[(2, "  excludedPorts: [22, 0]")], &[])),
        "mesh.yaml:2:23: agent.excludedPorts[1]: port 0 is out of range 1..=65535"
    );
}

#[test]
fn excluded_cidrs_are_checked() {
    assert_eq!(
        error(&base_with(&[(2, "  excludedCidrs: [10.0.0.0/33]")], &[])),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: prefix \"33\" is not in 0..=32"
    );
    assert_eq!(
        error(&base_with(&[(2, "  excludedCidrs: [10.0.0.1/8]")], &[])),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: 10.0.0.1/8 has host bits set (the network is not written as meant)"
    );
    assert_eq!(
        error(&base_with(&[(2, "  excludedCidrs: [10.0.0.0]")], &[])),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: \"10.0.0.0\" is not a CIDR (address/prefix)"
    );
    assert_eq!(
        error(&base_with(
            &[(2, "  excludedCidrs: [192.168.0.0/16, 192.168.0.0/16]")],
            &[]
        )),
        "mesh.yaml:2:35: agent.excludedCidrs[1]: 192.168.0.0/16 is listed twice"
    );
}

#[test]
fn duplicate_vip_across_services() {
    assert_eq!(
        error(&base_with(
            &[],
            &[
                "  - name: web2",                     // 19
                "    vips: [10.96.0.11, 10.96.0.10]", // 20
                "    ports: [{port: 80}]",            // 21
                "    endpoints: {selector: {app: web}}",
            ]
        )),
        "mesh.yaml:20:24: services[1].vips[1]: 10.96.0.10 is already the VIP of service \
         default/web"
    );
}

#[test]
fn vip_that_is_a_workload_ip() {
    assert_eq!(
        error(&base_with(&[(14, "    vips: [10.1.0.3]")], &[])),
        "mesh.yaml:14:12: services[0].vips[0]: 10.1.0.3 is an IP of workload default/web-2: it \
         cannot be a VIP"
    );
}

#[test]
fn duplicate_workload() {
    assert_eq!(
        error(&base_with(&[(8, "  - name: web-1")], &[])),
        "mesh.yaml:8:11: workloads[1].name: workload default/web-1 is already defined at line 4"
    );
    // Same name in another namespace is another workload.
    ok(&base_with(
        &[(8, "  - name: web-1"), (11, "    namespace: other")],
        &[],
    ));
}

#[test]
fn duplicate_workload_ip() {
    assert_eq!(
        error(&base_with(&[(9, "    ips: [\"fd00::1\", 10.1.0.2]")], &[])),
        "mesh.yaml:9:22: workloads[1].ips[1]: 10.1.0.2 is already an IP of workload default/web-1"
    );
    // IPv4-mapped IPv6 is the same address.
    assert_eq!(
        error(&base_with(&[(9, "    ips: [\"::ffff:10.1.0.2\"]")], &[])),
        "mesh.yaml:9:11: workloads[1].ips[0]: 10.1.0.2 is already an IP of workload default/web-1"
    );
}

#[test]
fn duplicate_service() {
    assert_eq!(
        error(&base_with(
            &[],
            &[
                "  - name: web", // 19
                "    vips: [10.96.0.11]",
                "    ports: [{port: 80}]",
                "    endpoints: {selector: {app: web}}",
            ]
        )),
        "mesh.yaml:19:11: services[1].name: service default/web is already defined at line 13"
    );
}

#[test]
fn duplicate_service_port() {
    assert_eq!(
        error(&base_with(
            &[],
            &["      - port: 80", "        targetPort: 8080"]
        )),
        "mesh.yaml:19:15: services[0].ports[1].port: port 80 is already defined for service \
         default/web at line 18"
    );
    assert_eq!(
        error(&base_with(
            &[(18, "      - {port: 80, name: http}")],
            &["      - {port: 81, name: http}"]
        )),
        "mesh.yaml:19:26: services[0].ports[1].name: port name http is already used in service \
         default/web at line 18"
    );
}

#[test]
fn explicit_endpoint_workload_must_exist() {
    assert_eq!(
        error(&base_with(&[(16, "      workloads: [web-1, web-3]")], &[])),
        "mesh.yaml:16:26: services[0].endpoints.workloads[1]: no workload default/web-3 \
         (endpoints are workloads of the service's namespace)"
    );
    assert_eq!(
        error(&base_with(&[(16, "      workloads: [web-1, web-1]")], &[])),
        "mesh.yaml:16:26: services[0].endpoints.workloads[1]: workload web-1 is listed twice"
    );
}

#[test]
fn endpoints_need_exactly_one_selection() {
    assert_eq!(
        error(&base_with(
            &[
                (
                    15,
                    "    endpoints: {selector: {app: web}, addresses: [10.5.0.1]}"
                ),
                (16, "")
            ],
            &[]
        )),
        "mesh.yaml:15:16: services[0].endpoints: exactly one of selector, workloads, addresses is \
         required (found selector and addresses)"
    );
    assert_eq!(
        error(&base_with(&[(15, "    endpoints: {}"), (16, "")], &[])),
        "mesh.yaml:15:16: services[0].endpoints: exactly one of selector, workloads, addresses \
         is required (found none)"
    );
    assert_eq!(
        error(&base_with(&[(16, "      selector: {}")], &[])),
        "mesh.yaml:16:17: services[0].endpoints.selector: must not be empty (list workloads or \
         addresses explicitly instead)"
    );
}

#[test]
fn local_workload_needs_netns() {
    assert_eq!(
        error(&base_with(&[(6, "    serviceAccount: web")], &[])),
        "mesh.yaml:4:5: workloads[0]: netns is required for a workload on this agent's node \
         (node-a)"
    );
    // A remote workload does not.
    assert!(ok(BASE).workloads()[1].netns.is_none());
    assert_eq!(
        error(&base_with(&[(6, "    netns: run/netns/web-1")], &[])),
        "mesh.yaml:6:12: workloads[0].netns: `run/netns/web-1` is not an absolute path"
    );
}

#[test]
fn agent_ports_must_not_collide() {
    assert_eq!(
        error(&base_with(&[(2, "  inboundPort: 15001")], &[])),
        "mesh.yaml:2:16: agent.inboundPort: port 15001 is already used by agent.outboundPort"
    );
    assert_eq!(
        error(&base_with(&[(2, "  adminAddr: 127.0.0.1:15008")], &[])),
        "mesh.yaml:2:14: agent.adminAddr: port 15008 is already used by agent.tunnelPort"
    );
    // The explicit one is named even when it comes first.
    assert_eq!(
        error(&base_with(&[(2, "  outboundPort: 15006")], &[])),
        "mesh.yaml:2:17: agent.outboundPort: port 15006 is already used by agent.inboundPort"
    );
}

#[test]
fn admin_addr_must_be_loopback() {
    assert_eq!(
        error(&base_with(&[(2, "  adminAddr: 0.0.0.0:15000")], &[])),
        "mesh.yaml:2:14: agent.adminAddr: 0.0.0.0 is not a loopback address: the admin API must \
         not be reachable from the network"
    );
    assert_eq!(
        error(&base_with(&[(2, "  adminAddr: 10.0.0.1:15000")], &[])),
        "mesh.yaml:2:14: agent.adminAddr: 10.0.0.1 is not a loopback address: the admin API \
         must not be reachable from the network"
    );
    assert_eq!(
        error(&base_with(&[(2, "  adminAddr: localhost:15000")], &[])),
        "mesh.yaml:2:14: agent.adminAddr: `localhost:15000` is not an IP:port address"
    );
    assert!(ok(BASE).agent.startup.admin_addr.ip().is_loopback());
    let v6 = ok(&base_with(&[(2, "  adminAddr: '[::1]:15000'")], &[]));
    assert_eq!(v6.agent.startup.admin_addr, sock("[::1]:15000"));
}

#[test]
fn proxy_mark() {
    assert_eq!(
        error(&base_with(&[(2, "  proxyMark: 0")], &[])),
        "mesh.yaml:2:14: agent.proxyMark: must be non-zero"
    );
    assert_eq!(
        error(&base_with(&[(2, "  proxyMark: 0x100000000")], &[])),
        "mesh.yaml:2:14: agent.proxyMark: 0x100000000 does not fit in 32 bits"
    );
    assert_eq!(
        ok(&base_with(&[(2, "  proxyMark: 1337")], &[]))
            .agent
            .startup
            .proxy_mark,
        0x539
    );
}

#[test]
fn transparent_mark_and_reply_table() {
    assert_eq!(
        error(&base_with(&[(2, "  transparentMark: 0")], &[])),
        "mesh.yaml:2:20: agent.transparentMark: must be non-zero"
    );
    assert_eq!(
        error(&base_with(&[(2, "  transparentMark: 0x539")], &[])),
        "mesh.yaml:2:20: agent.transparentMark: must differ from agent.proxyMark"
    );
    assert_eq!(
        error(&base_with(&[(2, "  proxyMark: 0x40000539")], &[])),
        "mesh.yaml:2:14: agent.proxyMark: is the default agent.transparentMark: set another \
         transparentMark"
    );
    for (line, reserved) in [
        ("  replyTable: 0", 0),
        ("  replyTable: 253", 253),
        ("  replyTable: 254", 254),
        ("  replyTable: 255", 255),
    ] {
        assert_eq!(
            error(&base_with(&[(2, line)], &[])),
            format!(
                "mesh.yaml:2:15: agent.replyTable: {reserved} is reserved (0, 253 default, 254 \
                 main, 255 local)"
            )
        );
    }
    let mark = ok(&base_with(&[(2, "  transparentMark: 0x10000")], &[]));
    assert_eq!(mark.agent.startup.transparent_mark, 0x10000);
    let table = ok(&base_with(&[(2, "  replyTable: 70000")], &[]));
    assert_eq!(table.agent.startup.reply_table, 70000);
}

#[test]
fn empty_vips_or_ports() {
    assert_eq!(
        error(&base_with(&[(14, "    vips: []")], &[])),
        "mesh.yaml:14:11: services[0].vips: must list at least one VIP"
    );
    assert_eq!(
        error(&base_with(&[(17, "    ports: []"), (18, "")], &[])),
        "mesh.yaml:17:12: services[0].ports: must list at least one port"
    );
    assert_eq!(
        error(&base_with(&[(5, "    ips: []")], &[])),
        "mesh.yaml:5:10: workloads[0].ips: must list at least one IP"
    );
}

#[test]
fn other_agent_fields() {
    assert_eq!(
        error(&base_with(&[(2, "  bpfName: ../etc")], &[])),
        "mesh.yaml:2:12: agent.bpfName: `../etc` is not a valid pin directory name: use 1 to 64 \
         letters, digits, '-', '_' or '.'"
    );
    assert_eq!(
        error(&base_with(&[(2, "  connectTimeoutMs: 0")], &[])),
        "mesh.yaml:2:21: agent.connectTimeoutMs: must be at least 1"
    );
    assert_eq!(
        error(&base_with(&[(2, "  bufferBytes: 0")], &[])),
        "mesh.yaml:2:16: agent.bufferBytes: 0 is out of range 1..=16777216"
    );
    assert_eq!(
        error(&base_with(&[(2, "  splice: sometimes")], &[])),
        "mesh.yaml:2:11: agent.splice: invalid boolean (true or false expected)"
    );
    assert_eq!(
        error(&base_with(&[(2, "  excludedPorts: [22, 22]")], &[])),
        "mesh.yaml:2:23: agent.excludedPorts[1]: port 22 is listed twice"
    );
    assert_eq!(
        error(&base_with(&[(2, "  cgroup: sys/fs/cgroup")], &[])),
        "mesh.yaml:2:11: agent.cgroup: `sys/fs/cgroup` is not an absolute path"
    );
}

/// The rules of a subdomain name (everything but namespaces and the trust domain).
const SUBDOMAIN_RULE: &str = "use 1 to 253 lowercase letters, digits, '-' or '.', each \
                              dot-separated part starting and ending with a letter or digit";
/// The rules of a namespace.
const LABEL_RULE: &str = "use 1 to 63 lowercase letters, digits or '-' (no '.'), starting and \
                          ending with a letter or digit";

#[test]
fn names_are_dns_names() {
    assert_eq!(
        error(&base_with(&[(4, "  - name: Web_1")], &[])),
        format!(
            "mesh.yaml:4:11: workloads[0].name: `Web_1` is not a valid workload name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(&[(7, "    serviceAccount: a/b")], &[])),
        format!(
            "mesh.yaml:7:21: workloads[0].serviceAccount: `a/b` is not a valid service account: \
             {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(&[(7, "    serviceAccount: a..b")], &[])),
        format!(
            "mesh.yaml:7:21: workloads[0].serviceAccount: `a..b` is not a valid service account: \
             {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(&[(10, "    node: node-b.")], &[])),
        format!(
            "mesh.yaml:10:11: workloads[1].node: `node-b.` is not a valid node name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(&[(2, "  node: -a")], &[])),
        format!("mesh.yaml:2:9: agent.node: `-a` is not a valid node name: {SUBDOMAIN_RULE}")
    );
    assert_eq!(
        error(&base_with(&[(13, "  - name: web.")], &[])),
        format!(
            "mesh.yaml:13:11: services[0].name: `web.` is not a valid service name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&base_with(&[], &["        name: Http"])),
        format!(
            "mesh.yaml:19:15: services[0].ports[0].name: `Http` is not a valid port name: \
             {SUBDOMAIN_RULE}"
        )
    );
    // Subdomains: dots, and parts longer than a DNS label, as Kubernetes allows.
    let long = format!("    serviceAccount: {}.v2", "a".repeat(70));
    let config = ok(&base_with(&[(7, Box::leak(long.into_boxed_str()))], &[]));
    assert_eq!(
        config.workloads()[0].identity.service_account(),
        format!("{}.v2", "a".repeat(70))
    );
}

/// `namespace: team.a` used to be accepted here while identities refused it, so such a
/// workload could never get a certificate: a namespace is a DNS label everywhere.
#[test]
fn a_namespace_is_a_dns_label_everywhere() {
    let workload = error(&base_with(&[(7, "    namespace: team.a")], &[]));
    assert_eq!(
        workload,
        format!(
            "mesh.yaml:7:16: workloads[0].namespace: `team.a` is not a valid namespace: {LABEL_RULE}"
        )
    );
    let service = error(&base_with(
        &[(13, "  - name: web\n    namespace: team.a")],
        &[],
    ));
    assert_eq!(
        service,
        format!(
            "mesh.yaml:14:16: services[0].namespace: `team.a` is not a valid namespace: {LABEL_RULE}"
        )
    );
    let policy = error(&with_policies(&["    - {name: p, namespace: team.a}"]));
    assert_eq!(
        policy,
        format!(
            "mesh.yaml:21:28: policies.authorization[0].namespace: `team.a` is not a valid \
             namespace: {LABEL_RULE}"
        )
    );
    let rule = error(&with_policies(&[
        "    - name: p",
        "      rules: [{from: {namespaces: [demo, team.a]}}]",
    ]));
    assert_eq!(
        rule,
        format!(
            "mesh.yaml:22:42: policies.authorization[0].rules[0].from.namespaces[1]: `team.a` is \
             not a valid namespace: {LABEL_RULE}"
        )
    );
    let long = format!("    namespace: {}", "a".repeat(64));
    assert!(
        error(&base_with(&[(7, Box::leak(long.into_boxed_str()))], &[]))
            .starts_with("mesh.yaml:7:16: workloads[0].namespace: ")
    );
    // 63 is the limit; the workload's identity carries the namespace.
    let longest = format!("    namespace: {}", "a".repeat(63));
    let config = ok(&base_with(&[(7, Box::leak(longest.into_boxed_str()))], &[]));
    assert_eq!(config.workloads()[0].identity.namespace(), "a".repeat(63));
}

// ---- mTLS settings ------------------------------------------------------------------------

#[test]
fn mtls_agent_fields() {
    assert_eq!(
        error(&base_with(&[(2, "  trustDomain: Cluster.Local")], &[])),
        "mesh.yaml:2:16: agent.trustDomain: `Cluster.Local` is not a valid trust domain: use 1 \
         to 255 lowercase letters, digits, '.', '-' or '_'"
    );
    for bad in ["a/b", "a:8443", "''", "user@a", "\"a b\""] {
        let line = format!("  trustDomain: {bad}");
        let err = error(&base_with(&[(2, Box::leak(line.into_boxed_str()))], &[]));
        assert!(
            err.starts_with("mesh.yaml:2:16: agent.trustDomain: "),
            "{bad}: {err}"
        );
    }
    // SPIFFE's rule, the same as for the identities of peer certificates.
    for good in ["prod-1.example.org", "a_b", "a..b"] {
        let line = format!("  trustDomain: {good}");
        let config = ok(&base_with(&[(2, Box::leak(line.into_boxed_str()))], &[]));
        assert_eq!(config.agent.startup.trust_domain, good);
        assert_eq!(config.workloads()[0].identity.trust_domain(), good);
    }
    assert_eq!(
        error(&base_with(&[(2, "  caCertFile: ca.pem")], &[])),
        "mesh.yaml:2:15: agent.caCertFile: `ca.pem` is not an absolute path"
    );
    assert_eq!(
        error(&base_with(&[(2, "  caKeyFile: ./key.pem")], &[])),
        "mesh.yaml:2:14: agent.caKeyFile: `./key.pem` is not an absolute path"
    );
    assert_eq!(
        error(&base_with(&[(2, "  caCertFile: /etc/mesh/ca.pem")], &[])),
        "mesh.yaml:2:15: agent.caCertFile: caKeyFile is required with caCertFile (omit both for \
         a development CA)"
    );
    assert_eq!(
        error(&base_with(&[(2, "  caKeyFile: /etc/mesh/ca-key.pem")], &[])),
        "mesh.yaml:2:14: agent.caKeyFile: caCertFile is required with caKeyFile (omit both for \
         a development CA)"
    );
    assert_eq!(
        error(&base_with(&[(2, "  trustRootFiles: [/a.pem, b.pem]")], &[])),
        "mesh.yaml:2:28: agent.trustRootFiles[1]: `b.pem` is not an absolute path"
    );
    assert_eq!(
        error(&base_with(
            &[(2, "  trustRootFiles: [/a.pem, /a.pem]")],
            &[]
        )),
        "mesh.yaml:2:28: agent.trustRootFiles[1]: /a.pem is listed twice"
    );
    assert_eq!(
        error(&base_with(&[(2, "  certLifetimeMinutes: 0")], &[])),
        "mesh.yaml:2:24: agent.certLifetimeMinutes: 0 is out of range 1..=525600 (one year)"
    );
    assert_eq!(
        error(&base_with(
            &[(2, "  certLifetimeMinutes: 18446744073709551615")],
            &[]
        )),
        "mesh.yaml:2:24: agent.certLifetimeMinutes: 18446744073709551615 is out of range \
         1..=525600 (one year)"
    );
    assert_eq!(
        ok(&base_with(&[(2, "  certLifetimeMinutes: 1")], &[]))
            .agent
            .startup
            .cert_lifetime,
        Duration::from_secs(60)
    );
    assert_eq!(
        error(&base_with(&[(2, "  tunnelIdleTimeoutMs: 0")], &[])),
        "mesh.yaml:2:24: agent.tunnelIdleTimeoutMs: must be at least 1"
    );
    assert_eq!(
        error(&base_with(&[(2, "  tunnelConnectionsPerPeer: 0")], &[])),
        "mesh.yaml:2:29: agent.tunnelConnectionsPerPeer: 0 is out of range 1..=64"
    );
    assert_eq!(
        error(&base_with(&[(2, "  certLifetimeMinutes: 1h")], &[])),
        "mesh.yaml:2:24: agent.certLifetimeMinutes: invalid u64"
    );
}

/// The `agent` block of a node using the CA off the node: lines 1-6.
const REMOTE_CA: &[&str] = &[
    "agent:",                                     // 1
    "  node: node-a",                             // 2
    "  trustRootFiles: [/etc/mesh/root.pem]",     // 3
    "  ca:",                                      // 4
    "    address: mesh-ca.mesh-system.svc:15012", // 5
    "    nodeCertFile: /etc/mesh/node.crt",       // 6
    "    nodeKeyFile: /etc/mesh/node.key",        // 7
];

fn remote_ca_with(replace: &[(usize, &'static str)], append: &[&'static str]) -> Vec<&'static str> {
    let mut lines = REMOTE_CA.to_vec();
    for (line, text) in replace {
        lines[line - 1] = text;
    }
    lines.extend_from_slice(append);
    lines.push("workloads: []");
    lines
}

#[test]
fn remote_ca() {
    let config = ok(&remote_ca_with(&[], &[]));
    assert_eq!(
        config.agent.startup.ca,
        Some(RemoteCa {
            address: "mesh-ca.mesh-system.svc:15012".into(),
            credential: CaCredential::NodeCertificate {
                node_cert_file: PathBuf::from("/etc/mesh/node.crt"),
                node_key_file: PathBuf::from("/etc/mesh/node.key"),
            },
            check_interval: Duration::from_secs(30),
        })
    );
    let config = ok(&remote_ca_with(
        &[(5, "    address: \"[fd00::1]:15012\"")],
        &["    checkIntervalMs: 500"],
    ));
    let ca = config.agent.startup.ca.expect("ca");
    assert_eq!(ca.address, "[fd00::1]:15012");
    assert_eq!(ca.check_interval, Duration::from_millis(500));
    assert_eq!(
        ok(&remote_ca_with(&[(5, "    address: 10.0.0.1:15012")], &[]))
            .agent
            .startup
            .ca
            .map(|ca| ca.address),
        Some("10.0.0.1:15012".into())
    );

    // No CA key on a node that uses the CA off the node.
    assert_eq!(
        error(&remote_ca_with(
            &[],
            &[
                "  caKeyFile: /etc/mesh/ca.key",
                "  caCertFile: /etc/mesh/ca.crt"
            ]
        )),
        "mesh.yaml:8:14: agent.caKeyFile: a CA key on the node and a CA off the node (agent.ca) \
         exclude each other: remove caCertFile and caKeyFile"
    );
    assert_eq!(
        error(&remote_ca_with(&[], &["  caCertFile: /etc/mesh/ca.crt"])),
        "mesh.yaml:8:15: agent.caCertFile: with agent.ca, list the mesh's roots in \
         trustRootFiles instead"
    );
    assert_eq!(
        error(&remote_ca_with(&[(3, "  trustDomain: cluster.local")], &[])),
        "mesh.yaml:5:5: agent.ca: trustRootFiles must list the mesh's root certificates when \
         the CA is off the node"
    );
    for (bad, why) in [
        ("mesh-ca", "is not host:port"),
        ("mesh-ca:0", "has no port in 1..=65535"),
        ("mesh-ca:65536", "has no port in 1..=65535"),
        (
            ":15012",
            "is not host:port (a DNS name, an IPv4 address or [an IPv6 address])",
        ),
        (
            "Mesh_CA:15012",
            "is not host:port (a DNS name, an IPv4 address or [an IPv6 address])",
        ),
        (
            "fd00::1:15012",
            "is not host:port (a DNS name, an IPv4 address or [an IPv6 address])",
        ),
    ] {
        let line = format!("    address: \"{bad}\"");
        assert_eq!(
            error(&remote_ca_with(
                &[(5, Box::leak(line.into_boxed_str()))],
                &[]
            )),
            format!("mesh.yaml:5:14: agent.ca.address: `{bad}` {why}")
        );
    }
    assert_eq!(
        error(&remote_ca_with(&[(6, "    nodeCertFile: node.crt")], &[])),
        "mesh.yaml:6:19: agent.ca.nodeCertFile: `node.crt` is not an absolute path"
    );
    assert_eq!(
        error(&remote_ca_with(&[(7, "    nodeKeyFile: key")], &[])),
        "mesh.yaml:7:18: agent.ca.nodeKeyFile: `key` is not an absolute path"
    );
    assert_eq!(
        error(&remote_ca_with(&[], &["    checkIntervalMs: 0"])),
        "mesh.yaml:8:22: agent.ca.checkIntervalMs: must be at least 1"
    );
    assert_eq!(
        error(&remote_ca_with(&[(7, "    keyFile: /k")], &[])),
        "mesh.yaml:7:5: agent.ca.keyFile: unknown field `keyFile`, expected one of address, \
         nodeCertFile, nodeKeyFile, tokenFile, checkIntervalMs"
    );
    assert_eq!(
        error(&remote_ca_with(&[(7, "    checkIntervalMs: 1")], &[])),
        "mesh.yaml:5:5: agent.ca: nodeCertFile needs nodeKeyFile"
    );
    assert_eq!(
        error(&remote_ca_with(&[(6, "    checkIntervalMs: 1")], &[])),
        "mesh.yaml:5:5: agent.ca: nodeKeyFile needs nodeCertFile"
    );

    // Kubernetes: the projected service-account token instead of a node certificate.
    let token = ok(&remote_ca_with(
        &[
            (6, "    tokenFile: /var/run/secrets/mesh/token"),
            (7, "    checkIntervalMs: 1000"),
        ],
        &[],
    ));
    let token_ca = token.agent.startup.ca.expect("ca");
    assert_eq!(
        token_ca.credential,
        CaCredential::Token {
            token_file: PathBuf::from("/var/run/secrets/mesh/token")
        }
    );
    let dump = serde_json::to_value(&token_ca).expect("dump");
    assert_eq!(dump["tokenFile"], "/var/run/secrets/mesh/token");
    assert!(dump.get("nodeCertFile").is_none(), "{dump}");
    let dump = serde_json::to_value(ok(&remote_ca_with(&[], &[])).agent.startup.ca).expect("dump");
    assert_eq!(dump["nodeCertFile"], "/etc/mesh/node.crt");
    assert_eq!(dump["nodeKeyFile"], "/etc/mesh/node.key");
    assert_eq!(
        error(&remote_ca_with(
            &[],
            &["    tokenFile: /var/run/secrets/mesh/token"]
        )),
        "mesh.yaml:8:16: agent.ca.tokenFile: a token and a node certificate exclude each other: \
         keep tokenFile (Kubernetes) or nodeCertFile and nodeKeyFile"
    );
    assert_eq!(
        error(&remote_ca_with(
            &[(6, "    tokenFile: token"), (7, "    checkIntervalMs: 1")],
            &[]
        )),
        "mesh.yaml:6:16: agent.ca.tokenFile: `token` is not an absolute path"
    );
    assert_eq!(
        error(&[
            "agent:",
            "  node: node-a",
            "  trustRootFiles: [/etc/mesh/root.pem]",
            "  ca:",
            "    address: mesh-ca.mesh-system.svc:15012",
            "workloads: []",
        ]),
        "mesh.yaml:5:5: agent.ca: how this node authenticates to the CA: tokenFile \
         (Kubernetes) or nodeCertFile and nodeKeyFile"
    );
    // A start-up setting: a reload changing it is refused.
    let before = ok(&remote_ca_with(&[], &[]));
    let after = ok(&remote_ca_with(&[(5, "    address: other:15012")], &[]));
    assert_eq!(before.agent.startup.changes(&after.agent.startup), ["ca"]);
}

#[test]
fn spiffe_id_of_a_workload() {
    let config = ok(&base_with(
        &[
            (6, "    netns: /var/run/netns/web-1"),
            (7, "    serviceAccount: web"),
        ],
        &[],
    ));
    assert_eq!(
        config.workloads()[0].identity,
        spiffe("spiffe://cluster.local/ns/default/sa/web")
    );
    assert_eq!(
        config.workloads()[1].identity,
        spiffe("spiffe://cluster.local/ns/default/sa/default")
    );
    let other = ok(&base_with(
        &[
            (2, "  trustDomain: example.org"),
            (7, "    namespace: shop"),
        ],
        &[],
    ));
    assert_eq!(
        other.workloads()[0].identity.to_string(),
        "spiffe://example.org/ns/shop/sa/default"
    );
}

// ---- start-up versus live settings --------------------------------------------------------

/// BASE with `agent_lines` added to its `agent` block.
fn with_agent(agent_lines: &[&'static str]) -> Config {
    let mut lines = BASE[..2].to_vec();
    lines.extend_from_slice(agent_lines);
    lines.extend_from_slice(&BASE[2..]);
    ok(&lines)
}

#[test]
fn startup_changes_are_named_by_their_yaml_names() {
    let before = ok(BASE);
    let changes = |agent_lines: &[&'static str]| {
        let after = with_agent(agent_lines);
        before.agent.startup.changes(&after.agent.startup)
    };
    assert!(changes(&[]).is_empty());
    assert_eq!(changes(&["  tunnelPort: 15009"]), ["tunnelPort"]);
    assert_eq!(changes(&["  fastPath: true"]), ["fastPath"]);
    assert_eq!(
        changes(&["  tunnelConnectionsPerPeer: 1"]),
        ["tunnelConnectionsPerPeer"]
    );
    // The YAML names, also where they are not the field names; in name order.
    assert_eq!(
        changes(&[
            "  tunnelIdleTimeoutMs: 100",
            "  certLifetimeMinutes: 90",
            "  trustRootFiles: [/a.pem]",
            "  maxConnections: 10",
            "  adminAddr: 127.0.0.1:16000",
        ]),
        [
            "adminAddr",
            "certLifetimeMinutes",
            "maxConnections",
            "trustRootFiles",
            "tunnelIdleTimeoutMs"
        ]
    );
    // Live settings are not start-up changes.
    let live = with_agent(&[
        "  excludedPorts: [22]",
        "  excludedCidrs: [10.0.0.0/8]",
        "  connectTimeoutMs: 1",
        "  idleTimeoutMs: 1",
        "  bufferBytes: 1",
    ]);
    assert_ne!(live.agent.live, before.agent.live);
    assert_eq!(live.agent.startup, before.agent.startup);
    assert!(before.agent.startup.changes(&live.agent.startup).is_empty());
}

/// The names `changes` reports are real keys of the `agent` block, and none is live.
#[test]
fn startup_setting_names_are_agent_keys() {
    let serialized = serde_json::to_value(&ok(BASE).agent.startup).expect("serializes");
    let keys: Vec<String> = serialized
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(keys.len(), 21, "{keys:?}");
    for key in &keys {
        // Written without a value, a known key is just absent; an unknown one is refused.
        if let Err(e) = parse(&format!("agent:\n  {key}:\n")) {
            assert!(!e.to_string().contains("unknown field"), "{key}: {e}");
        }
        assert!(
            ![
                "excludedPorts",
                "excludedCidrs",
                "connectTimeoutMs",
                "idleTimeoutMs",
                "bufferBytes"
            ]
            .contains(&key.as_str()),
            "{key}"
        );
    }
    assert!(
        parse("agent:\n  notASetting:\n")
            .expect_err("unknown")
            .to_string()
            .contains("unknown field")
    );
}

// ---- authorization policies ---------------------------------------------------------------

/// BASE, then `policies:` and `authorization:` (lines 19 and 20), then `lines` from line 21.
fn with_policies(lines: &[&'static str]) -> Vec<&'static str> {
    let mut all = base_with(&[], &["policies:", "  authorization:"]);
    all.extend_from_slice(lines);
    all
}

#[test]
fn authorization_policies_resolve() {
    let config = ok(&with_policies(&[
        "    - name: web-allow",                                            // 21
        "      selector: {app: web}",                                       // 22
        "      action: allow",                                              // 23
        "      rules:",                                                     // 24
        "        - from:",                                                  // 25
        "            identities: [\"spiffe://cluster.local/ns/a/sa/b\"]",   // 26
        "            identityPrefixes: [\"spiffe://cluster.local/ns/c/\"]", // 27
        "            namespaces: [d, e]",                                   // 28
        "          ports: [8080, 8443]",                                    // 29
        "        - ports: [9090]",                                          // 30
        "        - {}",                                                     // 31
        "    - name: web-allow",                                            // 32
        "      namespace: other",                                           // 33
        "      action: deny",                                               // 34
        "      rules: []",                                                  // 35
        "    - name: bare",                                                 // 36
    ]));
    assert_eq!(
        config.policies.authorization,
        [
            AuthorizationPolicy {
                name: "web-allow".into(),
                namespace: "default".into(),
                selector: Some(labels(&[("app", "web")])),
                action: AuthorizationAction::Allow,
                rules: vec![
                    AuthorizationRule {
                        from: Some(RuleSource {
                            identities: vec![spiffe("spiffe://cluster.local/ns/a/sa/b")],
                            identity_prefixes: vec!["spiffe://cluster.local/ns/c/".into()],
                            namespaces: vec!["d".into(), "e".into()],
                        }),
                        ports: vec![8080, 8443],
                    },
                    AuthorizationRule {
                        from: None,
                        ports: vec![9090],
                    },
                    AuthorizationRule::default(),
                ],
            },
            AuthorizationPolicy {
                name: "web-allow".into(),
                namespace: "other".into(),
                selector: None,
                action: AuthorizationAction::Deny,
                rules: vec![],
            },
            // Defaults: namespace `default`, no selector, allow, no rule.
            AuthorizationPolicy {
                name: "bare".into(),
                namespace: "default".into(),
                selector: None,
                action: AuthorizationAction::Allow,
                rules: vec![],
            },
        ]
    );
    assert_eq!(
        config.policies.authorization[1]
            .qualified_name()
            .to_string(),
        "other/web-allow"
    );
    // Precomputed per workload: both web workloads are selected by policies 0 and 2.
    for w in config.workloads() {
        let names: Vec<String> = config
            .authorization_policies_for(w)
            .map(|p| p.qualified_name().to_string())
            .collect();
        assert_eq!(names, ["default/web-allow", "default/bare"], "{}", w.name);
    }
    // `policies: {authorization: []}` and no `policies` at all are the same.
    let empty = ok(&base_with(&[], &["policies: {authorization: []}"]));
    assert_eq!(empty.policies, Policies::default());
    assert_eq!(ok(BASE).policies, Policies::default());
}

#[test]
fn authorization_unknown_fields() {
    assert_eq!(
        error(&with_policies(&["    - name: p", "      principals: []"])),
        "mesh.yaml:22:7: policies.authorization[0].principals: unknown field `principals`, \
         expected one of name, namespace, selector, action, rules"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - to: [{ports: [80]}]"
        ])),
        "mesh.yaml:23:11: policies.authorization[0].rules[0].to: unknown field `to`, expected \
         one of from, ports"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {principals: [x]}"
        ])),
        "mesh.yaml:23:18: policies.authorization[0].rules[0].from.principals: unknown field \
         `principals`, expected one of identities, identityPrefixes, namespaces"
    );
    assert_eq!(
        error(&with_policies(&["    - namespace: demo"])),
        "mesh.yaml:21:7: policies.authorization[0]: missing field `name`"
    );
}

#[test]
fn authorization_bad_action() {
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action: audit"])),
        "mesh.yaml:22:15: policies.authorization[0].action: unknown variant `audit`, expected \
         one of allow, deny"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action: ALLOW"])),
        "mesh.yaml:22:15: policies.authorization[0].action: unknown variant `ALLOW`, expected \
         one of allow, deny"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      action:"])),
        "mesh.yaml:22:13: policies.authorization[0].action: must be allow or deny"
    );
}

#[test]
fn authorization_duplicate_name_in_namespace() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",                               // 21
            "      namespace: demo",                       // 22
            "    - {name: p, namespace: other}",           // 23
            "    - {name: p, namespace: demo, rules: []}", // 24
        ])),
        "mesh.yaml:24:14: policies.authorization[2].name: authorization policy demo/p is already \
         defined at line 21"
    );
    // The default namespace counts as written.
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "    - {name: p, namespace: default}"
        ])),
        "mesh.yaml:22:14: policies.authorization[1].name: authorization policy default/p is \
         already defined at line 21"
    );
}

#[test]
fn authorization_names_and_selector() {
    assert_eq!(
        error(&with_policies(&["    - name: Allow_All"])),
        format!(
            "mesh.yaml:21:13: policies.authorization[0].name: `Allow_All` is not a valid policy \
             name: {SUBDOMAIN_RULE}"
        )
    );
    assert_eq!(
        error(&with_policies(&["    - {name: p, namespace: Demo}"])),
        format!(
            "mesh.yaml:21:28: policies.authorization[0].namespace: `Demo` is not a valid \
             namespace: {LABEL_RULE}"
        )
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      selector: {}"])),
        "mesh.yaml:22:17: policies.authorization[0].selector: must not be empty (omit it to \
         apply the policy to every workload of the namespace)"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      selector:"])),
        "mesh.yaml:22:15: policies.authorization[0].selector: must not be empty (omit it to \
         apply the policy to every workload of the namespace)"
    );
}

#[test]
fn authorization_identities_must_be_spiffe() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "            identities: [\"spiffe://cluster.local/ns/a/sa/b\", cluster.local/ns/a/sa/c]",
        ])),
        "mesh.yaml:24:62: policies.authorization[0].rules[0].from.identities[1]: identity \
         \"cluster.local/ns/a/sa/c\" does not start with \"spiffe://\""
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identityPrefixes: [\"SPIFFE://cluster.local/\"]}",
        ])),
        "mesh.yaml:23:37: policies.authorization[0].rules[0].from.identityPrefixes[0]: \
         `SPIFFE://cluster.local/` does not start with spiffe://"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local\"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local\": the path must be /ns/<namespace>/sa/<serviceAccount> (use \
         identityPrefixes for a prefix)"
    );
    // An identity is parsed as those of peer certificates are: by the same name rules.
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local/ns/team.a/sa/b\"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local/ns/team.a/sa/b\": bad namespace: only lower-case letters, \
         digits and '-' are allowed"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identities: [\"spiffe://cluster.local/ns/a/sa/b \"]}",
        ])),
        "mesh.yaml:23:31: policies.authorization[0].rules[0].from.identities[0]: identity \
         \"spiffe://cluster.local/ns/a/sa/b \": bad service account: only lower-case letters, \
         digits, '-' and '.' are allowed"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {identityPrefixes: [\"spiffe://cluster.local/ns/a \"]}",
        ])),
        "mesh.yaml:23:37: policies.authorization[0].rules[0].from.identityPrefixes[0]: \
         `spiffe://cluster.local/ns/a ` contains a blank or control character"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from: {namespaces: [demo, Prod]}",
        ])),
        format!(
            "mesh.yaml:23:37: policies.authorization[0].rules[0].from.namespaces[1]: `Prod` is \
             not a valid namespace: {LABEL_RULE}"
        )
    );
    // A bare `spiffe://` prefix (any authenticated source) is fine.
    ok(&with_policies(&[
        "    - name: p",
        "      rules: [{from: {identityPrefixes: [\"spiffe://\"]}}]",
    ]));
}

#[test]
fn authorization_ports() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: [80, 0]}]"
        ])),
        "mesh.yaml:22:28: policies.authorization[0].rules[0].ports[1]: port 0 is out of range \
         1..=65535"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - ports: [65535]",
            "        - ports: [65536]",
        ])),
        "mesh.yaml:24:19: policies.authorization[0].rules[1].ports[0]: port 65536 is out of \
         range 1..=65535"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: [80, 80]}]"
        ])),
        "mesh.yaml:22:28: policies.authorization[0].rules[0].ports[1]: port 80 is listed twice"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{ports: []}]"
        ])),
        "mesh.yaml:22:23: policies.authorization[0].rules[0].ports: must list at least one port \
         (omit `ports` for any)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - ports:"
        ])),
        "mesh.yaml:23:16: policies.authorization[0].rules[0].ports: must list at least one port \
         (omit `ports` for any)"
    );
}

#[test]
fn authorization_empty_from_and_lists() {
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{from: {}}]"
        ])),
        "mesh.yaml:22:22: policies.authorization[0].rules[0].from: must set at least one of \
         identities, identityPrefixes, namespaces (omit `from` to match any source)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "          ports: [80]",
        ])),
        "mesh.yaml:23:15: policies.authorization[0].rules[0].from: must set at least one of \
         identities, identityPrefixes, namespaces (omit `from` to match any source)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules: [{from: {identities: []}}]"
        ])),
        "mesh.yaml:22:35: policies.authorization[0].rules[0].from.identities: must list at \
         least one identity (omit `identities` for any)"
    );
    assert_eq!(
        error(&with_policies(&[
            "    - name: p",
            "      rules:",
            "        - from:",
            "            namespaces:",
        ])),
        "mesh.yaml:24:23: policies.authorization[0].rules[0].from.namespaces: must list at \
         least one namespace (omit `namespaces` for any)"
    );
    assert_eq!(
        error(&with_policies(&["    - name: p", "      rules:"])),
        "mesh.yaml:22:12: policies.authorization[0].rules: must be a list of rules"
    );
}

mod rate_limits;
mod sources;
mod traffic_policy;
