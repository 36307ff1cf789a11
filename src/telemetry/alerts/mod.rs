//! Optional webhook alerts: a JSON POST when a pool has no usable key, when a key is disabled
//! and when it works again.
//!
//! The request path only calls [`Alerts::notify`], which never blocks and never awaits: it
//! checks a small rate table (one entry per distinct event, bounded) and puts the event on a
//! bounded queue, dropping it (and counting the drop) when the same event went out less than
//! `min_interval` ago or when the queue is full. The [`AlertSender`] background service owns
//! the queue's other end and POSTs one event at a time through Pingora's connector, with its own
//! resolved peers ([`Upstream`]) and a bounded number of retries. It holds no key and shares
//! nothing with client traffic but the process.
//!
//! The webhook URL often is a credential itself (Slack and Discord put a token in the path), so
//! it is never logged or echoed: logs and errors name the host only.

mod sender;

use crate::config::endpoint::parse_webhook_url;
use crate::config::{AlertConfig, PoolConfig, Timeouts};
use crate::quota::classify::DeadReason;
use crate::quota::keys::Disabled;
use crate::telemetry::events::Recent;
use crate::upstream::Upstream;
use chrono::{DateTime, Utc};
pub use sender::AlertSender;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Events waiting to be sent; more are dropped.
const QUEUE: usize = 256;
/// Distinct events remembered for rate limiting; the oldest go first.
const RATE_TABLE: usize = 1024;
/// First wait before a retry; doubles each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most retries a config may ask for: with the backoff cap, about five minutes per event.
pub const MAX_RETRIES: u32 = 10;
/// How long the sender keeps flushing the queue once shutdown starts.
const FLUSH_BUDGET: Duration = Duration::from_secs(3);
/// How often the webhook's host name is looked up again (only when there is something to send).
const DNS_REFRESH: Duration = Duration::from_secs(60);
/// How long an idle webhook connection stays pooled.
const IDLE: Duration = Duration::from_secs(50);
/// Most answer body read (and thrown away) so the connection can be reused.
const MAX_DRAIN: usize = 64 * 1024;
/// Longest pool, model or reason copied into an alert.
const MAX_FIELD: usize = 200;
/// Longest name quoted in the human sentence.
const MAX_TEXT_NAME: usize = 80;

/// Something an operator should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// No key of `pool` can serve `model` (all cooling or disabled).
    PoolExhausted {
        /// The pool's name.
        pool: String,
        /// The model asked for.
        model: String,
        /// When the first cooling key is back, if any is cooling.
        retry_after_seconds: Option<u64>,
    },
    /// A key was disabled (`reason`: key_invalid, key_suspended, service_disabled,
    /// key_restricted, project_billing, disabled_by_operator).
    KeyDisabled {
        /// The pool's name.
        pool: String,
        /// The key's fingerprint (`key#1a2b3c4d5e6f`), never the key.
        key: String,
        /// Why.
        reason: Disabled,
    },
    /// A disabled key works again.
    KeyRecovered {
        /// The pool's name.
        pool: String,
        /// The key's fingerprint (`key#1a2b3c4d5e6f`), never the key.
        key: String,
    },
}

impl Event {
    fn kind(&self) -> &'static str {
        match self {
            Event::PoolExhausted { .. } => "pool_exhausted",
            Event::KeyDisabled { .. } => "key_disabled",
            Event::KeyRecovered { .. } => "key_recovered",
        }
    }

    fn pool(&self) -> &str {
        match self {
            Event::PoolExhausted { pool, .. }
            | Event::KeyDisabled { pool, .. }
            | Event::KeyRecovered { pool, .. } => pool,
        }
    }

    /// The key or the model: with the kind and the pool, what makes an event distinct.
    fn subject(&self) -> &str {
        match self {
            Event::PoolExhausted { model, .. } => model,
            Event::KeyDisabled { key, .. } | Event::KeyRecovered { key, .. } => key,
        }
    }

    /// The event with every string made safe to send: control characters removed, lengths
    /// capped, and anything in a key field that is not a fingerprint replaced by one.
    fn sanitized(self) -> Event {
        match self {
            Event::PoolExhausted {
                pool,
                model,
                retry_after_seconds,
            } => Event::PoolExhausted {
                pool: clip(&pool),
                model: clip(&model),
                retry_after_seconds,
            },
            Event::KeyDisabled { pool, key, reason } => Event::KeyDisabled {
                pool: clip(&pool),
                key: as_fingerprint(key),
                reason,
            },
            Event::KeyRecovered { pool, key } => Event::KeyRecovered {
                pool: clip(&pool),
                key: as_fingerprint(key),
            },
        }
    }

    /// One sentence for people, fit for Slack and Discord: names are in code spans, and
    /// characters that could mention someone or break the markup are replaced.
    fn text(&self) -> String {
        match self {
            Event::PoolExhausted {
                pool,
                model,
                retry_after_seconds,
            } => {
                let when = match retry_after_seconds {
                    Some(0) => "; the first key is back in a moment".to_string(),
                    Some(s) => format!("; the first key is back in about {}", human_seconds(*s)),
                    None => String::new(),
                };
                format!(
                    "keygate: pool {} has no usable key for model {} (all keys cooling or \
                     disabled){when}.",
                    code(pool),
                    code(model)
                )
            }
            Event::KeyDisabled { pool, key, reason } => format!(
                "keygate: key {} of pool {} was disabled: {}.",
                code(key),
                code(pool),
                reason_text(*reason)
            ),
            Event::KeyRecovered { pool, key } => format!(
                "keygate: key {} of pool {} works again.",
                code(key),
                code(pool)
            ),
        }
    }
}

/// An alert the sender is done with, for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentAlert {
    /// When the event happened.
    pub at: DateTime<Utc>,
    /// `pool_exhausted`, `key_disabled` or `key_recovered`.
    pub kind: &'static str,
    /// The sentence the webhook got.
    pub text: String,
    /// `delivered`, or why not (`failed: HTTP 500`).
    pub result: String,
}

/// How many sent alerts are kept for the dashboard.
const HISTORY: usize = 50;

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertStats {
    /// Events the webhook accepted (2xx).
    pub delivered: u64,
    /// Events not queued: `rate_limited + queue_full`.
    pub dropped: u64,
    /// Of `dropped`: the same event was queued less than `min_interval` before.
    pub rate_limited: u64,
    /// Of `dropped`: the queue was full (or the sender had stopped).
    pub queue_full: u64,
    /// Events given up on: refused (4xx other than 408/429, 3xx), out of retries, or still
    /// queued when shutdown ended the sender.
    pub failed: u64,
}

/// The alerting handle: cheap to clone and to call from the request path.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Inner>,
}

struct Inner {
    min_interval: Duration,
    retries: u32,
    timeout: Duration,
    first_backoff: Duration,
    /// The request target: the path and query, and the absolute URI for HTTP/2.
    path: String,
    uri: http::Uri,
    upstream: Upstream,
    tx: mpsc::Sender<Queued>,
    /// Taken by the sender when it starts.
    rx: Mutex<Option<mpsc::Receiver<Queued>>>,
    recent: Mutex<RateTable>,
    /// The last alerts sent (or given up on), newest first.
    history: Recent<SentAlert>,
    delivered: AtomicU64,
    rate_limited: AtomicU64,
    queue_full: AtomicU64,
    failed: AtomicU64,
}

/// An event and when it happened.
struct Queued {
    event: Event,
    at: DateTime<Utc>,
}

impl Alerts {
    /// Parses and checks the configuration. The error says what is wrong without repeating the
    /// URL (whose path may be a secret).
    pub fn new(config: AlertConfig) -> Result<Alerts, String> {
        Alerts::build(config, FIRST_BACKOFF, None)
    }

    /// [`Alerts::new`] with the first retry's backoff and a CA bundle to trust, for tests.
    fn build(
        config: AlertConfig,
        first_backoff: Duration,
        tls_ca_file: Option<std::path::PathBuf>,
    ) -> Result<Alerts, String> {
        let target = parse_webhook_url(&config.url)?;
        if config.timeout.is_zero() {
            return Err("the alert timeout must be more than zero".into());
        }
        if config.retries > MAX_RETRIES {
            return Err(format!(
                "at most {MAX_RETRIES} alert retries (got {})",
                config.retries
            ));
        }
        let pool = PoolConfig {
            name: "alerts".into(),
            upstream: target.upstream,
            keys: Vec::new(),
            key_variables: None,
            tls_ca_file,
            models: Vec::new(),
            proxy: None,
            cap_probe: Duration::from_secs(3600),
            fair_share: None,
            cache_shared_across_tenants: false,
        };
        let timeouts = Timeouts {
            connect: config.timeout,
            read: config.timeout,
            write: config.timeout,
            idle: IDLE,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok(Alerts {
            inner: Arc::new(Inner {
                min_interval: config.min_interval,
                retries: config.retries,
                timeout: config.timeout,
                first_backoff,
                path: target.path,
                uri: target.uri,
                upstream: Upstream::new(&pool, timeouts),
                tx,
                rx: Mutex::new(Some(rx)),
                recent: Mutex::new(RateTable::new(RATE_TABLE)),
                history: Recent::new(HISTORY),
                delivered: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                queue_full: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
        })
    }

    /// Queues an event: never blocks, never awaits, needs no runtime. Drops it (and counts the
    /// drop) if the same event (same kind, pool, and key or model) was queued less than
    /// `min_interval` ago, or if the queue is full.
    pub fn notify(&self, event: Event) {
        let inner = &*self.inner;
        let event = event.sanitized();
        let queued = Queued {
            at: Utc::now(),
            event,
        };
        if inner.min_interval.is_zero() {
            if inner.tx.try_send(queued).is_err() {
                inner.queue_full.fetch_add(1, Relaxed);
            }
            return;
        }
        let key = EventKey::of(&queued.event);
        let now = Instant::now();
        // Held across `try_send` (which never waits) so that two threads notifying the same
        // event at once queue it once.
        let mut recent = lock(&inner.recent);
        if recent.is_recent(&key, now, inner.min_interval) {
            inner.rate_limited.fetch_add(1, Relaxed);
            return;
        }
        match inner.tx.try_send(queued) {
            Ok(()) => recent.record(key, now, inner.min_interval),
            Err(_) => {
                inner.queue_full.fetch_add(1, Relaxed);
            }
        }
    }

    /// The sender, a background service: add it to the server once.
    pub fn service(&self) -> AlertSender {
        AlertSender {
            inner: self.inner.clone(),
        }
    }

    /// The last alerts the sender delivered or gave up on, newest first.
    pub fn history(&self) -> Vec<SentAlert> {
        self.inner.history.list()
    }

    /// Counters: delivered, dropped (rate-limited or queue full), failed.
    pub fn stats(&self) -> AlertStats {
        let i = &self.inner;
        let rate_limited = i.rate_limited.load(Relaxed);
        let queue_full = i.queue_full.load(Relaxed);
        AlertStats {
            delivered: i.delivered.load(Relaxed),
            dropped: rate_limited + queue_full,
            rate_limited,
            queue_full,
            failed: i.failed.load(Relaxed),
        }
    }
}

impl fmt::Debug for Alerts {
    /// Names the webhook's host only: its path is often a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.inner.upstream.tls() {
            "https"
        } else {
            "http"
        };
        f.debug_struct("Alerts")
            .field(
                "webhook",
                &format!("{scheme}://{}/…", self.inner.upstream.authority()),
            )
            .field("stats", &self.stats())
            .finish()
    }
}

/// What makes an event distinct for rate limiting.
#[derive(Clone, PartialEq, Eq, Hash)]
struct EventKey {
    kind: &'static str,
    pool: String,
    subject: String,
}

impl EventKey {
    fn of(event: &Event) -> EventKey {
        EventKey {
            kind: event.kind(),
            pool: event.pool().to_string(),
            subject: event.subject().to_string(),
        }
    }
}

/// When each distinct event was last queued, at most `cap` of them.
struct RateTable {
    last: HashMap<EventKey, Instant>,
    cap: usize,
}

impl RateTable {
    fn new(cap: usize) -> RateTable {
        RateTable {
            last: HashMap::new(),
            cap,
        }
    }

    fn is_recent(&self, key: &EventKey, now: Instant, min_interval: Duration) -> bool {
        self.last
            .get(key)
            .is_some_and(|&t| now.saturating_duration_since(t) < min_interval)
    }

    fn record(&mut self, key: EventKey, now: Instant, min_interval: Duration) {
        if self.last.len() >= self.cap && !self.last.contains_key(&key) {
            // Entries older than `min_interval` no longer limit anything: forget them first.
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < min_interval);
            while self.last.len() >= self.cap {
                let oldest = self
                    .last
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => self.last.remove(&k),
                    None => break,
                };
            }
        }
        self.last.insert(key, now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `text` without control characters, at most [`MAX_FIELD`] characters.
fn clip(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect()
}

/// A fingerprint stays; anything else (a key passed by mistake) becomes its fingerprint.
fn as_fingerprint(key: String) -> String {
    let is_fingerprint = key
        .strip_prefix("key#")
        .is_some_and(|hex| hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if is_fingerprint {
        key
    } else {
        crate::secret::fingerprint(key.as_bytes())
    }
}

/// A name in a code span, with what could end the span, mention someone (`@everyone`,
/// `<!channel>`) or be read as markup replaced, and cut to a readable length.
fn code(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('`');
    for (i, c) in name.chars().enumerate() {
        if i == MAX_TEXT_NAME {
            out.push('…');
            break;
        }
        out.push(match c {
            '`' | '<' | '>' | '&' | '@' | '|' | '*' | '~' => '?',
            c if c.is_control() => '?',
            c => c,
        });
    }
    out.push('`');
    out
}

/// The reason label in words.
fn reason_text(reason: Disabled) -> &'static str {
    match reason {
        Disabled::Dead(DeadReason::Invalid) => "Google says the key is not valid",
        Disabled::Dead(DeadReason::Suspended) => "Google suspended the key",
        Disabled::Dead(DeadReason::ServiceDisabled) => {
            "the Gemini API is not enabled in the key's project"
        }
        Disabled::Dead(DeadReason::Restricted) => {
            "the key's restrictions do not allow this API or caller"
        }
        Disabled::Billing => "the key's project is out of prepaid credit",
        Disabled::Operator => "an operator disabled it",
    }
}

/// `42 s`, `5 min`, `3 h`: rounded up, for a sentence.
fn human_seconds(s: u64) -> String {
    if s < 120 {
        format!("{s} s")
    } else if s < 2 * 3600 {
        format!("{} min", s.div_ceil(60))
    } else {
        format!("{} h", s.div_ceil(3600))
    }
}

#[cfg(test)]
mod tests;
