//! The HTTP side: a thread that enters the wanted network namespace, binds 127.0.0.1 there
//! (a socket stays in the namespace it was made in) and runs a single-threaded runtime with
//! hyper serving list, get and watch from the [`Store`].
//!
//! Watch responses are chunked bodies fed by a channel; breaking a connection on purpose is a
//! body error, which makes hyper drop the connection without the final chunk.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body::Frame as BodyFrame;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot;
use tokio::time::Sleep;

use super::ApiRequest;
use super::resources;
use super::selector::{FieldSelector, LabelSelector};
use super::store::Store;
use super::watch::{Filter, Frame, Status};

/// How long a watch lasts when the client gives no timeoutSeconds (the real server picks
/// between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

pub(crate) fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running server thread; stops and joins on drop.
#[derive(Debug)]
pub(crate) struct ServerThread {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    pub(crate) fn spawn(
        store: Arc<Mutex<Store>>,
        netns: Option<PathBuf>,
        bookmark_interval: Duration,
    ) -> Result<ServerThread> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr>>();
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("fake-kube-apiserver".into())
            .spawn(move || {
                let setup = || -> Result<_> {
                    if let Some(ns) = &netns {
                        let fd = std::fs::File::open(ns)
                            .with_context(|| format!("opening netns {}", ns.display()))?;
                        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                            .with_context(|| format!("entering netns {}", ns.display()))?;
                    }
                    let listener = std::net::TcpListener::bind("127.0.0.1:0")
                        .context("binding 127.0.0.1:0")?;
                    listener.set_nonblocking(true)?;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("building the server runtime")?;
                    Ok((listener.local_addr()?, listener, runtime))
                };
                match setup() {
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                    Ok((addr, listener, runtime)) => {
                        let _ = ready_tx.send(Ok(addr));
                        runtime.block_on(serve(listener, store, bookmark_interval, stop_rx));
                    }
                }
            })
            .context("spawning the fake API server thread")?;
        let addr = ready_rx
            .recv()
            .context("the fake API server thread died while starting")??;
        Ok(ServerThread {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts until told to stop; dropping the runtime afterwards closes every connection.
async fn serve(
    listener: std::net::TcpListener,
    store: Arc<Mutex<Store>>,
    bookmark_interval: Duration,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake API server: {e}");
            return;
        }
    };
    let ticker = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(bookmark_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            lock(&ticker).bookmark();
        }
    });
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| handle(store.clone(), req));
                        // A client going away mid-watch is an error here and normal.
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    eprintln!("fake API server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn handle(
    store: Arc<Mutex<Store>>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, Infallible> {
    let request = ApiRequest {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        query: form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect(),
    };
    lock(&store).requests.push(request.clone());
    Ok(respond(&store, &request).unwrap_or_else(|status| {
        let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &status.to_json())
    }))
}

fn bad_request(e: anyhow::Error) -> Status {
    Status::new(400, "BadRequest", e.to_string())
}

fn respond(store: &Mutex<Store>, r: &ApiRequest) -> Result<Response<ApiBody>, Status> {
    if r.method != "GET" {
        return Err(Status::new(
            405,
            "MethodNotAllowed",
            "the fake API server serves reads only",
        ));
    }
    let route = resources::route(&r.path).ok_or_else(|| {
        Status::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    })?;
    if let Some(name) = &route.name {
        let ns = route.namespace.as_deref().unwrap_or("");
        let object = lock(store).get(route.resource, ns, name)?;
        return Ok(json_response(StatusCode::OK, &object));
    }
    let filter = Filter {
        resource: route.resource,
        namespace: route.namespace,
        labels: LabelSelector::parse(r.param("labelSelector").unwrap_or(""))
            .map_err(bad_request)?,
        fields: FieldSelector::parse(r.param("fieldSelector").unwrap_or(""), route.resource.kind)
            .map_err(bad_request)?,
    };
    if r.is_watch() {
        let timeout = match r.param("timeoutSeconds") {
            Some(t) => Duration::from_secs(t.parse().map_err(|_| {
                Status::new(400, "BadRequest", format!("invalid timeoutSeconds {t:?}"))
            })?),
            None => DEFAULT_WATCH_TIMEOUT,
        };
        let rx = lock(store).watch(
            filter,
            r.param("resourceVersion"),
            r.param("sendInitialEvents") == Some("true"),
            r.param("allowWatchBookmarks") == Some("true"),
        )?;
        let body = ApiBody::Watch {
            rx,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            done: false,
        };
        return Ok(response(StatusCode::OK, body));
    }
    let limit = match r.param("limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| Status::new(400, "BadRequest", format!("invalid limit {l:?}")))?,
        ),
        None => None,
    };
    let list = lock(store).list(&filter, limit, r.param("continue"))?;
    Ok(json_response(StatusCode::OK, &list))
}

fn response(code: StatusCode, body: ApiBody) -> Response<ApiBody> {
    let mut response = Response::new(body);
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_response(code: StatusCode, value: &Value) -> Response<ApiBody> {
    response(code, ApiBody::Full(Some(Bytes::from(value.to_string()))))
}

/// A whole JSON document, or a watch stream of event lines.
pub(crate) enum ApiBody {
    Full(Option<Bytes>),
    Watch {
        rx: UnboundedReceiver<Frame>,
        /// The watch's timeoutSeconds: the server then ends the stream cleanly.
        deadline: Pin<Box<Sleep>>,
        done: bool,
    },
}

impl http_body::Body for ApiBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ApiBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(BodyFrame::data(b)))),
            ApiBody::Watch { rx, deadline, done } => {
                if *done || deadline.as_mut().poll(cx).is_ready() {
                    *done = true;
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(Frame::Line(line))) => {
                        Poll::Ready(Some(Ok(BodyFrame::data(line))))
                    }
                    Poll::Ready(Some(Frame::End) | None) => {
                        *done = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Frame::Abort)) => {
                        *done = true;
                        Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "watch connection broken by the test",
                        ))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}
