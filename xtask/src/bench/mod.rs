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
//! The agent same-node path runs three times: as deployed (access log and all metrics on),
//! with the traffic policy ([`policy`]), and with per-connection telemetry off (no access
//! log, no Istio metrics): node1's agent restarts with the other config in between, never
//! running next to another. What the policy and the telemetry cost is then measured apart,
//! the variants alternating in rotated order ([`on_off`]).
//!
//! Results go to `<out>/results.json`, `results.md` (printed at the end) and `latency.svg`.

mod agent;
mod haproxy;
mod measure;
mod mtls;
mod on_off;
mod paths;
mod perf;
mod policy;
mod procstat;
mod report;
mod settings;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Background, Node, Pod, Topology};
use serde_json::{Value, json};

use crate::{
    command::{cargo, run, target_dir},
    ebpf, setup,
};
use agent::{RunningAgent, ServiceSpec, SwitchedAgent, WorkloadSpec};
use measure::measure;
pub use paths::CrossNodeMode;
use paths::{PathResult, PathSpec, Proxy, Variant};
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
    /// Measure only these paths (comma-separated keys: direct-same-node, direct-cross-node,
    /// agent-same-node, agent-same-node-policy, agent-same-node-no-telemetry,
    /// agent-cross-node, haproxy-tls-cross-node); ratios need their direct path in the list
    /// too, policy and telemetry on / off their agent same-node paths.
    #[arg(long, value_delimiter = ',', value_name = "PATHS")]
    only: Vec<String>,
    /// Profile the proxies (`perf record -g`) during this phase of each path measured:
    /// OUT/perf-<path>-<phase>.data.
    #[arg(long, value_enum, value_name = "PHASE")]
    perf: Option<perf::Phase>,
}

pub fn run_bench(args: &Args) -> Result<()> {
    let started = Instant::now();
    setup::require_root("the bench loads eBPF programs and creates network namespaces")?;
    setup::machine()?;
    // The agent embeds MESH_EBPF_OBJECT when it is set (mesh-agent/build.rs): nothing to build.
    if std::env::var_os("MESH_EBPF_OBJECT").is_none() {
        ebpf::build()?;
    }
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
    let perf = args.perf.map(|phase| perf::Perf {
        phase,
        out: out.clone(),
    });
    let (results, comparisons, world_notes) = {
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
            let path = match world.prepare(&path) {
                Ok(path) => path,
                Err(e) => {
                    let mut result = PathResult::new(&path);
                    result.errors.push(format!("agent: {e:#}"));
                    eprintln!("bench: {}: agent: {e:#}", path.name);
                    results.push(result);
                    continue;
                }
            };
            let check = (path.name == paths::AGENT_CROSS).then(|| world.tunnel_before(&bins));
            let mut result = measure(&bins, &profile, &path, perf.as_ref());
            if let Some(before) = check {
                world.tunnel_after(&bins, args.cross_node, before, &mut result);
            }
            if path.variant == Variant::Policy {
                policy::check(world.node1.running(), &bins, &mut result);
                for note in &result.notes {
                    eprintln!("bench: {note}");
                }
            }
            for error in &result.errors {
                eprintln!("bench: {}: {error}", path.name);
            }
            results.push(result);
        }
        let comparisons =
            on_off::run(&mut world, &bins, &profile, &args.only).unwrap_or_else(|e| {
                eprintln!("bench: on / off comparison: {e:#}");
                json!({ "error": format!("{e:#}") })
            });
        let notes = world.notes();
        world.check_alive();
        (results, comparisons, notes)
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
    let markdown = report::write(&out, &meta, &results, &comparisons, &profile)?;
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
    if comparisons.get("error").is_some() {
        bail!("the on / off comparison failed (see above)");
    }
    if meta["tls_micro"].get("error").is_some() {
        bail!("the mTLS micro-benchmark failed (see above)");
    }
    Ok(())
}

/// The topology and everything running in it. Fields drop in order: processes first, the
/// topology (namespaces, cgroups, pins) last.
struct World {
    /// Address of the remote mesh server pod (the agent cross-node path's endpoint).
    remote_ip: String,
    paths: Vec<PathSpec>,
    _servers: Vec<Background>,
    /// node1's agent: plain, or the config of the path's variant.
    node1: SwitchedAgent,
    node2: RunningAgent,
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
        // The same-node service, without or with the traffic policy (see `policy`); the
        // cross-node one keeps the defaults.
        let services = |traffic_policy: &'static str| {
            [
                ServiceSpec {
                    name: "echo-local",
                    vip: VIP_LOCAL,
                    port: SERVICE_PORT,
                    target_port: SERVER_PORT,
                    app: "server-local",
                    traffic_policy: Some(traffic_policy),
                },
                ServiceSpec {
                    name: "echo-remote",
                    vip: VIP_REMOTE,
                    port: SERVICE_PORT,
                    target_port: SERVER_PORT,
                    app: "server-remote",
                    traffic_policy: None,
                },
            ]
        };
        let config = |node: &Node, bpf_name: &str, traffic_policy: &'static str| {
            agent::config_yaml(
                node,
                bpf_name,
                topo.cgroup_root(),
                cross_config,
                cross_mode.lists_remote_workloads(),
                &workloads,
                &services(traffic_policy),
            )
        };
        // Two agents as on two hosts, each with its own config and pins; each node netns
        // has its own loopback, so both serve admin on 127.0.0.1:15000.
        let bpf_name1 = topo.bpf_pin_name();
        let node1 = SwitchedAgent::start(
            &bins.agent,
            &n1,
            &bpf_name1,
            topo.cgroup_root(),
            out,
            [
                config(&n1, &bpf_name1, policy::PLAIN_TRAFFIC),
                config(&n1, &bpf_name1, policy::POLICY_TRAFFIC)
                    + &policy::rate_limit_yaml("server-local"),
                config(&n1, &bpf_name1, policy::PLAIN_TRAFFIC).replacen(
                    "agent:\n",
                    "agent:\n  accessLog: {enabled: false}\n  istioMetrics: false\n",
                    1,
                ),
            ],
        )?;
        let bpf_name2 = format!("{}-{}", topo.bpf_pin_name(), n2.name());
        let node2 = RunningAgent::start(
            &bins.agent,
            &n2,
            &bpf_name2,
            topo.cgroup_root(),
            &config(&n2, &bpf_name2, policy::PLAIN_TRAFFIC),
            out.join(format!("agent-{}.log", n2.name())),
        )?;

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
                agents: Vec::new(),
                variant: Variant::Plain,
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::DIRECT_CROSS,
                label: "direct cross-node".into(),
                baseline: None,
                client: client_direct.clone(),
                target: to(&server_direct_2),
                agents: Vec::new(),
                variant: Variant::Plain,
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::AGENT_SAME,
                label: "agent same-node".into(),
                baseline: Some(paths::DIRECT_SAME),
                client: client_mesh.clone(),
                target: vip(VIP_LOCAL)?,
                agents: vec![0],
                variant: Variant::Plain,
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::AGENT_SAME_POLICY,
                label: "agent same-node + policy".into(),
                baseline: Some(paths::DIRECT_SAME),
                client: client_mesh.clone(),
                target: vip(VIP_LOCAL)?,
                agents: vec![0],
                variant: Variant::Policy,
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::AGENT_SAME_QUIET,
                label: "agent same-node, no telemetry".into(),
                baseline: Some(paths::DIRECT_SAME),
                client: client_mesh.clone(),
                target: vip(VIP_LOCAL)?,
                agents: vec![0],
                variant: Variant::Quiet,
                proxies: Vec::new(),
            },
            PathSpec {
                name: paths::AGENT_CROSS,
                label: cross_mode.label().into(),
                baseline: Some(paths::DIRECT_CROSS),
                client: client_mesh.clone(),
                target: vip(VIP_REMOTE)?,
                agents: vec![0, 1],
                variant: Variant::Plain,
                proxies: Vec::new(),
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
                agents: Vec::new(),
                variant: Variant::Plain,
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
            node1,
            node2,
            haproxy,
            _topology: topo,
        })
    }

    /// Both agents, node1's first; an error while node1's is not running (its last start
    /// failed).
    fn agents(&self) -> Result<[&RunningAgent; 2]> {
        let node1 = self
            .node1
            .running()
            .context("node1's agent is not running (its last start failed)")?;
        Ok([node1, &self.node2])
    }

    /// Readies the agents for `path` (node1's runs the config the path needs) and returns the
    /// path with its agents among its proxies.
    fn prepare(&mut self, path: &PathSpec) -> Result<PathSpec> {
        self.node1.ensure(path.variant)?;
        let agents = self.agents()?;
        let mut ready = path.clone();
        ready.proxies = path
            .agents
            .iter()
            .filter_map(|i| agents.get(*i))
            .map(|a| Proxy {
                label: a.label.clone(),
                pid: a.pid(),
            })
            .chain(path.proxies.iter().cloned())
            .collect();
        Ok(ready)
    }

    /// Both agents' counters before the agent cross-node path.
    fn tunnel_before(&self, bins: &Bins) -> Result<mtls::Snapshot> {
        mtls::snapshot(self.agents()?, bins)
    }

    /// Checks (after the agent cross-node path) that its connections rode the tunnel.
    fn tunnel_after(
        &self,
        bins: &Bins,
        mode: CrossNodeMode,
        before: Result<mtls::Snapshot>,
        result: &mut PathResult,
    ) {
        match self.agents() {
            Ok(agents) => mtls::check(mode, agents, bins, before, &self.remote_ip, result),
            Err(e) => result.errors.push(format!("tunnel check: {e:#}")),
        }
        for note in &result.notes {
            eprintln!("bench: {note}");
        }
    }

    /// The agents' status (capture counters) for the record, and node1's agent's starts.
    fn notes(&self) -> Value {
        let agents: Vec<Value> = self
            .node1
            .running()
            .into_iter()
            .chain([&self.node2])
            .map(|a| {
                json!({
                    "agent": a.label,
                    "log": a.log.display().to_string(),
                    "status": a.status().unwrap_or_else(|e| json!(format!("{e:#}"))),
                })
            })
            .collect();
        let starts: Vec<Value> = self
            .node1
            .starts
            .iter()
            .map(|(config, log)| json!({"config": config, "log": log.display().to_string()}))
            .collect();
        json!({ "agents": agents, "node1_starts": starts })
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
