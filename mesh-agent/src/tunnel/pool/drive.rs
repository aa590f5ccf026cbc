//! A tunnel connection's task: it drives the HTTP/2 connection and closes it once idle.

use std::{
    sync::{Arc, Weak, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use tokio::time::Instant;

use super::{ConnState, Inner, Key, Slot};
use crate::metrics::GaugeGuard;

/// How long a key's other connections (all but its oldest) may go without a stream. They
/// were opened for concurrency (more streams at once than one connection carries well, or
/// than the server allows on one); once that has passed, each holds its TLS and HTTP/2
/// buffers and stream table (about 100-200 KiB with 64 KiB frames) for nothing, while
/// opening one again costs a handshake (well under a millisecond of CPU). The oldest stays
/// warm for the whole idle timeout.
const SURPLUS_IDLE: Duration = Duration::from_secs(1);

/// Runs one connection until it ends or has been idle for the idle timeout ([`SURPLUS_IDLE`]
/// unless it is its key's oldest). Idle closing clears the pool slot (under its lock, where
/// streams are counted) which drops the last `SendRequest`, so h2 ends the connection
/// cleanly.
pub(super) async fn drive<T>(
    pool: Weak<Inner>,
    key: Key,
    slot: Slot,
    id: u64,
    state: Arc<ConnState>,
    connection: h2::client::Connection<T, Bytes>,
    _open: GaugeGuard,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let idle_timeout = match pool.upgrade() {
        Some(pool) => pool.options.idle_timeout,
        None => return,
    };
    tokio::pin!(connection);
    let mut closing = false;
    // While streams are open (or the slot is busy) look again a little later: last_used is
    // only refreshed when a stream ends.
    let recheck = idle_timeout.min(Duration::from_secs(1));
    let surplus_idle = idle_timeout.min(SURPLUS_IDLE);
    let mut wake = state.last_used() + surplus_idle;
    loop {
        tokio::select! {
            result = &mut connection => {
                if let Err(error) = result {
                    tracing::debug!(addr = %key.2, %error, "tunnel connection ended");
                }
                break;
            }
            _ = tokio::time::sleep_until(wake), if !closing => {
                let now = Instant::now();
                let Ok(mut current) = slot.try_lock() else {
                    wake = now + recheck;
                    continue;
                };
                let oldest = current
                    .list
                    .iter()
                    .find(|conn| !conn.state.closed.load(Ordering::Acquire))
                    .is_none_or(|conn| conn.id == id);
                let idle_until =
                    state.last_used() + if oldest { idle_timeout } else { surplus_idle };
                if idle_until > now {
                    wake = idle_until;
                    continue;
                }
                if state.active.load(Ordering::Acquire) != 0 {
                    wake = now + recheck;
                    continue;
                }
                state.closed.store(true, Ordering::Release);
                current.list.retain(|conn| conn.id != id);
                closing = true;
                tracing::debug!(addr = %key.2, "closing idle tunnel connection");
            }
        }
    }
    state.closed.store(true, Ordering::Release);
    if let Ok(mut current) = slot.try_lock() {
        current.list.retain(|conn| conn.id != id);
    }
    drop(slot);
    if let Some(pool) = pool.upgrade() {
        pool.live.fetch_sub(1, Ordering::Relaxed);
        let mut slots = pool.slots.lock();
        // Drop the key when nobody holds or waits on its slot and it is empty.
        let unused = slots.get(&key).is_some_and(|slot| {
            Arc::strong_count(slot) == 1
                && slot.try_lock().is_ok_and(|current| current.list.is_empty())
        });
        if unused {
            slots.remove(&key);
        }
    }
}
