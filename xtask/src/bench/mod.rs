//! `cargo xtask bench`: the data-path benchmark on a real two-node topology.
//!
//! One run builds everything in release, creates the topology (mesh-tests), starts one
//! agent per node and an HAProxy mTLS pair, then measures each path of [`paths`] with the
//! same `mesh-loadgen` workloads:
//! - request/response of 1 KiB at a fixed rate (open loop, latency from the scheduled send);
//! - one-byte ping-pong on one connection (closed loop);
//! - bulk upload, 1 and 8 streams;
//! - new connections per second with a 1 KiB exchange each;
//! - the path's proxies: RSS idle and under load, CPU seconds per GB of bulk.
//!
//! Results go to `<out>/results.json`, `results.md` (printed at the end) and `latency.svg`.

mod agent;
mod haproxy;
mod mtls;
mod paths;
mod procstat;
mod report;
mod settings;

use std::{
    io::Read as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Background, Pod, Topology};
use serde_json::{Value, json};

use crate::{
    command::{cargo, run, workspace_root},
    ebpf, setup,
};
use agent::{RunningAgent, ServiceSpec, WorkloadSpec};
pub use paths::CrossNodeMode;
use paths::{PathResult, PathSpec, Proxy};
use settings::{Bins, Profile};

/// Port of the bench servers in every server pod.
const SERVER_PORT: u16 = 8080;
const VIP_LOCAL: &str = "10.96.0.10";
const VIP_REMOTE: &str = "10.96.0.20";
const SERVICE_PORT: u16 = 80;
const HAPROXY_FRONT_PORT: u16 = 9000;
const HAPROXY_TLS_PORT: u16 = 9443;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Short durations (the whole measurement in well under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Output directory (default: target/bench).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// How the agent cross-node path crosses nodes (names its column): the mTLS tunnel
    /// (default) or plaintext agent to agent.
    #[arg(long, value_enum, default_value_t)]
    cross_node: CrossNodeMode,
    /// Leave out the in-process mTLS micro-benchmark (handshakes/s per core, ...).
    #[arg(long)]
    no_tls_micro: bool,
    /// Requests per second of the open-loop request/response test.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Leave out the HAProxy path.
    #[arg(long)]
    no_haproxy: bool,
    /// Measure only these paths (comma-separated keys, e.g. agent-same-node); ratios need
    /// their direct path in the list too.
    #[arg(long, value_delimiter = ',', value_name = "PATHS")]
    only: Vec<String>,
}

pub fn run_bench(args: &Args) -> Result<()> {
    let started = Instant::now();
    setup::require_root("the bench loads eBPF programs and creates network namespaces")?;
    setup::machine()?;
    ebpf::build()?;
    run(
        cargo().args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "-p",
            "mesh-tests",
            "--bins",
        ]),
        "cargo build --release (mesh-agent, mesh-tests)",
    )?;
    if !args.no_tls_micro {
        run(
            cargo().args(["bench", "-p", "mesh-agent", "--bench", "tunnel", "--no-run"]),
            "cargo bench --no-run (mesh-agent tunnel micro-benchmark)",
        )?;
    }
    let release = target_dir().join("release");
    let bins = Bins {
        agent: release.join("mesh-agent"),
        loadgen: release.join("mesh-loadgen"),
    };
    let haproxy_bin = if args.no_haproxy {
        None
    } else {
        match haproxy::ensure_installed() {
            Ok(path) => Some(path),
            Err(e) => {
                eprintln!("bench: no HAProxy path: {e:#}");
                None
            }
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("bench"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let cross_config = mtls::cross_node_setup(args.cross_node, &bins, &out)?;
    let build_time = started.elapsed();

    let measure_start = Instant::now();
    let profile = Profile::new(args.quick, args.rate);
    let (results, world_notes) = {
        let mut world = World::setup(
            &bins,
            haproxy_bin.as_deref(),
            &out,
            args.cross_node,
            &cross_config,
        )?;
        let mut results = Vec::new();
        for path in world.paths.clone() {
            if !args.only.is_empty() && !args.only.iter().any(|o| o == path.name) {
                continue;
            }
            eprintln!("bench: measuring {} ...", path.label);
            let check = (path.name == paths::AGENT_CROSS).then(|| world.tunnel_before(&bins));
            let mut result = measure(&bins, &profile, &path);
            if let Some(before) = check {
                world.tunnel_after(&bins, args.cross_node, before, &mut result);
            }
            for error in &result.errors {
                eprintln!("bench: {}: {error}", path.name);
            }
            results.push(result);
        }
        let notes = world.notes();
        world.check_alive();
        (results, notes)
        // The world drops here: agents stop and uninstall, haproxy stops, topology goes.
    };
    let measure_time = measure_start.elapsed();
    let tls_micro = if args.no_tls_micro {
        Value::Null
    } else {
        eprintln!("bench: in-process mTLS micro-benchmark ...");
        mtls::tls_micro(args.quick, &out).unwrap_or_else(|e| {
            eprintln!("bench: mTLS micro-benchmark failed: {e:#}");
            json!({ "error": format!("{e:#}") })
        })
    };
    let meta = json!({
        "quick": args.quick,
        "cross_node_mode": format!("{:?}", args.cross_node).to_lowercase(),
        "profile": profile.json(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "build_s": build_time.as_secs_f64(),
        "measure_s": measure_time.as_secs_f64(),
        "notes": world_notes,
        "tls_micro": tls_micro,
    });
    let markdown = report::write(&out, &meta, &results, &profile)?;
    println!("{markdown}");
    println!(
        "bench: build {:.0} s, topology + measurement {:.0} s, total {:.0} s; results in {}",
        build_time.as_secs_f64(),
        measure_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        out.display()
    );
    if results.iter().any(|r| !r.errors.is_empty()) {
        bail!("some measurements failed (see above and results.json)");
    }
    if meta["tls_micro"].get("error").is_some() {
        bail!("the mTLS micro-benchmark failed (see above)");
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The topology and everything running in it. Fields drop in order: processes first, the
/// topology (namespaces, cgroups, pins) last.
struct World {
    /// Address of the remote mesh server pod (the agent cross-node path's endpoint).
    remote_ip: String,
    paths: Vec<PathSpec>,
    _servers: Vec<Background>,
    agents: Vec<RunningAgent>,
    haproxy: Option<haproxy::HaproxyPair>,
    _topology: Topology,
}

impl World {
    fn setup(
        bins: &Bins,
        haproxy_bin: Option<&Path>,
        out: &Path,
        cross_mode: CrossNodeMode,
        cross_config: &[String],
    ) -> Result<World> {
        let mut topo = Topology::new("bench")?;
        let n1 = topo.add_node("node1")?;
        let n2 = topo.add_node("node2")?;
        topo.connect_nodes(&n1, &n2)?;
        // Plain pods for the direct (and HAProxy) paths, enrolled pods for the agent paths:
        // an enrolled client's connects to pod IPs would be captured too.
        let client_direct = topo.add_pod(&n1, "client-direct")?;
        let client_mesh = topo.add_pod(&n1, "client-mesh")?;
        let server_direct_1 = topo.add_pod(&n1, "server-direct-1")?;
        let server_mesh_1 = topo.add_pod(&n1, "server-mesh-1")?;
        let server_direct_2 = topo.add_pod(&n2, "server-direct-2")?;
        let server_mesh_2 = topo.add_pod(&n2, "server-mesh-2")?;
        for client in [&client_direct, &client_mesh] {
            widen_ports(client)?;
        }
        let listen = format!("0.0.0.0:{SERVER_PORT}");
        let mut servers = Vec::new();
        for pod in [
            &server_direct_1,
            &server_mesh_1,
            &server_direct_2,
            &server_mesh_2,
        ] {
            servers.push(pod.spawn_ready(&bins.loadgen, ["server", "--listen", &listen])?);
        }

        let workloads = [
            WorkloadSpec {
                pod: &client_mesh,
                app: "client",
            },
            WorkloadSpec {
                pod: &server_mesh_1,
                app: "server-local",
            },
            WorkloadSpec {
                pod: &server_mesh_2,
                app: "server-remote",
            },
        ];
        let services = [
            ServiceSpec {
                name: "echo-local",
                vip: VIP_LOCAL,
                port: SERVICE_PORT,
                target_port: SERVER_PORT,
                app: "server-local",
            },
            ServiceSpec {
                name: "echo-remote",
                vip: VIP_REMOTE,
                port: SERVICE_PORT,
                target_port: SERVER_PORT,
                app: "server-remote",
            },
        ];
        // Two agents as on two hosts, each with its own config and pins; each node netns
        // has its own loopback, so both serve admin on 127.0.0.1:15000.
        let mut agents = Vec::new();
        for (node, bpf_name) in [
            (&n1, topo.bpf_pin_name()),
            (&n2, format!("{}-{}", topo.bpf_pin_name(), n2.name())),
        ] {
            let config = agent::config_yaml(
                node,
                &bpf_name,
                topo.cgroup_root(),
                cross_config,
                cross_mode.lists_remote_workloads(),
                &workloads,
                &services,
            );
            let log = out.join(format!("agent-{}.log", node.name()));
            agents.push(RunningAgent::start(
                &bins.agent,
                node,
                &bpf_name,
                topo.cgroup_root(),
                &config,
                log,
            )?);
        }
        let agent_proxy = |i: usize| Proxy {
            label: agents[i].label.clone(),
            pid: agents[i].pid(),
        };

        let haproxy = match haproxy_bin {
            Some(bin) => Some(haproxy::HaproxyPair::start(
                bin,
                &out.join("haproxy"),
                &n1,
                &n2,
                SocketAddr::new(n1.bridge_ipv4().into(), HAPROXY_FRONT_PORT),
                SocketAddr::new(n2.underlay_ipv4().into(), HAPROXY_TLS_PORT),
                SocketAddr::new(server_direct_2.ipv4().into(), SERVER_PORT),
            )?),
            None => None,
        };

        let to = |pod: &Pod| SocketAddr::new(pod.ipv4().into(), SERVER_PORT);
        let vip = |v: &str| -> Result<SocketAddr> { Ok(SocketAddr::new(v.parse()?, SERVICE_PORT)) };
        let mut paths = vec![
            PathSpec {
                name: paths::DIRECT_SAME,
                label: "direct same-node".into(),
                baseline: None,
                client: client_direct.clone(),
                target: to(&server_direct_1),
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::DIRECT_CROSS,
                label: "direct cross-node".into(),
                baseline: None,
                client: client_direct.clone(),
                target: to(&server_direct_2),
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::AGENT_SAME,
                label: "agent same-node".into(),
                baseline: Some(paths::DIRECT_SAME),
                client: client_mesh.clone(),
                target: vip(VIP_LOCAL)?,
                proxies: vec![agent_proxy(0)],
            },
            PathSpec {
                name: paths::AGENT_CROSS,
                label: cross_mode.label().into(),
                baseline: Some(paths::DIRECT_CROSS),
                client: client_mesh.clone(),
                target: vip(VIP_REMOTE)?,
                proxies: vec![agent_proxy(0), agent_proxy(1)],
            },
        ];
        if let Some(pair) = &haproxy {
            let pids = pair.pids();
            paths.push(PathSpec {
                name: paths::HAPROXY_CROSS,
                label: "HAProxy mTLS cross-node".into(),
                baseline: Some(paths::DIRECT_CROSS),
                client: client_direct.clone(),
                target: pair.front,
                proxies: vec![
                    Proxy {
                        label: "haproxy@node2".into(),
                        pid: pids[0],
                    },
                    Proxy {
                        label: "haproxy@node1".into(),
                        pid: pids[1],
                    },
                ],
            });
        }
        Ok(World {
            remote_ip: server_mesh_2.ipv4().to_string(),
            paths,
            _servers: servers,
            agents,
            haproxy,
            _topology: topo,
        })
    }

    /// Both agents' counters before the agent cross-node path.
    fn tunnel_before(&self, bins: &Bins) -> Result<mtls::Snapshot> {
        mtls::snapshot(&self.agents, bins)
    }

    /// Checks (after the agent cross-node path) that its connections rode the tunnel.
    fn tunnel_after(
        &self,
        bins: &Bins,
        mode: CrossNodeMode,
        before: Result<mtls::Snapshot>,
        result: &mut PathResult,
    ) {
        mtls::check(mode, &self.agents, bins, before, &self.remote_ip, result);
        for note in &result.notes {
            eprintln!("bench: {note}");
        }
    }

    /// The agents' status (capture counters) for the record.
    fn notes(&self) -> Value {
        let agents: Vec<Value> = self
            .agents
            .iter()
            .map(|a| {
                json!({
                    "agent": a.label,
                    "log": a.log.display().to_string(),
                    "status": a.status().unwrap_or_else(|e| json!(format!("{e:#}"))),
                })
            })
            .collect();
        json!({ "agents": agents })
    }

    fn check_alive(&mut self) {
        if let Some(pair) = &mut self.haproxy
            && let Err(e) = pair.check_running()
        {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Lets a client pod open many short connections: wide ephemeral port range and TIME_WAIT
/// reuse, inside the pod's own network namespace only.
fn widen_ports(pod: &Pod) -> Result<()> {
    pod.run(
        "sysctl",
        [
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    )
    .with_context(|| format!("setting port sysctls in {}", pod.name()))?;
    Ok(())
}

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
fn measure(bins: &Bins, p: &Profile, path: &PathSpec) -> PathResult {
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
