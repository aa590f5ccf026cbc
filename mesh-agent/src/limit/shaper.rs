//! A connection's byte shaping: the byte buckets that apply to it, per direction, as the copy
//! loop's pacers. A pacer takes from every bucket in turn before a write, so the connection
//! goes at the slowest of them; it pauses the copy (nothing more is read until the write went
//! out), never drops. Buckets are shared with the other connections of the same policy and
//! key; the connection holds them (not the policy), so a reload that changes or removes the
//! limit applies to new connections, and a live one keeps the shaping it was admitted with.

use std::{
    fmt,
    num::NonZeroU32,
    sync::atomic::{AtomicU64, Ordering},
};

use super::bucket::{ByteRate, Cells};
use crate::copy::Pace;

/// Byte buckets applying to one connection, per direction (bytes/s each way). Empty when no
/// bandwidth limit applies; then pacing is a ready future.
#[derive(Debug, Default)]
pub struct Shaper {
    to_server: Pacer,
    to_client: Pacer,
}

impl Shaper {
    /// Both shapings at once (a connection under its source's egress limit and its
    /// destination's rate limit): each direction waits for the buckets of both.
    pub fn and(mut self, other: Shaper) -> Shaper {
        self.to_server.join(other.to_server);
        self.to_client.join(other.to_client);
        self
    }

    /// No bucket applies.
    pub fn is_empty(&self) -> bool {
        self.to_server.taps.is_empty() && self.to_client.taps.is_empty()
    }

    /// What the client sends (downstream -> upstream).
    pub fn to_server(&self) -> &Pacer {
        &self.to_server
    }

    /// What comes back (upstream -> downstream).
    pub fn to_client(&self) -> &Pacer {
        &self.to_client
    }

    /// Bytes that had to wait for a bucket, both ways, so far.
    pub fn shaped_bytes(&self) -> u64 {
        self.to_server.shaped_bytes() + self.to_client.shaped_bytes()
    }

    /// Adds a bandwidth limit: one bucket (with its key) per direction.
    pub(super) fn add(
        &mut self,
        rate: ByteRate,
        to_server: Box<dyn Cells>,
        to_client: Box<dyn Cells>,
    ) {
        self.to_server.taps.push(Tap::new(rate, to_server));
        self.to_client.taps.push(Tap::new(rate, to_client));
    }
}

/// One direction of a [`Shaper`].
#[derive(Default)]
pub struct Pacer {
    taps: Vec<Tap>,
    shaped: AtomicU64,
}

impl Pacer {
    /// Bytes of this direction that had to wait, so far.
    pub fn shaped_bytes(&self) -> u64 {
        self.shaped.load(Ordering::Relaxed)
    }

    fn join(&mut self, other: Pacer) {
        self.taps.extend(other.taps);
        *self.shaped.get_mut() += other.shaped.into_inner();
    }
}

impl fmt::Debug for Pacer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pacer")
            .field("buckets", &self.taps.len())
            .field("shaped", &self.shaped_bytes())
            .finish()
    }
}

impl Pace for Pacer {
    async fn pace(&self, bytes: usize) {
        let mut waited = false;
        for tap in &self.taps {
            waited |= tap.take(bytes as u64).await;
        }
        if waited {
            self.shaped.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// One bucket as one direction of one connection uses it.
struct Tap {
    rate: ByteRate,
    cells: Box<dyn Cells>,
    /// Bytes already paid for (whole cells are taken; the rest of the last one is kept for the
    /// next write). Only the one copy direction touches it.
    credit: AtomicU64,
}

impl Tap {
    fn new(rate: ByteRate, cells: Box<dyn Cells>) -> Self {
        Self {
            rate,
            cells,
            credit: AtomicU64::new(0),
        }
    }

    /// Waits until `bytes` may go, in pieces of at most half the burst; true if it had to
    /// wait. Half, because a piece is taken only once the bucket holds all of it: with pieces
    /// as large as the burst the bucket is full at that moment, and whatever it would have
    /// gained while the timer wakes us late (up to a millisecond) is lost — 15 % of the rate
    /// with a 64 KiB burst at 100 Mbit/s.
    async fn take(&self, bytes: u64) -> bool {
        let unit = self.rate.unit;
        let piece = u64::from(self.rate.max_cells.get() / 2).max(1);
        let credit = self.credit.load(Ordering::Relaxed);
        let mut owed = bytes.saturating_sub(credit);
        let mut credit = credit.saturating_sub(bytes);
        let mut waited = false;
        while owed > 0 {
            let cells = owed.div_ceil(unit).min(piece);
            let n = NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX))
                .unwrap_or(NonZeroU32::MIN);
            loop {
                match self.cells.take(n) {
                    Ok(()) => break,
                    Err(wait) => {
                        waited = true;
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            let paid = u64::from(n.get()) * unit;
            credit += paid.saturating_sub(owed);
            owed = owed.saturating_sub(paid);
        }
        self.credit.store(credit, Ordering::Relaxed);
        waited
    }
}
