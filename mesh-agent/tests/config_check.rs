//! `mesh-agent config check FILE` as an operator runs it: the built binary, unprivileged, on
//! the example files, on an invalid file and on a missing one.

use std::path::Path;
use std::process::{Command, Output};

fn check(file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["config", "check"])
        .arg(file)
        .output()
        .expect("run mesh-agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Checks an example file and returns what it printed after `FILE: `.
#[track_caller]
fn example_is_ok(name: &str) -> String {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(name);
    let out = check(&file);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(stderr, "");
    stdout
        .strip_prefix(&format!("{}: ", file.display()))
        .unwrap_or_else(|| panic!("{stdout}"))
        .to_owned()
}

#[test]
fn the_demo_file_is_ok() {
    assert_eq!(
        example_is_ok("local.yaml"),
        "ok (3 workloads, 1 service, 0 authorization policies, 0 rate limits, 0 egress limits)\n"
    );
}

#[test]
fn the_traffic_policy_example_is_ok() {
    assert_eq!(
        example_is_ok("traffic.yaml"),
        "ok (4 workloads, 1 service, 0 authorization policies, 1 rate limit, 1 egress limit)\n"
    );
}

#[test]
fn an_invalid_file_is_refused_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mesh.yaml");
    std::fs::write(
        &file,
        "agent:\n  node: node-a\nworkloads:\n  - name: w\n    namespace: team.a\n    ips: [10.1.0.2]\n    node: node-b\n",
    )
    .expect("write");
    let out = check(&file);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(stdout, "");
    assert!(
        stderr.starts_with(&format!(
            "{}:5:16: workloads[0].namespace: `team.a` is not a valid namespace",
            file.display()
        )),
        "{stderr}"
    );
}

#[test]
fn an_invalid_traffic_policy_is_refused_with_its_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("mesh.yaml");
    let example = include_str!("../../deploy/examples/traffic.yaml");
    let broken = example.replacen("weight: 10}", "weight: 10001}", 1);
    assert_ne!(broken, example, "the example has a canary weighing 10");
    std::fs::write(&file, &broken).expect("write");
    let line = 1 + broken
        .lines()
        .position(|l| l.contains("weight: 10001"))
        .expect("line");
    let out = check(&file);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("{}:{line}:", file.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            ": services[0].trafficPolicy.subsets[1].weight: 10001 is out of range 0..=10000"
        ),
        "{stderr}"
    );
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("absent.yaml");
    let out = check(&file);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!("{}: cannot read configuration: ", file.display())),
        "{stderr}"
    );
}
