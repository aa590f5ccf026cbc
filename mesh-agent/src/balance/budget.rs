//! The retry budget of a service port: over the last 10 s, retries may be at most
//! `max(budget_percent % of first attempts, min_retries_per_second x 10)`. Retrying only
//! within a budget keeps a failing service from being hit by `attempts + 1` times its load
//! (a retry storm), while the floor lets a quiet service still retry.
//!
//! Ten one-second buckets of atomics (no lock on the pick path). A bucket is reused for a new
//! second by whoever first sees it is stale; increments racing with that reset may be lost,
//! so the counts are exact for one caller at a time and approximate under contention, which
//! a budget tolerates.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use super::clock::NANOS_PER_SECOND;
use crate::config::Retries;

/// The window, in one-second buckets.
const SECONDS: u64 = 10;

#[derive(Default)]
pub(super) struct RetryBudget {
    buckets: [Bucket; SECONDS as usize],
    /// Retries refused by the budget, ever.
    refused: AtomicU64,
}

#[derive(Default)]
struct Bucket {
    /// The second (clock seconds + 1; 0: never used) the counts are for.
    second: AtomicU64,
    firsts: AtomicU64,
    retries: AtomicU64,
}

/// The budget's use, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudgetStatus {
    /// First attempts in the last 10 s.
    pub first_attempts: u64,
    /// Retries in the last 10 s.
    pub retries: u64,
    /// Retries the budget allows in the window now.
    pub allowed: u64,
    /// Retries refused by the budget since the service port appeared.
    pub refused: u64,
}

impl RetryBudget {
    pub(super) fn first_attempt(&self, now: u64) {
        self.bucket(now).firsts.fetch_add(1, Relaxed);
    }

    /// Counts a retry and says yes when one more fits `policy`'s budget.
    pub(super) fn try_retry(&self, policy: &Retries, now: u64) -> bool {
        let (firsts, retries) = self.window(now);
        if retries < allowed(policy, firsts) {
            self.bucket(now).retries.fetch_add(1, Relaxed);
            true
        } else {
            self.refused.fetch_add(1, Relaxed);
            false
        }
    }

    pub(super) fn status(&self, policy: &Retries, now: u64) -> RetryBudgetStatus {
        let (first_attempts, retries) = self.window(now);
        RetryBudgetStatus {
            first_attempts,
            retries,
            allowed: allowed(policy, first_attempts),
            refused: self.refused.load(Relaxed),
        }
    }

    /// The bucket of `now`'s second, emptied if it held an older second.
    fn bucket(&self, now: u64) -> &Bucket {
        let second = now / NANOS_PER_SECOND + 1;
        let bucket = &self.buckets[(second % SECONDS) as usize];
        let seen = bucket.second.load(Relaxed);
        if seen != second
            && bucket
                .second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            bucket.firsts.store(0, Relaxed);
            bucket.retries.store(0, Relaxed);
        }
        bucket
    }

    /// (first attempts, retries) of the last 10 seconds, this one included.
    fn window(&self, now: u64) -> (u64, u64) {
        let second = now / NANOS_PER_SECOND + 1;
        self.buckets
            .iter()
            .filter(|b| second.saturating_sub(b.second.load(Relaxed)) < SECONDS)
            .fold((0, 0), |(firsts, retries), b| {
                (
                    firsts + b.firsts.load(Relaxed),
                    retries + b.retries.load(Relaxed),
                )
            })
    }
}

fn allowed(policy: &Retries, firsts: u64) -> u64 {
    let share = firsts.saturating_mul(u64::from(policy.budget_percent)) / 100;
    let floor = u64::from(policy.min_retries_per_second).saturating_mul(SECONDS);
    share.max(floor)
}
