//! Cooldowns that grow when Google's delay lies: what a (project, model) remembers of its
//! short-window quota refusals.
//!
//! A refusal soon after the last short-window cooldown ended ("soon": within that cooldown's
//! length, or a minute, whichever is longer, and on the same quota day) shows that Google's
//! delay was wrong: the new cooldown is twice the last one, never past the next midnight in Los
//! Angeles (unless Google's own delay is longer). A success of a request sent after the last
//! refusal starts it over, and so does a new quota day.

use super::Millis;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

/// The shortest "soon".
const SOON: Millis = 60_000;

/// One (project, model)'s memory of its short-window refusals.
#[derive(Debug, Default)]
pub(super) struct QuotaMemory {
    /// The length of the last short-window cooldown; 0: none since the last success.
    len: AtomicU64,
    /// When it ends.
    until: AtomicU64,
    /// The end of its quota day (the next midnight in Los Angeles when it began).
    day_end: AtomicU64,
    /// When the last refusal came.
    refused_at: AtomicU64,
    /// How many times in a row it was doubled.
    escalations: AtomicU8,
}

impl QuotaMemory {
    /// A refusal at `now`, Google saying the quota is back at `until`; `ceiling` is the next
    /// midnight in Los Angeles. Returns the cooldown's end, and the number of doublings when
    /// this refusal doubled it (else 0).
    pub(super) fn refused(&self, until: Millis, ceiling: Millis, now: Millis) -> (Millis, u8) {
        let stated = until.saturating_sub(now);
        self.refused_at.fetch_max(now, Relaxed);
        let last_end = self.until.load(Relaxed);
        if last_end > now {
            // Still cooling: the answer to a request sent before the cooldown began.
            self.len.fetch_max(stated, Relaxed);
            self.until.fetch_max(until, Relaxed);
            return (until, 0);
        }
        let last_len = self.len.load(Relaxed);
        let same_day = now < self.day_end.load(Relaxed);
        let soon = last_len > 0 && same_day && now - last_end <= last_len.max(SOON);
        let (len, level) = if soon {
            let doubled = last_len
                .saturating_mul(2)
                .min(ceiling.saturating_sub(now))
                .max(stated);
            (doubled, self.escalations.load(Relaxed).saturating_add(1))
        } else {
            (stated, 0)
        };
        let end = now.saturating_add(len);
        self.len.store(len, Relaxed);
        self.until.store(end, Relaxed);
        self.day_end.store(ceiling, Relaxed);
        self.escalations.store(level, Relaxed);
        (end, level)
    }

    /// A request sent at `sent` was served: the escalation starts over, unless a refusal came
    /// after it was sent (its success says nothing about the quota since). Says whether
    /// anything was forgotten.
    pub(super) fn served(&self, sent: Millis) -> bool {
        if self.len.load(Relaxed) == 0 || sent < self.refused_at.load(Relaxed) {
            return false;
        }
        self.forget();
        true
    }

    /// Another instance's refusal, told once its cooldown went through [`QuotaMemory::refused`]
    /// (as a ceiling of its own): the higher level wins, and the quota day is the real one
    /// (ending at `day_end`), so a refusal here soon after the cooldown ends doubles it as the
    /// other instance would have.
    pub(super) fn told(&self, level: u8, day_end: Millis) {
        self.escalations.fetch_max(level, Relaxed);
        self.day_end.fetch_max(day_end, Relaxed);
    }

    /// Whether a success could start anything over.
    pub(super) fn remembers(&self) -> bool {
        self.len.load(Relaxed) != 0
    }

    /// Forgets everything (an operator cleared the cooldown).
    pub(super) fn forget(&self) {
        self.len.store(0, Relaxed);
        self.until.store(0, Relaxed);
        self.escalations.store(0, Relaxed);
    }

    /// How many times in a row the cooldown was doubled.
    pub(super) fn escalations(&self) -> u8 {
        self.escalations.load(Relaxed)
    }

    /// A copy, for a pool rebuilt with other keys.
    pub(super) fn copy_from(&self, other: &QuotaMemory) {
        for (mine, theirs) in [
            (&self.len, &other.len),
            (&self.until, &other.until),
            (&self.day_end, &other.day_end),
            (&self.refused_at, &other.refused_at),
        ] {
            mine.store(theirs.load(Relaxed), Relaxed);
        }
        self.escalations.store(other.escalations(), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 1000;
    const DAY: Millis = 86_400_000;

    #[test]
    fn a_repeat_on_another_quota_day_starts_over() {
        let m = QuotaMemory::default();
        // An escalated cooldown near the end of one day...
        m.refused(10 * S, DAY, 0);
        assert_eq!(m.refused(11 * S + 10 * S, DAY, 11 * S).1, 1);
        // ...says nothing once midnight has passed.
        assert_eq!(
            m.refused(DAY + 70 * S, 2 * DAY, DAY + 10 * S),
            (DAY + 70 * S, 0)
        );
    }

    #[test]
    fn soon_means_the_last_length_or_a_minute() {
        let m = QuotaMemory::default();
        m.refused(10 * S, DAY, 0);
        assert_eq!(m.refused(80 * S, DAY, 70 * S).1, 1, "60 s after the end");
        // That one lasted 20 s and ended at 90 s: 61 s later is not soon.
        assert_eq!(m.refused(161 * S, DAY, 151 * S).1, 0);
    }

    #[test]
    fn a_level_told_merges_upward_and_the_next_refusal_doubles_from_it() {
        let (a, b) = (QuotaMemory::default(), QuotaMemory::default());
        // A: 10 s, then refused again soon after: 20 s, level 1.
        a.refused(10 * S, DAY, 0);
        assert_eq!(a.refused(31 * S, DAY, 11 * S), (31 * S, 1));
        // B learns A's cooldown as it stands (its end as the ceiling), and the level.
        let learnt = |m: &QuotaMemory, until, level, now| {
            m.refused(until, until, now);
            m.told(level, DAY);
        };
        learnt(&b, 31 * S, 1, 11 * S);
        assert_eq!(b.escalations(), 1);
        // A lower level told later (a stale message) lowers nothing.
        learnt(&b, 31 * S, 0, 12 * S);
        assert_eq!(b.escalations(), 1);
        // Refused on B soon after the end: doubled from A's 20 s, level 2.
        assert_eq!(b.refused(41 * S, DAY, 32 * S), (72 * S, 2));
        // A success sent after the last refusal starts it over.
        assert!(b.served(80 * S));
        assert_eq!(b.escalations(), 0);
    }

    #[test]
    fn a_success_sent_before_the_last_refusal_forgets_nothing() {
        let m = QuotaMemory::default();
        m.refused(10 * S, DAY, 5 * S);
        assert!(!m.served(4 * S), "a straggler sent before the refusal");
        assert!(m.remembers());
        assert!(m.served(20 * S));
        assert!(!m.remembers());
        assert_eq!(m.refused(31 * S, DAY, 21 * S).1, 0);
    }
}
