//! The traffic-policy figure: what the policy machinery costs on the agent same-node path.
//! The traffic-policy issue asks that new connections per second with a rate limit that does
//! not limit and outlier detection on stay within 5 % of the same run without them.
//!
//! So `agent-same-node-policy` is `agent-same-node` (same pods, servers and load) with node1's
//! agent restarted on another config: the benched service gets outlier detection on, and a
//! rate limit on its pods sets connection, per-source and byte buckets far above anything the
//! bench reaches (the validation maxima), so every check and the pacing run but never hold a
//! connection back. The plain path has outlier detection off and no rate limit; neither sets
//! a load balancer, so both use the default. After the policy path, the agent's status and
//! metrics must show that the limit saw the connections and neither refused nor paced any:
//! otherwise the figure is not the one asked for, and the path fails.

use anyhow::{Context, Result};
use serde_json::json;

use super::{agent::RunningAgent, paths::PathResult, settings::Bins};

/// The benched service's `trafficPolicy` on the plain path.
pub const PLAIN_TRAFFIC: &str = "{outlierDetection: {enabled: false}}";
/// ... and on the policy path.
pub const POLICY_TRAFFIC: &str = "{outlierDetection: {enabled: true}}";
const LIMIT_NAME: &str = "bench-headroom";

/// The `policies:` block of the policy config: a rate limit on the pods labelled `app` of
/// namespace `bench`, at the most validation allows: 1,000,000 connections/s (burst the
/// same), all sources together and each on its own, and 10 GB/s each way with a 1 GB burst
/// (the bench moves well under 2 GB/s and opens well under 20,000 connections/s).
pub fn rate_limit_yaml(app: &str) -> String {
    format!(
        "policies:
  rateLimits:
    - name: {LIMIT_NAME}
      namespace: bench
      selector: {{app: {app}}}
      connections: {{perSecond: 1000000, burst: 1000000}}
      bandwidth: {{bytesPerSecond: 10000000000, burstBytes: 1000000000}}
      perSource:
        connections: {{perSecond: 1000000, burst: 1000000}}
"
    )
}

/// After the policy path: the limit saw every connection and never limited one; notes
/// what node1's agent (started for this path, so its counters are the path's) reports.
pub fn check(agent: Option<&RunningAgent>, bins: &Bins, result: &mut PathResult) {
    if let Err(e) = check_inner(agent, bins, result) {
        result.errors.push(format!("policy check: {e:#}"));
    }
}

fn check_inner(agent: Option<&RunningAgent>, bins: &Bins, result: &mut PathResult) -> Result<()> {
    let agent = agent.context("node1's agent is not running")?;
    let status = agent.status()?;
    let policy = format!("bench/{LIMIT_NAME}");
    let limit = status["limits"]
        .as_array()
        .and_then(|limits| limits.iter().find(|l| l["policy"] == policy.as_str()))
        .with_context(|| format!("node1's status shows no rate limit {policy}"))?;
    let count = |field: &str| limit[field].as_u64().unwrap_or(0);
    let (admitted, limited, keys) = (count("admitted"), count("limited"), count("keys"));
    let metrics = agent.metrics(&bins.loadgen)?;
    let paced = metrics.total("mesh_shaped_bytes_total") as u64;
    let ejections = metrics.total("mesh_endpoint_ejections_total") as u64;
    let cps_conns = result.raw["cps"]["connections"].as_u64().unwrap_or(0);
    result.notes.push(format!(
        "policy check: rate limit {policy} admitted {admitted} connections (the cps run alone \
         made {cps_conns}), refused {limited}, paced {paced} bytes, holds {keys} keyed \
         buckets; outlier ejections {ejections}"
    ));
    result.raw.insert(
        "policy_check".into(),
        json!({
            "policy": policy,
            "admitted": admitted,
            "limited": limited,
            "paced_bytes": paced,
            "keys": keys,
            "ejections": ejections,
            "cps_connections": cps_conns,
        }),
    );
    if admitted == 0 || admitted < cps_conns {
        result.errors.push(format!(
            "the rate limit admitted {admitted} connections, fewer than the cps run's \
             {cps_conns}: it did not see them all"
        ));
    }
    if limited > 0 {
        result.errors.push(format!(
            "the rate limit refused {limited} connections: it must never limit here"
        ));
    }
    if paced > 0 {
        result.errors.push(format!(
            "the bandwidth limit paced {paced} bytes: it must never limit here"
        ));
    }
    Ok(())
}
