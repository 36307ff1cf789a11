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

use crate::config::endpoint::parse_webhook_url;
use crate::config::AlertConfig;
use crate::config::{PoolConfig, Timeouts};
use crate::quota::classify::DeadReason;
use crate::quota::keys::Disabled;
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::header;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
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
            tls_ca_file,
            models: Vec::new(),
            proxy: None,
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

/// The background service that POSTs queued events to the webhook, one at a time.
pub struct AlertSender {
    inner: Arc<Inner>,
}

/// The sender's state across events.
struct Run {
    /// Set when shutdown starts: the end of the flush.
    deadline: Option<Instant>,
    /// When the webhook host was last resolved.
    resolved_at: Option<Instant>,
}

impl Run {
    fn begin_flush(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + FLUSH_BUDGET);
        }
    }

    /// `wait`, cut to what is left of the flush.
    fn cap(&self, wait: Duration) -> Duration {
        match self.deadline {
            None => wait,
            Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        }
    }

    fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

#[async_trait]
impl BackgroundService for AlertSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = lock(&self.inner.rx).take() else {
            log::warn!("the alert sender is already running; not starting it twice");
            return;
        };
        let mut run = Run {
            deadline: None,
            resolved_at: None,
        };
        loop {
            let next = if run.deadline.is_none() {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        run.begin_flush();
                        continue;
                    }
                    next = rx.recv() => next,
                }
            } else {
                rx.try_recv().ok()
            };
            let Some(queued) = next else { break };
            self.deliver(queued, &mut shutdown, &mut run).await;
            if run.out_of_time() {
                break;
            }
        }
        rx.close();
        let mut left = 0;
        while rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            self.inner.failed.fetch_add(left, Relaxed);
            log::warn!("alerts: {left} event(s) not sent: shutting down");
        }
    }
}

impl AlertSender {
    /// Sends one event, retrying with backoff; counts the outcome.
    async fn deliver(&self, queued: Queued, shutdown: &mut ShutdownWatch, run: &mut Run) {
        let inner = &*self.inner;
        let body = Bytes::from(payload(&queued));
        let what = format!("{} for pool {}", queued.event.kind(), queued.event.pool());
        let attempts = inner.retries + 1;
        let mut backoff = inner.first_backoff;
        let mut last_error = String::new();
        let mut tried = 0;
        for attempt in 1..=attempts {
            let limit = run.cap(inner.timeout);
            if limit.is_zero() {
                break;
            }
            tried = attempt;
            let outcome = match tokio::time::timeout(limit, self.post(&body, run)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {limit:?}")),
            };
            match outcome {
                Ok(status) if (200..300).contains(&status) => {
                    inner.delivered.fetch_add(1, Relaxed);
                    log::debug!("alerts: {what} delivered (HTTP {status}, try {attempt})");
                    return;
                }
                Ok(status) if status >= 500 || status == 408 || status == 429 => {
                    last_error = format!("HTTP {status}");
                }
                Ok(status) => {
                    inner.failed.fetch_add(1, Relaxed);
                    log::warn!(
                        "alerts: the webhook at {} refused {what} with HTTP {status}; not retrying",
                        inner.upstream.authority()
                    );
                    return;
                }
                Err(e) => last_error = e,
            }
            if attempt == attempts {
                break;
            }
            let wait = run.cap(backoff);
            if run.deadline.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // Shutting down: retry at once, within the flush budget.
                    _ = shutdown.changed() => run.begin_flush(),
                }
            } else {
                tokio::time::sleep(wait).await;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        inner.failed.fetch_add(1, Relaxed);
        log::warn!(
            "alerts: {what} not delivered to {} after {tried} tr{}: {}",
            inner.upstream.authority(),
            if tried == 1 { "y" } else { "ies" },
            if last_error.is_empty() {
                "shutting down"
            } else {
                &last_error
            }
        );
    }

    /// One POST; the answer's status, or what went wrong.
    async fn post(&self, body: &Bytes, run: &mut Run) -> Result<u16, String> {
        let inner = &*self.inner;
        let upstream = &inner.upstream;
        let stale = run.resolved_at.is_none_or(|t| t.elapsed() >= DNS_REFRESH);
        if upstream.needs_dns() && stale {
            // `lookup_host` runs on tokio's blocking pool: this waits, it does not block.
            match upstream.resolve().await {
                Ok(_) => run.resolved_at = Some(Instant::now()),
                Err(e) if !upstream.is_resolved() => return Err(format!("cannot resolve: {e}")),
                Err(e) => log::debug!("alerts: cannot re-resolve, keeping old addresses: {e}"),
            }
        }
        let peer = upstream
            .peer(Duration::ZERO)
            .await
            .map_err(|_| "host not resolved")?;
        let (mut http, _) = upstream
            .connector
            .get_http_session(&*peer)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let h2 = matches!(http, ClientSession::H2(_));
        let req = self
            .request(body.len(), h2)
            .map_err(|e| format!("cannot build the request: {e}"))?;
        http.set_read_timeout(Some(inner.timeout));
        http.set_write_timeout(Some(inner.timeout));
        let io = |e: Box<pingora::Error>| format!("exchange failed: {e}");
        {
            let _cork = crate::upstream::Cork::hold(&http);
            http.write_request_header(Box::new(req)).await.map_err(io)?;
            http.write_request_body(body.clone(), true)
                .await
                .map_err(io)?;
            http.finish_request_body().await.map_err(io)?;
        }
        let status = loop {
            http.read_response_header().await.map_err(io)?;
            let status = http
                .response_header()
                .map(|h| h.status)
                .ok_or("no answer header")?;
            if !status.is_informational() || !matches!(http, ClientSession::H1(_)) {
                break status.as_u16();
            }
        };
        // Read the (small) answer so that the connection can carry the next alert.
        let mut size = 0;
        let complete = loop {
            match http.read_response_body().await {
                Ok(Some(chunk)) => {
                    size += chunk.len();
                    if size > MAX_DRAIN {
                        break false;
                    }
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        if complete {
            if let ClientSession::H1(h1) = &mut http {
                h1.respect_keepalive();
            }
            upstream
                .connector
                .release_http_session(http, &*peer, Some(IDLE))
                .await;
        }
        Ok(status)
    }

    fn request(&self, len: usize, h2: bool) -> pingora::Result<RequestHeader> {
        let inner = &*self.inner;
        let mut req = RequestHeader::build("POST", inner.path.as_bytes(), Some(4))?;
        req.insert_header(header::CONTENT_TYPE, "application/json")?;
        req.insert_header(header::CONTENT_LENGTH, len)?;
        req.insert_header(
            header::USER_AGENT,
            concat!("keygate/", env!("CARGO_PKG_VERSION")),
        )?;
        if h2 {
            req.set_version(http::Version::HTTP_2);
            req.set_uri(inner.uri.clone());
        } else {
            req.set_version(http::Version::HTTP_11);
            req.insert_header(header::HOST, inner.upstream.authority())?;
        }
        Ok(req)
    }
}

/// The JSON body: fields that do not apply are left out.
#[derive(Serialize)]
struct Payload<'a> {
    source: &'static str,
    event: &'static str,
    pool: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
    time: String,
    text: String,
}

fn payload(queued: &Queued) -> Vec<u8> {
    let e = &queued.event;
    let (key, model, reason, retry_after_seconds) = match e {
        Event::PoolExhausted {
            model,
            retry_after_seconds,
            ..
        } => (None, Some(model.as_str()), None, *retry_after_seconds),
        Event::KeyDisabled { key, reason, .. } => {
            (Some(key.as_str()), None, Some(reason.as_str()), None)
        }
        Event::KeyRecovered { key, .. } => (Some(key.as_str()), None, None, None),
    };
    let body = Payload {
        source: "keygate",
        event: e.kind(),
        pool: e.pool(),
        key,
        model,
        reason,
        retry_after_seconds,
        time: queued.at.to_rfc3339_opts(SecondsFormat::Secs, true),
        text: e.text(),
    };
    // Serializing strings and numbers cannot fail; an empty body would be refused, not sent.
    serde_json::to_vec(&body).unwrap_or_default()
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
mod tests {
    use super::*;
    use crate::config::endpoint::redacted_url;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// One request the test webhook received.
    #[derive(Debug)]
    struct Received {
        version: http::Version,
        method: String,
        path: String,
        host: String,
        content_type: String,
        json: serde_json::Value,
        raw: String,
    }

    #[derive(Default)]
    struct HookState {
        got: Vec<Received>,
        /// Statuses to answer with, in order; 200 once they run out.
        script: VecDeque<u16>,
    }

    /// A local webhook (hyper, HTTP/1.1) on 127.0.0.1.
    struct Hook {
        addr: SocketAddr,
        state: Arc<Mutex<HookState>>,
    }

    impl Hook {
        async fn start(script: &[u16]) -> Hook {
            Hook::start_with(script, None).await
        }

        /// A webhook speaking TLS (ALPN h2, http/1.1) for `localhost`, and its CA's PEM.
        async fn start_tls() -> (Hook, String) {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
                .unwrap()
                .signed_by(&leaf_key, &ca, &ca_key)
                .unwrap();
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            (Hook::start_with(&[], Some(acceptor)).await, ca.pem())
        }

        async fn start_with(script: &[u16], tls: Option<tokio_rustls::TlsAcceptor>) -> Hook {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let state = Arc::new(Mutex::new(HookState {
                got: Vec::new(),
                script: script.iter().copied().collect(),
            }));
            let st = state.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let st = st.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let st = st.clone();
                            async move { Ok::<_, std::convert::Infallible>(answer(st, req).await) }
                        });
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let _ = match tls {
                            Some(acceptor) => {
                                let Ok(stream) = acceptor.accept(stream).await else {
                                    return;
                                };
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                            None => {
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                        };
                    });
                }
            });
            Hook { addr, state }
        }

        fn url(&self) -> String {
            format!("http://{}/hooks/T0/SECRET?x=1", self.addr)
        }

        fn count(&self) -> usize {
            self.state.lock().unwrap().got.len()
        }

        /// Waits until `n` requests arrived (or `within` passed), then a little more so that
        /// any extra request shows up too.
        async fn received(&self, n: usize, within: Duration) -> Vec<Received> {
            let end = Instant::now() + within;
            while self.count() < n && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::mem::take(&mut self.state.lock().unwrap().got)
        }
    }

    async fn answer(
        st: Arc<Mutex<HookState>>,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let raw = String::from_utf8(bytes.to_vec()).unwrap();
        let header = |name: header::HeaderName| {
            parts
                .headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let status = {
            let mut s = st.lock().unwrap();
            s.got.push(Received {
                version: parts.version,
                method: parts.method.to_string(),
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                host: match parts.uri.authority() {
                    Some(a) => a.to_string(),
                    None => header(header::HOST),
                },
                content_type: header(header::CONTENT_TYPE),
                json: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
                raw,
            });
            s.script.pop_front().unwrap_or(200)
        };
        hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    }

    fn config(url: &str, min_interval: Duration, retries: u32) -> AlertConfig {
        AlertConfig {
            url: url.to_string(),
            min_interval,
            retries,
            timeout: Duration::from_millis(500),
        }
    }

    /// Alerts with a 20 ms first backoff, so retry tests stay short.
    fn alerts(config: AlertConfig) -> Alerts {
        Alerts::build(config, Duration::from_millis(20), None).unwrap()
    }

    /// Starts the sender; keep the returned watch sender alive (dropping it means shutdown).
    fn start(alerts: &Alerts) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let sender = alerts.service();
        let task = tokio::spawn(async move { sender.start(rx).await });
        (tx, task)
    }

    async fn wait_until(within: Duration, what: impl Fn() -> bool) {
        let end = Instant::now() + within;
        while !what() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn exhausted(pool: &str, model: &str) -> Event {
        Event::PoolExhausted {
            pool: pool.into(),
            model: model.into(),
            retry_after_seconds: Some(42),
        }
    }

    fn disabled(pool: &str, key: &str) -> Event {
        Event::KeyDisabled {
            pool: pool.into(),
            key: key.into(),
            reason: Disabled::Dead(DeadReason::Invalid),
        }
    }

    fn recovered(pool: &str, key: &str) -> Event {
        Event::KeyRecovered {
            pool: pool.into(),
            key: key.into(),
        }
    }

    fn object_keys(v: &serde_json::Value) -> Vec<String> {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn one_post_per_event_with_the_right_json() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "gemini-2.5-pro"));
        alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
        alerts.notify(recovered("main", "key#1a2b3c4d5e6f"));
        let got = hook.received(3, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 3, "{got:?}");
        for r in &got {
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/hooks/T0/SECRET?x=1");
            assert_eq!(r.host, hook.addr.to_string());
            assert_eq!(r.content_type, "application/json");
            assert_eq!(r.json["source"], "keygate");
            assert_eq!(r.json["pool"], "main");
            let time = r.json["time"].as_str().unwrap();
            assert!(DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
            assert!(time.ends_with('Z'), "{time}");
        }

        let e = &got[0].json;
        assert_eq!(e["event"], "pool_exhausted");
        assert_eq!(e["model"], "gemini-2.5-pro");
        assert_eq!(e["retry_after_seconds"], 42);
        assert_eq!(
            object_keys(e),
            [
                "event",
                "model",
                "pool",
                "retry_after_seconds",
                "source",
                "text",
                "time"
            ]
        );
        assert_eq!(
            e["text"],
            "keygate: pool `main` has no usable key for model `gemini-2.5-pro` (all keys \
             cooling or disabled); the first key is back in about 42 s."
        );

        let d = &got[1].json;
        assert_eq!(d["event"], "key_disabled");
        assert_eq!(d["key"], "key#1a2b3c4d5e6f");
        assert_eq!(d["reason"], "key_invalid");
        assert_eq!(
            object_keys(d),
            ["event", "key", "pool", "reason", "source", "text", "time"]
        );
        assert_eq!(
            d["text"],
            "keygate: key `key#1a2b3c4d5e6f` of pool `main` was disabled: Google says the key is \
             not valid."
        );

        let r = &got[2].json;
        assert_eq!(r["event"], "key_recovered");
        assert_eq!(r["key"], "key#1a2b3c4d5e6f");
        assert_eq!(
            object_keys(r),
            ["event", "key", "pool", "source", "text", "time"]
        );
        assert_eq!(
            r["text"],
            "keygate: key `key#1a2b3c4d5e6f` of pool `main` works again."
        );

        let stats = alerts.stats();
        assert_eq!(
            stats,
            AlertStats {
                delivered: 3,
                ..AlertStats::default()
            }
        );
    }

    #[tokio::test]
    async fn the_same_event_within_min_interval_is_sent_once() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
        // Same kind, pool and key: a different reason does not make it a different event.
        alerts.notify(Event::KeyDisabled {
            pool: "main".into(),
            key: "key#1a2b3c4d5e6f".into(),
            reason: Disabled::Dead(DeadReason::Suspended),
        });
        let got = hook.received(2, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 1, "{got:?}");
        let stats = alerts.stats();
        assert_eq!(
            (stats.delivered, stats.dropped, stats.rate_limited),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn different_events_are_each_sent() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        let (_shutdown, _task) = start(&alerts);
        // A flapping key must not hide another key, another pool's exhaustion or another model.
        for _ in 0..5 {
            alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
        }
        alerts.notify(disabled("main", "key#ffffffff"));
        alerts.notify(recovered("main", "key#1a2b3c4d5e6f"));
        alerts.notify(exhausted("main", "gemini-2.5-pro"));
        alerts.notify(exhausted("main", "gemini-2.5-flash"));
        alerts.notify(exhausted("other", "gemini-2.5-pro"));
        let got = hook.received(6, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 6, "{got:?}");
        let stats = alerts.stats();
        assert_eq!((stats.delivered, stats.rate_limited), (6, 4));
    }

    #[tokio::test]
    async fn the_same_event_is_sent_again_after_min_interval() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_millis(150), 0));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        alerts.notify(exhausted("main", "m"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        alerts.notify(exhausted("main", "m"));
        let got = hook.received(2, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(alerts.stats().rate_limited, 1);
    }

    #[tokio::test]
    async fn zero_min_interval_sends_every_event() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::ZERO, 0));
        let (_shutdown, _task) = start(&alerts);
        for _ in 0..3 {
            alerts.notify(exhausted("main", "m"));
        }
        let got = hook.received(3, Duration::from_secs(2)).await;
        assert_eq!(got.len(), 3);
    }

    #[tokio::test]
    async fn server_errors_are_retried_until_delivered() {
        let hook = Hook::start(&[500, 500]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 3));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
        let got = hook.received(3, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 3, "delivered on the third try: {got:?}");
        assert!(
            got.iter().all(|r| r.raw == got[0].raw),
            "same body each try"
        );
        let stats = alerts.stats();
        assert_eq!((stats.delivered, stats.failed), (1, 0));
    }

    #[tokio::test]
    async fn retries_are_bounded() {
        let hook = Hook::start(&[503; 10]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 2));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
        let got = hook.received(3, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 3, "one try and two retries");
        assert_eq!((alerts.stats().delivered, alerts.stats().failed), (0, 1));
    }

    #[tokio::test]
    async fn client_errors_are_not_retried() {
        let hook = Hook::start(&[404]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 3));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
        let got = hook.received(1, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 1);
        // The next event goes through.
        alerts.notify(exhausted("main", "n"));
        wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
        assert_eq!((alerts.stats().delivered, alerts.stats().failed), (1, 1));
    }

    #[tokio::test]
    async fn too_many_requests_is_retried() {
        let hook = Hook::start(&[429]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 1));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
        assert_eq!(hook.received(2, Duration::from_secs(1)).await.len(), 2);
    }

    /// A port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_receiver_that_is_down_is_retried_then_given_up_and_notify_never_blocks() {
        let port = closed_port().await;
        let url = format!("http://127.0.0.1:{port}/hook");
        let alerts = alerts(config(&url, Duration::from_secs(60), 2));
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "first"));
        let started = Instant::now();
        for i in 0..1000 {
            alerts.notify(exhausted("main", &format!("model-{i}")));
        }
        let spent = started.elapsed();
        assert!(
            spent < Duration::from_millis(50),
            "1000 notify calls took {spent:?}"
        );
        wait_until(Duration::from_secs(5), || alerts.stats().failed >= 1).await;
        let stats = alerts.stats();
        assert_eq!(stats.delivered, 0);
        assert!(stats.failed >= 1);
        // The first event is taken at once or sits in the queue with 255 others.
        assert!(stats.queue_full >= 1001 - QUEUE as u64 - 1, "{stats:?}");
        assert_eq!(stats.rate_limited, 0);
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Relaxed);
                held.push(stream);
            }
        });
        let mut cfg = config(&format!("http://{addr}/hook"), Duration::from_secs(60), 1);
        cfg.timeout = Duration::from_millis(150);
        let alerts = alerts(cfg);
        let (_shutdown, _task) = start(&alerts);
        let started = Instant::now();
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
        let spent = started.elapsed();
        assert_eq!(alerts.stats().failed, 1);
        assert_eq!(accepted.load(Relaxed), 2, "one try and one retry");
        assert!(spent < Duration::from_secs(2), "{spent:?}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_blocking() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        // No sender yet: nothing empties the queue.
        let started = Instant::now();
        for i in 0..QUEUE + 44 {
            alerts.notify(disabled("main", &format!("key#{i:08x}")));
        }
        assert!(started.elapsed() < Duration::from_millis(50));
        let stats = alerts.stats();
        assert_eq!(
            (stats.queue_full, stats.dropped, stats.rate_limited),
            (44, 44, 0)
        );
        // A dropped event was not recorded as sent: it can be queued once there is room.
        let (_shutdown, _task) = start(&alerts);
        wait_until(Duration::from_secs(10), || alerts.stats().delivered == 256).await;
        alerts.notify(disabled("main", &format!("key#{:08x}", QUEUE + 1)));
        wait_until(Duration::from_secs(5), || alerts.stats().delivered == 257).await;
        assert_eq!(alerts.stats().delivered, 257);
        assert_eq!(hook.received(257, Duration::from_secs(1)).await.len(), 257);
    }

    #[test]
    fn notify_needs_no_runtime() {
        let alerts = Alerts::new(config("http://127.0.0.1:9/x", Duration::ZERO, 0)).unwrap();
        alerts.notify(exhausted("main", "m"));
        assert_eq!(alerts.stats(), AlertStats::default());
    }

    #[tokio::test]
    async fn shutdown_flushes_the_queue() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        for i in 0..5 {
            alerts.notify(exhausted("main", &format!("m{i}")));
        }
        let (shutdown, task) = start(&alerts);
        shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(alerts.stats().delivered, 5);
        // The sender is gone: later events are dropped, not queued forever.
        alerts.notify(exhausted("main", "late"));
        assert_eq!(alerts.stats().queue_full, 1);
    }

    #[tokio::test]
    async fn shutdown_flush_is_bounded() {
        let port = closed_port().await;
        let url = format!("http://127.0.0.1:{port}/hook");
        let mut cfg = config(&url, Duration::from_secs(60), MAX_RETRIES);
        cfg.timeout = Duration::from_secs(1);
        let alerts = Alerts::build(cfg, Duration::from_millis(200), None).unwrap();
        for i in 0..20 {
            alerts.notify(exhausted("main", &format!("m{i}")));
        }
        let (shutdown, task) = start(&alerts);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        shutdown.send(true).unwrap();
        tokio::time::timeout(FLUSH_BUDGET + Duration::from_secs(2), task)
            .await
            .expect("the sender stops within the flush budget")
            .unwrap();
        assert!(started.elapsed() <= FLUSH_BUDGET + Duration::from_millis(500));
        let stats = alerts.stats();
        assert_eq!((stats.delivered, stats.failed), (0, 20), "{stats:?}");
    }

    #[test]
    fn the_sender_is_a_pingora_background_service() {
        let alerts = Alerts::new(config("http://127.0.0.1:9/x", Duration::ZERO, 0)).unwrap();
        let _service =
            pingora::services::background::background_service("alerts", alerts.service());
    }

    #[tokio::test]
    async fn a_second_sender_does_not_start() {
        let alerts = Alerts::new(config("http://127.0.0.1:9/x", Duration::ZERO, 0)).unwrap();
        let (_shutdown, _task) = start(&alerts);
        tokio::task::yield_now().await;
        let (_tx, rx) = watch::channel(false);
        tokio::time::timeout(Duration::from_secs(1), alerts.service().start(rx))
            .await
            .expect("returns at once");
    }

    #[tokio::test]
    async fn a_host_name_is_resolved_in_the_background() {
        let hook = Hook::start(&[]).await;
        let url = format!("http://localhost:{}/hook", hook.addr.port());
        let alerts = alerts(config(&url, Duration::from_secs(60), 3));
        assert!(!alerts.inner.upstream.is_resolved());
        let (_shutdown, _task) = start(&alerts);
        alerts.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
        let got = hook.received(1, Duration::from_secs(1)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].host, format!("localhost:{}", hook.addr.port()));
    }

    #[tokio::test]
    async fn https_webhooks_get_http2_with_the_host_checked() {
        let (hook, ca) = Hook::start_tls().await;
        let mut ca_file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut ca_file, ca.as_bytes()).unwrap();
        let url = format!("https://localhost:{}/hooks/T0/SECRET", hook.addr.port());
        let cfg = config(&url, Duration::from_secs(60), 0);
        let trusting =
            Alerts::build(cfg, Duration::from_millis(20), Some(ca_file.path().into())).unwrap();
        let (_shutdown, _task) = start(&trusting);
        trusting.notify(exhausted("main", "m"));
        trusting.notify(recovered("main", "key#1a2b3c4d5e6f"));
        let got = hook.received(2, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 2, "{got:?}");
        for r in &got {
            assert_eq!(r.version, http::Version::HTTP_2);
            assert_eq!(r.method, "POST");
            assert_eq!(r.path, "/hooks/T0/SECRET");
            assert_eq!(r.host, format!("localhost:{}", hook.addr.port()));
            assert_eq!(r.content_type, "application/json");
        }
        assert_eq!(got[1].json["event"], "key_recovered");
        assert_eq!(trusting.stats().delivered, 2);

        // Without the test CA, the certificate is refused: retried, then given up.
        let url = format!("https://localhost:{}/hooks/T0/SECRET", hook.addr.port());
        let untrusting = alerts(config(&url, Duration::from_secs(60), 1));
        let (_shutdown, _task) = start(&untrusting);
        untrusting.notify(exhausted("main", "m"));
        wait_until(Duration::from_secs(5), || untrusting.stats().failed == 1).await;
        assert_eq!(untrusting.stats().delivered, 0);
        assert!(hook.received(0, Duration::ZERO).await.is_empty());
    }

    #[tokio::test]
    async fn never_sends_a_key_and_defuses_mentions() {
        let hook = Hook::start(&[]).await;
        let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
        let (_shutdown, _task) = start(&alerts);
        let raw_key = "made-up-alert-key-0123456789";
        alerts.notify(disabled("main", raw_key));
        alerts.notify(exhausted("main", "<!channel> @everyone `x`\nsecond line"));
        let got = hook.received(2, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 2);
        assert!(!got[0].raw.contains(raw_key));
        assert!(!got[0].raw.contains("made-up-alert-key"));
        assert_eq!(
            got[0].json["key"],
            crate::secret::fingerprint(raw_key.as_bytes())
        );
        let text = got[1].json["text"].as_str().unwrap();
        assert!(
            text.contains("`?!channel? ?everyone ?x?second line`"),
            "{text}"
        );
        // The field itself keeps the name (JSON-escaped), minus control characters.
        assert_eq!(got[1].json["model"], "<!channel> @everyone `x`second line");
    }

    #[test]
    fn texts_read_well() {
        let e = Event::KeyDisabled {
            pool: "team".into(),
            key: "key#00000000".into(),
            reason: Disabled::Operator,
        };
        assert_eq!(
            e.text(),
            "keygate: key `key#00000000` of pool `team` was disabled: an operator disabled it."
        );
        let e = Event::PoolExhausted {
            pool: "team".into(),
            model: "gemini-2.5-pro".into(),
            retry_after_seconds: None,
        };
        assert_eq!(
            e.text(),
            "keygate: pool `team` has no usable key for model `gemini-2.5-pro` (all keys cooling \
             or disabled)."
        );
        assert_eq!(human_seconds(59), "59 s");
        assert_eq!(human_seconds(300), "5 min");
        assert_eq!(human_seconds(301), "6 min");
        assert_eq!(human_seconds(86_400), "24 h");
        let e = Event::KeyDisabled {
            pool: "p".into(),
            key: "key#00000000".into(),
            reason: Disabled::Billing,
        };
        assert!(e
            .text()
            .ends_with("was disabled: the key's project is out of prepaid credit."));
    }

    #[test]
    fn urls_are_checked_without_echoing_them() {
        let ok = parse_webhook_url("https://hooks.slack.com/services/T0/B0/SECRET").unwrap();
        assert!(ok.upstream.tls);
        assert_eq!(ok.upstream.host, "hooks.slack.com");
        assert_eq!(ok.upstream.port, 443);
        assert_eq!(ok.path, "/services/T0/B0/SECRET");
        assert_eq!(
            ok.uri.to_string(),
            "https://hooks.slack.com/services/T0/B0/SECRET"
        );
        let ok = parse_webhook_url("http://[::1]:8080/hook?wait=true").unwrap();
        assert_eq!((ok.upstream.host.as_str(), ok.upstream.port), ("::1", 8080));
        assert_eq!(ok.path, "/hook?wait=true");
        assert_eq!(parse_webhook_url("http://example.com").unwrap().path, "/");
        assert_eq!(
            parse_webhook_url("http://example.com?a=b").unwrap().path,
            "/?a=b"
        );

        for bad in [
            "",
            "SECRET",
            "ftp://host/SECRET",
            "https:///SECRET",
            "https://user:SECRET@host/x",
            "https://host:99999/SECRET",
            "https://host:abc/SECRET",
            "https://host/SECRET#frag",
            "https://host/SECRET path",
            "https://[::1/SECRET",
            "https://host/SECRET\u{7f}",
        ] {
            let err = parse_webhook_url(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(err.starts_with("the webhook URL must be"), "{err}");
            assert!(!err.contains("SECRET"), "{bad:?}: {err}");
            let cfg = config(bad, Duration::ZERO, 0);
            assert!(Alerts::new(cfg).is_err());
        }

        let mut cfg = config("http://h/x", Duration::ZERO, MAX_RETRIES + 1);
        assert!(Alerts::new(cfg.clone()).unwrap_err().contains("retries"));
        cfg.retries = 0;
        cfg.timeout = Duration::ZERO;
        assert!(Alerts::new(cfg).unwrap_err().contains("timeout"));
    }

    #[test]
    fn config_debug_hides_the_path() {
        let cfg = config(
            "https://discord.com/api/webhooks/1/SECRET",
            Duration::ZERO,
            0,
        );
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("https://discord.com/…"), "{shown}");
        assert_eq!(redacted_url("http://u:SECRET@h:1?SECRET"), "http://h:1/…");
    }

    #[test]
    fn the_rate_table_is_bounded_and_forgets_the_oldest() {
        let min = Duration::from_secs(60);
        let mut table = RateTable::new(4);
        let start = Instant::now();
        let keys: Vec<EventKey> = (0..6)
            .map(|i| EventKey::of(&exhausted("p", &format!("m{i}"))))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            table.record(k.clone(), start + Duration::from_millis(i as u64), min);
        }
        assert_eq!(table.len(), 4);
        let now = start + Duration::from_millis(10);
        assert!(!table.is_recent(&keys[0], now, min));
        assert!(!table.is_recent(&keys[1], now, min));
        for k in &keys[2..] {
            assert!(table.is_recent(k, now, min));
        }
        // Expired entries go before live ones.
        let later = start + min + Duration::from_millis(3);
        table.record(EventKey::of(&exhausted("p", "new")), later, min);
        assert_eq!(
            table.len(),
            3,
            "m2 and m3 expired; m4, m5 and the new one remain"
        );
        assert!(!table.is_recent(&keys[3], later, min));
        assert!(table.is_recent(&keys[4], later, min));
    }
}
