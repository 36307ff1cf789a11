use super::*;
use async_trait::async_trait;

fn config(max_bytes: u64) -> CacheConfig {
    CacheConfig {
        ttl: Duration::from_secs(600),
        max_bytes,
    }
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

fn ask<'a>(path: &'a str, headers: &'a HeaderMap, body: &'a [u8]) -> Ask<'a> {
    Ask {
        tenant: None,
        pool: "main",
        shared: false,
        method: &http::Method::POST,
        path,
        query: None,
        model: "gemini-2.5-flash",
        headers,
        body,
    }
}

fn key(n: u8, tenant: Option<&str>) -> EntryKey {
    EntryKey {
        tenant: tenant.map(Arc::from),
        digest: [n; 32],
    }
}

fn entry(body_len: usize, stored_at: u64) -> Arc<Entry> {
    Arc::new(Entry::new(
        Vec::new(),
        Bytes::from(vec![b'x'; body_len]),
        stored_at,
        7,
    ))
}

const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

#[test]
fn cache_control_directives() {
    assert_eq!(directives(&HeaderMap::new()), Directives::default());
    let d = directives(&headers(&[("cache-control", "No-Cache, max-age=30")]));
    assert!(d.no_cache && !d.no_store);
    assert_eq!(d.max_age, Some(Duration::from_secs(30)));
    let d = directives(&headers(&[
        ("cache-control", "max-age=60"),
        ("cache-control", "no-store, max-age=\"5\""),
    ]));
    assert!(d.no_store);
    assert_eq!(
        d.max_age,
        Some(Duration::from_secs(5)),
        "the strictest holds"
    );
    assert_eq!(
        directives(&headers(&[("cache-control", "max-age=soon")])).max_age,
        None
    );
}

#[test]
fn only_generation_embedding_and_token_counts_without_resources_are_planned() {
    let h = HeaderMap::new();
    let body = br#"{"contents":[{"parts":[{"text":"hi"}]}]}"#;
    for path in [
        GENERATE,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent",
        "/v1beta/models/text-embedding-004:embedContent",
        "/v1beta/models/text-embedding-004:batchEmbedContents",
        "/v1beta/models/gemini-2.5-flash:countTokens",
        "/v1beta/openai/chat/completions",
        "/v1beta/openai/embeddings",
    ] {
        assert!(
            matches!(plan(&ask(path, &h, body)), Plan::Use { lookup: true, .. }),
            "{path}"
        );
    }
    for path in [
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        "/v1beta/cachedContents",
        "/v1beta/interactions",
        "/v1beta/tunedModels/mine:generateContent",
        "/v1beta/files",
    ] {
        assert!(matches!(plan(&ask(path, &h, body)), Plan::Bypass), "{path}");
    }
    let mut get = ask(GENERATE, &h, body);
    get.method = &http::Method::GET;
    assert!(matches!(plan(&get), Plan::Bypass));
    // A body naming a file or a cached content is never cached.
    let file = br#"{"contents":[{"parts":[{"fileData":{"fileUri":"files/abc"}}]}]}"#;
    assert!(matches!(plan(&ask(GENERATE, &h, file)), Plan::Bypass));
    let cached = br#"{"cachedContent":"cachedContents/xyz","contents":[]}"#;
    assert!(matches!(plan(&ask(GENERATE, &h, cached)), Plan::Bypass));
    // Not JSON, or a key named twice: no canonical form, no entry.
    assert!(matches!(
        plan(&ask(GENERATE, &h, b"{\"a\":1,\"a\":2}")),
        Plan::Bypass
    ));
}

#[test]
fn directives_and_sharing_shape_the_plan() {
    let body = b"{}";
    let no_store = headers(&[("cache-control", "no-store")]);
    assert!(matches!(
        plan(&ask(GENERATE, &no_store, body)),
        Plan::Bypass
    ));
    let no_cache = headers(&[("cache-control", "no-cache")]);
    assert!(matches!(
        plan(&ask(GENERATE, &no_cache, body)),
        Plan::Use { lookup: false, .. }
    ));
    let h = HeaderMap::new();
    let alice: Arc<str> = Arc::from("alice");
    let mut own = ask(GENERATE, &h, body);
    own.tenant = Some(&alice);
    let Plan::Use { key, .. } = plan(&own) else {
        panic!()
    };
    assert_eq!(key.tenant.as_deref(), Some("alice"));
    own.shared = true;
    let Plan::Use { key, .. } = plan(&own) else {
        panic!()
    };
    assert_eq!(
        key.tenant, None,
        "a shared pool's entries belong to no tenant"
    );
    let stream = br#"{"model":"m","stream":true}"#;
    let Plan::Use { openai_stream, .. } = plan(&ask("/v1beta/openai/chat/completions", &h, stream))
    else {
        panic!()
    };
    assert!(openai_stream);
}

#[test]
fn clean_answers_and_streams() {
    assert!(clean(b"{\n  \"candidates\": []\n}\n", false));
    assert!(clean(b"data: {\"candidates\":[]}\r\n\r\n", false));
    // Errors inside a stream, or as its raw tail, or pretty-printed.
    assert!(!clean(
        b"data: {\"candidates\":[]}\r\n\r\ndata: {\"error\":{\"code\":500}}\r\n\r\n",
        false
    ));
    assert!(!clean(
        b"data: {\"candidates\":[]}\r\n\r\n{\"error\": {\"code\": 503}}",
        false
    ));
    assert!(!clean(b"[{\"candidates\":[]}\n,{\"error\":{}}]", false));
    assert!(!clean(
        b"{\n  \"error\": {\n    \"code\": 500\n  }\n}\n",
        false
    ));
    // A field named "error" deep inside an answer is not an error answer.
    assert!(clean(
        b"{\n  \"candidates\": [\n    {\n      \"error\": 1\n    }\n  ]\n}",
        false
    ));
    // An OpenAI-style stream is whole only with its [DONE].
    assert!(clean(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n", true));
    assert!(!clean(b"data: {\"choices\":[]}\n\n", true));
}

#[tokio::test]
async fn the_memory_store_stays_within_its_budget_and_counts_recordings() {
    let store = MemoryStore::new(64 * 1024, Duration::from_secs(600));
    for n in 0..100 {
        store.put(key(n, None), entry(2000, 1)).await.unwrap();
        assert!(store.usage().bytes <= 64 * 1024, "{:?}", store.usage());
    }
    assert!(store.usage().entries < 100);
    assert!(store.usage().bytes > 32 * 1024, "{:?}", store.usage());
    // A recording's bytes are counted, and entries make room for them.
    assert!(store.reserve(16 * 1024));
    let u = store.usage();
    assert_eq!(u.recording_bytes, 16 * 1024);
    assert!(u.bytes <= 64 * 1024, "{u:?}");
    // Recordings together hold at most a quarter of the budget.
    assert!(!store.reserve(1));
    store.release(16 * 1024);
    assert_eq!(store.usage().recording_bytes, 0);
    assert!(store.reserve(16 * 1024));
}

#[tokio::test]
async fn entries_expire_and_purge_by_tenant() {
    let store = MemoryStore::new(1 << 20, Duration::from_secs(10));
    store
        .put(key(1, Some("alice")), entry(10, 1_000))
        .await
        .unwrap();
    store
        .put(key(2, Some("bob")), entry(10, 1_000))
        .await
        .unwrap();
    store.put(key(3, None), entry(10, 1_000)).await.unwrap();
    assert!(store
        .get(&key(1, Some("alice")), 10_999)
        .await
        .unwrap()
        .is_some());
    assert!(
        store
            .get(&key(1, Some("alice")), 11_000)
            .await
            .unwrap()
            .is_none(),
        "past the TTL"
    );
    assert_eq!(store.purge(Some("bob")).await.unwrap(), 1);
    assert!(store
        .get(&key(2, Some("bob")), 2_000)
        .await
        .unwrap()
        .is_none());
    assert!(store.get(&key(3, None), 2_000).await.unwrap().is_some());
    assert_eq!(store.purge(None).await.unwrap(), 1);
    assert_eq!(store.usage().entries, 0);
}

#[tokio::test]
async fn max_age_bounds_a_hit_and_entries_over_a_sixteenth_are_not_kept() {
    let cache = Cache::new(config(1 << 20), None, None);
    let mut rec = cache.recording(key(1, None), false);
    rec.header(&headers(&[
        ("content-type", "application/json"),
        ("content-encoding", "gzip"),
    ]));
    assert!(rec.hold(100));
    assert!(cache.keep(rec, b"{}".to_vec(), 7, 1_000).await);
    let hit = cache.lookup(&key(1, None), None, 5_000).await.unwrap();
    assert_eq!(hit.body, Bytes::from_static(b"{}"));
    assert_eq!(hit.tokens, 7);
    let kept: Vec<&str> = hit.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        kept,
        ["content-type"],
        "the entry is decoded: no content-encoding"
    );
    assert!(cache
        .lookup(&key(1, None), Some(Duration::from_secs(4)), 5_000)
        .await
        .is_some());
    assert!(cache
        .lookup(&key(1, None), Some(Duration::from_secs(3)), 5_000)
        .await
        .is_none());
    // One entry may take a sixteenth of the budget at most.
    let mut big = cache.recording(key(2, None), false);
    assert!(
        !big.hold(70 * 1024),
        "past a sixteenth, the recording stops"
    );
    assert!(!cache.keep(big, vec![b'x'; 70 * 1024], 0, 1_000).await);
    assert!(cache.lookup(&key(2, None), None, 1_000).await.is_none());
    // A dropped recording gives its reservation back.
    let mut cut = cache.recording(key(3, None), false);
    assert!(cut.hold(10));
    assert!(cache.usage().recording_bytes > 0);
    drop(cut);
    assert_eq!(cache.usage().recording_bytes, 0);
}

/// A store that always fails, like a remote store that is down.
struct Broken;

#[async_trait]
impl Store for Broken {
    async fn get(&self, _: &EntryKey, _: u64) -> Result<Option<Arc<Entry>>, Fault> {
        Err(Fault("connection refused".into()))
    }
    async fn put(&self, _: EntryKey, _: Arc<Entry>) -> Result<(), Fault> {
        Err(Fault("connection refused".into()))
    }
    async fn purge(&self, _: Option<&str>) -> Result<u64, Fault> {
        Err(Fault("connection refused".into()))
    }
    fn reserve(&self, _: u64) -> bool {
        true
    }
    fn release(&self, _: u64) {}
    fn usage(&self) -> Usage {
        Usage::default()
    }
}

#[tokio::test]
async fn a_store_fault_is_a_miss() {
    let cache = Cache::with_store(config(1 << 20), Arc::new(Broken), None);
    assert!(cache.lookup(&key(1, None), None, 1).await.is_none());
    let rec = cache.recording(key(1, None), false);
    assert!(!cache.keep(rec, b"{}".to_vec(), 0, 1).await);
    assert!(cache.purge(None).await.is_err());
}

/// A shared store in a map, keeping values as the real one does (encoded), and whether it
/// answers.
#[derive(Default)]
struct Shelf {
    values: std::sync::Mutex<std::collections::HashMap<EntryKey, Vec<u8>>>,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl SharedStore for Shelf {
    async fn get(&self, key: &EntryKey, max_bytes: u64) -> Option<Entry> {
        if self.down.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let values = self.values.lock().unwrap();
        let value = values.get(key).filter(|v| v.len() as u64 <= max_bytes)?;
        encoding::decode(key, value)
    }
    fn put(&self, key: &EntryKey, entry: Arc<Entry>, _: Duration) {
        let value = encoding::encode(key, &entry);
        self.values.lock().unwrap().insert(key.clone(), value);
    }
    async fn purge(&self, _: Option<&str>) -> Result<u64, Fault> {
        let mut values = self.values.lock().unwrap();
        let n = values.len() as u64;
        values.clear();
        Ok(n)
    }
}

#[tokio::test]
async fn a_local_miss_is_looked_for_in_the_shared_store_and_fills_memory() {
    let shelf = Arc::new(Shelf::default());
    let a = Cache::new(config(1 << 20), None, Some(shelf.clone()));
    let b = Cache::new(config(1 << 20), None, Some(shelf.clone()));
    let mut rec = a.recording(key(1, Some("alice")), false);
    rec.header(&headers(&[("content-type", "application/json")]));
    assert!(a.keep(rec, b"{\"a\":1}".to_vec(), 7, 1_000).await);
    assert_eq!(b.usage().entries, 0);
    let hit = b.lookup(&key(1, Some("alice")), None, 2_000).await.unwrap();
    assert_eq!(
        (&hit.body[..], hit.tokens, hit.stored_at),
        (&b"{\"a\":1}"[..], 7, 1_000)
    );
    assert_eq!(b.usage().entries, 1, "the hit is kept in memory");
    // Memory answers once the shared store is gone.
    shelf.down.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(b
        .lookup(&key(1, Some("alice")), None, 3_000)
        .await
        .is_some());
    shelf
        .down
        .store(false, std::sync::atomic::Ordering::Relaxed);
    // Past the TTL, or from a clock far ahead, an entry of the shared store is not believed.
    let c = Cache::new(config(1 << 20), None, Some(shelf.clone()));
    assert!(c
        .lookup(&key(1, Some("alice")), None, 601_000)
        .await
        .is_none());
    assert!(
        c.lookup(&key(1, None), None, 2_000).await.is_none(),
        "another key"
    );
    let mut future = c.recording(key(2, None), false);
    future.header(&headers(&[]));
    assert!(c.keep(future, b"{}".to_vec(), 0, 500_000).await);
    let d = Cache::new(config(1 << 20), None, Some(shelf.clone()));
    assert!(d.lookup(&key(2, None), None, 100_000).await.is_none());
    // A purge reaches the shared store and says what went where.
    let purged = a.purge(None).await.unwrap();
    assert_eq!(
        purged,
        Purged {
            here: 1,
            shared: Some(Ok(2))
        }
    );
    assert!(c.purge_here(None).await.is_ok());
    assert!(c
        .lookup(&key(1, Some("alice")), None, 2_000)
        .await
        .is_none());
}

/// A shared store whose purge waits for `gate` before it deletes anything, as a purge in
/// Redis (a scan of every name) takes a while.
#[derive(Default)]
struct SlowPurge {
    shelf: Shelf,
    gate: tokio::sync::Notify,
}

#[async_trait]
impl SharedStore for SlowPurge {
    async fn get(&self, key: &EntryKey, max_bytes: u64) -> Option<Entry> {
        self.shelf.get(key, max_bytes).await
    }
    fn put(&self, key: &EntryKey, entry: Arc<Entry>, ttl: Duration) {
        self.shelf.put(key, entry, ttl);
    }
    async fn purge(&self, tenant: Option<&str>) -> Result<u64, Fault> {
        self.gate.notified().await;
        self.shelf.purge(tenant).await
    }
}

#[tokio::test]
async fn a_lookup_while_the_shared_store_purges_does_not_bring_the_entry_back() {
    let slow = Arc::new(SlowPurge::default());
    let cache = Cache::new(config(1 << 20), None, Some(slow.clone()));
    let alice = key(1, Some("alice"));
    let rec = cache.recording(alice.clone(), false);
    assert!(cache.keep(rec, b"{}".to_vec(), 0, 1_000).await);
    let purge = cache.purge(None);
    let meanwhile = async {
        // Memory is purged already; the shared store still holds the entry.
        let _ = cache.lookup(&alice, None, 2_000).await;
        slow.gate.notify_one();
    };
    let (purged, ()) = tokio::join!(purge, meanwhile);
    assert_eq!(purged.unwrap().shared, Some(Ok(1)));
    assert!(
        cache.lookup(&alice, None, 3_000).await.is_none(),
        "a purge that answered leaves nothing behind"
    );
}
