//! A real Prometheus (Debian's `prometheus` package) scraping an agent: started in the
//! agent's node netns (the admin API listens on loopback there), with its own config, its
//! own TSDB in a temp dir and a port the kernel picks, so it never meets a system Prometheus
//! on :9090. Killed and its directory removed on drop, also when a test fails. Queries go
//! through the HTTP API (`/api/v1/query`), read with `mesh-testtool http-get` in the node.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{Node, Topology};

/// The scrape interval: short, so that `rate()` has samples within seconds.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// How long [`Prometheus::start`] waits for the server to listen and be ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Between two polls of the HTTP API.
const POLL: Duration = Duration::from_millis(250);

/// One series of an instant query's result: its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running Prometheus scraping one target; stopped and removed on drop.
pub struct Prometheus {
    child: Child,
    node: Node,
    dir: PathBuf,
    /// `127.0.0.1:<port>` inside the node's netns.
    address: String,
}

impl Prometheus {
    /// Starts Prometheus in `node`'s netns, scraping `target` (`host:port`, path `/metrics`)
    /// every [`SCRAPE_INTERVAL`] as job `mesh-agent`; its files go to a directory of the
    /// topology's scratch space (which the topology removes too). Returns once the server
    /// is ready (not yet once the target has been scraped: see
    /// [`wait_for_target`](Self::wait_for_target)).
    pub fn start(topology: &Topology, node: &Node, target: &str) -> Result<Prometheus> {
        let dir = std::env::temp_dir()
            .join(topology.bpf_pin_name())
            .join(format!("prometheus-{}", node.name()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        let secs = SCRAPE_INTERVAL.as_secs();
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {secs}s\n  evaluation_interval: {secs}s\n\
                 scrape_configs:\n  - job_name: mesh-agent\n    scrape_timeout: {secs}s\n\
                 \x20   static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.join("prometheus.log");
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = node.try_command("prometheus")?;
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            // Port 0: the kernel picks a free one, which the log then names.
            .arg("--web.listen-address=127.0.0.1:0")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().with_context(|| {
            format!("starting prometheus (the Debian package; `cargo xtask test` installs it): {command:?}")
        })?;
        let mut prometheus = Prometheus {
            child,
            node: node.clone(),
            dir,
            address: String::new(),
        };
        prometheus.address = prometheus.wait_listening()?;
        prometheus.wait_ready()?;
        Ok(prometheus)
    }

    /// Reads the address from the `msg="Listening on" address=127.0.0.1:PORT` log line.
    fn wait_listening(&mut self) -> Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.log();
            let address = log
                .lines()
                .filter(|line| line.contains("msg=\"Listening on\""))
                .find_map(|line| {
                    line.split_whitespace()
                        .find_map(|field| field.strip_prefix("address="))
                });
            if let Some(address) = address {
                return Ok(address.to_owned());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("prometheus exited during start-up ({status}):\n{log}");
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus did not log the address it listens on within {START_TIMEOUT:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let ready = self.node.http_get(&self.address, "/-/ready");
            if ready.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus was not ready within {START_TIMEOUT:?} ({ready:?}):\n{}",
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Prometheus's own log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until every target has been scraped successfully (`/api/v1/targets` says
    /// `health: up`), within `timeout`.
    pub fn wait_for_target(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let targets = self.api("/api/v1/targets")?;
            let active = targets["activeTargets"]
                .as_array()
                .with_context(|| format!("no activeTargets in {targets}"))?;
            if !active.is_empty() && active.iter().all(|t| t["health"] == "up") {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the scrape target is not up within {timeout:?}: {active:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// An instant query at the current time: its series (a scalar result is one series
    /// without labels). A query Prometheus refuses is an error with its reason.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", url_encode(promql)))
            .with_context(|| format!("query {promql}"))?;
        parse_result(&data).with_context(|| format!("result of {promql}: {data}"))
    }

    /// The value of a query that returns one series; `None` while it returns none.
    pub fn value(&self, promql: &str) -> Result<Option<f64>> {
        let samples = self.query(promql)?;
        match samples.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            more => bail!("{promql} returned {} series: {more:?}", more.len()),
        }
    }

    /// Polls `promql` until it returns exactly one series whose value is `want`, within
    /// `timeout` (the scrape after the traffic must come first).
    pub fn wait_for_value(&self, promql: &str, want: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.value(promql)?;
            if got == Some(want) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{promql} is {got:?} after {timeout:?}, expected {want}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// GET an API path; the `data` of a `status: success` answer.
    fn api(&self, path: &str) -> Result<Value> {
        let body = self.node.http_get(&self.address, path)?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("parsing the answer to {path}: {body}"))?;
        ensure!(
            answer["status"] == "success",
            "{path}: {} {}",
            answer["errorType"],
            answer["error"]
        );
        Ok(answer["data"].clone())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Our own child, not yet reaped: its pid cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The series of an instant query's `data` (`resultType` vector or scalar).
fn parse_result(data: &Value) -> Result<Vec<Sample>> {
    let value = |pair: &Value| -> Result<f64> {
        let text = pair[1]
            .as_str()
            .with_context(|| format!("no value in {pair}"))?;
        // Prometheus writes NaN, +Inf and -Inf as such; f64's parser reads them.
        text.parse()
            .with_context(|| format!("value {text:?} is not a number"))
    };
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .context("no result array")?
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .context("no metric in a series")?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                Ok(Sample {
                    labels,
                    value: value(&series["value"])?,
                })
            })
            .collect(),
        Some("scalar") => Ok(vec![Sample {
            labels: BTreeMap::new(),
            value: value(&data["result"])?,
        }]),
        other => bail!("an instant query returned a {other:?}, not a vector or a scalar"),
    }
}

/// Percent-encodes a query parameter: everything but RFC 3986's unreserved characters.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_promql_for_a_query_string() {
        assert_eq!(
            url_encode(r#"sum(rate(x{a=~"b.*"}[1m])) > 0 & é"#),
            "sum%28rate%28x%7Ba%3D~%22b.%2A%22%7D%5B1m%5D%29%29%20%3E%200%20%26%20%C3%A9"
        );
    }

    #[test]
    fn parses_vectors_and_scalars() {
        let vector = serde_json::json!({"resultType": "vector", "result": [
            {"metric": {"service": "test/echo"}, "value": [1.5, "0.25"]},
            {"metric": {}, "value": [1.5, "NaN"]},
            {"metric": {}, "value": [1.5, "+Inf"]},
        ]});
        let samples = parse_result(&vector).expect("vector");
        assert_eq!(samples[0].labels["service"], "test/echo");
        assert_eq!(samples[0].value, 0.25);
        assert!(samples[1].value.is_nan());
        assert_eq!(samples[2].value, f64::INFINITY);
        let scalar = serde_json::json!({"resultType": "scalar", "result": [1.5, "3"]});
        assert_eq!(parse_result(&scalar).expect("scalar")[0].value, 3.0);
        let matrix = serde_json::json!({"resultType": "matrix", "result": []});
        assert!(parse_result(&matrix).is_err());
    }
}
