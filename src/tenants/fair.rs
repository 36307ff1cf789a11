//! Fair share: keeps part of a pool for its lighter tenants. Each instance counts its own
//! requests per tenant; with several instances sharing their state, the fleet's counts are
//! added to them (see [`FairShare::take_unsent`] and [`FairShare::set_fleet`]), so a tenant
//! flooding one instance is the heavy one on every instance.

use crate::quota::keys::Millis;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Length of the window fair shares are measured over: Google's quotas are per minute.
const FAIR_WINDOW_MS: Millis = 60_000;

/// One tenant on one pool: requests in a sliding minute, estimated from this and the previous
/// fixed minute, and when it last asked the pool for anything.
#[derive(Debug, Default, Clone, Copy)]
struct Window {
    minute: u64,
    current: u64,
    previous: u64,
    last_seen: Millis,
}

impl Window {
    fn roll(&mut self, now: Millis) {
        let minute = now / FAIR_WINDOW_MS;
        if minute == self.minute {
            return;
        }
        self.previous = if minute == self.minute + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.minute = minute;
    }

    fn estimate(&self, now: Millis) -> f64 {
        let into = (now % FAIR_WINDOW_MS) as f64 / FAIR_WINDOW_MS as f64;
        self.previous as f64 * (1.0 - into) + self.current as f64
    }
}

/// A tenant on one pool: what this instance counted, how much of it the fleet was told, and
/// what the other instances counted (as of the last turn of the fleet's writer).
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    own: Window,
    /// How much of `own.current` and `own.previous` was handed to the fleet.
    sent: [u64; 2],
    /// The `own.last_seen` handed to the fleet.
    sent_seen: Millis,
    /// The other instances' counts and last request; all zero without a fleet.
    others: Window,
}

impl Entry {
    fn roll(&mut self, now: Millis) {
        let next = now / FAIR_WINDOW_MS == self.own.minute + 1;
        if now / FAIR_WINDOW_MS != self.own.minute {
            self.sent = [0, if next { self.sent[0] } else { 0 }];
        }
        self.own.roll(now);
    }

    /// This instance's and the others' use, over the last minute.
    fn estimate(&self, now: Millis) -> f64 {
        let mut others = self.others;
        others.roll(now);
        self.own.estimate(now) + others.estimate(now)
    }

    /// When anyone of the fleet last saw the tenant.
    fn last_seen(&self) -> Millis {
        self.own.last_seen.max(self.others.last_seen)
    }
}

/// What one instance counted of a tenant since it last told the fleet: requests by minute
/// (since the epoch) and, if it asked since, when it last asked.
pub type Unsent = (Arc<str>, Vec<(u64, u64)>, Option<Millis>);

/// Keeps part of a pool for its lighter tenants, so a tenant flooding the pool cannot starve
/// a quiet one, without holding anything back for tenants that are not there.
///
/// Each pool counts the requests it took per tenant over a sliding minute, and notes when each
/// tenant last sent it a request (served or not). A tenant is *active* while its last request
/// is at most the active window old (a minute unless configured). A tenant that used the pool
/// more than `n` other active tenants did is kept off `n` of the pool's projects (the caller
/// picks which: the last ones that can serve the model), leaving them to the lighter tenants;
/// the lightest active tenant, and a tenant with nobody active beside it, may use every project.
/// A tenant that went quiet stops holding anything back once its window passes, so no project
/// waits for someone who is not asking. Quotas are per project, so a project is the unit that
/// can be set aside. The table holds one entry per configured tenant that used the pool.
#[derive(Debug)]
pub struct FairShare {
    active_ms: Millis,
    windows: Mutex<HashMap<Arc<str>, Entry>>,
}

impl FairShare {
    /// An empty table where a tenant counts as active for `active_ms` after its last request.
    pub fn new(active_ms: Millis) -> FairShare {
        FairShare {
            active_ms,
            windows: Mutex::default(),
        }
    }

    /// This table's counts carried into a new configuration: active window `active_ms`, and
    /// only the tenants `keep` says still exist (a removed tenant holds nothing back).
    pub fn carried_over(&self, active_ms: Millis, keep: impl Fn(&str) -> bool) -> FairShare {
        let windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        FairShare {
            active_ms,
            windows: Mutex::new(
                windows
                    .iter()
                    .filter(|(name, _)| keep(name))
                    .map(|(name, e)| (name.clone(), *e))
                    .collect(),
            ),
        }
    }

    /// Counts one request of `tenant` that the pool took at `now`.
    pub fn record(&self, tenant: &Arc<str>, now: Millis) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let e = windows.entry(tenant.clone()).or_default();
        e.roll(now);
        e.own.current += 1;
        e.own.last_seen = e.own.last_seen.max(now);
    }

    /// Notes a request of `tenant` to the pool at `now` (it is active from now on, whether the
    /// pool takes the request or not) and says how many other active tenants used the pool
    /// less than it did over the last minute: how many projects it leaves to them.
    pub fn arrive(&self, tenant: &Arc<str>, now: Millis) -> usize {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mine = {
            let e = windows.entry(tenant.clone()).or_default();
            e.roll(now);
            e.own.last_seen = e.own.last_seen.max(now);
            e.estimate(now)
        };
        let mut lighter = 0;
        for (name, e) in windows.iter_mut() {
            if name == tenant || now.saturating_sub(e.last_seen()) > self.active_ms {
                continue;
            }
            e.roll(now);
            if e.estimate(now) < mine {
                lighter += 1;
            }
        }
        lighter
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What this table counted since the last call, for the fleet's count (the `redis:`
    /// section): marked as told. Counts older than the previous minute are not kept.
    pub fn take_unsent(&self, now: Millis) -> Vec<Unsent> {
        let mut out = Vec::new();
        for (name, e) in self.lock().iter_mut() {
            e.roll(now);
            let m = e.own.minute;
            let counts: Vec<(u64, u64)> = [
                (
                    m.saturating_sub(1),
                    e.own.previous.saturating_sub(e.sent[1]),
                ),
                (m, e.own.current.saturating_sub(e.sent[0])),
            ]
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
            e.sent = [e.own.current, e.own.previous];
            let seen = (e.own.last_seen > e.sent_seen).then_some(e.own.last_seen);
            e.sent_seen = e.own.last_seen;
            if !counts.is_empty() || seen.is_some() {
                out.push((name.clone(), counts, seen));
            }
        }
        out
    }

    /// Takes in the fleet's counts, read right after [`FairShare::take_unsent`] at `now`: per
    /// tenant, its requests in `minute` and the one before and when it last asked, this
    /// instance's told counts included (they are taken out: this table counts its own).
    pub fn set_fleet(&self, minute: u64, fleet: &HashMap<Arc<str>, [u64; 3]>, now: Millis) {
        let mut windows = self.lock();
        for name in fleet.keys() {
            if !windows.contains_key(name) {
                windows.insert(name.clone(), Entry::default());
            }
        }
        for (name, e) in windows.iter_mut() {
            e.roll(now);
            let Some([current, previous, seen]) = fleet.get(name).copied() else {
                e.others = Window::default();
                continue;
            };
            // What this instance told of `minute` and of the one before.
            let own = match e.own.minute {
                m if m == minute => e.sent,
                m if m == minute + 1 => [e.sent[1], 0],
                _ => [0, 0],
            };
            e.others = Window {
                minute,
                current: current.saturating_sub(own[0]),
                previous: previous.saturating_sub(own[1]),
                last_seen: seen,
            };
        }
    }

    /// Forgets the other instances' counts (the fleet's store does not answer).
    pub fn clear_fleet(&self) {
        for e in self.lock().values_mut() {
            e.others = Window::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default active window (`fair_share_active_seconds: 60`).
    const DEFAULT_ACTIVE_MS: Millis = 60_000;

    fn names<const N: usize>(names: [&str; N]) -> [Arc<str>; N] {
        names.map(Arc::from)
    }

    #[test]
    fn fair_share_counts_the_lighter_active_tenants() {
        let f = FairShare::new(DEFAULT_ACTIVE_MS);
        let [loud, middle, quiet, newcomer] = names(["loud", "middle", "quiet", "newcomer"]);
        let now = 10 * FAIR_WINDOW_MS + 1000;
        for _ in 0..20 {
            f.record(&loud, now);
        }
        for _ in 0..5 {
            f.record(&middle, now);
        }
        f.record(&quiet, now);
        assert_eq!(f.arrive(&loud, now), 2);
        assert_eq!(f.arrive(&middle, now), 1);
        assert_eq!(f.arrive(&quiet, now), 0);
        // A tenant that has not used the pool yet is the lightest.
        assert_eq!(f.arrive(&newcomer, now), 0);
        // Once it asked, it is active and lighter than everyone, even if nothing was served.
        assert_eq!(f.arrive(&quiet, now), 1);
        assert_eq!(f.arrive(&loud, now), 3);
        // Alone on the pool, a tenant has nobody to leave room for.
        let alone = FairShare::new(DEFAULT_ACTIVE_MS);
        alone.record(&loud, now);
        assert_eq!(alone.arrive(&loud, now), 0);
        // Two minutes later the old traffic no longer counts.
        f.record(&loud, now + 2 * FAIR_WINDOW_MS);
        assert_eq!(f.arrive(&loud, now + 2 * FAIR_WINDOW_MS), 0);
    }

    #[test]
    fn a_tenant_idle_past_the_active_window_holds_nothing_back() {
        let f = FairShare::new(DEFAULT_ACTIVE_MS);
        let [heavy, quiet] = names(["heavy", "quiet"]);
        let start = 10 * FAIR_WINDOW_MS + 1000;
        f.record(&quiet, start);
        for _ in 0..30 {
            f.record(&heavy, start);
        }
        assert_eq!(f.arrive(&heavy, start), 1);
        // Still active 60 s after its last request (and still counted as lighter)...
        assert_eq!(f.arrive(&heavy, start + 60_000), 1);
        // ...but idle for over 60 s it is not, though its request is still in the minute's
        // usage estimate.
        assert_eq!(f.arrive(&heavy, start + 60_001), 0);
        // A new request makes it active again at once.
        f.record(&quiet, start + 90_000);
        assert_eq!(f.arrive(&heavy, start + 90_000), 1);
    }

    #[test]
    fn the_active_window_is_configurable_and_carried_over() {
        let f = FairShare::new(2_000);
        let [heavy, quiet, gone] = names(["heavy", "quiet", "gone"]);
        let start = 10 * FAIR_WINDOW_MS;
        f.record(&quiet, start);
        f.record(&gone, start);
        for _ in 0..5 {
            f.record(&heavy, start);
        }
        assert_eq!(f.arrive(&heavy, start + 2_000), 2);
        assert_eq!(f.arrive(&heavy, start + 2_001), 0);
        // A reload keeps the counts of tenants that still exist, under the new window.
        let g = f.carried_over(DEFAULT_ACTIVE_MS, |name| name != "gone");
        assert_eq!(g.arrive(&heavy, start + 2_001), 1);
        assert_eq!(g.arrive(&heavy, start + 60_001), 0);
    }

    /// The fleet's store in a test: the counts of every instance added up, by tenant and minute.
    #[derive(Default)]
    struct Store(
        HashMap<Arc<str>, HashMap<u64, u64>>,
        HashMap<Arc<str>, Millis>,
    );

    impl Store {
        /// One turn of an instance's writer: tells its counts, reads the fleet's.
        fn turn(&mut self, f: &FairShare, now: Millis) {
            for (name, counts, seen) in f.take_unsent(now) {
                for (m, n) in counts {
                    *self
                        .0
                        .entry(name.clone())
                        .or_default()
                        .entry(m)
                        .or_default() += n;
                }
                if let Some(seen) = seen {
                    let s = self.1.entry(name).or_default();
                    *s = (*s).max(seen);
                }
            }
            let m = now / FAIR_WINDOW_MS;
            let fleet = self
                .0
                .iter()
                .map(|(name, by)| {
                    let at = |m: u64| by.get(&m).copied().unwrap_or(0);
                    let seen = self.1.get(name).copied().unwrap_or(0);
                    (name.clone(), [at(m), at(m - 1), seen])
                })
                .collect();
            f.set_fleet(m, &fleet, now);
        }
    }

    #[test]
    fn a_tenants_use_on_another_instance_counts_here() {
        let (a, b) = (
            FairShare::new(DEFAULT_ACTIVE_MS),
            FairShare::new(DEFAULT_ACTIVE_MS),
        );
        let [heavy, quiet] = names(["heavy", "quiet"]);
        let now = 10 * FAIR_WINDOW_MS + 1000;
        for _ in 0..3 {
            b.record(&quiet, now);
        }
        for _ in 0..6 {
            a.record(&heavy, now);
        }
        // Alone, B sees a heavy tenant that used nothing here: it is the lighter one.
        assert_eq!(b.arrive(&heavy, now), 0);
        let mut store = Store::default();
        for _ in 0..2 {
            store.turn(&a, now + 500);
            store.turn(&b, now + 500);
        }
        // With the fleet's counts, heavy is heavier than quiet on B, and quiet on A is active.
        assert_eq!(b.arrive(&heavy, now + 600), 1);
        assert_eq!(a.arrive(&heavy, now + 600), 1);
        assert_eq!(b.arrive(&quiet, now + 600), 0);
        // Turns that tell nothing new count nothing twice, across a minute's end too.
        let later = now + FAIR_WINDOW_MS;
        for _ in 0..4 {
            b.record(&heavy, later);
            store.turn(&b, later);
            store.turn(&a, later);
        }
        let e = a.lock()[&heavy];
        assert_eq!(e.own.previous + e.others.current + e.others.previous, 6 + 4);
        // Without the fleet, each table counts its own again.
        b.clear_fleet();
        assert_eq!(b.arrive(&quiet, later), 0);
        assert_eq!(
            b.arrive(&heavy, later),
            1,
            "heavy's 4 on B outweigh quiet's 3"
        );
    }
}
