//! A hash map split into shards behind shared pointers, for the snapshot's large lookups.
//!
//! Snapshots are immutable and a new one follows every change; with tens of thousands of
//! services, copying a whole lookup for a change of one endpoint would cost more than the
//! change. Here the next snapshot's map shares every shard with the last but the few its
//! changes touch (copied on first write), so a change costs in proportion to itself. A read
//! hashes once more to find the shard.

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use foldhash::HashMap;
use foldhash::fast::FixedState;

/// Shards per map: a change copies about `len / SHARDS` entries per key it touches.
const SHARDS: usize = 256;
/// Picks the shard; fixed, so that a key stays in its shard from one snapshot to the next.
const SHARD_SEED: u64 = 0x6d65_7368_2d73_6864;

#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    shards: Arc<[Arc<HashMap<K, V>>]>,
}

fn shard_of<K: Hash>(key: &K) -> usize {
    // The top bits: the inner maps use the low ones.
    (FixedState::with_seed(SHARD_SEED).hash_one(key) >> 56) as usize % SHARDS
}

impl<K: Hash + Eq + Clone, V: Clone> ShardedMap<K, V> {
    pub fn get(&self, key: &K) -> Option<&V> {
        // Every map has `SHARDS` shards (made only by `Patch::done`).
        self.shards[shard_of(key)].get(key)
    }

    /// A copy sharing every shard with `self`, to change through [`Patch`].
    pub fn patch(&self) -> Patch<K, V> {
        Patch {
            shards: self.shards.to_vec(),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Patch {
            shards: (0..SHARDS).map(|_| Arc::default()).collect(),
        }
        .done()
    }
}

/// A map being changed: a shard is copied the first time one of its keys is written.
pub struct Patch<K, V> {
    shards: Vec<Arc<HashMap<K, V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> Patch<K, V> {
    /// The entries of `key`'s shard, copied if still shared.
    pub fn shard(&mut self, key: &K) -> &mut HashMap<K, V> {
        Arc::make_mut(&mut self.shards[shard_of(key)])
    }

    pub fn done(self) -> ShardedMap<K, V> {
        ShardedMap {
            shards: self.shards.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_copies_only_the_shards_it_writes_and_leaves_the_original_as_it_was() {
        let mut patch = ShardedMap::<u32, u32>::default().patch();
        for k in 0..10_000 {
            patch.shard(&k).insert(k, k);
        }
        let first = patch.done();
        let mut patch = first.patch();
        patch.shard(&7).insert(7, 70);
        patch.shard(&8).remove(&8);
        let second = patch.done();

        assert_eq!((first.get(&7), first.get(&8)), (Some(&7), Some(&8)));
        assert_eq!((second.get(&7), second.get(&8)), (Some(&70), None));
        assert_eq!(second.get(&9_999), Some(&9_999));
        let shared = first
            .shards
            .iter()
            .zip(second.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        let touched = if shard_of(&7) == shard_of(&8) { 1 } else { 2 };
        assert_eq!(shared, SHARDS - touched);
    }
}
