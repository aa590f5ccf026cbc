//! The mTLS settings of the agent block: the node's own CA or the CA off the node, its
//! trust roots and credentials, and workloads' SPIFFE identities.

use super::*;

#[test]
fn mtls_agent_fields() {
    assert_eq!(
        agent_error("  trustDomain: Cluster.Local"),
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
        agent_error("  caCertFile: ca.pem"),
        "mesh.yaml:2:15: agent.caCertFile: `ca.pem` is not an absolute path"
    );
    assert_eq!(
        agent_error("  caKeyFile: ./key.pem"),
        "mesh.yaml:2:14: agent.caKeyFile: `./key.pem` is not an absolute path"
    );
    assert_eq!(
        agent_error("  caCertFile: /etc/mesh/ca.pem"),
        "mesh.yaml:2:15: agent.caCertFile: caKeyFile is required with caCertFile (omit both for \
         a development CA)"
    );
    assert_eq!(
        agent_error("  caKeyFile: /etc/mesh/ca-key.pem"),
        "mesh.yaml:2:14: agent.caKeyFile: caCertFile is required with caKeyFile (omit both for \
         a development CA)"
    );
    assert_eq!(
        agent_error("  trustRootFiles: [/a.pem, b.pem]"),
        "mesh.yaml:2:28: agent.trustRootFiles[1]: `b.pem` is not an absolute path"
    );
    assert_eq!(
        agent_error("  trustRootFiles: [/a.pem, /a.pem]"),
        "mesh.yaml:2:28: agent.trustRootFiles[1]: /a.pem is listed twice"
    );
    assert_eq!(
        agent_error("  certLifetimeMinutes: 0"),
        "mesh.yaml:2:24: agent.certLifetimeMinutes: 0 is out of range 1..=525600 (one year)"
    );
    assert_eq!(
        agent_error("  certLifetimeMinutes: 18446744073709551615"),
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
        agent_error("  tunnelIdleTimeoutMs: 0"),
        "mesh.yaml:2:24: agent.tunnelIdleTimeoutMs: must be at least 1"
    );
    assert_eq!(
        agent_error("  tunnelConnectionsPerPeer: 0"),
        "mesh.yaml:2:29: agent.tunnelConnectionsPerPeer: 0 is out of range 1..=64"
    );
    assert_eq!(
        agent_error("  certLifetimeMinutes: 1h"),
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
    let mut lines = edited(REMOTE_CA, replace, append);
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
