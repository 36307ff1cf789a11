//! A tenant's limits at admission: counted on this instance, and across the fleet when
//! instances share their state (the `redis:` section).
//!
//! The local count always runs first (it is a few atomics, and a request it refuses costs the
//! store nothing). A tenant with limits then asks the fleet, one round trip bounded by
//! `redis.timeout_ms`; the fleet's answer decides. When the store does not answer (down, slow,
//! or known to be down), this instance's own limits decide: each instance holds the tenant to
//! its full rpm and max_concurrent (README, "Running several instances"). A tenant without
//! limits never asks the fleet.

use super::client::now_micros;
use super::Gateway;
use crate::tenants::shared::{Lease, Verdict};
use crate::tenants::{InFlight, Refusal, Tenant};

/// A tenant's slot for one request: this instance's count and, across the fleet, its lease.
/// Dropping it gives both back.
pub(super) struct Slot {
    _local: InFlight,
    _lease: Option<Lease>,
}

impl Gateway {
    /// Admits one request of `t`: a concurrency slot and, unless `rate_later` (the response
    /// cache may answer it, and a hit spends no rpm), a share of its rate.
    pub(super) async fn admit_tenant(&self, t: &Tenant, rate_later: bool) -> Result<Slot, Refusal> {
        let local = t.admit_concurrent()?;
        let rate = !rate_later && t.rpm.is_some();
        let slot = t.max_concurrent.is_some();
        match self.ask_fleet(t, rate, slot).await {
            Some(Verdict::Admitted(lease)) => {
                if rate {
                    t.note_rate(now_micros());
                }
                Ok(Slot {
                    _local: local,
                    _lease: lease,
                })
            }
            Some(Verdict::Refused(refusal)) => Err(refusal),
            None => {
                if rate {
                    t.admit_rate(now_micros())?;
                }
                Ok(Slot {
                    _local: local,
                    _lease: None,
                })
            }
        }
    }

    /// Counts one request of `t` against its rpm (after the response cache missed).
    pub(super) async fn admit_tenant_rate(&self, t: &Tenant) -> Result<(), Refusal> {
        if t.rpm.is_none() {
            return Ok(());
        }
        match self.ask_fleet(t, true, false).await {
            Some(Verdict::Admitted(_)) => {
                t.note_rate(now_micros());
                Ok(())
            }
            Some(Verdict::Refused(refusal)) => Err(refusal),
            None => t.admit_rate(now_micros()),
        }
    }

    /// The fleet's verdict, when instances share their state, the tenant has a limit to count
    /// and the store answered in time. A refusal is counted in the tenant's counters.
    async fn ask_fleet(&self, t: &Tenant, rate: bool, slot: bool) -> Option<Verdict> {
        if !(rate || slot) {
            return Some(Verdict::Admitted(None));
        }
        let limits = self.shared.limits.get()?;
        let verdict = limits.admit(t, rate, slot).await?;
        if let Verdict::Refused(refusal) = verdict {
            t.count_refusal(refusal);
        }
        Some(verdict)
    }
}
