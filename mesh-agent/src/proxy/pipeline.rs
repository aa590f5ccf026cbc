//! The one path every proxied connection takes, whatever way it came in (outbound capture,
//! plaintext inbound, tunnel stream):
//!
//! 1. **route**: [`route`] turns the destination and the snapshot into a plan (a fixed hop,
//!    or a service's balancer; or refused with the reason), and the source's egress limit
//!    is taken;
//! 2. **admit**, per attempt: a destination served here is registered for revocation, then
//!    authorized ([`ProxyContext::admit`]), then its rate limits are taken;
//! 3. **connect**: from the pod's network namespace, or through the tunnel pool; a failed
//!    connect to a service endpoint is retried on another within the retry budget
//!    ([`connect`]);
//! 4. **answer** the downstream (a tunnel stream gets its `200` only now) and **copy**, paced
//!    by the bandwidth limits, until both ends close, the idle timeout, the maximum lifetime,
//!    or a policy change revokes it;
//! 5. **report**: the [`ConnectionResult`] filled in on the way logs and counts it when it
//!    drops.
//!
//! A new step goes here once, for all three ways in.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;

use super::{
    connect::{self, CopySettings, Established, Stream},
    context::{PodHandle, ProxyContext},
    direction::Direction,
    fast_path::{Credit, Credited},
    outcome::{ConnectionResult, Outcome},
    upstream,
};
use crate::{
    copy::{self, CopyError, Transferred},
    limit::Shaper,
    tls::SpiffeId,
    tunnel::{PendingStream, Refusal},
};

/// The downstream side as it was accepted.
pub enum Downstream {
    /// A TCP connection taken by a pod's outbound or inbound listener.
    Tcp(TcpStream),
    /// A CONNECT stream through a tunnel, answered once the upstream is connected.
    Tunnel(PendingStream),
}

/// A connection the proxy took, and what is known of it before routing.
pub struct Accepted {
    pub direction: Direction,
    pub pod: PodHandle,
    pub downstream: Downstream,
    /// The app's socket (outbound), the remote client (inbound), the client pod (tunnel: its
    /// vouched-for address, else the tunnel connection's peer).
    pub client: SocketAddr,
    /// Where the client meant to go; `None` when the capture left no original destination.
    pub destination: Option<SocketAddr>,
    /// The pod's own identity (outbound), the tunnel peer's (tunnel), none (plaintext).
    pub client_identity: Option<SpiffeId>,
    /// A tunnel stream's vouched-for client address, which the app is connected from.
    pub connect_from: Option<IpAddr>,
}

/// Runs one connection to its end. Never fails: every way it can end is in its result.
pub async fn serve(ctx: Arc<ProxyContext>, accepted: Accepted) {
    let Accepted {
        direction,
        pod,
        downstream,
        client,
        destination,
        client_identity,
        connect_from,
    } = accepted;
    let mut result = ConnectionResult::new(
        ctx.metrics.clone(),
        direction,
        pod.key.clone(),
        client,
        client_identity,
        destination,
    );
    // Boxed: routing and connecting (retries, the tunnel pool) take far more state than the
    // copy, and an inline future would keep that size for the connection's whole life.
    let first_bytes_from = match &downstream {
        Downstream::Tcp(stream) => Some(stream),
        Downstream::Tunnel(_) => None,
    };
    let establishing = Box::pin(connect::establish(
        &ctx,
        &pod,
        &mut result,
        connect_from,
        first_bytes_from,
    ));
    // Destructured here: a binding of the whole would stay in the future (moved from, but
    // never reused) for the connection's whole life.
    let Some(Established {
        upstream,
        tracked,
        shaper,
        copy,
        active,
        _slot,
        early_bytes,
    }) = establishing.await
    else {
        refuse(downstream, &result);
        return;
    };
    let downstream = match downstream {
        Downstream::Tcp(stream) => Stream::Tcp(stream),
        Downstream::Tunnel(pending) => match pending.accept() {
            Ok(stream) => Stream::Tunnel(stream),
            Err(error) => {
                result.fail(Outcome::Reset, format!("tunnel stream gone: {error}"));
                return;
            }
        },
    };
    result.established();
    if early_bytes > 0 {
        // Sent with the connect: counted, and paced as if the copy had sent them.
        let sent = &result.moved.downstream_to_upstream;
        sent.fetch_add(early_bytes as u64, std::sync::atomic::Ordering::Relaxed);
        copy::Pace::pace(shaper.to_server(), early_bytes).await;
    }
    let lifetime = async {
        match copy.max_lifetime {
            Some(lifetime) => tokio::time::sleep(lifetime).await,
            None => std::future::pending().await,
        }
    };
    let revoked = tracked.revoked();
    let mut istio = result.take_istio();
    let credits = fast_path_credits(&ctx, direction, &pod, &downstream, &upstream);
    let ended = {
        let copied = pump(downstream, upstream, copy, &shaper, &result.moved, credits);
        tokio::pin!(copied, revoked, lifetime);
        let mut flush =
            tokio::time::interval_at(tokio::time::Instant::now() + BYTES_FLUSH, BYTES_FLUSH);
        loop {
            tokio::select! {
                ended = &mut copied => break Ended::Copy(ended),
                () = &mut revoked => break Ended::Revoked,
                () = &mut lifetime => break Ended::Lifetime,
                // No timer wake-ups at all while Istio's metrics are off.
                _ = flush.tick(), if istio.is_some() => {
                    if let Some(istio) = &mut istio {
                        istio.flush(result.moved.get());
                    }
                }
            }
        }
    };
    result.restore_istio(istio);
    match ended {
        Ended::Copy(Ok(())) => result.outcome = Outcome::Closed,
        Ended::Copy(Err(CopyError::Idle(after))) => {
            result.fail(Outcome::IdleTimeout, format!("idle for {after:?}"));
        }
        Ended::Copy(Err(CopyError::Io(error))) => {
            // A reset before any byte came back counts against the endpoint.
            if result.moved.get().1 == 0
                && let Some(active) = &active
                && active.reset_before_reply()
            {
                ctx.metrics
                    .ejection(result.service.as_deref().unwrap_or_default());
            }
            result.fail(Outcome::Reset, error.to_string());
        }
        Ended::Revoked => result.fail(Outcome::Revoked, "no longer authorized"),
        Ended::Lifetime => result.fail(Outcome::MaxLifetime, "maximum connection lifetime"),
    }
    result.shaped_bytes = shaper.shaped_bytes();
}

/// How often a long connection's bytes are added to the Istio byte counters.
const BYTES_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// How the copy ended.
enum Ended {
    Copy(Result<(), CopyError>),
    /// A policy change revoked it while open.
    Revoked,
    /// The service's maximum connection lifetime.
    Lifetime,
}

/// Refuses the downstream the way its kind understands: a TCP reset, or a tunnel response
/// status.
fn refuse(downstream: Downstream, result: &ConnectionResult) {
    match downstream {
        Downstream::Tcp(stream) => upstream::reset(&stream),
        Downstream::Tunnel(pending) => {
            let reason = result.reason.clone().unwrap_or_default();
            let refusal = match result.outcome {
                Outcome::Denied | Outcome::Forbidden => Refusal::Forbidden(reason),
                Outcome::ConnectFailed => Refusal::Unreachable(reason),
                _ => Refusal::Unavailable(reason),
            };
            pending.refuse(&refusal);
        }
    }
}

/// The read counts of the agent's sockets on the fast path's hop, (downstream, upstream): the
/// accepted socket of an outbound connection (its peer is the app), the upstream socket of a
/// connection into the pod (its peer is the app, in the same netns). An outbound connection's
/// upstream is in the source pod and its app elsewhere: no hop of the fast path.
fn fast_path_credits(
    ctx: &ProxyContext,
    direction: Direction,
    pod: &PodHandle,
    downstream: &Stream,
    upstream: &Stream,
) -> (Option<Credit>, Option<Credit>) {
    let table = ctx.fast_path.as_ref();
    let cookie = pod.netns.cookie();
    let credit = |stream: &TcpStream| Credit::new(table, cookie, stream);
    match (direction, downstream, upstream) {
        (Direction::Outbound, Stream::Tcp(down), _) => (credit(down), None),
        (Direction::Inbound | Direction::Tunnel, _, Stream::Tcp(up)) => (None, credit(up)),
        _ => (None, None),
    }
}

async fn pump(
    downstream: Stream,
    upstream: Stream,
    settings: CopySettings,
    shaper: &Shaper,
    moved: &Transferred,
    (down_credit, up_credit): (Option<Credit>, Option<Credit>),
) -> Result<(), CopyError> {
    use Stream::{Tcp, Tunnel};
    let CopySettings {
        buffer_bytes,
        idle_timeout,
        splice,
        ..
    } = settings;
    let pace = (shaper.to_server(), shaper.to_client());
    match (downstream, upstream) {
        // Neither socket on the fast path's hop: what sk_msg redirects is only seen by reads.
        (Tcp(mut down), Tcp(mut up)) if splice && down_credit.is_none() && up_credit.is_none() => {
            copy::spliced(
                down.split(),
                up.split(),
                buffer_bytes,
                idle_timeout,
                moved,
                pace,
            )
            .await
        }
        (Tcp(mut down), Tcp(mut up)) => {
            let (down_read, down_write) = down.split();
            let (up_read, up_write) = up.split();
            copy::halves(
                (Credited::new(down_read, down_credit), down_write),
                (Credited::new(up_read, up_credit), up_write),
                buffer_bytes,
                idle_timeout,
                moved,
                pace,
            )
            .await
        }
        (Tcp(mut down), Tunnel(up)) => {
            let (down_read, down_write) = down.split();
            let down = (Credited::new(down_read, down_credit), down_write);
            copy::halves(
                down,
                up.into_split(),
                buffer_bytes,
                idle_timeout,
                moved,
                pace,
            )
            .await
        }
        (Tunnel(down), Tcp(mut up)) => {
            let (up_read, up_write) = up.split();
            let up = (Credited::new(up_read, up_credit), up_write);
            copy::halves(
                down.into_split(),
                up,
                buffer_bytes,
                idle_timeout,
                moved,
                pace,
            )
            .await
        }
        (Tunnel(down), Tunnel(up)) => {
            let (down, up) = (down.into_split(), up.into_split());
            copy::halves(down, up, buffer_bytes, idle_timeout, moved, pace).await
        }
    }
}
