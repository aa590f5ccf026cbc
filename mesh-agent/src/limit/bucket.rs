//! The token buckets, on `governor`'s GCRA: a bucket is one atomic word (its "theoretical
//! arrival time"), so taking from it is a compare-and-swap, never a lock held across anything;
//! a keyed bucket is that word in a sharded map (`DashMap`). A bucket nobody took from for one
//! replenish interval past full holds no information, which is what lets eviction drop it.
//!
//! Waiting is ours, not governor's `until_ready`: that future waits without bound on its own
//! timer thread, while a connection may wait only up to its policy's `maxWait` — and when the
//! bucket already says the token comes later than that, refusing at once beats holding the
//! connection for nothing. So a check returns how long until the cells are there, and
//! [`wait_for`] sleeps on the runtime's timer.
//!
//! Bytes are counted in cells of `unit` bytes, `unit` chosen so a cell takes at least a
//! microsecond to replenish: governor's interval is whole nanoseconds, which at 1 GB/s would
//! be off by up to 100 %, and is off by at most 0.1 % this way. The rounding of a write to
//! whole cells is paid back on the next write of the same connection (see `shaper`).

use std::{hash::Hash, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    NotUntil, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    state::{InMemoryState, NotKeyed, keyed::DashMapStateStore},
};
use tokio::time::{Instant, sleep_until};

use crate::config::{Bandwidth, Rate};

/// One bucket shared by all its users.
pub(super) type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;
/// One bucket per key.
pub(super) type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, DefaultClock>;

/// Byte buckets replenish at most this many cells per second (see the module docs).
const MAX_CELLS_PER_SECOND: u64 = 1_000_000;

pub(super) const ONE: NonZeroU32 = NonZeroU32::MIN;

/// The quota of a connection rate. Validation refuses 0; it would be read as 1.
pub(super) fn connection_quota(rate: &Rate) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// How a bandwidth maps to cells.
#[derive(Debug, Clone, Copy)]
pub(super) struct ByteRate {
    /// Bytes per cell.
    pub(super) unit: u64,
    /// The burst in cells: the most one take may ask for.
    pub(super) max_cells: NonZeroU32,
    quota: Quota,
}

impl ByteRate {
    pub(super) fn new(bandwidth: &Bandwidth) -> Self {
        let per_second = bandwidth.bytes_per_second.max(1);
        let unit = per_second.div_ceil(MAX_CELLS_PER_SECOND);
        // At least 1 000 ns (see the module docs), so the truncation costs at most 0.1 %.
        let period = u64::try_from(u128::from(unit) * 1_000_000_000 / u128::from(per_second))
            .unwrap_or(u64::MAX)
            .max(1);
        let cells = (bandwidth.burst_bytes / unit).clamp(1, u64::from(u32::MAX));
        let max_cells =
            NonZeroU32::new(u32::try_from(cells).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(Duration::from_nanos(period))
            .unwrap_or(Quota::per_second(NonZeroU32::MAX))
            .allow_burst(max_cells);
        Self {
            unit,
            max_cells,
            quota,
        }
    }

    pub(super) fn bucket(&self) -> Arc<Direct> {
        Arc::new(RateLimiter::direct(self.quota))
    }

    pub(super) fn keyed<K: Hash + Eq + Clone>(&self) -> Arc<Keyed<K>> {
        Arc::new(RateLimiter::dashmap(self.quota))
    }
}

/// The same per direction: bandwidth limits apply to each way on its own.
#[derive(Debug)]
pub(super) struct Duplex<T> {
    /// From the side that opened the connection.
    pub(super) to_server: T,
    pub(super) to_client: T,
}

impl<T> Duplex<T> {
    pub(super) fn new(mut make: impl FnMut() -> T) -> Self {
        Self {
            to_server: make(),
            to_client: make(),
        }
    }
}

fn wait_time(not_until: &NotUntil<<DefaultClock as Clock>::Instant>) -> Duration {
    not_until.wait_time_from(DefaultClock::default().now())
}

/// Takes `n` cells of `bucket` now, or says how long until they are there. `n` above the
/// burst passes: callers cut their requests at the burst.
pub(super) fn take(bucket: &Direct, n: NonZeroU32) -> Result<(), Duration> {
    match bucket.check_n(n) {
        Ok(Ok(())) | Err(_) => Ok(()),
        Ok(Err(not_until)) => Err(wait_time(&not_until)),
    }
}

/// The same from `key`'s bucket.
pub(super) fn take_keyed<K: Hash + Eq + Clone>(
    bucket: &Keyed<K>,
    key: &K,
    n: NonZeroU32,
) -> Result<(), Duration> {
    match bucket.check_key_n(key, n) {
        Ok(Ok(())) | Err(_) => Ok(()),
        Ok(Err(not_until)) => Err(wait_time(&not_until)),
    }
}

/// Drops the keys whose buckets are full again (a fresh bucket is the same), and gives the
/// memory back when that removed any. Returns how many keys are left.
pub(super) fn evict<K: Hash + Eq + Clone>(bucket: &Keyed<K>) -> usize {
    let before = bucket.len();
    bucket.retain_recent();
    let after = bucket.len();
    if after < before {
        bucket.shrink_to_fit();
    }
    after
}

/// Cells of one bucket for one user, as a connection's shaper holds them.
pub(super) trait Cells: Send + Sync {
    fn take(&self, n: NonZeroU32) -> Result<(), Duration>;
}

impl Cells for Arc<Direct> {
    fn take(&self, n: NonZeroU32) -> Result<(), Duration> {
        take(self, n)
    }
}

impl<K: Hash + Eq + Clone + Send + Sync> Cells for (Arc<Keyed<K>>, K) {
    fn take(&self, n: NonZeroU32) -> Result<(), Duration> {
        take_keyed(&self.0, &self.1, n)
    }
}

/// Takes with `take` until it succeeds (true) or the next chance is past `deadline` (false);
/// without a deadline only once. Holds nothing while it sleeps.
pub(super) async fn wait_for(
    take: impl Fn() -> Result<(), Duration>,
    deadline: Option<Instant>,
) -> bool {
    loop {
        let wait = match take() {
            Ok(()) => return true,
            Err(wait) => wait,
        };
        let Some(deadline) = deadline else {
            return false;
        };
        let ready = Instant::now() + wait;
        if ready > deadline {
            return false;
        }
        sleep_until(ready).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::ByteRate;
    use crate::config::Bandwidth;

    #[test]
    fn byte_cells_replenish_at_the_rate_within_a_thousandth() {
        for per_second in [1, 1_000, 999_999, 12_500_000, 1_250_000_000, 40_000_000_000] {
            let rate = ByteRate::new(&Bandwidth {
                bytes_per_second: per_second,
                burst_bytes: per_second.max(65_536),
            });
            let period = rate.quota.replenish_interval();
            assert!(
                period >= Duration::from_micros(1),
                "{per_second} B/s: {period:?}"
            );
            let actual = rate.unit as f64 / period.as_secs_f64();
            let error = (actual - per_second as f64).abs() / per_second as f64;
            assert!(error <= 0.001, "{per_second} B/s: {actual} ({error})");
            assert!(u64::from(rate.max_cells.get()) * rate.unit <= per_second.max(65_536));
        }
    }
}
