//! What keygate tells operators on its own: Prometheus metrics, webhook alerts, and the recent
//! events the dashboard lists.

pub mod alerts;
pub mod events;
pub mod metrics;
