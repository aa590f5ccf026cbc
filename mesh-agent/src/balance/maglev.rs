//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of prime size
//! `M >= 100 x N` (65,537 up to 655 endpoints) in which each of the N endpoints takes turns claiming the next free slot of
//! its own permutation of the slots. Every endpoint holds `M/N` slots (±1), a source maps to
//! `table[hash % M]`, and removing one endpoint only hands its own slots (about 1/N of the
//! sources) to others: the other endpoints' permutations do not depend on it.
//!
//! Hashes are a fixed function of the bytes (FNV-1a, then a 64-bit finalizer), not a
//! per-process random one: the table is the same after a restart, and on every node.

use std::net::{IpAddr, SocketAddr};

use crate::tls::SpiffeId;

/// A built table: each slot holds an index into the service port's endpoints.
pub(super) struct Table {
    slots: Vec<u32>,
}

impl Table {
    /// The table for `members` (indices of endpoints, with their addresses). Building order
    /// is by address, so the same set always gives the same table.
    pub(super) fn build(members: &[(u32, SocketAddr)]) -> Self {
        let mut members = members.to_vec();
        members.sort_by_key(|(_, addr)| *addr);
        let n = members.len();
        if n == 0 {
            return Self { slots: Vec::new() };
        }
        let size = table_size(n);
        let m = size as u64;
        // (offset, skip) of each endpoint's permutation: slot j is (offset + j*skip) % M.
        let permutations: Vec<(u64, u64)> = members
            .iter()
            .map(|(_, addr)| {
                let key = addr_key(*addr);
                let offset = hash(&key, 0x4d61_676c) % m;
                let skip = hash(&key, 0x6c65_7621) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; n];
        const EMPTY: u32 = u32::MAX;
        let mut slots = vec![EMPTY; size];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in permutations.iter().enumerate() {
                loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if slots[slot] == EMPTY {
                        slots[slot] = members[i].0;
                        break;
                    }
                }
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Self { slots }
    }

    /// The endpoint for `key_hash`, or the first one onward in the table that `usable`
    /// accepts (a source whose endpoint is unavailable spills over to the next slots' owners,
    /// and comes back when it is available again).
    pub(super) fn lookup(&self, key_hash: u64, usable: impl Fn(u32) -> bool) -> Option<u32> {
        let size = self.slots.len();
        if size == 0 {
            return None;
        }
        let start = (key_hash % size as u64) as usize;
        let (tail, head) = (self.slots.get(start..)?, self.slots.get(..start)?);
        tail.iter().chain(head).copied().find(|&i| usable(i))
    }
}

/// The table size for `n` endpoints: the smallest prime above 65,536 x 2^k that is at least
/// 100 x `n` (each endpoint holds ~100 slots or more, so shares differ by about 1%). The size
/// must not follow every change of `n`: another size maps every source anew. So it is 65,537
/// up to 655 endpoints, and steps up (moving most sources, once) only when the count crosses
/// 655, 1,310, 2,621...
pub(super) fn table_size(n: usize) -> usize {
    let mut base: usize = 1 << 16;
    while base < n.saturating_mul(100) {
        base = base.saturating_mul(2);
    }
    let mut candidate = base + 1;
    while !is_prime(candidate) {
        candidate += 2;
    }
    candidate
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// What the caller is hashed on: its IP, or its identity.
pub(super) fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash(&v4.octets(), 0),
        IpAddr::V6(v6) => hash(&v6.octets(), 0),
    }
}

pub(super) fn hash_identity(id: &SpiffeId) -> u64 {
    let mut h = Fnv::new(0);
    for part in [id.trust_domain(), id.namespace(), id.service_account()] {
        h.write(part.as_bytes());
        h.write(b"/");
    }
    h.finish()
}

/// A second, independent hash of the same key (for a choice made beside the table's).
pub(super) fn rehash(h: u64) -> u64 {
    mix(h ^ 0x9e37_79b9_7f4a_7c15)
}

fn addr_key(addr: SocketAddr) -> Vec<u8> {
    let mut key = match addr.ip().to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    key.extend_from_slice(&addr.port().to_be_bytes());
    key
}

fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = Fnv::new(seed);
    h.write(bytes);
    h.finish()
}

struct Fnv(u64);

impl Fnv {
    fn new(seed: u64) -> Self {
        Self(0xcbf2_9ce4_8422_2325 ^ mix(seed))
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// The splitmix64 finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u32) -> Vec<(u32, SocketAddr)> {
        (0..n)
            .map(|i| {
                (
                    i,
                    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8], 80)),
                )
            })
            .collect()
    }

    #[test]
    fn table_sizes_are_primes_at_least_100_per_endpoint_and_step_rarely() {
        assert_eq!(table_size(1), 65537);
        assert_eq!(table_size(655), 65537);
        assert_eq!(table_size(656), 131_101);
        assert_eq!(table_size(1000), 131_101);
        assert_eq!(table_size(1311), 262_147);
    }

    #[test]
    fn every_endpoint_holds_its_share_of_slots() {
        let table = Table::build(&members(10));
        let mut held = [0usize; 10];
        for slot in &table.slots {
            held[*slot as usize] += 1;
        }
        // 65537 slots: 6553 or 6554 each.
        assert!(held.iter().all(|h| (6553..=6554).contains(h)), "{held:?}");
    }

    #[test]
    fn the_table_does_not_depend_on_the_order_of_the_endpoints() {
        let mut reversed = members(20);
        reversed.reverse();
        assert_eq!(
            Table::build(&members(20)).slots,
            Table::build(&reversed).slots
        );
    }
}
