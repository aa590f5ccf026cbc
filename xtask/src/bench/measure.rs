//! One path measured: the `mesh-loadgen` workloads in the client pod, the path's proxies
//! sampled meanwhile (RSS, CPU).

use std::{
    io::Read as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::Pod;
use serde_json::{Value, json};

use super::{
    paths::{PathResult, PathSpec},
    procstat,
    settings::{Bins, Profile},
};

/// Runs `mesh-loadgen ARGS` in `pod`, sampling the proxies' RSS meanwhile; returns its JSON
/// report and the highest total RSS seen (KiB).
fn loadgen(
    bins: &Bins,
    pod: &Pod,
    args: &[String],
    proxies: &[u32],
    timeout: Duration,
) -> Result<(Value, u64)> {
    let mut command = pod.try_command(&bins.loadgen)?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().context("starting mesh-loadgen")?;
    let deadline = Instant::now() + timeout;
    let mut max_rss = procstat::total_rss_kib(proxies);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "mesh-loadgen {} timed out after {timeout:?}",
                args.join(" ")
            );
        }
        max_rss = max_rss.max(procstat::total_rss_kib(proxies));
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut stderr)?;
    }
    if !status.success() {
        bail!(
            "mesh-loadgen {} failed ({status}): {}",
            args.join(" "),
            stderr.trim()
        );
    }
    let line = stdout.lines().last().unwrap_or_default();
    let value = serde_json::from_str(line)
        .with_context(|| format!("parsing mesh-loadgen output {line:?}"))?;
    Ok((value, max_rss))
}

/// All workloads on one path. A failed workload is noted and the others still run.
pub fn measure(bins: &Bins, p: &Profile, path: &PathSpec) -> PathResult {
    let mut result = PathResult::new(path);
    let pids = path.proxy_pids();
    let target = path.target.to_string();
    let lg = |args: Vec<String>, secs: f64| {
        loadgen(
            bins,
            &path.client,
            &args,
            &pids,
            Duration::from_secs_f64(secs + 30.0),
        )
    };
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|a| a.to_string()).collect() };

    if let Err(e) = lg(s(&["probe", "--connect", &target, "--timeout", "10"]), 10.0) {
        result.errors.push(format!("probe: {e:#}"));
        return result;
    }
    if !pids.is_empty() {
        result.set(
            "proxy_rss_idle_mib",
            procstat::total_rss_kib(&pids) as f64 / 1024.0,
        );
    }
    let mut max_rss = 0u64;

    let rr = lg(
        s(&[
            "rr",
            "--connect",
            &target,
            "--rate",
            &p.rr_rate.to_string(),
            "--conns",
            &p.rr_conns.to_string(),
            "--size",
            "1024",
            "--duration",
            &p.rr_s.to_string(),
            "--warmup",
            &p.warmup_s.to_string(),
        ]),
        p.rr_s + p.warmup_s,
    );
    match rr {
        Ok((v, rss)) => {
            max_rss = max_rss.max(rss);
            for (metric, field) in [
                ("rr_p50_us", "p50_us"),
                ("rr_p90_us", "p90_us"),
                ("rr_p99_us", "p99_us"),
                ("rr_p999_us", "p999_us"),
            ] {
                result.set_from(metric, &v["latency"][field]);
            }
            result.set_from("rr_achieved_rps", &v["achieved_rps"]);
            result.raw.insert("rr".into(), v);
        }
        Err(e) => result.errors.push(format!("rr: {e:#}")),
    }

    match lg(
        s(&[
            "pingpong",
            "--connect",
            &target,
            "--duration",
            &p.pingpong_s.to_string(),
            "--warmup",
            &p.warmup_s.to_string(),
        ]),
        p.pingpong_s + p.warmup_s,
    ) {
        Ok((v, rss)) => {
            max_rss = max_rss.max(rss);
            result.set_from("pp_p50_us", &v["latency"]["p50_us"]);
            result.set_from("pp_p99_us", &v["latency"]["p99_us"]);
            result.raw.insert("pingpong".into(), v);
        }
        Err(e) => result.errors.push(format!("pingpong: {e:#}")),
    }

    let cpu_before = procstat::total_cpu_seconds(&pids);
    let mut bulk_bytes = 0.0;
    let mut bulk_ok = true;
    for (streams, metric) in [(1usize, "bulk1_gbps"), (8, "bulk8_gbps")] {
        match lg(
            s(&[
                "bulk",
                "--connect",
                &target,
                "--streams",
                &streams.to_string(),
                "--duration",
                &p.bulk_s.to_string(),
            ]),
            p.bulk_s,
        ) {
            Ok((v, rss)) => {
                max_rss = max_rss.max(rss);
                bulk_bytes += v["bytes"].as_f64().unwrap_or(0.0);
                result.set_from(metric, &v["gbit_per_s"]);
                result.raw.insert(format!("bulk{streams}"), v);
            }
            Err(e) => {
                bulk_ok = false;
                result.errors.push(format!("bulk {streams}: {e:#}"));
            }
        }
    }
    let cpu = procstat::total_cpu_seconds(&pids) - cpu_before;
    if !pids.is_empty() && bulk_ok && bulk_bytes > 0.0 {
        result.set("proxy_cpu_s_per_gb", cpu / (bulk_bytes / 1e9));
        result.raw.insert(
            "bulk_cpu".into(),
            json!({"proxy_cpu_s": cpu, "bytes": bulk_bytes}),
        );
    }

    // CPU per connection is the cost the machine's noise moves least: the throughput of a
    // 2-vCPU VM swings with its neighbours, the agent's CPU time per connection much less.
    let cpu_before = procstat::total_cpu_seconds(&pids);
    match lg(
        s(&[
            "cps",
            "--connect",
            &target,
            "--threads",
            &p.cps_threads.to_string(),
            "--duration",
            &p.cps_s.to_string(),
            "--max-conns",
            &p.cps_max.to_string(),
        ]),
        p.cps_s,
    ) {
        Ok((v, rss)) => {
            max_rss = max_rss.max(rss);
            result.set_from("cps", &v["conns_per_s"]);
            result.set_from("cps_p99_us", &v["latency"]["p99_us"]);
            let cpu = procstat::total_cpu_seconds(&pids) - cpu_before;
            let connections = v["connections"].as_f64().unwrap_or(0.0);
            if !pids.is_empty() && connections > 0.0 {
                result.set("proxy_cpu_us_per_conn", cpu * 1e6 / connections);
            }
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                result.errors.push(format!(
                    "cps: {} failed connections (first: {})",
                    v["errors"], v["first_error"]
                ));
            }
            result.raw.insert("cps".into(), v);
        }
        Err(e) => result.errors.push(format!("cps: {e:#}")),
    }
    if !pids.is_empty() {
        result.set("proxy_rss_load_mib", max_rss as f64 / 1024.0);
        result.raw.insert(
            "proxies".into(),
            json!(
                path.proxies
                    .iter()
                    .map(|p| json!({"label": p.label, "pid": p.pid}))
                    .collect::<Vec<_>>()
            ),
        );
    }
    result
}
