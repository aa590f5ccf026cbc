//! What a proxy process costs, read from /proc: resident memory and CPU time.

use std::fs;

use anyhow::{Context, Result, bail};

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// RssAnon of `pid` in KiB: the resident memory that is the process's own (heap, stacks),
/// without the pages of its binary and libraries (file-backed, shared with the page cache).
pub fn anon_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "RssAnon")
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of `pid` (all its threads) in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let Some((_, after)) = stat.rsplit_once(')') else {
        bail!("malformed /proc/{pid}/stat");
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is 11 and stime (15) is 12.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("malformed /proc/{pid}/stat"))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(total as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        _ => 100.0,
    }
}

/// Sum over `pids` of [`rss_kib`]; pids that vanished count zero.
pub fn total_rss_kib(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|pid| rss_kib(*pid).ok()).sum()
}

/// Sum over `pids` of [`cpu_seconds`].
pub fn total_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| cpu_seconds(*pid).ok()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        let (rss, anon) = (rss_kib(pid).expect("rss"), anon_kib(pid).expect("anon"));
        assert!(rss > 0 && anon > 0 && anon < rss, "{anon} of {rss} KiB");
        assert!(cpu_seconds(pid).expect("cpu") >= 0.0);
    }
}
