//! What other sources use of the config: one policy object validated alone, and a file that
//! holds the agent block only (as `run` and `config check` read it).

use crate::config::{
    AuthorizationAction, Config, ConfigError, PolicyKind, PolicyObject, Scope, check, policy_object,
};

#[test]
fn a_policy_object_is_validated_as_the_file_entry_and_named_by_its_kind_and_name() {
    let spec = r#"{"selector": {"app": "echo"}, "rules": [{"ports": [8080]}]}"#;
    let object = policy_object(PolicyKind::AuthorizationPolicy, "demo", "echo", spec)
        .unwrap_or_else(|e| panic!("{e}"));
    let PolicyObject::Authorization(policy) = object else {
        panic!("not an authorization policy: {object:?}");
    };
    assert_eq!(
        (policy.namespace.as_str(), policy.name.as_str()),
        ("demo", "echo")
    );
    assert_eq!(policy.action, AuthorizationAction::Allow);
    assert_eq!(policy.rules[0].ports, vec![8080]);

    let bad = r#"{"rules": [{"ports": [70000]}]}"#;
    let err = policy_object(
        PolicyKind::AuthorizationPolicy,
        "demo",
        "echo-from-client",
        bad,
    )
    .expect_err("port out of range");
    assert!(
        err.to_string()
            .starts_with("AuthorizationPolicy demo/echo-from-client: spec.rules[0].ports[0]: "),
        "{err}"
    );
    assert_eq!(err.position(), None);

    let unknown = r#"{"selector": {"app": "echo"}, "rulez": []}"#;
    let err = policy_object(PolicyKind::AuthorizationPolicy, "demo", "x", unknown)
        .expect_err("unknown field");
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    assert!(err.to_string().contains("rulez"), "{err}");

    let named = r#"{"name": "other", "connections": {"perSecond": 1}}"#;
    let err = policy_object(PolicyKind::RateLimit, "demo", "x", named).expect_err("name in spec");
    assert_eq!(err.path(), "spec.name");
}

#[test]
fn a_traffic_policy_object_names_its_service() {
    let spec = "service: echo\nloadBalancer: {algorithm: random}\n";
    let object = policy_object(PolicyKind::TrafficPolicy, "demo", "echo", spec)
        .unwrap_or_else(|e| panic!("{e}"));
    let PolicyObject::Traffic { service, policy } = object else {
        panic!("not a traffic policy: {object:?}");
    };
    assert_eq!(service, "echo");
    assert_ne!(*policy, Default::default());

    let err =
        policy_object(PolicyKind::TrafficPolicy, "demo", "echo", "{}").expect_err("no service");
    assert_eq!(err.path(), "spec.service");
    let err = policy_object(
        PolicyKind::TrafficPolicy,
        "demo",
        "echo",
        r#"{"service": "echo", "connectTimeoutMs": 0}"#,
    )
    .expect_err("zero timeout");
    assert_eq!(err.path(), "spec.connectTimeoutMs", "{err}");
}

#[test]
fn limits_as_objects() {
    let object = policy_object(
        PolicyKind::EgressLimit,
        "demo",
        "client-egress",
        "{connections: {perSecond: 50, burst: 10}, onLimit: {action: wait, maxWaitMs: 200}}",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(object, PolicyObject::EgressLimit(ref e) if e.name == "client-egress"));
    let err = policy_object(PolicyKind::RateLimit, "demo", "empty", "{}").expect_err("no limit");
    assert!(
        err.to_string()
            .contains("must set at least one of connections, bandwidth, perSource"),
        "{err}"
    );
}

#[test]
fn with_the_kubernetes_source_the_file_holds_the_agent_block_only() {
    let agent = "agent: {node: n1, connectTimeoutMs: 100}\n";
    let config = Config::from_yaml_str_scoped(agent, "mesh.yaml", None, Scope::AgentOnly)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.services().is_empty());
    for (text, path) in [
        (
            "agent: {node: n1}\nservices:\n  - name: a\n    vips: [10.96.0.1]\n    ports: [{port: 80}]\n    endpoints: {addresses: [10.0.0.1]}\n",
            "mesh.yaml:3:5: services[0]: ",
        ),
        (
            "agent: {node: n1}\npolicies:\n  authorization:\n    - name: a\n",
            "mesh.yaml:4:7: policies.authorization[0]: ",
        ),
    ] {
        let err = Config::from_yaml_str_scoped(text, "mesh.yaml", None, Scope::AgentOnly)
            .expect_err("refused");
        assert!(err.to_string().starts_with(path), "{err}");
        assert!(err.to_string().contains("Kubernetes API"), "{err}");
    }
    // What is refused is the block, not the file: the file source takes it.
    let services = "agent: {node: n1}\nservices:\n  - name: a\n    vips: [10.96.0.1]\n    ports: [{port: 80}]\n    endpoints: {addresses: [10.0.0.1]}\n";
    assert!(Config::from_yaml_str_scoped(services, "mesh.yaml", None, Scope::Everything).is_ok());
}

#[test]
fn config_check_takes_the_source_scope() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let agent = dir.path().join("agent.yaml");
    std::fs::write(&agent, "agent: {node: n1}\n").unwrap_or_else(|e| panic!("{e}"));
    let summary = check(&agent, Scope::AgentOnly).unwrap_or_else(|e| panic!("{e}"));
    assert!(summary.ends_with(": ok (agent block only)"), "{summary}");
    let summary = check(&agent, Scope::Everything).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        summary.contains(": ok (0 workloads, 0 services"),
        "{summary}"
    );

    // A ConfigMap still listing workloads is caught before a DaemonSet runs it.
    let full = dir.path().join("full.yaml");
    std::fs::write(
        &full,
        "agent: {node: n1}\nworkloads:\n  - name: w\n    namespace: demo\n    ips: [10.0.0.5]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = check(&full, Scope::AgentOnly).expect_err("refused");
    assert!(err.to_string().contains("workloads[0]"), "{err}");
}
