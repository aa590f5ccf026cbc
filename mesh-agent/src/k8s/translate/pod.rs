//! A Pod -> the workload it would be, if its namespace is enrolled.
//!
//! A pod is a candidate when it is not opted out (`mesh.example.dev/enrolled: "false"` on the
//! pod), not on the host's network, has an IP and has not ended (Succeeded, Failed). Its
//! identity is its service account's in the agent's trust domain, built by the same
//! [`Workload::new`] as the file's workloads.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::{ENROLLED_LABEL, TranslateError, ip};
use crate::config::{AgentConfig, Workload, WorkloadSpec, defaults};

/// A candidate workload; its `netns` is found at rebuild for a local pod (from `uid`).
#[derive(Debug, Clone, PartialEq)]
pub struct PodPiece {
    pub uid: String,
    /// Shared with the snapshots, which take it as it is (a remote pod) without a copy.
    pub workload: Arc<Workload>,
}

/// The candidate workload of `pod`, or `None` when it cannot be one.
pub fn pod(pod: &Pod, agent: &AgentConfig) -> Result<Option<PodPiece>, TranslateError> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if labels.get(ENROLLED_LABEL).is_some_and(|v| v == "false") {
        return Ok(None);
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(None);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let mut ips = Vec::new();
    for (i, pod_ip) in status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let addr = ip(&pod_ip.ip, &format!("status.podIPs[{i}].ip"))?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    if ips.is_empty() {
        return Ok(None);
    }
    let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
        // Not scheduled yet: it cannot have an IP either; wait for the next event.
        return Ok(None);
    };
    let name = pod.metadata.name.clone().ok_or(TranslateError::NoName)?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| defaults::NAMESPACE.to_owned());
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| defaults::SERVICE_ACCOUNT.to_owned());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let workload = Workload::new(
        WorkloadSpec {
            name,
            namespace,
            service_account,
            ips,
            node,
            netns: None,
            labels,
        },
        agent,
    )
    .map_err(|e| TranslateError::Invalid(format!("spec.serviceAccountName: {e}")))?;
    if workload.local && uid.is_empty() {
        return Err(TranslateError::Invalid(
            "metadata.uid is missing (a pod of this node is found by its UID)".to_owned(),
        ));
    }
    Ok(Some(PodPiece {
        uid,
        workload: Arc::new(workload),
    }))
}
