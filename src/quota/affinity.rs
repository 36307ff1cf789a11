//! Key affinity: which project owns the resources Google binds to a project, and where the
//! resumable uploads keygate handed out really go.
//!
//! A file uploaded with a key of project A is visible only to keys of project A; the same holds
//! for `cachedContents/...`, `tunedModels/...`, `batches/...`, `operations/...` and
//! `interactions/...` (the Interactions API's conversation state). A gateway that
//! rotates keys must therefore remember, for each such resource, the pool and project whose key
//! created it (and the tenant that asked), and send every later request naming it to that project.
//! [`Affinity`] is that table; [`crate::wire::names`] finds the names in requests and answers.
//!
//! Resumable uploads need one more table. Google's upload-start answer carries an upload URL whose
//! `upload_id` authorises the bytes that follow, which the SDKs send with no key. keygate hands
//! the client its own URL with an unguessable id of its own ([`rewrite_upload_url`]), and
//! [`Uploads`] maps that id back to Google's URL, the tenant and the project that started it.
//!
//! Both tables are bounded (capacity given at construction) and expiring; each is a
//! `std::sync::Mutex` around a hash map plus an expiry-ordered index, held only for a few map
//! operations (O(log n) each). They are consulted only by requests that name a resource, so the
//! lock is never on the hot path of plain `generateContent` traffic.

use crate::quota::keys::Millis;
use crate::wire::names::kind_of;
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Expired entries dropped per insertion. Purging is amortised over insertions so one `bind`
/// never holds the lock for a long sweep, even after a long idle period; a full table still evicts
/// the soonest-expiring entry, which is an expired one whenever any remains.
const PURGE_BATCH: usize = 32;

/// How long an upload session stays valid. Google's resumable sessions last about a week.
pub const UPLOAD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many fresh ids `Uploads::start` draws before giving up on a collision (which, with 128
/// random bits, only a broken random source would produce).
const ID_ATTEMPTS: usize = 4;

/// Who owns a resource: the pool and project whose keys can see it, and the tenant that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The key pool the project's keys belong to.
    pub pool: Arc<str>,
    /// The Google project whose keys can see the resource.
    pub project: Arc<str>,
    /// The tenant whose request created the resource (None when tenants are not configured).
    pub tenant: Option<Arc<str>>,
}

/// `now + ttl` in [`Millis`], saturating instead of overflowing.
fn expiry(now: Millis, ttl: Duration) -> Millis {
    let ttl = Millis::try_from(ttl.as_millis()).unwrap_or(Millis::MAX);
    now.saturating_add(ttl)
}

/// Locks a table, recovering from poisoning: every section leaves the table consistent between
/// operations, so a panic elsewhere cannot have left it half-updated in a way that matters.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One stored value and when it stops being valid.
struct Slot<V> {
    value: V,
    expires_at: Millis,
}

/// A bounded map whose entries expire, shared by both public tables. The expiry-ordered index
/// makes purging and eviction O(log n): the soonest-expiring entry is always first, and it is an
/// expired one whenever any entry has expired, so "expired first, then soonest" is a single rule.
/// An entry is live while `now < expires_at`.
struct Table<V> {
    map: HashMap<Arc<str>, Slot<V>>,
    by_expiry: BTreeSet<(Millis, Arc<str>)>,
    capacity: usize,
}

impl<V: Clone> Table<V> {
    fn new(capacity: usize) -> Self {
        // No preallocation: a large configured capacity should cost memory only when used.
        Table {
            map: HashMap::new(),
            by_expiry: BTreeSet::new(),
            capacity,
        }
    }

    /// Stores `value` under `name` until `expires_at`, replacing any previous entry, making room
    /// by evicting the soonest-expiring entries. Returns whether it was stored (not with
    /// capacity 0, nor when already expired).
    fn insert(&mut self, name: &str, value: V, expires_at: Millis, now: Millis) -> bool {
        if self.capacity == 0 || expires_at <= now {
            return false;
        }
        self.remove(name);
        self.purge(now);
        while self.map.len() >= self.capacity && self.evict_soonest() {}
        let key: Arc<str> = Arc::from(name);
        self.by_expiry.insert((expires_at, Arc::clone(&key)));
        self.map.insert(key, Slot { value, expires_at });
        true
    }

    /// The live value under `name`; an expired entry is dropped on the way.
    fn get(&mut self, name: &str, now: Millis) -> Option<&V> {
        let expires_at = self.map.get(name)?.expires_at;
        if expires_at <= now {
            self.remove(name);
            return None;
        }
        self.map.get(name).map(|slot| &slot.value)
    }

    /// Whether a live entry exists under `name`.
    fn contains_live(&self, name: &str, now: Millis) -> bool {
        self.map.get(name).is_some_and(|slot| now < slot.expires_at)
    }

    fn remove(&mut self, name: &str) -> Option<V> {
        let (key, slot) = self.map.remove_entry(name)?;
        self.by_expiry.remove(&(slot.expires_at, key));
        Some(slot.value)
    }

    /// Drops up to `PURGE_BATCH` expired entries.
    fn purge(&mut self, now: Millis) {
        for _ in 0..PURGE_BATCH {
            match self.by_expiry.first() {
                Some((expires_at, _)) if *expires_at <= now => {
                    self.evict_soonest();
                }
                _ => break,
            }
        }
    }

    /// Drops the soonest-expiring entry; false when the table is empty.
    fn evict_soonest(&mut self) -> bool {
        match self.by_expiry.pop_first() {
            Some((_, key)) => {
                self.map.remove(&key);
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// Live entries (name, value, expires_at), soonest-expiring first.
    fn live(&self, now: Millis) -> Vec<(String, V, Millis)> {
        let live = self.by_expiry.iter().filter(|(at, _)| now < *at);
        let owned = |(at, name): &(Millis, Arc<str>)| {
            let slot = self.map.get(name)?;
            Some((name.to_string(), slot.value.clone(), *at))
        };
        live.filter_map(owned).collect()
    }
}

/// Bounded, expiring map from resource name ("files/abc") to its owner.
pub struct Affinity {
    table: Mutex<Table<Owner>>,
}

impl Affinity {
    /// An empty table holding at most `capacity` resources (0 keeps nothing: affinity off).
    pub fn new(capacity: usize) -> Affinity {
        Affinity {
            table: Mutex::new(Table::new(capacity)),
        }
    }

    /// Records that `owner` created `name` (expires after the kind's ttl), replacing any earlier
    /// owner. Full table: expired entries go first, then the entry expiring soonest. Names that are
    /// not a single `<collection>/<id>` of a known kind are ignored: nothing would ever look them up.
    pub fn bind(&self, name: &str, owner: Owner, now: Millis) {
        let Some(kind) = kind_of(name) else {
            return;
        };
        let expires_at = expiry(now, kind.ttl());
        lock(&self.table).insert(name, owner, expires_at, now);
    }

    /// Records that `owner` created `name` unless another owner holds it now (a different tenant
    /// or project): a live binding is never taken over, so no request can move another tenant's
    /// resource to itself. Returns whether `name` is now `owner`'s.
    pub fn bind_new(&self, name: &str, owner: Owner, now: Millis) -> bool {
        let Some(kind) = kind_of(name) else {
            return false;
        };
        let mut table = lock(&self.table);
        if let Some(current) = table.get(name, now) {
            if *current != owner {
                return false;
            }
        }
        let expires_at = expiry(now, kind.ttl());
        table.insert(name, owner, expires_at, now)
    }

    /// The live owner of `name`.
    pub fn owner(&self, name: &str, now: Millis) -> Option<Owner> {
        lock(&self.table).get(name, now).cloned()
    }

    /// Forgets `name` (after a successful DELETE).
    pub fn forget(&self, name: &str) {
        lock(&self.table).remove(name);
    }

    /// How many entries the table holds, counting expired ones not yet dropped (they go lazily,
    /// on lookup and when new entries are bound).
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// Whether the table holds no entries at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries (name, owner, expires_at), soonest-expiring first, for saving to a state file.
    pub fn entries(&self, now: Millis) -> Vec<(String, Owner, Millis)> {
        lock(&self.table).live(now)
    }

    /// Puts back saved entries, skipping expired ones, names of unknown kinds and names already
    /// bound (a live binding is newer than the saved state). An expiry further away than the
    /// kind's ttl (a clock that went back, an edited file) is cut to the ttl. When the entries
    /// exceed the capacity, the ones expiring soonest are dropped.
    pub fn restore(&self, entries: Vec<(String, Owner, Millis)>, now: Millis) {
        let mut table = lock(&self.table);
        for (name, owner, expires_at) in entries {
            let Some(kind) = kind_of(&name) else {
                continue;
            };
            if table.contains_live(&name, now) {
                continue;
            }
            let expires_at = expires_at.min(expiry(now, kind.ttl()));
            table.insert(&name, owner, expires_at, now);
        }
    }
}

/// A resumable upload keygate handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSession {
    /// The pool, project and tenant that started the upload: where the bytes must go.
    pub owner: Owner,
    /// Fingerprint of the key that started it (for logs and the admin API); the key itself is never stored here.
    pub key_fingerprint: String,
    /// Google's upload URL's path and query (e.g. "/upload/v1beta/files?upload_id=XYZ&upload_protocol=resumable"), where the bytes go.
    pub upstream_path_and_query: String,
}

/// Bounded, expiring map from keygate's own upload ids to upload sessions.
pub struct Uploads {
    table: Mutex<Table<UploadSession>>,
}

impl Uploads {
    /// An empty table holding at most `capacity` sessions; when full, the oldest session goes
    /// (all sessions live equally long, so soonest-expiring is oldest).
    pub fn new(capacity: usize) -> Uploads {
        Uploads {
            table: Mutex::new(Table::new(capacity)),
        }
    }

    /// Registers a session and returns a fresh id: 32 lowercase hex chars from 16 bytes of the OS
    /// random source, so ids cannot be guessed. None if randomness is unavailable (never a weak id)
    /// or the capacity is 0. Sessions live 7 days (Google's resumable sessions last about a week).
    pub fn start(&self, session: UploadSession, now: Millis) -> Option<String> {
        let expires_at = expiry(now, UPLOAD_TTL);
        for _ in 0..ID_ATTEMPTS {
            // Drawn before locking: the system call stays out of the critical section.
            let id = fresh_id()?;
            let mut table = lock(&self.table);
            if table.map.contains_key(id.as_str()) {
                continue;
            }
            return table.insert(&id, session, expires_at, now).then_some(id);
        }
        None
    }

    /// The live session behind keygate's upload id `id`.
    pub fn get(&self, id: &str, now: Millis) -> Option<UploadSession> {
        lock(&self.table).get(id, now).cloned()
    }

    /// Takes in a session another instance started, live until `expires_at` (at most
    /// [`UPLOAD_TTL`] from `now`); a session known here already is kept.
    pub fn adopt(&self, id: &str, session: UploadSession, expires_at: Millis, now: Millis) {
        let mut table = lock(&self.table);
        if !table.contains_live(id, now) {
            table.insert(id, session, expires_at.min(expiry(now, UPLOAD_TTL)), now);
        }
    }

    /// Live sessions (id, session, expires_at), for writing back to the fleet's store.
    pub fn entries(&self, now: Millis) -> Vec<(String, UploadSession, Millis)> {
        lock(&self.table).live(now)
    }

    /// Ends a session (after the finalize answer).
    pub fn finish(&self, id: &str) {
        lock(&self.table).remove(id);
    }
}

/// 16 random bytes as 32 lowercase hex characters; None if the OS random source fails.
fn fresh_id() -> Option<String> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

/// `path?query` with the value of any `upload_id` parameter replaced by `…`: an upload id is
/// the credential of a token-less upload continuation, so it stays out of logs.
pub fn redact_upload_id(path_and_query: &str) -> Cow<'_, str> {
    let Some((path, query)) = path_and_query
        .split_once('?')
        .filter(|(_, q)| q.contains("upload_id="))
    else {
        return Cow::Borrowed(path_and_query);
    };
    let query: Vec<&str> = query
        .split('&')
        .map(|pair| {
            if pair.starts_with("upload_id=") {
                "upload_id=…"
            } else {
                pair
            }
        })
        .collect();
    Cow::Owned(format!("{path}?{}", query.join("&")))
}

/// The `upload_id` parameter of a query string (a leading `?` is allowed; percent-decoding is not
/// needed: ids are URL-safe; other params are ignored). None when absent or empty.
pub fn upload_id_of(query: &str) -> Option<&str> {
    let query = query.strip_prefix('?').unwrap_or(query);
    query
        .split('&')
        .find_map(|param| param.strip_prefix("upload_id="))
        .filter(|id| !id.is_empty())
}

/// Splits Google's absolute upload URL into its path and query ("/upload/v1beta/files?upload_id=..&upload_protocol=resumable");
/// None if it is not an absolute http(s) URL or has no upload_id. A fragment is dropped; spaces and
/// control characters are refused, since the result goes into a request line.
pub fn upstream_path_of(upload_url: &str) -> Option<String> {
    let url = upload_url.trim();
    let rest = strip_prefix_ascii_nocase(url, "https://")
        .or_else(|| strip_prefix_ascii_nocase(url, "http://"))?;
    let cut = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(cut);
    if authority.is_empty() || url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return None;
    }
    let tail = tail.split_once('#').map_or(tail, |(tail, _fragment)| tail);
    let (path, query) = tail.split_once('?')?;
    upload_id_of(query)?;
    let path = if path.is_empty() { "/" } else { path };
    Some(format!("{path}?{query}"))
}

/// `s` without `prefix`, compared ASCII case-insensitively (URL schemes are case-insensitive).
fn strip_prefix_ascii_nocase<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s.get(prefix.len()..))
        .flatten()
}

/// The URL handed to the client: `public_base` (e.g. "http://127.0.0.1:8080", no trailing slash) + Google's path with the
/// `upload_id` value replaced by keygate's `id` and the other query parameters kept in order. Any further
/// `upload_id` parameter is dropped so Google's id never reaches the client; one is appended if there was none.
pub fn rewrite_upload_url(upstream_path_and_query: &str, public_base: &str, id: &str) -> String {
    let (path, query) = upstream_path_and_query
        .split_once('?')
        .unwrap_or((upstream_path_and_query, ""));
    let mut params: Vec<String> = Vec::new();
    let mut replaced = false;
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let is_upload_id = param == "upload_id" || param.starts_with("upload_id=");
        if !is_upload_id {
            params.push(param.to_owned());
        } else if !replaced {
            params.push(format!("upload_id={id}"));
            replaced = true;
        }
    }
    if !replaced {
        params.push(format!("upload_id={id}"));
    }
    let base = public_base.trim_end_matches('/');
    format!("{base}{path}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Millis = 3600 * 1000;
    const DAY: Millis = 24 * H;

    fn owner(project: &str) -> Owner {
        Owner {
            pool: Arc::from("main"),
            project: Arc::from(project),
            tenant: Some(Arc::from("acme")),
        }
    }

    fn session(project: &str) -> UploadSession {
        UploadSession {
            owner: owner(project),
            key_fingerprint: "fp-1234".into(),
            upstream_path_and_query: "/upload/v1beta/files?upload_id=XYZ&upload_protocol=resumable"
                .into(),
        }
    }

    #[test]
    fn affinity_expires_after_ttl() {
        let table = Affinity::new(10);
        let t = 1_000_000;
        table.bind("files/a", owner("p1"), t);
        table.bind("tunedModels/m", owner("p2"), t);
        assert_eq!(table.owner("files/a", t), Some(owner("p1")));
        assert_eq!(table.owner("files/a", t + 48 * H - 1), Some(owner("p1")));
        assert_eq!(table.owner("files/a", t + 48 * H), None);
        assert_eq!(
            table.owner("tunedModels/m", t + 30 * DAY - 1),
            Some(owner("p2"))
        );
        assert_eq!(table.owner("tunedModels/m", t + 30 * DAY), None);
        assert!(table.is_empty());
        // Unknown kinds and malformed names are never stored.
        table.bind("models/x", owner("p1"), t);
        table.bind("files/a/b", owner("p1"), t);
        assert!(table.is_empty());
        // Rebinding replaces the owner and restarts the clock.
        table.bind("files/b", owner("p1"), t);
        table.bind("files/b", owner("p3"), t + H);
        assert_eq!(table.len(), 1);
        assert_eq!(table.owner("files/b", t + 48 * H), Some(owner("p3")));
        // Saturating expiry near the end of time.
        table.bind("files/c", owner("p1"), Millis::MAX - 1);
        assert_eq!(table.owner("files/c", Millis::MAX - 1), Some(owner("p1")));
    }

    #[test]
    fn affinity_capacity_evicts_expired_then_soonest() {
        let table = Affinity::new(3);
        table.bind("tunedModels/long", owner("p"), 0); // expires at 30 d
        table.bind("files/short", owner("p"), 0); // expires at 48 h
        table.bind("batches/mid", owner("p"), 0); // expires at 7 d
        assert_eq!(table.len(), 3);
        // Full and nothing expired: the soonest-expiring entry (the file) goes.
        table.bind("operations/new", owner("p"), H);
        assert_eq!(table.len(), 3);
        assert_eq!(table.owner("files/short", H), None);
        for name in ["tunedModels/long", "batches/mid", "operations/new"] {
            assert!(table.owner(name, H).is_some(), "{name}");
        }
        // At 7 d + 1 h the batch has expired: it goes before the operation (which expires
        // sooner than anything else still live).
        let later = 7 * DAY + 30 * 60 * 1000;
        table.bind("files/next", owner("p"), later);
        assert_eq!(table.len(), 3);
        assert_eq!(table.owner("batches/mid", later), None);
        assert!(table.owner("operations/new", later).is_some());
        assert!(table.owner("files/next", later).is_some());
        assert!(table.owner("tunedModels/long", later).is_some());
        // Capacity 0 keeps nothing.
        let off = Affinity::new(0);
        off.bind("files/a", owner("p"), 0);
        assert!(off.is_empty());
        assert_eq!(off.owner("files/a", 0), None);
    }

    #[test]
    fn a_live_binding_is_never_taken_over() {
        let table = Affinity::new(10);
        assert!(table.bind_new("files/a", owner("p1"), 0));
        assert!(!table.bind_new("files/a", owner("p2"), 1));
        assert_eq!(table.owner("files/a", 2), Some(owner("p1")));
        let mut other_tenant = owner("p1");
        other_tenant.tenant = Some(Arc::from("mallory"));
        assert!(!table.bind_new("files/a", other_tenant, 3));
        // The same owner refreshes it; once expired, the name is free again.
        assert!(table.bind_new("files/a", owner("p1"), 4));
        assert!(table.bind_new("files/a", owner("p2"), 4 + 48 * H));
        assert!(!table.bind_new("models/x", owner("p1"), 0));
    }

    #[test]
    fn affinity_forget() {
        let table = Affinity::new(4);
        table.bind("files/a", owner("p1"), 0);
        table.bind("files/b", owner("p1"), 0);
        table.forget("files/a");
        table.forget("files/unknown");
        assert_eq!(table.owner("files/a", 1), None);
        assert_eq!(table.owner("files/b", 1), Some(owner("p1")));
        assert_eq!(table.len(), 1);
        assert_eq!(table.entries(1).len(), 1);
    }

    #[test]
    fn affinity_entries_restore_round_trip() {
        let table = Affinity::new(10);
        table.bind("files/old", owner("p1"), 0);
        table.bind("cachedContents/c", owner("p2"), 10 * H);
        table.bind("tunedModels/t", owner("p3"), 10 * H);
        let now = 50 * H; // the file has expired
        let saved = table.entries(now);
        assert_eq!(
            saved,
            vec![
                (
                    "cachedContents/c".to_string(),
                    owner("p2"),
                    10 * H + 7 * DAY
                ),
                ("tunedModels/t".to_string(), owner("p3"), 10 * H + 30 * DAY),
            ]
        );
        let mut with_expired = saved.clone();
        with_expired.push(("files/old".into(), owner("p1"), 48 * H));
        with_expired.push(("models/bad".into(), owner("p1"), now + H));
        let fresh = Affinity::new(10);
        fresh.restore(with_expired, now);
        assert_eq!(fresh.entries(now), saved);
        assert_eq!(fresh.len(), 2);
        // A saved expiry beyond the kind's ttl is cut to the ttl.
        let clamped = Affinity::new(10);
        clamped.restore(vec![("files/f".into(), owner("p1"), Millis::MAX)], now);
        assert_eq!(clamped.entries(now)[0].2, now + 48 * H);
        // A live binding wins over the saved state.
        let live = Affinity::new(10);
        live.bind("tunedModels/t", owner("p9"), now);
        live.restore(saved.clone(), now);
        assert_eq!(live.owner("tunedModels/t", now), Some(owner("p9")));
        // Restoring more than the capacity keeps the latest-expiring entries.
        let small = Affinity::new(1);
        small.restore(saved, now);
        assert_eq!(small.len(), 1);
        assert_eq!(small.owner("tunedModels/t", now), Some(owner("p3")));
    }

    #[test]
    fn uploads_start_get_finish() {
        let uploads = Uploads::new(8);
        let id = uploads.start(session("p1"), 0).expect("random id");
        assert_eq!(uploads.get(&id, 1), Some(session("p1")));
        assert_eq!(uploads.get("0123456789abcdef0123456789abcdef", 1), None);
        assert_eq!(uploads.get("", 1), None);
        uploads.finish(&id);
        assert_eq!(uploads.get(&id, 1), None);
        uploads.finish(&id); // twice is harmless
    }

    #[test]
    fn upload_ids_unique_and_hex() {
        let uploads = Uploads::new(1000);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let id = uploads.start(session("p"), 0).expect("random id");
            assert_eq!(id.len(), 32);
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            assert!(seen.insert(id));
        }
    }

    #[test]
    fn uploads_expire_after_seven_days() {
        let uploads = Uploads::new(8);
        let t = 5_000;
        let id = uploads.start(session("p1"), t).expect("random id");
        assert!(uploads.get(&id, t + 7 * DAY - 1).is_some());
        assert_eq!(uploads.get(&id, t + 7 * DAY), None);
    }

    #[test]
    fn uploads_capacity_bound() {
        let uploads = Uploads::new(3);
        let ids: Vec<String> = (0..5)
            .map(|i| uploads.start(session("p"), i).expect("random id"))
            .collect();
        assert_eq!(lock(&uploads.table).len(), 3);
        // The oldest sessions made room for the newest.
        assert_eq!(uploads.get(&ids[0], 10), None);
        assert_eq!(uploads.get(&ids[1], 10), None);
        for id in &ids[2..] {
            assert!(uploads.get(id, 10).is_some());
        }
        assert_eq!(Uploads::new(0).start(session("p"), 0), None);
    }

    #[test]
    fn upload_id_parsing() {
        assert_eq!(
            upload_id_of("upload_id=XYZ&upload_protocol=resumable"),
            Some("XYZ")
        );
        assert_eq!(
            upload_id_of("?upload_protocol=resumable&upload_id=A-b_c"),
            Some("A-b_c")
        );
        assert_eq!(upload_id_of("upload_protocol=resumable"), None);
        assert_eq!(upload_id_of("upload_id="), None);
        assert_eq!(upload_id_of("xupload_id=1"), None);
        assert_eq!(upload_id_of(""), None);
    }

    #[test]
    fn upstream_path_parsing() {
        let url = "https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id=XYZ&upload_protocol=resumable";
        assert_eq!(
            upstream_path_of(url).as_deref(),
            Some("/upload/v1beta/files?upload_id=XYZ&upload_protocol=resumable")
        );
        assert_eq!(
            upstream_path_of("HTTP://127.0.0.1:9999/upload/v1beta/files?upload_id=1#frag")
                .as_deref(),
            Some("/upload/v1beta/files?upload_id=1")
        );
        assert_eq!(
            upstream_path_of("http://host?upload_id=1").as_deref(),
            Some("/?upload_id=1")
        );
        for bad in [
            "",
            "/upload/v1beta/files?upload_id=XYZ",
            "upload/v1beta/files?upload_id=XYZ",
            "ftp://host/upload?upload_id=XYZ",
            "https:///upload?upload_id=XYZ",
            "https://host/upload/v1beta/files",
            "https://host/upload/v1beta/files?upload_protocol=resumable",
            "https://host/upload?upload_id=X\r\nInjected: 1",
            "https://host/up load?upload_id=X",
            "héhé",
        ] {
            assert_eq!(upstream_path_of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn upload_url_rewrite() {
        let upstream = "/upload/v1beta/files?upload_id=XYZ&upload_protocol=resumable";
        assert_eq!(
            rewrite_upload_url(upstream, "http://127.0.0.1:8080", "0123abcd"),
            "http://127.0.0.1:8080/upload/v1beta/files?upload_id=0123abcd&upload_protocol=resumable"
        );
        assert_eq!(
            rewrite_upload_url(
                "/upload/v1beta/files?alt=json&upload_id=XYZ&upload_protocol=resumable&upload_id=OTHER",
                "https://gw.example/",
                "id1"
            ),
            "https://gw.example/upload/v1beta/files?alt=json&upload_id=id1&upload_protocol=resumable"
        );
        assert_eq!(
            rewrite_upload_url("/upload/v1beta/files", "http://gw", "id2"),
            "http://gw/upload/v1beta/files?upload_id=id2"
        );
        // Round trip: the rewritten URL's id is what upload_id_of finds on the way back.
        let handed = rewrite_upload_url(upstream, "http://gw", "feed");
        let query = handed.split_once('?').map(|(_, q)| q).unwrap_or("");
        assert_eq!(upload_id_of(query), Some("feed"));
    }

    #[test]
    fn upload_ids_are_redacted_for_logs_and_other_targets_untouched() {
        assert_eq!(
            redact_upload_id("/upload/v1beta/files?upload_id=abc123&upload_protocol=resumable"),
            "/upload/v1beta/files?upload_id=…&upload_protocol=resumable"
        );
        assert!(matches!(
            redact_upload_id("/v1beta/models/m:streamGenerateContent?alt=sse"),
            Cow::Borrowed("/v1beta/models/m:streamGenerateContent?alt=sse")
        ));
        assert!(matches!(
            redact_upload_id("/v1beta/files"),
            Cow::Borrowed(_)
        ));
    }
}
