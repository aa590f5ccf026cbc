//! The command-line pieces the Kubernetes DaemonSet relies on, run as the kubelet runs them:
//! `run --node` / `MESH_NODE_NAME` (the node name from the downward API).

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `run` checks `--node` before it reads the config or touches anything, so a bad name fails
/// here without root; the same check applies to the variable the DaemonSet sets.
#[test]
fn a_bad_node_name_is_refused_from_the_flag_and_from_the_environment() {
    let flag = agent()
        .args(["run", "--config", "/nonexistent.yaml", "--node", "Node_A"])
        .env_remove("MESH_NODE_NAME")
        .output()
        .expect("run mesh-agent");
    let env = agent()
        .args(["run", "--config", "/nonexistent.yaml"])
        .env("MESH_NODE_NAME", "Node_A")
        .output()
        .expect("run mesh-agent");
    for out in [flag, env] {
        assert_eq!(out.status.code(), Some(2), "a usage error");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("invalid value 'Node_A' for '--node <NAME>': not a valid node name"),
            "{stderr}"
        );
    }
}

/// A good name gets past the command line: the run then fails on the missing file, which it
/// reads before anything needs privilege.
#[test]
fn a_good_node_name_from_the_environment_is_accepted() {
    let out = agent()
        .args(["run", "--config", "/nonexistent.yaml"])
        .env("MESH_NODE_NAME", "ip-10-0-1-17.eu-west-1.compute.internal")
        .output()
        .expect("run mesh-agent");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("/nonexistent.yaml: cannot read configuration"),
        "{stderr}"
    );
}
