//! Types shared by the eBPF programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every type here is `#[repr(C)]`, has no implicit padding, and is the key or value of a
//! pinned map: changing a layout means bumping [`SCHEMA_VERSION`], so an agent never reads
//! maps pinned by an incompatible older agent. Each type's size and alignment are asserted at
//! compile time next to it; every size is the sum of the field sizes, so there is no implicit
//! padding (where alignment would leave a hole, an explicit `_pad` field fills it).
#![no_std]

/// Version of the pinned map layout; part of the pin directory name.
pub const SCHEMA_VERSION: u32 = 3;

/// Names of the maps, as the eBPF programs declare them and the agent pins them.
pub mod maps {
    pub const ENROLLED: &str = "ENROLLED";
    pub const POD_STATS: &str = "POD_STATS";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_FLOW: &str = "ORIG_DST_BY_FLOW";
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    pub const SETTINGS: &str = "SETTINGS";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const LOCAL_POD_IPS: &str = "LOCAL_POD_IPS";
    pub const TRANSPARENT_SOURCES: &str = "TRANSPARENT_SOURCES";
    pub const FAST_PATH: &str = "FAST_PATH";
    pub const FAST_FLOWS: &str = "FAST_FLOWS";
    pub const FAST_CONSUMED: &str = "FAST_CONSUMED";
}

/// Names of the programs in the object.
pub mod programs {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SOCK_OPS: &str = "mesh_sock_ops";
    pub const BIND4: &str = "mesh_bind4";
    pub const BIND6: &str = "mesh_bind6";
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    pub const SK_MSG: &str = "mesh_sk_msg";
}

/// Node-wide settings the agent writes into the one-element `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// SO_MARK carried by every socket the proxy creates: never captured, may bind proxy ports.
    pub proxy_mark: u32,
    /// Lowest and highest port reserved for the proxy (outbound, inbound, tunnel listeners).
    pub proxy_port_min: u16,
    pub proxy_port_max: u16,
    /// SO_MARK of the proxy's sockets that connect to an app from a tunnel client's address
    /// (transparent): never captured either. Distinct from `proxy_mark`, because the pod's
    /// reply route selects exactly these sockets' connections.
    pub transparent_mark: u32,
    /// Non-zero when the eBPF fast path (sk_msg redirect between an app and the agent's
    /// in-pod listener) is on: only then does sock_ops put sockets into `FAST_PATH`.
    pub fast_path: u32,
}
const _: () =
    assert!(core::mem::size_of::<Settings>() == 16 && core::mem::align_of::<Settings>() == 4);

/// What to do with a pod's outbound connection when no proxy listener is there to take it.
pub const FAIL_OPEN: u32 = 0;
pub const FAIL_CLOSED: u32 = 1;

/// Value of `ENROLLED`, keyed by the pod's network namespace cookie (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Port of the in-pod outbound listener (on 127.0.0.1 and ::1), host byte order.
    pub outbound_port: u16,
    /// Port of the in-pod inbound listener, host byte order.
    pub inbound_port: u16,
    /// [`FAIL_OPEN`] or [`FAIL_CLOSED`].
    pub fail_mode: u32,
}
const _: () =
    assert!(core::mem::size_of::<EnrolledPod>() == 8 && core::mem::align_of::<EnrolledPod>() == 4);

/// Value of `POD_STATS`, keyed by netns cookie: what connect4/6 did for an enrolled pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// TCP connects rewritten to the outbound listener.
    pub captured: u64,
    /// TCP connects left alone: loopback, excluded port.
    pub skipped: u64,
    /// TCP connects that found no listener: passed (fail-open) or refused (fail-closed).
    pub no_listener: u64,
    /// Sending sockets of the pod's proxied hop (the app's, the agent's) whose data took the
    /// eBPF fast path (sk_msg redirect) instead of loopback TCP: up to two per connection.
    pub fast_path: u64,
}
const _: () =
    assert!(core::mem::size_of::<PodStats>() == 32 && core::mem::align_of::<PodStats>() == 8);

/// Address family tags used in [`SockAddr::family`].
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// An IPv4 or IPv6 socket address as the kernel hands it to eBPF: the address in network
/// byte order (IPv4 in `ip[0]`, the rest zero), the port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}
const _: () =
    assert!(core::mem::size_of::<SockAddr>() == 20 && core::mem::align_of::<SockAddr>() == 4);

/// Value of `ORIG_DST_BY_COOKIE` (keyed by the app socket's cookie) and of
/// `ORIG_DST_BY_FLOW`: where the app meant to connect before connect4/6 rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub netns_cookie: u64,
    pub dst: SockAddr,
    pub _pad: u32,
}
// 8 + 20 + 4: `_pad` fills what would otherwise be trailing padding to the u64 alignment.
const _: () =
    assert!(core::mem::size_of::<OrigDst>() == 32 && core::mem::align_of::<OrigDst>() == 8);

/// Key of `ORIG_DST_BY_FLOW`: the app side of a captured connection as the proxy sees it on
/// accept (peer address), within the pod's network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns_cookie: u64,
    pub src: SockAddr,
    pub _pad: u32,
}
// 8 + 20 + 4, as OrigDst.
const _: () =
    assert!(core::mem::size_of::<FlowKey>() == 32 && core::mem::align_of::<FlowKey>() == 8);

/// Key of `FAST_PATH` and `FAST_FLOWS`: one end of the hop between an app and the agent's
/// in-pod outbound listener, as seen from that end (its own address first), within the pod's
/// network namespace (so two pods' identical loopback tuples never collide). The peer's key
/// is the same with `local` and `remote` swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastKey {
    pub netns_cookie: u64,
    pub local: SockAddr,
    pub remote: SockAddr,
}
// 8 + 20 + 20: a multiple of 8, so no padding.
const _: () =
    assert!(core::mem::size_of::<FastKey>() == 48 && core::mem::align_of::<FastKey>() == 8);

/// [`FastFlow::state`]: no data sent yet; the first send decides.
pub const FAST_UNDECIDED: u32 = 0;
/// Every byte this socket sent so far went to its peer's ingress queue by sk_msg redirect.
pub const FAST_REDIRECT: u32 = 1;
/// This socket's data goes through TCP, for good (never back: that could reorder data).
pub const FAST_PLAIN: u32 = 2;

/// Value of `FAST_FLOWS`: the fast-path state of one sending socket of the hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow {
    /// Bytes this socket redirected so far. Less what the agent has read of them
    /// (`FAST_CONSUMED`), that is what the agent socket's ingress queue holds.
    pub redirected: u64,
    /// [`FAST_UNDECIDED`], [`FAST_REDIRECT`] or [`FAST_PLAIN`].
    pub state: u32,
    /// Non-zero for an app's socket (one that may redirect), zero for the agent's.
    pub app: u32,
}
const _: () =
    assert!(core::mem::size_of::<FastFlow>() == 16 && core::mem::align_of::<FastFlow>() == 8);

// `aya::Pod` is an unsafe trait (the agent copies these types to and from map bytes), so
// implementing it is the one place this crate needs unsafe code.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
mod pod {
    // SAFETY: repr(C), Copy, integers only (u32, u16, u16, u32, u32), no padding (size
    // asserted).
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: repr(C), Copy, integers only (u16, u16, u32), no padding (size asserted).
    unsafe impl aya::Pod for super::EnrolledPod {}
    // SAFETY: repr(C), Copy, integers only (4 x u64), no padding (size asserted).
    unsafe impl aya::Pod for super::PodStats {}
    // SAFETY: repr(C), Copy, integers only ([u32; 4], u16, u16), no padding (size asserted).
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: repr(C), Copy, integers only (u64, SockAddr, u32), no padding (size asserted).
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: repr(C), Copy, integers only (u64, SockAddr, u32), no padding (size asserted).
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), Copy, integers only (u64, SockAddr, SockAddr), no padding (size
    // asserted).
    unsafe impl aya::Pod for super::FastKey {}
    // SAFETY: repr(C), Copy, integers only (u64, u32, u32), no padding (size asserted).
    unsafe impl aya::Pod for super::FastFlow {}
}
