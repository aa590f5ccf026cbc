//! The admin API on a loopback address of the node, and `mesh-agent status`, its client.
//!
//! - `/healthz`, `/ready`: liveness; `/metrics`: Prometheus.
//! - `/status`: the first screen's data (health verdict, programs, pods, config generation,
//!   certificates, tunnels, connection counts) and the lists the views show; its views
//!   `/status/pods`, `/status/services`, `/status/certificates`, and
//!   `/status/connections?limit=N` (the oldest live connections, bounded).
//! - `/config_dump`: the configuration snapshot in force, as JSON under the YAML's names.
//!
//! It only reads: the agent hands it closures over its reports. Rooms: [`status`] (the
//! report types), [`render`] (the human output), [`client`] (`mesh-agent status`).

pub mod client;
pub mod probe;
pub mod render;
pub mod status;
#[cfg(test)]
mod tests;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, Uri, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};

use crate::metrics::Metrics;
pub use status::{ConnectionsReport, InForce, StatusReport};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API must listen on a loopback address, not {0}")]
    NotLoopback(SocketAddr),
    #[error("binding the admin API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the admin API reads from the running agent.
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// The status report (its `health` is worked out here).
    pub report: Box<dyn Fn() -> StatusReport + Send + Sync>,
    /// The oldest live connections, at most this many, and the counts of all.
    pub connections: Box<dyn Fn(usize) -> ConnectionsReport + Send + Sync>,
    /// The configuration snapshot in force.
    pub in_force: Box<dyn Fn() -> InForce + Send + Sync>,
    /// The configuration file, for `/config_dump`.
    pub config_file: String,
    /// Brings the gauges and totals kept elsewhere (reloads, certificate expiry) up to date
    /// before a scrape.
    pub before_metrics: Box<dyn Fn() + Send + Sync>,
}

/// The admin API being served; see [`AdminServer::close`].
pub struct AdminServer(JoinHandle<()>);

impl AdminServer {
    /// Stops listening (requests being answered finish), so that from now on only a
    /// successor agent answers on the address.
    pub async fn close(self) {
        self.0.abort();
        let _ = self.0.await;
    }
}

/// Binds the admin API and serves it on a task. `SO_REUSEPORT`, so a successor agent can
/// bind the same address while this one hands over.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> Result<AdminServer, AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(128)
    };
    let listener = bind().map_err(|source| AdminError::Bind { addr, source })?;
    Ok(AdminServer(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let state = state.clone();
                    let (method, uri) = (request.method().clone(), request.uri().clone());
                    async move {
                        // Off the runtime's workers: the status takes the pods' lock, which
                        // an enrollment holds while it waits (up to seconds) for a
                        // certificate, and the workers must keep driving that wait (its TLS
                        // handshake and its timeout). Seen in CI: the agent answered nothing
                        // until the CA gave up on the handshake.
                        let response =
                            tokio::task::spawn_blocking(move || route(&state, &method, &uri))
                                .await
                                .unwrap_or_else(|_| {
                                    text(
                                        StatusCode::INTERNAL_SERVER_ERROR,
                                        "admin handler failed\n",
                                    )
                                });
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })))
}

fn route(state: &AdminState, method: &Method, uri: &Uri) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    let report = || {
        let mut report = (state.report)();
        report.health = report.assess(status::unix_seconds(std::time::SystemTime::now()));
        report
    };
    match uri.path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Which agent answered: two share the address during a handover.
        "/ready" => match crate::sys::process::start_ticks("self") {
            Ok(started) => reply(
                StatusCode::OK,
                "text/plain",
                format!("ok started={started}\n"),
            ),
            Err(_) => text(StatusCode::OK, "ok\n"),
        },
        "/metrics" => {
            (state.before_metrics)();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            )
        }
        "/status" => json(&report()),
        "/status/pods" => {
            let report = report();
            json(&serde_json::json!({
                "workloads": report.workloads,
                "failedPods": report.failed_pods,
            }))
        }
        "/status/services" => {
            let report = report();
            json(&serde_json::json!({
                "services": report.services,
                "limits": report.limits,
            }))
        }
        "/status/certificates" => {
            json(&serde_json::json!({ "certificates": report().certificates }))
        }
        "/status/connections" => match limit(uri.query()) {
            Some(limit) => json(&(state.connections)(limit)),
            None => text(
                StatusCode::BAD_REQUEST,
                "limit must be a number of connections\n",
            ),
        },
        "/config_dump" => {
            let in_force = (state.in_force)();
            json(&status::ConfigDump {
                generation: in_force.generation,
                since: in_force.since,
                file: &state.config_file,
                config: &in_force.config,
            })
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The `limit` of a `/status/connections` query; [`status::STATUS_CONNECTIONS`] when none
/// is given, `None` when it is not a number.
fn limit(query: Option<&str>) -> Option<usize> {
    let given = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("limit="));
    match given {
        Some(n) => n.parse().ok(),
        None => Some(status::STATUS_CONNECTIONS),
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(json) => reply(StatusCode::OK, "application/json", json),
        Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, &error.to_string()),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain", body.to_owned())
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}
