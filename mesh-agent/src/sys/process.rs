//! Which process is which, across PID namespaces: a process's start time (clock ticks since
//! boot, `/proc/<pid>/stat` field 22) is the same seen from any namespace, so it tells
//! whether the agent that answered a request is a given process.

use std::io;

/// The start time of `/proc/<pid>` (`self` for this process), in clock ticks since boot.
pub fn start_ticks(pid: &str) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // The command (field 2) may hold spaces and parentheses: count fields after the last ')'.
    // Field 3 (state) is then the first, so field 22 (starttime) is the 20th.
    let (_, after) = stat.rsplit_once(')')?;
    after.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_field_22_whatever_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 987654 1 2";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("42 (x) S 1"), None);
        let own = start_ticks("self").expect("own stat");
        assert!(own > 0);
        assert_eq!(start_ticks(&std::process::id().to_string()).ok(), Some(own));
    }
}
