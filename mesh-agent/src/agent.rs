//! `mesh-agent run`: wires config source -> snapshot -> eBPF maps and proxy, and the admin
//! API, then waits for SIGTERM/SIGINT.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_common::Settings;
use parking_lot::Mutex;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    admin::{
        self, AdminState, InForce, StatusReport,
        status::{
            self, CaStatus, CertificateStatus, ConfigStatus, ProgramStatus, STATUS_CONNECTIONS,
            TunnelStatus, unix_seconds,
        },
    },
    balance::Balancers,
    config::{AgentConfig, Config, watch},
    ebpf::{self, Datapath, EbpfError},
    limit::Limits,
    metrics::Metrics,
    pods::Pods,
    proxy::{self, ProxyContext},
    shutdown::Handover,
    source::{self, SourceKind, SourceOptions, Started},
    sys,
    tunnel::MeshTls,
};

/// `node`: the command line's node name, which wins over `agent.node` (see `cli`); `source`:
/// where the configuration comes from.
pub async fn run(
    config_path: &Path,
    cgroup_override: Option<PathBuf>,
    node: Option<String>,
    source: SourceKind,
) -> anyhow::Result<()> {
    let building = Instant::now();
    let metrics = Arc::new(Metrics::new());
    let Started {
        config,
        watch: watcher,
        cgroup,
    } = source::start(SourceOptions {
        kind: source,
        path: config_path,
        node,
        cgroup: cgroup_override,
        metrics: metrics.clone(),
    })
    .await?;
    // Subscribed now: a change published while the agent sets up is applied after.
    let mut updates = watcher.current();
    sys::ensure_bpffs()?;
    let agent = config.agent().clone();
    let (proxy_port_min, proxy_port_max) = agent.startup.proxy_port_range();
    let settings = Settings {
        proxy_mark: agent.startup.proxy_mark,
        proxy_port_min,
        proxy_port_max,
        transparent_mark: agent.startup.transparent_mark,
        fast_path: u32::from(agent.startup.fast_path),
    };
    let datapath = Datapath::load(&agent.startup.bpf_name, &cgroup, settings)
        .with_context(|| format!("loading eBPF programs on cgroup {}", cgroup.display()))?;
    let programs: Vec<ProgramStatus> = datapath
        .programs()
        .iter()
        .map(|p| ProgramStatus {
            name: p.name.to_string(),
            pin: p.pin.display().to_string(),
        })
        .collect();
    tracing::info!(
        cgroup = %cgroup.display(),
        pins = %ebpf::pin_root(&agent.startup.bpf_name).display(),
        "eBPF programs attached"
    );
    let mesh_tls = Arc::new(MeshTls::start(&agent.startup, &metrics).context("setting up mTLS")?);
    let balancers = Arc::new(Balancers::new());
    balancers.sync(&config);
    let limits = Arc::new(Limits::new());
    limits.sync(&config);
    let proxy = Arc::new(ProxyContext {
        config: Arc::new(ArcSwap::new(config.clone())),
        orig_dst: datapath.orig_dst(),
        transparent_sources: datapath.transparent_sources(),
        fast_path: datapath.fast_path(),
        datapath: Arc::new(Mutex::new(datapath)),
        balancers: balancers.clone(),
        limits: limits.clone(),
        pods: Default::default(),
        metrics: metrics.clone(),
        connections: Arc::default(),
        mesh_tls: mesh_tls.clone(),
        connection_slots: Arc::new(tokio::sync::Semaphore::new(agent.startup.max_connections)),
    });
    sync_exclusions(&proxy, &agent)?;
    let pods = Arc::new(Mutex::new(Pods::new(proxy.clone())));
    // Pods whose enrollment failed (their certificate could not be issued while the CA was
    // unreachable, say) are tried again with backoff until they are all in.
    let mut retry = EnrollRetry::after(apply(&pods, &config, &metrics));
    metrics.config_built(building.elapsed());
    let _health = proxy::health::spawn(proxy.clone());
    let _eviction = {
        let limits = limits.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIMIT_EVICTION);
            loop {
                tick.tick().await;
                limits.evict_idle();
            }
        })
    };
    // Memory a burst of connections used goes back to the system once they are gone, and
    // a tunnel connection's once it closed.
    let _trim = {
        let proxy = proxy.clone();
        let tunnels = [metrics.tunnel("client"), metrics.tunnel("server")];
        tokio::spawn(async move {
            let mut trim = sys::memory::TrimAfterBurst::default();
            let mut tick = tokio::time::interval(TRIM_CHECK);
            loop {
                tick.tick().await;
                // Every proxied connection, tunnel streams included; tunnel connections both
                // ways.
                let open_tunnels = tunnels.iter().map(|t| t.connections.get()).sum::<i64>();
                if trim.should_trim(proxy.connections.len(), open_tunnels.max(0) as usize) {
                    tokio::task::spawn_blocking(sys::memory::release_unused_memory);
                }
            }
        })
    };

    // The snapshot in force and its generation, for the status and /config_dump.
    let in_force = Arc::new(Mutex::new(InForce {
        generation: 1,
        since: unix_seconds(std::time::SystemTime::now()),
        config: config.clone(),
    }));
    // Valid files the agent did not apply (they changed a start-up-only setting).
    let refused: Arc<Mutex<Refused>> = Arc::default();
    let report = {
        let pods = pods.clone();
        let proxy = proxy.clone();
        let refused = refused.clone();
        let reloads = watcher.stats();
        let metrics = metrics.clone();
        let in_force = in_force.clone();
        let (node, cgroup) = (agent.startup.node.clone(), cgroup.display().to_string());
        let file = config_path.display().to_string();
        Box::new(move || {
            let reloads = reloads.snapshot();
            let refusals = refused.lock().clone();
            let (applied, rejected) = reload_counts(&reloads, &refusals);
            metrics.observe_reloads(applied, rejected);
            let (generation, since) = {
                let in_force = in_force.lock();
                (in_force.generation, in_force.since)
            };
            let connections =
                status::connections(&proxy.connections, &proxy.config.load(), STATUS_CONNECTIONS);
            let (workloads, failed_pods) = {
                let pods = pods.lock();
                (pods.status(), pods.failed())
            };
            StatusReport {
                node: node.clone(),
                cgroup: cgroup.clone(),
                config: ConfigStatus {
                    file: file.clone(),
                    applied,
                    rejected,
                    last_error: reloads.last_error.or(refusals.reason),
                    generation,
                    since,
                },
                programs: programs.clone(),
                workloads,
                failed_pods,
                certificates: certificates(&proxy),
                tunnels: TunnelStatus {
                    connections: proxy.mesh_tls.pool.live_connections(),
                    streams: connections.counts.through_tunnels,
                },
                connection_counts: connections.counts,
                connections: connections.connections,
                services: proxy.balancers.status(),
                limits: proxy.limits.status(),
                ca: ca_status(&proxy),
                ..StatusReport::default()
            }
        })
    };
    let admin = admin::serve(
        agent.startup.admin_addr,
        Arc::new(AdminState {
            metrics: metrics.clone(),
            report,
            connections: {
                let proxy = proxy.clone();
                Box::new(move |limit| {
                    status::connections(&proxy.connections, &proxy.config.load(), limit)
                })
            },
            in_force: {
                let in_force = in_force.clone();
                Box::new(move || in_force.lock().clone())
            },
            config_file: config_path.display().to_string(),
            before_metrics: {
                let (proxy, refused, reloads) = (proxy.clone(), refused.clone(), watcher.stats());
                let pods = pods.clone();
                Box::new(move || {
                    let enrolled = pods.lock().status();
                    proxy.metrics.observe_capture(
                        enrolled.into_iter().map(|pod| {
                            (pod.workload, [pod.captured, pod.skipped, pod.no_listener])
                        }),
                    );
                    let refusals = refused.lock().clone();
                    let (applied, rejected) = reload_counts(&reloads.snapshot(), &refusals);
                    proxy.metrics.observe_reloads(applied, rejected);
                    proxy.metrics.observe_certificates(
                        proxy
                            .mesh_tls
                            .store
                            .list()
                            .iter()
                            .map(|c| (c.identity.to_string(), unix_seconds(c.not_after))),
                    );
                    let ca = ca_status(&proxy);
                    proxy.metrics.observe_ca(
                        ca.reachable.unwrap_or(ca.address.is_none()),
                        [
                            ("issued", ca.issued),
                            ("refused", ca.refused),
                            ("unavailable", ca.unavailable),
                        ],
                    );
                })
            },
        }),
    )
    .await?;
    tracing::info!(admin = %agent.startup.admin_addr, "agent ready");
    // Start-up's heap (loading the eBPF object parsed the kernel's BTF: about 18 MB at its
    // peak, all freed by now) and the code only start-up ran: give their pages back, or they
    // stay in the agent's idle RSS.
    sys::memory::release_unused_memory();

    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut again = loop {
        tokio::select! {
            _ = terminate.recv() => break terminate,
            _ = interrupt.recv() => break interrupt,
            _ = retry.wait(), if retry.pending() => {
                let snapshot = proxy.config.load_full();
                let failed = apply(&pods, &snapshot, &metrics);
                retry = retry.again(failed);
            }
            changed = updates.changed() => {
                if changed.is_err() {
                    break terminate;
                }
                let snapshot = updates.borrow_and_update().clone();
                let restart_only = agent.startup.changes(&snapshot.agent().startup);
                if !restart_only.is_empty() {
                    let reason = format!(
                        "agent.{} changed: takes effect on restart; the running configuration stays",
                        restart_only.join(", agent.")
                    );
                    tracing::error!(%reason, "configuration reload refused");
                    let mut refusals = refused.lock();
                    refusals.count += 1;
                    refusals.reason = Some(reason);
                    continue;
                }
                refused.lock().reason = None;
                let applying = Instant::now();
                // Balancers and limits first, so a connection routed by the new snapshot
                // finds them; new connections route by it, established ones keep flowing.
                balancers.sync(&snapshot);
                limits.sync(&snapshot);
                proxy.config.store(snapshot.clone());
                {
                    let mut in_force = in_force.lock();
                    in_force.generation += 1;
                    in_force.since = unix_seconds(std::time::SystemTime::now());
                    in_force.config = snapshot.clone();
                }
                if let Err(error) = sync_exclusions(&proxy, snapshot.agent()) {
                    tracing::error!(%error, "updating the excluded ports and networks");
                }
                retry = EnrollRetry::after(apply(&pods, &snapshot, &metrics));
                let built = watcher.stats().snapshot().last_build.unwrap_or_default();
                metrics.config_built(built + applying.elapsed());
                let revoked = proxy.revoke_denied(&snapshot);
                if revoked > 0 {
                    tracing::info!(connections = revoked, "closed connections the new policy denies");
                }
                tracing::info!("configuration reloaded");
            }
        }
    };
    watcher.stop();
    // Steering stays pinned for the next agent; `mesh-agent uninstall` removes it.
    tracing::info!("stopping; eBPF programs stay pinned");
    Handover {
        admin,
        admin_addr: agent.startup.admin_addr,
        pods: &pods,
        proxy: &proxy,
        drain_timeout: agent.startup.drain_timeout,
    }
    .run(&mut again)
    .await;
    Ok(())
}

/// How often the open connections are compared with their peak (see `TrimAfterBurst`).
const TRIM_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often rate-limit buckets of idle sources are dropped.
const LIMIT_EVICTION: std::time::Duration = std::time::Duration::from_secs(10);

/// Enrolls and unenrolls pods to match `config`; returns how many enrollments failed.
fn apply(pods: &Mutex<Pods>, config: &Config, metrics: &Metrics) -> usize {
    let mut pods = pods.lock();
    let errors = pods.sync(config);
    for error in &errors {
        metrics.enroll_failures.inc();
        tracing::error!(workload = error.workload(), %error, "enrollment failed; retrying later");
    }
    metrics.enrolled_pods.set(pods.enrolled_count() as i64);
    errors.len()
}

/// When failed enrollments are tried again: 2 s after a failure, doubling up to a minute
/// while they keep failing; nothing pending once all are in.
struct EnrollRetry {
    next: Option<(tokio::time::Instant, std::time::Duration)>,
}

impl EnrollRetry {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(2);
    const MAX: std::time::Duration = std::time::Duration::from_secs(60);

    /// After an apply that left `failed` pods out.
    fn after(failed: usize) -> Self {
        Self::schedule(failed, Self::FIRST)
    }

    /// After a retry that left `failed` pods out.
    fn again(&self, failed: usize) -> Self {
        let delay = self
            .next
            .map_or(Self::FIRST, |(_, d)| (d * 2).min(Self::MAX));
        Self::schedule(failed, delay)
    }

    fn schedule(failed: usize, delay: std::time::Duration) -> Self {
        Self {
            next: (failed > 0).then(|| (tokio::time::Instant::now() + delay, delay)),
        }
    }

    fn pending(&self) -> bool {
        self.next.is_some()
    }

    async fn wait(&self) {
        if let Some((at, _)) = self.next {
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Reloads applied and refused: the watcher's, less the valid files the agent refused
/// (start-up settings changed), which count as refused.
fn reload_counts(reloads: &watch::ReloadStats, refusals: &Refused) -> (u64, u64) {
    (
        reloads.applied.saturating_sub(refusals.count),
        reloads.rejected + refusals.count,
    )
}

fn certificates(proxy: &ProxyContext) -> Vec<CertificateStatus> {
    let seconds = unix_seconds;
    proxy
        .mesh_tls
        .store
        .list()
        .into_iter()
        .map(|c| CertificateStatus {
            identity: c.identity.to_string(),
            serial: c.serial,
            not_before: seconds(c.not_before),
            not_after: seconds(c.not_after),
        })
        .collect()
}

fn ca_status(proxy: &ProxyContext) -> CaStatus {
    match proxy.mesh_tls.ca_health() {
        None => CaStatus {
            mode: "local".into(),
            ..CaStatus::default()
        },
        Some((address, health)) => CaStatus {
            mode: "remote".into(),
            address: Some(address.to_owned()),
            reachable: health.reachable,
            last_contact: health.last_contact.map(unix_seconds),
            last_error: health.last_error,
            issued: health.issued,
            refused: health.refused,
            unavailable: health.unavailable,
        },
    }
}

fn sync_exclusions(proxy: &ProxyContext, agent: &AgentConfig) -> Result<(), EbpfError> {
    let mut datapath = proxy.datapath.lock();
    datapath.set_excluded_ports(&agent.live.excluded_ports)?;
    datapath.set_excluded_cidrs(&agent.live.excluded_cidrs)
}

/// Valid configuration files the agent refused to apply, and why the last one was.
#[derive(Clone, Default)]
struct Refused {
    count: u64,
    reason: Option<String>,
}
