//! A scripted Kubernetes API server for the Kubernetes source's tests: it serves list, get
//! and watch of the types a node agent reads (Pods, Namespaces, Services, Nodes,
//! EndpointSlices and the project's custom resources) the way a real API server does, while
//! the test changes objects and misbehaves on purpose.
//!
//! The real API server cannot run on these machines; everything the client sees is modelled
//! on it: one global resourceVersion, lists whose items carry no kind/apiVersion for
//! built-in types, paginated lists with continue tokens, chunked watch streams of
//! ADDED/MODIFIED/DELETED/BOOKMARK lines, selectors that add and remove objects from a
//! watch, and `410 Expired` as an ERROR event when a watch resumes from a compacted
//! resourceVersion. The failures a client must survive are the test's to trigger:
//! [`FakeApiServer::compact`], [`FakeApiServer::expire_watches`],
//! [`FakeApiServer::disconnect_watches`], malformed objects with
//! [`FakeApiServer::insert_raw`]. The request log shows how the client reacted.
//!
//! ```no_run
//! use mesh_tests::kubeapi::{FakeApiServer, fixtures};
//! # fn main() -> anyhow::Result<()> {
//! let api = FakeApiServer::start()?;
//! api.apply(fixtures::namespace("demo", &[("mesh.example.dev/enroll", "true")]))?;
//! api.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"))?;
//! api.expire_watches();
//! assert!(api.requests().iter().any(|r| r.is_list()));
//! # Ok(()) }
//! ```

pub mod fixtures;
mod resources;
mod selector;
mod server;
mod store;
mod watch;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::Value;

pub use resources::{MESH_API_VERSION, RESOURCES, ResourceType};

use server::{ServerThread, lock};
use store::Store;

/// How the server is started.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Network namespace to listen in (a node's [`crate::Node::netns_path`]); None: the
    /// host's loopback.
    pub netns: Option<PathBuf>,
    /// How often every watch that allows bookmarks gets one (the real server: about once a
    /// minute; short here so that tests see them).
    pub bookmark_interval: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            netns: None,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// One request the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

impl ApiRequest {
    /// The value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// `?watch=true`.
    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch"), Some("true" | "1"))
    }
    /// A GET of a collection that is not a watch.
    pub fn is_list(&self) -> bool {
        self.method == "GET"
            && !self.is_watch()
            && resources::route(&self.path).is_some_and(|r| r.name.is_none())
    }
}

impl fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        for (i, (k, v)) in self.query.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

/// The scripted API server; stops (closing every connection) on drop.
#[derive(Debug)]
pub struct FakeApiServer {
    store: Arc<Mutex<Store>>,
    thread: ServerThread,
}

impl FakeApiServer {
    /// Listens on the host's 127.0.0.1 (for clients in the test process).
    pub fn start() -> Result<FakeApiServer> {
        Self::start_with(ServerOptions::default())
    }

    /// Listens on 127.0.0.1 inside the network namespace at `netns` (where the agent runs).
    pub fn start_in(netns: &Path) -> Result<FakeApiServer> {
        Self::start_with(ServerOptions {
            netns: Some(netns.to_owned()),
            ..ServerOptions::default()
        })
    }

    pub fn start_with(options: ServerOptions) -> Result<FakeApiServer> {
        let store = Arc::new(Mutex::new(Store::default()));
        let thread = ServerThread::spawn(store.clone(), options.netns, options.bookmark_interval)?;
        Ok(FakeApiServer { store, thread })
    }

    /// The listening address (in the namespace it was started in).
    pub fn addr(&self) -> SocketAddr {
        self.thread.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.thread.addr)
    }

    /// Creates or replaces an object (ADDED or MODIFIED to the watches); returns it as
    /// stored, with resourceVersion, uid, creationTimestamp and namespace filled in.
    pub fn apply(&self, object: Value) -> Result<Value> {
        lock(&self.store).apply(object)
    }

    /// Deletes an object (DELETED to the watches); an error if it does not exist.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Result<()> {
        lock(&self.store).delete(api_version, kind, namespace, name)
    }

    /// Stores `object` verbatim under the given type, namespace and name, next to the good
    /// ones: a malformed object (say a Pod whose spec.containers is a string) is served as
    /// it is. Only metadata.resourceVersion is set, if metadata is a map.
    pub fn insert_raw(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
        object: Value,
    ) -> Result<Value> {
        let resource = resources::by_kind(api_version, kind)
            .with_context(|| format!("the fake API server does not serve {api_version} {kind}"))?;
        Ok(lock(&self.store).insert_raw(resource, namespace, name, object))
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.store).resource_version()
    }

    /// Forgets the history up to now, as etcd compaction does: a watch resuming from an
    /// older resourceVersion, or a paginated list continuing, gets `410 Expired` and must
    /// relist. It also frees the history's copies of every object: worth calling after
    /// loading a large initial state.
    pub fn compact(&self) {
        lock(&self.store).compact();
    }

    /// Ends every open watch with the `410 Expired` ERROR event.
    pub fn expire_watches(&self) {
        lock(&self.store).expire_watches();
    }

    /// Breaks every open watch connection abruptly; the client should resume from its last
    /// resourceVersion.
    pub fn disconnect_watches(&self) {
        lock(&self.store).disconnect_watches();
    }

    /// Sends a BOOKMARK to every watch that allows them, now.
    pub fn bookmark_now(&self) {
        lock(&self.store).bookmark();
    }

    /// Watches currently connected.
    pub fn open_watches(&self) -> usize {
        lock(&self.store).open_watches()
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.store).requests.clone()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        lock(&self.store).requests.clear();
    }

    /// Writes a kubeconfig for this server (no credentials, plain HTTP) to `path`, for
    /// `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mesh-test\n  cluster:\n    server: {}\ncontexts:\n- name: mesh-test\n  context:\n    cluster: mesh-test\n    user: mesh-test\n    namespace: default\ncurrent-context: mesh-test\nusers:\n- name: mesh-test\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}
