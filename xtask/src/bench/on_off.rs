//! What a feature costs (the traffic policy, per-connection telemetry), measured in
//! alternation.
//!
//! The table's same-node variants run one after the other, each at its own place in the run,
//! and that place moved the agent's CPU per connection by up to 15% (a path measured later
//! read less). So the comparisons are measured apart from the table: node1's agent switches
//! between the variants round after round, the order rotated each round so that every
//! variant runs first, second and third once over three rounds. Each variant is measured the
//! same way right after its start: a probe, unmeasured warm-up connections, then new
//! connections (rate, agent CPU per connection) and a 1-stream bulk upload (rate, agent CPU
//! per GB). A comparison's figure is the median over the rounds of the ratio within a round.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{
    World, measure,
    paths::{self, PathSpec, Variant},
    settings::{Bins, Profile},
};

/// The comparisons: title, what it compares, the variant with the feature, the one without.
const COMPARISONS: [(&str, &str, Variant, Variant); 2] = [
    (
        "policy on / off",
        "with over without the traffic policy: outlier detection on, and rate limits on \
         connections, per source and bandwidth far above the load",
        Variant::Policy,
        Variant::Plain,
    ),
    (
        "telemetry on / off",
        "with over without the access log and Istio's metrics",
        Variant::Plain,
        Variant::Quiet,
    ),
];

/// The figures compared, with their labels.
const FIGURES: [(&str, &str); 4] = [
    ("cps", "new connections/s"),
    ("proxy_cpu_us_per_conn", "agent CPU per new connection"),
    ("bulk1_gbps", "bulk (1 stream)"),
    ("proxy_cpu_s_per_gb", "agent CPU per GB"),
];

/// One variant measured once.
fn sample(world: &mut World, bins: &Bins, p: &Profile, path: &PathSpec) -> Result<Value> {
    let path = world.prepare(path)?;
    measure::probe(bins, &path).context("probe")?;
    measure::cps(bins, p, &path, p.on_off_warm_conns).context("warm-up connections")?;
    let cps = measure::cps(bins, p, &path, p.on_off_conns).context("new connections")?;
    let bulk = measure::bulk(bins, &path, 1, p.on_off_bulk_s).context("bulk")?;
    Ok(json!({
        "cps": cps.conns_per_s(),
        "proxy_cpu_us_per_conn": cps.cpu_us_per_conn(&path),
        "bulk1_gbps": bulk.gbps(),
        "proxy_cpu_s_per_gb": (bulk.bytes() > 0.0).then(|| bulk.cpu_s / (bulk.bytes() / 1e9)),
    }))
}

/// Runs the rounds over the same-node variants among `selected` (path keys; empty: all) and
/// returns the comparisons (null when fewer than two variants of one comparison are
/// selected). A failed sample is an error: the comparison would be one-sided.
pub fn run(world: &mut World, bins: &Bins, p: &Profile, selected: &[String]) -> Result<Value> {
    // The same-node paths of the three configs, in `Variant::ALL` order.
    let variants: Vec<(Variant, PathSpec)> = [
        paths::AGENT_SAME,
        paths::AGENT_SAME_POLICY,
        paths::AGENT_SAME_QUIET,
    ]
    .into_iter()
    .filter(|name| selected.is_empty() || selected.iter().any(|s| s == name))
    .filter_map(|name| world.paths.iter().find(|path| path.name == name))
    .map(|path| (path.variant, path.clone()))
    .collect();
    let has = |v: Variant| variants.iter().any(|(w, _)| *w == v);
    if !COMPARISONS
        .iter()
        .any(|(_, _, on, off)| has(*on) && has(*off))
    {
        return Ok(Value::Null);
    }
    let mut rounds = Vec::new();
    for round in 0..p.on_off_rounds {
        let mut order = variants.clone();
        order.rotate_left(round % variants.len());
        let mut samples = serde_json::Map::new();
        for (variant, path) in &order {
            eprintln!(
                "bench: on / off round {}/{}: {} ...",
                round + 1,
                p.on_off_rounds,
                variant.as_str()
            );
            let sample = sample(world, bins, p, path)
                .with_context(|| format!("round {}, {}", round + 1, variant.as_str()))?;
            samples.insert(variant.as_str().into(), sample);
        }
        rounds.push(json!({
            "order": order.iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(),
            "samples": samples,
        }));
    }
    let comparisons: Vec<Value> = COMPARISONS
        .iter()
        .filter(|(_, _, on, off)| has(*on) && has(*off))
        .map(|(title, what, on, off)| compare(title, what, *on, *off, &rounds))
        .collect();
    Ok(json!({ "rounds": rounds, "comparisons": comparisons }))
}

/// One comparison: for each figure, the ratio on / off within each round and their median.
fn compare(title: &str, what: &str, on: Variant, off: Variant, rounds: &[Value]) -> Value {
    let mut figures = serde_json::Map::new();
    for (key, _) in FIGURES {
        let ratios: Vec<f64> = rounds
            .iter()
            .filter_map(|round| {
                let of = |v: Variant| round["samples"][v.as_str()][key].as_f64();
                let (a, b) = (of(on)?, of(off)?);
                (b > 0.0).then_some(a / b)
            })
            .collect();
        figures.insert(
            key.into(),
            json!({ "median": median(&ratios), "rounds": ratios }),
        );
    }
    json!({
        "title": title,
        "what": what,
        "on": on.as_str(),
        "off": off.as_str(),
        "ratios": figures,
    })
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
    }
}

/// The paragraph of results.md stating the comparisons of [`run`]'s answer; empty when null.
pub fn markdown(on_off: &Value, p: &Profile) -> String {
    let Some(comparisons) = on_off["comparisons"].as_array() else {
        return String::new();
    };
    let mut md = format!(
        "\n**What the policy and the telemetry cost** (node1's agent alternating between the \
         variants: the median of {} in rotated order, each round's ratio in brackets; each \
         variant restarted, then {} new connections after {} warm-up ones and {} s of bulk; \
         aim: rates ≥ 0.95×, CPU ≤ 1.05×):\n\n",
        match p.on_off_rounds {
            1 => "1 round".to_owned(),
            n => format!("{n} rounds"),
        },
        p.on_off_conns,
        p.on_off_warm_conns,
        p.on_off_bulk_s,
    );
    for c in comparisons {
        let figures: Vec<String> = FIGURES
            .iter()
            .map(|(key, label)| {
                let figure = &c["ratios"][key];
                let rounds: Vec<String> = figure["rounds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_f64)
                    .map(|r| format!("{r:.2}"))
                    .collect();
                match figure["median"].as_f64() {
                    Some(m) => format!("{label} {m:.2}× ({})", rounds.join(", ")),
                    None => format!("{label} –"),
                }
            })
            .collect();
        md.push_str(&format!(
            "- {} ({}): {}\n",
            c["title"].as_str().unwrap_or_default(),
            c["what"].as_str().unwrap_or_default(),
            figures.join(", "),
        ));
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_none() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn a_comparison_takes_the_ratio_within_each_round() {
        let round = |on: f64, off: f64| {
            json!({ "samples": {
                "plain": { "cps": on, "proxy_cpu_us_per_conn": 110.0 },
                "no-telemetry": { "cps": off, "proxy_cpu_us_per_conn": 100.0 },
            }})
        };
        let rounds = [round(90.0, 100.0), round(200.0, 200.0), round(95.0, 100.0)];
        let c = compare("t", "w", Variant::Plain, Variant::Quiet, &rounds);
        assert_eq!(c["ratios"]["cps"]["median"].as_f64(), Some(0.95));
        assert_eq!(c["ratios"]["cps"]["rounds"], json!([0.9, 1.0, 0.95]));
        assert_eq!(
            c["ratios"]["proxy_cpu_us_per_conn"]["median"].as_f64(),
            Some(1.1)
        );
        assert!(c["ratios"]["bulk1_gbps"]["median"].is_null());
    }
}
