//! `--perf PHASE`: a CPU profile of the path's proxies during one phase of the run, so
//! "where does the time go" is answered on the same workload the figures come from.
//! `perf record` (call graphs, cpu-clock: it works where hardware counters do not) writes
//! `OUT/perf-<path>-<phase>.data`; read it with `perf report -i FILE --no-children`. The
//! profiler takes CPU of its own: that phase's figures are not comparable with other runs.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The phases a profile can cover.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Rr,
    Pingpong,
    Bulk,
    Cps,
}

/// Which phase to profile, and where the profiles go.
#[derive(Clone, Debug)]
pub struct Perf {
    pub phase: Phase,
    pub out: PathBuf,
}

impl Perf {
    /// Starts recording `pids` if `phase` is the one asked for; the recording ends when the
    /// returned value is dropped.
    pub fn record(&self, phase: Phase, path: &str, pids: &[u32]) -> Result<Option<Recording>> {
        if phase != self.phase || pids.is_empty() {
            return Ok(None);
        }
        let name = format!("{phase:?}").to_lowercase();
        let file = self.out.join(format!("perf-{path}-{name}.data"));
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-F", "999", "-g", "-o"])
            .arg(&file)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (apt-get install linux-perf)")?;
        eprintln!("bench: recording {name} into {}", file.display());
        Ok(Some(Recording(child)))
    }
}

/// A running `perf record`; dropping it stops it (SIGINT, so it writes its file) and waits.
pub struct Recording(Child);

impl Drop for Recording {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let _ = self.0.wait();
    }
}
