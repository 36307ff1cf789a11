//! The response cache's second level in Redis: entries one instance kept, another can serve.
//!
//! - An entry is `{prefix}cache:{hash of the tenant, or - for entries of no tenant}:{the
//!   entry key's digest}` (no key, no token, no name a client chose), holding the entry in
//!   `cache::encoding`'s versioned form, with the cache's TTL as its Redis TTL.
//! - A lookup (after a local miss) is one script, within `timeout_ms`, that reads the entry
//!   only when it is within the size bound. Redis down, slow or holding a value keygate did
//!   not write: a miss, said once in the log.
//! - A store is written in the background (a request never waits on it), on a connection of
//!   its own so that a large answer never holds up the health and limit commands; at most
//!   [`MAX_WRITING`] bytes are on their way at once, and writes past that are dropped.
//! - A purge deletes the entries by `SCAN MATCH` on their names and tells the other instances
//!   on `{prefix}cache-purge` to drop theirs from memory. An instance that (re)subscribes drops
//!   its memory level whole: it may have missed a purge while it was away.

use super::store::h;
use super::{Fleet, KindLabel, RECONNECT};
use crate::cache::{encoding, Entry, EntryKey, Fault, SharedStore};
use crate::quota::keys::now_millis;
use crate::runtime::Shared;
use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of entries being written to Redis at once; a write past it is dropped.
const MAX_WRITING: u64 = 64 << 20;

/// How long a background write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a purge (the scan and the deletions) may take.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Names scanned, and deleted, per command in a purge.
const PURGE_BATCH: usize = 500;

/// Reads `KEYS[1]` only when it is at most `ARGV[1]` bytes: false when missing, -1 when larger.
const GET_BOUNDED: &str = r"
local n = redis.call('STRLEN', KEYS[1])
if n == 0 then return false end
if n > tonumber(ARGV[1]) then return -1 end
return redis.call('GET', KEYS[1])
";

/// What a purge tells the other instances.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeNote {
    /// The instance that purged.
    from: String,
    /// The hash of the tenant whose entries went; none: every entry.
    tenant: Option<String>,
}

/// This instance's handle on the cache entries shared through Redis.
#[derive(Clone)]
pub struct FleetCache(Arc<Inner>);

struct Inner {
    fleet: Arc<Fleet>,
    connection: tokio::sync::OnceCell<ConnectionManager>,
    get: redis::Script,
    /// Bytes of entries being written.
    writing: AtomicU64,
    /// A lookup failed and it was said; cleared by the next that works.
    fault_said: AtomicBool,
    /// An entry keygate did not write was found (said once).
    foreign_said: AtomicBool,
}

impl FleetCache {
    /// The cache's handle on `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> FleetCache {
        FleetCache(Arc::new(Inner {
            fleet,
            connection: tokio::sync::OnceCell::new(),
            get: redis::Script::new(GET_BOUNDED),
            writing: AtomicU64::new(0),
            fault_said: AtomicBool::new(false),
            foreign_said: AtomicBool::new(false),
        }))
    }
}

/// The name of the entry under `key`.
fn name(prefix: &str, key: &EntryKey) -> String {
    let tenant = key.tenant.as_deref().map_or_else(|| "-".to_string(), h);
    format!("{prefix}cache:{tenant}:{}", hex::encode(key.digest))
}

/// The glob matching the entries of `tenant` (every entry: none).
fn pattern(prefix: &str, tenant: Option<&str>) -> String {
    match tenant {
        Some(t) => format!("{prefix}cache:{}:*", h(t)),
        None => format!("{prefix}cache:*"),
    }
}

/// The channel purges are told on.
pub(super) fn purge_channel(prefix: &str) -> String {
    format!("{prefix}cache-purge")
}

impl Inner {
    /// The cache's own connection, made on first use (within the timeout).
    async fn connection(&self) -> Option<ConnectionManager> {
        let make = async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(RECONNECT)
                .set_response_timeout(self.fleet.config.timeout)
                .set_number_of_retries(1);
            self.fleet
                .client
                .get_connection_manager_with_config(config)
                .await
        };
        let made = self.connection.get_or_try_init(|| make);
        match tokio::time::timeout(self.fleet.config.timeout, made).await {
            Ok(Ok(c)) => Some(c.clone()),
            Ok(Err(e)) => {
                self.fault(&format!("cannot connect ({})", e.kind_label()));
                None
            }
            Err(_) => {
                self.fault("cannot connect in time");
                None
            }
        }
    }

    /// Says once, until a lookup works again, that the cache's Redis calls fail.
    fn fault(&self, why: &str) {
        if !self.fault_said.swap(true, Relaxed) {
            log::warn!(
                "redis at {}: the response cache cannot use it ({why}); lookups there are misses until it answers",
                self.fleet.url()
            );
        }
    }

    async fn get(&self, key: &EntryKey, max_bytes: u64) -> Option<Entry> {
        // One deadline for the connection (made by the first lookup) and the read together: a
        // lookup waits no longer than `timeout_ms` in all.
        let deadline = tokio::time::Instant::now() + self.fleet.config.timeout;
        let mut c = self.connection().await?;
        let entry = name(&self.fleet.config.key_prefix, key);
        let mut invocation = self.get.key(&entry);
        invocation.arg(max_bytes);
        let read = invocation.invoke_async::<redis::Value>(&mut c);
        let value = match tokio::time::timeout_at(deadline, read).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.fault(&format!("lookup failed ({})", e.kind_label()));
                return None;
            }
            Err(_) => {
                self.fault("lookup timed out");
                return None;
            }
        };
        self.fault_said.store(false, Relaxed);
        match value {
            redis::Value::BulkString(bytes) => {
                let found = encoding::decode(key, &bytes);
                if found.is_none() && !self.foreign_said.swap(true, Relaxed) {
                    log::warn!("redis entry {entry}: not a cache entry keygate wrote for that name; answered as a miss");
                }
                found
            }
            // Missing, or larger than this instance keeps (another's `max_megabytes`).
            _ => None,
        }
    }

    async fn write(&self, name: String, value: Vec<u8>, ttl_ms: u64) {
        let Some(mut c) = self.connection().await else {
            return;
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(name).arg(value).arg("PX").arg(ttl_ms.max(1));
        let done = tokio::time::timeout(WRITE_TIMEOUT, cmd.query_async::<()>(&mut c)).await;
        if !matches!(done, Ok(Ok(()))) {
            log::debug!("redis: a cache entry could not be written; dropped");
        }
    }

    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault> {
        let prefix = &self.fleet.config.key_prefix;
        let mut c = self
            .connection()
            .await
            .ok_or_else(|| Fault(format!("redis at {} does not answer", self.fleet.url())))?;
        let pattern = pattern(prefix, tenant);
        let note = PurgeNote {
            from: self.fleet.id.clone(),
            tenant: tenant.map(h),
        };
        let work = async {
            // Deleted as the scan goes: a large cache's names are never all held at once.
            let mut gone = 0;
            let mut cursor: u64 = 0;
            loop {
                // Names as bytes: one that is not UTF-8 (not keygate's) must not stop the purge.
                let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(PURGE_BATCH)
                    .query_async(&mut c)
                    .await?;
                if !batch.is_empty() {
                    gone += redis::cmd("UNLINK")
                        .arg(&batch)
                        .query_async::<u64>(&mut c)
                        .await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            let message = serde_json::to_string(&note).unwrap_or_default();
            redis::cmd("PUBLISH")
                .arg(purge_channel(prefix))
                .arg(message)
                .query_async::<()>(&mut c)
                .await?;
            redis::RedisResult::Ok(gone)
        };
        match tokio::time::timeout(PURGE_TIMEOUT, work).await {
            Ok(Ok(gone)) => Ok(gone),
            Ok(Err(e)) => Err(Fault(format!(
                "redis at {}: {}",
                self.fleet.url(),
                e.kind_label()
            ))),
            Err(_) => Err(Fault(format!(
                "redis at {} did not finish in time",
                self.fleet.url()
            ))),
        }
    }
}

#[async_trait]
impl SharedStore for FleetCache {
    async fn get(&self, key: &EntryKey, max_bytes: u64) -> Option<Entry> {
        // Redis known to be away: no call at all (the loss was said once already).
        if !self.0.fleet.is_up_now() {
            return None;
        }
        self.0.get(key, max_bytes).await
    }

    fn put(&self, key: &EntryKey, entry: Arc<Entry>, ttl: Duration) {
        let inner = &self.0;
        if !inner.fleet.is_up_now() {
            return;
        }
        let ttl = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let left = ttl.saturating_sub(now_millis().saturating_sub(entry.stored_at));
        if left == 0 {
            return;
        }
        let size = entry.weight();
        if inner.writing.fetch_add(size, Relaxed).saturating_add(size) > MAX_WRITING {
            inner.writing.fetch_sub(size, Relaxed);
            log::debug!("redis: too many cache entries on their way; one dropped");
            return;
        }
        let inner = self.0.clone();
        let name = name(&inner.fleet.config.key_prefix, key);
        let key = key.clone();
        tokio::spawn(async move {
            let value = encoding::encode(&key, &entry);
            drop(entry);
            inner.write(name, value, left).await;
            inner.writing.fetch_sub(size, Relaxed);
        });
    }

    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault> {
        self.0.purge(tenant).await
    }
}

/// Drops from this instance's memory what another instance's purge (a message on the purge
/// channel) removed.
pub(super) async fn purge_told(fleet: &Fleet, shared: &Shared, message: &[u8]) {
    let Ok(note) = serde_json::from_slice::<PurgeNote>(message) else {
        log::warn!(
            "redis channel {}: a message keygate does not understand; ignored",
            purge_channel(&fleet.config.key_prefix)
        );
        return;
    };
    if note.from == fleet.id {
        return;
    }
    let rt = shared.runtime.load_full();
    let Some(cache) = &rt.cache else {
        return;
    };
    let tenant = match &note.tenant {
        None => None,
        Some(hash) => match rt.tenants.list().iter().find(|t| h(&t.name) == *hash) {
            Some(t) => Some(t.name.clone()),
            // No such tenant here: it has no entries here.
            None => return,
        },
    };
    match cache.purge_here(tenant.as_deref()).await {
        Ok(n) => log::info!(
            "cache: {n} entries dropped from memory, purged by instance {} ({})",
            note.from,
            tenant
                .as_deref()
                .map_or("every tenant".into(), |t| format!("tenant {t}"))
        ),
        Err(fault) => log::warn!("cache: a purge told by another instance failed here ({fault})"),
    }
}

/// Drops this instance's memory level on (re)subscribing: a purge told while the subscription
/// was away would otherwise be missed.
pub(super) async fn subscribed(shared: &Shared) {
    let rt = shared.runtime.load_full();
    let Some(cache) = rt.cache.as_ref().filter(|c| c.is_shared()) else {
        return;
    };
    if let Ok(n) = cache.purge_here(None).await {
        if n > 0 {
            log::info!("cache: {n} entries dropped from memory on reconnecting to redis (a purge may have been missed meanwhile)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hold_hashes_and_purges_match_them() {
        let alice = EntryKey {
            tenant: Some(Arc::from("alice")),
            digest: [0xab; 32],
        };
        let n = name("kg:", &alice);
        assert!(n.starts_with("kg:cache:") && !n.contains("alice"), "{n}");
        assert!(n.ends_with(&"ab".repeat(32)), "{n}");
        let glob = pattern("kg:", Some("alice"));
        assert!(n.starts_with(glob.trim_end_matches('*')), "{n} {glob}");
        assert!(n.starts_with(pattern("kg:", None).trim_end_matches('*')));
        let shared = EntryKey {
            tenant: None,
            digest: [1; 32],
        };
        let s = name("kg:", &shared);
        assert!(
            !s.starts_with(glob.trim_end_matches('*')),
            "a shared entry is no tenant's"
        );
        assert!(s.starts_with("kg:cache:-:"), "{s}");
    }
}
