//! The mesh agent as a library: the `mesh-agent` binary is a thin front on it, and the
//! benchmarks and tests reach its pieces from here.
//!
//! Data flows one way: [`config`] sources -> one snapshot -> [`pods`] enrollment, the
//! [`ebpf`] maps and the [`proxy`]; [`admin`] only reads.

pub mod admin;
pub mod agent;
pub mod authz;
pub mod balance;
pub mod ca;
pub mod cli;
pub mod config;
pub mod copy;
pub mod ebpf;
pub mod k8s;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod pods;
pub mod proxy;
pub mod shutdown;
pub mod source;
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod tunnel;
