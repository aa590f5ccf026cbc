//! One `mesh-agent` per bench node: its YAML config, start in the node's network namespace
//! (never in a pod cgroup), readiness, status, and SIGTERM + `mesh-agent uninstall` on drop;
//! [`SwitchedAgent`] restarts one with another config between paths.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use mesh_tests::{Node, Pod, output_timeout};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use super::paths::Variant;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A workload entry: the pod and the `app` label services select on.
pub struct WorkloadSpec<'a> {
    pub pod: &'a Pod,
    pub app: &'a str,
}

/// A service entry: `vip:port` -> `target_port` of the pods labelled `app`.
pub struct ServiceSpec<'a> {
    pub name: &'a str,
    pub vip: &'a str,
    pub port: u16,
    pub target_port: u16,
    pub app: &'a str,
    /// Its `trafficPolicy`, as a YAML flow mapping; `None`: the defaults.
    pub traffic_policy: Option<&'a str>,
}

/// The agent config for `node`; `extra_agent` is more YAML for the `agent` block (indented
/// by two spaces), e.g. what a cross-node mode needs. With `remote_workloads` the config
/// lists the workloads of every node (the mTLS tunnel needs to know a remote endpoint is a
/// mesh pod); without, only `node`'s own, and a service whose pods are all elsewhere gets
/// their addresses as plain endpoints.
pub fn config_yaml(
    node: &Node,
    bpf_name: &str,
    cgroup: &Path,
    extra_agent: &[String],
    remote_workloads: bool,
    workloads: &[WorkloadSpec<'_>],
    services: &[ServiceSpec<'_>],
) -> String {
    let listed: Vec<&WorkloadSpec<'_>> = workloads
        .iter()
        .filter(|w| remote_workloads || w.pod.node_name() == node.name())
        .collect();
    let mut out = String::new();
    let _ = writeln!(out, "agent:");
    let _ = writeln!(out, "  node: {}", node.name());
    let _ = writeln!(out, "  bpfName: {bpf_name}");
    let _ = writeln!(out, "  cgroup: {}", cgroup.display());
    let _ = writeln!(out, "  adminAddr: 127.0.0.1:15000");
    let _ = writeln!(out, "  connectTimeoutMs: 2000");
    for line in extra_agent {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "workloads:");
    for w in &listed {
        let local = w.pod.node_name() == node.name();
        let _ = writeln!(out, "  - name: {}", w.pod.name());
        let _ = writeln!(out, "    namespace: bench");
        let _ = writeln!(out, "    serviceAccount: {}", w.app);
        let _ = writeln!(out, "    ips: [\"{}\"]", w.pod.ipv4());
        let _ = writeln!(out, "    node: {}", w.pod.node_name());
        if local {
            let _ = writeln!(out, "    netns: {}", w.pod.netns_path().display());
        }
        let _ = writeln!(out, "    labels: {{app: {}}}", w.app);
    }
    let _ = writeln!(out, "services:");
    for s in services {
        let _ = writeln!(out, "  - name: {}", s.name);
        let _ = writeln!(out, "    namespace: bench");
        let _ = writeln!(out, "    vips: [\"{}\"]", s.vip);
        let _ = writeln!(out, "    ports:");
        let _ = writeln!(out, "      - port: {}", s.port);
        let _ = writeln!(out, "        targetPort: {}", s.target_port);
        let _ = writeln!(out, "    endpoints:");
        if listed.iter().any(|w| w.app == s.app) {
            let _ = writeln!(out, "      selector: {{app: {}}}", s.app);
        } else {
            let addresses: Vec<String> = workloads
                .iter()
                .filter(|w| w.app == s.app)
                .map(|w| format!("\"{}\"", w.pod.ipv4()))
                .collect();
            let _ = writeln!(out, "      addresses: [{}]", addresses.join(", "));
        }
        if let Some(policy) = s.traffic_policy {
            let _ = writeln!(out, "    trafficPolicy: {policy}");
        }
    }
    out
}

/// The `mesh_connections_total{direction, security, outcome}` counters of one `/metrics`
/// scrape, and each metric's sum over its series.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    connections: Vec<(Series, f64)>,
    totals: BTreeMap<String, f64>,
}

/// The labels of one `mesh_connections_total` series the bench looks at.
#[derive(Clone, Debug, Default)]
struct Series {
    direction: String,
    security: String,
    outcome: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut connections = Vec::new();
        let mut totals = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            if let Some(Ok(value)) = line.rsplit(' ').next().map(str::parse::<f64>) {
                *totals.entry(line[..name_end].to_owned()).or_insert(0.0) += value;
            }
            let Some(rest) = line.strip_prefix("mesh_connections_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| k.trim() == name)
                    .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                    .unwrap_or_default()
            };
            let series = Series {
                direction: label("direction"),
                security: label("security"),
                outcome: label("outcome"),
            };
            connections.push((series, value));
        }
        Metrics {
            connections,
            totals,
        }
    }

    /// The sum of every series of metric `name` (0 when absent).
    pub fn total(&self, name: &str) -> f64 {
        self.totals.get(name).copied().unwrap_or(0.0)
    }

    /// `mesh_connections_total` for `direction` whose `security` and `outcome` pass the
    /// filters.
    pub fn connections(
        &self,
        direction: &str,
        security: impl Fn(&str) -> bool,
        outcome: impl Fn(&str) -> bool,
    ) -> f64 {
        self.connections
            .iter()
            .filter(|(s, _)| {
                s.direction == direction && security(&s.security) && outcome(&s.outcome)
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// A running agent, stopped (SIGTERM) and uninstalled when dropped.
pub struct RunningAgent {
    child: Option<Child>,
    node: Node,
    bin: PathBuf,
    bpf_name: String,
    pub label: String,
    pub log: PathBuf,
}

impl RunningAgent {
    /// Writes `config` next to `log` and starts the agent in `node`'s network namespace.
    pub fn start(
        bin: &Path,
        node: &Node,
        bpf_name: &str,
        cgroup: &Path,
        config: &str,
        log: PathBuf,
    ) -> Result<Self> {
        let config_path = log.with_extension("yaml");
        fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = node.try_command(bin)?;
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--cgroup")
            .arg(cgroup)
            // As users run it: info, with one access-log line per connection (to the log
            // file); the no-telemetry path turns the access log off in its config.
            .env(
                "RUST_LOG",
                std::env::var("MESH_BENCH_AGENT_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = command.spawn().context("starting mesh-agent")?;
        let mut agent = RunningAgent {
            child: Some(child),
            node: node.clone(),
            bin: bin.to_owned(),
            bpf_name: bpf_name.to_owned(),
            label: format!("mesh-agent@{}", node.name()),
            log,
        };
        agent.wait_ready()?;
        Ok(agent)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "{} exited during start-up ({status}); see {}",
                    self.label,
                    self.log.display()
                );
            }
            if self.status().is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not serve its admin API within {READY_TIMEOUT:?}; see {}",
                    self.label,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mesh-agent status --json` in the node's network namespace.
    pub fn status(&self) -> Result<serde_json::Value> {
        let mut command = self.node.try_command(&self.bin)?;
        command.args(["status", "--json"]);
        let output = output_timeout(&mut command, Duration::from_secs(5))?;
        if !output.status.success() {
            bail!(
                "mesh-agent status: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout).context("parsing mesh-agent status --json")
    }

    /// The agent's Prometheus `/metrics`, fetched from inside the node's network namespace
    /// (the admin API listens on the node's loopback) with `mesh-loadgen http-get`.
    pub fn metrics(&self, loadgen: &Path) -> Result<Metrics> {
        let mut command = self.node.try_command(loadgen)?;
        command.args([
            "http-get",
            "--addr",
            "127.0.0.1:15000",
            "--path",
            "/metrics",
        ]);
        let output = output_timeout(&mut command, Duration::from_secs(5))?;
        if !output.status.success() {
            bail!(
                "GET /metrics of {}: {}",
                self.label,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(Metrics::parse(&String::from_utf8_lossy(&output.stdout)))
    }

    /// Whether `status --json` looks healthy: config applied without rejections, programs
    /// loaded, every listed workload enrolled (a netns cookie) and holding a certificate.
    pub fn check_healthy(&self) -> Result<serde_json::Value> {
        let status = self.status()?;
        let mut problems = Vec::new();
        if status["config"]["rejected"].as_u64().unwrap_or(0) > 0 {
            problems.push(format!(
                "config rejected: {}",
                status["config"]["lastError"]
            ));
        }
        if status["programs"].as_array().is_none_or(Vec::is_empty) {
            problems.push("no eBPF programs".into());
        }
        let workloads = status["workloads"].as_array().cloned().unwrap_or_default();
        if workloads.is_empty() {
            problems.push("no enrolled workloads".into());
        }
        for w in &workloads {
            if w["netnsCookie"].as_u64().unwrap_or(0) == 0 {
                problems.push(format!("{} not enrolled", w["workload"]));
            }
        }
        if status["certificates"].as_array().is_none_or(Vec::is_empty) {
            problems.push("no workload certificates".into());
        }
        if !problems.is_empty() {
            bail!("{} unhealthy: {}", self.label, problems.join("; "));
        }
        Ok(status)
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Our own, not yet reaped, child: the pid cannot have been reused.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} ignored SIGTERM for 5 s; killing it", self.label);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop();
        let uninstall = Command::new(&self.bin)
            .args(["uninstall", "--name", &self.bpf_name])
            .stdout(Stdio::null())
            .status();
        if !uninstall.is_ok_and(|s| s.success()) {
            eprintln!("mesh-agent uninstall --name {} failed", self.bpf_name);
        }
    }
}

/// One node's agent, running one of two configs, plain or with the traffic policy, as the
/// path being measured needs. Switching stops and uninstalls the running agent before the
/// next one starts: two agents must never hold the same pods, and no agent runs besides
/// the node's one.
pub struct SwitchedAgent {
    bin: PathBuf,
    node: Node,
    bpf_name: String,
    cgroup: PathBuf,
    out: PathBuf,
    /// The config of each [`Variant`], in [`Variant::ALL`] order.
    configs: [String; 3],
    /// The agent running now and the variant it runs.
    running: Option<(Variant, RunningAgent)>,
    /// Every start so far: its variant and log.
    pub starts: Vec<(&'static str, PathBuf)>,
}

impl SwitchedAgent {
    /// Starts `node`'s agent with the plain config (logs and configs go to `out`); `configs`
    /// are the configs of [`Variant::ALL`].
    pub fn start(
        bin: &Path,
        node: &Node,
        bpf_name: &str,
        cgroup: &Path,
        out: &Path,
        configs: [String; 3],
    ) -> Result<Self> {
        let mut agent = SwitchedAgent {
            bin: bin.to_owned(),
            node: node.clone(),
            bpf_name: bpf_name.to_owned(),
            cgroup: cgroup.to_owned(),
            out: out.to_owned(),
            configs,
            running: None,
            starts: Vec::new(),
        };
        agent.ensure(Variant::Plain)?;
        Ok(agent)
    }

    /// The agent running now, if any (none when the last start failed).
    pub fn running(&self) -> Option<&RunningAgent> {
        self.running.as_ref().map(|(_, agent)| agent)
    }

    /// Makes the agent run the config of `variant`, restarting it when it runs another.
    pub fn ensure(&mut self, variant: Variant) -> Result<()> {
        if self.running.as_ref().is_some_and(|(v, _)| *v == variant) {
            return Ok(());
        }
        // Stopped and uninstalled before the next starts.
        self.running = None;
        let kind = variant.as_str();
        let name = match self.starts.len() {
            0 => format!("agent-{}.log", self.node.name()),
            n => format!("agent-{}-{}-{kind}.log", self.node.name(), n + 1),
        };
        let log = self.out.join(name);
        self.starts.push((kind, log.clone()));
        let index = Variant::ALL
            .iter()
            .position(|v| *v == variant)
            .unwrap_or_default();
        let agent = RunningAgent::start(
            &self.bin,
            &self.node,
            &self.bpf_name,
            &self.cgroup,
            &self.configs[index],
            log,
        )?;
        self.running = Some((variant, agent));
        Ok(())
    }
}
