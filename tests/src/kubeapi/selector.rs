//! Label and field selectors as the API server evaluates them.
//!
//! Labels: equality (`k=v`, `k==v`, `k!=v`), sets (`k in (a,b)`, `k notin (a,b)`) and
//! existence (`k`, `!k`), all and-ed by commas. Fields: `=`/`==`/`!=` on the few fields the
//! server indexes; any other field is refused with the server's message, so a client asking
//! for something a real server rejects fails here too.

use std::collections::BTreeSet;

use anyhow::{Result, bail};
use serde_json::Value;

/// A parsed `labelSelector`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelRequirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<LabelSelector> {
        let mut reqs = Vec::new();
        for part in split_top_level(text) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(part)?);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object (its `metadata.labels`) matches.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelRequirement::In(k, vs) => get(k).is_some_and(|v| vs.contains(v)),
            // `!=` and `notin` match objects without the label, as on the real server.
            LabelRequirement::NotIn(k, vs) => get(k).is_none_or(|v| !vs.contains(v)),
            LabelRequirement::Exists(k) => get(k).is_some(),
            LabelRequirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b=c`).
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(part: &str) -> Result<LabelRequirement> {
    let set = |key: &str, values: &str| -> Result<(String, BTreeSet<String>)> {
        let inner = values
            .trim()
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| anyhow::anyhow!("unable to parse requirement: {part:?}"))?;
        let values = inner.split(',').map(|v| v.trim().to_owned()).collect();
        Ok((checked_key(key.trim(), part)?, values))
    };
    if let Some((k, v)) = part.split_once(" notin ") {
        let (k, vs) = set(k, v)?;
        return Ok(LabelRequirement::NotIn(k, vs));
    }
    if let Some((k, v)) = part.split_once(" in ") {
        let (k, vs) = set(k, v)?;
        return Ok(LabelRequirement::In(k, vs));
    }
    let one = |v: &str| BTreeSet::from([v.trim().to_owned()]);
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(LabelRequirement::NotIn(
            checked_key(k.trim(), part)?,
            one(v),
        ));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(LabelRequirement::In(checked_key(k.trim(), part)?, one(v)));
    }
    if let Some(k) = part.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(checked_key(k.trim(), part)?));
    }
    Ok(LabelRequirement::Exists(checked_key(part, part)?))
}

fn checked_key(key: &str, part: &str) -> Result<String> {
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
    if !ok {
        bail!("unable to parse requirement: {part:?}");
    }
    Ok(key.to_owned())
}

/// A parsed `fieldSelector`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Fields the real server indexes for every type, and those it adds for Pods.
const COMMON_FIELDS: &[&str] = &["metadata.name", "metadata.namespace"];
const POD_FIELDS: &[&str] = &[
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

impl FieldSelector {
    /// Parses `text` for objects of `kind`; unsupported fields are the server's 400.
    pub fn parse(text: &str, kind: &str) -> Result<FieldSelector> {
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                bail!("invalid selector: '{text}'; can't understand '{part}'");
            };
            let field = field.trim();
            let supported =
                COMMON_FIELDS.contains(&field) || (kind == "Pod" && POD_FIELDS.contains(&field));
            if !supported {
                bail!("field label not supported: {field}");
            }
            reqs.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let mut node = object;
            for step in field.split('.') {
                node = &node[step];
            }
            // A missing field compares as the empty string (`spec.nodeName=` finds pods
            // not scheduled yet).
            let actual = match node {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labelled(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "a", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_selectors_match_like_the_server() {
        let o = labelled(json!({"app": "web", "tier": "front"}));
        let none = labelled(json!({}));
        let m = |s: &str, o: &Value| LabelSelector::parse(s).expect(s).matches(o);
        assert!(m("app=web", &o) && m("app==web,tier=front", &o) && m("", &o));
        assert!(!m("app=db", &o) && !m("app=web,tier=back", &o));
        assert!(m("app!=db", &o) && m("app!=db", &none) && !m("app!=web", &o));
        assert!(m("app in (db, web)", &o) && !m("app notin (db,web)", &o));
        assert!(m("app notin (db)", &none));
        assert!(m("app", &o) && !m("app", &none) && m("!app", &none) && !m("!app", &o));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b=c").is_err());
    }

    #[test]
    fn field_selectors_cover_what_a_node_agent_asks() {
        let o = labelled(json!({}));
        let m = |s: &str| FieldSelector::parse(s, "Pod").expect(s).matches(&o);
        assert!(m("spec.nodeName=n1") && !m("spec.nodeName=n2") && m("spec.nodeName!=n2"));
        assert!(m("metadata.name=p,metadata.namespace=a") && !m("metadata.namespace==b"));
        assert!(m("status.podIP="), "a missing field is the empty string");
        let err = FieldSelector::parse("spec.nodeName=n1", "Service").expect_err("not indexed");
        assert_eq!(err.to_string(), "field label not supported: spec.nodeName");
        assert!(FieldSelector::parse("metadata.name", "Node").is_err());
    }
}
