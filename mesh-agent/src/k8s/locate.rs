//! Finding a local pod's network namespace from its UID, behind a seam ([`PodLocator`]) so
//! that the source can be tested without a kubelet. Resolutions are cached by UID and
//! forgotten when the pod object changes: a restarted sandbox is a new namespace, which the
//! pod's status reports, and enrollment must follow it. A pod not found yet is the rule
//! while it starts (debug); one that looking again cannot find (the agent lacks a
//! permission) is warned about, once per version of the pod.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys::kubepods::{self, KubepodsError};

/// Why a pod of this node was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: String,
    /// Looking again will not help: the agent is missing a permission.
    pub lasting: bool,
}

impl Unresolved {
    /// Not there yet: a pod is listed before its sandbox runs.
    pub fn pending(reason: String) -> Self {
        Self {
            reason,
            lasting: false,
        }
    }
}

/// Where a pod of this node is.
pub trait PodLocator: Send + Sync {
    /// The path of the network namespace of the pod with `uid`, or why it is not found.
    fn netns(&self, uid: &str) -> Result<PathBuf, Unresolved>;
}

/// The real one: the kubelet's cgroups under the kubepods root (`agent.cgroup`).
#[derive(Debug, Clone)]
pub struct Kubepods {
    pub root: PathBuf,
}

impl Kubepods {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }
}

impl PodLocator for Kubepods {
    fn netns(&self, uid: &str) -> Result<PathBuf, Unresolved> {
        kubepods::find_pod(&self.root, uid)
            .map(|sandbox| sandbox.netns)
            .map_err(|e| match e {
                KubepodsError::Denied(_) => Unresolved {
                    reason: e.to_string(),
                    lasting: true,
                },
                e => Unresolved::pending(e.to_string()),
            })
    }
}

/// Resolutions by UID.
pub struct Sandboxes {
    locator: Arc<dyn PodLocator>,
    found: HashMap<String, PathBuf>,
    /// Pods warned about as not found for good, until they change.
    warned: HashSet<String>,
}

impl Sandboxes {
    pub fn new(locator: Arc<dyn PodLocator>) -> Self {
        Self {
            locator,
            found: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// The network namespace of the pod `uid`, looked up once until [`Sandboxes::forget`].
    pub fn netns(&mut self, uid: &str) -> Option<PathBuf> {
        if let Some(path) = self.found.get(uid) {
            return Some(path.clone());
        }
        match self.locator.netns(uid) {
            Ok(path) => {
                self.found.insert(uid.to_owned(), path.clone());
                Some(path)
            }
            Err(Unresolved { reason, lasting }) => {
                if !lasting {
                    tracing::debug!(uid, %reason, "pod sandbox not found yet");
                } else if self.warned.insert(uid.to_owned()) {
                    tracing::warn!(uid, %reason, "pod of this node not enrolled");
                }
                None
            }
        }
    }

    /// The pod `uid` changed (or went): look it up again next time.
    pub fn forget(&mut self, uid: &str) {
        self.found.remove(uid);
        self.warned.remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Denied;

    impl PodLocator for Denied {
        fn netns(&self, uid: &str) -> Result<PathBuf, Unresolved> {
            Err(Unresolved {
                reason: format!("opening /proc/1/ns/net for {uid}: permission denied"),
                lasting: true,
            })
        }
    }

    #[test]
    fn a_lasting_failure_is_warned_once_per_version_of_the_pod() {
        let mut sandboxes = Sandboxes::new(Arc::new(Denied));
        assert_eq!(sandboxes.netns("a"), None);
        assert!(sandboxes.warned.contains("a"));
        // The retry every second does not warn again; a changed pod does.
        assert_eq!(sandboxes.netns("a"), None);
        assert_eq!(sandboxes.warned.len(), 1);
        sandboxes.forget("a");
        assert!(sandboxes.warned.is_empty());
        assert_eq!(sandboxes.netns("a"), None);
        assert!(sandboxes.warned.contains("a"));
    }
}
