//! What one bench run is made of: its durations and sizes ([`Profile`]) and the binaries it
//! runs ([`Bins`]).

use std::path::PathBuf;

use serde_json::{Value, json};

/// Durations and sizes of one run.
#[derive(Clone, Copy, Debug)]
pub struct Profile {
    pub warmup_s: f64,
    pub rr_s: f64,
    pub rr_rate: u64,
    pub rr_conns: usize,
    pub pingpong_s: f64,
    pub bulk_s: f64,
    pub cps_s: f64,
    pub cps_threads: usize,
    /// Connections per cps run, kept under the client netns's TIME_WAIT comfort zone.
    pub cps_max: u64,
    /// Idle connections held open through the agents, for the memory one costs.
    pub idle_conns: usize,
    /// Rounds of the feature on / off comparison (see `on_off`).
    pub on_off_rounds: usize,
    /// Connections of each of its cps runs, after `on_off_warm_conns` unmeasured ones.
    pub on_off_conns: u64,
    pub on_off_warm_conns: u64,
    /// Seconds of each of its bulk runs (1 stream).
    pub on_off_bulk_s: f64,
}

impl Profile {
    pub fn new(quick: bool, rate: u64) -> Self {
        let (warmup_s, rr_s, pingpong_s, bulk_s, cps_s) = if quick {
            (0.3, 2.0, 1.5, 1.5, 1.5)
        } else {
            (1.0, 15.0, 8.0, 8.0, 5.0)
        };
        Profile {
            warmup_s,
            rr_s,
            rr_rate: rate,
            rr_conns: 8,
            pingpong_s,
            bulk_s,
            cps_s,
            cps_threads: 4,
            cps_max: 9_000,
            idle_conns: if quick { 1_000 } else { 5_000 },
            on_off_rounds: if quick { 1 } else { 3 },
            on_off_conns: if quick { 1_500 } else { 5_000 },
            on_off_warm_conns: if quick { 300 } else { 1_000 },
            on_off_bulk_s: if quick { 1.0 } else { 3.0 },
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "warmup_s": self.warmup_s,
            "rr_s": self.rr_s,
            "rr_rate": self.rr_rate,
            "rr_conns": self.rr_conns,
            "rr_size": 1024,
            "idle_conns": self.idle_conns,
            "pingpong_s": self.pingpong_s,
            "bulk_s": self.bulk_s,
            "cps_s": self.cps_s,
            "cps_threads": self.cps_threads,
            "cps_max": self.cps_max,
            "on_off_rounds": self.on_off_rounds,
            "on_off_conns": self.on_off_conns,
            "on_off_warm_conns": self.on_off_warm_conns,
            "on_off_bulk_s": self.on_off_bulk_s,
        })
    }
}

/// The release binaries a run uses.
pub struct Bins {
    pub agent: PathBuf,
    pub loadgen: PathBuf,
}
