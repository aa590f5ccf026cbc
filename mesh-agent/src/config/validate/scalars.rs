//! Validates the single values every block uses: ports, addresses, names, paths, networks.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Cx, Result};
use crate::config::raw::S;
use crate::config::settings::Cidr;
use crate::names::Kind;
use crate::tls::{IdentityError, SpiffeId};

/// A range of milliseconds, with its maximum in words for the refusal.
#[derive(Debug, Clone, Copy)]
pub(super) struct Millis {
    pub min: u64,
    pub max: u64,
    pub max_text: &'static str,
}

impl Cx<'_> {
    pub(super) fn port(&self, p: &S<u64>, path: &str) -> Result<u16> {
        u16::try_from(p.value)
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| {
                self.err(
                    p.referenced,
                    path,
                    format!("port {} is out of range 1..=65535", p.value),
                )
            })
    }

    /// A unicast address usable by a pod or as a VIP, IPv4-mapped IPv6 folded to IPv4.
    pub(super) fn unicast_ip(&self, s: &S<String>, path: &str) -> Result<IpAddr> {
        let ip: IpAddr = s.value.parse().map_err(|_| {
            self.err(
                s.referenced,
                path,
                format!("`{}` is not an IP address", s.value),
            )
        })?;
        let ip = ip.to_canonical();
        let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || broadcast {
            return Err(self.err(
                s.referenced,
                path,
                format!("{ip} is not a unicast address usable by a workload or service"),
            ));
        }
        Ok(ip)
    }

    /// A name of `kind`, by the one set of rules in [`crate::names`]: these end up in SPIFFE
    /// IDs and map keys.
    pub(super) fn name(&self, s: &S<String>, path: &str, kind: Kind) -> Result<String> {
        match kind.check(&s.value) {
            Ok(()) => Ok(s.value.clone()),
            Err(_) => Err(self.err(
                s.referenced,
                path,
                format!("`{}` is not a valid {kind}: {}", s.value, kind.rule_text()),
            )),
        }
    }

    /// `base.field`, a name of `kind` when written, else `default`.
    pub(super) fn opt_name(
        &self,
        s: &Option<S<String>>,
        base: &str,
        field: &str,
        kind: Kind,
        default: &str,
    ) -> Result<String> {
        match s {
            Some(s) => self.name(s, &format!("{base}.{field}"), kind),
            None => Ok(default.to_owned()),
        }
    }

    /// `s` as a `T` within `min..=max`; `note` (e.g. " (one year)") ends the refusal.
    pub(super) fn ranged<T>(&self, s: &S<u64>, path: &str, min: T, max: T, note: &str) -> Result<T>
    where
        T: TryFrom<u64> + PartialOrd + Display + Copy,
    {
        T::try_from(s.value)
            .ok()
            .filter(|v| *v >= min && *v <= max)
            .ok_or_else(|| {
                self.err(
                    s.referenced,
                    path,
                    format!("{} is out of range {min}..={max}{note}", s.value),
                )
            })
    }

    /// `base.field` by [`Cx::ranged`] when written, else `default`.
    pub(super) fn opt_ranged<T>(
        &self,
        s: &Option<S<u64>>,
        base: &str,
        field: &str,
        (min, max): (T, T),
        default: T,
    ) -> Result<T>
    where
        T: TryFrom<u64> + PartialOrd + Display + Copy,
    {
        match s {
            Some(s) => self.ranged(s, &format!("{base}.{field}"), min, max, ""),
            None => Ok(default),
        }
    }

    /// `base.field`, milliseconds within `range`, when written.
    pub(super) fn millis(
        &self,
        s: &Option<S<u64>>,
        base: &str,
        field: &str,
        range: Millis,
    ) -> Result<Option<Duration>> {
        s.as_ref()
            .map(|s| self.duration(s, &format!("{base}.{field}"), range))
            .transpose()
    }

    /// Milliseconds within `range`.
    pub(super) fn duration(&self, s: &S<u64>, path: &str, range: Millis) -> Result<Duration> {
        let note = format!(" (milliseconds, at most {})", range.max_text);
        let ms = self.ranged(s, path, range.min, range.max, &note)?;
        Ok(Duration::from_millis(ms))
    }

    /// A workload identity, `spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccount>`,
    /// parsed as the peer certificates' identities are, so it can compare equal to one;
    /// `path_hint` ends the refusal of a path that is not `/ns/../sa/..`.
    pub(super) fn identity(&self, s: &S<String>, path: &str, path_hint: &str) -> Result<SpiffeId> {
        SpiffeId::parse(&s.value).map_err(|error| {
            let hint = if matches!(error, IdentityError::Path(_)) {
                path_hint
            } else {
                ""
            };
            self.err(s.referenced, path, format!("{error}{hint}"))
        })
    }

    /// A non-empty list of distinct identities (`base.field[i]`).
    pub(super) fn identities(
        &self,
        list: &[S<String>],
        base: &str,
        field: &str,
    ) -> Result<Vec<SpiffeId>> {
        let mut out: Vec<SpiffeId> = Vec::with_capacity(list.len());
        for (k, id) in list.iter().enumerate() {
            let path = format!("{base}.{field}[{k}]");
            let parsed = self.identity(id, &path, "")?;
            if out.contains(&parsed) {
                return Err(self.err(id.referenced, path, format!("{parsed} is listed twice")));
            }
            out.push(parsed);
        }
        Ok(out)
    }

    pub(super) fn abs_path(&self, s: &S<String>, path: &str) -> Result<PathBuf> {
        let p = PathBuf::from(&s.value);
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!("`{}` is not an absolute path", s.value),
            ))
        }
    }

    /// One path component under /sys/fs/bpf.
    pub(super) fn pin_name(&self, s: &S<String>, path: &str) -> Result<String> {
        let v = &s.value;
        let ok = (1..=64).contains(&v.len())
            && v != "."
            && v != ".."
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(v.clone())
        } else {
            Err(self.err(
                s.referenced,
                path,
                format!(
                    "`{v}` is not a valid pin directory name: use 1 to 64 letters, digits, '-', \
                     '_' or '.'"
                ),
            ))
        }
    }
}

/// `address/prefix`; the host bits must be zero so the network is written as meant.
pub(super) fn parse_cidr(text: &str) -> std::result::Result<Cidr, String> {
    let (addr, prefix) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not a CIDR (address/prefix)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| format!("prefix {prefix:?} is not in 0..={max}"))?;
    let bits = match addr {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    };
    // The address sits in the top bits: shifting the prefix out leaves the host bits.
    let host_bits = bits.checked_shl(u32::from(prefix)).unwrap_or(0);
    if prefix < max && host_bits != 0 {
        return Err(format!(
            "{text} has host bits set (the network is not written as meant)"
        ));
    }
    Ok(Cidr { addr, prefix })
}
