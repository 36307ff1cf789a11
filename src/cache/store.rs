//! Where entries are kept: the [`Store`] seam, and [`MemoryStore`], the in-process store on
//! `quick_cache` (a concurrent, sharded cache bounded by weight, with a scan-resistant
//! CLOCK-Pro policy); and [`SharedStore`], the second level shared between instances (Redis,
//! in `fleet/cache.rs`), looked in after a local miss.
//!
//! The memory budget counts both the entries and the answers still being recorded: a recording
//! reserves its bytes as they arrive, and the entries' share shrinks by as much (entries are
//! evicted to make room). Recordings together may hold at most a quarter of the budget, so
//! the entries always keep three quarters.

use super::{Entry, EntryKey};
use async_trait::async_trait;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Milliseconds since the epoch.
type Millis = u64;

/// A store that could not answer (a connection down, an entry that does not decode). The
/// request goes on as a miss.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fault(pub String);

/// What a store holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Bytes counted against the budget: entries and recordings.
    pub bytes: u64,
    /// Of those, bytes reserved by answers still being recorded.
    pub recording_bytes: u64,
    /// Entries held.
    pub entries: u64,
    /// The budget (`cache.max_megabytes`).
    pub capacity: u64,
}

/// Where entries are kept. Every method may fail with a [`Fault`], which the caller turns into
/// a miss; none may block for long (a remote store has its own timeouts).
#[async_trait]
pub trait Store: Send + Sync {
    /// The entry stored under `key`, if there is one younger than the store's TTL at `now`.
    async fn get(&self, key: &EntryKey, now: Millis) -> Result<Option<Arc<Entry>>, Fault>;
    /// Stores `entry` under `key`, replacing any older one. An entry the store cannot take (too
    /// large) is dropped without an error.
    async fn put(&self, key: EntryKey, entry: Arc<Entry>) -> Result<(), Fault>;
    /// Removes every entry (`tenant` None) or every entry of one tenant; returns how many went.
    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault>;
    /// Reserves `bytes` more of this process's memory budget for an answer being recorded;
    /// false when the budget for recordings is spent (the answer is then not stored).
    fn reserve(&self, bytes: u64) -> bool;
    /// Gives back `bytes` a recording reserved.
    fn release(&self, bytes: u64);
    /// What the store holds now.
    fn usage(&self) -> Usage;
}

/// The second level: a store shared between instances, behind this process's [`MemoryStore`].
/// It is asked only after a local miss and written without waiting, so a hit from memory costs
/// what it did without it. None of its faults is the caller's problem: a store that cannot
/// answer in time, or holds a value keygate did not write, answers "not found" (and says so
/// once in the log).
#[async_trait]
pub trait SharedStore: Send + Sync {
    /// The entry stored under `key` by any instance, if there is one of at most `max_bytes`
    /// (checked before it is read).
    async fn get(&self, key: &EntryKey, max_bytes: u64) -> Option<Entry>;
    /// Writes `entry` under `key` for `ttl`, in the background: returns at once, and a write
    /// that cannot be made is dropped.
    fn put(&self, key: &EntryKey, entry: Arc<Entry>, ttl: Duration);
    /// Removes every entry (`tenant` None) or those kept for one tenant, and tells the other
    /// instances to drop theirs from memory; how many went from the store.
    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault>;
}

/// An entry's weight: its own bytes and those of its key.
#[derive(Clone, Copy)]
struct ByWeight;

impl quick_cache::Weighter<EntryKey, Arc<Entry>> for ByWeight {
    fn weight(&self, _key: &EntryKey, entry: &Arc<Entry>) -> u64 {
        entry.weight
    }
}

/// Shards of the in-process cache: each has a lock and an eighth of the budget, which holds
/// any entry (at most a sixteenth) even while recordings hold their quarter.
const SHARDS: usize = 8;

/// The in-process store.
pub struct MemoryStore {
    entries: quick_cache::sync::Cache<EntryKey, Arc<Entry>, ByWeight>,
    ttl_ms: Millis,
    budget: u64,
    /// Bytes reserved by recordings. Changed under the lock together with the entries'
    /// capacity, so that the two always add up to the budget.
    reserved: Mutex<u64>,
}

impl MemoryStore {
    /// A store of at most `budget` bytes whose entries live `ttl`.
    pub fn new(budget: u64, ttl: Duration) -> MemoryStore {
        // An estimate for the index only (quick_cache sizes its ghost list from it): answers
        // of a few KiB.
        let items = usize::try_from(budget / (8 * 1024))
            .unwrap_or(usize::MAX)
            .clamp(64, 1 << 20);
        let mut options = quick_cache::OptionsBuilder::new();
        options
            .shards(SHARDS)
            .estimated_items_capacity(items)
            .weight_capacity(within(budget, SHARDS));
        let entries = match options.build() {
            Ok(o) => quick_cache::sync::Cache::with_options(
                o,
                ByWeight,
                Default::default(),
                Default::default(),
            ),
            // Unreachable: both required options are set above.
            Err(_) => quick_cache::sync::Cache::with(
                items,
                budget,
                ByWeight,
                Default::default(),
                Default::default(),
            ),
        };
        MemoryStore {
            entries,
            ttl_ms: Millis::try_from(ttl.as_millis()).unwrap_or(Millis::MAX),
            budget,
            reserved: Mutex::new(0),
        }
    }

    /// Lets the entries take `bytes` at most (evicting at once when they hold more).
    fn set_entries_capacity(&self, bytes: u64) {
        self.entries
            .set_capacity(within(bytes, self.entries.num_shards()));
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &EntryKey, now: Millis) -> Result<Option<Arc<Entry>>, Fault> {
        let Some(entry) = self.entries.get(key) else {
            return Ok(None);
        };
        if now.saturating_sub(entry.stored_at) >= self.ttl_ms {
            self.entries.remove(key);
            return Ok(None);
        }
        Ok(Some(entry))
    }

    async fn put(&self, key: EntryKey, entry: Arc<Entry>) -> Result<(), Fault> {
        self.entries.insert(key, entry);
        Ok(())
    }

    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault> {
        let before = self.entries.len();
        match tenant {
            None => self.entries.clear(),
            Some(name) => self
                .entries
                .retain(|k, _| k.tenant.as_deref() != Some(name)),
        }
        Ok(before.saturating_sub(self.entries.len()) as u64)
    }

    fn reserve(&self, bytes: u64) -> bool {
        let mut reserved = self.reserved();
        let total = reserved.saturating_add(bytes);
        if total > self.budget / 4 {
            return false;
        }
        *reserved = total;
        self.set_entries_capacity(self.budget - total);
        true
    }

    fn release(&self, bytes: u64) {
        let mut reserved = self.reserved();
        *reserved = reserved.saturating_sub(bytes);
        self.set_entries_capacity(self.budget - *reserved);
    }

    fn usage(&self) -> Usage {
        let recording_bytes = *self.reserved();
        Usage {
            bytes: self.entries.weight() + recording_bytes,
            recording_bytes,
            entries: self.entries.len() as u64,
            capacity: self.budget,
        }
    }
}

/// `bytes` rounded down to a multiple of `shards`: each shard gets an equal share, rounded up,
/// so the shares add up to no more than `bytes`.
fn within(bytes: u64, shards: usize) -> u64 {
    let shards = shards.max(1) as u64;
    bytes - bytes % shards
}
