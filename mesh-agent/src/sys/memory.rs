//! Giving memory back after a burst of connections. glibc's malloc keeps freed memory in its
//! heaps (measured: 5x the idle RSS stayed after 5,000 connections closed); `malloc_trim`
//! returns the free pages to the system. mimalloc was tried instead and cost 2.6x the idle
//! RSS (a heap per thread, one thread per pod namespace).

/// Returns the heap's free pages to the system (glibc `malloc_trim(0)`). Takes the arenas'
/// locks for a few milliseconds on a large heap: call it after connections went away, not
/// on a timer alone.
#[allow(unsafe_code, reason = "FFI call to glibc's malloc_trim")]
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks and trims glibc's own heaps under their locks; it takes
    // no pointer from us and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
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
        release_free_memory();
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
