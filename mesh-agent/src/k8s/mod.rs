//! The Kubernetes API as a configuration source: the same `Config` model as the file, from
//! watched objects (namespaces, pods, Services, EndpointSlices, this node, and the mesh's
//! policy resources), so that everything downstream is the same whichever source runs.
//!
//! - [`kinds`]: what is watched, where it is served.
//! - [`stream`]: one untyped watcher per kind (resume, relist after 410, backoff).
//! - [`translate`]: one object -> its piece of the model, once per event; a malformed or
//!   invalid object is refused alone (logged, counted in `mesh_kube_objects_rejected_total`).
//! - [`store`]: the pieces by kind and name, with the list protocol.
//! - [`build`]: the pieces -> a `Config`, through `Config::assemble`.
//! - [`locate`]: a local pod's network namespace from its UID (a seam for tests).
//! - [`source`]: the controller that applies events, rebuilds and publishes.
//!
//! The file (the mounted ConfigMap) still gives the `agent` block and is watched as before.

pub mod build;
pub mod kinds;
pub mod locate;
pub mod source;
pub mod store;
pub mod stream;
pub mod translate;

pub use kinds::ObjectKind;
pub use locate::{Kubepods, PodLocator, Unresolved};
pub use source::{SourceError, SourceInputs, start};

#[cfg(test)]
mod tests;
