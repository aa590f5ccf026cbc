//! The host facts and kernel handles the agent needs: bpffs, the cgroup2 mount, and threads
//! living in pods' network namespaces.

mod mounts;
mod netns;

pub use mounts::{cgroup2_root, ensure_bpffs};
pub use netns::{NetnsError, NetnsThread};
