//! The reply path, in one pod's network namespace, of the connections the agent opens to the
//! pod's app from the address of a client pod on another node.
//!
//! Such a connection leaves a transparent socket bound to the client's (foreign) address and
//! carrying the transparent mark. The app's replies go to that foreign address, which the
//! pod's routes would send out of the pod; instead:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1` makes the app's accepted socket (IPv4 and IPv6) take the
//!   mark of the SYN, so every reply it sends carries the transparent mark;
//! - `net.ipv{4,6}.fwmark_reflect = 1` gives the same mark to the resets and ICMP errors the
//!   kernel answers without a socket (a SYN to a closed port), so a refused connect is seen
//!   as refused rather than timing out;
//! - a policy rule `fwmark <mark> lookup <table>` and the route `local default dev lo table
//!   <table>` deliver what carries the mark locally, to the agent's transparent socket.
//!
//! Only packets with exactly that mark take the rule: the agent's other sockets in the pod
//! (the proxy mark) and the app's own traffic route as before. No iptables: the rule and the
//! route are written over rtnetlink. Everything here runs on the pod's netns thread, since
//! `/proc/sys/net` and a netlink socket belong to the namespace of the thread that opens them.

use std::{io, net::IpAddr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// The rule's priority: after the `local` table (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 32764;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ReplyRouteError {
    #[error("setting {path}: {source}")]
    Sysctl {
        path: &'static str,
        source: io::Error,
    },
    #[error("rtnetlink: {0}")]
    Netlink(io::Error),
    #[error("adding the {family} route `local default dev lo table {table}`: {source}")]
    Route {
        family: Family,
        table: u32,
        source: io::Error,
    },
    #[error("adding the {family} rule `fwmark {mark:#x} lookup {table}`: {source}")]
    Rule {
        family: Family,
        mark: u32,
        table: u32,
        source: io::Error,
    },
    #[error("routing table {table} already holds another {family} default route")]
    TableInUse { family: Family, table: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        if ip.to_canonical().is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The mark the rule selects and the table it looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyRoute {
    pub mark: u32,
    pub table: u32,
}

impl ReplyRoute {
    /// Sets up the reply path of `family` in the calling thread's network namespace. Finding
    /// the rule and route already there (an earlier agent's) is success; finding the table's
    /// default route to be something else is [`ReplyRouteError::TableInUse`], and nothing is
    /// changed then.
    pub fn install(&self, family: Family) -> Result<(), ReplyRouteError> {
        let sysctls: &[&'static str] = match family {
            Family::V4 => &[
                "/proc/sys/net/ipv4/tcp_fwmark_accept",
                "/proc/sys/net/ipv4/fwmark_reflect",
            ],
            Family::V6 => &[
                "/proc/sys/net/ipv4/tcp_fwmark_accept",
                "/proc/sys/net/ipv6/fwmark_reflect",
            ],
        };
        for path in sysctls {
            std::fs::write(path, "1").map_err(|source| ReplyRouteError::Sysctl { path, source })?;
        }
        let mut netlink = Netlink::open().map_err(ReplyRouteError::Netlink)?;
        let route = self.route(family);
        match netlink.request(
            RouteNetlinkMessage::NewRoute(route.clone()),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                if !self.default_route_is_ours(&mut netlink, family)? {
                    return Err(ReplyRouteError::TableInUse {
                        family,
                        table: self.table,
                    });
                }
            }
            Err(source) => {
                return Err(ReplyRouteError::Route {
                    family,
                    table: self.table,
                    source,
                });
            }
        }
        match netlink.request(
            RouteNetlinkMessage::NewRule(self.rule(family)),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Ok(_) => Ok(()),
            // The same rule (same priority, mark and table): an earlier agent's.
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(source) => {
                // Leave nothing half done.
                let _ = netlink.request(RouteNetlinkMessage::DelRoute(route), 0);
                Err(ReplyRouteError::Rule {
                    family,
                    mark: self.mark,
                    table: self.table,
                    source,
                })
            }
        }
    }

    /// Removes what [`install`](Self::install) set up for `family` in the calling thread's
    /// network namespace; what is already gone is fine. The sysctls stay: they only concern
    /// marked packets, and only the agent marks packets inside a pod.
    pub fn remove(&self, family: Family) -> Result<(), ReplyRouteError> {
        let mut netlink = Netlink::open().map_err(ReplyRouteError::Netlink)?;
        let gone = |result: io::Result<Vec<RouteNetlinkMessage>>| match result {
            Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => {
                Ok(())
            }
            other => other.map(drop),
        };
        gone(netlink.request(RouteNetlinkMessage::DelRule(self.rule(family)), 0))
            .map_err(ReplyRouteError::Netlink)?;
        let mut route = self.route(family);
        // Match the route by type, device and table, whatever its scope.
        route.header.scope = RouteScope::NoWhere;
        gone(netlink.request(RouteNetlinkMessage::DelRoute(route), 0))
            .map_err(ReplyRouteError::Netlink)
    }

    /// Whether the rule and the route of `family` are both in place in the calling thread's
    /// network namespace.
    #[cfg(test)]
    pub fn installed(&self, family: Family) -> Result<bool, ReplyRouteError> {
        let mut netlink = Netlink::open().map_err(ReplyRouteError::Netlink)?;
        let rules = netlink
            .request(RouteNetlinkMessage::GetRule(dump_rules(family)), NLM_F_DUMP)
            .map_err(ReplyRouteError::Netlink)?;
        let rule = rules.iter().any(|message| match message {
            RouteNetlinkMessage::NewRule(rule) => {
                let has = |wanted: &RuleAttribute| rule.attributes.contains(wanted);
                has(&RuleAttribute::FwMark(self.mark))
                    && has(&RuleAttribute::Table(self.table))
                    && has(&RuleAttribute::Priority(RULE_PRIORITY))
            }
            _ => false,
        });
        Ok(rule && self.default_route_is_ours(&mut netlink, family)?)
    }

    /// Whether the table's default route of `family` is `local default dev lo`.
    fn default_route_is_ours(
        &self,
        netlink: &mut Netlink,
        family: Family,
    ) -> Result<bool, ReplyRouteError> {
        let mut query = RouteMessage::default();
        query.header.address_family = family.address_family();
        let routes = netlink
            .request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)
            .map_err(ReplyRouteError::Netlink)?;
        let default = routes.iter().find_map(|message| match message {
            RouteNetlinkMessage::NewRoute(route)
                if route.header.destination_prefix_length == 0
                    && route_table(route) == self.table =>
            {
                Some(route)
            }
            _ => None,
        });
        Ok(default.is_some_and(|route| {
            route.header.kind == RouteType::Local
                && route
                    .attributes
                    .contains(&RouteAttribute::Oif(LOOPBACK_IFINDEX))
        }))
    }

    /// `local default dev lo table <table>`
    fn route(&self, family: Family) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = family.address_family();
        route.header.destination_prefix_length = 0;
        route.header.table = short_table(self.table);
        route.header.protocol = RouteProtocol::Static;
        route.header.scope = RouteScope::Host;
        route.header.kind = RouteType::Local;
        route.attributes = vec![
            RouteAttribute::Table(self.table),
            RouteAttribute::Oif(LOOPBACK_IFINDEX),
        ];
        route
    }

    /// `fwmark <mark>/0xffffffff lookup <table> priority RULE_PRIORITY`
    fn rule(&self, family: Family) -> RuleMessage {
        let mut rule = RuleMessage::default();
        rule.header.family = family.address_family();
        rule.header.table = short_table(self.table);
        rule.header.action = RuleAction::ToTable;
        rule.attributes = vec![
            RuleAttribute::FwMark(self.mark),
            RuleAttribute::FwMask(u32::MAX),
            RuleAttribute::Table(self.table),
            RuleAttribute::Priority(RULE_PRIORITY),
        ];
        rule
    }
}

#[cfg(test)]
fn dump_rules(family: Family) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family.address_family();
    rule
}

/// The header's 8-bit table field: the table itself when it fits, else 0 (the `Table`
/// attribute, always sent, says which).
fn short_table(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(0)
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// A blocking rtnetlink socket of the calling thread's network namespace.
struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Sends `message` and reads the answer: the messages of a dump (`NLM_F_DUMP`) until its
    /// end, or the acknowledgement of a change (an error is the kernel's errno).
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send_to(&bytes, &SocketAddr::new(0, 0), 0)?;
        let mut answer = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut rest = datagram.as_slice();
            while !rest.is_empty() {
                let length = NetlinkBuffer::new_checked(rest).map_err(invalid)?.length() as usize;
                let (this, after) = rest.split_at(length.min(rest.len()));
                // Messages are 4-byte aligned within a datagram.
                rest = after
                    .get(length.next_multiple_of(4) - length..)
                    .unwrap_or(&[]);
                let message =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(this).map_err(invalid)?;
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(error.to_io());
                    }
                    NetlinkPayload::Error(_) | NetlinkPayload::Done(_) => return Ok(answer),
                    NetlinkPayload::InnerMessage(inner) => answer.push(inner),
                    _ => {}
                }
            }
        }
    }
}

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a thread of its own, fresh network namespace (needs root).
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .ok()
                .map(|()| f())
        })
        .join()
        .ok()
        .flatten()
    }

    const ROUTE: ReplyRoute = ReplyRoute {
        mark: 0x4000_0539,
        table: 1337,
    };

    #[test]
    fn install_is_idempotent_and_remove_takes_it_all_away() {
        let Some(steps) = in_new_netns(|| {
            let mut steps = Vec::new();
            for family in [Family::V4, Family::V6] {
                steps.push((family, "before", ROUTE.installed(family).ok()));
                ROUTE.install(family).expect("install");
                ROUTE
                    .install(family)
                    .expect("install again (an earlier agent's)");
                steps.push((family, "installed", ROUTE.installed(family).ok()));
                let accept = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept");
                assert_eq!(accept.expect("sysctl").trim(), "1");
                ROUTE.remove(family).expect("remove");
                steps.push((family, "removed", ROUTE.installed(family).ok()));
                ROUTE.remove(family).expect("removing again is fine");
            }
            steps
        }) else {
            eprintln!("skipped: no permission for a network namespace");
            return;
        };
        for (family, step, installed) in steps {
            assert_eq!(installed, Some(step == "installed"), "{family} {step}");
        }
    }

    #[test]
    fn a_table_holding_another_default_route_is_left_alone() {
        let Some((error, still_there)) = in_new_netns(|| {
            let mut netlink = Netlink::open().expect("netlink");
            let mut other = ROUTE.route(Family::V4);
            other.header.kind = RouteType::Unreachable;
            other.header.scope = RouteScope::Universe;
            other
                .attributes
                .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
            netlink
                .request(
                    RouteNetlinkMessage::NewRoute(other),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
                .expect("an unreachable default route in the table");
            let error = ROUTE.install(Family::V4).err().map(|e| e.to_string());
            ROUTE.remove(Family::V4).expect("remove");
            let mut query = RouteMessage::default();
            query.header.address_family = AddressFamily::Inet;
            let routes = netlink
                .request(RouteNetlinkMessage::GetRoute(query), NLM_F_DUMP)
                .expect("dump");
            let still_there = routes.iter().any(|m| {
                matches!(m, RouteNetlinkMessage::NewRoute(r)
                    if route_table(r) == ROUTE.table && r.header.kind == RouteType::Unreachable)
            });
            (error, still_there)
        }) else {
            eprintln!("skipped: no permission for a network namespace");
            return;
        };
        assert_eq!(
            error.as_deref(),
            Some("routing table 1337 already holds another IPv4 default route")
        );
        assert!(still_there, "removal leaves the other route alone");
    }
}
