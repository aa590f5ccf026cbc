//! Deterministic pseudo-random payloads, so a sender, a checker and a test
//! can all produce the same bytes (and SHA-256) without sharing a file.

use sha2::{Digest as _, Sha256};

/// Seed used by `mesh-testtool send` and `echo`.
pub const SEED: u64 = 0x6d65_7368_7465_7374; // "meshtest"

/// An endless deterministic byte stream (xorshift64*).
#[derive(Debug, Clone)]
pub struct Payload {
    state: u64,
}

impl Payload {
    /// A stream starting from `seed` (0 is mapped to a non-zero state).
    pub fn new(seed: u64) -> Self {
        Self {
            state: if seed == 0 {
                0x9e37_79b9_7f4a_7c15
            } else {
                seed
            },
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `buf` with the next bytes of the stream.
    ///
    /// Chunk boundaries do not matter only if callers fill in multiples of 8;
    /// all users here use fixed chunk sizes that are multiples of 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Chunk size used when streaming payloads (a multiple of 8).
pub const CHUNK: usize = 64 * 1024;

/// Calls `f` with consecutive chunks of the first `n` payload bytes.
pub fn for_each_chunk(
    seed: u64,
    n: u64,
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut p = Payload::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let len = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        p.fill(&mut buf[..len]);
        f(&buf[..len])?;
        left -= len as u64;
    }
    Ok(())
}

/// Lower-case hex SHA-256 of the first `n` payload bytes.
pub fn sha256_hex(seed: u64, n: u64) -> String {
    let mut h = Sha256::new();
    // The closure never fails.
    let _ = for_each_chunk(seed, n, |c| {
        h.update(c);
        Ok(())
    });
    hex(&h.finalize())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_chunking_independent_in_multiples_of_8() {
        let mut a = Payload::new(SEED);
        let mut whole = vec![0u8; 64];
        a.fill(&mut whole);
        let mut b = Payload::new(SEED);
        let mut parts = vec![0u8; 64];
        b.fill(&mut parts[..16]);
        b.fill(&mut parts[16..]);
        assert_eq!(whole, parts);
        assert_eq!(sha256_hex(SEED, 100_000), sha256_hex(SEED, 100_000));
        assert_ne!(sha256_hex(SEED, 10), sha256_hex(SEED, 11));
    }

    #[test]
    fn sha_of_empty() {
        assert_eq!(
            sha256_hex(SEED, 0),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
