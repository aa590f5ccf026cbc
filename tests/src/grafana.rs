//! Reading a Grafana dashboard's queries so a test can run each against a real Prometheus:
//! every panel target's `expr` (rows' nested panels included) and every query variable,
//! with Grafana's variables replaced as Grafana would before sending them.

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Grafana's built-in interval variables, as the test substitutes them: `$__rate_interval`
/// must cover several scrapes (Grafana makes it at least four scrape intervals).
const BUILT_INS: [(&str, &str); 3] = [
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "5m"),
];

/// One query of a dashboard: where it is and its PromQL, variables already substituted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The panel's title and the target's refId, or `variable <name>`.
    pub place: String,
    /// The query as the dashboard has it.
    pub original: String,
    pub promql: String,
}

/// Every query of `dashboard`: panel targets in order (rows' nested panels included), then
/// query variables (`label_values(selector, label)` becomes `count by (label) (selector)`).
/// Template variables become `.*`, Grafana's "All" of a multi-value variable, so a query
/// must use them as `label=~"$var"`.
pub fn dashboard_queries(dashboard: &Value) -> Result<Vec<Query>> {
    let variables = dashboard["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let names: Vec<&str> = variables
        .iter()
        .filter(|v| v["type"] != "datasource")
        .filter_map(|v| v["name"].as_str())
        .collect();
    let mut queries = Vec::new();
    let panels = dashboard["panels"]
        .as_array()
        .context("the dashboard has no panels array")?;
    collect_panels(panels, &names, &mut queries)?;
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().unwrap_or_default();
        let place = format!("variable {name}");
        // Grafana writes the query as a string, or (newer) as {query: "...", refId: ...}.
        let original = variable["query"]["query"]
            .as_str()
            .or_else(|| variable["query"].as_str())
            .with_context(|| format!("{place} has no query"))?
            .to_owned();
        let promql = label_values_to_promql(&original)
            .and_then(|q| substitute(&q, &names))
            .with_context(|| format!("{place}: {original}"))?;
        queries.push(Query {
            place,
            original,
            promql,
        });
    }
    Ok(queries)
}

fn collect_panels(panels: &[Value], names: &[&str], queries: &mut Vec<Query>) -> Result<()> {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        for target in panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some(original) = target["expr"].as_str() else {
                continue;
            };
            let place = format!(
                "panel {title:?} target {}",
                target["refId"].as_str().unwrap_or("?")
            );
            let promql =
                substitute(original, names).with_context(|| format!("{place}: {original}"))?;
            queries.push(Query {
                place,
                original: original.to_owned(),
                promql,
            });
        }
        if let Some(nested) = panel["panels"].as_array() {
            collect_panels(nested, names, queries)?;
        }
    }
    Ok(())
}

/// `label_values(selector, label)` as a query returning a series per value of `label`;
/// `query_result(expr)` as `expr`. Other variable queries are not Prometheus ones.
fn label_values_to_promql(query: &str) -> Result<String> {
    let query = query.trim();
    if let Some(inner) = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
    {
        let (selector, label) = inner
            .rsplit_once(',')
            .context("label_values needs a selector (metric) and a label")?;
        return Ok(format!("count by ({}) ({})", label.trim(), selector.trim()));
    }
    if let Some(expr) = query
        .strip_prefix("query_result(")
        .and_then(|q| q.strip_suffix(')'))
    {
        return Ok(expr.to_owned());
    }
    bail!("not a label_values(selector, label) or query_result(expr) query")
}

/// Replaces `$name`, `${name}`, `${name:format}` and `[[name]]`: Grafana's built-in
/// intervals by [`BUILT_INS`], the dashboard's variables `names` by `.*`. Any other
/// variable is an error (the test would not know what Grafana sends).
pub fn substitute(expr: &str, names: &[&str]) -> Result<String> {
    let value = |name: &str| -> Result<&str> {
        if let Some((_, v)) = BUILT_INS.iter().find(|(n, _)| *n == name) {
            return Ok(v);
        }
        if names.contains(&name) {
            return Ok(".*");
        }
        bail!("unknown variable ${name}")
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(braced) = tail.strip_prefix("${") {
            let end = braced.find('}').context("unclosed ${")?;
            let name = braced[..end].split(':').next().unwrap_or_default();
            out.push_str(value(name)?);
            rest = &braced[end + 1..];
        } else if let Some(legacy) = tail.strip_prefix("[[") {
            let end = legacy.find("]]").context("unclosed [[")?;
            let name = legacy[..end].split(':').next().unwrap_or_default();
            out.push_str(value(name)?);
            rest = &legacy[end + 2..];
        } else if let Some(plain) = tail.strip_prefix('$') {
            let end = plain
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(plain.len());
            if end == 0 {
                bail!("a `$` that starts no variable");
            }
            out.push_str(value(&plain[..end])?);
            rest = &plain[end..];
        } else {
            // A range selector's `[`, not a variable.
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_built_ins_and_variables_in_every_syntax() {
        let names = ["instance"];
        assert_eq!(
            substitute(
                r#"sum(rate(x{instance=~"$instance"}[$__rate_interval])) + y{i=~"${instance:regex}"}[[instance]][${__range}]"#,
                &names
            )
            .expect("substitutes"),
            r#"sum(rate(x{instance=~".*"}[1m])) + y{i=~".*"}.*[5m]"#
        );
        assert_eq!(
            substitute("max(x[5m:1m])", &names).expect("nothing"),
            "max(x[5m:1m])"
        );
        let unknown = substitute("x{node=~\"$node\"}", &names).expect_err("unknown");
        assert!(unknown.to_string().contains("$node"), "{unknown}");
        assert!(substitute("x{a=\"${instance\"}", &names).is_err());
        assert!(substitute("x $ y", &names).is_err());
    }

    #[test]
    fn walks_panels_nested_rows_and_query_variables() {
        let dashboard = serde_json::json!({
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {"name": "instance", "type": "query",
                 "query": {"query": "label_values(up{job=\"mesh-agent\"}, instance)", "refId": "v"}},
                {"name": "legacy", "type": "query", "query": "query_result(up)"},
            ]},
            "panels": [
                {"title": "top", "type": "timeseries", "targets": [
                    {"refId": "A", "expr": "rate(a{instance=~\"$instance\"}[$__rate_interval])"},
                    {"refId": "B", "expr": "b"},
                ]},
                {"title": "row", "type": "row", "collapsed": true, "panels": [
                    {"title": "inner", "type": "stat", "targets": [{"refId": "A", "expr": "c"}]},
                ]},
                {"title": "text", "type": "text"},
            ]
        });
        let queries = dashboard_queries(&dashboard).expect("queries");
        let got: Vec<(&str, &str)> = queries
            .iter()
            .map(|q| (q.place.as_str(), q.promql.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("panel \"top\" target A", "rate(a{instance=~\".*\"}[1m])"),
                ("panel \"top\" target B", "b"),
                ("panel \"inner\" target A", "c"),
                (
                    "variable instance",
                    "count by (instance) (up{job=\"mesh-agent\"})"
                ),
                ("variable legacy", "up"),
            ]
        );
        let bad = serde_json::json!({"panels": [], "templating": {"list": [
            {"name": "x", "type": "query", "query": "metrics(up)"}]}});
        assert!(dashboard_queries(&bad).is_err());
    }
}
