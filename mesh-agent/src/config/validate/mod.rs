//! `RawConfig` (as written, with positions) -> `Config` (plain, checked, resolved).
//!
//! Stops at the first error, which names the file, the line and column, and the field path.
//! One file per part of the document; they share [`Cx`], which turns a position and a field
//! path into a [`ConfigError`].

mod agent;
mod limits;
mod object;
mod policies;
mod scalars;
mod services;
mod traffic;
mod workloads;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde_saphyr::Location;

use super::assemble::{Parts, Workloads};
use super::error::ConfigError;
use super::model::{Config, WorkloadId};
use super::raw::{Present, RawConfig, S};

pub use object::{PolicyKind, PolicyObject, policy_object};

type Result<T> = std::result::Result<T, ConfigError>;

pub(super) fn validate(
    raw: RawConfig,
    file: &str,
    default_node: impl FnOnce() -> String,
) -> Result<Config> {
    let cx = Cx { file };
    let agent = cx.agent(&raw.agent.unwrap_or_default(), default_node)?;
    let nodes = cx.nodes(raw.nodes.as_deref().unwrap_or_default())?;
    let workloads = cx.workloads(raw.workloads.as_deref().unwrap_or_default(), &agent)?;
    let by_ip: HashMap<IpAddr, WorkloadId> = workloads
        .iter()
        .enumerate()
        .flat_map(|(i, w)| w.ips.iter().map(move |ip| (*ip, WorkloadId(i))))
        .collect();
    let services = cx.services(
        raw.services.as_deref().unwrap_or_default(),
        &workloads,
        &by_ip,
        &nodes,
    )?;
    let policies = cx.policies(&raw.policies.unwrap_or_default())?;
    Ok(Config::assemble(
        Parts {
            agent,
            workloads: Workloads::new(workloads.into_iter().map(Arc::new).collect()),
            services: services.into_iter().map(Arc::new).collect(),
            policies,
            nodes,
        },
        None,
    ))
}

/// The validation context: the file name the errors carry.
struct Cx<'a> {
    file: &'a str,
}

impl Cx<'_> {
    fn err(
        &self,
        at: Location,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            line: at.line(),
            column: at.column(),
            path: path.into(),
            message: message.into(),
        }
    }

    /// The value of a key that was written (`Some`), refusing an explicit null.
    fn present<'r, T>(
        &self,
        field: &'r Present<T>,
        base: &str,
        name: &str,
        message: &str,
    ) -> Result<Option<&'r T>> {
        Ok(self.block(field, base, name, message)?.map(|(v, _)| v))
    }

    /// As [`Cx::present`], with the position of the value (for the checks that concern the
    /// block as a whole).
    fn block<'r, T>(
        &self,
        field: &'r Present<T>,
        base: &str,
        name: &str,
        message: &str,
    ) -> Result<Option<(&'r T, Location)>> {
        match field {
            None => Ok(None),
            Some(S {
                value: Some(v),
                referenced,
                ..
            }) => Ok(Some((v, *referenced))),
            Some(s) => Err(self.err(s.referenced, format!("{base}.{name}"), message)),
        }
    }

    /// An optional list key: when written, it must list something (an empty list would read
    /// as "no condition" and widen the rule).
    fn non_empty_list<'r, T>(
        &self,
        field: &'r Present<Vec<T>>,
        base: &str,
        name: &str,
        what: &str,
    ) -> Result<Option<&'r [T]>> {
        self.listed(field, base, name, what, "for any")
    }

    /// An optional list key that must list something when written; the refusal says what
    /// omitting it means (`omitted`: "for any", "for none").
    fn listed<'r, T>(
        &self,
        field: &'r Present<Vec<T>>,
        base: &str,
        name: &str,
        what: &str,
        omitted: &str,
    ) -> Result<Option<&'r [T]>> {
        match field {
            None => Ok(None),
            Some(S {
                value: Some(list), ..
            }) if !list.is_empty() => Ok(Some(list)),
            Some(s) => Err(self.err(
                s.referenced,
                format!("{base}.{name}"),
                format!("must list at least one {what} (omit `{name}` {omitted})"),
            )),
        }
    }
}
