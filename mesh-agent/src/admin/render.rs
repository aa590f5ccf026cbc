//! `mesh-agent status` as a person reads it: the first screen (a one-line verdict, then one
//! line or two per part) and the views (pods, services, connections, certificates).
//!
//! Everything fits an 80-column terminal: names and identities that would not are elided in
//! the middle with `…` (the ends of a name say the most), messages are wrapped, and a
//! connection's identities get a line of their own. Widths count characters, not bytes.
//! Pure functions of the report and the time, so they are tested on fixed reports.

use std::fmt::Write;

use super::status::{ConnectionStatus, ConnectionsReport, StatusReport};
use crate::{
    balance::{EndpointState, ServiceStatus},
    limit::{LimitKind, LimitStatus},
    proxy::Direction,
};

/// The terminal width everything fits.
pub const WIDTH: usize = 80;
/// The indent of a first-screen value (after its label).
const LABEL: usize = 9;
/// The views, as the first screen names them.
const VIEWS: &str = "views: mesh-agent status pods|services|connections|certificates";

/// The first screen: is this node's mesh healthy, and the one figure of each part.
pub fn overview(report: &StatusReport, now: u64) -> String {
    let mut out = String::new();
    let health = &report.health;
    let verdict = if health.healthy {
        "healthy".to_owned()
    } else {
        format!("degraded: {}", health.problems.join("; "))
    };
    line(&mut out, &fit_end(&verdict, WIDTH));
    let node = format!("{} (cgroup {})", report.node, report.cgroup);
    labelled(&mut out, "node", &node);

    let (captured, skipped, no_listener) = report.workloads.iter().fold((0, 0, 0), |t, w| {
        (t.0 + w.captured, t.1 + w.skipped, t.2 + w.no_listener)
    });
    let mut programs = format!(
        "{} attached; captured {captured}, skipped {skipped}, no listener {no_listener}",
        counted(report.programs.len(), "program")
    );
    if report
        .programs
        .iter()
        .any(|p| p.name == mesh_common::programs::SK_MSG)
    {
        let fast_path: u64 = report.workloads.iter().map(|w| w.fast_path).sum();
        programs.push_str(&format!("; fast path on, {fast_path} redirected"));
    }
    labelled(&mut out, "eBPF", &programs);

    let pods = format!(
        "{} enrolled, {} failed",
        report.workloads.len(),
        report.failed_pods.len()
    );
    labelled(&mut out, "pods", &pods);
    const FAILED_SHOWN: usize = 3;
    for failed in report.failed_pods.iter().take(FAILED_SHOWN) {
        let text = format!("{}: {}", failed.workload, failed.reason);
        line(&mut out, &fit(&indent(LABEL, &text), WIDTH));
    }
    if report.failed_pods.len() > FAILED_SHOWN {
        let more = format!(
            "and {} more: mesh-agent status pods",
            report.failed_pods.len() - FAILED_SHOWN
        );
        line(&mut out, &indent(LABEL, &more));
    }

    let config = &report.config;
    let generation = format!(
        "generation {} since {}, {} applied, {} rejected",
        config.generation,
        utc(config.since),
        config.applied,
        config.rejected
    );
    labelled(&mut out, "config", &generation);
    line(&mut out, &fit(&indent(LABEL, &config.file), WIDTH));
    if let Some(error) = &config.last_error {
        wrapped(&mut out, LABEL, &format!("last rejected: {error}"));
    }

    let soonest = report.certificates.iter().min_by_key(|c| c.not_after);
    let certificates = match soonest {
        Some(cert) => format!(
            "{} held, soonest expiry in {}",
            report.certificates.len(),
            duration(cert.not_after.saturating_sub(now))
        ),
        None => "none held".to_owned(),
    };
    labelled(&mut out, "certs", &certificates);
    if let Some(cert) = soonest {
        line(&mut out, &fit(&indent(LABEL, &cert.identity), WIDTH));
    }
    let ca = &report.ca;
    let source = match (&ca.address, ca.reachable) {
        (None, _) => "key on this node (development shortcut)".to_owned(),
        (Some(address), reachable) => format!(
            "{address} {}; issued {}, refused {}, unavailable {}",
            match reachable {
                Some(true) => "reachable",
                Some(false) => "UNREACHABLE",
                None => "not asked yet",
            },
            ca.issued,
            ca.refused,
            ca.unavailable
        ),
    };
    labelled(&mut out, "ca", &source);
    if let (Some(false), Some(error)) = (ca.reachable, &ca.last_error) {
        wrapped(&mut out, LABEL, error);
    }

    let tunnels = format!(
        "{} up to other nodes, {}",
        report.tunnels.connections,
        counted(report.tunnels.streams, "stream")
    );
    labelled(&mut out, "tunnels", &tunnels);
    let counts = &report.connection_counts;
    let connections = format!(
        "{} open: {} outbound, {} inbound, {} tunnel",
        counts.total, counts.outbound, counts.inbound, counts.tunnel
    );
    labelled(&mut out, "conns", &connections);
    line(&mut out, "");
    line(&mut out, VIEWS);
    out
}

/// The enrolled pods with their capture counters, then the pods that failed and why.
pub fn pods(report: &StatusReport) -> String {
    let mut out = String::new();
    let header = format!(
        "{:<30} {:>10} {:>9} {:>11} {:>15}",
        "POD", "CAPTURED", "SKIPPED", "NO-LISTENER", "NETNS COOKIE"
    );
    line(&mut out, &header);
    for pod in &report.workloads {
        let row = format!(
            "{:<30} {:>10} {:>9} {:>11} {:>15}",
            fit(&pod.workload, 30),
            pod.captured,
            pod.skipped,
            pod.no_listener,
            pod.netns_cookie
        );
        line(&mut out, &row);
    }
    if report.workloads.is_empty() {
        line(&mut out, "(no pod enrolled)");
    }
    let refused: Vec<_> = report
        .workloads
        .iter()
        .filter_map(|pod| pod.client_ip_refused.as_ref().map(|reason| (pod, reason)))
        .collect();
    if !refused.is_empty() {
        line(&mut out, "");
        line(
            &mut out,
            "CLIENT IP NOT KEPT (the app sees its own address for other nodes' clients)",
        );
        for (pod, reason) in refused {
            let title = format!("{} ({} connections)", pod.workload, pod.client_ip_fallbacks);
            line(&mut out, &fit(&title, WIDTH));
            wrapped(&mut out, 4, reason);
        }
    }
    if !report.failed_pods.is_empty() {
        line(&mut out, "");
        line(&mut out, "FAILED TO ENROLL (tried again at each reload)");
        for failed in &report.failed_pods {
            let title = format!("{} (last tried {})", failed.workload, utc(failed.since));
            line(&mut out, &fit(&title, WIDTH));
            wrapped(&mut out, 4, &failed.reason);
        }
    }
    out
}

/// Each service port this node's pods call, its endpoints and their state; then the rate
/// limits and their use.
pub fn services(report: &StatusReport, now: u64) -> String {
    let mut out = String::new();
    if report.services.is_empty() {
        line(&mut out, "(no service called from this node)");
    }
    for (i, service) in report.services.iter().enumerate() {
        if i > 0 {
            line(&mut out, "");
        }
        service_block(&mut out, service, now);
    }
    if !report.limits.is_empty() {
        line(&mut out, "");
        limits(&mut out, &report.limits);
    }
    out
}

fn service_block(out: &mut String, service: &ServiceStatus, now: u64) {
    let circuit = &service.circuit;
    let limit = |n: Option<u32>| n.map_or("-".to_owned(), |n| n.to_string());
    let figures = format!(
        "  {}  active {}/{}  connecting {}/{}  retries {}/{}",
        service.algorithm,
        circuit.active,
        limit(circuit.max_connections),
        circuit.pending,
        limit(circuit.max_pending),
        service.retry_budget.retries,
        service.retry_budget.allowed,
    );
    let port = format!(":{}", service.port);
    let room = WIDTH.saturating_sub("service ".len() + port.chars().count());
    let title = format!("service {}{port}", fit(&service.service, room));
    if title.chars().count() + figures.chars().count() <= WIDTH {
        line(out, &format!("{title}{figures}"));
    } else {
        line(out, &title);
        line(out, &fit(&figures, WIDTH));
    }
    line(
        out,
        &format!(
            "  {:<30} {:<14} {:>6} {:>4} {:>7} {:>11}",
            "ENDPOINT", "STATE", "ACTIVE", "WGT", "RTT ms", "SUBSETS"
        ),
    );
    for endpoint in &service.endpoints {
        let state = match endpoint.state {
            EndpointState::Healthy => "healthy".to_owned(),
            EndpointState::Unhealthy => "unhealthy".to_owned(),
            EndpointState::Ejected { until } => {
                format!("ejected {}", duration(until.saturating_sub(now)))
            }
        };
        let rtt = endpoint
            .latency_ms
            .map_or("-".to_owned(), |ms| format!("{ms:.2}"));
        let row = format!(
            "  {:<30} {:<14} {:>6} {:>4} {:>7} {:>11}",
            fit(&endpoint.address, 30),
            fit(&state, 14),
            endpoint.active,
            endpoint.weight,
            rtt,
            fit(&endpoint.subsets.join(","), 11),
        );
        line(out, &row);
    }
}

fn limits(out: &mut String, limits: &[LimitStatus]) {
    let header = format!(
        "{:<30} {:<7} {:>12} {:>6} {:>10} {:>9}",
        "RATE LIMIT", "KIND", "CONN/S", "KEYS", "ADMITTED", "LIMITED"
    );
    line(out, &header);
    for limit in limits {
        let kind = match limit.kind {
            LimitKind::RateLimit => "ingress",
            LimitKind::EgressLimit => "egress",
        };
        let rate = limit
            .connections
            .or(limit.per_source_connections)
            .map_or("-".to_owned(), |r| format!("{}/{}", r.per_second, r.burst));
        let row = format!(
            "{:<30} {:<7} {:>12} {:>6} {:>10} {:>9}",
            fit(&limit.policy, 30),
            kind,
            fit(&rate, 12),
            limit.keys,
            limit.admitted,
            limit.limited
        );
        line(out, &row);
    }
}

/// The certificates held, soonest expiry first: identity on its own line, then serial and
/// validity.
pub fn certificates(report: &StatusReport, now: u64) -> String {
    let mut out = String::new();
    let mut certs: Vec<_> = report.certificates.iter().collect();
    certs.sort_by_key(|c| c.not_after);
    if certs.is_empty() {
        line(&mut out, "(no certificate held: no pod enrolled)");
    }
    for cert in certs {
        line(&mut out, &fit(&cert.identity, WIDTH));
        let left = if cert.not_after <= now {
            "EXPIRED".to_owned()
        } else {
            format!("expires in {}", duration(cert.not_after - now))
        };
        let validity = format!(
            "    valid {} to {}, {left}",
            utc(cert.not_before),
            utc(cert.not_after)
        );
        line(&mut out, &fit(&validity, WIDTH));
        line(
            &mut out,
            &fit(&format!("    serial {}", cert.serial), WIDTH),
        );
    }
    out
}

/// Like `ss` for the mesh: per connection a line of who, where, age and bytes, one of
/// addresses, one of identities; oldest first.
pub fn connections(report: &ConnectionsReport) -> String {
    let mut out = String::new();
    let counts = &report.counts;
    let summary = format!(
        "{} open: {} outbound ({} through tunnels), {} inbound, {} tunnel",
        counts.total, counts.outbound, counts.through_tunnels, counts.inbound, counts.tunnel
    );
    line(&mut out, &fit(&summary, WIDTH));
    if report.connections.is_empty() {
        return out;
    }
    line(&mut out, "");
    let header = format!(
        "{:<3} {:<22} {:<22} {:>7} {:>10} {:>10}",
        "DIR", "SOURCE", "DESTINATION", "AGE", "SENT", "RECEIVED"
    );
    line(&mut out, &header);
    for connection in &report.connections {
        connection_lines(&mut out, connection);
    }
    if report.omitted > 0 {
        let more = format!(
            "... and {} more (oldest shown first; --limit to see more)",
            report.omitted
        );
        line(&mut out, &more);
    }
    out
}

fn connection_lines(out: &mut String, c: &ConnectionStatus) {
    let direction = match c.direction {
        Some(Direction::Outbound) => "out",
        Some(Direction::Inbound) => "in",
        Some(Direction::Tunnel) => "tun",
        None => "?",
    };
    let source = c
        .source_workload
        .clone()
        .or_else(|| c.client.map(|a| a.to_string()))
        .unwrap_or_else(|| "-".to_owned());
    let destination = format!("{}:{}", c.destination, c.port);
    let row = format!(
        "{:<3} {:<22} {:<22} {:>7} {:>10} {:>10}",
        direction,
        fit(&source, 22),
        fit(&destination, 22),
        duration(c.age_ms / 1000),
        bytes(c.bytes_from_client),
        bytes(c.bytes_to_client),
    );
    line(out, &row);
    let address = |a: Option<std::net::SocketAddr>| a.map_or("-".to_owned(), |a| a.to_string());
    let path = format!(
        "    {} -> {} -> {}",
        address(c.client),
        address(c.original_destination),
        address(c.upstream)
    );
    let mut via = String::new();
    if let Some(service) = &c.service {
        via.push_str(&format!("  svc {service}"));
    }
    if c.tunneled {
        via.push_str("  mTLS");
    }
    if path.chars().count() + via.chars().count() <= WIDTH {
        line(out, &format!("{path}{via}"));
    } else {
        line(out, &fit(&path, WIDTH));
        line(out, &fit(&indent(2, &via), WIDTH));
    }
    let client = c.source.as_deref().unwrap_or("(plaintext)");
    let server = c.destination_identity.as_deref().unwrap_or("(no identity)");
    let both = format!("    {client} -> {server}");
    if both.chars().count() <= WIDTH {
        line(out, &both);
    } else {
        line(out, &fit(&indent(4, client), WIDTH));
        line(out, &fit(&format!("      -> {server}"), WIDTH));
    }
}

/// `1 stream`, `2 streams`.
fn counted(n: usize, noun: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{n} {noun}{s}")
}

/// One line of output, without the padding a last empty column leaves.
fn line(out: &mut String, text: &str) {
    let _ = writeln!(out, "{}", text.trim_end());
}

/// `label` padded to the value column, then the value, fitted.
fn labelled(out: &mut String, label: &str, value: &str) {
    line(out, &fit(&format!("{label:<LABEL$}{value}"), WIDTH));
}

fn indent(by: usize, text: &str) -> String {
    format!("{:by$}{text}", "")
}

/// `text` as lines of at most [`WIDTH`] characters, each indented by `by`, broken at spaces
/// (a word longer than a line is cut).
fn wrapped(out: &mut String, by: usize, text: &str) {
    let room = WIDTH.saturating_sub(by).max(1);
    let mut current = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let used = current.chars().count();
            let needed = word.len() + usize::from(used > 0);
            if used + needed <= room {
                if used > 0 {
                    current.push(' ');
                }
                current.extend(word.iter());
                break;
            }
            if used > 0 {
                line(out, &indent(by, &current));
                current.clear();
                continue;
            }
            let rest = word.split_off(room);
            line(out, &indent(by, &word.iter().collect::<String>()));
            word = rest;
        }
    }
    if !current.is_empty() {
        line(out, &indent(by, &current));
    }
}

/// `text` in at most `width` characters: unchanged if it fits, else its start and end with
/// `…` in the middle.
pub fn fit(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let keep = width - 1;
    let head = keep / 2;
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// `text` in at most `width` characters: unchanged if it fits, else its start and `…` (for a
/// sentence, whose start says the most).
pub fn fit_end(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A span of seconds in its two largest units: `45s`, `3m05s`, `2h07m`, `4d03h`.
pub fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// A byte count in at most 6 characters: `812B`, `4.2K`, `17.0M`, `3.1G` (powers of 1024).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Seconds since the Unix epoch as `2026-12-04 21:30:05Z`; `-` for 0 (unknown).
pub fn utc(seconds: u64) -> String {
    let Ok(seconds) = i64::try_from(seconds) else {
        return "-".to_owned();
    };
    if seconds == 0 {
        return "-".to_owned();
    }
    match time::OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "-".to_owned(),
    }
}
