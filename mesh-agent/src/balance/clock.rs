//! Time for the balancers, as nanoseconds since a process-wide origin: one `u64` fits in an
//! atomic (ejection deadlines, retry-budget seconds), and tests move it forward without
//! sleeping (a per-thread offset, so parallel tests do not see each other's time).

use std::{
    sync::OnceLock,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

static ORIGIN: OnceLock<Instant> = OnceLock::new();

pub(super) const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Nanoseconds since the origin (never 0 after the first call, so 0 can mean "never").
pub(super) fn now() -> u64 {
    let origin = *ORIGIN.get_or_init(Instant::now);
    let elapsed = u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    elapsed.saturating_add(1).saturating_add(test_offset())
}

/// `at` (a value of [`now`]) as seconds since the Unix epoch, for status.
pub(super) fn unix_seconds(at: u64) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let current = now();
    let at = if at >= current {
        wall + Duration::from_nanos(at - current)
    } else {
        wall.saturating_sub(Duration::from_nanos(current - at))
    };
    at.as_secs()
}

/// `duration` in the clock's unit, saturating.
pub(super) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(not(test))]
fn test_offset() -> u64 {
    0
}

#[cfg(test)]
thread_local! {
    static OFFSET: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg(test)]
fn test_offset() -> u64 {
    OFFSET.with(std::cell::Cell::get)
}

/// Moves this thread's clock forward.
#[cfg(test)]
pub(super) fn advance(by: Duration) {
    OFFSET.with(|offset| offset.set(offset.get().saturating_add(nanos(by))));
}
