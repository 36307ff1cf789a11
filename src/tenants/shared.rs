//! Tenant limits held across instances: the seam through which the gateway asks the fleet
//! (the `redis:` section) whether a tenant's request fits its `rpm` and `max_concurrent`
//! counted over every instance, rather than over this one alone.

use super::{Refusal, Tenant};
use async_trait::async_trait;

/// A concurrency slot held in the shared store; dropping it gives the slot back.
pub type Lease = Box<dyn Send + Sync>;

/// What the shared store said of one request.
pub enum Verdict {
    /// Admitted; the slot taken, when a slot was asked for.
    Admitted(Option<Lease>),
    /// Refused by the limits counted across instances.
    Refused(Refusal),
}

/// Where a tenant's limits are counted across instances.
#[async_trait]
pub trait SharedLimits: Send + Sync {
    /// Counts one request of `tenant`: against its rpm when `rate`, against its
    /// max_concurrent (taking a slot) when `slot`. `None` when the store did not answer in
    /// time or is known to be down: the caller then applies the limits of this instance alone.
    async fn admit(&self, tenant: &Tenant, rate: bool, slot: bool) -> Option<Verdict>;
}
