//! The status report (served at /status) and `mesh-agent status`, which prints it.

use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::{
    balance::{EndpointState, ServiceStatus},
    limit::{LimitKind, LimitStatus},
    pods::PodStatus,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub node: String,
    pub cgroup: String,
    pub config: ConfigStatus,
    pub programs: Vec<ProgramStatus>,
    pub workloads: Vec<PodStatus>,
    /// Certificates held for the identities of this node's pods.
    pub certificates: Vec<CertificateStatus>,
    /// Connections into this node's pods, with the identity they were authorized as.
    pub connections: Vec<ConnectionStatus>,
    /// Each service port this node's pods call: its endpoints and their state.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Each rate limit and its current use.
    #[serde(default)]
    pub limits: Vec<LimitStatus>,
    /// Where certificates come from, and whether that CA is reachable.
    #[serde(default)]
    pub ca: CaStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// `remote` (the CA off the node, `agent.ca`) or `local` (a CA key on the node).
    pub mode: String,
    /// The CA's address, when remote.
    pub address: Option<String>,
    /// Whether the last exchange with the CA reached it; absent before the first, and for a
    /// local CA.
    pub reachable: Option<bool>,
    /// When the CA last answered (seconds since the Unix epoch).
    pub last_contact: Option<u64>,
    pub last_error: Option<String>,
    /// Signing requests: certificates issued, refused by the CA, CA unreachable or busy.
    pub issued: u64,
    pub refused: u64,
    pub unavailable: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    pub identity: String,
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionStatus {
    /// The client's SPIFFE identity; absent for plaintext clients.
    pub source: Option<String>,
    /// `namespace/name` of the destination pod.
    pub destination: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    pub file: String,
    pub applied: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgramStatus {
    pub name: String,
    pub pin: String,
}

/// Fetches /status from the agent at `admin` and prints it as a table or JSON.
pub async fn print(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = fetch(admin, "/status")
        .await
        .with_context(|| format!("is the agent running? (admin API {admin})"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let report: StatusReport = serde_json::from_str(&body).context("parsing the status report")?;
    print!("{}", render(&report));
    Ok(())
}

async fn fetch(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let stream = tokio::net::TcpStream::connect(admin).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "admin API answered {status}");
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn render(report: &StatusReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "node {}   cgroup {}", report.node, report.cgroup);
    let config = &report.config;
    let _ = writeln!(
        out,
        "config {}   applied {}   rejected {}",
        config.file, config.applied, config.rejected
    );
    if let Some(error) = &config.last_error {
        let _ = writeln!(out, "  last rejected: {error}");
    }
    let ca = &report.ca;
    match (&ca.address, ca.reachable) {
        (Some(address), reachable) => {
            let state = match reachable {
                Some(true) => "reachable",
                Some(false) => "UNREACHABLE",
                None => "not contacted yet",
            };
            let _ = writeln!(
                out,
                "ca {address} {state}   issued {}   refused {}   unavailable {}",
                ca.issued, ca.refused, ca.unavailable
            );
            if let Some(error) = &ca.last_error {
                let _ = writeln!(out, "  last error: {error}");
            }
        }
        (None, _) => {
            let _ = writeln!(out, "ca {} (key on this node)", ca.mode);
        }
    }
    let _ = writeln!(out, "\nprograms");
    for program in &report.programs {
        let _ = writeln!(out, "  {:<16} {}", program.name, program.pin);
    }
    let _ = writeln!(
        out,
        "\n{:<28} {:>20} {:>9} {:>8} {:>11}",
        "WORKLOAD", "NETNS COOKIE", "CAPTURED", "SKIPPED", "NO-LISTENER"
    );
    for w in &report.workloads {
        let _ = writeln!(
            out,
            "{:<28} {:>20} {:>9} {:>8} {:>11}",
            w.workload, w.netns_cookie, w.captured, w.skipped, w.no_listener
        );
    }
    let _ = writeln!(
        out,
        "\n{:<56} {:>34} {:>12}",
        "CERTIFICATE", "SERIAL", "EXPIRES IN"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for cert in &report.certificates {
        let left = cert.not_after.saturating_sub(now);
        let _ = writeln!(
            out,
            "{:<56} {:>34} {:>9}m{:02}s",
            cert.identity,
            cert.serial,
            left / 60,
            left % 60
        );
    }
    render_services(&mut out, &report.services, now);
    render_limits(&mut out, &report.limits);
    let _ = writeln!(
        out,
        "\nconnections into local pods: {}",
        report.connections.len()
    );
    out
}

/// Each service port, then its endpoints: state, load, weight, latency estimate.
fn render_services(out: &mut String, services: &[ServiceStatus], now: u64) {
    use std::fmt::Write;
    for service in services {
        let circuit = &service.circuit;
        let limit = |n: Option<u32>| n.map_or("-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "\nservice {}:{}  {}  active {}/{}  connecting {}/{}  retries {}/{}",
            service.service,
            service.port,
            service.algorithm,
            circuit.active,
            limit(circuit.max_connections),
            circuit.pending,
            limit(circuit.max_pending),
            service.retry_budget.retries,
            service.retry_budget.allowed,
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<18} {:>6} {:>4} {:>7} {:>9}",
            "ENDPOINT", "STATE", "ACTIVE", "WGT", "RTT ms", "SUBSETS"
        );
        for endpoint in &service.endpoints {
            let state = match endpoint.state {
                EndpointState::Healthy => "healthy".to_owned(),
                EndpointState::Unhealthy => "unhealthy".to_owned(),
                EndpointState::Ejected { until } => {
                    format!("ejected {}s", until.saturating_sub(now))
                }
            };
            let rtt = endpoint
                .latency_ms
                .map_or("-".to_owned(), |ms| format!("{ms:.2}"));
            let _ = writeln!(
                out,
                "  {:<24} {:<18} {:>6} {:>4} {:>7} {:>9}",
                endpoint.address,
                state,
                endpoint.active,
                endpoint.weight,
                rtt,
                endpoint.subsets.join(","),
            );
        }
    }
}

/// Each rate limit and its use.
fn render_limits(out: &mut String, limits: &[LimitStatus]) {
    use std::fmt::Write;
    if limits.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:<32} {:<7} {:>12} {:>7} {:>9} {:>8}",
        "RATE LIMIT", "KIND", "CONN/S", "KEYS", "ADMITTED", "LIMITED"
    );
    for limit in limits {
        let kind = match limit.kind {
            LimitKind::RateLimit => "ingress",
            LimitKind::EgressLimit => "egress",
        };
        let rate = limit
            .connections
            .or(limit.per_source_connections)
            .map_or("-".to_owned(), |r| format!("{}/{}", r.per_second, r.burst));
        let _ = writeln!(
            out,
            "{:<32} {:<7} {:>12} {:>7} {:>9} {:>8}",
            limit.policy, kind, rate, limit.keys, limit.admitted, limit.limited
        );
    }
}
