//! Enrollment: the local pods whose traffic the agent steers.
//!
//! For each local workload the agent keeps a thread in the pod's network namespace, sets up
//! the reply route that lets its app see clients of other nodes with their own address,
//! opens the pod's listeners there, attaches inbound capture to the namespace, and writes its
//! cookie into the eBPF enrolled map; taking a pod out undoes all of it.

use std::{collections::BTreeMap, fs::File, net::IpAddr, path::PathBuf, sync::Arc};

use mesh_common::{EnrolledPod, FAIL_CLOSED, FAIL_OPEN};
use parking_lot::MutexGuard;
use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, FailMode, Workload},
    ebpf::{Datapath, EbpfError},
    proxy::{
        ClientIpPath, FamilyPath, PodHandle, PodListeners, ProxyContext, ProxyError, SocketReserve,
    },
    sys::{
        NetnsError, NetnsThread,
        reply_route::{Family, ReplyRoute},
    },
};

/// Why a pod could not be enrolled (or taken out). The message leaves out the workload,
/// which [`EnrollError::workload`] gives: the status lists failures by workload.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no netns path")]
    NoNetns { workload: String },
    #[error("opening {path}: {source}")]
    OpenNetns {
        workload: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source}")]
    Netns {
        workload: String,
        source: NetnsError,
    },
    #[error("{source}")]
    Proxy {
        workload: String,
        source: ProxyError,
    },
    #[error("{source}")]
    Map {
        workload: String,
        source: Box<EbpfError>,
    },
}

impl EnrollError {
    /// `namespace/name` of the pod.
    pub fn workload(&self) -> &str {
        match self {
            EnrollError::NoNetns { workload }
            | EnrollError::OpenNetns { workload, .. }
            | EnrollError::Netns { workload, .. }
            | EnrollError::Proxy { workload, .. }
            | EnrollError::Map { workload, .. } => workload,
        }
    }
}

/// What decides how a pod is enrolled; a change means enrolling it again.
#[derive(Clone, PartialEq, Eq)]
struct Enrollment {
    netns: PathBuf,
    ips: Vec<IpAddr>,
    fail_mode: FailMode,
}

struct PodEntry {
    enrollment: Enrollment,
    /// Where its reply route is (the start-up settings it was enrolled with).
    reply_route: ReplyRoute,
    handle: PodHandle,
    /// Closed when the pod is taken out.
    listeners: PodListeners,
}

/// One enrolled pod, as `/status` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `namespace/name`
    pub workload: String,
    pub netns: String,
    pub netns_cookie: u64,
    /// Connects rewritten to the pod's outbound listener.
    pub captured: u64,
    /// Connects left alone (loopback, excluded port).
    pub skipped: u64,
    /// Connects that found no proxy listener (fail-open: passed, fail-closed: refused).
    pub no_listener: u64,
    /// Connections whose app-to-agent data took the eBPF fast path (sk_msg redirect).
    #[serde(default)]
    pub fast_path: u64,
    /// Why the app sees its own pod's address instead of some clients' from other nodes
    /// (the kernel refused the reply route); absent when it sees theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip_refused: Option<String>,
    /// Connections from other nodes' pods that reached the app from the pod's own address
    /// for that reason.
    #[serde(default)]
    pub client_ip_fallbacks: u64,
}

/// A local pod of the config that is not enrolled, and why: its last attempt failed. It is
/// tried again at each reload and leaves this list once enrolled (or out of the config).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedPod {
    /// `namespace/name`
    pub workload: String,
    pub reason: String,
    /// When the last attempt failed, in seconds since the Unix epoch.
    pub since: u64,
}

pub struct Pods {
    proxy: Arc<ProxyContext>,
    enrolled: BTreeMap<String, PodEntry>,
    /// Local pods whose last enrollment failed, by `namespace/name`.
    failed: BTreeMap<String, FailedPod>,
}

impl Pods {
    pub fn new(proxy: Arc<ProxyContext>) -> Self {
        Self {
            proxy,
            enrolled: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Makes the enrolled set match the local workloads of `config`. A pod that cannot be
    /// enrolled is reported and skipped, so one broken pod never stops the others.
    pub fn sync(&mut self, config: &Config) -> Vec<EnrollError> {
        let wanted: BTreeMap<String, &Workload> = config
            .local_workloads()
            .map(|w| (w.qualified_name().to_string(), w))
            .collect();
        let stale: Vec<String> = self
            .enrolled
            .iter()
            .filter(|(key, pod)| {
                wanted
                    .get(*key)
                    .is_none_or(|w| enrollment(w) != pod.enrollment)
            })
            .map(|(key, _)| key.clone())
            .collect();
        self.failed.retain(|key, _| wanted.contains_key(key));
        let mut errors = Vec::new();
        for key in stale {
            if let Some(pod) = self.enrolled.remove(&key) {
                self.proxy.pods.write().remove(key.as_str());
                if let Err(source) = self.unenroll(&pod) {
                    errors.push(EnrollError::Map {
                        workload: key.clone(),
                        source: Box::new(source),
                    });
                }
                tracing::info!(pod = %key, "pod unenrolled");
            }
        }
        for (key, workload) in wanted {
            if self.enrolled.contains_key(&key) {
                continue;
            }
            match self.enroll(config, &key, workload) {
                Ok(pod) => {
                    tracing::info!(pod = %key, netns_cookie = pod.handle.netns.cookie(), "pod enrolled");
                    self.proxy
                        .pods
                        .write()
                        .insert(pod.handle.key.clone(), pod.handle.clone());
                    self.failed.remove(&key);
                    self.enrolled.insert(key, pod);
                }
                Err(error) => {
                    let since = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let failed = FailedPod {
                        workload: key.clone(),
                        reason: error.to_string(),
                        since,
                    };
                    self.failed.insert(key, failed);
                    errors.push(error);
                }
            }
        }
        // Pinned maps outlive an agent: drop entries an earlier one left for pods gone since.
        let current: Vec<u64> = self
            .enrolled
            .values()
            .map(|p| p.handle.netns.cookie())
            .collect();
        let mut datapath = self.datapath();
        for cookie in datapath.enrolled_cookies() {
            if !current.contains(&cookie) {
                let _ = datapath.unenroll(cookie);
            }
        }
        errors
    }

    fn enroll(
        &self,
        config: &Config,
        key: &str,
        workload: &Workload,
    ) -> Result<PodEntry, EnrollError> {
        let enrollment = enrollment(workload);
        let workload_name = || key.to_owned();
        if enrollment.netns.as_os_str().is_empty() {
            return Err(EnrollError::NoNetns {
                workload: workload_name(),
            });
        }
        let netns_file =
            File::open(&enrollment.netns).map_err(|source| EnrollError::OpenNetns {
                workload: workload_name(),
                path: enrollment.netns.clone(),
                source,
            })?;
        let netns = NetnsThread::spawn(&enrollment.netns).map_err(|source| EnrollError::Netns {
            workload: workload_name(),
            source,
        })?;
        let startup = &config.agent().startup;
        let route = reply_route(config);
        let client_ip = client_ip_path(key, &netns, &enrollment.ips, route);
        let handle = PodHandle {
            key: key.into(),
            identity: workload.identity.clone(),
            sockets: SocketReserve::new(netns.clone(), startup.proxy_mark),
            ips: enrollment.ips.clone().into(),
            client_ip: Arc::new(ClientIpPath::new(
                startup.transparent_mark,
                client_ip.clone(),
                client_ip
                    .iter()
                    .any(|f| matches!(f, FamilyPath::Refused(_))),
            )),
            netns,
        };
        // Listeners first, so the first captured connect already finds them.
        let listeners = match PodListeners::start(&self.proxy, &handle, &enrollment.ips) {
            Ok(listeners) => listeners,
            Err(source) => {
                remove_reply_route(&handle, route);
                return Err(EnrollError::Proxy {
                    workload: workload_name(),
                    source,
                });
            }
        };
        let cookie = handle.netns.cookie();
        let settings = EnrolledPod {
            outbound_port: config.agent().startup.outbound_port,
            inbound_port: config.agent().startup.inbound_port,
            fail_mode: match enrollment.fail_mode {
                FailMode::Open => FAIL_OPEN,
                FailMode::Closed => FAIL_CLOSED,
            },
        };
        let mut datapath = self.datapath();
        let result = datapath
            .capture_inbound(cookie, &netns_file)
            .and_then(|()| datapath.enroll(cookie, settings));
        if let Err(source) = result {
            let _ = datapath.unenroll(cookie);
            datapath.release_inbound(&enrollment.ips);
            drop(datapath);
            remove_reply_route(&handle, route);
            return Err(EnrollError::Map {
                workload: workload_name(),
                source: Box::new(source),
            });
        }
        Ok(PodEntry {
            enrollment,
            reply_route: route,
            handle,
            listeners,
        })
    }

    fn unenroll(&self, pod: &PodEntry) -> Result<(), EbpfError> {
        remove_reply_route(&pod.handle, pod.reply_route);
        // The certificate goes when the last local pod with its identity goes.
        let identity = &pod.handle.identity;
        if !self
            .enrolled
            .values()
            .any(|other| &other.handle.identity == identity)
        {
            self.proxy.mesh_tls.store.remove(identity);
        }
        let mut datapath = self.datapath();
        let result = datapath.unenroll(pod.handle.netns.cookie());
        datapath.release_inbound(&pod.enrollment.ips);
        result
    }

    /// Stops accepting on every pod's listeners, keeping the pods enrolled (steering and
    /// pinned maps stay for a successor): the start of a handover.
    pub fn close_listeners(&mut self) {
        for pod in self.enrolled.values_mut() {
            pod.listeners.close();
        }
    }

    pub fn enrolled_count(&self) -> usize {
        self.enrolled.len()
    }

    /// The local pods whose last enrollment failed, with the reason.
    pub fn failed(&self) -> Vec<FailedPod> {
        self.failed.values().cloned().collect()
    }

    pub fn status(&self) -> Vec<PodStatus> {
        let datapath = self.datapath();
        self.enrolled
            .iter()
            .map(|(key, pod)| {
                let cookie = pod.handle.netns.cookie();
                let stats = datapath.pod_stats(cookie);
                PodStatus {
                    workload: key.clone(),
                    netns: pod.enrollment.netns.display().to_string(),
                    netns_cookie: cookie,
                    captured: stats.captured,
                    skipped: stats.skipped,
                    no_listener: stats.no_listener,
                    fast_path: stats.fast_path,
                    client_ip_refused: pod.handle.client_ip.refused(),
                    client_ip_fallbacks: pod.handle.client_ip.fallbacks(),
                }
            })
            .collect()
    }

    fn datapath(&self) -> MutexGuard<'_, Datapath> {
        self.proxy.datapath.lock()
    }
}

fn reply_route(config: &Config) -> ReplyRoute {
    let startup = &config.agent().startup;
    ReplyRoute {
        mark: startup.transparent_mark,
        table: startup.reply_table,
    }
}

/// Sets up the reply route of each address family the pod has, in its netns: IPv4, IPv6.
/// A refusal is logged here, once for the pod; its connections from other nodes then reach
/// the app from the pod's own address.
fn client_ip_path(
    key: &str,
    netns: &NetnsThread,
    ips: &[IpAddr],
    route: ReplyRoute,
) -> [FamilyPath; 2] {
    [Family::V4, Family::V6].map(|family| {
        if !ips.iter().any(|ip| Family::of(*ip) == family) {
            return FamilyPath::Absent;
        }
        let installed = netns
            .run_blocking(move || route.install(family))
            .map_err(|error| error.to_string())
            .and_then(|result| result.map_err(|error| error.to_string()));
        match installed {
            Ok(()) => FamilyPath::Ready,
            Err(reason) => {
                tracing::warn!(pod = %key, %family, %reason, "the app will see this pod's own address instead of the client's for connections from other nodes");
                FamilyPath::Refused(reason)
            }
        }
    })
}

/// Removes the reply routes set up for the pod; a failure is logged (the pod's netns is
/// usually going away with it).
fn remove_reply_route(pod: &PodHandle, route: ReplyRoute) {
    for family in [Family::V4, Family::V6] {
        if pod.client_ip.family(family) != &FamilyPath::Ready {
            continue;
        }
        let removed = pod
            .netns
            .run_blocking(move || route.remove(family))
            .map_err(|error| error.to_string())
            .and_then(|result| result.map_err(|error| error.to_string()));
        if let Err(reason) = removed {
            tracing::info!(pod = %pod.key, %family, %reason, "reply route not removed");
        }
    }
}

fn enrollment(workload: &Workload) -> Enrollment {
    Enrollment {
        netns: workload.netns.clone().unwrap_or_default(),
        ips: workload.ips.clone(),
        fail_mode: workload.fail_mode,
    }
}
