//! Where the configuration comes from, started the same way whichever it is: the agent gets
//! the first complete snapshot and a [`ConfigWatch`] publishing the next ones, and treats
//! both sources alike.
//!
//! - `file`: the YAML file holds everything and is reloaded when it changes.
//! - `kubernetes`: the file (the mounted ConfigMap) holds the `agent` block only, still
//!   reloaded live; nodes, workloads, services and policies come from the Kubernetes API
//!   (in-cluster credentials, or `KUBECONFIG`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::config::{Config, ConfigWatch, Scope, watch};
use crate::k8s::{self, Kubepods, SourceInputs};
use crate::metrics::Metrics;
use crate::sys;

/// `mesh-agent run --source`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// The configuration file only.
    #[default]
    File,
    /// The file's agent block, and the Kubernetes API for the rest.
    Kubernetes,
}

impl SourceKind {
    /// What the configuration file may hold with this source.
    pub fn config_scope(self) -> Scope {
        match self {
            SourceKind::File => Scope::Everything,
            SourceKind::Kubernetes => Scope::AgentOnly,
        }
    }
}

/// A started source: the snapshot in force and the publisher of the next ones.
pub struct Started {
    pub config: Arc<Config>,
    pub watch: ConfigWatch,
    /// Where the programs attach (`attach_cgroup`), found once.
    pub cgroup: PathBuf,
}

/// How to start one.
pub struct SourceOptions<'a> {
    pub kind: SourceKind,
    pub path: &'a Path,
    /// `--node`, which wins over `agent.node`.
    pub node: Option<String>,
    /// `--cgroup`, which wins over `agent.cgroup` (where the kubelet's pods are looked for).
    pub cgroup: Option<PathBuf>,
    pub metrics: Arc<Metrics>,
}

/// Starts the source; with Kubernetes, returns once its initial sync is complete.
pub async fn start(options: SourceOptions<'_>) -> anyhow::Result<Started> {
    let SourceOptions {
        kind,
        path,
        node,
        cgroup,
        metrics,
    } = options;
    let scope = kind.config_scope();
    let file = watch::load_scoped(path, node, scope)?;
    let config = file.snapshot();
    let root = attach_cgroup(kind, cgroup, &config)?;
    if kind == SourceKind::File {
        return Ok(Started {
            config,
            watch: file,
            cgroup: root,
        });
    }
    // kube's TLS (in-cluster HTTPS) runs on the process's rustls provider: the agent's own.
    let _ = (*crate::tls::provider()).clone().install_default();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let (config, watch) = k8s::start(SourceInputs {
        client,
        file: file.current(),
        status: file.stats(),
        locator: Arc::new(Kubepods::new(&root)),
        metrics,
    })
    .await?;
    Ok(Started {
        config,
        watch,
        cgroup: root,
    })
}

/// The cgroup the programs attach to: `--cgroup`, else `agent.cgroup`, else the cgroup2 root.
/// With Kubernetes, the kubelet's pods cgroup below it (`kubepods.slice` or `kubepods`,
/// whichever cgroup driver the node uses, or the same one level down below a kubelet cgroup
/// root, as on kind's nodes), so that only pods are steered and the same
/// ConfigMap (`cgroup: /host/sys/fs/cgroup`) serves every node; it is also where pods are
/// looked for by UID.
fn attach_cgroup(
    kind: SourceKind,
    cgroup: Option<PathBuf>,
    config: &Config,
) -> anyhow::Result<PathBuf> {
    let base = match cgroup.or_else(|| config.agent().startup.cgroup.clone()) {
        Some(base) => base,
        None => sys::cgroup2_root()?,
    };
    if kind == SourceKind::File {
        return Ok(base);
    }
    Ok(match sys::kubepods::kubepods_dir(&base) {
        Some(kubepods) => kubepods,
        None => {
            tracing::warn!(
                cgroup = %base.display(),
                "no kubepods.slice or kubepods cgroup below it: attaching to it as it is"
            );
            base
        }
    })
}
