//! The health table as the admin API shows it: each key with its state and cooldowns, and
//! the caps on projects and billing accounts.

use super::{CapKind, CapReport, Disabled, KeyId, KeyPool, Millis, Usage};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// One key as the admin API shows it.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// The key's fingerprint.
    pub fingerprint: String,
    /// Its project.
    pub project: String,
    /// Its project's billing account, if the configuration names one.
    pub billing_account: Option<String>,
    /// Why it is out for every model, if it is.
    pub disabled: Option<Disabled>,
    /// The cap stopping its project or billing account, if one does.
    pub capped: Option<CapKind>,
    /// Models its project is cooling for.
    pub cooldowns: Vec<Cooldown>,
    /// Methods Google refused for this key.
    pub blocked_methods: Vec<String>,
    /// What it served.
    pub usage: Arc<Usage>,
    /// The operator's note from the configuration.
    pub note: Option<String>,
}

/// A (project, model) cooldown as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cooldown {
    /// The model.
    pub model: String,
    /// When it ends.
    pub until: Millis,
    /// What kind of refusal started it.
    pub why: CoolingKind,
    /// How many times it was doubled because the refusal came back soon after it ended.
    pub escalations: u8,
}

/// What kind of refusal a cooldown follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoolingKind {
    /// A quota of a short window (stated or not).
    Quota,
    /// A per-day quota.
    Day,
    /// The model is not in the project's tier (`limit: 0`).
    Unavailable,
}

impl CoolingKind {
    /// Label for the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CoolingKind::Quota => "quota",
            CoolingKind::Day => "quota_day",
            CoolingKind::Unavailable => "unavailable",
        }
    }

    pub(super) fn code(self) -> u8 {
        match self {
            CoolingKind::Quota => 0,
            CoolingKind::Day => 1,
            CoolingKind::Unavailable => 2,
        }
    }

    pub(super) fn from_code(code: u8) -> CoolingKind {
        match code {
            1 => CoolingKind::Day,
            2 => CoolingKind::Unavailable,
            _ => CoolingKind::Quota,
        }
    }
}

impl KeyPool {
    /// Every key with its state, for the admin API.
    pub fn report(&self, now: Millis) -> Vec<KeyReport> {
        let models = self.models.load();
        let blocked = self.blocked.load();
        self.keys
            .iter()
            .enumerate()
            .map(|(k, key)| {
                let project = key.project as usize;
                let mut cooldowns: Vec<Cooldown> = models
                    .iter()
                    .map(|(m, h)| Cooldown {
                        model: m.to_string(),
                        until: h.cool_until[project].load(Relaxed),
                        why: CoolingKind::from_code(h.why[project].load(Relaxed)),
                        escalations: h.quota[project].escalations(),
                    })
                    .filter(|c| c.until > now)
                    .collect();
                cooldowns.sort_by(|a, b| a.model.cmp(&b.model));
                KeyReport {
                    fingerprint: key.fingerprint.clone(),
                    project: self.projects[project].clone(),
                    billing_account: self.accounts[self.account_of[project] as usize].clone(),
                    disabled: self.disabled(KeyId(k as u32)),
                    capped: self.cap_of(key.project, now),
                    cooldowns,
                    blocked_methods: blocked
                        .iter()
                        .filter(|(kk, _)| *kk as usize == k)
                        .map(|(_, m)| m.to_string())
                        .collect(),
                    usage: key.usage.clone(),
                    note: key.note.clone(),
                }
            })
            .collect()
    }

    /// Every cap holding at `now`, for the admin API.
    pub fn caps(&self, now: Millis) -> Vec<CapReport> {
        let accounts = self
            .account_caps
            .iter()
            .enumerate()
            .filter_map(|(a, held)| {
                let name = match &self.accounts[a] {
                    Some(name) => name.as_str(),
                    // A project's own account is named by the project.
                    None => {
                        let p = self.account_of.iter().position(|&x| x as usize == a)?;
                        self.projects[p].as_str()
                    }
                };
                held.report(name, now)
            });
        let projects = (self.project_caps.iter().zip(&self.projects))
            .filter_map(|(held, name)| held.report(name, now));
        accounts.chain(projects).collect()
    }
}
