//! Several keygate instances as one, through Redis (the `redis:` section).
//!
//! The hot path stays local: picking a key reads only this instance's table. Every health
//! change made here goes through the door as before, and is then told to the others: published
//! on a channel (they learn it within milliseconds) and written as an entry (see
//! [`store`]) that an instance starting, or coming back after an outage, loads. Telling never
//! waits: changes queue for a background writer, and a request never waits on Redis.
//!
//! Redis down, slow or wiped: every call has a short timeout; the instance goes on with its own
//! table, logs the loss once, and reports it (`/readyz`, `keygate_redis_up`). When Redis
//! answers again, the instance writes back what it learnt meanwhile (the later deadline wins)
//! and loads what the others wrote.

mod cache;
mod chores;
mod counters;
mod limits;
mod local;
mod owners;
mod probes;
mod series;
mod store;
mod sync;
mod versions;

pub use cache::FleetCache;
pub use counters::FleetCounters;
pub use limits::FleetLimits;
pub use owners::FleetOwners;
pub use probes::FleetProbes;
pub use series::FleetSeries;

use crate::config::RedisConfig;
use crate::quota::keys::{now_millis, News};
use crate::runtime::health::Announce;
use crate::runtime::Shared;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Names, Write};
use tokio::sync::{mpsc, Notify};

/// Changes waiting for the writer; past this, they are dropped and a full write-back follows.
const QUEUE: usize = 4096;

/// The largest message read from the channel: a change is a few hundred bytes.
const MAX_MESSAGE: usize = 64 * 1024;

/// How long a (re)connection attempt may take, and the wait between two attempts.
const RECONNECT: Duration = Duration::from_secs(1);

/// A change told to the other instances.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Envelope {
    /// The instance that made it.
    from: String,
    /// The pool it is in.
    pool: String,
    /// What changed.
    news: Vec<News>,
    /// When it changed, on the clock of the instance that made it (see [`versions`]).
    #[serde(default)]
    at: crate::quota::keys::Millis,
}

/// This instance's link to the fleet.
pub struct Fleet {
    config: RedisConfig,
    /// This instance, in the envelopes it sends.
    id: String,
    client: redis::Client,
    connection: Mutex<Option<ConnectionManager>>,
    up: AtomicBool,
    /// A write-back and load is due (connected anew, subscription renewed).
    behind: AtomicBool,
    /// Changes made while Redis did not answer, in order, to replay before loading: so that an
    /// enable or a clear made meanwhile is not undone by the entries it deleted.
    journal: Mutex<std::collections::VecDeque<Envelope>>,
    /// The journal overflowed or the queue was full: a change is lost, write everything back.
    lost: AtomicBool,
    /// A health change was made here since start: a cold start may no longer let the store's
    /// health replace this instance's.
    changed_here: AtomicBool,
    /// Wakes the keeper for a write-back and load.
    resync: Notify,
    queue: mpsc::Sender<Envelope>,
    queued: Mutex<Option<mpsc::Receiver<Envelope>>>,
    /// Tenant concurrency slots this instance holds in Redis.
    held: limits::Held,
    /// Background writes (slots given back, owners and uploads written through).
    chores: mpsc::Sender<chores::Chore>,
    queued_chores: Mutex<Option<mpsc::Receiver<chores::Chore>>>,
    /// A tenant's limit entries were found foreign once (said once).
    foreign_limit_warned: AtomicBool,
    /// An owner or upload entry was found foreign once (said once).
    foreign_owner_warned: AtomicBool,
    /// When penalties and clears were last learnt here, by scope.
    versions: versions::Versions,
    /// The usage counters told to the fleet, and the fleet's sums.
    counted: Mutex<counters::Counted>,
    /// Bumped when the link breaks: the threads' own connections are made anew.
    link_generation: std::sync::atomic::AtomicU64,
    /// Threads' own connections made in the background, waiting for their thread.
    made: local::Made,
}

impl Fleet {
    /// The link for `config`; nothing is connected until the service runs.
    pub fn new(config: &RedisConfig) -> Result<Arc<Fleet>, String> {
        let info = redis::ConnectionInfo {
            addr: if config.tls {
                redis::ConnectionAddr::TcpTls {
                    host: config.host.clone(),
                    port: config.port,
                    insecure: false,
                    tls_params: None,
                }
            } else {
                redis::ConnectionAddr::Tcp(config.host.clone(), config.port)
            },
            redis: redis::RedisConnectionInfo {
                db: config.db,
                username: config.username.clone(),
                password: config.password.as_ref().map(|p| p.expose().to_string()),
                ..Default::default()
            },
        };
        let client = match &config.tls_ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("redis.tls_ca_file {}: {}", path.display(), e.kind()))?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
        .map_err(|e| format!("redis: {e}"))?;
        let (queue, queued) = mpsc::channel(QUEUE);
        let (chores, queued_chores) = mpsc::channel(QUEUE);
        Ok(Arc::new(Fleet {
            config: config.clone(),
            id: instance_id(),
            client,
            connection: Mutex::new(None),
            up: AtomicBool::new(false),
            behind: AtomicBool::new(true),
            journal: Mutex::new(std::collections::VecDeque::new()),
            lost: AtomicBool::new(false),
            changed_here: AtomicBool::new(false),
            resync: Notify::new(),
            queue,
            queued: Mutex::new(Some(queued)),
            held: limits::Held::default(),
            chores,
            queued_chores: Mutex::new(Some(queued_chores)),
            foreign_limit_warned: AtomicBool::new(false),
            foreign_owner_warned: AtomicBool::new(false),
            versions: versions::Versions::default(),
            counted: Mutex::default(),
            link_generation: std::sync::atomic::AtomicU64::new(0),
            made: local::Made::default(),
        }))
    }

    /// Where Redis is, for logs (no credentials).
    pub fn url(&self) -> String {
        self.config.display_url()
    }

    fn channel(&self) -> String {
        format!("{}news", self.config.key_prefix)
    }

    /// The marker saying the store holds the fleet's health (absent: new or wiped).
    fn marker(&self) -> String {
        format!("{}live", self.config.key_prefix)
    }

    /// The connection, made if there is none yet.
    async fn connection(&self) -> Option<ConnectionManager> {
        if let Some(c) = self.lock().clone() {
            return Some(c);
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(RECONNECT)
            .set_response_timeout(self.config.timeout)
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            RECONNECT * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                *self.lock() = Some(c.clone());
                Some(c)
            }
            _ => None,
        }
    }

    /// Whether Redis answered lately (the request path asks only then).
    fn is_up_now(&self) -> bool {
        self.up.load(Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ConnectionManager>> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Redis answered, and this instance's table and the store's are in step.
    fn went_up(&self) {
        if !self.up.swap(true, Relaxed) {
            log::warn!(
                "redis at {}: connected; health is shared with the other instances",
                self.url()
            );
        }
    }

    /// Redis did not answer (in time).
    fn went_down(&self, why: &str) {
        self.behind.store(true, Relaxed);
        self.new_link();
        if self.up.swap(false, Relaxed) {
            log::warn!(
                "redis at {}: {why}; keygate goes on with its own table and writes back what it learns when Redis answers again",
                self.url()
            );
        }
    }
}

impl Announce for Fleet {
    fn announce(&self, pool: &str, news: Vec<News>) {
        if news.is_empty() {
            return;
        }
        let at = now_millis();
        self.versions.made(pool, &news, at);
        let envelope = Envelope {
            from: self.id.clone(),
            pool: pool.to_string(),
            news,
            at,
        };
        self.changed_here.store(true, Relaxed);
        if self.queue.try_send(envelope).is_err() {
            self.lost.store(true, Relaxed);
            self.behind.store(true, Relaxed);
        }
    }

    fn is_up(&self) -> bool {
        self.is_up_now()
    }
}

/// A name for this instance: its process id and start time, in hex.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}-{:x}", std::process::id(), nanos)
}

/// The background service that keeps this instance in the fleet: the writer, the listener and
/// the keeper (reconnecting, writing back, loading).
pub struct FleetService {
    fleet: Arc<Fleet>,
    shared: Arc<Shared>,
}

impl FleetService {
    /// The service for `fleet`, serving `shared`.
    pub fn new(fleet: Arc<Fleet>, shared: Arc<Shared>) -> FleetService {
        FleetService { fleet, shared }
    }
}

#[async_trait]
impl BackgroundService for FleetService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let queued = self
            .fleet
            .queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let chores = self
            .fleet
            .queued_chores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (Some(queued), Some(chores)) = (queued, chores) else {
            return;
        };
        tokio::select! {
            _ = writer(&self.fleet, &self.shared, queued) => {}
            _ = chores::run(&self.fleet, chores) => {}
            _ = limits::renewer(&self.fleet) => {}
            _ = series::writer(&self.fleet, &self.shared) => {}
            _ = counters::writer(&self.fleet, &self.shared) => {}
            _ = listener(&self.fleet, &self.shared) => {}
            _ = sync::keeper(&self.fleet, &self.shared) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Publishes and stores each change made here, in order.
async fn writer(fleet: &Fleet, shared: &Shared, mut queued: mpsc::Receiver<Envelope>) {
    while let Some(envelope) = queued.recv().await {
        if !fleet.is_up() {
            fleet.keep(envelope);
            continue;
        }
        let Some(mut c) = fleet.connection().await else {
            fleet.went_down("cannot connect");
            fleet.keep(envelope);
            continue;
        };
        let mut writes = Vec::new();
        let names = Names::new(&fleet.config.key_prefix, &envelope.pool);
        for news in &envelope.news {
            writes.extend(names.writes(&envelope.pool, news, envelope.at));
            writes.extend(after(shared, &names, &envelope.pool, news));
        }
        match tokio::time::timeout(
            fleet.config.timeout * 4,
            send(fleet, &mut c, &envelope, &writes),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                fleet.went_down(&format!("write failed ({})", e.kind_label()));
                fleet.keep(envelope);
            }
            Err(_) => {
                fleet.went_down("write timed out");
                fleet.keep(envelope);
            }
        }
    }
}

/// Stores `writes` and publishes `envelope`.
async fn send(
    fleet: &Fleet,
    c: &mut ConnectionManager,
    envelope: &Envelope,
    writes: &[Write],
) -> redis::RedisResult<()> {
    apply(c, writes).await?;
    let message = serde_json::to_string(envelope).unwrap_or_default();
    c.publish::<_, _, ()>(fleet.channel(), message).await
}

/// Most changes kept while Redis does not answer; past it, a full write-back replaces them.
const JOURNAL: usize = 4096;

impl Fleet {
    /// Keeps a change Redis did not take, for the replay when it answers again.
    fn keep(&self, envelope: Envelope) {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        if journal.len() >= JOURNAL {
            self.lost.store(true, Relaxed);
        } else {
            journal.push_back(envelope);
        }
        self.behind.store(true, Relaxed);
    }
}

/// Deletions that depend on this instance's table once a change is applied: a key recovered
/// (its entry goes unless an operator disabled it) or a probe served (a cap's entry goes once
/// the cap is gone).
fn after(shared: &Shared, names: &Names<'_>, pool: &str, news: &News) -> Vec<Write> {
    let rt = shared.runtime.load();
    let Some(p) = rt.pools.iter().find(|p| p.name() == pool) else {
        return Vec::new();
    };
    let keys = p.keys.load();
    let now = now_millis();
    let mut writes = Vec::new();
    match news {
        News::Recovered { key } if keys.find(key).is_some_and(|id| keys.disabled(id).is_none()) => {
            writes.push(names.delete_key(key));
        }
        News::Served {
            project, account, ..
        } => {
            let caps = keys.caps(now);
            for (scope, name) in [("project", project), ("billing_account", account)] {
                if !caps
                    .iter()
                    .any(|c| c.kind.scope().as_str() == scope && &c.name == name)
                {
                    writes.push(names.delete_cap(scope, name));
                }
            }
        }
        _ => {}
    }
    writes
}

/// Carries out `writes` on `c`.
async fn apply(c: &mut ConnectionManager, writes: &[Write]) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    let mut matching = Vec::new();
    for w in writes {
        match w {
            Write::Lengthen {
                name,
                value,
                ttl_ms,
                at,
                cleared,
            } => {
                if *ttl_ms > 0 {
                    pipe.cmd("EVAL")
                        .arg(store::lengthen())
                        .arg(1 + cleared.len())
                        .arg(name)
                        .arg(cleared)
                        .arg(value)
                        .arg(*ttl_ms)
                        .arg(*at)
                        .ignore();
                }
            }
            Write::Tombstone { name, value, at } => {
                pipe.cmd("EVAL")
                    .arg(store::tombstone())
                    .arg(1)
                    .arg(name)
                    .arg(value)
                    .arg(*at)
                    .arg(store::TOMBSTONE_MS)
                    .ignore();
            }
            Write::Put { name, value } => {
                pipe.cmd("SET").arg(name).arg(value).ignore();
            }
            Write::Delete { name } => {
                pipe.cmd("DEL").arg(name).ignore();
            }
            Write::DeleteMatching { pattern } => matching.push((pattern.clone(), None)),
            Write::DeleteOlder { pattern, at } => matching.push((pattern.clone(), Some(*at))),
        }
    }
    pipe.query_async::<()>(c).await?;
    for (pattern, at) in matching {
        let names = if pattern.contains('*') {
            scan(c, &pattern).await?
        } else {
            vec![pattern]
        };
        match at {
            None => {
                for name in names {
                    c.del::<_, ()>(name).await?;
                }
            }
            Some(at) if !names.is_empty() => {
                redis::cmd("EVAL")
                    .arg(store::delete_older())
                    .arg(names.len())
                    .arg(&names)
                    .arg(at)
                    .query_async::<()>(c)
                    .await?;
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Every entry name matching `pattern`.
async fn scan(c: &mut ConnectionManager, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut names = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500)
            .query_async(c)
            .await?;
        names.extend(batch);
        if next == 0 {
            return Ok(names);
        }
        cursor = next;
    }
}

/// Applies the changes other instances publish.
async fn listener(fleet: &Fleet, shared: &Shared) {
    use futures_util::StreamExt;
    let purges = cache::purge_channel(&fleet.config.key_prefix);
    loop {
        let subscribed = async {
            let mut pubsub = fleet.client.get_async_pubsub().await?;
            pubsub.subscribe(fleet.channel()).await?;
            pubsub.subscribe(&purges).await?;
            redis::RedisResult::Ok(pubsub)
        };
        let pubsub = match tokio::time::timeout(RECONNECT * 2, subscribed).await {
            Ok(Ok(p)) => p,
            _ => {
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        // Subscribed: whatever was missed before is in the store.
        fleet.resync.notify_one();
        cache::subscribed(shared).await;
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(text) = message.get_payload::<String>() else {
                continue;
            };
            if text.len() > MAX_MESSAGE {
                continue;
            }
            if message.get_channel_name() == purges {
                cache::purge_told(fleet, shared, text.as_bytes()).await;
                continue;
            }
            match serde_json::from_str::<Envelope>(&text) {
                Ok(e) if e.from == fleet.id => {}
                Ok(e) => {
                    let used = fleet.learn_versioned(shared, &e.pool, &e.news, e.at);
                    log::debug!(
                        "pool {}: learnt {used} of {} changes from instance {}",
                        e.pool,
                        e.news.len(),
                        e.from
                    );
                }
                Err(_) => log::warn!(
                    "redis channel {}: a message keygate does not understand; ignored",
                    fleet.channel()
                ),
            }
        }
        fleet.went_down("the subscription ended");
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The short name of a Redis error's kind, for log lines (never its text: it may echo a value).
trait KindLabel {
    fn kind_label(&self) -> String;
}

impl KindLabel for redis::RedisError {
    fn kind_label(&self) -> String {
        format!("{:?}", self.kind())
    }
}
