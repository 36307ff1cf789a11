//! The memory all request bodies hold together: each body reserves its share of one
//! [`BodyBudget`] as it grows, and gives it back when dropped.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// The memory request bodies may hold at once, all requests together. Bodies are buffered whole
/// (each attempt replays them), so without a total, many clients sending the largest body at
/// once could take gigabytes.
#[derive(Debug)]
pub struct BodyBudget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<BodyBudget> {
        Arc::new(BodyBudget {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }

    /// An empty reservation, to grow as a body arrives. With `share` (a tenant's count of the
    /// bytes its bodies hold), that tenant's bodies together may take at most half the budget,
    /// so one tenant cannot take it all from the others.
    pub fn reservation(self: &Arc<Self>, share: Option<Arc<AtomicUsize>>) -> Reservation {
        Reservation {
            budget: self.clone(),
            share,
            bytes: 0,
        }
    }
}

/// A body's share of the [`BodyBudget`], given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    share: Option<Arc<AtomicUsize>>,
    bytes: usize,
}

/// Adds `more` to `counter` if the sum stays within `limit`.
fn take(counter: &AtomicUsize, more: usize, limit: usize) -> bool {
    let mut used = counter.load(Relaxed);
    loop {
        let Some(next) = used.checked_add(more).filter(|n| *n <= limit) else {
            return false;
        };
        match counter.compare_exchange_weak(used, next, Relaxed, Relaxed) {
            Ok(_) => return true,
            Err(seen) => used = seen,
        }
    }
}

impl Reservation {
    /// Takes `more` bytes of the budget (and of the tenant's half); false, and nothing taken,
    /// when that would pass either.
    pub fn grow(&mut self, more: usize) -> bool {
        if let Some(share) = &self.share {
            if !take(share, more, self.budget.limit / 2) {
                return false;
            }
        }
        if !take(&self.budget.used, more, self.budget.limit) {
            if let Some(share) = &self.share {
                share.fetch_sub(more, Relaxed);
            }
            return false;
        }
        self.bytes += more;
        true
    }

    /// Bytes this reservation holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds exactly `bytes`: grows (false, and nothing taken, past the budget) or gives back
    /// the excess.
    pub fn resize(&mut self, bytes: usize) -> bool {
        if bytes > self.bytes {
            return self.grow(bytes - self.bytes);
        }
        let less = self.bytes - bytes;
        self.budget.used.fetch_sub(less, Relaxed);
        if let Some(share) = &self.share {
            share.fetch_sub(less, Relaxed);
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Relaxed);
        if let Some(share) = &self.share {
            share.fetch_sub(self.bytes, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_resizes_both_ways() {
        let budget = BodyBudget::new(100);
        let mut r = budget.reservation(None);
        assert!(r.resize(80));
        assert!(!r.resize(101));
        assert_eq!(budget.used(), 80);
        assert!(r.resize(10));
        assert_eq!(budget.used(), 10);
        drop(r);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn bodies_share_one_budget() {
        let budget = BodyBudget::new(1000);
        let mut a = budget.reservation(None);
        assert!(a.grow(600));
        let mut b = budget.reservation(None);
        assert!(!b.grow(500));
        assert_eq!(b.bytes(), 0);
        assert!(b.grow(400));
        assert_eq!(budget.used(), 1000);
        drop(a);
        assert_eq!(budget.used(), 400);
        assert!(b.grow(600));
        assert!(!b.grow(usize::MAX));
        drop(b);
        assert_eq!(budget.used(), 0);
        // One tenant's bodies take at most half.
        let share = Arc::new(AtomicUsize::new(0));
        let mut t1 = budget.reservation(Some(share.clone()));
        let mut t2 = budget.reservation(Some(share.clone()));
        assert!(t1.grow(300));
        assert!(!t2.grow(300));
        assert!(t2.grow(200));
        let mut other = budget.reservation(None);
        assert!(other.grow(500));
        drop((t1, t2));
        assert_eq!(share.load(Relaxed), 0);
        assert_eq!(budget.used(), 500);
    }
}
