//! The bench's outputs: results.json, results.md (metrics x paths, with ratios to the
//! matching direct path, and what the policy and the telemetry cost, from
//! [`super::on_off`]) and latency.svg (request/response percentiles per path).

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::{mtls, on_off, paths::PathResult, settings::Profile};

/// Rows of the table, in order: key, label, decimals.
const METRICS: &[(&str, &str, usize)] = &[
    ("rr_p50_us", "1 KiB RR @ fixed rate, p50 (µs)", 1),
    ("rr_p90_us", "1 KiB RR @ fixed rate, p90 (µs)", 1),
    ("rr_p99_us", "1 KiB RR @ fixed rate, p99 (µs)", 1),
    ("rr_p999_us", "1 KiB RR @ fixed rate, p99.9 (µs)", 1),
    ("rr_achieved_rps", "1 KiB RR achieved (req/s)", 0),
    ("pp_p50_us", "1-byte ping-pong p50 (µs)", 1),
    ("pp_p99_us", "1-byte ping-pong p99 (µs)", 1),
    ("bulk1_gbps", "bulk, 1 stream (Gbit/s)", 2),
    ("bulk8_gbps", "bulk, 8 streams (Gbit/s)", 2),
    (
        "cps",
        "new connections/s (1 KiB exchange; mTLS: warm tunnel pool)",
        0,
    ),
    ("cps_p99_us", "new connection + exchange p99 (µs)", 1),
    ("proxy_rss_idle_mib", "proxy RSS idle (MiB)", 1),
    (
        "proxy_anon_idle_mib",
        "of which anonymous: heap, stacks (the rest is the binary's code) (MiB)",
        1,
    ),
    ("proxy_rss_load_mib", "proxy RSS under load, max (MiB)", 1),
    (
        "idle_conn_kib",
        "agent memory (heap, stacks) per idle connection, most of the path's agents (KiB)",
        1,
    ),
    (
        "idle_after_close_ratio",
        "agent RSS after they closed / idle before any load, most of the path's agents",
        2,
    ),
    ("proxy_cpu_s_per_gb", "proxy CPU s per GB (bulk)", 2),
    (
        "proxy_cpu_us_per_conn",
        "proxy CPU µs per new connection (cps run)",
        1,
    ),
];

/// Writes the three files; returns the Markdown.
pub fn write(
    out: &Path,
    meta: &Value,
    results: &[PathResult],
    comparisons: &Value,
    profile: &Profile,
) -> Result<String> {
    let paths: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "label": r.label,
                "baseline": r.baseline,
                "metrics": r.metrics,
                "ratios": ratios(r, results),
                "notes": r.notes,
                "errors": r.errors,
                "raw": r.raw,
            })
        })
        .collect();
    let doc = json!({
        "meta": meta,
        "paths": paths,
        "on_off": comparisons,
    });
    let json_path = out.join("results.json");
    fs::write(&json_path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let markdown = markdown(meta, results, comparisons, profile);
    fs::write(out.join("results.md"), &markdown)?;
    fs::write(out.join("latency.svg"), svg(results))?;
    Ok(markdown)
}

fn baseline_of<'a>(r: &PathResult, results: &'a [PathResult]) -> Option<&'a PathResult> {
    let name = r.baseline?;
    results.iter().find(|b| b.name == name)
}

fn ratios(r: &PathResult, results: &[PathResult]) -> BTreeMap<&'static str, f64> {
    baseline_of(r, results).map_or_else(BTreeMap::new, |base| ratios_to(r, base))
}

/// Each metric of `r` over the same metric of `base`.
fn ratios_to(r: &PathResult, base: &PathResult) -> BTreeMap<&'static str, f64> {
    r.metrics
        .iter()
        .filter_map(|(k, v)| {
            let b = base.metrics.get(k)?;
            (*b > 0.0).then_some((*k, v / b))
        })
        .collect()
}

fn markdown(meta: &Value, results: &[PathResult], comparisons: &Value, p: &Profile) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## mesh data-path bench ({}, kernel {}, {} CPUs)\n",
        if meta["quick"].as_bool() == Some(true) {
            "quick"
        } else {
            "full"
        },
        meta["kernel"].as_str().unwrap_or("?"),
        meta["cpus"],
    );
    let _ = write!(md, "| metric |");
    for r in results {
        let _ = write!(md, " {} |", r.label);
    }
    let _ = write!(md, "\n|---|");
    for _ in results {
        let _ = write!(md, "---:|");
    }
    md.push('\n');
    for (key, label, decimals) in METRICS {
        let _ = write!(md, "| {label} |");
        for r in results {
            let cell = match r.metrics.get(key) {
                Some(v) => {
                    let ratio = baseline_of(r, results)
                        .and_then(|b| b.metrics.get(key))
                        .filter(|b| **b > 0.0)
                        .map(|b| format!(" ({:.2}×)", v / b))
                        .unwrap_or_default();
                    format!("{v:.decimals$}{ratio}")
                }
                None => "–".into(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "\n(×) = ratio to the direct path of the same kind (same-node or cross-node). \
         RR: {} req/s over {} connections, open loop, latency from the scheduled send time, \
         {} s after {} s warm-up. Ping-pong {} s; bulk {} s each; new connections: {} \
         threads, {} s or {} connections. Proxy = the processes on the path (both agents \
         cross-node, both haproxy); CPU over the two bulk runs. The agent mTLS path's new \
         connections reuse ONE pooled TLS connection per (source identity, destination): each \
         is a new HTTP/2 CONNECT stream through a warm tunnel, no TLS handshake (the \
         handshake cost is the in-process figure below); HAProxy (TCP mode) opens a new TLS \
         connection per connection (resuming the TLS session, its default).",
        p.rr_rate,
        p.rr_conns,
        p.rr_s,
        p.warmup_s,
        p.pingpong_s,
        p.bulk_s,
        p.cps_threads,
        p.cps_s,
        p.cps_max
    );
    md.push_str(&on_off::markdown(comparisons, p));
    for r in results {
        for note in &r.notes {
            let _ = writeln!(md, "\n{}: {note}", r.label);
        }
    }
    md.push_str(&mtls::markdown(&meta["tls_micro"]));
    for r in results.iter().filter(|r| !r.errors.is_empty()) {
        let _ = writeln!(md, "\n**{}**: {}", r.label, r.errors.join("; "));
    }
    md
}

/// A grouped bar chart, log scale: p50/p90/p99/p99.9 of the RR test per path.
fn svg(results: &[PathResult]) -> String {
    const SERIES: [(&str, &str, &str); 4] = [
        ("rr_p50_us", "p50", "#4e79a7"),
        ("rr_p90_us", "p90", "#59a14f"),
        ("rr_p99_us", "p99", "#f28e2b"),
        ("rr_p999_us", "p99.9", "#e15759"),
    ];
    let (width, height) = (960.0_f64, 480.0_f64);
    let (left, right, top, bottom) = (70.0, 20.0, 50.0, 90.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let values: Vec<f64> = results
        .iter()
        .flat_map(|r| {
            SERIES
                .iter()
                .filter_map(|(k, _, _)| r.metrics.get(k).copied())
        })
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        .log10()
        .floor();
    let hi = values
        .iter()
        .copied()
        .fold(1.0, f64::max)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let y = |v: f64| top + plot_h * (1.0 - (v.max(1.0).log10() - lo) / (hi - lo));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" text-anchor="middle" font-size="16">1 KiB request/response latency at a fixed rate (µs, log scale)</text>"#,
        width / 2.0
    );
    // Decade grid lines.
    let mut decade = lo;
    while decade <= hi {
        let v = 10f64.powf(decade);
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            width - right,
            left - 6.0,
            yy + 4.0
        );
        decade += 1.0;
    }
    let group_w = plot_w / results.len().max(1) as f64;
    let bar_w = group_w * 0.8 / SERIES.len() as f64;
    for (i, r) in results.iter().enumerate() {
        let gx = left + group_w * i as f64 + group_w * 0.1;
        for (j, (key, name, color)) in SERIES.iter().enumerate() {
            let Some(v) = r.metrics.get(key) else {
                continue;
            };
            let x = gx + bar_w * j as f64;
            let yy = y(*v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{} {name}: {v:.1} µs</title></rect>"#,
                bar_w * 0.92,
                (top + plot_h - yy).max(0.0),
                xml(&r.label)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{v:.0}</text>"#,
                x + bar_w * 0.46,
                yy - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            xml(&r.label)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{left}" y1="{top}" y2="{:.1}" stroke="black"/><line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        width - right,
        top + plot_h,
        top + plot_h
    );
    for (j, (_, name, color)) in SERIES.iter().enumerate() {
        let x = left + 110.0 * j as f64;
        let yy = height - 30.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{yy}">{name}</text>"#,
            yy - 10.0,
            x + 18.0
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
