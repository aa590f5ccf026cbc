//! The admin API on a loopback address of the node: /healthz, /ready, /metrics, /status.
//! `mesh-agent status` is its client.

pub mod probe;
pub mod status;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

/// Binds the admin API; serving runs on the returned task until the runtime stops.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> Result<(), AdminError> {
    if !addr.ip().is_loopback() {
        return Err(AdminError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    tokio::spawn(async move {
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
    });
    Ok(())
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
