//! Running the real `mesh-agent` binary in a test node: start it in the node's network
//! namespace with a generated config, wait until it serves, read its status, stop it with
//! SIGTERM, and remove its pins whatever happens.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{Node, Pod, Topology, exec::output_timeout};

const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `mesh-agent status` may take in a test.
const STATUS_TIMEOUT: Duration = Duration::from_secs(15);

/// Where the agent serves its admin API (`/metrics` among others): loopback inside its
/// node's netns, the default `agent.adminAddr`.
pub const ADMIN_ADDRESS: &str = "127.0.0.1:15000";

/// The agent binary: `MESH_AGENT_BIN`, else next to the running test (target/<profile>/).
/// `cargo xtask test` builds it before the tests run.
pub fn agent_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_AGENT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("mesh-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "mesh-agent not found near {} (run the tests with `cargo xtask test`, or \
         `cargo build -p mesh-agent` first, or set MESH_AGENT_BIN)",
        exe.display()
    )
}

/// `mesh-agent ca init --dir DIR`: a CA for agents of several test nodes to share.
pub fn init_ca(dir: &Path) -> Result<()> {
    let out = Command::new(agent_path()?)
        .args(["ca", "init", "--dir"])
        .arg(dir)
        .output()
        .context("running mesh-agent ca init")?;
    if !out.status.success() {
        bail!("ca init: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Builds an agent configuration for one node of a topology.
pub struct ConfigBuilder {
    node: String,
    bpf_name: String,
    cgroup: PathBuf,
    workloads: Vec<String>,
    services: Vec<String>,
    agent_extra: Vec<String>,
    policies: Option<String>,
}

impl ConfigBuilder {
    pub fn new(topology: &Topology, node: &Node) -> Self {
        Self {
            node: node.name().to_owned(),
            bpf_name: topology.bpf_pin_name(),
            cgroup: topology.cgroup_root().to_owned(),
            workloads: Vec::new(),
            services: Vec::new(),
            agent_extra: Vec::new(),
            policies: None,
        }
    }

    /// The cgroup the agent attaches its programs to (default: the test's cgroup root), e.g.
    /// [`Topology::kubepods_root`] for pods in the kubelet's layout.
    pub fn cgroup(mut self, dir: &Path) -> Self {
        self.cgroup = dir.to_owned();
        self
    }

    /// A workload for `pod` (name = pod name, namespace `test`), with both its IPs; `extra`
    /// is more YAML for the entry (e.g. "failMode: closed"), indented by the builder.
    pub fn workload(mut self, pod: &Pod, labels: &[(&str, &str)], extra: &[&str]) -> Self {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let mut entry = format!(
            "  - name: {}\n    namespace: test\n    serviceAccount: {}\n    ips: [\"{}\", \"{}\"]\n    node: {}\n    netns: {}\n    labels: {{{}}}\n",
            pod.name(),
            pod.name(),
            pod.ipv4(),
            pod.ipv6(),
            pod.node_name(),
            pod.netns_path().display(),
            labels.join(", "),
        );
        for line in extra {
            entry.push_str(&format!("    {line}\n"));
        }
        self.workloads.push(entry);
        self
    }

    /// A service `name` in namespace `test` with the given VIPs, one port, selecting by labels.
    pub fn service(
        mut self,
        name: &str,
        vips: &[&str],
        port: u16,
        target_port: u16,
        selector: &[(&str, &str)],
    ) -> Self {
        let vips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
        let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        self.services.push(format!(
            "  - name: {name}\n    namespace: test\n    vips: [{}]\n    ports:\n      - port: {port}\n        targetPort: {target_port}\n    endpoints:\n      selector: {{{}}}\n",
            vips.join(", "),
            selector.join(", "),
        ));
        self
    }

    /// As [`service`](Self::service), with more YAML for the service entry (e.g. a
    /// `trafficPolicy:` block), indented by the builder by four spaces.
    pub fn service_with(
        mut self,
        name: &str,
        vips: &[&str],
        (port, target_port): (u16, u16),
        selector: &[(&str, &str)],
        extra: &str,
    ) -> Self {
        self = self.service(name, vips, port, target_port, selector);
        if let Some(entry) = self.services.last_mut() {
            for line in extra.lines() {
                entry.push_str(&format!("    {line}\n"));
            }
        }
        self
    }

    /// One more line of the `agent` block, e.g. `caCertFile: /path`.
    pub fn agent_line(mut self, line: &str) -> Self {
        self.agent_extra.push(format!("  {line}\n"));
        self
    }

    /// The `policies` block, as YAML indented by two spaces (e.g. `  authorization: ...`).
    pub fn policies(mut self, yaml: &str) -> Self {
        self.policies = Some(yaml.to_owned());
        self
    }

    pub fn build(&self) -> String {
        let mut out = format!(
            "agent:\n  node: {}\n  bpfName: {}\n  cgroup: {}\n  connectTimeoutMs: 2000\nworkloads:\n",
            self.node,
            self.bpf_name,
            self.cgroup.display()
        );
        let workloads_at = out.len() - "workloads:\n".len();
        let mut extra = self.agent_extra.concat();
        if fast_path_from_env() && !self.agent_extra.iter().any(|l| l.contains("fastPath:")) {
            extra.push_str("  fastPath: true\n");
        }
        out.insert_str(workloads_at, &extra);
        if self.workloads.is_empty() {
            out.push_str("  []\n");
        }
        for workload in &self.workloads {
            out.push_str(workload);
        }
        out.push_str("services:\n");
        if self.services.is_empty() {
            out.push_str("  []\n");
        }
        for service in &self.services {
            out.push_str(service);
        }
        if let Some(policies) = &self.policies {
            out.push_str("policies:\n");
            out.push_str(policies);
        }
        out
    }
}

/// `MESH_TEST_FAST_PATH=1` runs every suite with the eBPF fast path on (`agent.fastPath`),
/// unless a test sets it itself.
pub fn fast_path_from_env() -> bool {
    std::env::var("MESH_TEST_FAST_PATH").is_ok_and(|v| v == "1")
}

/// A running agent; stopped (SIGTERM, then SIGKILL) and uninstalled on drop.
pub struct Agent {
    child: Option<Child>,
    node: Node,
    bpf_name: String,
    config_path: PathBuf,
    /// `--log-format json` instead of text.
    json_logs: bool,
    /// Everything the agent wrote to stderr (also passed on to the test's stderr).
    log: Arc<Mutex<Vec<String>>>,
    /// Set: the test stops reading the agent's stderr (a stalled log reader).
    log_paused: Arc<AtomicBool>,
    /// Leave the pins and the config on drop: a successor on the node uses them.
    keep_pins: bool,
    /// `--source kubernetes` with this KUBECONFIG (the file then holds the agent block only).
    kubeconfig: Option<PathBuf>,
}

impl Agent {
    /// Writes `config` to a file and starts the agent on `node`, waiting until it serves.
    pub fn start(topology: &Topology, node: &Node, config: &str) -> Result<Agent> {
        Self::start_with(topology, node, config, None)
    }

    /// As [`start`](Self::start), with the Kubernetes source (`--source kubernetes`) reading
    /// the API named by `kubeconfig`; `config` holds the agent block only. Returns once the
    /// agent serves, which is after its initial sync.
    pub fn start_kubernetes(
        topology: &Topology,
        node: &Node,
        config: &str,
        kubeconfig: &Path,
    ) -> Result<Agent> {
        let mut agent = Self::prepare(topology, node, config)?;
        agent.kubeconfig = Some(kubeconfig.to_owned());
        agent.spawn(None)?;
        Ok(agent)
    }

    /// As [`start`](Self::start), logging JSON lines (`--log-format json`).
    pub fn start_json_logs(topology: &Topology, node: &Node, config: &str) -> Result<Agent> {
        let mut agent = Self::prepare(topology, node, config)?;
        agent.json_logs = true;
        agent.spawn(None)?;
        Ok(agent)
    }

    /// As [`start`](Self::start), with the agent process placed in `cgroup` first (to put
    /// it under the cgroup its own programs are attached to).
    pub fn start_with(
        topology: &Topology,
        node: &Node,
        config: &str,
        cgroup: Option<&Path>,
    ) -> Result<Agent> {
        let mut agent = Self::prepare(topology, node, config)?;
        agent.spawn(cgroup)?;
        Ok(agent)
    }

    /// Writes the config; not started yet.
    fn prepare(topology: &Topology, node: &Node, config: &str) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("mesh-test-{}", topology.id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join(format!("{}.yaml", node.name()));
        fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        // The pin name the config gives (a second agent in a topology has its own).
        let bpf_name = config
            .lines()
            .find_map(|line| line.trim().strip_prefix("bpfName:"))
            .map_or_else(|| topology.bpf_pin_name(), |name| name.trim().to_owned());
        Ok(Agent {
            child: None,
            node: node.clone(),
            bpf_name,
            config_path,
            json_logs: false,
            log: Arc::default(),
            log_paused: Arc::default(),
            keep_pins: false,
            kubeconfig: None,
        })
    }

    // Unsafe: `CommandExt::pre_exec`, to join the cgroup between fork and exec.
    #[allow(unsafe_code)]
    fn spawn(&mut self, cgroup: Option<&Path>) -> Result<()> {
        let mut command = self.node.try_command(agent_path()?)?;
        if let Some(cgroup) = cgroup {
            let procs = cgroup.join("cgroup.procs");
            fs::create_dir_all(cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
            let file = fs::OpenOptions::new().write(true).open(&procs)?;
            use std::os::{fd::AsRawFd, unix::process::CommandExt};
            let fd = file.as_raw_fd();
            // SAFETY: only async-signal-safe calls (getpid, write) between fork and exec; the
            // file stays open in the parent until the spawn returns.
            unsafe {
                command.pre_exec(move || {
                    let mut buf = [0u8; 16];
                    let pid = libc::getpid() as u32;
                    let len = format_u32(pid, &mut buf);
                    if libc::write(fd, buf.as_ptr().cast(), len) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            self.child = Some(self.launch(&mut command)?);
            drop(file);
        } else {
            self.child = Some(self.launch(&mut command)?);
        }
        self.wait_ready()
    }

    fn launch(&self, command: &mut Command) -> Result<Child> {
        if self.json_logs {
            command.args(["--log-format", "json"]);
        }
        let config = &self.config_path;
        command.arg("run").arg("--config").arg(config);
        if let Some(kubeconfig) = &self.kubeconfig {
            command
                .args(["--source", "kubernetes"])
                .env("KUBECONFIG", kubeconfig);
        }
        command
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting mesh-agent")?;
        if let Some(stderr) = child.stderr.take() {
            let log = self.log.clone();
            let paused = self.log_paused.clone();
            // Ends at EOF, when the agent exits.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    while paused.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    eprintln!("{line}");
                    if let Ok(mut log) = log.lock() {
                        log.push(line);
                    }
                }
            });
        }
        Ok(child)
    }

    /// Stops (`true`) or resumes reading the agent's stderr: stopped, the pipe fills and the
    /// agent's writes to it block, as behind a stuck container runtime.
    pub fn pause_log_reader(&self, paused: bool) {
        self.log_paused.store(paused, Ordering::Relaxed);
    }

    /// The lines the agent has logged so far (since it was first started).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().map(|log| log.clone()).unwrap_or_default()
    }

    /// Its access-log lines so far (target `access`), text or JSON as it logs.
    pub fn access_log(&self) -> Vec<String> {
        self.log_lines()
            .into_iter()
            .filter(|line| line.contains(" access: ") || line.contains(r#""target":"access""#))
            .collect()
    }

    /// Waits for this process's "agent ready" line (not the admin API: another agent of
    /// the node may answer there during a handover).
    fn wait_ready(&mut self) -> Result<()> {
        let log = self.log.clone();
        let ready_lines = move || {
            log.lock()
                .map(|lines| lines.iter().filter(|l| l.contains("agent ready")).count())
                .unwrap_or(0)
        };
        let before = ready_lines();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("mesh-agent exited during start-up ({status}); its log is above");
            }
            if ready_lines() > before {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mesh-agent was not ready within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mesh-agent status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let mut command = self.node.try_command(agent_path()?)?;
        command
            .args(["status", "--json"])
            .env_remove("RUST_BACKTRACE");
        // Generous: suites run their tests in parallel on a 2-core machine, one of them
        // flooding a CA; a status that takes long is not what these tests are about.
        let output = output_timeout(&mut command, STATUS_TIMEOUT)?;
        if !output.status.success() {
            bail!(
                "mesh-agent status: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout).context("parsing mesh-agent status --json")
    }

    /// `mesh-agent status` as a person sees it.
    pub fn status_table(&self) -> Result<String> {
        let output = self.status_command(&[])?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `mesh-agent status ARGS...` (a view, `--json`...) run in the agent's node, whatever
    /// its outcome: the agent may be stopped.
    pub fn status_command(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut command = self.node.try_command(agent_path()?)?;
        command
            .arg("status")
            .args(args)
            .env_remove("RUST_BACKTRACE");
        output_timeout(&mut command, Duration::from_secs(10))
    }

    /// The body of `GET PATH` on the agent's admin API, read from inside its node.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let mut command = self.node.try_command(crate::testtool_path()?)?;
        command.args(["http-get", "--connect", "127.0.0.1:15000", "--path", path]);
        let output = output_timeout(&mut command, Duration::from_secs(5))?;
        if !output.status.success() {
            bail!("GET {path}: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The agent's `/metrics` (Prometheus text), read from inside its node.
    pub fn metrics(&self) -> Result<String> {
        self.admin_get("/metrics")
    }

    /// The value of the sample `name{labels}` in `/metrics` (labels in any order, all of
    /// them given); 0 when the series does not exist yet.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_value(&self.metrics()?, name, labels))
    }

    /// The sum of `name` over the series whose labels include all of `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&self.metrics()?, name, labels))
    }

    /// The counters of one workload (`test/<pod>`) from the status report.
    pub fn workload_counters(&self, pod: &Pod) -> Result<serde_json::Value> {
        let status = self.status()?;
        let name = format!("test/{}", pod.name());
        status["workloads"]
            .as_array()
            .and_then(|all| all.iter().find(|w| w["workload"] == name.as_str()).cloned())
            .with_context(|| format!("{name} is not in the status report: {status}"))
    }

    /// Replaces the config file (the agent reloads it within a second or so).
    pub fn write_config(&self, config: &str) -> Result<()> {
        // Write then rename, as a config management tool would.
        let temp = self.config_path.with_extension("yaml.new");
        fs::write(&temp, config)?;
        fs::rename(&temp, &self.config_path)?;
        Ok(())
    }

    /// Replaces the config file and waits until the agent has applied it.
    pub fn reload(&self, config: &str) -> Result<()> {
        let applied = |status: &serde_json::Value| status["config"]["applied"].as_u64();
        let before = applied(&self.status()?).context("no config.applied in the status")?;
        self.write_config(config)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status()?;
            if applied(&status).is_some_and(|now| now > before) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not apply the new config within 10 s: {}",
                    status["config"]
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// SIGTERM, waiting up to 5 s for a clean exit; pins stay (like a real restart).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running")
        };
        // Our own, not yet reaped, child: the pid cannot have been reused.
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mesh-agent did not exit within 5 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and returns at once: the agent hands over and drains (see
    /// [`wait_exit`](Self::wait_exit)). Its pins and config stay when it is dropped, for the
    /// successor that shares them.
    pub fn terminate(&mut self) -> Result<()> {
        let Some(child) = self.child.as_ref() else {
            bail!("the agent is not running")
        };
        self.keep_pins = true;
        // Our own, not yet reaped, child: the pid cannot have been reused.
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits up to `timeout` for the agent to exit; its exit status and how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent is not running")
        };
        let started = Instant::now();
        let status = crate::wait_timeout(&mut child, timeout)?;
        match status {
            Some(status) => Ok((status, started.elapsed())),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mesh-agent did not exit within {timeout:?}")
            }
        }
    }

    /// Starts the agent again with the same config (after [`stop`](Self::stop)).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn(None)
    }

    /// `mesh-agent uninstall`: removes the pinned programs and maps.
    pub fn uninstall(&self) -> Result<()> {
        let mut command = Command::new(agent_path()?);
        command.args(["uninstall", "--name", &self.bpf_name]);
        let output = output_timeout(&mut command, Duration::from_secs(5))?;
        if !output.status.success() {
            bail!(
                "mesh-agent uninstall: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        if self.keep_pins {
            return;
        }
        let _ = self.uninstall();
        let _ = fs::remove_file(&self.config_path);
    }
}

/// The value of `name{labels}` in a Prometheus text exposition; 0 when absent.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            if series_name != name {
                return None;
            }
            let mut have: Vec<String> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(str::to_owned)
                .collect();
            have.sort();
            (have == wanted).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The sum of `name` over the series of a Prometheus text exposition whose labels include
/// every pair of `labels`.
pub fn metric_sum(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
            let have: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            (series_name == name && wanted.iter().all(|w| have.contains(&w.as_str())))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Writes `n` in decimal into `buf` without allocating (safe between fork and exec).
fn format_u32(mut n: u32, buf: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    len
}
