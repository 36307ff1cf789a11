//! What keygate tells operators on its own: Prometheus metrics and webhook alerts.

pub mod alerts;
pub mod metrics;
