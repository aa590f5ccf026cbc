//! Giving memory back after start-up and after a burst of connections.
//!
//! Two kinds of pages stay in the agent's RSS once nothing uses them:
//! - heap: glibc's malloc keeps freed memory in its heaps (measured: 5x the idle RSS stayed
//!   after 5,000 connections closed); `malloc_trim` returns the free pages to the system.
//!   mimalloc was tried instead and cost 2.6x the idle RSS (a heap per thread, one thread
//!   per pod namespace).
//! - code: the kernel maps a file's pages in 64 KiB blocks around each fault, so start-up
//!   (parsing the configuration, loading the eBPF object, making certificates) left about
//!   10 MiB of the 17 MB binary mapped, and a bulk load maps more. Dropping the mappings
//!   (`MADV_DONTNEED` on read-only file mappings) leaves the pages in the page cache, where
//!   the kernel may reclaim them; the code the agent runs next maps back in at its next use
//!   (a minor fault while the page is cached). Measured (`cargo xtask bench`): idle RSS
//!   14.3 -> 8 MiB. A first connection after a release runs a little slower while its code
//!   maps back in (microseconds per 64 KiB block).

/// Returns the heap's free pages to the system and drops the mappings of code that is not
/// in use (see the module doc). Takes the arenas' locks for a few milliseconds on a large
/// heap: call it once start-up is done and after connections went away, not on a timer
/// alone.
pub fn release_unused_memory() {
    release_free_memory();
    match release_code_pages() {
        Ok(bytes) => tracing::debug!(bytes, "code pages released"),
        Err(e) => tracing::debug!(error = %e, "code pages not released"),
    }
}

/// Returns the heap's free pages to the system (glibc `malloc_trim(0)`), the heap alone.
#[allow(unsafe_code, reason = "FFI call to glibc's malloc_trim")]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks and trims glibc's own heaps under their locks; it takes
    // no pointer from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops the page-table entries of this process's read-only file mappings that hold no
/// private copy (its own code and constants, libc's). Returns the bytes they had resident.
#[allow(
    unsafe_code,
    reason = "FFI call to madvise on whole read-only mappings"
)]
fn release_code_pages() -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for mapping in read_only_file_mappings(&smaps) {
        // SAFETY: the range is one whole mapping of a file that is read-only and holds no
        // anonymous (copied-on-write) page, so its content is the file's: dropping its
        // page-table entries only makes the next access fault the same bytes in again.
        // madvise takes no pointer into our memory other than the range itself.
        let rc = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                mapping.len,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            released += mapping.rss;
        }
    }
    Ok(released)
}

/// One mapping of `/proc/self/smaps` that [`release_code_pages`] may drop.
#[derive(Debug, PartialEq)]
struct FileMapping {
    start: usize,
    len: usize,
    rss: u64,
}

/// The mappings of `smaps` that are backed by a file, not writable, and hold no anonymous
/// page (a private copy, such as relocated data made read-only after start).
fn read_only_file_mappings(smaps: &str) -> Vec<FileMapping> {
    struct Entry {
        mapping: FileMapping,
        eligible: bool,
        anonymous: Option<u64>,
    }
    let mut entries: Vec<Entry> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        // A mapping's header: `start-end perms offset dev inode [path]`.
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            entries.push(Entry {
                mapping: FileMapping {
                    start,
                    len: end.saturating_sub(start),
                    rss: 0,
                },
                eligible: perms.len() == 4
                    && !perms.contains('w')
                    && path.starts_with('/')
                    && end > start,
                anonymous: None,
            });
            continue;
        }
        // One of its fields: `Name: value kB`.
        let kib = fields.next().and_then(|v| v.parse::<u64>().ok());
        let (Some(entry), Some(kib)) = (entries.last_mut(), kib) else {
            continue;
        };
        match first {
            "Rss:" => entry.mapping.rss = kib * 1024,
            "Anonymous:" => entry.anonymous = Some(kib),
            _ => {}
        }
    }
    entries
        .into_iter()
        .filter(|e| e.eligible && e.anonymous == Some(0))
        .map(|e| e.mapping)
        .collect()
}

/// Decides when a trim is worth it: the open connections fell well below their peak since
/// the last trim, or tunnel connections closed since the last check. A tunnel connection
/// frees its TLS and HTTP/2 buffers when it closes (with bulk streams, up to its flow-control
/// window), and it closes rarely: after its idle timeout, or a second or two after a burst
/// that needed the pool's extra connections, once the burst's own connections have gone.
#[derive(Debug, Default)]
pub struct TrimAfterBurst {
    peak: usize,
    tunnels: usize,
}

impl TrimAfterBurst {
    /// At least this many connections must have gone away since the peak.
    const GONE: usize = 256;

    /// With `open` connections and `tunnels` tunnel connections now (checked at a steady
    /// tick, so at most one trim per tick): whether to trim.
    pub fn should_trim(&mut self, open: usize, tunnels: usize) -> bool {
        self.peak = self.peak.max(open);
        let tunnels_closed = tunnels < self.tunnels;
        self.tunnels = tunnels;
        if self.peak - open >= Self::GONE && open <= self.peak / 2 {
            // The peak restarts from `open`.
            self.peak = open;
            return true;
        }
        tunnels_closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four mappings: code (taken), relocated data made read-only (it has anonymous pages),
    /// writable data, and the vDSO (no file).
    const SMAPS: &str = "\
5644bfa37000-5644c07f0000 r-xp 00326000 fe:00 5431333                    /usr/bin/mesh-agent
Size:              14052 kB
Rss:                8772 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
5644c07f0000-5644c084c000 r--p 010de000 fe:00 5431333                    /usr/bin/mesh-agent
Rss:                 368 kB
Anonymous:           368 kB
5644c084c000-5644c084d000 rw-p 0113a000 fe:00 5431333                    /usr/bin/mesh-agent
Rss:                   4 kB
Anonymous:             0 kB
7ffe625c1000-7ffe625c3000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_read_only_file_mappings_without_private_copies_are_released() {
        assert_eq!(
            read_only_file_mappings(SMAPS),
            vec![FileMapping {
                start: 0x5644bfa37000,
                len: 0x5644c07f0000 - 0x5644bfa37000,
                rss: 8772 * 1024,
            }]
        );
        assert_eq!(read_only_file_mappings(""), vec![]);
        assert_eq!(read_only_file_mappings("garbage\n-\nRss: x kB\n"), vec![]);
    }

    #[test]
    fn released_code_pages_leave_the_rss_and_the_code_runs_on() {
        let resident = || -> u64 {
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            read_only_file_mappings(&smaps).iter().map(|m| m.rss).sum()
        };
        let before = resident();
        assert!(before > 1 << 20, "{before} bytes of code resident");
        let released = release_code_pages().expect("release");
        let after = resident();
        // What ran since (this test, its smaps read, other tests) mapped back in.
        assert!(
            released >= before / 2 && after < before / 2,
            "{before} resident, {released} released, {after} after"
        );
    }

    #[test]
    fn trims_once_after_a_burst_went_away_and_not_under_steady_load() {
        let mut trim = TrimAfterBurst::default();
        // Steady load: never.
        assert!((0..100).all(|_| !trim.should_trim(1000, 0)));
        // Half gone but fewer than 256: not yet.
        let mut small = TrimAfterBurst::default();
        assert!(!small.should_trim(300, 0));
        assert!(!small.should_trim(100, 0));
        // A burst of 5,000 closes: once, then not again at the same level.
        assert!(!trim.should_trim(5000, 0));
        assert!(!trim.should_trim(4000, 0));
        assert!(trim.should_trim(10, 0));
        assert!(!trim.should_trim(10, 0));
        assert!(!trim.should_trim(0, 0));
    }

    #[test]
    fn trims_when_tunnel_connections_close() {
        let mut trim = TrimAfterBurst::default();
        assert!(!trim.should_trim(5000, 20));
        assert!(trim.should_trim(0, 20), "the burst's connections went");
        assert!(!trim.should_trim(0, 20), "the tunnels are still open");
        assert!(trim.should_trim(0, 12), "some closed");
        assert!(trim.should_trim(0, 1), "the rest closed");
        assert!(!trim.should_trim(0, 1));
        assert!(!trim.should_trim(8, 2), "opening");
        assert!(
            trim.should_trim(0, 1),
            "a bulk transfer's extra connection closed"
        );
        assert!(!trim.should_trim(0, 1));
    }
}
