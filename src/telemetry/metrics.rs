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
    /// `keygate_keys{pool,state}`.
    keys: IntGaugeVec,
    /// `keygate_pool_next_recovery_seconds{pool}`.
    next_recovery: GaugeVec,
    /// Model label values handed out so far (at most [`MAX_MODELS`]).
    models: Mutex<HashSet<String>>,
    /// Serializes `render`, so that two scrapes never interleave resetting and setting gauges.
    render_lock: Mutex<()>,
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
            keys,
            next_recovery,
            models: Mutex::new(HashSet::new()),
            render_lock: Mutex::new(()),
        })
    }

    /// One finished client request. `status` is the HTTP status the client got (0 if none was sent).
    /// `attempts` = upstream attempts made (0 when keygate answered itself). `served` says Google
    /// served `model` (a 2xx): only then may a new model name become a label value.
    #[allow(clippy::too_many_arguments)] // the call's signature is fixed by its callers
    pub fn request(
        &self,
        tenant: &str,
        pool: &str,
        model: &str,
        served: bool,
        status: u16,
        attempts: usize,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let pool = label(pool);
        let labels = [
            label(tenant),
            pool,
            self.model(model, served),
            status_class(status),
        ];
        add(&self.requests, &labels, 1);
        if let Ok(h) = self
            .attempts_per_request
            .get_metric_with_label_values(&[pool])
        {
            // Exact for any realistic count; the cast saturates into the top bucket otherwise.
            h.observe(attempts as f64);
        }
        add(&self.request_bytes, &[pool], request_bytes);
        add(&self.response_bytes, &[pool], response_bytes);
    }

    /// One upstream attempt and its outcome label (ok, quota_minute, quota_day, shared_capacity,
    /// billing, key_invalid, key_suspended, service_disabled, key_restricted, method_blocked,
    /// location, no_key, other_project, client_error, server_error, connect_error, timeout,
    /// upstream_error, unresolved); any value outside that allow-list is counted as `other`.
    pub fn attempt(&self, pool: &str, outcome: &str) {
        let outcome = OUTCOMES
            .iter()
            .copied()
            .find(|o| *o == outcome)
            .unwrap_or(OTHER);
        add(&self.attempts, &[label(pool), outcome], 1);
    }

    /// Time from sending an attempt to its response header.
    pub fn upstream_latency(&self, pool: &str, seconds: f64) {
        observe(&self.upstream_latency, pool, seconds);
    }

    /// Time from the client request's arrival to the first byte of the answer keygate relays.
    pub fn time_to_first_byte(&self, pool: &str, seconds: f64) {
        observe(&self.time_to_first_byte, pool, seconds);
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

    /// The text exposition (Prometheus text format 0.0.4), with the pool gauges set from `pools`
    /// first. Pools absent from `pools` are dropped from the gauges, so a pool removed by a
    /// configuration reload stops being reported.
    pub fn render(&self, pools: &[PoolGauge]) -> String {
        let _guard = self
            .render_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.set_pool_gauges(pools);
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

/// Records `seconds` in the histogram of `pool`; NaN and infinities are dropped (they would
/// poison the sum), negative durations count as 0.
fn observe(vec: &HistogramVec, pool: &str, seconds: f64) {
    if let Some(secs) = finite_non_negative(seconds) {
        if let Ok(h) = vec.get_metric_with_label_values(&[label(pool)]) {
            h.observe(secs);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    /// One parsed sample line: name, labels, value.
    type Sample = (String, BTreeMap<String, String>, f64);

    /// Parses the sample lines of a text exposition whose label values need no unescaping.
    fn samples(text: &str) -> Vec<Sample> {
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap(),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap();
                            let v = v.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
                            (k.to_string(), v.to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            out.push((name, labels, value));
        }
        out
    }

    /// The value of the sample `name` with exactly `labels`, if rendered.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        samples(text)
            .into_iter()
            .find(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| v)
    }

    /// Every value the label `key` takes across the samples of `name`.
    fn label_values(text: &str, name: &str, key: &str) -> BTreeSet<String> {
        samples(text)
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, l, _)| l.get(key).cloned())
            .collect()
    }

    #[test]
    fn values_move_as_calls_are_made() {
        let m = Metrics::new().unwrap();
        let text = m.render(&[]);
        assert_eq!(value(&text, "keygate_requests_total", &[]), None);

        m.request(
            "team-a",
            "main",
            "gemini-2.5-flash",
            true,
            200,
            1,
            100,
            2000,
        );
        m.request("team-a", "main", "gemini-2.5-flash", true, 200, 3, 50, 500);
        m.request("-", "main", "gemini-2.5-pro", false, 429, 0, 10, 90);
        m.request("team-a", "main", "gemini-2.5-pro", false, 0, 2, 5, 0);
        m.request("team-a", "main", "gemini-2.5-pro", true, 101, 1, 0, 0);
        m.attempt("main", "ok");
        m.attempt("main", "ok");
        m.attempt("main", "quota_minute");
        m.attempt("main", "something new");
        m.upstream_latency("main", 0.3);
        m.upstream_latency("main", 42.0);
        m.time_to_first_byte("main", 0.004);
        m.pool_exhausted("main", "gemini-2.5-pro");
        m.pool_exhausted("main", "gemini-2.5-pro");

        let t = m.render(&[]);
        let req = |tenant, model, class| {
            value(
                &t,
                "keygate_requests_total",
                &[
                    ("tenant", tenant),
                    ("pool", "main"),
                    ("model", model),
                    ("status_class", class),
                ],
            )
        };
        assert_eq!(req("team-a", "gemini-2.5-flash", "2xx"), Some(2.0));
        // A model Google has not served yet is `other`; once served, it has its own value.
        assert_eq!(req("-", "other", "4xx"), Some(1.0));
        assert_eq!(req("team-a", "other", "none"), Some(1.0));
        assert_eq!(req("team-a", "gemini-2.5-pro", "1xx"), Some(1.0));
        assert_eq!(req("-", "gemini-2.5-pro", "4xx"), None);

        let att = |o| {
            value(
                &t,
                "keygate_upstream_attempts_total",
                &[("pool", "main"), ("outcome", o)],
            )
        };
        assert_eq!(att("ok"), Some(2.0));
        assert_eq!(att("quota_minute"), Some(1.0));
        assert_eq!(att("other"), Some(1.0));
        assert_eq!(att("something new"), None);

        let pool = [("pool", "main")];
        assert_eq!(value(&t, "keygate_request_bytes_total", &pool), Some(165.0));
        assert_eq!(
            value(&t, "keygate_response_bytes_total", &pool),
            Some(2590.0)
        );
        assert_eq!(
            value(&t, "keygate_request_attempts_count", &pool),
            Some(5.0)
        );
        assert_eq!(value(&t, "keygate_request_attempts_sum", &pool), Some(7.0));
        let bucket = |name, le| value(&t, name, &[("pool", "main"), ("le", le)]);
        assert_eq!(bucket("keygate_request_attempts_bucket", "0"), Some(1.0));
        assert_eq!(bucket("keygate_request_attempts_bucket", "1"), Some(3.0));
        assert_eq!(bucket("keygate_request_attempts_bucket", "3"), Some(5.0));
        assert_eq!(bucket("keygate_request_attempts_bucket", "+Inf"), Some(5.0));

        let lat = "keygate_upstream_latency_seconds";
        assert_eq!(value(&t, &format!("{lat}_count"), &pool), Some(2.0));
        assert_eq!(value(&t, &format!("{lat}_sum"), &pool), Some(42.3));
        assert_eq!(
            bucket("keygate_upstream_latency_seconds_bucket", "0.25"),
            Some(0.0)
        );
        assert_eq!(
            bucket("keygate_upstream_latency_seconds_bucket", "0.5"),
            Some(1.0)
        );
        assert_eq!(
            bucket("keygate_upstream_latency_seconds_bucket", "60"),
            Some(2.0)
        );
        assert_eq!(
            bucket("keygate_upstream_latency_seconds_bucket", "600"),
            Some(2.0)
        );
        assert_eq!(
            bucket("keygate_time_to_first_byte_seconds_bucket", "0.005"),
            Some(1.0)
        );

        assert_eq!(
            value(
                &t,
                "keygate_pool_exhausted_total",
                &[("pool", "main"), ("model", "gemini-2.5-pro")]
            ),
            Some(2.0)
        );

        // Counters only grow from one scrape to the next.
        m.request("team-a", "main", "gemini-2.5-flash", false, 503, 4, 1, 1);
        let t2 = m.render(&[]);
        assert_eq!(
            value(&t2, "keygate_request_bytes_total", &[("pool", "main")]),
            Some(166.0)
        );
    }

    #[test]
    fn bad_durations_are_dropped_or_clamped() {
        let m = Metrics::new().unwrap();
        m.upstream_latency("p", f64::NAN);
        m.upstream_latency("p", f64::INFINITY);
        m.upstream_latency("p", -3.0);
        m.time_to_first_byte("p", f64::NEG_INFINITY);
        let t = m.render(&[PoolGauge {
            pool: "p".into(),
            seconds_to_recovery: f64::NAN,
            ..PoolGauge::default()
        }]);
        let pool = [("pool", "p")];
        assert_eq!(
            value(&t, "keygate_upstream_latency_seconds_count", &pool),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "keygate_upstream_latency_seconds_sum", &pool),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "keygate_time_to_first_byte_seconds_count", &pool),
            None
        );
        assert_eq!(
            value(&t, "keygate_pool_next_recovery_seconds", &pool),
            Some(0.0)
        );
        assert!(!t.contains("NaN"));
    }

    #[test]
    fn model_flood_is_capped() {
        let m = Metrics::new().unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let model = format!("gemini-{x:016x}");
            m.request("t", "p", &model, true, 200, 1, 0, 0);
            if i % 3 == 0 {
                m.pool_exhausted("p", &format!("flood-{i}"));
            }
        }
        let t = m.render(&[]);
        let mut models = label_values(&t, "keygate_requests_total", "model");
        models.extend(label_values(&t, "keygate_pool_exhausted_total", "model"));
        assert!(
            models.len() <= MAX_MODELS + 1,
            "{} model values",
            models.len()
        );
        assert!(models.contains("other"));
        // Models seen before the cap keep their own value afterwards.
        let first = models
            .iter()
            .find(|v| v.starts_with("gemini-"))
            .unwrap()
            .clone();
        // Both metrics share the one set of model values: exactly 64 of them, plus "other".
        assert_eq!(models.len(), MAX_MODELS + 1);
        m.request("t", "p", &first, true, 200, 1, 0, 0);
        let t = m.render(&[]);
        let series = [
            ("tenant", "t"),
            ("pool", "p"),
            ("model", first.as_str()),
            ("status_class", "2xx"),
        ];
        assert_eq!(value(&t, "keygate_requests_total", &series), Some(2.0));
        let mut after = label_values(&t, "keygate_requests_total", "model");
        after.extend(label_values(&t, "keygate_pool_exhausted_total", "model"));
        assert_eq!(after, models);
        let total: f64 = samples(&t)
            .iter()
            .filter(|(n, _, _)| n == "keygate_requests_total")
            .map(|(_, _, v)| v)
            .sum();
        assert_eq!(total, 10_001.0);
    }

    #[test]
    fn bad_label_values_never_reach_the_output() {
        let m = Metrics::new().unwrap();
        let long = "a".repeat(1024);
        let exactly_64 = "b".repeat(64);
        let bad = [
            "evil\nkeygate_fake_total 1",
            "quo\"te",
            "back\\slash",
            "brace}",
            "comma,x=\"y\"",
            "spa ce",
            "ünïcødé",
            "模型",
            "nul\0byte",
            "tab\tbed",
            long.as_str(),
        ];
        for b in bad {
            m.request(b, b, b, true, 200, 1, 1, 1);
            m.attempt(b, b);
            m.upstream_latency(b, 1.0);
            m.time_to_first_byte(b, 1.0);
            m.pool_exhausted(b, b);
        }
        m.request("", "", "", true, 200, 1, 1, 1);
        m.request(&exactly_64, "p", "m", true, 200, 1, 1, 1);
        m.request(&format!("{exactly_64}c"), "p", "m", true, 200, 1, 1, 1);
        let t = m.render(&[PoolGauge {
            pool: "bad\npool".into(),
            keys_ok: 1,
            ..PoolGauge::default()
        }]);
        for b in bad {
            assert!(!t.contains(b), "{b:?} leaked");
        }
        assert!(t.is_ascii());
        assert!(!t.contains("keygate_fake_total"));
        for (name, labels, _) in samples(&t) {
            assert!(name.starts_with("keygate_"), "{name}");
            for (k, v) in labels {
                assert!(
                    k == "le" || v == "other" || label(&v) == v.as_str(),
                    "{k}={v:?}"
                );
                assert!(v.len() <= MAX_LABEL_LEN);
            }
        }
        let tenants = label_values(&t, "keygate_requests_total", "tenant");
        let expected: BTreeSet<String> = ["other", "-", exactly_64.as_str()]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(tenants, expected);
        assert_eq!(
            value(&t, "keygate_keys", &[("pool", "other"), ("state", "ok")]),
            Some(1.0)
        );
    }

    #[test]
    fn gauges_render_per_pool_and_follow_the_pool_list() {
        let m = Metrics::new().unwrap();
        let pools = [
            PoolGauge {
                pool: "free".into(),
                keys_ok: 3,
                keys_cooling: 2,
                keys_disabled: 1,
                seconds_to_recovery: 17.5,
            },
            PoolGauge {
                pool: "paid".into(),
                keys_ok: 4,
                keys_cooling: 0,
                keys_disabled: 0,
                seconds_to_recovery: 0.0,
            },
        ];
        let t = m.render(&pools);
        let keys = |pool, state| value(&t, "keygate_keys", &[("pool", pool), ("state", state)]);
        assert_eq!(keys("free", "ok"), Some(3.0));
        assert_eq!(keys("free", "cooling"), Some(2.0));
        assert_eq!(keys("free", "disabled"), Some(1.0));
        assert_eq!(keys("paid", "ok"), Some(4.0));
        assert_eq!(keys("paid", "cooling"), Some(0.0));
        assert_eq!(keys("paid", "disabled"), Some(0.0));
        let rec = |t: &str, pool| value(t, "keygate_pool_next_recovery_seconds", &[("pool", pool)]);
        assert_eq!(rec(&t, "free"), Some(17.5));
        assert_eq!(rec(&t, "paid"), Some(0.0));

        // A later scrape reflects the new state; a pool no longer listed disappears.
        let t = m.render(&[PoolGauge {
            pool: "free".into(),
            keys_ok: 6,
            ..PoolGauge::default()
        }]);
        assert_eq!(
            value(&t, "keygate_keys", &[("pool", "free"), ("state", "ok")]),
            Some(6.0)
        );
        assert_eq!(rec(&t, "free"), Some(0.0));
        assert_eq!(label_values(&t, "keygate_keys", "pool").len(), 1);
        assert_eq!(rec(&t, "paid"), None);

        // Pools whose names collapse to "other" are summed; the soonest recovery wins.
        let t = m.render(&[
            PoolGauge {
                pool: "x y".into(),
                keys_cooling: 1,
                seconds_to_recovery: 30.0,
                ..PoolGauge::default()
            },
            PoolGauge {
                pool: "z\n".into(),
                keys_cooling: 2,
                seconds_to_recovery: 5.0,
                ..PoolGauge::default()
            },
            PoolGauge {
                pool: "w!".into(),
                keys_ok: 1,
                ..PoolGauge::default()
            },
        ]);
        assert_eq!(
            value(
                &t,
                "keygate_keys",
                &[("pool", "other"), ("state", "cooling")]
            ),
            Some(3.0)
        );
        assert_eq!(rec(&t, "other"), Some(5.0));
    }

    #[test]
    fn labels_and_classes() {
        assert_eq!(label("gemini-2.5-flash"), "gemini-2.5-flash");
        assert_eq!(
            label("models/gemini-1.5-pro:002"),
            "models/gemini-1.5-pro:002"
        );
        assert_eq!(label("-"), "-");
        assert_eq!(label(""), "-");
        assert_eq!(label("a b"), "other");
        assert_eq!(label(&"x".repeat(65)), "other");
        assert_eq!(status_class(0), "none");
        assert_eq!(status_class(99), "none");
        assert_eq!(status_class(204), "2xx");
        assert_eq!(status_class(304), "3xx");
        assert_eq!(status_class(499), "4xx");
        assert_eq!(status_class(599), "5xx");
        assert_eq!(status_class(600), "none");
        assert_eq!(status_class(u16::MAX), "none");
    }

    #[test]
    fn metrics_are_shared_across_threads() {
        let m = std::sync::Arc::new(Metrics::new().unwrap());
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for j in 0..500 {
                        m.request(
                            "t",
                            "p",
                            &format!("m{}", (i * 500 + j) % 100),
                            true,
                            200,
                            1,
                            1,
                            1,
                        );
                        if j % 50 == 0 {
                            m.render(&[]);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let t = m.render(&[]);
        assert_eq!(
            value(&t, "keygate_request_bytes_total", &[("pool", "p")]),
            Some(2000.0)
        );
        assert_eq!(
            label_values(&t, "keygate_requests_total", "model").len(),
            MAX_MODELS + 1
        );
    }

    /// Realistic data in every metric, rendered.
    fn realistic() -> String {
        let m = Metrics::new().unwrap();
        let models = ["gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-004"];
        for (i, model) in models.iter().cycle().take(60).enumerate() {
            let tenant = ["team-a", "team-b", "-"][i % 3];
            let pool = ["free", "paid"][i % 2];
            let status = [200, 200, 200, 429, 503, 400, 0][i % 7];
            let attempts = [1, 1, 2, 3, 0, 1, 5][i % 7];
            m.request(
                tenant,
                pool,
                model,
                status / 100 == 2,
                status,
                attempts,
                300 + i as u64,
                4000 * i as u64,
            );
            m.attempt(pool, OUTCOMES[i % OUTCOMES.len()]);
            m.upstream_latency(pool, 0.05 * i as f64);
            m.time_to_first_byte(pool, 0.02 * i as f64);
            if status == 429 || status == 503 {
                m.pool_exhausted(pool, model);
            }
            if status == 0 {
                m.key_disabled(pool, "key_invalid");
                m.key_recovered(pool);
            }
        }
        m.attempt("free", "bogus outcome");
        m.render(&[
            PoolGauge {
                pool: "free".into(),
                keys_ok: 5,
                keys_cooling: 3,
                keys_disabled: 1,
                seconds_to_recovery: 42.25,
            },
            PoolGauge {
                pool: "paid".into(),
                keys_ok: 2,
                keys_cooling: 0,
                keys_disabled: 0,
                seconds_to_recovery: 0.0,
            },
        ])
    }

    #[test]
    fn every_metric_is_rendered_with_help_and_type() {
        let t = realistic();
        for (name, kind) in [
            ("keygate_requests_total", "counter"),
            ("keygate_upstream_attempts_total", "counter"),
            ("keygate_request_attempts", "histogram"),
            ("keygate_request_bytes_total", "counter"),
            ("keygate_response_bytes_total", "counter"),
            ("keygate_upstream_latency_seconds", "histogram"),
            ("keygate_time_to_first_byte_seconds", "histogram"),
            ("keygate_pool_exhausted_total", "counter"),
            ("keygate_key_disabled_total", "counter"),
            ("keygate_key_recovered_total", "counter"),
            ("keygate_keys", "gauge"),
            ("keygate_pool_next_recovery_seconds", "gauge"),
        ] {
            assert!(t.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
            assert!(t.contains(&format!("# HELP {name} ")), "{name}");
        }
    }

    /// `promtool check metrics` (which also lints names, units and help) accepts the output.
    /// Fails when promtool is missing, unless `KEYGATE_SKIP_PROMTOOL=1`.
    #[test]
    fn promtool_accepts_the_exposition() {
        let text = realistic();
        let child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var("KEYGATE_SKIP_PROMTOOL").as_deref() == Ok("1") {
                    eprintln!("promtool not on PATH; skipped because KEYGATE_SKIP_PROMTOOL=1");
                    return;
                }
                panic!(
                    "promtool is not on PATH. Install it (Debian/Ubuntu: \
                     `apt-get install -y --no-install-recommends prometheus`, which ships \
                     /usr/bin/promtool), or set KEYGATE_SKIP_PROMTOOL=1 to skip this test"
                );
            }
            Err(e) => panic!("cannot run promtool: {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!(
            "promtool check metrics: {}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
        assert!(
            out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
            "promtool check metrics: {}\n{stdout}{stderr}\n--- input ---\n{text}",
            out.status
        );
    }
}
