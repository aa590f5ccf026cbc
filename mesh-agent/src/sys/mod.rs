//! The host facts and kernel handles the agent needs: bpffs, the cgroup2 mount, threads
//! living in pods' network namespaces and the reply route in them, Kubernetes pods found by
//! UID, process start times, and
//! returning free memory.

pub mod kubepods;
pub mod memory;
mod mounts;
mod netns;
pub mod process;
pub mod reply_route;

pub use mounts::{cgroup2_root, ensure_bpffs};
pub use netns::{NetnsError, NetnsThread};
