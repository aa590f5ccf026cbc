//! `mesh-agent status`: fetches a report from the agent's admin API and prints it, for a
//! person (`render`) or as the JSON the API answered (`--json`, printed as received).
//!
//! When the agent cannot be reached the error names the address and the likely causes,
//! and nothing else: it is what an operator sees first when the node's mesh is down.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use super::{
    render,
    status::{ConnectionsReport, StatusReport, unix_seconds},
};

/// How long the whole exchange with the agent may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// What `mesh-agent status` shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The first screen: is this node's mesh healthy?
    Overview,
    Pods,
    Services,
    /// The oldest live connections, at most this many.
    Connections {
        limit: usize,
    },
    Certificates,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent's admin API at {admin}: {source} (is mesh-agent running on \
         this node, in this network namespace, with agent.adminAddr {admin}?)"
    )]
    Unreachable {
        admin: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent's admin API at {admin} did not answer within {TIMEOUT:?}")]
    Timeout { admin: SocketAddr },
    #[error("building the request for {path}: {source}")]
    Request { path: String, source: http::Error },
    #[error("talking to the agent's admin API at {admin}: {source}")]
    Http {
        admin: SocketAddr,
        source: hyper::Error,
    },
    #[error("the agent's admin API at {admin} answered {status} for {path}")]
    Status {
        admin: SocketAddr,
        path: String,
        status: StatusCode,
    },
    #[error("reading {path} from the agent's admin API at {admin}: {source}")]
    Parse {
        admin: SocketAddr,
        path: String,
        source: serde_json::Error,
    },
}

impl View {
    /// The admin API path that answers it.
    pub fn path(self) -> String {
        match self {
            View::Overview => "/status".to_owned(),
            View::Pods => "/status/pods".to_owned(),
            View::Services => "/status/services".to_owned(),
            View::Connections { limit } => format!("/status/connections?limit={limit}"),
            View::Certificates => "/status/certificates".to_owned(),
        }
    }
}

/// Fetches `view` from the agent at `admin`; returns what to print: the JSON as the agent
/// sent it, or the view rendered for an 80-column terminal.
pub async fn show(admin: SocketAddr, view: View, json: bool) -> Result<String, ClientError> {
    let path = view.path();
    let body = tokio::time::timeout(TIMEOUT, fetch(admin, &path))
        .await
        .map_err(|_| ClientError::Timeout { admin })??;
    if json {
        let mut body = String::from_utf8_lossy(&body).into_owned();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        return Ok(body);
    }
    let now = unix_seconds(std::time::SystemTime::now());
    let parse_error = |source| ClientError::Parse {
        admin,
        path: path.clone(),
        source,
    };
    Ok(match view {
        View::Connections { .. } => {
            render::connections(&parse::<ConnectionsReport>(&body).map_err(parse_error)?)
        }
        View::Overview => {
            render::overview(&parse::<StatusReport>(&body).map_err(parse_error)?, now)
        }
        View::Pods => render::pods(&parse::<StatusReport>(&body).map_err(parse_error)?),
        View::Services => {
            render::services(&parse::<StatusReport>(&body).map_err(parse_error)?, now)
        }
        View::Certificates => {
            render::certificates(&parse::<StatusReport>(&body).map_err(parse_error)?, now)
        }
    })
}

/// Whether an agent answers `/ready` at `admin` within `timeout` (a successor, during a
/// handover).
pub async fn ready(admin: SocketAddr, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, fetch(admin, "/ready")).await,
        Ok(Ok(_))
    )
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(body)
}

/// GETs `path` from the admin API at `admin`: the body of a success, else why not.
pub(super) async fn fetch(admin: SocketAddr, path: &str) -> Result<Bytes, ClientError> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|source| ClientError::Unreachable { admin, source })?;
    let http = |source| ClientError::Http { admin, source };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, admin.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|source| ClientError::Request {
            path: path.to_owned(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes();
    if !status.is_success() {
        return Err(ClientError::Status {
            admin,
            path: path.to_owned(),
            status,
        });
    }
    Ok(body)
}
