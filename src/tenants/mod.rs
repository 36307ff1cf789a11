//! Clients of the gateway: who a request belongs to, what that tenant may use, and the limits
//! that keep one tenant from starving the others.
//!
//! Tokens are kept only as SHA-256 digests and looked up by the digest of what the client
//! presents, so no comparison ever runs over the secret itself and the lookup time does not
//! depend on how much of a guess was right.
//!
//! Limits, all checked before any upstream work:
//! - `rpm`: a GCRA rate limit (a token bucket holding a minute's worth of requests, refilled
//!   evenly), lock-free, exact, and able to say when the next request will be allowed;
//! - `max_concurrent`: requests in flight, released when the request's context is dropped;
//! - fair share ([`FairShare`], on pools with `fair_share: true`): a tenant that used a pool
//!   more than other active tenants lately is kept off some of its projects, which stay free for
//!   the lighter ones; nothing is held back for tenants that sent the pool nothing lately.

pub mod endpoints;
mod fair;
pub mod shared;

pub use fair::FairShare;

use crate::config::TenantConfig;
use crate::quota::keys::Usage;
use crate::secret::sha256;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// The result of authenticating a request.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No tenants are configured: everyone is let in.
    Open,
    /// The token belongs to this tenant.
    Tenant(Arc<Tenant>),
    /// Tenants are configured and the request carries no token.
    Missing,
    /// The request carries a token nobody owns.
    Wrong,
}

/// A configured tenant with its counters.
#[derive(Debug)]
pub struct Tenant {
    /// Name shown in logs and the admin API.
    pub name: Arc<str>,
    /// Indices of the pools it may use, in config order.
    pub pools: Vec<usize>,
    /// Requests per minute allowed, if limited.
    pub rpm: Option<u32>,
    /// Requests in flight allowed, if limited.
    pub max_concurrent: Option<u32>,
    /// Counters, kept across reloads of the same tenant.
    pub state: Arc<TenantState>,
}

/// What a tenant did: usage, refusals, and the state of its limits.
#[derive(Debug, Default)]
pub struct TenantState {
    /// Requests answered and tokens used.
    pub usage: Usage,
    /// Requests refused by `rpm`.
    pub refused_rate: AtomicU64,
    /// Requests refused by `max_concurrent`.
    pub refused_concurrency: AtomicU64,
    /// Requests refused to keep a scarce pool's last projects for lighter tenants.
    pub refused_fair_share: AtomicU64,
    /// What the response cache did for this tenant.
    pub cache: CacheUsage,
    /// Requests in flight now.
    in_flight: AtomicU32,
    /// Bytes of this tenant's request bodies held in memory now.
    pub buffered: Arc<std::sync::atomic::AtomicUsize>,
    /// GCRA's theoretical arrival time, in microseconds since the epoch.
    rate_tat: AtomicU64,
}

/// A tenant's use of the response cache: hits spend no quota, so they are counted apart.
#[derive(Debug, Default)]
pub struct CacheUsage {
    /// Requests answered from the cache.
    pub hits: AtomicU64,
    /// Requests the cache looked up (or was told not to) and Google answered.
    pub misses: AtomicU64,
    /// Body bytes served from the cache.
    pub hit_bytes: AtomicU64,
    /// Tokens the answers served from the cache had used: what the hits saved.
    pub saved_tokens: AtomicU64,
}

impl TenantState {
    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }
}

/// Why a tenant's request was refused before any upstream work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `rpm`: the next request is allowed in this many seconds.
    Rate {
        /// Seconds until a request is allowed again (at least 1).
        retry_after: u64,
        /// The configured limit.
        rpm: u32,
    },
    /// `max_concurrent` requests are already in flight.
    Concurrency {
        /// The configured limit.
        limit: u32,
    },
}

/// A request counted against `max_concurrent`; dropping it releases the slot.
#[derive(Debug)]
pub struct InFlight(Arc<TenantState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Tenant {
    /// Whether any limit applies to this tenant (a tenant without one never asks the fleet).
    pub fn is_limited(&self) -> bool {
        self.rpm.is_some() || self.max_concurrent.is_some()
    }

    /// Counts a refusal the fleet's shared limits made.
    pub fn count_refusal(&self, refusal: Refusal) {
        let counter = match refusal {
            Refusal::Rate { .. } => &self.state.refused_rate,
            Refusal::Concurrency { .. } => &self.state.refused_concurrency,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Admits one request at `now_us` (microseconds since the epoch) or says why not. A refused
    /// request spends nothing: neither a concurrency slot nor a share of the rate.
    pub fn admit(&self, now_us: u64) -> Result<InFlight, Refusal> {
        let guard = self.admit_concurrent()?;
        self.admit_rate(now_us)?;
        Ok(guard)
    }

    /// Takes a concurrency slot, or says the tenant has `max_concurrent` in flight already.
    pub fn admit_concurrent(&self) -> Result<InFlight, Refusal> {
        let state = &self.state;
        let slots = state.in_flight.fetch_add(1, Relaxed) + 1;
        let guard = InFlight(state.clone());
        if let Some(limit) = self.max_concurrent {
            if slots > limit {
                state.refused_concurrency.fetch_add(1, Relaxed);
                return Err(Refusal::Concurrency { limit });
            }
        }
        Ok(guard)
    }

    /// Counts one request at `now_us` against `rpm`, or says when the next is allowed. Kept
    /// apart from [`Tenant::admit_concurrent`] so that a request the response cache answers
    /// need not count: rpm protects quota, and a hit spends none.
    pub fn admit_rate(&self, now_us: u64) -> Result<(), Refusal> {
        let Some(rpm) = self.rpm else {
            return Ok(());
        };
        if let Err(wait_us) = gcra(&self.state.rate_tat, rpm, now_us) {
            self.state.refused_rate.fetch_add(1, Relaxed);
            return Err(Refusal::Rate {
                retry_after: wait_us.div_ceil(1_000_000).max(1),
                rpm,
            });
        }
        Ok(())
    }
}

impl Tenant {
    /// Counts one request at `now_us` that the fleet admitted against the local rpm too,
    /// without refusing it: should the fleet stop answering, this instance's own count goes on
    /// from what it served.
    pub fn note_rate(&self, now_us: u64) {
        if let Some(rpm) = self.rpm {
            let interval = 60_000_000 / u64::from(rpm.max(1));
            let _ = self
                .state
                .rate_tat
                .fetch_update(Relaxed, Relaxed, |tat| Some(tat.max(now_us) + interval));
        }
    }
}

/// One step of the generic cell rate algorithm for `rpm` requests a minute with a burst of a
/// whole minute's worth: `Ok` admits (and moves the arrival time on), `Err` gives the wait in
/// microseconds.
fn gcra(tat: &AtomicU64, rpm: u32, now_us: u64) -> Result<(), u64> {
    let interval = 60_000_000 / u64::from(rpm.max(1));
    let tolerance = interval * u64::from(rpm.max(1) - 1);
    let mut current = tat.load(Relaxed);
    loop {
        let start = current.max(now_us);
        let ahead = start - now_us;
        if ahead > tolerance {
            return Err(ahead - tolerance);
        }
        match tat.compare_exchange_weak(current, start + interval, Relaxed, Relaxed) {
            Ok(_) => return Ok(()),
            Err(seen) => current = seen,
        }
    }
}

/// The configured tenants.
#[derive(Debug, Default)]
pub struct Tenants {
    by_digest: HashMap<[u8; 32], Arc<Tenant>>,
    list: Vec<Arc<Tenant>>,
}

impl Tenants {
    /// Builds the lookup table; `previous` hands over the counters of tenants that keep their
    /// name (a reload must not reset usage or limits).
    pub fn new(tenants: &[TenantConfig], previous: Option<&Tenants>) -> Tenants {
        let list: Vec<Arc<Tenant>> = tenants
            .iter()
            .map(|t| {
                let state = previous
                    .and_then(|p| p.by_name(&t.name))
                    .map(|old| old.state.clone())
                    .unwrap_or_default();
                Arc::new(Tenant {
                    name: Arc::from(t.name.as_str()),
                    pools: t.pools.clone(),
                    rpm: t.rpm,
                    max_concurrent: t.max_concurrent,
                    state,
                })
            })
            .collect();
        Tenants {
            by_digest: tenants
                .iter()
                .zip(&list)
                .map(|(t, tenant)| (t.token_sha256, tenant.clone()))
                .collect(),
            list,
        }
    }

    /// Who presents `token`.
    pub fn authenticate(&self, token: Option<&[u8]>) -> Auth {
        if self.by_digest.is_empty() {
            return Auth::Open;
        }
        match token {
            None => Auth::Missing,
            Some([]) => Auth::Missing,
            Some(t) => match self.by_digest.get(&sha256(t)) {
                Some(tenant) => Auth::Tenant(tenant.clone()),
                None => Auth::Wrong,
            },
        }
    }

    /// Every tenant, in config order.
    pub fn list(&self) -> &[Arc<Tenant>] {
        &self.list
    }

    /// The tenant named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.list.iter().find(|t| &*t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(name: &str, token: &[u8]) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            token_sha256: sha256(token),
            pools: vec![0],
            rpm: None,
            max_concurrent: None,
        }
    }

    #[test]
    fn authenticates_by_token_digest() {
        let t = Tenants::new(&[config("alice", b"tok-alice")], None);
        match t.authenticate(Some(b"tok-alice")) {
            Auth::Tenant(tenant) => assert_eq!(&*tenant.name, "alice"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(t.authenticate(Some(b"tok-alicf")), Auth::Wrong));
        assert!(matches!(t.authenticate(Some(b"")), Auth::Missing));
        assert!(matches!(t.authenticate(None), Auth::Missing));
        assert!(matches!(
            Tenants::new(&[], None).authenticate(None),
            Auth::Open
        ));
    }

    #[test]
    fn counters_survive_a_rebuild_by_name() {
        let first = Tenants::new(&[config("alice", b"a"), config("bob", b"b")], None);
        first.list()[0].state.usage.requests.fetch_add(3, Relaxed);
        let second = Tenants::new(&[config("alice", b"a2")], Some(&first));
        assert_eq!(second.list()[0].state.usage.requests.load(Relaxed), 3);
    }

    fn tenant(rpm: Option<u32>, max_concurrent: Option<u32>) -> Tenant {
        Tenant {
            name: "t".into(),
            pools: vec![0],
            rpm,
            max_concurrent,
            state: Arc::default(),
        }
    }

    #[test]
    fn rpm_allows_a_minute_of_burst_then_one_per_interval() {
        let t = tenant(Some(60), None);
        let start = 1_000_000_000_000;
        for _ in 0..60 {
            assert!(t.admit(start).is_ok());
        }
        assert_eq!(
            t.admit(start).unwrap_err(),
            Refusal::Rate {
                retry_after: 1,
                rpm: 60
            }
        );
        // One request a second comes back.
        assert!(t.admit(start + 1_000_000).is_ok());
        assert!(t.admit(start + 1_000_000).is_err());
        assert_eq!(t.state.refused_rate.load(Relaxed), 2);
    }

    #[test]
    fn rpm_retry_after_says_when() {
        let t = tenant(Some(2), None);
        let start = 5_000_000_000;
        assert!(t.admit(start).is_ok());
        assert!(t.admit(start).is_ok());
        // Two a minute: the next one is allowed 30 s later.
        assert_eq!(
            t.admit(start).unwrap_err(),
            Refusal::Rate {
                retry_after: 30,
                rpm: 2
            }
        );
    }

    #[test]
    fn concurrency_slots_are_released_on_drop_and_refusals_spend_nothing() {
        let t = tenant(Some(1000), Some(2));
        let a = t.admit(1).unwrap();
        let _b = t.admit(1).unwrap();
        assert_eq!(t.admit(1).unwrap_err(), Refusal::Concurrency { limit: 2 });
        assert_eq!(t.state.in_flight(), 2);
        drop(a);
        assert!(t.admit(1).is_ok());
        assert_eq!(t.state.refused_concurrency.load(Relaxed), 1);
    }
}
