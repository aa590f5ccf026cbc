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
    perf::{Perf, Phase},
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
pub fn measure(bins: &Bins, p: &Profile, path: &PathSpec, perf: Option<&Perf>) -> PathResult {
    let mut result = PathResult::new(path);
    let pids = path.proxy_pids();
    let record = |phase: Phase| match perf.map(|perf| perf.record(phase, path.name, &pids)) {
        Some(Err(e)) => {
            eprintln!("bench: {e:#}");
            None
        }
        Some(Ok(recording)) => recording,
        None => None,
    };
    if let Err(e) = probe(bins, path) {
        result.errors.push(format!("probe: {e:#}"));
        return result;
    }
    // Each proxy's memory before any load: what "back to idle" means after the idle test.
    let idle: Vec<Memory> = path
        .proxies
        .iter()
        .map(|proxy| Memory::of(proxy.pid))
        .collect();
    if !pids.is_empty() {
        result.set(
            "proxy_rss_idle_mib",
            idle.iter().map(|m| m.rss).sum::<u64>() as f64 / 1024.0,
        );
        result.set(
            "proxy_anon_idle_mib",
            idle.iter().map(|m| m.anon).sum::<u64>() as f64 / 1024.0,
        );
    }
    let mut max_rss = 0u64;

    let recording = record(Phase::Rr);
    let args = [
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
    ];
    let rr = charged(
        bins,
        path,
        "rr",
        &args.map(String::from),
        p.rr_s + p.warmup_s,
    );
    drop(recording);
    match rr {
        Ok(Run {
            report: v,
            max_rss: rss,
            ..
        }) => {
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

    let recording = record(Phase::Pingpong);
    let args = [
        "--duration",
        &p.pingpong_s.to_string(),
        "--warmup",
        &p.warmup_s.to_string(),
    ];
    let pingpong = charged(
        bins,
        path,
        "pingpong",
        &args.map(String::from),
        p.pingpong_s + p.warmup_s,
    );
    drop(recording);
    match pingpong {
        Ok(Run {
            report: v,
            max_rss: rss,
            ..
        }) => {
            max_rss = max_rss.max(rss);
            result.set_from("pp_p50_us", &v["latency"]["p50_us"]);
            result.set_from("pp_p99_us", &v["latency"]["p99_us"]);
            result.raw.insert("pingpong".into(), v);
        }
        Err(e) => result.errors.push(format!("pingpong: {e:#}")),
    }

    let recording = record(Phase::Bulk);
    let mut bulk_cpu = 0.0;
    let mut bulk_bytes = 0.0;
    let mut bulk_ok = true;
    for (streams, metric) in [(1usize, "bulk1_gbps"), (8, "bulk8_gbps")] {
        match bulk(bins, path, streams, p.bulk_s) {
            Ok(run) => {
                max_rss = max_rss.max(run.max_rss);
                bulk_bytes += run.bytes();
                bulk_cpu += run.cpu_s;
                result.set(metric, run.gbps());
                result.raw.insert(format!("bulk{streams}"), run.report);
            }
            Err(e) => {
                bulk_ok = false;
                result.errors.push(format!("bulk {streams}: {e:#}"));
            }
        }
    }
    drop(recording);
    if !pids.is_empty() && bulk_ok && bulk_bytes > 0.0 {
        result.set("proxy_cpu_s_per_gb", bulk_cpu / (bulk_bytes / 1e9));
        result.raw.insert(
            "bulk_cpu".into(),
            json!({"proxy_cpu_s": bulk_cpu, "bytes": bulk_bytes}),
        );
    }

    // CPU per connection is the cost the machine's noise moves least: the throughput of a
    // 2-vCPU VM swings with its neighbours, the agent's CPU time per connection much less.
    let recording = record(Phase::Cps);
    let run = cps(bins, p, path, p.cps_max);
    drop(recording);
    match run {
        Ok(run) => {
            max_rss = max_rss.max(run.max_rss);
            result.set("cps", run.conns_per_s());
            result.set_from("cps_p99_us", &run.report["latency"]["p99_us"]);
            if let Some(cpu) = run.cpu_us_per_conn(path) {
                result.set("proxy_cpu_us_per_conn", cpu);
            }
            result.raw.insert("cps".into(), run.report);
        }
        Err(e) => result.errors.push(format!("cps: {e:#}")),
    }
    if !path.agents.is_empty()
        && let Err(e) = idle_memory(bins, p, path, &idle, &mut result)
    {
        result.errors.push(format!("idle connections: {e:#}"));
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

/// Waits until `path` carries a connection (up to 10 s).
pub fn probe(bins: &Bins, path: &PathSpec) -> Result<()> {
    let args = ["--timeout", "10"].map(String::from);
    charged(bins, path, "probe", &args, 10.0).map(drop)
}

/// One load-generator run on a path: its report, and what the path's proxies spent on it.
pub struct Run {
    pub report: Value,
    /// The proxies' CPU seconds over the run.
    pub cpu_s: f64,
    /// Their highest total RSS seen (KiB).
    pub max_rss: u64,
}

/// Runs `mesh-loadgen WORKLOAD --connect TARGET ARGS` in the path's client pod, which
/// should take about `secs`.
fn charged(
    bins: &Bins,
    path: &PathSpec,
    workload: &str,
    args: &[String],
    secs: f64,
) -> Result<Run> {
    let pids = path.proxy_pids();
    let args: Vec<String> = [
        workload.to_owned(),
        "--connect".into(),
        path.target.to_string(),
    ]
    .into_iter()
    .chain(args.iter().cloned())
    .collect();
    let cpu_before = procstat::total_cpu_seconds(&pids);
    let (report, max_rss) = loadgen(
        bins,
        &path.client,
        &args,
        &pids,
        Duration::from_secs_f64(secs + 30.0),
    )?;
    Ok(Run {
        report,
        cpu_s: procstat::total_cpu_seconds(&pids) - cpu_before,
        max_rss,
    })
}

/// Uploads through `path` on `streams` connections for `secs`.
pub fn bulk(bins: &Bins, path: &PathSpec, streams: usize, secs: f64) -> Result<Run> {
    let args = [
        "--streams",
        &streams.to_string(),
        "--duration",
        &secs.to_string(),
    ];
    charged(bins, path, "bulk", &args.map(String::from), secs)
}

/// Opens up to `max_conns` connections through `path` (for at most the profile's cps time),
/// each with a 1 KiB exchange; an error if any failed.
pub fn cps(bins: &Bins, p: &Profile, path: &PathSpec, max_conns: u64) -> Result<Run> {
    let args = [
        "--threads",
        &p.cps_threads.to_string(),
        "--duration",
        &p.cps_s.to_string(),
        "--max-conns",
        &max_conns.to_string(),
    ];
    let run = charged(bins, path, "cps", &args.map(String::from), p.cps_s)?;
    if run.report["errors"].as_u64().unwrap_or(0) > 0 {
        bail!(
            "{} failed connections (first: {})",
            run.report["errors"],
            run.report["first_error"]
        );
    }
    Ok(run)
}

impl Run {
    /// A bulk run's rate.
    pub fn gbps(&self) -> f64 {
        self.report["gbit_per_s"].as_f64().unwrap_or(0.0)
    }

    /// A bulk run's bytes moved.
    pub fn bytes(&self) -> f64 {
        self.report["bytes"].as_f64().unwrap_or(0.0)
    }

    /// A cps run's rate.
    pub fn conns_per_s(&self) -> f64 {
        self.report["conns_per_s"].as_f64().unwrap_or(0.0)
    }

    /// A cps run's proxy CPU µs per connection (none for a path without proxies).
    pub fn cpu_us_per_conn(&self, path: &PathSpec) -> Option<f64> {
        let connections = self.report["connections"].as_f64().unwrap_or(0.0);
        (!path.proxies.is_empty() && connections > 0.0).then(|| self.cpu_s * 1e6 / connections)
    }
}

/// A process's resident memory (KiB): all of it, and its own (anonymous: heap, stacks)
/// without the pages of its code, which the load paged in and which stay mapped.
#[derive(Clone, Copy)]
struct Memory {
    rss: u64,
    anon: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        Self {
            rss: procstat::rss_kib(pid).unwrap_or(0),
            anon: procstat::anon_kib(pid).unwrap_or(0),
        }
    }
}

/// Holds `p.idle_conns` idle connections open through the path's agents: the memory each
/// agent spends per idle connection (heap and stacks, over those just before; RSS too in the
/// note), and what it keeps once they have closed, over `idle` (each proxy's memory before
/// the path's load; sampled 5 s after they closed, so freed memory can go back).
fn idle_memory(
    bins: &Bins,
    p: &Profile,
    path: &PathSpec,
    idle: &[Memory],
    result: &mut PathResult,
) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let settle = || std::thread::sleep(Duration::from_secs(2));
    let rss = || -> Vec<Memory> {
        path.proxies
            .iter()
            .map(|proxy| Memory::of(proxy.pid))
            .collect()
    };
    settle();
    let before = rss();
    let mut child = path
        .client
        .try_command(&bins.loadgen)?
        .args(["idle", "--connect", &path.target.to_string()])
        .args(["--conns", &p.idle_conns.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting mesh-loadgen idle")?;
    let mut lines = BufReader::new(child.stdout.take().context("loadgen stdout")?).lines();
    let ready = lines.next().transpose()?.unwrap_or_default();
    if !ready.starts_with("ready") {
        let _ = child.kill();
        let mut stderr = String::new();
        if let Some(mut s) = child.stderr.take() {
            let _ = s.read_to_string(&mut stderr);
        }
        let _ = child.wait();
        bail!("mesh-loadgen idle: {}", stderr.trim());
    }
    settle();
    let held = rss();
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(b"close\n")?;
    }
    let report = lines.next().transpose()?.unwrap_or_default();
    let status = child.wait()?;
    if !status.success() {
        bail!("mesh-loadgen idle failed ({status})");
    }
    let report: Value = serde_json::from_str(&report)
        .with_context(|| format!("parsing mesh-loadgen output {report:?}"))?;
    // The pool closes the burst's extra tunnel connections a second or two after their last
    // stream, and the agent trims after that.
    std::thread::sleep(Duration::from_secs(5));
    let after = rss();
    let conns = p.idle_conns.max(1) as f64;
    let mut per_conn_max: f64 = 0.0;
    let mut kept_max: f64 = 0.0;
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (i, proxy) in path.proxies.iter().enumerate() {
        // Heap and stacks: the agent maps code back in as the connections open (it drops
        // code mappings after start and after bursts), which RSS would count per connection.
        let per_conn = held[i].anon.saturating_sub(before[i].anon) as f64 / conns;
        let idle = idle.get(i).copied().unwrap_or(before[i]);
        let kept = after[i].rss as f64 / idle.rss.max(1) as f64;
        per_conn_max = per_conn_max.max(per_conn);
        kept_max = kept_max.max(kept);
        result.notes.push(format!(
            "{}: {:.1} KiB of heap and stacks per idle connection ({} connections: RSS {:.1} \
             -> {:.1} MiB), {:.1} MiB once they closed ({kept:.2}x of {:.1} MiB idle, before \
             any load); of which anonymous (heap, stacks): {:.1} MiB idle, {:.1} before the \
             idle connections, {:.1} held, {:.1} once closed",
            proxy.label,
            per_conn,
            p.idle_conns,
            mib(before[i].rss),
            mib(held[i].rss),
            mib(after[i].rss),
            mib(idle.rss),
            mib(idle.anon),
            mib(before[i].anon),
            mib(held[i].anon),
            mib(after[i].anon),
        ));
    }
    result.set("idle_conn_kib", per_conn_max);
    result.set("idle_after_close_ratio", kept_max);
    if report["alive_after_idle"].as_u64() != Some(p.idle_conns as u64) {
        result.errors.push(format!(
            "idle connections: {} of {} still answered after the idle time",
            report["alive_after_idle"], p.idle_conns
        ));
    }
    result.raw.insert("idle".into(), report);
    Ok(())
}
