//! The live state of one endpoint: load, connect latency, failure streak, ejection, health.
//! Shared (`Arc`) by every picker built for its service port, so a config reload that
//! rebuilds the picker keeps it, matched by address.
//!
//! The counters are atomics read on every pick. The flags that decide availability
//! (ejection, health, retirement) change only under the service port's lock
//! ([`super::service`]), which also keeps the count of flagged endpoints that lets a pick
//! skip scanning when nothing is flagged.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;

use crate::config::CircuitBreaker;

/// Time constant of the latency average's decay: an observation weighs `e^(-Δt/τ)` less
/// after Δt, and an estimate not refreshed decays toward zero with it, so an endpoint that
/// was slow is tried again after a while (τ = 10 s, as Finagle and Linkerd use).
pub(super) const DECAY: f64 = 10.0e9;

/// The estimate of an endpoint never measured: 5 ms, a little pessimistic for a connect in a
/// cluster (~0.1-2 ms). A new endpoint is not flooded before its first measurement, and
/// still gets traffic when the others are busy or as the estimate decays.
pub(super) const INITIAL_ESTIMATE: f64 = 5.0e6;

pub(super) struct EndpointStats {
    /// Connections open (connected, guard not yet dropped).
    pub(super) active: AtomicU32,
    /// Connects in flight.
    pub(super) pending: AtomicU32,
    /// Failures in a row (connect failures and resets before a reply).
    pub(super) streak: AtomicU32,
    /// Ejections so far (each lasts twice the previous, up to the maximum).
    pub(super) ejections: AtomicU32,
    /// Clock value the current ejection ends at; 0: not ejected. A past value not yet
    /// cleared is an ejection that expired (cleared by the next scan).
    pub(super) ejected_until: AtomicU64,
    /// Marked down by the active health checker.
    pub(super) unhealthy: AtomicBool,
    /// Dropped from its service port by a reload: late outcomes change nothing.
    pub(super) retired: AtomicBool,
    latency: Mutex<Ewma>,
}

/// Peak-sensitive, decaying average of connect latency, in nanoseconds.
struct Ewma {
    estimate: f64,
    /// Clock value of the last update.
    at: u64,
    measured: bool,
}

impl EndpointStats {
    /// Fresh stats at `now` (the endpoints of one reload share it, so their initial
    /// estimates stay exactly equal and ties between them are broken at random).
    pub(super) fn new(now: u64) -> Self {
        Self {
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            streak: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            unhealthy: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            latency: Mutex::new(Ewma {
                estimate: INITIAL_ESTIMATE,
                at: now,
                measured: false,
            }),
        }
    }

    /// Active connections plus connects in flight.
    pub(super) fn load(&self) -> u32 {
        self.active
            .load(Relaxed)
            .saturating_add(self.pending.load(Relaxed))
    }

    /// Peak-EWMA cost: the latency estimate at `now` times (load + 1).
    pub(super) fn cost(&self, now: u64) -> f64 {
        self.latency(now) * (f64::from(self.load()) + 1.0)
    }

    /// The latency estimate at `now`, decayed since its last update (nanoseconds).
    pub(super) fn latency(&self, now: u64) -> f64 {
        let ewma = self.latency.lock();
        ewma.estimate * decay(ewma.at, now)
    }

    pub(super) fn measured(&self) -> bool {
        self.latency.lock().measured
    }

    /// A connect took `latency` (ns): a value above the current estimate replaces it at once
    /// (peak), a lower one is averaged in with the weight the time since the last update
    /// gives it.
    pub(super) fn observe(&self, latency: f64, now: u64) {
        let mut ewma = self.latency.lock();
        let w = decay(ewma.at, now);
        ewma.estimate = if latency > ewma.estimate * w {
            latency
        } else {
            ewma.estimate * w + latency * (1.0 - w)
        };
        ewma.at = ewma.at.max(now);
        ewma.measured = true;
    }

    /// Ejected at `now` (a deadline in the past is not an ejection any more).
    pub(super) fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// An ejection that ended, still to be cleared.
    pub(super) fn expired(&self, now: u64) -> bool {
        let until = self.ejected_until.load(Relaxed);
        until != 0 && until <= now
    }

    /// Neither ejected nor unhealthy, and under the per-endpoint circuit limits.
    pub(super) fn available(&self, now: u64, limits: &CircuitBreaker) -> bool {
        !self.ejected(now)
            && !self.unhealthy.load(Relaxed)
            && limits
                .max_connections_per_endpoint
                .is_none_or(|max| self.active.load(Relaxed) < max)
            && limits
                .max_pending_per_endpoint
                .is_none_or(|max| self.pending.load(Relaxed) < max)
    }
}

/// The weight left after `since` -> `now`: `e^(-Δt/τ)`.
fn decay(since: u64, now: u64) -> f64 {
    let elapsed = now.saturating_sub(since) as f64;
    (-elapsed / DECAY).exp()
}
