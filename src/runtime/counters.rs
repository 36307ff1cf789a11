//! Request and token counters added up across the fleet (the `redis:` section): what the
//! admin API answers for a tenant or a key is then the fleet's count, not this instance's.

use crate::quota::keys::series::SeriesOf;
use crate::quota::keys::Usage;
use crate::runtime::Shared;

/// Where the counters of several instances are added up.
pub trait SharedCounters: Send + Sync {
    /// The fleet's requests, prompt, output and total tokens of `of`, given this instance's
    /// own `local` counts (those not told to the fleet yet are added); never below `local`.
    /// `None` while the fleet's sums are not known (the store does not answer).
    fn counts(&self, of: SeriesOf<'_>, local: [u64; 4]) -> Option<[u64; 4]>;
}

impl Shared {
    /// The counts of `of` (whose counters are `usage`): the fleet's when instances share their
    /// state and the store answers (true), else this instance's own (false).
    pub fn usage_counts(&self, of: SeriesOf<'_>, usage: &Usage) -> ([u64; 4], bool) {
        let local = usage.totals();
        match self.counters.get().and_then(|c| c.counts(of, local)) {
            Some(fleet) => (fleet, true),
            None => (local, false),
        }
    }
}
