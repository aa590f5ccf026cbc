//! Configuration: one model, several sources (today the local YAML file), all producing the same
//! immutable snapshot, shared as `Arc<Config>`.
//!
//! - [`model`]: the resolved snapshot [`Config`] and its parts; [`settings`] (the `agent`
//!   block), [`traffic`] (a service's
//!   traffic policy), [`authorization`] (authorization policies) and [`limits`] (rate limits)
//!   are parts of it.
//! - the file source: [`Config::from_yaml_str`], [`Config::load`] (strict parsing with
//!   positions, then validation that resolves endpoints and builds the lookups), and
//!   [`check`] for `mesh-agent config check`.
//! - [`watch`]: reloads the file on change; an invalid file is refused with `file:line:column`
//!   and the previous snapshot stays.
//!
//! Errors are all [`ConfigError`].

mod assemble;
pub mod authorization;
mod dump;
mod error;
mod file;
pub mod limits;
pub mod model;
mod raw;
pub mod settings;
mod sharded;
pub mod traffic;
mod validate;
pub mod watch;

pub use assemble::{Parts, Workloads};
pub use authorization::{AuthorizationAction, AuthorizationPolicy, AuthorizationRule, RuleSource};
pub use error::ConfigError;
pub use file::{Scope, check, system_node_name};
pub use limits::{
    Bandwidth, EgressLimitPolicy, OnLimit, PerSource, Rate, RateLimitPolicy, SourceOverride,
};
pub use model::{
    Config, Endpoint, EndpointSelection, FailMode, Node, Policies, QualifiedName, Service,
    ServicePort, UnknownDestination, Workload, WorkloadId, WorkloadSpec,
};
pub use settings::{
    AccessLog, AgentConfig, CaCredential, Cidr, LiveSettings, RemoteCa, StartupSettings, defaults,
};
pub use traffic::{
    CallerMatch, CallerRoute, CircuitBreaker, HashOn, HealthCheck, LoadBalancer, Locality,
    OutlierDetection, Retries, Subset, TrafficPolicy,
};
pub use validate::{PolicyKind, PolicyObject, policy_object};
pub use watch::{ConfigWatch, ReloadStats, ReloadStatus};

#[cfg(test)]
mod tests;
