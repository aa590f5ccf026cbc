//! The admin API on a loopback address of the node: /healthz, /ready, /metrics, /status.
//! `mesh-agent status` is its client.

pub mod status;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};

use crate::metrics::Metrics;
pub use status::StatusReport;

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
    pub report: Box<dyn Fn() -> StatusReport + Send + Sync>,
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
                let service = service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &request)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })))
}

fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" | "/ready" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/metrics" => {
            (state.before_metrics)();
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                state.metrics.render(),
            )
        }
        "/status" => match serde_json::to_string_pretty(&(state.report)()) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(error) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                error.to_string(),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
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
