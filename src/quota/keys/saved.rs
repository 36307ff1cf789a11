//! The health table as the state file keeps it: fingerprints, project names and reason labels,
//! never a key. Loading goes through the door like any other change.

use super::health::reason_from_code;
use super::{CoolingKind, Disabled, KeyId, KeyPool, Millis, Transition, NEVER};
use crate::quota::classify::{Cooling, Penalty};
use std::sync::atomic::Ordering::Relaxed;

/// A disable reason in the state file: its label.
mod saved_reason {
    use super::Disabled;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(reason: &Option<Disabled>, s: S) -> Result<S::Ok, S::Error> {
        match reason {
            Some(reason) => s.serialize_some(reason.as_str()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Disabled>, D::Error> {
        let label = Option::<String>::deserialize(d)?;
        Ok(label.and_then(|label| {
            let reason = Disabled::from_label(&label);
            if reason.is_none() {
                log::warn!("state file: unknown disable reason {label:?}; the key loads enabled");
            }
            reason
        }))
    }
}

/// A pool's health table as saved in the state file: fingerprints and project names only.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolHealth {
    /// Keys disabled or with blocked methods.
    pub keys: Vec<KeyHealth>,
    /// Projects out of credit or cooling.
    pub projects: Vec<ProjectHealth>,
    /// Spend caps holding on projects and billing accounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caps: Vec<SavedCap>,
}

/// A spend cap as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedCap {
    /// `billing_account` or `project`.
    pub scope: String,
    /// The billing account's name (a project's own account: the project's), or the project's.
    pub name: String,
    /// Its label (`monthly_spending_cap`, `project_spend_cap`, `spend_rate_limit`).
    pub kind: String,
    /// When it ends on its own.
    pub until: Millis,
}

/// One key's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyHealth {
    /// The key's fingerprint.
    pub key: String,
    /// Why it is disabled, if it is; saved as its label (`key_invalid`,
    /// `disabled_by_operator`...). A label this version does not know loads as not disabled.
    #[serde(default, with = "saved_reason")]
    pub disabled: Option<Disabled>,
    /// Methods Google refused for it.
    #[serde(default)]
    pub blocked_methods: Vec<String>,
}

/// One project's saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProjectHealth {
    /// The project's name.
    pub project: String,
    /// Out of prepaid credit (402).
    #[serde(default)]
    pub billing_disabled: bool,
    /// (model, deadline) pairs.
    #[serde(default)]
    pub cooldowns: Vec<(String, Millis)>,
    /// The models among `cooldowns` that are not in the project's tier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unavailable: Vec<String>,
    /// The models among `cooldowns` out of their per-day quota.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota_day: Vec<String>,
}

impl KeyPool {
    /// The health table in a form that names keys by fingerprint and projects by name, for the
    /// state file. Expired cooldowns are left out.
    pub fn export(&self, now: Millis) -> PoolHealth {
        let models = self.models.load();
        let projects = self
            .projects
            .iter()
            .enumerate()
            .map(|(p, name)| {
                let mut cooldowns: Vec<(String, Millis)> = models
                    .iter()
                    .map(|(m, h)| (m.to_string(), h.cool_until[p].load(Relaxed)))
                    .filter(|(_, until)| *until > now)
                    .collect();
                cooldowns.sort();
                let of_kind = |kind: CoolingKind| {
                    let mut names: Vec<String> = models
                        .iter()
                        .filter(|(_, h)| {
                            h.cool_until[p].load(Relaxed) > now
                                && CoolingKind::from_code(h.why[p].load(Relaxed)) == kind
                        })
                        .map(|(m, _)| m.to_string())
                        .collect();
                    names.sort();
                    names
                };
                ProjectHealth {
                    project: name.clone(),
                    billing_disabled: self.project_disabled_until[p].load(Relaxed) == NEVER,
                    cooldowns,
                    unavailable: of_kind(CoolingKind::Unavailable),
                    quota_day: of_kind(CoolingKind::Day),
                }
            })
            .filter(|p| p.billing_disabled || !p.cooldowns.is_empty())
            .collect();
        let blocked = self.blocked.load();
        let keys = self
            .keys
            .iter()
            .enumerate()
            .filter_map(|(k, key)| {
                let disabled = (self.key_disabled_until[k].load(Relaxed) == NEVER)
                    .then(|| reason_from_code(self.key_reason[k].load(Relaxed)))
                    .flatten();
                let methods: Vec<String> = blocked
                    .iter()
                    .filter(|(kk, _)| *kk as usize == k)
                    .map(|(_, m)| m.to_string())
                    .collect();
                (disabled.is_some() || !methods.is_empty()).then(|| KeyHealth {
                    key: key.fingerprint.clone(),
                    disabled,
                    blocked_methods: methods,
                })
            })
            .collect();
        let caps = self
            .caps(now)
            .into_iter()
            .map(|c| SavedCap {
                scope: c.kind.scope().as_str().to_string(),
                name: c.name,
                kind: c.kind.as_str().to_string(),
                until: c.until,
            })
            .collect();
        PoolHealth {
            keys,
            projects,
            caps,
        }
    }

    /// Applies a saved health table: entries for keys and projects this pool no longer has, and
    /// cooldowns already over, are ignored; a cooldown past `ceiling` (the longest keygate sets
    /// itself; an older version took Google's word for days) is cut to it. Returns how many
    /// entries were applied.
    pub fn import(&self, saved: &PoolHealth, now: Millis, ceiling: Millis) -> usize {
        let mut applied = 0;
        let apply = |key: KeyId, penalty: &Penalty, model: &str, method: &str| {
            let transition = Transition::Penalise {
                penalty,
                model,
                method,
            };
            self.change(key, transition, now);
            1
        };
        for k in &saved.keys {
            let Some(id) = self.find(&k.key) else {
                continue;
            };
            match k.disabled {
                Some(Disabled::Operator) => {
                    self.change(id, Transition::Disable, now);
                    applied += 1;
                }
                Some(Disabled::Dead(reason)) => {
                    applied += apply(id, &Penalty::DisableKey(reason), "", "")
                }
                // Billing is a project's, saved under `projects`: a key entry naming it is not
                // one keygate wrote, and does not take a whole project out.
                Some(Disabled::Billing) | None => {}
            }
            for method in &k.blocked_methods {
                applied += apply(id, &Penalty::BlockMethod, "", method);
            }
        }
        for p in &saved.projects {
            // The door takes a key: a project's state is set through its first key.
            let Some(key) = self.project_index(&p.project).and_then(|project| {
                let first = self.keys.iter().position(|k| k.project == project)?;
                Some(KeyId(first as u32))
            }) else {
                continue;
            };
            if p.billing_disabled {
                applied += apply(key, &Penalty::DisableProject, "", "");
            }
            for (model, until) in &p.cooldowns {
                let until = (*until).min(ceiling);
                let Some(until) = at(until).filter(|_| until > now) else {
                    continue;
                };
                let why = if p.unavailable.contains(model) {
                    Cooling::Tier
                } else if p.quota_day.contains(model) {
                    Cooling::Day
                } else {
                    Cooling::Quota { ceiling: until }
                };
                applied += apply(key, &Penalty::CoolProjectModel { until, why }, model, "");
            }
        }
        for cap in &saved.caps {
            // A month at most: no cap of Google's lasts longer.
            let until = cap.until.min(now.saturating_add(MAX_CAP));
            let (Some(key), Some(until)) = (self.key_under(cap), at(until).filter(|_| until > now))
            else {
                continue;
            };
            let Some(penalty) = super::news::cap_penalty(&cap.scope, &cap.kind, until) else {
                continue;
            };
            applied += apply(key, &penalty, "", "");
        }
        applied
    }

    /// A key under the scope `cap` names: of the project, or of a project of the account.
    fn key_under(&self, cap: &SavedCap) -> Option<KeyId> {
        self.key_in_scope(&cap.scope, &cap.name)
    }

    /// The first key of the project named `name` (`scope` "project"), or of a project of the
    /// billing account named `name` (`scope` "billing_account"; a project's own account goes by
    /// the project's name).
    pub(super) fn key_in_scope(&self, scope: &str, name: &str) -> Option<KeyId> {
        let project = match scope {
            "project" => self.project_index(name)?,
            _ => match self
                .accounts
                .iter()
                .position(|a| a.as_deref() == Some(name))
            {
                Some(a) => self.account_of.iter().position(|&x| x as usize == a)? as u32,
                None => self
                    .project_index(name)
                    .filter(|&p| self.billing_account_of(p).is_none())?,
            },
        };
        self.first_key_of(project)
    }

    /// The first key of `project`: the door takes a key, and a project's state is set through it.
    pub(super) fn first_key_of(&self, project: u32) -> Option<KeyId> {
        let first = self.keys.iter().position(|k| k.project == project)?;
        Some(KeyId(first as u32))
    }
}

/// The longest a restored spend cap may last.
const MAX_CAP: Millis = 32 * 24 * 3_600_000;

/// `ms` as a time, if it is one.
fn at(ms: Millis) -> Option<chrono::DateTime<chrono::Utc>> {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::classify::DeadReason;
    use crate::quota::keys::tests::{cool, cooldowns, penalise, pool};

    #[test]
    fn health_survives_export_and_import_into_a_fresh_pool() {
        let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3")]);
        cool(&p, 0, "m", 90_000);
        cool(&p, 1, "m", 500); // over by the time of the import
        penalise(
            &p,
            KeyId(1),
            "m",
            "generateContent",
            &Penalty::DisableKey(DeadReason::Invalid),
        );
        penalise(
            &p,
            KeyId(2),
            "m",
            "generateContent",
            &Penalty::DisableProject,
        );
        penalise(&p, KeyId(2), "m", "embedContent", &Penalty::BlockMethod);
        p.change(KeyId(0), Transition::Disable, 0);
        let saved = p.export(1000);
        let text = serde_json::to_string(&saved).unwrap();
        assert!(!text.contains("\"a\"") && text.contains("key#"), "{text}");
        let fresh = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3")]);
        let back: PoolHealth = serde_json::from_str(&text).unwrap();
        assert!(fresh.import(&back, 1000, NEVER) >= 5);
        assert_eq!(fresh.disabled(KeyId(0)), Some(Disabled::Operator));
        assert_eq!(
            fresh.disabled(KeyId(1)),
            Some(Disabled::Dead(DeadReason::Invalid))
        );
        assert_eq!(fresh.disabled(KeyId(2)), Some(Disabled::Billing));
        fresh.change(KeyId(0), Transition::Enable, 0);
        assert_eq!(cooldowns(&fresh, 0), vec![("m".to_string(), 90_000)]);
        assert_eq!(
            fresh.report(1000)[2].blocked_methods,
            vec!["embedContent".to_string()]
        );
        // A pool without those keys ignores the entries.
        let other = pool(&[("z", "p9")]);
        assert_eq!(other.import(&back, 1000, NEVER), 0);
        // A cooldown past the ceiling (an older version's week-long one) is cut to it.
        let clamped = pool(&[("a", "p1")]);
        clamped.import(&back, 1000, 50_000);
        assert_eq!(cooldowns(&clamped, 0), vec![("m".to_string(), 50_000)]);
    }

    #[test]
    fn a_state_file_reason_this_version_does_not_know_loads_as_enabled() {
        let saved: PoolHealth = serde_json::from_str(
            r#"{"keys":[{"key":"key#00","disabled":"key_gone_to_the_moon"},
                        {"key":"key#01","disabled":"key_suspended"}],"projects":[]}"#,
        )
        .unwrap();
        assert_eq!(saved.keys[0].disabled, None);
        assert_eq!(
            saved.keys[1].disabled,
            Some(Disabled::Dead(DeadReason::Suspended))
        );
        let text = serde_json::to_string(&saved.keys[1]).unwrap();
        assert!(text.contains(r#""disabled":"key_suspended""#), "{text}");
    }

    #[test]
    fn billing_saved_under_a_key_does_not_take_its_project_out() {
        let p = pool(&[("a", "p1"), ("b", "p1")]);
        let fp = p.key(KeyId(0)).fingerprint.clone();
        let saved: PoolHealth = serde_json::from_str(&format!(
            r#"{{"keys":[{{"key":"{fp}","disabled":"project_billing"}}],"projects":[]}}"#
        ))
        .unwrap();
        assert_eq!(p.import(&saved, 1000, NEVER), 0);
        assert_eq!(p.disabled(KeyId(0)), None);
        assert_eq!(p.disabled(KeyId(1)), None);
    }
}

#[cfg(test)]
mod limits {
    use super::*;
    use crate::quota::classify::Cap;
    use crate::quota::keys::tests::pool_with_accounts;
    use crate::quota::keys::CapKind;
    use chrono::TimeZone;

    #[test]
    fn caps_and_tier_cooldowns_survive_a_restart() {
        let keys = [
            ("a", "p1", Some("acct-1")),
            ("b", "p2", Some("acct-1")),
            ("c", "p3", None),
            ("d", "p4", None),
        ];
        let p = pool_with_accounts(&keys);
        let at = |ms: i64| chrono::Utc.timestamp_millis_opt(ms).unwrap();
        let refuse = |key: u32, penalty: &Penalty, model: &str| {
            p.change(KeyId(key), Transition::penalise(penalty, model, "m"), 0);
        };
        refuse(
            0,
            &Penalty::CapBillingAccount {
                until: at(9_000_000),
            },
            "",
        );
        let spend_rate = Penalty::CapProject {
            until: at(600_000),
            why: Cap::SpendRate,
        };
        refuse(2, &spend_rate, "");
        refuse(
            3,
            &Penalty::CapBillingAccount {
                until: at(9_000_000),
            },
            "",
        );
        let tier = Penalty::CoolProjectModel {
            until: at(5_000_000),
            why: Cooling::Tier,
        };
        refuse(2, &tier, "pro");
        let day = Penalty::CoolProjectModel {
            until: at(5_000_000),
            why: Cooling::Day,
        };
        refuse(3, &day, "flash");
        let text = serde_json::to_string(&p.export(1000)).unwrap();
        let back: PoolHealth = serde_json::from_str(&text).unwrap();
        let fresh = pool_with_accounts(&keys);
        fresh.import(&back, 1000, NEVER);
        assert_eq!(fresh.cap_of(0, 1000), Some(CapKind::AccountSpendCap));
        assert_eq!(fresh.cap_of(1, 1000), Some(CapKind::AccountSpendCap));
        assert_eq!(fresh.cap_of(2, 1000), Some(CapKind::SpendRate));
        assert_eq!(fresh.cap_of(3, 1000), Some(CapKind::AccountSpendCap));
        assert_eq!(fresh.caps(1000).len(), 3);
        let pro = &fresh.report(1000)[2].cooldowns[0];
        assert_eq!(
            (pro.model.as_str(), pro.why),
            ("pro", CoolingKind::Unavailable)
        );
        let flash = &fresh.report(1000)[3].cooldowns[0];
        assert_eq!(
            (flash.model.as_str(), flash.why),
            ("flash", CoolingKind::Day)
        );
        // A state file of an older version (no caps, no unavailable list) still loads.
        let old: PoolHealth = serde_json::from_str(
            r#"{"keys":[],"projects":[{"project":"p1","cooldowns":[["m",90000]]}]}"#,
        )
        .unwrap();
        assert!(old.caps.is_empty() && old.projects[0].unavailable.is_empty());
    }
}
