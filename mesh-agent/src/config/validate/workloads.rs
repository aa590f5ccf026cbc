//! Validates the `workloads` list (names, IPs, nodes, netns, and each workload's identity)
//! and the `nodes` list (names and labels: a node's zone is what locality compares).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use super::{Cx, Result};
use crate::config::model::{Node, QualifiedName, Workload, WorkloadSpec};
use crate::config::raw::{RawNode, RawWorkload, S};
use crate::config::settings::{AgentConfig, defaults};
use crate::config::traffic::defaults::ZONE_LABEL;
use crate::names::Kind;

impl Cx<'_> {
    pub(super) fn workloads(
        &self,
        raw: &[S<RawWorkload>],
        agent: &AgentConfig,
    ) -> Result<Vec<Workload>> {
        let mut out: Vec<Workload> = Vec::with_capacity(raw.len());
        let mut names: HashMap<(String, String), u64> = HashMap::new();
        let mut ip_owner: HashMap<IpAddr, usize> = HashMap::new();
        for (i, item) in raw.iter().enumerate() {
            let w: &RawWorkload = &item.value;
            let base = format!("workloads[{i}]");
            let name = self.name(&w.name, &format!("{base}.name"), Kind::Workload)?;
            let namespace = self.opt_name(
                &w.namespace,
                &base,
                "namespace",
                Kind::Namespace,
                defaults::NAMESPACE,
            )?;
            let service_account = self.opt_name(
                &w.service_account,
                &base,
                "serviceAccount",
                Kind::ServiceAccount,
                defaults::SERVICE_ACCOUNT,
            )?;
            if let Some(line) = names.get(&(namespace.clone(), name.clone())) {
                return Err(self.err(
                    w.name.referenced,
                    format!("{base}.name"),
                    format!(
                        "workload {} is already defined at line {line}",
                        QualifiedName(&namespace, &name)
                    ),
                ));
            }
            names.insert((namespace.clone(), name.clone()), w.name.referenced.line());

            if w.ips.value.is_empty() {
                return Err(self.err(
                    w.ips.referenced,
                    format!("{base}.ips"),
                    "must list at least one IP",
                ));
            }
            let mut ips = Vec::with_capacity(w.ips.value.len());
            for (j, raw_ip) in w.ips.value.iter().enumerate() {
                let path = format!("{base}.ips[{j}]");
                let ip = self.unicast_ip(raw_ip, &path)?;
                if let Some(owner) = ip_owner.get(&ip) {
                    let owner_name = match out.get(*owner) {
                        Some(o) => o.qualified_name().to_string(),
                        None => QualifiedName(&namespace, &name).to_string(),
                    };
                    return Err(self.err(
                        raw_ip.referenced,
                        path,
                        format!("{ip} is already an IP of workload {owner_name}"),
                    ));
                }
                ip_owner.insert(ip, i);
                ips.push(ip);
            }

            let node = match &w.node {
                Some(n) => self.name(n, &format!("{base}.node"), Kind::Node)?,
                None => agent.startup.node.clone(),
            };
            let local = node == agent.startup.node;
            let netns = w
                .netns
                .as_ref()
                .map(|n| self.abs_path(n, &format!("{base}.netns")))
                .transpose()?;
            if local && netns.is_none() {
                return Err(self.err(
                    item.referenced,
                    base,
                    format!(
                        "netns is required for a workload on this agent's node ({})",
                        agent.startup.node
                    ),
                ));
            }
            let spec = WorkloadSpec {
                name,
                namespace,
                service_account,
                ips,
                node,
                netns,
                labels: w.labels.clone().unwrap_or_default(),
            };
            // Its parts were just checked by the same rules, so this cannot fail; if it ever
            // did, the service account is the part to look at.
            let workload = Workload::new(spec, agent).map_err(|error| {
                let at = w
                    .service_account
                    .as_ref()
                    .map_or(w.name.referenced, |sa| sa.referenced);
                self.err(at, format!("{base}.serviceAccount"), error.to_string())
            })?;
            out.push(Workload {
                fail_mode: w.fail_mode.unwrap_or_default(),
                unknown_destination: w.unknown_destination.unwrap_or_default(),
                access_log: self.access_log(
                    w.access_log.as_ref(),
                    &format!("{base}.accessLog"),
                    agent.live.access_log,
                )?,
                ..workload
            });
        }
        Ok(out)
    }

    /// `nodes`: distinct names; the zone label, when set, is not empty (an empty zone would
    /// put every node without one in the same zone).
    pub(super) fn nodes(&self, raw: &[S<RawNode>]) -> Result<Vec<Node>> {
        let mut out: Vec<Node> = Vec::with_capacity(raw.len());
        let mut lines: HashMap<String, u64> = HashMap::new();
        for (i, item) in raw.iter().enumerate() {
            let n = &item.value;
            let base = format!("nodes[{i}]");
            let name = self.name(&n.name, &format!("{base}.name"), Kind::Node)?;
            if let Some(line) = lines.get(&name) {
                return Err(self.err(
                    n.name.referenced,
                    format!("{base}.name"),
                    format!("node {name} is already defined at line {line}"),
                ));
            }
            lines.insert(name.clone(), n.name.referenced.line());
            let mut labels = BTreeMap::new();
            for (key, value) in n.labels.iter().flatten() {
                if key == ZONE_LABEL && value.value.is_empty() {
                    return Err(self.err(
                        value.referenced,
                        format!("{base}.labels.{key}"),
                        "the zone must not be empty (omit the label when the zone is unknown)",
                    ));
                }
                labels.insert(key.clone(), value.value.clone());
            }
            out.push(Node { name, labels });
        }
        Ok(out)
    }
}
