//! Pods in the kubelet's cgroup layout ([`crate::kubelet`]) inside a [`Topology`]: what a
//! Kubernetes source has to find from a pod's UID, and the sandbox restarts and removals it
//! has to follow.
//!
//! Each pod gets two containers, as under containerd: the sandbox, whose long-lived process
//! (the "pause" container: `sleep infinity` here) keeps a process in the pod's network
//! namespace, and the app container, where [`Pod::command`] runs things. Both are leaves of
//! the pod's cgroup, since cgroup v2 keeps processes out of inner nodes.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use crate::cgroup;
use crate::exec::{self, Target};
use crate::kubelet::{CgroupDriver, KubeletPod, Qos, new_container_id, new_uid};
use crate::sys;
use crate::topology::{Node, Pod, TEARDOWN_TIMEOUT, Topology};

impl Topology {
    /// The kubepods cgroup of `driver` under the test's cgroup root
    /// (`<root>/kubepods.slice` or `<root>/kubepods`): the agent's `cgroup` for pods made by
    /// [`Topology::add_kubelet_pod`].
    pub fn kubepods_root(&self, driver: CgroupDriver) -> PathBuf {
        driver.kubepods_dir(&self.cgroup_root)
    }

    /// Adds a pod like [`Topology::add_pod`] (same netns, veth and addresses), whose cgroup
    /// follows the kubelet's layout for `driver` and `qos` under [`Self::kubepods_root`],
    /// with a fresh UID and a running sandbox process.
    pub fn add_kubelet_pod(
        &mut self,
        node: &Node,
        name: &str,
        driver: CgroupDriver,
        qos: Qos,
    ) -> Result<Pod> {
        self.check_name(name)?;
        let uid = new_uid()?;
        let index = self.next_pod_index(node)?;
        let kubepods = self.kubepods_root(driver);
        let kubelet = KubeletPod {
            pod_dir: driver.pod_dir(&kubepods, qos, &uid),
            uid,
            driver,
            qos,
            sandbox_id: String::new(),
            container_id: String::new(),
            generation: 0,
        };
        let pod = Pod {
            name: name.to_owned(),
            index,
            netns: String::new(),
            node: node.clone(),
            cgroup_dir: PathBuf::new(),
            kubelet: Some(kubelet),
        };
        let pod = self.start_sandbox(pod).with_context(|| {
            format!(
                "setting up kubelet-layout pod {name} on node {}",
                node.name()
            )
        })?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Recreates the pod's sandbox as the kubelet does after the sandbox died: every process
    /// of the pod is killed, its network namespace and containers are replaced by new ones
    /// (new container ids, new sandbox process; same UID, cgroup and addresses). Returns the
    /// pod as it is now (its netns name and command cgroup changed).
    pub fn restart_sandbox(&mut self, pod: &Pod) -> Result<Pod> {
        let current = self.current(pod)?;
        let Some(kubelet) = current.kubelet.clone() else {
            bail!("pod {} is not in the kubelet layout", pod.name());
        };
        self.stop_pod(&current)?;
        for id in [&kubelet.sandbox_id, &kubelet.container_id] {
            cgroup::remove_tree(
                &kubelet.driver.container_dir(&kubelet.pod_dir, id),
                TEARDOWN_TIMEOUT,
            )?;
        }
        let mut next = current.clone();
        if let Some(k) = next.kubelet.as_mut() {
            k.generation += 1;
        }
        let next = self
            .start_sandbox(next)
            .with_context(|| format!("restarting the sandbox of pod {}", pod.name()))?;
        if let Some(slot) = self.pods.iter_mut().find(|p| p.name == pod.name) {
            *slot = next.clone();
        }
        Ok(next)
    }

    /// Removes a pod (either kind) as when it is deleted: its processes, cgroups, veth and
    /// network namespace.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let current = self.current(pod)?;
        self.stop_pod(&current)?;
        let dir = current
            .kubelet
            .as_ref()
            .map_or(&current.cgroup_dir, |k| &k.pod_dir);
        cgroup::remove_tree(dir, TEARDOWN_TIMEOUT)?;
        self.pods.retain(|p| p.name != pod.name);
        Ok(())
    }

    /// The topology's own record of `pod` (which a restart may have changed).
    fn current(&self, pod: &Pod) -> Result<Pod> {
        self.pods
            .iter()
            .find(|p| p.name == pod.name)
            .cloned()
            .with_context(|| format!("pod {} is not part of this topology", pod.name()))
    }

    /// Kills the pod's processes and deletes its network namespace (the veth first, so that
    /// `vp<k>` is gone at once, not when the kernel gets round to the namespace).
    fn stop_pod(&mut self, pod: &Pod) -> Result<()> {
        let dir = pod.kubelet.as_ref().map_or(&pod.cgroup_dir, |k| &k.pod_dir);
        cgroup::kill_all(dir, TEARDOWN_TIMEOUT)?;
        // Reaps the killed sandbox.
        self.sandboxes.retain(|(name, _)| *name != pod.name);
        sys::ip(&["-n", pod.node.netns_name(), "link", "del", &pod.host_veth()])?;
        sys::ip(&["netns", "del", &pod.netns])?;
        self.netns.retain(|n| *n != pod.netns);
        Ok(())
    }

    /// Gives `pod` a new network namespace wired to its node, new container cgroups and a
    /// sandbox process in both.
    fn start_sandbox(&mut self, mut pod: Pod) -> Result<Pod> {
        let mut kubelet = pod.kubelet.take().context("not a kubelet-layout pod")?;
        let role = match kubelet.generation {
            0 => format!("n{}p{}", pod.node.index(), pod.index),
            g => format!("n{}p{}r{g}", pod.node.index(), pod.index),
        };
        pod.netns = self.new_netns(&role)?;
        pod.wire()?;
        kubelet.sandbox_id = new_container_id()?;
        kubelet.container_id = new_container_id()?;
        let sandbox_dir = kubelet
            .driver
            .container_dir(&kubelet.pod_dir, &kubelet.sandbox_id);
        pod.cgroup_dir = kubelet
            .driver
            .container_dir(&kubelet.pod_dir, &kubelet.container_id);
        for dir in [&sandbox_dir, &pod.cgroup_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        let sandbox = Target {
            label: format!("sandbox of pod {} ({})", pod.name, pod.netns),
            netns_path: pod.netns_path(),
            cgroup_dir: Some(sandbox_dir),
        };
        let mut command = sandbox.try_command("sleep")?;
        command.arg("infinity");
        let process = exec::spawn_quiet(&mut command, &sandbox.label)?;
        self.sandboxes.push((pod.name.clone(), process));
        pod.kubelet = Some(kubelet);
        Ok(pod)
    }
}
