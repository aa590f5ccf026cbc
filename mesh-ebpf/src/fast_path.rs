//! The eBPF fast path: data an app sends to the agent inside its pod skips the loopback TCP
//! stack. Both ends of such a hop go into the `FAST_PATH` sockhash when they are established;
//! `mesh_sk_msg` then moves what the sender writes straight into the agent socket's receive
//! (ingress) queue with `bpf_msg_redirect_hash(.., BPF_F_INGRESS)`.
//!
//! The hops: the app's captured connection and the socket the agent accepted for it on the
//! pod's outbound listener (client side); the agent's connection to an app of the pod and the
//! socket the app accepted (server side).
//!
//! Only the direction whose receiver is the agent is redirected. The agent reads with plain
//! `recv` and never splices, peeks or uses zero-copy receive, which do not see a redirected
//! ingress queue; an app may (splice(2) from a socket reads the TCP queue only), so data to an
//! app keeps going through TCP.
//!
//! Soundness rests on three rules:
//! - A sending socket's path is decided at its first send and only ever changes from redirect
//!   to TCP, never back: the receiver reads its ingress queue before its TCP queue, so data
//!   redirected earlier is read before data sent later through TCP (including the FIN).
//! - A receiver's ingress queue is not bounded by its receive buffer (the kernel charges it as
//!   send memory), and a redirecting sender never waits for the receiver. So a sender may
//!   have at most [`BUDGET`] bytes redirected and not yet read by the agent (which writes
//!   what it read into `FAST_CONSUMED`); a send that would exceed it falls back to TCP for
//!   good, where flow control makes the sender wait for an agent that stops reading.
//! - Sockets leave the sockhash when they are closed (and their ingress queue stays readable
//!   until then, also after a FIN or a reset); nothing removes an agent socket earlier, which
//!   would drop its queue. A sender whose peer is gone falls back to TCP.
//!
//! An app socket in a sockhash reads through the kernel's sk_msg receive path
//! (`tcp_bpf_recvmsg`), which waits for one wake-up and returns EAGAIN to a *blocking* read if
//! that wake-up brought no data (a state change, or the acknowledgement of its TCP sends
//! freeing a full send buffer), where TCP's own read path waits again. So an app socket stays
//! in the map only while it may still redirect: it leaves when it shuts down its sending side,
//! when it is reset, and once its data goes through TCP (at the first acknowledgement of it).
//! Its ingress queue is always empty (nothing is redirected to an app), so leaving drops
//! nothing. A read already waiting when the socket leaves is still in that path, though: an
//! app that reads on one thread and shuts down its sending side on another gets EAGAIN (seen
//! with perf as `inet_shutdown` -> `sock_def_wakeup` waking the reader, in the cross-node echo
//! tests on kernel 6.18). Nothing here can tell a blocking socket in advance (clients commonly
//! connect non-blocking, then switch to blocking); that, and a benchmark that shows no gain
//! over splicing (README), is why `agent.fastPath` is off by default.
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT1, bpf_sock_ops, sk_action, sk_msg_md,
    },
    helpers::{bpf_get_netns_cookie, bpf_map_delete_elem},
    macros::{map, sk_msg},
    maps::{HashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    FAMILY_V6, FAST_PLAIN, FAST_REDIRECT, FAST_UNDECIDED, FastFlow, FastKey, SockAddr,
};

use crate::{ENROLLED, LOOPBACK4_BE, SETTINGS, Stat, count};

/// Bytes a sending socket may have redirected and not yet read by the agent (see the module
/// docs): what the agent's ingress queue holds at most for it, about a loopback socket's
/// buffers.
const BUDGET: u64 = 4 << 20;

/// Both ends of every fast-path hop, keyed by their own view of the connection.
#[map]
static FAST_PATH: SockHash<FastKey> = SockHash::pinned(65536, 0);
/// The path state of each socket in `FAST_PATH`; an entry exists exactly while its socket
/// was added and is not closed (sock_ops removes it on close).
#[map]
static FAST_FLOWS: HashMap<FastKey, FastFlow> = HashMap::pinned(65536, 0);
/// How much of what an app socket (the key) redirected the agent has read, written by the
/// agent as it reads; removed by the agent when the connection ends, and here on close.
#[map]
static FAST_CONSUMED: HashMap<FastKey, u64> = HashMap::pinned(65536, 0);
/// The app's captured connection (the agent accepts it on the outbound listener): it may
/// redirect to the agent once the agent's socket is in the map.
#[inline(always)]
pub fn add_app_socket(ctx: &SockOpsContext) {
    if enabled() {
        add(ctx, FAST_UNDECIDED);
    }
}

/// An agent socket connecting from inside an enrolled pod (it carries a proxy mark): the
/// server side's agent end, whose peer may be an app of that pod. It only receives by
/// redirect.
#[inline(always)]
pub fn add_agent_upstream(ctx: &SockOpsContext) {
    if !enabled() {
        return;
    }
    let Some(settings) = SETTINGS.get(0).copied() else {
        return;
    };
    // SAFETY: the context is valid for the program's run; `sk` may be read and is checked
    // for null before use (the verifier insists).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: a non-null `sk` of a sock_ops context points to the socket.
    let mark = unsafe { (*sk).mark };
    if mark == 0 || (mark != settings.proxy_mark && mark != settings.transparent_mark) {
        return;
    }
    // SAFETY: only the presence of the entry is used.
    if unsafe { ENROLLED.get(netns(ctx)) }.is_none() {
        return;
    }
    add(ctx, FAST_PLAIN);
}

/// A passively opened socket in an enrolled pod: the agent's accepted socket on the outbound
/// listener (client side), or an app's accepted socket whose peer is an agent upstream
/// socket already in the map (server side).
#[inline(always)]
pub fn on_passive_established(ctx: &SockOpsContext) {
    if !enabled() {
        return;
    }
    let key = ops_key(ctx);
    // SAFETY: the value is copied out at once.
    let Some(pod) = (unsafe { ENROLLED.get(key.netns_cookie) }).copied() else {
        return;
    };
    if key.local.port == pod.outbound_port && is_loopback(&key.local) {
        add(ctx, FAST_PLAIN);
        return;
    }
    // SAFETY: only the presence of the entry is used.
    if unsafe { FAST_FLOWS.get(peer_of(&key)) }.is_some() {
        add(ctx, FAST_UNDECIDED);
    }
}

/// An app socket leaves the map when it shuts down its sending side (its reads may still
/// block, and the acknowledgement of its FIN wakes them) or is reset (see the module docs);
/// a closed socket's state goes (the kernel takes any socket out of the sockhash on close).
/// One whose peer half-closed stays: its reads return EOF at once, and its reply may still
/// take the fast path.
#[inline(always)]
pub fn on_state_change(ctx: &SockOpsContext) {
    // args[1] is the new state.
    let state = ctx.arg(1);
    let key = ops_key(ctx);
    if state == BPF_TCP_FIN_WAIT1 || state == BPF_TCP_CLOSE {
        app_leaves(ctx, &key);
    }
    if state == BPF_TCP_CLOSE {
        let _ = FAST_FLOWS.remove(key);
        let _ = FAST_CONSUMED.remove(key);
    }
}

/// Data of an app socket was acknowledged: it went through TCP, so the socket falls back (if
/// it had not) and leaves the map.
#[inline(always)]
pub fn on_rtt(ctx: &SockOpsContext) {
    app_leaves(ctx, &ops_key(ctx));
}

/// Takes an app socket out of the sockhash, for good (its state stays until it closes, so
/// that it never redirects again); no more round-trip callbacks for it.
#[inline(always)]
fn app_leaves(ctx: &SockOpsContext, key: &FastKey) {
    let Some(flow) = FAST_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live map value, written by this socket's own programs (which the socket lock
    // serializes).
    if unsafe { (*flow).app } == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { (*flow).state = FAST_PLAIN };
    // SAFETY: FAST_PATH is a map definition (SockHash is transparent over it) and `key` a
    // live key of its type; sock_ops programs may delete from a sockhash.
    unsafe {
        bpf_map_delete_elem(
            (&raw const FAST_PATH).cast_mut().cast(),
            (key as *const FastKey).cast(),
        );
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let pass = sk_action::SK_PASS;
    let key = msg_key(ctx.msg);
    let Some(flow) = FAST_FLOWS.get_ptr_mut(key) else {
        return pass;
    };
    // SAFETY: a live map value; only this socket's sendmsg (which holds the socket lock)
    // writes it, so there is no concurrent writer.
    let (state, redirected) = unsafe { ((*flow).state, (*flow).redirected) };
    if state == FAST_PLAIN {
        return pass;
    }
    let mut peer = peer_of(&key);
    let size = u64::from(ctx.size());
    // The helper finds the peer only while it is in the sockhash (a closing socket leaves it
    // before its state goes); without it, this message and all later ones go through TCP,
    // where the kernel reports what the peer did.
    // SAFETY: copied out at once; only the agent writes it.
    let consumed = unsafe { FAST_CONSUMED.get(key) }.copied().unwrap_or(0);
    let verdict = if redirected.saturating_sub(consumed) + size > BUDGET {
        sk_action::SK_DROP
    } else {
        FAST_PATH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) as u32
    };
    if verdict != pass {
        // SAFETY: as above.
        unsafe { (*flow).state = FAST_PLAIN };
        return pass;
    }
    // SAFETY: as above.
    unsafe {
        (*flow).state = FAST_REDIRECT;
        (*flow).redirected = redirected + size;
    }
    if state == FAST_UNDECIDED {
        count(key.netns_cookie, Stat::FastPath);
    }
    pass
}

fn enabled() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|settings| settings.fast_path != 0)
}

/// Adds the context's socket to the sockhash, then its state; without the sockhash entry
/// there is no state, so neither end ever redirects to or from it.
#[inline(always)]
fn add(ctx: &SockOpsContext, state: u32) {
    let mut key = ops_key(ctx);
    // SAFETY: the context pointer is the program's own, valid for its run.
    let ops: &mut bpf_sock_ops = unsafe { &mut *ctx.ops };
    if FAST_PATH
        .update(&mut key, ops, u64::from(BPF_NOEXIST))
        .is_err()
    {
        return;
    }
    // State changes: to forget its state when the socket closes (and for an app socket, to
    // leave the map when it stops being established); round trips: an app socket's data went
    // through TCP.
    let app = state != FAST_PLAIN;
    let flags = if app {
        BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG
    } else {
        BPF_SOCK_OPS_STATE_CB_FLAG
    };
    let _ = ctx.set_cb_flags(flags as i32);
    let flow = FastFlow {
        state,
        app: u32::from(app),
        ..Default::default()
    };
    let _ = FAST_FLOWS.insert(key, flow, u64::from(BPF_NOEXIST));
}

fn netns(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper is given the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.ops.cast()) }
}

fn peer_of(key: &FastKey) -> FastKey {
    FastKey {
        netns_cookie: key.netns_cookie,
        local: key.remote,
        remote: key.local,
    }
}

fn is_loopback(addr: &SockAddr) -> bool {
    if addr.family == FAMILY_V6 {
        addr.ip == [0, 0, 0, u32::from_be(1)]
    } else {
        addr.ip[0] == LOOPBACK4_BE
    }
}

/// Both context kinds give the remote port in network byte order in the upper 16 bits of a
/// u32 (little-endian) and the local port in host byte order.
fn remote_port(raw: u32) -> u16 {
    u16::from_be((raw >> 16) as u16)
}

fn sock_addr(family: u32, ip4: u32, ip6: [u32; 4], port: u16) -> SockAddr {
    let mut addr = SockAddr {
        port,
        ..Default::default()
    };
    let v4_mapped = ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_be(0xffff);
    if family == u32::from(FAMILY_V6) && !v4_mapped {
        addr.family = FAMILY_V6;
        addr.ip = ip6;
    } else if family == u32::from(FAMILY_V6) {
        // A dual-stack socket's IPv4 peer: keyed as IPv4, as the peer keys itself.
        addr.family = mesh_common::FAMILY_V4;
        addr.ip[0] = ip6[3];
    } else {
        addr.family = mesh_common::FAMILY_V4;
        addr.ip[0] = ip4;
    }
    addr
}

/// The key of a sock_ops context's socket. Every field is read up front with plain loads (see
/// `on_active_established` in main.rs for why).
#[inline(always)]
fn ops_key(ctx: &SockOpsContext) -> FastKey {
    let ops = ctx.ops;
    // SAFETY: the sock_ops context is valid for the program's run and these fields are
    // readable in it; `&raw const` makes no reference.
    let (family, lport, rport, lip4, rip4, lip6, rip6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_port),
            read_volatile(&raw const (*ops).remote_port),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            read_ip6(&raw const (*ops).local_ip6),
            read_ip6(&raw const (*ops).remote_ip6),
        )
    };
    FastKey {
        netns_cookie: netns(ctx),
        local: sock_addr(family, lip4, lip6, lport as u16),
        remote: sock_addr(family, rip4, rip6, remote_port(rport)),
    }
}

/// The key of the socket sending a message, read as [`ops_key`] reads its context.
#[inline(always)]
fn msg_key(msg: *mut sk_msg_md) -> FastKey {
    // SAFETY: as in `ops_key`, for the sk_msg context.
    let (family, lport, rport, lip4, rip4, lip6, rip6) = unsafe {
        (
            read_volatile(&raw const (*msg).family),
            read_volatile(&raw const (*msg).local_port),
            read_volatile(&raw const (*msg).remote_port),
            read_volatile(&raw const (*msg).local_ip4),
            read_volatile(&raw const (*msg).remote_ip4),
            read_ip6(&raw const (*msg).local_ip6),
            read_ip6(&raw const (*msg).remote_ip6),
        )
    };
    FastKey {
        // SAFETY: the helper is given the program's own context.
        netns_cookie: unsafe { bpf_get_netns_cookie(msg.cast()) },
        local: sock_addr(family, lip4, lip6, lport as u16),
        remote: sock_addr(family, rip4, rip6, remote_port(rport)),
    }
}

/// # Safety
/// `ip` must point to a readable 4-word field of the program's context.
#[inline(always)]
unsafe fn read_ip6(ip: *const [u32; 4]) -> [u32; 4] {
    let words = ip.cast::<u32>();
    // SAFETY: the caller's promise; each word is read with its own 4-byte load, as the
    // verifier wants for context fields.
    unsafe {
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}
