//! The mesh agent's kernel side.
//!
//! - `mesh_connect4/6` (cgroup connect): rewrite TCP connects from enrolled pods to the pod's
//!   outbound listener and remember the original destination by socket cookie.
//! - `mesh_sock_ops`: when the rewritten connection is established, move the original
//!   destination to a flow key the proxy can compute on accept (its peer address).
//! - `mesh_bind4/6` (cgroup bind): only sockets carrying a proxy mark may bind proxy ports.
//! - `mesh_sk_lookup` (attached to each enrolled pod's netns): hands new inbound connections
//!   to the pod's inbound listener, keeping the client address and original destination;
//!   leaves alone the proxy's own connections from a tunnel client's address.
//! - `mesh_sk_msg` (attached to the `FAST_PATH` sockhash, see the `fast_path` module): the
//!   eBPF fast path between an app and the agent's socket in the same pod.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem::size_of, ptr::read_volatile};

mod fast_path;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_STATE_CB, bpf_sock_addr, bpf_sock_tuple, sk_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use mesh_common::{
    EnrolledPod, FAIL_CLOSED, FAMILY_V4, FAMILY_V6, FlowKey, OrigDst, PodStats, Settings, SockAddr,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
/// 127.0.0.1 in network byte order, as the kernel stores it on little-endian machines.
const LOOPBACK4_BE: u32 = u32::from_be(0x7f00_0001);
/// Look sockets up in the network namespace of the program's context.
const CURRENT_NETNS: u64 = u64::MAX;

#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);
#[map]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(4096, 0);
#[map]
/// Per CPU so counting needs no atomics; the agent sums the CPUs.
static POD_STATS: PerCpuHashMap<u64, PodStats> = PerCpuHashMap::pinned(4096, 0);
/// Destination ports never captured (node-wide), value unused.
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::pinned(256, 0);
/// Destination networks never captured (node-wide), as IPv6 (IPv4 mapped into ::ffff:0:0/96).
#[map]
static EXCLUDED_CIDRS: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(256, 0);
/// Short-lived: written at connect, moved to the flow map at establishment. LRU so an
/// abandoned connect (refused, timed out) cannot fill it.
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65536, 0);
/// Inbound listener of each enrolled pod, keyed by the pod's IP (port 0).
#[map]
static INBOUND_LISTENERS: SockHash<SockAddr> = SockHash::pinned(4096, 0);
/// IPs of the enrolled pods on this node (port 0), value unused. Their connections to each
/// other already went through the agent's outbound side, which connected from the source
/// pod so the destination sees the real client: inbound capture leaves them alone.
#[map]
static LOCAL_POD_IPS: HashMap<SockAddr, u8> = HashMap::pinned(4096, 0);
/// Where the proxy's transparent sockets are connecting from right now (a client pod of
/// another node: its address and the socket's port), value unused. Their SYNs reach the app
/// from inside the pod and must not be taken for inbound connections from outside. The
/// proxy adds an entry before it connects and removes it once connected.
#[map]
static TRANSPARENT_SOURCES: HashMap<SockAddr, u8> = HashMap::pinned(65536, 0);
/// Read and deleted by the proxy on accept; LRU for the same reason.
#[map]
static ORIG_DST_BY_FLOW: LruHashMap<FlowKey, OrigDst> = LruHashMap::pinned(65536, 0);

enum Stat {
    Captured,
    Skipped,
    NoListener,
    FastPath,
}

fn count(netns: u64, stat: Stat) {
    if let Some(stats) = POD_STATS.get_ptr_mut(netns) {
        // SAFETY: a live per-CPU map value, written only by this CPU.
        unsafe {
            match stat {
                Stat::Captured => (*stats).captured += 1,
                Stat::Skipped => (*stats).skipped += 1,
                Stat::NoListener => (*stats).no_listener += 1,
                Stat::FastPath => (*stats).fast_path += 1,
            }
        }
    } else {
        let first = match stat {
            Stat::Captured => PodStats {
                captured: 1,
                ..Default::default()
            },
            Stat::Skipped => PodStats {
                skipped: 1,
                ..Default::default()
            },
            Stat::NoListener => PodStats {
                no_listener: 1,
                ..Default::default()
            },
            Stat::FastPath => PodStats {
                fast_path: 1,
                ..Default::default()
            },
        };
        let _ = POD_STATS.insert(netns, first, 0);
    }
}

/// True when the socket behind a sock_addr context carries one of the proxy's marks: the
/// proxy mark, or the transparent mark of its sockets that connect from a tunnel client's
/// address. Exact values, not bits: an app's own marks never pass for the proxy's.
fn is_proxy_socket(addr: *const bpf_sock_addr) -> bool {
    let Some(settings) = SETTINGS.get(0).copied() else {
        return false;
    };
    // SAFETY: `addr` is the program's context, valid for its run; its `sk` may be read.
    let sk = unsafe { (*addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null `sk` of a sock_addr context points to the socket; the verifier checks
    // the access.
    let mark = unsafe { (*sk).mark };
    mark != 0 && (mark == settings.proxy_mark || mark == settings.transparent_mark)
}

/// Whether a TCP listener is bound at the given loopback address and port in the current
/// netns: without one a rewritten connect would be refused.
fn listener_exists(ctx: &SockAddrContext, v6: bool, port: u16) -> bool {
    // SAFETY: zeroed bpf_sock_tuple is valid; it is a plain C union of integers.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: both arms of the union are plain integers, valid in any bit pattern (and zeroed
    // above), so borrowing either one is sound.
    let size = unsafe {
        if v6 {
            let t = &mut tuple.__bindgen_anon_1.ipv6;
            t.daddr = [0, 0, 0, u32::from_be(1)];
            t.dport = port.to_be();
            size_of::<[u32; 4]>() as u32 * 2 + 4
        } else {
            let t = &mut tuple.__bindgen_anon_1.ipv4;
            t.daddr = LOOPBACK4_BE;
            t.dport = port.to_be();
            12
        }
    };
    // SAFETY: the program's own context, and a live tuple whose used part is `size` bytes; the
    // verifier checks the helper's arguments.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr_void(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from bpf_sk_lookup_tcp, released exactly once (the verifier
    // insists on it).
    unsafe { bpf_sk_release(sk as *mut c_void) };
    true
}

trait AsVoid {
    fn as_ptr_void(&self) -> *mut c_void;
}
impl AsVoid for SockAddrContext {
    fn as_ptr_void(&self) -> *mut c_void {
        self.sock_addr.cast()
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run; fields are checked by the
    // verifier.
    if unsafe { (*addr).protocol } != IPPROTO_TCP {
        return ALLOW;
    }
    // SAFETY: the helper is given the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr_void()) };
    // SAFETY: the value is copied out at once: no reference outlives a concurrent update or
    // delete from user space.
    let Some(pod) = (unsafe { ENROLLED.get(netns) }).copied() else {
        return ALLOW;
    };
    if is_proxy_socket(addr) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let port = u16::from_be(unsafe { (*addr).user_port } as u16);
    let mut dst = SockAddr {
        port,
        ..Default::default()
    };
    if v6 {
        // SAFETY: the context pointer is valid for the program's run (connect6 may read it).
        let ip = unsafe { (*addr).user_ip6 };
        let v4_mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0xffff);
        let loopback = (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == u32::from_be(1))
            || (v4_mapped && (u32::from_be(ip[3]) >> 24) == 127);
        if loopback {
            return ALLOW;
        }
        if v4_mapped {
            dst.family = FAMILY_V4;
            dst.ip[0] = ip[3];
        } else {
            dst.family = FAMILY_V6;
            dst.ip = ip;
        }
    } else {
        // SAFETY: the context pointer is valid for the program's run (connect4 may read it).
        let ip = unsafe { (*addr).user_ip4 };
        if (u32::from_be(ip) >> 24) == 127 {
            return ALLOW;
        }
        dst.family = FAMILY_V4;
        dst.ip[0] = ip;
    }
    // SAFETY: only the presence of the entry is used, never the value behind the reference.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() || excluded_network(&dst) {
        count(netns, Stat::Skipped);
        return ALLOW;
    }
    if !listener_exists(ctx, v6, pod.outbound_port) {
        count(netns, Stat::NoListener);
        return if pod.fail_mode == FAIL_CLOSED {
            DENY
        } else {
            ALLOW
        };
    }
    // SAFETY: the helper is given the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr_void()) };
    let orig = OrigDst {
        netns_cookie: netns,
        dst,
        _pad: 0,
    };
    if ORIG_DST_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without the original destination the proxy could not route it: leave it alone.
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program's run, and connect4/6 programs may
    // write the destination address and port (the verifier checks which fields).
    unsafe {
        if v6 {
            (*addr).user_ip6 = [0, 0, 0, u32::from_be(1)];
        } else {
            (*addr).user_ip4 = LOOPBACK4_BE;
        }
        (*addr).user_port = u32::from(pod.outbound_port.to_be());
    }
    count(netns, Stat::Captured);
    ALLOW
}

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if on_active_established(&ctx) {
                fast_path::add_app_socket(&ctx);
            } else {
                fast_path::add_agent_upstream(&ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => fast_path::on_passive_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => fast_path::on_state_change(&ctx),
        BPF_SOCK_OPS_RTT_CB => fast_path::on_rtt(&ctx),
        _ => {}
    }
    0
}

/// Moves a captured connection's original destination to its flow key; true when the socket
/// was a captured one.
#[inline(always)]
fn on_active_established(ctx: &SockOpsContext) -> bool {
    // SAFETY: the helper is given the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once, before this program removes the entry.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return false;
    };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    // Read every context field up front with plain loads: branching between the IPv4 and
    // IPv6 fields lets LLVM merge the loads through a modified context pointer, which the
    // verifier rejects.
    let ops = ctx.ops;
    // SAFETY: the sock_ops context is valid for the program's run and these fields are
    // readable in it; `&raw const` makes no reference, only the address of each field.
    let (family, port, ip4, ip6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_port),
            read_volatile(&raw const (*ops).local_ip4),
            [
                read_volatile(&raw const (*ops).local_ip6[0]),
                read_volatile(&raw const (*ops).local_ip6[1]),
                read_volatile(&raw const (*ops).local_ip6[2]),
                read_volatile(&raw const (*ops).local_ip6[3]),
            ],
        )
    };
    let mut src = SockAddr {
        port: port as u16,
        ..Default::default()
    };
    if family == u32::from(FAMILY_V6) {
        src.family = FAMILY_V6;
        src.ip = ip6;
    } else {
        src.family = FAMILY_V4;
        src.ip[0] = ip4;
    }
    let key = FlowKey {
        netns_cookie: orig.netns_cookie,
        src,
        _pad: 0,
    };
    let _ = ORIG_DST_BY_FLOW.insert(key, orig, 0);
    true
}

#[cgroup_sock_addr(bind4)]
pub fn mesh_bind4(ctx: SockAddrContext) -> i32 {
    bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn mesh_bind6(ctx: SockAddrContext) -> i32 {
    bind(&ctx)
}

#[inline(always)]
fn bind(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    let Some(settings) = SETTINGS.get(0).copied() else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let port = u16::from_be(unsafe { (*addr).user_port } as u16);
    if port < settings.proxy_port_min || port > settings.proxy_port_max {
        return ALLOW;
    }
    // SAFETY: the helper is given the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr_void()) };
    // SAFETY: only the presence of the entry is used, never the value behind the reference.
    if unsafe { ENROLLED.get(netns) }.is_none() || is_proxy_socket(addr) {
        return ALLOW;
    }
    DENY
}

/// Whether the destination is in one of the excluded networks.
#[inline(always)]
fn excluded_network(dst: &SockAddr) -> bool {
    let mut data = [0u8; 16];
    if dst.family == FAMILY_V4 {
        data[10] = 0xff;
        data[11] = 0xff;
        data[12..16].copy_from_slice(&dst.ip[0].to_ne_bytes());
    } else {
        for (i, word) in dst.ip.iter().enumerate() {
            data[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    }
    EXCLUDED_CIDRS.get(Key::new(128, data)).is_some()
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    let pass = sk_action::SK_PASS;
    // SAFETY: the context pointer is valid for the program's run.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return pass;
    }
    let port = lookup.local_port as u16;
    if let Some(settings) = SETTINGS.get(0)
        && port >= settings.proxy_port_min
        && port <= settings.proxy_port_max
    {
        return pass;
    }
    // SAFETY: only the presence of the entry is used, never the value behind the reference.
    if unsafe { EXCLUDED_PORTS.get(port) }.is_some() {
        return pass;
    }
    let mut key = SockAddr::default();
    let mut client = SockAddr::default();
    if lookup.family == u32::from(FAMILY_V6) {
        let (local, remote) = (lookup.local_ip6, lookup.remote_ip6);
        // The pod talking to itself (the inbound proxy reaching the app) or over loopback.
        if remote == local || remote == [0, 0, 0, u32::from_be(1)] {
            return pass;
        }
        key.family = FAMILY_V6;
        key.ip = local;
        client.family = FAMILY_V6;
        client.ip = remote;
    } else {
        let (local, remote) = (lookup.local_ip4, lookup.remote_ip4);
        if remote == local || (u32::from_be(remote) >> 24) == 127 {
            return pass;
        }
        key.family = FAMILY_V4;
        key.ip[0] = local;
        client.family = FAMILY_V4;
        client.ip[0] = remote;
    }
    // SAFETY: only the presence of the entry is used, never the value behind the reference.
    if unsafe { LOCAL_POD_IPS.get(client) }.is_some() {
        return pass;
    }
    client.port = u16::from_be(lookup.remote_port);
    // SAFETY: as above.
    if unsafe { TRANSPARENT_SOURCES.get(client) }.is_some() {
        return pass;
    }
    // No listener for this address (not enrolled, or the agent is gone): normal delivery.
    let _ = INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0);
    pass
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
