//! The mTLS side of the bench: the shared CA of the two agents, the check that the agent
//! cross-node path really went through the tunnel (and did not silently fall back to
//! plaintext), and the in-process micro-benchmark (`mesh-agent/benches/tunnel.rs`) whose
//! figures — full mutual TLS handshakes per second per core among them — go into results.md.

use std::{fs, path::Path, process::Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{
    agent::{Metrics, RunningAgent},
    paths::{CrossNodeMode, PathResult},
    settings::Bins,
};
use crate::command::{cargo, run};

/// What each agent's `agent:` block needs for `mode`; in mTLS mode, first writes a fresh CA
/// shared by both agents into `<out>/ca` with `mesh-agent ca init`.
pub fn cross_node_setup(mode: CrossNodeMode, bins: &Bins, out: &Path) -> Result<Vec<String>> {
    let ca_dir = out.join("ca");
    if mode == CrossNodeMode::Mtls {
        run(
            std::process::Command::new(&bins.agent)
                .args(["ca", "init", "--force", "--dir"])
                .arg(&ca_dir)
                .stdout(Stdio::null()),
            "mesh-agent ca init",
        )?;
    }
    Ok(mode.agent_config(&ca_dir))
}

/// Counters of both agents before the agent cross-node path runs.
pub struct Snapshot {
    node1: Metrics,
    node2: Metrics,
    captured1: u64,
}

/// Connects captured on the agent's node (all its workloads), from `status --json`.
fn captured(status: &Value) -> u64 {
    status["workloads"]
        .as_array()
        .map(|ws| ws.iter().filter_map(|w| w["captured"].as_u64()).sum())
        .unwrap_or(0)
}

/// `agents`: node1's, node2's.
pub fn snapshot([node1, node2]: [&RunningAgent; 2], bins: &Bins) -> Result<Snapshot> {
    Ok(Snapshot {
        node1: node1.metrics(&bins.loadgen)?,
        node2: node2.metrics(&bins.loadgen)?,
        captured1: captured(&node1.status()?),
    })
}

/// After the agent cross-node path: did its connections ride the tunnel? In mTLS mode any
/// sign of plaintext (node1 connecting to the remote pod directly, node2 capturing inbound
/// plaintext) or too few tunnel streams is an error of the path, so the bench fails.
pub fn check(
    mode: CrossNodeMode,
    agents: [&RunningAgent; 2],
    bins: &Bins,
    before: Result<Snapshot>,
    remote_ip: &str,
    result: &mut PathResult,
) {
    if let Err(e) = check_inner(mode, agents, bins, before, remote_ip, result) {
        result.errors.push(format!("tunnel check: {e:#}"));
    }
}

fn check_inner(
    mode: CrossNodeMode,
    agents: [&RunningAgent; 2],
    bins: &Bins,
    before: Result<Snapshot>,
    remote_ip: &str,
    result: &mut PathResult,
) -> Result<()> {
    let before = before.context("counters before the run")?;
    let after = snapshot(agents, bins).context("counters after the run")?;
    let [node1, node2] = agents;
    let delta = |a: &Metrics,
                 b: &Metrics,
                 direction: &str,
                 security: &dyn Fn(&str) -> bool,
                 outcome: &dyn Fn(&str) -> bool| {
        (b.connections(direction, security, outcome) - a.connections(direction, security, outcome))
            .max(0.0) as u64
    };
    let any = |_: &str| true;
    let mtls = |s: &str| s == "mutual_tls";
    // Refused or failed before any byte moved; a reset at the end of a run is not a failure.
    let refused = |o: &str| {
        matches!(
            o,
            "denied" | "forbidden" | "no_route" | "overloaded" | "connect_failed"
        )
    };
    let (node1_before, node1_after) = (&before.node1, &after.node1);
    let (node2_before, node2_after) = (&before.node2, &after.node2);
    let out_tunnel = delta(node1_before, node1_after, "outbound", &mtls, &any);
    let out_all = delta(node1_before, node1_after, "outbound", &any, &any);
    let out_plain = out_all.saturating_sub(out_tunnel);
    let tunnel2_other = delta(node2_before, node2_after, "tunnel", &any, &refused);
    let accepted2 =
        delta(node2_before, node2_after, "tunnel", &any, &any).saturating_sub(tunnel2_other);
    let inbound2 = delta(node2_before, node2_after, "inbound", &any, &any);
    let status1 = node1.status()?;
    let captured1 = captured(&status1).saturating_sub(before.captured1);
    let node2_health = node2.check_healthy();
    // The cps run alone opened this many connections through the path.
    let cps_conns = result.raw["cps"]["connections"].as_u64().unwrap_or(0);
    let log = access_log_routes(&node1.log, remote_ip);

    let mut errors = Vec::new();
    match mode {
        CrossNodeMode::Mtls => {
            if out_plain > 0 {
                errors.push(format!(
                    "FELL BACK TO PLAINTEXT: node1's agent sent {out_plain} connections to the \
                     remote pod without the tunnel"
                ));
            }
            if inbound2 > 0 {
                errors.push(format!(
                    "FELL BACK TO PLAINTEXT: node2's agent captured {inbound2} plaintext inbound \
                     connections"
                ));
            }
            if accepted2 == 0 || accepted2 < cps_conns {
                errors.push(format!(
                    "node2 accepted only {accepted2} tunnel streams, but the cps run alone made \
                     {cps_conns} connections"
                ));
            }
            if out_tunnel < accepted2 {
                errors.push(format!(
                    "node1 sent {out_tunnel} connections through the tunnel but node2 accepted \
                     {accepted2}"
                ));
            }
            if tunnel2_other > 0 {
                errors.push(format!(
                    "node2 refused or failed {tunnel2_other} tunnel streams"
                ));
            }
            if let Some((tunnel, other)) = log
                && other > 0
            {
                errors.push(format!(
                    "node1's access log shows {other} connections to {remote_ip} without \
                     security=\"mutual_tls\" ({tunnel} tunnelled)"
                ));
            }
        }
        CrossNodeMode::Plaintext => {
            if out_tunnel > 0 {
                errors.push(format!(
                    "plaintext mode, yet {out_tunnel} connections went through the tunnel"
                ));
            }
        }
    }
    if captured1 < cps_conns {
        errors.push(format!(
            "node1 captured only {captured1} connects, but the cps run alone made {cps_conns}"
        ));
    }
    if let Err(e) = &node2_health {
        errors.push(format!("{e:#}"));
    }
    let log_note = match log {
        Some((tunnel, other)) => format!(
            "node1 access log: {tunnel} lines to {remote_ip} with security=\"mutual_tls\", {other} other"
        ),
        None => "no access-log lines (MESH_BENCH_AGENT_LOG turned them off)".into(),
    };
    result.notes.push(format!(
        "tunnel check ({mode:?}): node1 captured {captured1} connects, sent {out_tunnel} through \
         the tunnel and {out_plain} plaintext; node2 \
         mesh_connections_total{{direction=\"tunnel\"}} +{accepted2} (not refused), \
         inbound plaintext +{inbound2}, status {}; {log_note}",
        if node2_health.is_ok() {
            "healthy"
        } else {
            "UNHEALTHY"
        },
    ));
    result.raw.insert(
        "tunnel_check".into(),
        json!({
            "mode": format!("{mode:?}").to_lowercase(),
            "node1_captured": captured1,
            "node1_outbound_tunnel": out_tunnel,
            "node1_outbound_plain": out_plain,
            "node2_tunnel_accepted": accepted2,
            "node2_tunnel_not_accepted": tunnel2_other,
            "node2_inbound": inbound2,
            "node2_healthy": node2_health.is_ok(),
            "cps_connections": cps_conns,
            "access_log": log.map(|(t, o)| json!({"tunnel": t, "other": o})),
            "errors": errors,
        }),
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

/// Outbound access-log lines of node1 to `remote_ip`: (security="mutual_tls", any other), or
/// `None` when the log holds no access lines at all (`MESH_BENCH_AGENT_LOG=warn`, say).
fn access_log_routes(log: &Path, remote_ip: &str) -> Option<(u64, u64)> {
    let text = fs::read_to_string(log).ok()?;
    let upstream = format!("endpoint={remote_ip}:");
    let (mut tunnel, mut other, mut any) = (0, 0, false);
    for line in text.lines().filter(|l| l.contains("security=")) {
        any = true;
        if !line.contains(&upstream) {
            continue;
        }
        if line.contains("security=\"mutual_tls\"") || line.contains("security=mutual_tls") {
            tunnel += 1;
        } else {
            other += 1;
        }
    }
    any.then_some((tunnel, other))
}

/// The criterion benches of `mesh-agent/benches/tunnel.rs` as (id, what, unit).
const MICRO: &[(&str, &str)] = &[
    (
        "mtls_handshake",
        "full mutual TLS 1.3 handshakes/s per core (client + server on one core)",
    ),
    (
        "new_connection_connect",
        "new tunnel connection (TCP + mTLS + h2) + CONNECT + 1-byte echo, per s per core",
    ),
    (
        "pooled_stream",
        "new CONNECT stream on a warm pooled connection + 1-byte echo, per s per core",
    ),
    (
        "pooled_stream_early",
        "the same, the byte sent right behind the CONNECT (early data), per s per core",
    ),
    (
        "stream_throughput",
        "one stream through the tunnel, echoed back (MiB/s each way, one core)",
    ),
];

/// Runs the tunnel micro-benchmark (short times in `quick` mode) with its criterion output
/// under `<out>/criterion` and its log in `<out>/tls-micro.log`; returns the figures.
pub fn tls_micro(quick: bool, out: &Path) -> Result<Value> {
    let (warm_up, measure) = if quick { ("0.3", "1") } else { ("1", "3") };
    let home = out.join("criterion");
    let log_path = out.join("tls-micro.log");
    let log = fs::File::create(&log_path)?;
    run(
        cargo()
            .args(["bench", "-q", "-p", "mesh-agent", "--bench", "tunnel", "--"])
            .args(["--warm-up-time", warm_up, "--measurement-time", measure])
            .env("CRITERION_HOME", &home)
            .stdout(log),
        "cargo bench -p mesh-agent --bench tunnel",
    )
    .with_context(|| format!("see {}", log_path.display()))?;
    let mut figures = serde_json::Map::new();
    for (id, what) in MICRO {
        let path = home.join("tunnel").join(id).join("new/estimates.json");
        let estimates: Value = serde_json::from_str(
            &fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let Some(ns) = estimates["mean"]["point_estimate"].as_f64() else {
            bail!("no mean in {}", path.display());
        };
        let value = if *id == "stream_throughput" {
            // 8 MiB per iteration (STREAM_BYTES of the bench).
            8.0 / (ns / 1e9)
        } else {
            1e9 / ns
        };
        figures.insert(
            (*id).into(),
            json!({"what": what, "value": value, "mean_ns": ns}),
        );
    }
    Ok(Value::Object(figures))
}

/// The micro-benchmark's lines of results.md.
pub fn markdown(tls_micro: &Value) -> String {
    let Some(figures) = tls_micro.as_object() else {
        return String::new();
    };
    if let Some(error) = figures.get("error") {
        return format!("\nmTLS micro-benchmark failed: {error}\n");
    }
    let mut md = String::from(
        "\n### mTLS in process (mesh-agent/benches/tunnel.rs, loopback, one core)\n\n| figure | value |\n|---|---:|\n",
    );
    for (id, _) in MICRO {
        if let Some(f) = figures.get(*id) {
            md.push_str(&format!(
                "| {} | {:.0} |\n",
                f["what"].as_str().unwrap_or(id),
                f["value"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    md
}
