//! Refused documents: each parse and validation error with its exact
//! `file:line:column: field: message`.

use super::*;

#[test]
fn unknown_fields_are_refused_with_position_and_path() {
    assert_eq!(
        error(&base_with(&[], &["    lb: roundRobin"])),
        "mesh.yaml:19:5: services[0].lb: unknown field `lb`, expected one of name, namespace, \
         vips, ports, endpoints, trafficPolicy"
    );
    assert_eq!(
        agent_error("  nodeName: node-a"),
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
        agent_error("  outboundPort: 70000"),
        "mesh.yaml:2:17: agent.outboundPort: port 70000 is out of range 1..=65535"
    );
    assert_eq!(
        agent_error("  excludedPorts: [22, 0]"),
        "mesh.yaml:2:23: agent.excludedPorts[1]: port 0 is out of range 1..=65535"
    );
}

#[test]
fn excluded_cidrs_are_checked() {
    assert_eq!(
        agent_error("  excludedCidrs: [10.0.0.0/33]"),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: prefix \"33\" is not in 0..=32"
    );
    assert_eq!(
        agent_error("  excludedCidrs: [10.0.0.1/8]"),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: 10.0.0.1/8 has host bits set (the network is not written as meant)"
    );
    assert_eq!(
        agent_error("  excludedCidrs: [10.0.0.0]"),
        "mesh.yaml:2:19: agent.excludedCidrs[0]: \"10.0.0.0\" is not a CIDR (address/prefix)"
    );
    assert_eq!(
        agent_error("  excludedCidrs: [192.168.0.0/16, 192.168.0.0/16]"),
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
        agent_error("  inboundPort: 15001"),
        "mesh.yaml:2:16: agent.inboundPort: port 15001 is already used by agent.outboundPort"
    );
    assert_eq!(
        agent_error("  adminAddr: 127.0.0.1:15008"),
        "mesh.yaml:2:14: agent.adminAddr: port 15008 is already used by agent.tunnelPort"
    );
    // The explicit one is named even when it comes first.
    assert_eq!(
        agent_error("  outboundPort: 15006"),
        "mesh.yaml:2:17: agent.outboundPort: port 15006 is already used by agent.inboundPort"
    );
}

#[test]
fn admin_addr_must_be_loopback() {
    assert_eq!(
        agent_error("  adminAddr: 0.0.0.0:15000"),
        "mesh.yaml:2:14: agent.adminAddr: 0.0.0.0 is not a loopback address: the admin API must \
         not be reachable from the network"
    );
    assert_eq!(
        agent_error("  adminAddr: 10.0.0.1:15000"),
        "mesh.yaml:2:14: agent.adminAddr: 10.0.0.1 is not a loopback address: the admin API \
         must not be reachable from the network"
    );
    assert_eq!(
        agent_error("  adminAddr: localhost:15000"),
        "mesh.yaml:2:14: agent.adminAddr: `localhost:15000` is not an IP:port address"
    );
    assert!(ok(BASE).agent.startup.admin_addr.ip().is_loopback());
    let v6 = ok(&base_with(&[(2, "  adminAddr: '[::1]:15000'")], &[]));
    assert_eq!(v6.agent.startup.admin_addr, sock("[::1]:15000"));
}

#[test]
fn proxy_mark() {
    assert_eq!(
        agent_error("  proxyMark: 0"),
        "mesh.yaml:2:14: agent.proxyMark: must be non-zero"
    );
    assert_eq!(
        agent_error("  proxyMark: 0x100000000"),
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
        agent_error("  transparentMark: 0"),
        "mesh.yaml:2:20: agent.transparentMark: must be non-zero"
    );
    assert_eq!(
        agent_error("  transparentMark: 0x539"),
        "mesh.yaml:2:20: agent.transparentMark: must differ from agent.proxyMark"
    );
    assert_eq!(
        agent_error("  proxyMark: 0x40000539"),
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
            agent_error(line),
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
        agent_error("  bpfName: ../etc"),
        "mesh.yaml:2:12: agent.bpfName: `../etc` is not a valid pin directory name: use 1 to 64 \
         letters, digits, '-', '_' or '.'"
    );
    assert_eq!(
        agent_error("  connectTimeoutMs: 0"),
        "mesh.yaml:2:21: agent.connectTimeoutMs: must be at least 1"
    );
    assert_eq!(
        agent_error("  bufferBytes: 0"),
        "mesh.yaml:2:16: agent.bufferBytes: 0 is out of range 1..=16777216"
    );
    assert_eq!(
        agent_error("  splice: sometimes"),
        "mesh.yaml:2:11: agent.splice: invalid boolean (true or false expected)"
    );
    assert_eq!(
        agent_error("  excludedPorts: [22, 22]"),
        "mesh.yaml:2:23: agent.excludedPorts[1]: port 22 is listed twice"
    );
    assert_eq!(
        agent_error("  cgroup: sys/fs/cgroup"),
        "mesh.yaml:2:11: agent.cgroup: `sys/fs/cgroup` is not an absolute path"
    );
}

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
        agent_error("  node: -a"),
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
