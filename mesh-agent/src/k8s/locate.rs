//! Finding a local pod's network namespace from its UID, behind a seam ([`PodLocator`]) so
//! that the source can be tested without a kubelet. Resolutions are cached by UID and
//! forgotten when the pod object changes: a restarted sandbox is a new namespace, which the
//! pod's status reports, and enrollment must follow it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::sys::kubepods;

/// Where a pod of this node is.
pub trait PodLocator: Send + Sync {
    /// The path of the network namespace of the pod with `uid`, or why it is not found
    /// (yet: a pod is listed before its sandbox runs).
    fn netns(&self, uid: &str) -> Result<PathBuf, String>;
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
    fn netns(&self, uid: &str) -> Result<PathBuf, String> {
        kubepods::find_pod(&self.root, uid)
            .map(|sandbox| sandbox.netns)
            .map_err(|e| e.to_string())
    }
}

/// Resolutions by UID.
pub struct Sandboxes {
    locator: Arc<dyn PodLocator>,
    found: HashMap<String, PathBuf>,
}

impl Sandboxes {
    pub fn new(locator: Arc<dyn PodLocator>) -> Self {
        Self {
            locator,
            found: HashMap::new(),
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
            Err(reason) => {
                tracing::debug!(uid, %reason, "pod sandbox not found yet");
                None
            }
        }
    }

    /// The pod `uid` changed (or went): look it up again next time.
    pub fn forget(&mut self, uid: &str) {
        self.found.remove(uid);
    }
}
