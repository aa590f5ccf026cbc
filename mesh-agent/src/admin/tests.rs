//! The human output on fixed reports: what each part says, and that no line is wider than
//! 80 characters however long the names; and the connections query.

use super::{
    limit,
    render::{self, WIDTH},
    status::{
        CertificateStatus, ConfigStatus, ConnectionCounts, ConnectionStatus, ConnectionsReport,
        ProgramStatus, StatusReport, TunnelStatus,
    },
};
use crate::{
    balance::{CircuitStatus, EndpointState, EndpointStatus, ServiceStatus},
    pods::{FailedPod, PodStatus},
    proxy::Direction,
};

const NOW: u64 = 1_800_000_000;
const LONG_NS: &str = "a-namespace-whose-name-is-rather-long-indeed";
const LONG_SA: &str = "a-service-account-with-a-name-that-goes-on-and-on";

fn long_identity(sa: &str) -> String {
    format!("spiffe://cluster.example.internal/ns/{LONG_NS}/sa/{sa}")
}

fn report() -> StatusReport {
    let pod = |name: &str, captured| PodStatus {
        workload: format!("{LONG_NS}/{name}"),
        netns: format!("/var/run/netns/{name}"),
        netns_cookie: 4_294_967_297,
        captured,
        skipped: 2,
        no_listener: 1,
        fast_path: 0,
        client_ip_refused: None,
        client_ip_fallbacks: 0,
    };
    let mut report = StatusReport {
        node: "node-a".into(),
        cgroup: "/sys/fs/cgroup/kubepods.slice".into(),
        config: ConfigStatus {
            file: format!("/etc/mesh-agent/{LONG_NS}/{LONG_SA}/config.yaml"),
            applied: 3,
            rejected: 1,
            last_error: Some(format!(
                "/etc/mesh-agent/config.yaml:12:9: workloads[3].ips[0]: \"10.0.0.999\" is not an IP address ({LONG_SA})"
            )),
            generation: 4,
            since: NOW - 3600,
        },
        programs: vec![ProgramStatus {
            name: "mesh_connect4".into(),
            pin: "/sys/fs/bpf/mesh/v1/links/mesh_connect4".into(),
        }],
        workloads: vec![pod("frontend-7c9f8d6b5-x2x9z", 10), pod("b", 5)],
        failed_pods: vec![FailedPod {
            workload: format!("{LONG_NS}/broken-pod-with-a-long-generated-name"),
            reason: format!(
                "opening /var/run/netns/{LONG_SA}-{LONG_NS}: No such file or directory (os error 2)"
            ),
            since: NOW - 60,
        }],
        certificates: vec![
            CertificateStatus {
                identity: long_identity(LONG_SA),
                serial: "3f".repeat(40),
                not_before: NOW - 600,
                not_after: NOW + 7200,
            },
            CertificateStatus {
                identity: "spiffe://cluster.local/ns/test/sa/b".into(),
                serial: "0a".into(),
                not_before: NOW - 600,
                not_after: NOW + 120,
            },
        ],
        tunnels: TunnelStatus {
            connections: 2,
            streams: 3,
        },
        connection_counts: ConnectionCounts {
            total: 5,
            outbound: 3,
            inbound: 1,
            tunnel: 1,
            through_tunnels: 3,
        },
        services: vec![ServiceStatus {
            service: format!("{LONG_NS}/checkout-service-with-a-long-name"),
            port: 8443,
            algorithm: "maglev(sourceIdentity)".into(),
            circuit: CircuitStatus::default(),
            retry_budget: Default::default(),
            endpoints: vec![EndpointStatus {
                address: "[fd00:1234:5678:9abc:def0:1234:5678:9abc]:8443".into(),
                node: Some("node-b".into()),
                zone: None,
                subsets: vec!["v1-canary".into(), "v2-stable".into()],
                weight: 1,
                state: EndpointState::Ejected { until: NOW + 30 },
                active: 4,
                pending: 0,
                latency_ms: Some(1.25),
                ejections: 1,
            }],
        }],
        ..StatusReport::default()
    };
    report.health = report.assess(NOW);
    report
}

fn connections() -> ConnectionsReport {
    ConnectionsReport {
        counts: ConnectionCounts {
            total: 7,
            outbound: 6,
            inbound: 1,
            tunnel: 0,
            through_tunnels: 1,
        },
        connections: vec![ConnectionStatus {
            source: Some(long_identity(LONG_SA)),
            destination: format!("{LONG_NS}/server-pod-with-a-long-name"),
            port: 8080,
            direction: Some(Direction::Outbound),
            pod: format!("{LONG_NS}/client"),
            source_workload: Some(format!("{LONG_NS}/client")),
            client: Some("127.0.0.1:40312".parse().expect("address")),
            original_destination: Some("[fd00::10:96:0:10]:80".parse().expect("address")),
            upstream: Some("[fd00:1234:5678:9abc::3]:8080".parse().expect("address")),
            destination_identity: Some(long_identity("server")),
            service: Some(format!("{LONG_NS}/server")),
            tunneled: true,
            started_at: NOW - 65,
            age_ms: 65_000,
            bytes_from_client: 5 * 1024 * 1024,
            bytes_to_client: 812,
        }],
        omitted: 6,
    }
}

fn assert_fits(text: &str) {
    for line in text.lines() {
        assert!(
            line.chars().count() <= WIDTH,
            "{} characters: {line:?}\n{text}",
            line.chars().count()
        );
    }
}

#[test]
fn the_first_screen_starts_with_the_verdict_and_fits_80_columns() {
    let text = render::overview(&report(), NOW);
    assert_fits(&text);
    let first = text.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        "degraded: 1 pod failed to enroll; last config rejected; 1 certificate expired o…"
    );
    for expected in [
        "1 program attached; captured 15, skipped 4, no listener 2",
        "2 enrolled, 1 failed",
        "generation 4 since",
        "last rejected: /etc/mesh-agent/config.yaml:12:9: workloads[3].ips[0]",
        "2 held, soonest expiry in 2m00s",
        "2 up to other nodes, 3 streams",
        "5 open: 3 outbound, 1 inbound, 1 tunnel",
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }
    // The rejection wraps: nothing of it is lost.
    assert!(text.contains(&format!("({LONG_SA})")), "{text}");
}

#[test]
fn a_healthy_node_says_so_in_one_word() {
    let mut report = report();
    report.failed_pods.clear();
    report.config.last_error = None;
    report.certificates.truncate(1);
    report.health = report.assess(NOW);
    let text = render::overview(&report, NOW);
    assert_eq!(text.lines().next(), Some("healthy"));
}

#[test]
fn each_view_fits_80_columns_and_elides_long_names_in_the_middle() {
    let report = report();
    let pods = render::pods(&report);
    assert_fits(&pods);
    assert!(pods.contains("FAILED TO ENROLL"), "{pods}");
    assert!(!pods.contains("CLIENT IP NOT KEPT"), "{pods}");
    let mut refused = report.clone();
    refused.workloads[0].client_ip_refused =
        Some("routing table 1337 already holds another IPv4 default route".into());
    refused.workloads[0].client_ip_fallbacks = 3;
    let pods = render::pods(&refused);
    assert_fits(&pods);
    assert!(pods.contains("CLIENT IP NOT KEPT"), "{pods}");
    assert!(pods.contains("(3 connections)"), "{pods}");
    assert!(pods.contains("holds another IPv4 default route"), "{pods}");
    assert!(
        pods.contains("No such file or directory (os error 2)"),
        "{pods}"
    );
    assert!(pods.contains(&format!("{}…", &LONG_NS[..14])), "{pods}");

    let services = render::services(&report, NOW);
    assert_fits(&services);
    assert!(services.contains("ejected 30s"), "{services}");
    assert!(services.contains("service a-namespace"), "{services}");

    let certificates = render::certificates(&report, NOW);
    assert_fits(&certificates);
    // Soonest expiry first, identity on a line of its own.
    let lines: Vec<&str> = certificates.lines().collect();
    assert_eq!(lines.first(), Some(&"spiffe://cluster.local/ns/test/sa/b"));
    assert!(certificates.contains("expires in 2m00s"), "{certificates}");

    let connections = render::connections(&connections());
    assert_fits(&connections);
    for expected in [
        "out ",
        "1m05s",
        "5.0M",
        "812B",
        "svc ",
        "mTLS",
        "... and 6 more",
    ] {
        assert!(
            connections.contains(expected),
            "{expected:?} in\n{connections}"
        );
    }
    // Both identities are there, each on its own line when together they are too wide.
    let lines: Vec<&str> = connections.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("    spiffe://cluster.example.internal/n")
                && l.ends_with("-with-a-name-that-goes-on-and-on")),
        "{connections}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("      -> spiffe://") && l.ends_with("/sa/server")),
        "{connections}"
    );
}

#[test]
fn the_connections_limit_defaults_and_must_be_a_number() {
    assert_eq!(limit(None), Some(super::status::STATUS_CONNECTIONS));
    assert_eq!(limit(Some("limit=7")), Some(7));
    assert_eq!(limit(Some("x=1&limit=3")), Some(3));
    assert_eq!(limit(Some("limit=many")), None);
}

#[test]
fn fitting_keeps_both_ends() {
    assert_eq!(render::fit("short", 10), "short");
    assert_eq!(render::fit("abcdefghij", 5), "ab…ij");
    assert_eq!(render::fit("ééééééé", 4).chars().count(), 4);
    assert_eq!(render::duration(59), "59s");
    assert_eq!(render::duration(3 * 86_400 + 7200), "3d02h");
    assert_eq!(render::bytes(1536), "1.5K");
    assert_eq!(render::utc(1_800_000_000), "2027-01-15 08:00:00Z");
}
