//! The local YAML file source: strict parsing (unknown fields, duplicate keys and type errors
//! are refused with `file:line:column: field.path: message`), then validation.

use std::path::Path;

use serde_path_to_error::Segment;
use serde_saphyr::MessageFormatter;

use super::error::ConfigError;
use super::model::Config;
use super::raw::RawConfig;
use super::validate;

impl Config {
    /// Parses and validates `text`; `file` names the source in error messages.
    pub fn from_yaml_str(text: &str, file: &str) -> Result<Config, ConfigError> {
        Self::from_yaml_str_with_node(text, file, system_node_name)
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Self::load_scoped(path, None, Scope::Everything)
    }

    /// As [`Config::load`], refusing what `scope` leaves to another source; `node`, when
    /// given, is this agent's node whatever `agent.node` says (`mesh-agent run --node`, which
    /// a DaemonSet fills in from the downward API).
    pub fn load_scoped(
        path: impl AsRef<Path>,
        node: Option<&str>,
        scope: Scope,
    ) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = read(path)?;
        Self::from_yaml_str_scoped(&text, &path.display().to_string(), node, scope)
    }

    /// As [`Config::from_yaml_str`], with `node` (when given) in place of `agent.node`. The
    /// caller checked that it is a valid node name (the command line does).
    pub fn from_yaml_str_on_node(
        text: &str,
        file: &str,
        node: Option<&str>,
    ) -> Result<Config, ConfigError> {
        Self::from_yaml_str_scoped(text, file, node, Scope::Everything)
    }

    /// As [`Config::from_yaml_str_on_node`], refusing what `scope` leaves to another source.
    pub fn from_yaml_str_scoped(
        text: &str,
        file: &str,
        node: Option<&str>,
        scope: Scope,
    ) -> Result<Config, ConfigError> {
        let mut raw = parse(text, file)?;
        if scope == Scope::AgentOnly {
            agent_only(&raw, file)?;
        }
        let Some(node) = node else {
            return validate::validate(raw, file, system_node_name);
        };
        if let Some(agent) = raw.agent.as_mut() {
            agent.node = None;
        }
        validate::validate(raw, file, || node.to_owned())
    }

    /// As [`Config::from_yaml_str`], with the default of `agent.node` supplied by the caller
    /// (called only when the file does not set it).
    pub(super) fn from_yaml_str_with_node(
        text: &str,
        file: &str,
        default_node: impl FnOnce() -> String,
    ) -> Result<Config, ConfigError> {
        let raw = parse(text, file)?;
        validate::validate(raw, file, default_node)
    }
}

/// What a configuration file may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the file is the only source.
    #[default]
    Everything,
    /// The `agent` block only: nodes, workloads, services and policies come from the
    /// Kubernetes API (`mesh-agent run --source kubernetes`).
    AgentOnly,
}

/// Refuses, at its first entry, a block that another source provides: the two would
/// disagree, and which wins would be a guess.
fn agent_only(raw: &RawConfig, file: &str) -> Result<(), ConfigError> {
    let policies = raw.policies.as_ref();
    let firsts = [
        (
            "nodes",
            raw.nodes.iter().flatten().next().map(|n| n.referenced),
        ),
        (
            "workloads",
            raw.workloads.iter().flatten().next().map(|w| w.referenced),
        ),
        (
            "services",
            raw.services.iter().flatten().next().map(|s| s.referenced),
        ),
        (
            "policies.authorization",
            policies
                .and_then(|p| p.authorization.iter().flatten().next())
                .map(|p| p.referenced),
        ),
        (
            "policies.rateLimits",
            policies
                .and_then(|p| p.rate_limits.iter().flatten().next())
                .map(|p| p.referenced),
        ),
        (
            "policies.egressLimits",
            policies
                .and_then(|p| p.egress_limits.iter().flatten().next())
                .map(|p| p.referenced),
        ),
    ];
    for (block, at) in firsts {
        if let Some(at) = at {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line: at.line(),
                column: at.column(),
                path: format!("{block}[0]"),
                message: format!(
                    "with --source kubernetes, {block} come from the Kubernetes API: the file \
                     holds the agent block only"
                ),
            });
        }
    }
    Ok(())
}

/// The text of the configuration file at `path`; an error names the file.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })
}

/// `mesh-agent config check`: reads and validates the file at `path` as the agent would at
/// start with `scope`, touching nothing else, and returns the one-line summary
/// `FILE: ok (3 workloads, 1 service, 2 authorization policies, 1 rate limit, 0 egress limits)`
/// (`FILE: ok (agent block only)` when the rest comes from the Kubernetes API).
pub fn check(path: impl AsRef<Path>, scope: Scope) -> Result<String, ConfigError> {
    let path = path.as_ref();
    let config = Config::load_scoped(path, None, scope)?;
    if scope == Scope::AgentOnly {
        return Ok(format!("{}: ok (agent block only)", path.display()));
    }
    let count =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    Ok(format!(
        "{}: ok ({}, {}, {}, {}, {})",
        path.display(),
        count(config.workloads().len(), "workload", "workloads"),
        count(config.services.len(), "service", "services"),
        count(
            config.policies.authorization.len(),
            "authorization policy",
            "authorization policies"
        ),
        count(
            config.policies.rate_limits.len(),
            "rate limit",
            "rate limits"
        ),
        count(
            config.policies.egress_limits.len(),
            "egress limit",
            "egress limits"
        ),
    ))
}

/// The host name, the default of `agent.node` (as the kubelet's default node name).
pub fn system_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

pub(super) fn parse(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
    parse_as(text, file)
}

/// Strict parsing of `text` as `T`, errors as [`parse`]'s.
pub(super) fn parse_as<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    // The parser's default budget (250,000 nodes) refuses a cluster's worth of config (30,000
    // services are about 400,000 nodes); the other guards (depth, aliases, 256 MiB) stay.
    let options = serde_saphyr::options! {
        with_snippet: false,
        strict_booleans: true,
        budget: serde_saphyr::budget! {
            max_nodes: 20_000_000,
            max_events: 40_000_000,
        },
    };
    let mut path = String::new();
    let result = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = render_path(e.path());
            e.into_inner()
        })
    });
    result.map_err(|err| {
        let (line, column) = err
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message: String = serde_saphyr::UserMessageFormatter
            .format_message(err.without_snippet())
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        // serde lists the accepted fields; for the reserved (empty) blocks there are none.
        let message = match message.trim_end().strip_suffix(", expected one of") {
            Some(head) => format!("{head}, this block accepts no fields yet"),
            None => message,
        };
        ConfigError::Parse {
            file: file.to_owned(),
            line,
            column,
            path,
            message,
        }
    })
}

/// `services[0].vips[1]` from the tracked path, without the `value` level that `Spanned`
/// inserts.
fn render_path(path: &serde_path_to_error::Path) -> String {
    let segments: Vec<&Segment> = path.iter().collect();
    let mut out = String::new();
    let mut previous: Option<&str> = None;
    for (i, segment) in segments.iter().enumerate() {
        match segment {
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                previous = None;
            }
            Segment::Map { key } => {
                // `Spanned<T>` deserializes as a map whose `value` holds T. A real key named
                // `value` can only appear in the free-form maps (`labels`, `selector`,
                // `weights`); right after one, a `value` followed by a key is the wrapper of a
                // spanned map, and the real key comes next.
                if key == "value" {
                    let free_form = matches!(previous, Some("labels" | "selector" | "weights"));
                    let key_follows = matches!(segments.get(i + 1), Some(Segment::Map { .. }));
                    if !free_form || key_follows {
                        continue;
                    }
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
                previous = Some(key);
            }
            Segment::Enum { variant } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(variant);
                previous = None;
            }
            // A key the tracker could not name (e.g. a duplicate key): the parent is precise
            // enough, the message names the key.
            Segment::Unknown => previous = None,
        }
    }
    out
}
