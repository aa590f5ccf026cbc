//! Start-up settings against live ones: a reload that changes a start-up setting names it
//! by its YAML key.

use super::*;

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
