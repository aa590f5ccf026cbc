//! `mesh-agent config check FILE` as an operator runs it: the built binary, unprivileged, on
//! the demo file, on an invalid file and on a missing one.

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

#[test]
fn the_demo_file_is_ok() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/local.yaml");
    let out = check(&file);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        stdout,
        format!(
            "{}: ok (3 workloads, 1 service, 0 authorization policies)\n",
            file.display()
        )
    );
    assert_eq!(stderr, "");
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
