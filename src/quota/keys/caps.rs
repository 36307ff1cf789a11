//! Limits above the (project, model): a project's spend cap or spend-based rate limit, and its
//! billing account's monthly spending cap. Each stops every model of every key under it.
//!
//! A cap that only an owner's raise can lift early (the monthly caps) is probed: at most one
//! real request per scope and probe interval goes through, and its success lifts the cap. A
//! spend-based rate limit ends with its window and is not probed.

use super::Millis;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Where a cap holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every project of one billing account.
    BillingAccount,
    /// One project.
    Project,
}

impl Scope {
    /// Label for the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::BillingAccount => "billing_account",
            Scope::Project => "project",
        }
    }
}

/// What a cap is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapKind {
    /// The billing account's monthly spending cap.
    AccountSpendCap,
    /// The project's monthly spend cap.
    ProjectSpendCap,
    /// A spend-based rate limit of the project.
    SpendRate,
}

impl CapKind {
    /// Label for the admin API, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CapKind::AccountSpendCap => "monthly_spending_cap",
            CapKind::ProjectSpendCap => "project_spend_cap",
            CapKind::SpendRate => "spend_rate_limit",
        }
    }

    /// Where it holds.
    pub fn scope(self) -> Scope {
        match self {
            CapKind::AccountSpendCap => Scope::BillingAccount,
            CapKind::ProjectSpendCap | CapKind::SpendRate => Scope::Project,
        }
    }

    /// Whether probes may find it lifted before it ends on its own.
    fn probed(self) -> bool {
        !matches!(self, CapKind::SpendRate)
    }

    fn code(self) -> u8 {
        match self {
            CapKind::AccountSpendCap => 1,
            CapKind::ProjectSpendCap => 2,
            CapKind::SpendRate => 3,
        }
    }

    fn from_code(code: u8) -> Option<CapKind> {
        match code {
            1 => Some(CapKind::AccountSpendCap),
            2 => Some(CapKind::ProjectSpendCap),
            3 => Some(CapKind::SpendRate),
            _ => None,
        }
    }
}

/// One scope's cap, if it holds one.
#[derive(Debug, Default)]
pub(super) struct Held {
    /// The cap's [`CapKind`] code in the top 4 bits and when it ends on its own in the other
    /// 60, in one word so that no reader sees the kind of one cap with the end of another.
    /// Zero (or an end in the past): no cap.
    cap: AtomicU64,
    /// When the cap was last set (a refusal, or a probe refused again): a success on a request
    /// sent before it says nothing about the cap.
    set_at: AtomicU64,
    /// When the next probe may go (probed caps).
    probe_at: AtomicU64,
}

/// The bits of [`Held::cap`] that hold the end.
const UNTIL_BITS: u32 = 60;
const UNTIL_MASK: u64 = (1 << UNTIL_BITS) - 1;

fn pack(kind: CapKind, until: Millis) -> u64 {
    (u64::from(kind.code()) << UNTIL_BITS) | until.min(UNTIL_MASK)
}

fn unpack(word: u64) -> (Option<CapKind>, Millis) {
    (
        CapKind::from_code((word >> UNTIL_BITS) as u8),
        word & UNTIL_MASK,
    )
}

/// A cap as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapReport {
    /// What it is (and so where it holds).
    pub kind: CapKind,
    /// The billing account's or the project's name.
    pub name: String,
    /// When it ends on its own.
    pub until: Millis,
    /// When the next probe may go, for probed caps.
    pub next_probe: Option<Millis>,
}

impl Held {
    /// Its cap at `now`, if one holds.
    pub(super) fn kind(&self, now: Millis) -> Option<CapKind> {
        match unpack(self.cap.load(Relaxed)) {
            (kind, until) if until > now => kind,
            _ => None,
        }
    }

    /// Records a cap of `kind` until `until` (the later end wins, with its kind); the first
    /// probe may go `probe_every` from now. Says whether the scope was serving before (the cap
    /// is news).
    pub(super) fn set(
        &self,
        kind: CapKind,
        until: Millis,
        now: Millis,
        probe_every: Millis,
    ) -> bool {
        let was_capped = self.kind(now).is_some();
        let _ = self.cap.fetch_update(Relaxed, Relaxed, |word| {
            let (_, current) = unpack(word);
            (current < until).then(|| pack(kind, until))
        });
        self.set_at.fetch_max(now, Relaxed);
        if kind.probed() {
            self.probe_at
                .fetch_max(now.saturating_add(probe_every), Relaxed);
        }
        !was_capped
    }

    /// When keys under this scope may next be tried: never before the cap ends, except for a
    /// probe when one is due.
    pub(super) fn open_at(&self) -> Millis {
        match unpack(self.cap.load(Relaxed)) {
            (Some(kind), until) if kind.probed() => until.min(self.probe_at.load(Relaxed)),
            (_, until) => until,
        }
    }

    /// Takes the probe that is due at `now`, so that no other request takes it: `Some(due)`
    /// with the time it was due (to give it back with [`Held::give_back`]) when this caller
    /// took it, `Some(0)` when the scope holds no cap (nothing to take), `None` when the cap
    /// holds and the probe is not this caller's.
    pub(super) fn take_probe(&self, now: Millis, probe_every: Millis) -> Option<Millis> {
        let Some(kind) = self.kind(now) else {
            return Some(0);
        };
        if !kind.probed() {
            return None;
        }
        let due = self.probe_at.load(Relaxed);
        (due <= now
            && self
                .probe_at
                .compare_exchange(due, now.saturating_add(probe_every), Relaxed, Relaxed)
                .is_ok())
        .then_some(due)
    }

    /// Gives back a probe taken with [`Held::take_probe`] and not used.
    pub(super) fn give_back(&self, due: Millis) {
        if due > 0 {
            self.probe_at.fetch_min(due, Relaxed);
        }
    }

    /// A request sent at `sent` was served: a probed cap set before it was sent ends (that
    /// request was its probe). A spend-based rate limit runs its window whatever succeeds.
    /// Says which cap ended.
    pub(super) fn served(&self, sent: Millis, now: Millis) -> Option<CapKind> {
        let word = self.cap.load(Relaxed);
        let kind = self.kind(now).filter(|k| k.probed())?;
        if sent < self.set_at.load(Relaxed) {
            return None;
        }
        self.cap
            .compare_exchange(word, 0, Relaxed, Relaxed)
            .is_ok()
            .then_some(kind)
    }

    /// An operator ends the cap at once; says which one held.
    pub(super) fn lift(&self, now: Millis) -> Option<CapKind> {
        let kind = self.kind(now)?;
        self.cap.store(0, Relaxed);
        Some(kind)
    }

    /// The cap at `now` for the admin API, named `name`.
    pub(super) fn report(&self, name: &str, now: Millis) -> Option<CapReport> {
        let kind = self.kind(now)?;
        Some(CapReport {
            kind,
            name: name.to_string(),
            until: unpack(self.cap.load(Relaxed)).1,
            next_probe: kind.probed().then(|| self.probe_at.load(Relaxed)),
        })
    }

    /// A copy, for a pool rebuilt with other keys.
    pub(super) fn copy_from(&self, other: &Held) {
        self.cap.store(other.cap.load(Relaxed), Relaxed);
        self.set_at.store(other.set_at.load(Relaxed), Relaxed);
        self.probe_at.store(other.probe_at.load(Relaxed), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_later_end_wins_with_its_own_kind() {
        let held = Held::default();
        held.set(CapKind::ProjectSpendCap, 100 * HOUR, 0, HOUR);
        held.set(CapKind::SpendRate, 600_000, 0, HOUR);
        assert_eq!(held.kind(1000), Some(CapKind::ProjectSpendCap));
        assert_eq!(held.report("p", 1000).map(|r| r.until), Some(100 * HOUR));
    }

    use super::*;

    const HOUR: Millis = 3_600_000;

    #[test]
    fn a_monthly_cap_lets_one_probe_through_per_interval() {
        let held = Held::default();
        assert!(held.set(CapKind::AccountSpendCap, 100 * HOUR, 0, HOUR));
        assert_eq!(held.open_at(), HOUR, "the first probe waits one interval");
        assert_eq!(held.take_probe(HOUR - 1, HOUR), None);
        assert_eq!(held.take_probe(HOUR, HOUR), Some(HOUR), "the probe is due");
        assert_eq!(
            held.take_probe(HOUR, HOUR),
            None,
            "only one request takes it"
        );
        assert_eq!(held.open_at(), 2 * HOUR);
        // Given back unused, it is due again.
        held.give_back(HOUR);
        assert_eq!(held.take_probe(HOUR, HOUR), Some(HOUR));
        // The probe is refused again: the same cap, nothing new to say.
        assert!(!held.set(CapKind::AccountSpendCap, 100 * HOUR, HOUR + 10, HOUR));
        // A success of a request sent before that refusal says nothing; the next probe's does.
        assert_eq!(held.served(HOUR + 5, HOUR + 20), None);
        assert_eq!(
            held.served(HOUR + 10, HOUR + 20),
            Some(CapKind::AccountSpendCap)
        );
        assert_eq!(held.kind(HOUR + 20), None);
        assert_eq!(
            held.take_probe(HOUR + 20, HOUR),
            Some(0),
            "no cap: nothing to take"
        );
    }

    #[test]
    fn a_spend_rate_limit_is_not_probed_and_ends_with_its_window() {
        let held = Held::default();
        held.set(CapKind::SpendRate, 600_000, 0, 1000);
        assert_eq!(held.open_at(), 600_000);
        assert_eq!(held.take_probe(2000, 1000), None);
        assert_eq!(
            held.served(5000, 5000),
            None,
            "a success does not end its window"
        );
        assert_eq!(held.kind(600_000), None, "over at its end");
    }

    #[test]
    fn the_report_names_the_scope() {
        let held = Held::default();
        held.set(CapKind::ProjectSpendCap, 10 * HOUR, 0, HOUR);
        let report = held.report("proj-a", 5).expect("capped");
        assert_eq!(report.kind.scope(), Scope::Project);
        assert_eq!(report.until, 10 * HOUR);
        assert_eq!(report.next_probe, Some(HOUR));
        assert_eq!(held.report("proj-a", 10 * HOUR), None);
    }
}
