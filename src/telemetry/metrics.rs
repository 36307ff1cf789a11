//! Prometheus metrics: what keygate counts about client requests, upstream attempts and its key
//! pools, and the text exposition the admin API serves to a scraper.
//!
//! Everything lives in a private [`Registry`] owned by [`Metrics`], never in the `prometheus`
//! crate's global default registry, so tests and several gateways in one process never collide.
//!
//! Label values are bounded whatever clients send: every value must be at most
//! [`MAX_LABEL_LEN`] bytes of `[A-Za-z0-9_.:/-]` or it becomes `other`; upstream outcomes
//! outside a fixed allow-list become `other`; and model names, which come from clients, get
//! their own label value only for the first [`MAX_MODELS`] distinct ones seen, every later new
//! one being reported as `other`. No call panics on any input.

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, PoisonError};

/// Longest label value kept as is, in bytes; a longer one is reported as `other`.
pub const MAX_LABEL_LEN: usize = 64;

/// How many distinct model names get a label value of their own; later new ones become `other`.
pub const MAX_MODELS: usize = 64;

/// The label value standing in for anything not allowed through.
const OTHER: &str = "other";

/// The label value for an empty input (no tenant, no model).
const NONE: &str = "-";

/// Upstream outcome labels kept as they are; any other value is counted as `other`.
/// `unregistered` is what `classify::Outcome::label` names a request no key reached Google for.
const OUTCOMES: &[&str] = &[
    "ok",
    "quota_minute",
    "quota_day",
    "tier_unavailable",
    "quota_unspecified",
    "billing_account_cap",
    "project_cap",
    "spend_rate",
    "shared_capacity",
    "billing",
    "key_invalid",
    "key_suspended",
    "service_disabled",
    "key_restricted",
    "method_blocked",
    "location",
    "no_key",
    "unregistered",
    "other_project",
    "client_error",
    "server_error",
    "connect_error",
    "timeout",
    "upstream_error",
    "unresolved",
];

/// Buckets of `keygate_request_attempts`: upstream attempts per client request.
const ATTEMPT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 64.0];

/// Buckets of the latency histograms, in seconds: from a cached token count to a long
/// generation or a large upload.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];

/// A pool's key states at scrape time (computed by the caller from the health table).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolGauge {
    /// The pool's configured name.
    pub pool: String,
    /// Keys that can serve now.
    pub keys_ok: usize,
    /// Keys cooling down after a quota refusal, for at least one model.
    pub keys_cooling: usize,
    /// Keys disabled until an operator or the key check restores them.
    pub keys_disabled: usize,
    /// Seconds until the pool's next cooling key recovers (0 when none is cooling).
    pub seconds_to_recovery: f64,
}

/// The response cache's memory at scrape time (computed by the caller from the cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheGauge {
    /// Bytes counted against the budget: entries and recordings.
    pub bytes: u64,
    /// Of those, bytes held by answers still being recorded.
    pub recording_bytes: u64,
    /// Entries held.
    pub entries: u64,
    /// The budget.
    pub capacity: u64,
}

/// keygate's Prometheus metrics, in a registry of their own. Shared by reference (it is `Sync`):
/// every recording method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    /// The private registry every metric below is registered in.
    registry: Registry,
    /// `keygate_requests_total{tenant,pool,model,status_class}`.
    requests: IntCounterVec,
    /// `keygate_upstream_attempts_total{pool,outcome}`.
    attempts: IntCounterVec,
    /// `keygate_request_attempts{pool}`.
    attempts_per_request: HistogramVec,
    /// `keygate_request_bytes_total{pool}`.
    request_bytes: IntCounterVec,
    /// `keygate_response_bytes_total{pool}`.
    response_bytes: IntCounterVec,
    /// `keygate_upstream_latency_seconds{pool}`.
    upstream_latency: HistogramVec,
    /// `keygate_time_to_first_byte_seconds{pool}`.
    time_to_first_byte: HistogramVec,
    /// `keygate_pool_exhausted_total{pool,model}`.
    pool_exhausted: IntCounterVec,
    /// `keygate_key_disabled_total{pool,reason}`.
    key_disabled: IntCounterVec,
    /// `keygate_key_recovered_total{pool}`.
    key_recovered: IntCounterVec,
    /// `keygate_quota_limits_total{pool,scope,kind}`.
    quota_limits: IntCounterVec,
    /// `keygate_caps_lifted_total{pool,scope}`.
    caps_lifted: IntCounterVec,
    /// `keygate_keys{pool,state}`.
    keys: IntGaugeVec,
    /// `keygate_pool_next_recovery_seconds{pool}`.
    next_recovery: GaugeVec,
    /// `keygate_cache_requests_total{tenant,pool,result}`.
    cache_requests: IntCounterVec,
    /// `keygate_cache_hit_bytes_total{tenant}`.
    cache_hit_bytes: IntCounterVec,
    /// `keygate_cache_saved_tokens_total{tenant}`.
    cache_saved_tokens: IntCounterVec,
    /// `keygate_cache_memory_bytes{state}`.
    cache_memory: IntGaugeVec,
    /// `keygate_cache_entries`.
    cache_entries: IntGaugeVec,
    /// Model label values handed out so far (at most [`MAX_MODELS`]).
    models: Mutex<HashSet<String>>,
    /// Serializes `render`, so that two scrapes never interleave resetting and setting gauges.
    render_lock: Mutex<()>,
    /// `keygate_redis_up`, registered once a `redis:` section shares the state.
    redis_up: prometheus::IntGauge,
    redis_registered: std::sync::Once,
    /// The handles of requests answered before a pool was chosen (pool label `-`).
    no_pool: std::sync::OnceLock<PoolMetrics>,
}

impl Metrics {
    /// Creates every metric and registers it in a new private registry. Fails only if a metric
    /// definition is invalid, which the fixed names and buckets here never are.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = counter(
            &registry,
            "keygate_requests_total",
            "Finished client requests, by tenant, pool, model and class of the status sent \
             (none when no status was sent).",
            &["tenant", "pool", "model", "status_class"],
        )?;
        let attempts = counter(
            &registry,
            "keygate_upstream_attempts_total",
            "Upstream attempts, by pool and outcome.",
            &["pool", "outcome"],
        )?;
        let attempts_per_request = histogram(
            &registry,
            "keygate_request_attempts",
            "Upstream attempts made per finished client request (0 when keygate answered itself).",
            &["pool"],
            ATTEMPT_BUCKETS,
        )?;
        let request_bytes = counter(
            &registry,
            "keygate_request_bytes_total",
            "Bytes of client request bodies received, by pool.",
            &["pool"],
        )?;
        let response_bytes = counter(
            &registry,
            "keygate_response_bytes_total",
            "Bytes of response bodies sent to clients, by pool.",
            &["pool"],
        )?;
        let upstream_latency = histogram(
            &registry,
            "keygate_upstream_latency_seconds",
            "Time from sending an upstream attempt to its response header, by pool.",
            &["pool"],
            LATENCY_BUCKETS,
        )?;
        let time_to_first_byte = histogram(
            &registry,
            "keygate_time_to_first_byte_seconds",
            "Time from a client request's arrival to the first byte of the answer relayed, by pool.",
            &["pool"],
            LATENCY_BUCKETS,
        )?;
        let pool_exhausted = counter(
            &registry,
            "keygate_pool_exhausted_total",
            "Requests keygate refused because no key of the pool could serve the model \
             (429 exhausted or 503 all disabled).",
            &["pool", "model"],
        )?;
        let key_disabled = counter(
            &registry,
            "keygate_key_disabled_total",
            "Keys taken out of service until someone acts, by pool and reason (key_invalid, \
             key_suspended, service_disabled, key_restricted, project_billing, \
             disabled_by_operator).",
            &["pool", "reason"],
        )?;
        let key_recovered = counter(
            &registry,
            "keygate_key_recovered_total",
            "Disabled keys back in service (a key check found them working, or an operator \
             enabled them), by pool.",
            &["pool"],
        )?;
        let quota_limits = counter(
            &registry,
            "keygate_quota_limits_total",
            "Limits keygate started to honour, by pool, scope (billing_account, project, \
             project_model) and kind (monthly_spending_cap, project_spend_cap, \
             spend_rate_limit, unavailable: a model not in the project's tier, escalated: a \
             cooldown doubled because the refusal came back soon after it ended).",
            &["pool", "scope", "kind"],
        )?;
        let caps_lifted = counter(
            &registry,
            "keygate_caps_lifted_total",
            "Spend caps that ended before the month turned (a probe request was served, or an \
             operator cleared them), by pool and scope (billing_account, project).",
            &["pool", "scope"],
        )?;
        let keys = IntGaugeVec::new(
            Opts::new(
                "keygate_keys",
                "Keys per pool and state (ok, cooling, disabled) at scrape time.",
            ),
            &["pool", "state"],
        )?;
        registry.register(Box::new(keys.clone()))?;
        let next_recovery = GaugeVec::new(
            Opts::new(
                "keygate_pool_next_recovery_seconds",
                "Seconds until the pool's next cooling key recovers (0 when none is cooling).",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(next_recovery.clone()))?;
        let cache_requests = counter(
            &registry,
            "keygate_cache_requests_total",
            "Requests that went through the response cache, by tenant, pool and result (hit, \
             miss, bypass). Hits spent no key.",
            &["tenant", "pool", "result"],
        )?;
        let cache_hit_bytes = counter(
            &registry,
            "keygate_cache_hit_bytes_total",
            "Body bytes served from the response cache, by tenant.",
            &["tenant"],
        )?;
        let cache_saved_tokens = counter(
            &registry,
            "keygate_cache_saved_tokens_total",
            "Tokens the answers served from the response cache had used: what the hits saved, \
             by tenant.",
            &["tenant"],
        )?;
        let cache_memory = IntGaugeVec::new(
            Opts::new(
                "keygate_cache_memory_bytes",
                "The response cache's memory at scrape time: used (entries and recordings), \
                 recording (answers still being recorded), capacity (cache.max_megabytes).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(cache_memory.clone()))?;
        let cache_entries = IntGaugeVec::new(
            Opts::new(
                "keygate_cache_entries",
                "Answers held by the response cache at scrape time.",
            ),
            &[],
        )?;
        registry.register(Box::new(cache_entries.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            attempts,
            attempts_per_request,
            request_bytes,
            response_bytes,
            upstream_latency,
            time_to_first_byte,
            pool_exhausted,
            key_disabled,
            key_recovered,
            quota_limits,
            caps_lifted,
            keys,
            next_recovery,
            cache_requests,
            cache_hit_bytes,
            cache_saved_tokens,
            cache_memory,
            cache_entries,
            models: Mutex::new(HashSet::new()),
            render_lock: Mutex::new(()),
            redis_up: prometheus::IntGauge::new(
                "keygate_redis_up",
                "1 while the Redis that shares state between instances answers, else 0.",
            )?,
            redis_registered: std::sync::Once::new(),
            no_pool: std::sync::OnceLock::new(),
        })
    }

    /// One finished client request. `status` is the HTTP status the client got (0 if none was sent).
    /// `attempts` = upstream attempts made (0 when keygate answered itself). `served` says Google
    /// served `model` (a 2xx): only then may a new model name become a label value.
    #[allow(clippy::too_many_arguments)] // the call's signature is fixed by its callers
    pub fn request(
        &self,
        tenant: &str,
        pool: &PoolMetrics,
        model: &str,
        served: bool,
        status: u16,
        attempts: usize,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let labels = [
            label(tenant),
            &pool.label,
            self.model(model, served),
            status_class(status),
        ];
        add(&self.requests, &labels, 1);
        // Exact for any realistic count; the cast saturates into the top bucket otherwise.
        pool.attempts_per_request.observe(attempts as f64);
        pool.request_bytes.inc_by(request_bytes);
        pool.response_bytes.inc_by(response_bytes);
    }

    /// One upstream attempt and its outcome label (ok, quota_minute, quota_day, shared_capacity,
    /// billing, key_invalid, key_suspended, service_disabled, key_restricted, method_blocked,
    /// location, no_key, other_project, client_error, server_error, connect_error, timeout,
    /// upstream_error, unresolved); any value outside that allow-list is counted as `other`.
    pub fn attempt(&self, pool: &PoolMetrics, outcome: &str) {
        if outcome == "ok" {
            pool.served_attempts.inc();
            return;
        }
        let outcome = OUTCOMES
            .iter()
            .copied()
            .find(|o| *o == outcome)
            .unwrap_or(OTHER);
        add(&self.attempts, &[&pool.label, outcome], 1);
    }

    /// Time from sending an attempt to its response header.
    pub fn upstream_latency(&self, pool: &PoolMetrics, seconds: f64) {
        if let Some(secs) = finite_non_negative(seconds) {
            pool.upstream_latency.observe(secs);
        }
    }

    /// Time from the client request's arrival to the first byte of the answer keygate relays.
    pub fn time_to_first_byte(&self, pool: &PoolMetrics, seconds: f64) {
        if let Some(secs) = finite_non_negative(seconds) {
            pool.time_to_first_byte.observe(secs);
        }
    }

    /// keygate answered "no key can serve" (429 exhausted or 503 all disabled) for this pool and model.
    pub fn pool_exhausted(&self, pool: &str, model: &str) {
        add(
            &self.pool_exhausted,
            &[label(pool), self.model(model, false)],
            1,
        );
    }

    /// A key went out of service for `reason` (a fixed label: see [`crate::quota::keys::Disabled`]).
    pub fn key_disabled(&self, pool: &str, reason: &'static str) {
        add(&self.key_disabled, &[label(pool), reason], 1);
    }

    /// A disabled key is back in service.
    pub fn key_recovered(&self, pool: &str) {
        add(&self.key_recovered, &[label(pool)], 1);
    }

    /// A limit keygate now honours: `scope` is `billing_account`, `project` or
    /// `project_model`; `kind` says which limit.
    pub fn quota_limit(&self, pool: &str, scope: &'static str, kind: &'static str) {
        add(&self.quota_limits, &[label(pool), scope, kind], 1);
    }

    /// Whether the shared store (Redis) answers: `keygate_redis_up`, 1 or 0. The gauge is
    /// registered at the first call: only instances with a `redis:` section have it.
    pub fn redis_up(&self, up: bool) {
        self.redis_registered.call_once(|| {
            let _ = self.registry.register(Box::new(self.redis_up.clone()));
        });
        self.redis_up.set(i64::from(up));
    }

    /// A spend cap on `scope` (`billing_account`, `project`) ended early.
    pub fn cap_lifted(&self, pool: &str, scope: &'static str) {
        add(&self.caps_lifted, &[label(pool), scope], 1);
    }

    /// A request that went through the response cache, and its `result` (`hit`, `miss`,
    /// `bypass`).
    pub fn cache_request(&self, tenant: &str, pool: &str, result: &'static str) {
        add(
            &self.cache_requests,
            &[label(tenant), label(pool), result],
            1,
        );
    }

    /// A hit served `bytes` of body and saved the `tokens` its answer had used.
    pub fn cache_hit(&self, tenant: &str, bytes: u64, tokens: u64) {
        add(&self.cache_hit_bytes, &[label(tenant)], bytes);
        add(&self.cache_saved_tokens, &[label(tenant)], tokens);
    }

    /// The text exposition (Prometheus text format 0.0.4), with the pool gauges set from `pools`
    /// and the cache gauges from `cache` first. Pools absent from `pools` are dropped from the
    /// gauges, so a pool removed by a configuration reload stops being reported; without a
    /// cache, no cache gauge is.
    pub fn render(&self, pools: &[PoolGauge], cache: Option<CacheGauge>) -> String {
        let _guard = self
            .render_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.set_pool_gauges(pools);
        self.cache_memory.reset();
        self.cache_entries.reset();
        if let Some(c) = cache {
            for (state, n) in [
                ("used", c.bytes),
                ("recording", c.recording_bytes),
                ("capacity", c.capacity),
            ] {
                if let Ok(g) = self.cache_memory.get_metric_with_label_values(&[state]) {
                    set_int(&g, n);
                }
            }
            if let Ok(g) = self
                .cache_entries
                .get_metric_with_label_values(&[] as &[&str])
            {
                set_int(&g, c.entries);
            }
        }
        match TextEncoder::new().encode_to_string(&self.registry.gather()) {
            Ok(text) => text,
            // Unreachable with these metrics; a comment line keeps the answer valid exposition.
            Err(e) => format!(
                "# keygate: encoding metrics failed: {}\n",
                e.to_string().replace(['\n', '\r'], " ")
            ),
        }
    }

    /// Replaces the pool gauges with `pools`. Pools whose names collapse to the same label value
    /// (`other`) are summed, and their soonest recovery is kept.
    fn set_pool_gauges(&self, pools: &[PoolGauge]) {
        let mut merged: BTreeMap<&str, [u64; 3]> = BTreeMap::new();
        let mut recovery: BTreeMap<&str, f64> = BTreeMap::new();
        for p in pools {
            let name = label(&p.pool);
            let counts = merged.entry(name).or_default();
            for (total, n) in counts
                .iter_mut()
                .zip([p.keys_ok, p.keys_cooling, p.keys_disabled])
            {
                *total = total.saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
            }
            let secs = finite_non_negative(p.seconds_to_recovery).unwrap_or(0.0);
            let soonest = recovery.entry(name).or_insert(0.0);
            if *soonest == 0.0 || (secs > 0.0 && secs < *soonest) {
                *soonest = secs;
            }
        }
        self.keys.reset();
        self.next_recovery.reset();
        for (pool, counts) in &merged {
            for (state, n) in ["ok", "cooling", "disabled"].into_iter().zip(counts) {
                if let Ok(g) = self.keys.get_metric_with_label_values(&[pool, state]) {
                    set_int(&g, *n);
                }
            }
        }
        for (pool, secs) in &recovery {
            if let Ok(g) = self.next_recovery.get_metric_with_label_values(&[pool]) {
                g.set(*secs);
            }
        }
    }

    /// The label value for a client-supplied model: cleaned like any label, then kept only if it
    /// is one of the first [`MAX_MODELS`] distinct models Google served (`served` admits a new
    /// one); any other model is `other`.
    fn model<'a>(&self, model: &'a str, served: bool) -> &'a str {
        let clean = label(model);
        if clean == OTHER || clean == NONE {
            return clean;
        }
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if models.contains(clean) {
            clean
        } else if served && models.len() < MAX_MODELS {
            models.insert(clean.to_owned());
            clean
        } else {
            OTHER
        }
    }
}

/// A label value that is safe to export: `-` for an empty value, the value itself if it is at
/// most [`MAX_LABEL_LEN`] bytes of `[A-Za-z0-9_.:/-]`, `other` otherwise.
fn label(value: &str) -> &str {
    if value.is_empty() {
        NONE
    } else if value.len() <= MAX_LABEL_LEN
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
    {
        value
    } else {
        OTHER
    }
}

/// The `status_class` label of an HTTP status; `none` for 0 (no status sent) or a non-HTTP value.
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// `value` if it is a finite, non-negative number; a negative finite one reads as 0.
fn finite_non_negative(value: f64) -> Option<f64> {
    value.is_finite().then_some(value.max(0.0))
}

/// Adds `by` to the counter with `labels` (whose count always matches the vector's).
fn add(vec: &IntCounterVec, labels: &[&str], by: u64) {
    if let Ok(c) = vec.get_metric_with_label_values(labels) {
        c.inc_by(by);
    }
}

/// Sets an integer gauge, saturating at `i64::MAX`.
fn set_int(gauge: &IntGauge, n: u64) {
    gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Creates and registers a counter vector.
fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

/// Creates and registers a histogram vector with `buckets`.
fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, prometheus::Error> {
    let vec = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    registry.register(Box::new(vec.clone()))?;
    Ok(vec)
}

mod pool;
pub use pool::PoolMetrics;

#[cfg(test)]
mod tests;
