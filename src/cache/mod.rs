//! The response cache: a repeated identical request is answered from memory, spending no key
//! and no quota.
//!
//! What is kept: answers of 200 to generation, embedding and token-count calls, on the native
//! and the OpenAI-compatible paths, never for a request naming a resource bound to a project
//! (files, caches, tuned models, interactions...). A stream is kept only once it ended cleanly,
//! and is replayed at once, as the same events. Entries are kept decoded (never gzip), so any
//! client can be served them. The client may opt out with `Cache-Control`: `no-cache` skips
//! the lookup but stores the fresh answer, `no-store` skips both, `max-age=N` bounds how old a
//! hit may be. A cache fault is a miss, never an error.
//!
//! [`key`] makes the entry key; [`store`] keeps entries behind the [`Store`] seam, in memory.
//! With `redis:` configured a [`SharedStore`] is the second level: a local miss looks there
//! (a hit fills memory), and an answer kept is written there too, in the background, in the
//! form [`encoding`] gives it. This module knows nothing of Pingora or Redis: the gateway
//! calls it (`gateway/cache.rs`), the fleet provides the shared store (`fleet/cache.rs`).

pub mod encoding;
pub mod key;
pub mod store;

pub use key::EntryKey;
pub use store::{Fault, MemoryStore, SharedStore, Store, Usage};

use crate::config::CacheConfig;
use crate::wire::{names, request};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;
use std::time::Duration;

/// What the cache did with a request: the value of `x-keygate-cache` on its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Answered from the cache.
    Hit,
    /// Not found (or not looked up: `no-cache`), answered by Google, kept if it qualifies.
    Miss,
    /// Not for the cache: another kind of call, a project-bound resource, `no-store`.
    Bypass,
}

impl Status {
    /// The header value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Bypass => "bypass",
        }
    }
}

/// The answer header carrying [`Status`].
pub const STATUS_HEADER: &str = "x-keygate-cache";

/// Calls whose answers are kept (the last part of the path, as [`request::method_of`] gives
/// it): generation, embedding and token counting, native and OpenAI-style.
const CACHED_METHODS: [&str; 7] = [
    "generateContent",
    "streamGenerateContent",
    "embedContent",
    "batchEmbedContents",
    "countTokens",
    "chat/completions",
    "embeddings",
];

/// Answer header fields not kept with an entry: framing and encoding (the entry is decoded and
/// sent whole), and what belongs to one answer only.
const NOT_KEPT: [&str; 10] = [
    "content-encoding",
    "content-length",
    "transfer-encoding",
    "date",
    "age",
    "set-cookie",
    "alt-svc",
    "server-timing",
    "vary",
    STATUS_HEADER,
];

/// Bytes an entry costs beyond its body and header fields (its key, the bookkeeping).
const ENTRY_OVERHEAD: u64 = 256;

/// How far in the future an entry read from the shared store may say it was stored (the
/// instances' clocks differ a little); a later one is not believed.
const CLOCK_SKEW_MS: u64 = 60_000;

/// Bytes a recording reserves at a time: fewer changes of the budget for a long stream.
const RESERVE_STEP: u64 = 16 * 1024;

/// Whether a request is a call whose answer the cache keeps: a POST of generation, embedding
/// or token counting.
pub fn cacheable_kind(method: &http::Method, path: &str) -> bool {
    method == http::Method::POST && CACHED_METHODS.contains(&request::method_of(path))
}

/// What the client asked of the cache in `Cache-Control`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    /// Do not answer from the cache (but keep the fresh answer).
    pub no_cache: bool,
    /// Neither answer from the cache nor keep the answer.
    pub no_store: bool,
    /// The oldest hit accepted.
    pub max_age: Option<Duration>,
}

/// The cache directives in `headers` (every `Cache-Control` field; case does not matter).
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    for value in headers.get_all(http::header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for part in value.split(',') {
            let part = part.trim();
            if part.eq_ignore_ascii_case("no-cache") {
                d.no_cache = true;
            } else if part.eq_ignore_ascii_case("no-store") {
                d.no_store = true;
            } else if let Some((name, secs)) = part.split_once('=') {
                if name.trim().eq_ignore_ascii_case("max-age") {
                    if let Ok(secs) = secs.trim().trim_matches('"').parse::<u64>() {
                        // Several: the strictest holds.
                        let age = Duration::from_secs(secs);
                        d.max_age = Some(d.max_age.map_or(age, |a| a.min(age)));
                    }
                }
            }
        }
    }
    d
}

/// A request as the cache sees it.
pub struct Ask<'a> {
    /// The tenant asking, if any.
    pub tenant: Option<&'a Arc<str>>,
    /// The pool the request was placed on.
    pub pool: &'a str,
    /// The pool lets tenants share entries (`cache_shared_across_tenants`).
    pub shared: bool,
    /// The HTTP method.
    pub method: &'a http::Method,
    /// The canonical path.
    pub path: &'a str,
    /// The query as forwarded (credentials removed).
    pub query: Option<&'a str>,
    /// The model routed by.
    pub model: &'a str,
    /// The client's request headers.
    pub headers: &'a HeaderMap,
    /// The request body.
    pub body: &'a [u8],
}

/// What the cache will do with a request.
#[derive(Debug)]
pub enum Plan {
    /// Nothing: the answer is neither looked for nor kept.
    Bypass,
    /// Look for `key` (unless `lookup` is false) and keep a fresh answer under it.
    Use {
        /// The entry key.
        key: EntryKey,
        /// Whether to look (`no-cache` says not to).
        lookup: bool,
        /// The oldest hit accepted, besides the TTL.
        max_age: Option<Duration>,
        /// The answer is an OpenAI-style stream, which ends with `data: [DONE]` when whole.
        openai_stream: bool,
    },
}

/// What the cache will do with `ask`.
pub fn plan(ask: &Ask<'_>) -> Plan {
    if !cacheable_kind(ask.method, ask.path) {
        return Plan::Bypass;
    }
    let d = directives(ask.headers);
    if d.no_store {
        return Plan::Bypass;
    }
    // A resource bound to a project (a file, a cached content, a tuned model...) can change
    // or vanish: an answer that read one is never kept.
    if !names::names_in_path(ask.path).is_empty() || !names::names_in_body(ask.body).is_empty() {
        return Plan::Bypass;
    }
    let parts = key::KeyParts {
        tenant: if ask.shared {
            None
        } else {
            ask.tenant.cloned()
        },
        pool: ask.pool,
        method: ask.method.as_str(),
        path: ask.path,
        query: ask.query,
        model: ask.model,
        headers: ask.headers,
        body: ask.body,
    };
    match key::entry_key(&parts) {
        Ok(keyed) => Plan::Use {
            key: keyed.key,
            lookup: !d.no_cache,
            max_age: d.max_age,
            openai_stream: keyed.stream && ask.path.contains("/openai/"),
        },
        Err(_) => Plan::Bypass,
    }
}

/// An answer kept: the header fields replayed with it and its decoded body.
#[derive(Debug)]
pub struct Entry {
    /// Header fields of the answer as first relayed, less [`NOT_KEPT`].
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body, decoded.
    pub body: Bytes,
    /// When it was stored, in milliseconds since the epoch.
    pub stored_at: u64,
    /// Tokens the answer used: what each hit saves.
    pub tokens: u64,
    /// Bytes it costs in the budget.
    weight: u64,
}

impl Entry {
    /// An entry of `headers` and `body`, stored at `stored_at`, whose answer used `tokens`.
    pub fn new(
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
        stored_at: u64,
        tokens: u64,
    ) -> Entry {
        let fields: u64 = headers
            .iter()
            .map(|(n, v)| (n.as_str().len() + v.len()) as u64 + 32)
            .sum();
        Entry {
            weight: ENTRY_OVERHEAD + fields + body.len() as u64,
            headers,
            body,
            stored_at,
            tokens,
        }
    }

    /// Bytes the entry costs in the memory budget.
    pub fn weight(&self) -> u64 {
        self.weight
    }
}

/// The response cache of a configuration: its settings, its store in memory, and the store
/// shared with the other instances, if any.
pub struct Cache {
    config: CacheConfig,
    store: Arc<dyn Store>,
    shared: Option<Arc<dyn SharedStore>>,
}

/// What a purge removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// Entries removed from this instance's memory.
    pub here: u64,
    /// Entries removed from the shared store, or why it could not purge (`None`: there is no
    /// shared store).
    pub shared: Option<Result<u64, String>>,
}

impl Cache {
    /// A cache with `config`, keeping entries in memory, and in `shared` too when it is given.
    /// `old`: the previous configuration's cache, whose entries are kept when the settings did
    /// not change.
    pub fn new(
        config: CacheConfig,
        old: Option<&Cache>,
        shared: Option<Arc<dyn SharedStore>>,
    ) -> Cache {
        let store = match old {
            Some(old) if old.config == config => old.store.clone(),
            _ => Arc::new(MemoryStore::new(config.max_bytes, config.ttl)) as Arc<dyn Store>,
        };
        Cache {
            config,
            store,
            shared,
        }
    }

    /// A cache over `store` (tests, other stores), with `shared` as its second level.
    pub fn with_store(
        config: CacheConfig,
        store: Arc<dyn Store>,
        shared: Option<Arc<dyn SharedStore>>,
    ) -> Cache {
        Cache {
            config,
            store,
            shared,
        }
    }

    /// The settings.
    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// Whether entries are shared with other instances.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The entry under `key`, if there is one no older than `max_age`: from memory, or else
    /// from the shared store (filling memory). A store fault is logged and taken as a miss.
    pub async fn lookup(
        &self,
        key: &EntryKey,
        max_age: Option<Duration>,
        now: u64,
    ) -> Option<Arc<Entry>> {
        let entry = match self.store.get(key, now).await {
            Ok(Some(found)) => found,
            Ok(None) => self.lookup_shared(key, now).await?,
            Err(fault) => {
                log::warn!("cache: lookup failed ({fault}); answered as a miss");
                return None;
            }
        };
        let age = Duration::from_millis(now.saturating_sub(entry.stored_at));
        match max_age {
            Some(max) if age > max => None,
            _ => Some(entry),
        }
    }

    /// The entry under `key` in the shared store, if it is within the TTL and the size bound;
    /// kept in memory for the next hit.
    async fn lookup_shared(&self, key: &EntryKey, now: u64) -> Option<Arc<Entry>> {
        let shared = self.shared.as_ref()?;
        let max = self.config.max_entry_bytes();
        let entry = shared.get(key, max).await?;
        let ttl = u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX);
        let fresh = entry.stored_at <= now.saturating_add(CLOCK_SKEW_MS)
            && now.saturating_sub(entry.stored_at) < ttl;
        if !fresh || entry.weight() > max {
            return None;
        }
        let entry = Arc::new(entry);
        if let Err(fault) = self.store.put(key.clone(), entry.clone()).await {
            log::warn!("cache: an entry from the shared store could not be kept ({fault})");
        }
        Some(entry)
    }

    /// Starts recording the answer to a request that will be kept under `key`.
    pub fn recording(&self, key: EntryKey, openai_stream: bool) -> Recording {
        Recording {
            store: self.store.clone(),
            key,
            headers: Vec::new(),
            max_bytes: self.config.max_entry_bytes(),
            reserved: 0,
            openai_stream,
        }
    }

    /// Keeps a recorded answer whose whole decoded body is `body` and which used `tokens`;
    /// true if it was stored. An unclean stream, an entry over the size bound or a store fault
    /// (logged) is not stored. The write to the shared store is queued, not waited for.
    pub async fn keep(&self, recording: Recording, body: Vec<u8>, tokens: u64, now: u64) -> bool {
        let Some((key, entry)) = recording.finish(body, tokens, now) else {
            return false;
        };
        if entry.weight() > self.config.max_entry_bytes() {
            return false;
        }
        let entry = Arc::new(entry);
        if let Some(shared) = &self.shared {
            shared.put(&key, entry.clone(), self.config.ttl);
        }
        match self.store.put(key, entry).await {
            Ok(()) => true,
            Err(fault) => {
                log::warn!("cache: an answer could not be stored ({fault})");
                false
            }
        }
    }

    /// Removes every entry, or those of `tenant`, here and in the shared store (whose purge
    /// tells the other instances to drop theirs from memory). Entries of a pool whose tenants
    /// share them belong to no tenant: only a purge of everything removes them. Fails only
    /// when memory could not be purged; the shared store's fault is in [`Purged::shared`].
    pub async fn purge(&self, tenant: Option<&str>) -> Result<Purged, Fault> {
        let mut here = self.store.purge(tenant).await?;
        let shared = match &self.shared {
            Some(s) => {
                let purged = s.purge(tenant).await.map_err(|f| f.0);
                // While the shared store was purging, a local miss could find an entry there
                // not yet deleted and bring it back into memory: purged again.
                here += self.store.purge(tenant).await?;
                Some(purged)
            }
            None => None,
        };
        Ok(Purged { here, shared })
    }

    /// Removes every entry, or those of `tenant`, from this instance's memory only: what
    /// another instance's purge asks.
    pub async fn purge_here(&self, tenant: Option<&str>) -> Result<u64, Fault> {
        self.store.purge(tenant).await
    }

    /// What the store in memory holds.
    pub fn usage(&self) -> Usage {
        self.store.usage()
    }
}

/// An answer being recorded for the cache: its key, the header fields to replay, and the
/// memory it holds, reserved in the budget until it is stored or dropped.
pub struct Recording {
    store: Arc<dyn Store>,
    key: EntryKey,
    headers: Vec<(HeaderName, HeaderValue)>,
    max_bytes: u64,
    reserved: u64,
    openai_stream: bool,
}

impl Recording {
    /// The largest body that may be recorded: one entry's share of the budget.
    pub fn max_bytes(&self) -> usize {
        usize::try_from(self.max_bytes).unwrap_or(usize::MAX)
    }

    /// Keeps the answer's header fields worth replaying.
    pub fn header(&mut self, headers: &HeaderMap) {
        self.headers = headers
            .iter()
            .filter(|(name, _)| !NOT_KEPT.contains(&name.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
    }

    /// Counts the `held` bytes the recording holds now against the budget; false when the
    /// budget cannot take them (the recording must stop: its answer will not be kept).
    pub fn hold(&mut self, held: usize) -> bool {
        let held = held as u64;
        if held <= self.reserved {
            return true;
        }
        if held > self.max_bytes {
            return false;
        }
        let want = held.div_ceil(RESERVE_STEP).saturating_mul(RESERVE_STEP);
        let want = want.min(self.max_bytes).max(held);
        if !self.store.reserve(want - self.reserved) {
            return false;
        }
        self.reserved = want;
        true
    }

    /// The entry a whole answer makes, unless it is not clean: an error inside a stream, or an
    /// OpenAI-style stream without its closing `[DONE]`. Gives back the reservation.
    fn finish(self, mut body: Vec<u8>, tokens: u64, now: u64) -> Option<(EntryKey, Entry)> {
        if !clean(&body, self.openai_stream) {
            return None;
        }
        body.shrink_to_fit();
        let entry = Entry::new(self.headers.clone(), Bytes::from(body), now, tokens);
        Some((self.key.clone(), entry))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.store.release(self.reserved);
        }
    }
}

/// Whether a 200 answer is clean enough to be replayed: it holds no error object at the top
/// of a value (an error inside a stream: `data: {"error": ...}`, a raw `{"error": ...}` tail,
/// or Google's pretty-printed `{` then `  "error": ...`), and an OpenAI-style stream ends with
/// `data: [DONE]`.
fn clean(body: &[u8], openai_stream: bool) -> bool {
    let errors = body.split(|&b| b == b'\n').any(|line| {
        let mut line = line;
        if let Some(rest) = line.strip_prefix(b"data:") {
            line = rest.trim_ascii_start();
        }
        if let Some(rest) = line.strip_prefix(b",").or_else(|| line.strip_prefix(b"[")) {
            line = rest;
        }
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let rest = &line[indent..];
        let opened = rest.strip_prefix(b"{").map(<[u8]>::trim_ascii_start);
        opened.is_some_and(|r| r.starts_with(b"\"error\""))
            || (indent <= 2 && rest.starts_with(b"\"error\""))
    });
    if errors {
        return false;
    }
    !openai_stream || body.trim_ascii_end().ends_with(b"data: [DONE]")
}

#[cfg(test)]
mod tests;
