//! `mesh-agent probe live|ready`: one request to the admin API with a deadline, for a
//! Kubernetes exec probe (run inside the agent's pod, which shares the node's network, so it
//! reaches the loopback-only admin API where a kubelet's HTTP probe would not).

use std::{net::SocketAddr, time::Duration};

use super::client::fetch;

/// GETs `path` from the admin API at `admin` within `timeout`; with `agent_pid`, the answer
/// must come from that process (the start time `/ready` reports). `Ok` and `Err` are both
/// the one line to print: `/ready: ok`, or why not.
pub async fn check(
    admin: SocketAddr,
    path: &str,
    timeout: Duration,
    agent_pid: Option<u32>,
) -> Result<String, String> {
    match tokio::time::timeout(timeout, fetch(admin, path)).await {
        Ok(Ok(body)) => match agent_pid {
            None => Ok(format!("{path}: ok")),
            Some(pid) => answered_by(&body, pid).map(|()| format!("{path}: ok (PID {pid})")),
        }
        .map_err(|why| format!("{path}: failed: {why}")),
        Ok(Err(error)) => Err(format!("{path}: failed: {error}")),
        Err(_) => Err(format!(
            "{path}: failed: no answer within {} ms (admin API {admin})",
            timeout.as_millis()
        )),
    }
}

/// Whether the agent that wrote `body` (`ok started=<ticks>`) is process `pid`.
fn answered_by(body: &[u8], pid: u32) -> Result<(), String> {
    let expected = crate::sys::process::start_ticks(&pid.to_string())
        .map_err(|error| format!("reading the start time of PID {pid}: {error}"))?;
    let started = String::from_utf8_lossy(body)
        .split_whitespace()
        .find_map(|word| word.strip_prefix("started="))
        .and_then(|ticks| ticks.parse::<u64>().ok());
    match started {
        Some(started) if started == expected => Ok(()),
        Some(_) => Err(format!(
            "another agent answered, not PID {pid} (a rolling update: this one is not serving yet)"
        )),
        None => Err("the answer does not say which agent sent it".to_owned()),
    }
}
