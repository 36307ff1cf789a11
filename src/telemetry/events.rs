//! The most recent quota events and alerts, kept for the dashboard: bounded lists in memory,
//! newest first, that a restart empties.

use std::collections::VecDeque;
use std::sync::Mutex;

/// How many quota events are kept.
pub const QUOTA_EVENTS: usize = 200;

/// The last `cap` things recorded, newest first. A push holds the lock for a few moves.
#[derive(Debug)]
pub struct Recent<T> {
    list: Mutex<VecDeque<T>>,
    cap: usize,
}

impl<T: Clone> Recent<T> {
    /// An empty list keeping at most `cap` entries.
    pub fn new(cap: usize) -> Recent<T> {
        Recent {
            list: Mutex::new(VecDeque::with_capacity(cap.min(64))),
            cap: cap.max(1),
        }
    }

    /// Adds `item`, forgetting the oldest when full.
    pub fn push(&self, item: T) {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() >= self.cap {
            list.pop_back();
        }
        list.push_front(item);
    }

    /// Everything kept, newest first.
    pub fn list(&self) -> Vec<T> {
        let list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().cloned().collect()
    }
}

/// One refusal from Google that changed a key's health: what the dashboard's "recent quota
/// events" shows. No key: the key is named by its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaEvent {
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// The pool.
    pub pool: String,
    /// The key's fingerprint.
    pub key: String,
    /// The key's project.
    pub project: String,
    /// The model the client asked for (as it asked, aliases resolved).
    pub model: String,
    /// The classified reason (`quota_short`, `quota_daily`, `key_invalid`...).
    pub reason: &'static str,
    /// What keygate did: `cooling`, `capped`, `disabled`, `method_blocked`.
    pub action: &'static str,
    /// Until when, for a cooldown or a cap.
    pub until: Option<u64>,
    /// Google's message, with every pool key replaced by its fingerprint and clipped.
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_within_its_bound() {
        let r = Recent::new(3);
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.list(), [4, 3, 2]);
    }
}
