//! `mesh-agent probe live|ready`: one request to the admin API with a deadline, for a
//! Kubernetes exec probe (run inside the agent's pod, which shares the node's network, so it
//! reaches the loopback-only admin API where a kubelet's HTTP probe would not).

use std::{net::SocketAddr, time::Duration};

use super::status::fetch;

/// GETs `path` from the admin API at `admin` within `timeout`. `Ok` and `Err` are both the one
/// line to print: `ready: ok`, or why not.
pub async fn check(admin: SocketAddr, path: &str, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, fetch(admin, path)).await {
        Ok(Ok(_)) => Ok(format!("{path}: ok")),
        Ok(Err(error)) => Err(format!("{path}: failed: {error:#} (admin API {admin})")),
        Err(_) => Err(format!(
            "{path}: failed: no answer within {} ms (admin API {admin})",
            timeout.as_millis()
        )),
    }
}
