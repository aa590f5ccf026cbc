//! The data plane: per enrolled pod, listeners opened inside the pod's network namespace
//! ([`listeners`]); every connection they take goes down one [`pipeline`]: route, admit,
//! connect, copy, report.
//!
//! Rooms: `context` (what handlers share, admission), `route` (pure decisions), `pipeline`
//! (the steps), `connect` (admission, limits, attempts and retries), `upstream`
//! (connecting), `outcome` (the result value: access log and metrics), `registry` (live
//! connections for revocation), `reserve` and `socket` (sockets made in a pod's netns),
//! `client_ip` (which client address a tunnel stream gets, and the pod's transparent path),
//! `health` (active checks), `fast_path` (the agent's reads reported to the eBPF fast
//! path). Only `listeners` and `health` spawn tasks.

mod client_ip;
mod connect;
mod context;
mod direction;
mod fast_path;
pub mod health;
mod listeners;
mod outcome;
mod pipeline;
pub mod registry;
mod reserve;
pub mod route;
mod socket;
mod telemetry;
mod upstream;

pub use client_ip::{ClientIpPath, FamilyPath};
pub use context::{PodHandle, ProxyContext, ProxyError, Refused};
pub use direction::Direction;
pub use listeners::PodListeners;
pub use outcome::Outcome;
pub use reserve::SocketReserve;
