//! Limits above the (project, model): a project's spend cap or spend-based rate limit, and its
//! billing account's monthly spending cap. Each stops every model of every key under it.
//!
//! A cap that only an owner's raise can lift early (the monthly caps) is probed: at most one
//! real request per scope and probe interval goes through, and its success lifts the cap. A
//! spend-based rate limit ends with its window and is not probed.

use super::Millis;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};

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
    /// When it ends on its own; in the past when there is none.
    until: AtomicU64,
    /// Its [`CapKind`] code.
    kind: AtomicU8,
    /// When the next probe may go (probed caps).
    probe_at: AtomicU64,
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
        if self.until.load(Relaxed) <= now {
            return None;
        }
        CapKind::from_code(self.kind.load(Relaxed))
    }

    /// Records a cap of `kind` until `until`; the first probe may go `probe_every` from now.
    /// Says whether the scope was serving before (the cap is news).
    pub(super) fn set(
        &self,
        kind: CapKind,
        until: Millis,
        now: Millis,
        probe_every: Millis,
    ) -> bool {
        let was_capped = self.kind(now).is_some();
        if self.until.load(Relaxed) < until {
            self.kind.store(kind.code(), Relaxed);
            self.until.store(until, Relaxed);
        }
        if kind.probed() {
            self.probe_at
                .fetch_max(now.saturating_add(probe_every), Relaxed);
        }
        !was_capped
    }

    /// When keys under this scope may next be tried: never before the cap ends, except for a
    /// probe when one is due.
    pub(super) fn open_at(&self) -> Millis {
        let until = self.until.load(Relaxed);
        match CapKind::from_code(self.kind.load(Relaxed)) {
            Some(kind) if kind.probed() => until.min(self.probe_at.load(Relaxed)),
            _ => until,
        }
    }

    /// Takes the probe that is due at `now`, so that no other request takes it; true when the
    /// scope holds no cap (nothing to take) or this caller took it.
    pub(super) fn take_probe(&self, now: Millis, probe_every: Millis) -> bool {
        let Some(kind) = self.kind(now) else {
            return true;
        };
        if !kind.probed() {
            return false;
        }
        let due = self.probe_at.load(Relaxed);
        due <= now
            && self
                .probe_at
                .compare_exchange(due, now.saturating_add(probe_every), Relaxed, Relaxed)
                .is_ok()
    }

    /// Ends the cap at once; says which one held.
    pub(super) fn lift(&self, now: Millis) -> Option<CapKind> {
        let kind = self.kind(now)?;
        self.until.store(0, Relaxed);
        Some(kind)
    }

    /// The cap at `now` for the admin API, named `name`.
    pub(super) fn report(&self, name: &str, now: Millis) -> Option<CapReport> {
        let kind = self.kind(now)?;
        Some(CapReport {
            kind,
            name: name.to_string(),
            until: self.until.load(Relaxed),
            next_probe: kind.probed().then(|| self.probe_at.load(Relaxed)),
        })
    }

    /// A copy, for a pool rebuilt with other keys.
    pub(super) fn copy_from(&self, other: &Held) {
        self.until.store(other.until.load(Relaxed), Relaxed);
        self.kind.store(other.kind.load(Relaxed), Relaxed);
        self.probe_at.store(other.probe_at.load(Relaxed), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Millis = 3_600_000;

    #[test]
    fn a_monthly_cap_lets_one_probe_through_per_interval() {
        let held = Held::default();
        assert!(held.set(CapKind::AccountSpendCap, 100 * HOUR, 0, HOUR));
        assert_eq!(held.open_at(), HOUR, "the first probe waits one interval");
        assert!(!held.take_probe(HOUR - 1, HOUR));
        assert!(held.take_probe(HOUR, HOUR), "the probe is due");
        assert!(!held.take_probe(HOUR, HOUR), "only one request takes it");
        assert_eq!(held.open_at(), 2 * HOUR);
        // The probe is refused again: the same cap, nothing new to say.
        assert!(!held.set(CapKind::AccountSpendCap, 100 * HOUR, HOUR, HOUR));
        assert_eq!(held.lift(HOUR + 5), Some(CapKind::AccountSpendCap));
        assert_eq!(held.kind(HOUR + 5), None);
        assert!(held.take_probe(HOUR + 5, HOUR), "no cap: nothing to take");
    }

    #[test]
    fn a_spend_rate_limit_is_not_probed_and_ends_with_its_window() {
        let held = Held::default();
        held.set(CapKind::SpendRate, 600_000, 0, 1000);
        assert_eq!(held.open_at(), 600_000);
        assert!(!held.take_probe(2000, 1000));
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
