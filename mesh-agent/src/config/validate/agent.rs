//! Validates the `agent` block (listeners, marks, limits, exclusions, mTLS), defaults applied.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_saphyr::Location;

use super::{Cx, Result, scalars};
use crate::config::raw::{RawAccessLog, RawAgent, RawRemoteCa, S};
use crate::config::settings::{
    AccessLog, AgentConfig, CaCredential, Cidr, LiveSettings, RemoteCa, StartupSettings, defaults,
};
use crate::names::Kind;

impl Cx<'_> {
    pub(super) fn agent(
        &self,
        a: &RawAgent,
        default_node: impl FnOnce() -> String,
    ) -> Result<AgentConfig> {
        let node = match &a.node {
            Some(n) => self.name(n, "agent.node", Kind::Node)?,
            None => default_node(),
        };
        let cgroup = a
            .cgroup
            .as_ref()
            .map(|c| self.abs_path(c, "agent.cgroup"))
            .transpose()?;
        let bpf_name = match &a.bpf_name {
            Some(b) => self.pin_name(b, "agent.bpfName")?,
            None => defaults::BPF_NAME.to_owned(),
        };
        let port_or = |field: &Option<S<u64>>, path: &str, default: u16| match field {
            Some(p) => self.port(p, path),
            None => Ok(default),
        };
        let outbound_port = port_or(
            &a.outbound_port,
            "agent.outboundPort",
            defaults::OUTBOUND_PORT,
        )?;
        let inbound_port = port_or(&a.inbound_port, "agent.inboundPort", defaults::INBOUND_PORT)?;
        let tunnel_port = port_or(&a.tunnel_port, "agent.tunnelPort", defaults::TUNNEL_PORT)?;
        let admin_addr = match &a.admin_addr {
            Some(s) => self.admin_addr(s)?,
            None => defaults::ADMIN_ADDR,
        };

        // The listeners all live in the node netns: no two may share a port.
        let listeners = [
            (
                "agent.outboundPort",
                outbound_port,
                a.outbound_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.inboundPort",
                inbound_port,
                a.inbound_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.tunnelPort",
                tunnel_port,
                a.tunnel_port.as_ref().map(|s| s.referenced),
            ),
            (
                "agent.adminAddr",
                admin_addr.port(),
                a.admin_addr.as_ref().map(|s| s.referenced),
            ),
        ];
        for (j, (path_j, port_j, at_j)) in listeners.iter().enumerate() {
            for (path_i, port_i, at_i) in &listeners[..j] {
                if port_i != port_j {
                    continue;
                }
                // Point at whichever of the two was written in the file (defaults never
                // collide with each other).
                let (path, other, at) = match (at_j, at_i) {
                    (Some(at), _) => (path_j, path_i, *at),
                    (None, Some(at)) => (path_i, path_j, *at),
                    (None, None) => (path_j, path_i, Location::UNKNOWN),
                };
                return Err(self.err(
                    at,
                    *path,
                    format!("port {port_j} is already used by {other}"),
                ));
            }
        }

        let proxy_mark = match &a.proxy_mark {
            Some(m) if m.value == 0 => {
                return Err(self.err(m.referenced, "agent.proxyMark", "must be non-zero"));
            }
            Some(m) => u32::try_from(m.value).map_err(|_| {
                self.err(
                    m.referenced,
                    "agent.proxyMark",
                    format!("{:#x} does not fit in 32 bits", m.value),
                )
            })?,
            None => defaults::PROXY_MARK,
        };
        let transparent_mark = match &a.transparent_mark {
            Some(m) if m.value == 0 => {
                return Err(self.err(m.referenced, "agent.transparentMark", "must be non-zero"));
            }
            Some(m) => {
                let mark = u32::try_from(m.value).map_err(|_| {
                    self.err(
                        m.referenced,
                        "agent.transparentMark",
                        format!("{:#x} does not fit in 32 bits", m.value),
                    )
                })?;
                if mark == proxy_mark {
                    return Err(self.err(
                        m.referenced,
                        "agent.transparentMark",
                        "must differ from agent.proxyMark",
                    ));
                }
                mark
            }
            None if proxy_mark == defaults::TRANSPARENT_MARK => {
                let at = a
                    .proxy_mark
                    .as_ref()
                    .map_or(Location::UNKNOWN, |m| m.referenced);
                return Err(self.err(
                    at,
                    "agent.proxyMark",
                    "is the default agent.transparentMark: set another transparentMark",
                ));
            }
            None => defaults::TRANSPARENT_MARK,
        };
        let reply_table = match &a.reply_table {
            // 0 is no table; 253-255 are the kernel's default, main and local tables.
            Some(t) if t.value == 0 || (253..=255).contains(&t.value) => {
                return Err(self.err(
                    t.referenced,
                    "agent.replyTable",
                    format!(
                        "{} is reserved (0, 253 default, 254 main, 255 local)",
                        t.value
                    ),
                ));
            }
            Some(t) => u32::try_from(t.value).map_err(|_| {
                self.err(
                    t.referenced,
                    "agent.replyTable",
                    format!("{} does not fit in 32 bits", t.value),
                )
            })?,
            None => defaults::REPLY_TABLE,
        };

        let mut excluded_ports = Vec::new();
        for (i, p) in a.excluded_ports.iter().flatten().enumerate() {
            let path = format!("agent.excludedPorts[{i}]");
            let port = self.port(p, &path)?;
            if excluded_ports.contains(&port) {
                return Err(self.err(p.referenced, path, format!("port {port} is listed twice")));
            }
            excluded_ports.push(port);
        }
        excluded_ports.sort_unstable();

        let mut excluded_cidrs: Vec<Cidr> = Vec::new();
        for (i, c) in a.excluded_cidrs.iter().flatten().enumerate() {
            let path = format!("agent.excludedCidrs[{i}]");
            let cidr = scalars::parse_cidr(&c.value)
                .map_err(|reason| self.err(c.referenced, path.as_str(), reason))?;
            if excluded_cidrs.contains(&cidr) {
                return Err(self.err(c.referenced, path, format!("{cidr} is listed twice")));
            }
            excluded_cidrs.push(cidr);
        }

        let millis = |field: &Option<S<u64>>, path: &str, default: Duration| match field {
            Some(ms) if ms.value == 0 => Err(self.err(ms.referenced, path, "must be at least 1")),
            Some(ms) => Ok(Duration::from_millis(ms.value)),
            None => Ok(default),
        };
        let connect_timeout = millis(
            &a.connect_timeout_ms,
            "agent.connectTimeoutMs",
            defaults::CONNECT_TIMEOUT,
        )?;
        let idle_timeout = millis(
            &a.idle_timeout_ms,
            "agent.idleTimeoutMs",
            defaults::IDLE_TIMEOUT,
        )?;

        let buffer_bytes = match &a.buffer_bytes {
            Some(b) => usize::try_from(b.value)
                .ok()
                .filter(|n| (1..=defaults::MAX_BUFFER_BYTES).contains(n))
                .ok_or_else(|| {
                    self.err(
                        b.referenced,
                        "agent.bufferBytes",
                        format!(
                            "{} is out of range 1..={}",
                            b.value,
                            defaults::MAX_BUFFER_BYTES
                        ),
                    )
                })?,
            None => defaults::BUFFER_BYTES,
        };
        let max_connections = match &a.max_connections {
            Some(n) => usize::try_from(n.value)
                .ok()
                .filter(|n| (1..=1 << 24).contains(n))
                .ok_or_else(|| {
                    self.err(
                        n.referenced,
                        "agent.maxConnections",
                        format!("{} is out of range 1..={}", n.value, 1 << 24),
                    )
                })?,
            None => defaults::MAX_CONNECTIONS,
        };

        let trust_domain = match &a.trust_domain {
            Some(t) => self.name(t, "agent.trustDomain", Kind::TrustDomain)?,
            None => defaults::TRUST_DOMAIN.to_owned(),
        };
        let ca_cert_file = a
            .ca_cert_file
            .as_ref()
            .map(|c| self.abs_path(c, "agent.caCertFile"))
            .transpose()?;
        let ca_key_file = a
            .ca_key_file
            .as_ref()
            .map(|k| self.abs_path(k, "agent.caKeyFile"))
            .transpose()?;
        // Before the pairing of caCertFile and caKeyFile: with agent.ca, neither belongs.
        let ca = a.ca.as_ref().map(|ca| self.remote_ca(ca, a)).transpose()?;
        match (&a.ca_cert_file, &a.ca_key_file) {
            (Some(c), None) => {
                return Err(self.err(
                    c.referenced,
                    "agent.caCertFile",
                    "caKeyFile is required with caCertFile (omit both for a development CA)",
                ));
            }
            (None, Some(k)) => {
                return Err(self.err(
                    k.referenced,
                    "agent.caKeyFile",
                    "caCertFile is required with caKeyFile (omit both for a development CA)",
                ));
            }
            _ => {}
        }
        let mut trust_root_files: Vec<PathBuf> = Vec::new();
        for (i, f) in a.trust_root_files.iter().flatten().enumerate() {
            let path = format!("agent.trustRootFiles[{i}]");
            let file = self.abs_path(f, &path)?;
            if trust_root_files.contains(&file) {
                return Err(self.err(
                    f.referenced,
                    path,
                    format!("{} is listed twice", file.display()),
                ));
            }
            trust_root_files.push(file);
        }
        let cert_lifetime = match &a.cert_lifetime_minutes {
            Some(m) if (1..=defaults::MAX_CERT_LIFETIME_MINUTES).contains(&m.value) => {
                Duration::from_secs(m.value * 60)
            }
            Some(m) => {
                return Err(self.err(
                    m.referenced,
                    "agent.certLifetimeMinutes",
                    format!(
                        "{} is out of range 1..={} (one year)",
                        m.value,
                        defaults::MAX_CERT_LIFETIME_MINUTES
                    ),
                ));
            }
            None => defaults::CERT_LIFETIME,
        };
        let tunnel_idle_timeout = millis(
            &a.tunnel_idle_timeout_ms,
            "agent.tunnelIdleTimeoutMs",
            defaults::TUNNEL_IDLE_TIMEOUT,
        )?;
        let tunnel_connections_per_peer = a
            .tunnel_connections_per_peer
            .as_ref()
            .map(|n| {
                self.ranged(
                    n,
                    "agent.tunnelConnectionsPerPeer",
                    1,
                    defaults::MAX_TUNNEL_CONNECTIONS_PER_PEER,
                    "",
                )
            })
            .transpose()?;

        let drain_timeout = match &a.drain_timeout_ms {
            Some(ms) => Duration::from_millis(self.ranged(
                ms,
                "agent.drainTimeoutMs",
                0,
                defaults::MAX_DRAIN_TIMEOUT_MS,
                " (milliseconds, at most one hour)",
            )?),
            None => defaults::DRAIN_TIMEOUT,
        };

        let access_log = self.access_log(
            a.access_log.as_ref(),
            "agent.accessLog",
            AccessLog::default(),
        )?;

        Ok(AgentConfig {
            startup: StartupSettings {
                node,
                cgroup,
                bpf_name,
                outbound_port,
                inbound_port,
                tunnel_port,
                admin_addr,
                proxy_mark,
                transparent_mark,
                reply_table,
                max_connections,
                trust_domain,
                ca_cert_file,
                ca_key_file,
                trust_root_files,
                cert_lifetime,
                tunnel_idle_timeout,
                tunnel_connections_per_peer,
                drain_timeout,
                ca,
                fast_path: a.fast_path.unwrap_or(false),
            },
            live: LiveSettings {
                excluded_ports,
                excluded_cidrs,
                connect_timeout,
                idle_timeout,
                buffer_bytes,
                access_log,
                istio_metrics: a.istio_metrics.unwrap_or(true),
                splice: a.splice.unwrap_or(defaults::SPLICE),
            },
        })
    }

    /// An access-log block at `base`, its absent fields taken from `inherited`.
    pub(super) fn access_log(
        &self,
        raw: Option<&RawAccessLog>,
        base: &str,
        inherited: AccessLog,
    ) -> Result<AccessLog> {
        let Some(raw) = raw else {
            return Ok(inherited);
        };
        Ok(AccessLog {
            enabled: raw.enabled.unwrap_or(inherited.enabled),
            sample_percent: self.opt_ranged(
                &raw.sample_percent,
                base,
                "samplePercent",
                (0, 100),
                inherited.sample_percent,
            )?,
        })
    }

    /// `agent.ca`: a CA off the node excludes a CA key on it, and needs the roots its
    /// certificate chains to.
    fn remote_ca(&self, ca: &S<RawRemoteCa>, a: &RawAgent) -> Result<RemoteCa> {
        if let Some(key) = &a.ca_key_file {
            return Err(self.err(
                key.referenced,
                "agent.caKeyFile",
                "a CA key on the node and a CA off the node (agent.ca) exclude each other: \
                 remove caCertFile and caKeyFile",
            ));
        }
        if let Some(cert) = &a.ca_cert_file {
            return Err(self.err(
                cert.referenced,
                "agent.caCertFile",
                "with agent.ca, list the mesh's roots in trustRootFiles instead",
            ));
        }
        if a.trust_root_files.as_ref().is_none_or(Vec::is_empty) {
            return Err(self.err(
                ca.referenced,
                "agent.ca",
                "trustRootFiles must list the mesh's root certificates when the CA is off the \
                 node",
            ));
        }
        let r = &ca.value;
        let address = self.host_port(&r.address, "agent.ca.address")?;
        let interval = match &r.check_interval_ms {
            Some(ms) if ms.value == 0 => {
                return Err(self.err(
                    ms.referenced,
                    "agent.ca.checkIntervalMs",
                    "must be at least 1",
                ));
            }
            Some(ms) => Duration::from_millis(ms.value),
            None => defaults::CA_CHECK_INTERVAL,
        };
        Ok(RemoteCa {
            address,
            credential: self.ca_credential(ca)?,
            check_interval: interval,
        })
    }

    /// `agent.ca`: a node certificate and its key, or a token file; exactly one of the two.
    fn ca_credential(&self, ca: &S<RawRemoteCa>) -> Result<CaCredential> {
        let r = &ca.value;
        match (&r.node_cert_file, &r.node_key_file, &r.token_file) {
            (Some(cert), Some(key), None) => Ok(CaCredential::NodeCertificate {
                node_cert_file: self.abs_path(cert, "agent.ca.nodeCertFile")?,
                node_key_file: self.abs_path(key, "agent.ca.nodeKeyFile")?,
            }),
            (None, None, Some(token)) => Ok(CaCredential::Token {
                token_file: self.abs_path(token, "agent.ca.tokenFile")?,
            }),
            (cert, key, Some(token)) if cert.is_some() || key.is_some() => Err(self.err(
                token.referenced,
                "agent.ca.tokenFile",
                "a token and a node certificate exclude each other: keep tokenFile \
                 (Kubernetes) or nodeCertFile and nodeKeyFile",
            )),
            (Some(_), None, None) => {
                Err(self.err(ca.referenced, "agent.ca", "nodeCertFile needs nodeKeyFile"))
            }
            (None, Some(_), None) => {
                Err(self.err(ca.referenced, "agent.ca", "nodeKeyFile needs nodeCertFile"))
            }
            _ => Err(self.err(
                ca.referenced,
                "agent.ca",
                "how this node authenticates to the CA: tokenFile (Kubernetes) or \
                 nodeCertFile and nodeKeyFile",
            )),
        }
    }

    /// `host:port` (a name or an address; IPv6 in brackets), port 1..=65535.
    fn host_port(&self, s: &S<String>, path: &str) -> Result<String> {
        let bad = |why: &str| self.err(s.referenced, path, format!("`{}` {why}", s.value));
        let (host, port) = s
            .value
            .rsplit_once(':')
            .ok_or_else(|| bad("is not host:port"))?;
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(bad("has no port in 1..=65535")),
        }
        let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            v6.parse::<std::net::Ipv6Addr>().is_ok()
        } else {
            host.parse::<std::net::Ipv4Addr>().is_ok() || Kind::Node.check(host).is_ok()
        };
        if !host_ok {
            return Err(bad(
                "is not host:port (a DNS name, an IPv4 address or [an IPv6 address])",
            ));
        }
        Ok(s.value.clone())
    }

    fn admin_addr(&self, s: &S<String>) -> Result<SocketAddr> {
        let path = "agent.adminAddr";
        let addr: SocketAddr = s.value.parse().map_err(|_| {
            self.err(
                s.referenced,
                path,
                format!("`{}` is not an IP:port address", s.value),
            )
        })?;
        if !addr.ip().to_canonical().is_loopback() {
            return Err(self.err(
                s.referenced,
                path,
                format!(
                    "{} is not a loopback address: the admin API must not be reachable from \
                     the network",
                    addr.ip()
                ),
            ));
        }
        if addr.port() == 0 {
            return Err(self.err(s.referenced, path, "port must be in 1..=65535"));
        }
        Ok(addr)
    }
}
