//! The command-line pieces the Kubernetes DaemonSet relies on, run as the kubelet runs them:
//! `mesh-agent probe live|ready` (the exec probes) against a small HTTP server standing in for
//! the admin API, and `run --node` / `MESH_NODE_NAME` (the node name from the downward API).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Serves one connection: records the request line and answers with `status` (or, with
/// `None`, holds the connection open without answering for a few seconds).
fn admin_api(status: Option<&'static str>) -> (SocketAddr, mpsc::Receiver<String>) {
    admin_api_saying(status, "ok\n".to_owned())
}

/// As [`admin_api`], answering `body`.
fn admin_api_saying(
    status: Option<&'static str>,
    body: String,
) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut request_line = String::new();
        reader.read_line(&mut request_line).expect("read request");
        let _ = tx.send(request_line.trim_end().to_owned());
        // The rest of the head.
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
            line.clear();
        }
        let mut stream = stream;
        match status {
            Some(status) => {
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
            None => thread::sleep(Duration::from_secs(5)),
        }
    });
    (addr, rx)
}

fn probe(check: &str, admin: SocketAddr, timeout_ms: u64) -> Output {
    probe_with(check, admin, &["--timeout-ms", &timeout_ms.to_string()])
}

fn probe_with(check: &str, admin: SocketAddr, extra: &[&str]) -> Output {
    agent()
        .args(["probe", check, "--admin", &admin.to_string()])
        .args(extra)
        .output()
        .expect("run mesh-agent probe")
}

#[test]
fn ready_probe_asks_ready_and_passes_on_200() {
    let (addr, requests) = admin_api(Some("200 OK"));
    let out = probe("ready", addr, 1000);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "/ready: ok\n");
    assert_eq!(requests.recv().expect("a request"), "GET /ready HTTP/1.1");
}

/// During a rolling update two agents share the admin address: with `--agent-pid` the probe
/// passes only when the answer comes from that process (the start time `/ready` carries).
#[test]
fn ready_probe_with_an_agent_pid_passes_only_for_that_process() {
    let own = std::fs::read_to_string("/proc/self/stat").expect("own stat");
    let started = own
        .rsplit_once(')')
        .and_then(|(_, after)| after.split_whitespace().nth(19).map(str::to_owned))
        .expect("start time");
    let body = format!("ok started={started}\n");
    let pid = std::process::id().to_string();
    let (addr, _requests) = admin_api_saying(Some("200 OK"), body.clone());
    let out = probe_with("ready", addr, &["--agent-pid", &pid]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout), format!("/ready: ok (PID {pid})\n"));

    // The same answer is not PID 1's (init started long before this test).
    let (addr, _requests) = admin_api_saying(Some("200 OK"), body);
    let out = probe_with("ready", addr, &["--agent-pid", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).starts_with("/ready: failed: another agent answered, not PID 1"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn live_probe_asks_healthz() {
    let (addr, requests) = admin_api(Some("200 OK"));
    let out = probe("live", addr, 1000);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "/healthz: ok\n");
    assert_eq!(requests.recv().expect("a request"), "GET /healthz HTTP/1.1");
}

#[test]
fn an_error_status_fails_the_probe() {
    let (addr, _requests) = admin_api(Some("503 Service Unavailable"));
    let out = probe("ready", addr, 1000);
    assert_eq!(out.status.code(), Some(1));
    let line = text(&out.stdout);
    assert!(
        line.starts_with(&format!(
            "/ready: failed: the agent's admin API at {addr} answered 503 Service Unavailable"
        )),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
}

#[test]
fn no_agent_listening_fails_the_probe() {
    // A port that was free a moment ago: nothing listens there now.
    let addr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let out = probe("live", addr, 1000);
    assert_eq!(out.status.code(), Some(1));
    let line = text(&out.stdout);
    assert!(line.starts_with("/healthz: failed: "), "{line}");
    assert!(line.contains(&addr.to_string()), "{line}");
}

#[test]
fn an_agent_that_does_not_answer_fails_the_probe_within_its_timeout() {
    let (addr, _requests) = admin_api(None);
    let started = Instant::now();
    let out = probe("live", addr, 300);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        format!("/healthz: failed: no answer within 300 ms (admin API {addr})\n")
    );
    assert!(took < Duration::from_secs(3), "the probe took {took:?}");
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
