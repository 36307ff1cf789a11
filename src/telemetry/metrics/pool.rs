//! One pool's metrics, looked up once: what every request of a pool records goes to handles
//! taken when the pool is first used, not through a label lookup each time (in `prometheus`, a
//! hash of the label values, a lock and a map search).

use super::{label, Metrics};
use prometheus::{Histogram, IntCounter};

/// The metrics every request of one pool records, by handle (see [`Metrics::pool`]).
#[derive(Debug, Clone)]
pub struct PoolMetrics {
    /// The pool's label value.
    pub(super) label: String,
    pub(super) attempts_per_request: Histogram,
    pub(super) request_bytes: IntCounter,
    pub(super) response_bytes: IntCounter,
    pub(super) upstream_latency: Histogram,
    pub(super) time_to_first_byte: Histogram,
    /// `keygate_upstream_attempts_total{outcome="ok"}`, the common outcome.
    pub(super) served_attempts: IntCounter,
}

impl Metrics {
    /// The handles of pool `name`'s metrics (`-` for requests answered before a pool was
    /// chosen). Cheap to keep, costly to take: take them once per pool.
    pub fn pool(&self, name: &str) -> PoolMetrics {
        let pool = label(name);
        PoolMetrics {
            label: pool.to_string(),
            // One label, as each vector was created with: these lookups cannot fail.
            attempts_per_request: self.attempts_per_request.with_label_values(&[pool]),
            request_bytes: self.request_bytes.with_label_values(&[pool]),
            response_bytes: self.response_bytes.with_label_values(&[pool]),
            upstream_latency: self.upstream_latency.with_label_values(&[pool]),
            time_to_first_byte: self.time_to_first_byte.with_label_values(&[pool]),
            served_attempts: self.attempts.with_label_values(&[pool, "ok"]),
        }
    }

    /// The handles for requests answered before a pool was chosen.
    pub fn no_pool(&self) -> &PoolMetrics {
        self.no_pool.get_or_init(|| self.pool("-"))
    }
}
