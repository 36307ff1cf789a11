//! A change of the health table as other instances learn it. Keys go by fingerprint, projects
//! and billing accounts by name, and deadlines travel as durations, so that no two instances
//! need to agree on the time.

use super::{CoolingKind, Disabled, KeyId, KeyPool, Millis, Transition};
use crate::quota::classify::{Cap, Cooling, Penalty};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::Relaxed;

/// One change, as instances tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum News {
    /// (project, model) cools for `left_ms` more.
    Cooled {
        /// The project.
        project: String,
        /// The model.
        model: String,
        /// `quota`, `quota_day` or `unavailable`.
        why: String,
        /// How long it still cools.
        left_ms: Millis,
        /// How many times in a row the cooldown was doubled (`quota` only): an instance that
        /// learns it doubles the next one from there, as the one that told it would.
        #[serde(default, skip_serializing_if = "is_zero")]
        escalations: u8,
    },
    /// A spend cap holds on a project or billing account for `left_ms` more.
    Capped {
        /// `project` or `billing_account`.
        scope: String,
        /// The project's or the account's name (a project's own account: the project's).
        name: String,
        /// `monthly_spending_cap`, `project_spend_cap` or `spend_rate_limit`.
        kind: String,
        /// How long it still holds on its own.
        left_ms: Millis,
    },
    /// A key is out until someone acts.
    KeyDisabled {
        /// Its fingerprint.
        key: String,
        /// The reason's label (`key_invalid`, `disabled_by_operator`...).
        reason: String,
    },
    /// A project ran out of prepaid credit (402).
    ProjectDisabled {
        /// The project.
        project: String,
    },
    /// A key may not call a method.
    MethodBlocked {
        /// Its fingerprint.
        key: String,
        /// The method.
        method: String,
    },
    /// An operator put a key back (and its project's billing, and its blocked methods).
    Enabled {
        /// Its fingerprint.
        key: String,
        /// Its project.
        project: String,
    },
    /// A key check found a key Google had refused working again.
    Recovered {
        /// Its fingerprint.
        key: String,
    },
    /// An operator cleared a project's cooldowns: one model's, or all of them and its caps.
    CooldownsCleared {
        /// The key it was asked through.
        key: String,
        /// Its project.
        project: String,
        /// Its billing account's scope name (the project's, for its own).
        account: String,
        /// Only this model's, if given.
        model: Option<String>,
    },
    /// Google served a request: caps on the project and its account end, the model's
    /// escalation starts over.
    Served {
        /// The key.
        key: String,
        /// Its project.
        project: String,
        /// Its billing account's scope name.
        account: String,
        /// The model.
        model: String,
        /// How long before the news the request was sent (a cap set after that stays).
        sent_ago_ms: Millis,
    },
}

impl KeyPool {
    /// What other instances must learn of `transition`, just applied to `key` at `now`: the
    /// state it left, not the transition (an escalated cooldown is told as it now stands).
    pub fn news(&self, key: KeyId, transition: &Transition<'_>, now: Millis) -> Vec<News> {
        let k = self.key(key);
        let fp = || k.fingerprint.clone();
        let project = || self.project_name(k.project).to_string();
        let account = || self.account_scope_name(k.project).to_string();
        match transition {
            Transition::Penalise { penalty, model, .. } => match penalty {
                Penalty::CoolProjectModel { .. } => self.cooled(k.project, model, now),
                Penalty::CapProject { .. } | Penalty::CapBillingAccount { .. } => self
                    .caps(now)
                    .into_iter()
                    .filter(|c| match c.kind.scope() {
                        super::Scope::Project => c.name == project(),
                        super::Scope::BillingAccount => c.name == account(),
                    })
                    .map(|c| News::Capped {
                        scope: c.kind.scope().as_str().into(),
                        name: c.name,
                        kind: c.kind.as_str().into(),
                        left_ms: c.until.saturating_sub(now),
                    })
                    .collect(),
                Penalty::DisableKey(reason) => vec![News::KeyDisabled {
                    key: fp(),
                    reason: reason.as_str().into(),
                }],
                Penalty::DisableProject => vec![News::ProjectDisabled { project: project() }],
                Penalty::BlockMethod => vec![News::MethodBlocked {
                    key: fp(),
                    method: transition_method(transition),
                }],
            },
            Transition::Disable => vec![News::KeyDisabled {
                key: fp(),
                reason: Disabled::Operator.as_str().into(),
            }],
            Transition::Enable => vec![News::Enabled {
                key: fp(),
                project: project(),
            }],
            Transition::Recover => vec![News::Recovered { key: fp() }],
            Transition::ClearCooldowns { model } => vec![News::CooldownsCleared {
                key: fp(),
                project: project(),
                account: account(),
                model: model.map(str::to_string),
            }],
            Transition::Served { model, sent } => vec![News::Served {
                key: fp(),
                project: project(),
                account: account(),
                model: model.to_string(),
                sent_ago_ms: now.saturating_sub(*sent),
            }],
        }
    }

    /// The (project, model) cooldown as it stands at `now`, if one runs.
    fn cooled(&self, project: u32, model: &str, now: Millis) -> Vec<News> {
        let models = self.models.load();
        let Some(health) = models.get(model) else {
            return Vec::new();
        };
        let p = project as usize;
        let until = health.cool_until[p].load(Relaxed);
        if until <= now {
            return Vec::new();
        }
        let why = CoolingKind::from_code(health.why[p].load(Relaxed));
        let escalations = match why {
            CoolingKind::Quota => health.quota[p].escalations(),
            _ => 0,
        };
        vec![News::Cooled {
            project: self.project_name(project).to_string(),
            model: model.to_string(),
            why: why.as_str().into(),
            left_ms: until - now,
            escalations,
        }]
    }

    /// Every running state of the table at `now` as news: what an instance writes back to the
    /// shared store when it (re)connects.
    pub fn all_news(&self, now: Millis) -> Vec<News> {
        let mut news = Vec::new();
        let models = self.models.load();
        for (p, _) in self.projects.iter().enumerate() {
            for model in models.keys() {
                news.extend(self.cooled(p as u32, model, now));
            }
            if self.project_disabled_until[p].load(Relaxed) == super::NEVER {
                news.push(News::ProjectDisabled {
                    project: self.projects[p].clone(),
                });
            }
        }
        for c in self.caps(now) {
            news.push(News::Capped {
                scope: c.kind.scope().as_str().into(),
                name: c.name,
                kind: c.kind.as_str().into(),
                left_ms: c.until.saturating_sub(now),
            });
        }
        for (k, key) in self.keys.iter().enumerate() {
            let id = KeyId(k as u32);
            if let Some(reason) = self.disabled(id).filter(|d| *d != Disabled::Billing) {
                news.push(News::KeyDisabled {
                    key: key.fingerprint.clone(),
                    reason: reason.as_str().into(),
                });
            }
        }
        for (k, method) in self.blocked.load().iter() {
            news.push(News::MethodBlocked {
                key: self.keys[*k as usize].fingerprint.clone(),
                method: method.to_string(),
            });
        }
        news
    }

    /// Applies another instance's news through the door at `now`; false when it names a key,
    /// project or account this pool does not have, or says something this version does not know.
    pub fn learn(&self, news: &News, now: Millis) -> bool {
        if !news.is_plausible() {
            return false;
        }
        let at = |left: Millis| {
            i64::try_from(now.saturating_add(left))
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
        };
        let by_fp = |fp: &str| self.find(fp);
        let (key, transition_penalty): (Option<KeyId>, Learnt) = match news {
            News::Cooled {
                project,
                model,
                why,
                left_ms,
                escalations,
            } => {
                let Some(until) = at(*left_ms) else {
                    return false;
                };
                let why = match why.as_str() {
                    "quota_day" => Cooling::Day,
                    "unavailable" => Cooling::Tier,
                    // Told as it stands: no escalation of its own here...
                    _ => Cooling::Quota { ceiling: until },
                };
                let Some(p) = self.project_index(project) else {
                    return false;
                };
                let Some(key) = self.first_key_of(p) else {
                    return false;
                };
                let penalty = Penalty::CoolProjectModel { until, why };
                self.change(key, Transition::penalise(&penalty, model, ""), now);
                // ...but the level it reached, so that the next refusal here doubles it.
                if let (Cooling::Quota { .. }, Some(h)) =
                    (why, self.models.load().get(model.as_str()))
                {
                    h.quota[p as usize].told(*escalations, quota_day_end(now));
                }
                return true;
            }
            News::Capped {
                scope,
                name,
                kind,
                left_ms,
            } => {
                let Some(until) = at(*left_ms) else {
                    return false;
                };
                let Some(penalty) = cap_penalty(scope, kind, until) else {
                    return false;
                };
                (
                    self.key_in_scope(scope, name),
                    Learnt::Penalty(penalty, String::new()),
                )
            }
            News::KeyDisabled { key, reason } => match Disabled::from_label(reason) {
                Some(Disabled::Operator) => (by_fp(key), Learnt::Transition(Transition::Disable)),
                Some(Disabled::Dead(r)) => (
                    by_fp(key),
                    Learnt::Penalty(Penalty::DisableKey(r), String::new()),
                ),
                _ => return false,
            },
            News::ProjectDisabled { project } => (
                self.project_index(project)
                    .and_then(|p| self.first_key_of(p)),
                Learnt::Penalty(Penalty::DisableProject, String::new()),
            ),
            News::MethodBlocked { key, method } => (by_fp(key), Learnt::Blocked(method.clone())),
            News::Enabled { key, .. } => (by_fp(key), Learnt::Transition(Transition::Enable)),
            News::Recovered { key } => (by_fp(key), Learnt::Transition(Transition::Recover)),
            News::CooldownsCleared { key, model, .. } => {
                let Some(id) = by_fp(key) else {
                    return false;
                };
                let clear = Transition::ClearCooldowns {
                    model: model.as_deref(),
                };
                self.change(id, clear, now);
                return true;
            }
            News::Served {
                key,
                model,
                sent_ago_ms,
                ..
            } => {
                let Some(id) = by_fp(key) else {
                    return false;
                };
                let sent = now.saturating_sub(*sent_ago_ms);
                self.change(id, Transition::Served { model, sent }, now);
                return true;
            }
        };
        let Some(key) = key else {
            return false;
        };
        match transition_penalty {
            Learnt::Transition(t) => {
                self.change(key, t, now);
            }
            Learnt::Penalty(penalty, model) => {
                self.change(key, Transition::penalise(&penalty, &model, ""), now);
            }
            Learnt::Blocked(method) => {
                let penalty = Penalty::BlockMethod;
                self.change(key, Transition::penalise(&penalty, "", &method), now);
            }
        }
        true
    }

    /// What undoes this table's lasting states (disabled keys, projects out of credit, blocked
    /// methods) that `store`, the shared store's news, no longer holds: an `Enabled` for each
    /// key concerned. Learnt before `store` itself, it makes the store win for lasting states
    /// (what ends on its own merges by the later deadline instead).
    pub fn stale_against(&self, store: &[News], now: Millis) -> Vec<News> {
        let lasting = |n: &News| {
            matches!(
                n,
                News::KeyDisabled { .. }
                    | News::ProjectDisabled { .. }
                    | News::MethodBlocked { .. }
            )
        };
        let mut keys: Vec<KeyId> = Vec::new();
        for news in self.all_news(now).iter().filter(|n| lasting(n)) {
            if store.contains(news) {
                continue;
            }
            let key = match news {
                News::KeyDisabled { key, .. } | News::MethodBlocked { key, .. } => self.find(key),
                News::ProjectDisabled { project } => self
                    .project_index(project)
                    .and_then(|p| self.first_key_of(p)),
                _ => None,
            };
            if let Some(key) = key.filter(|k| !keys.contains(k)) {
                keys.push(key);
            }
        }
        keys.into_iter()
            .map(|k| News::Enabled {
                key: self.key(k).fingerprint.clone(),
                project: self.project_name(self.key(k).project).to_string(),
            })
            .collect()
    }

    /// The scope name of `project`'s billing account: its name, or the project's for its own.
    fn account_scope_name(&self, project: u32) -> &str {
        self.billing_account_of(project)
            .unwrap_or_else(|| self.project_name(project))
    }
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// The end of the quota day at `now`: the next midnight in Los Angeles.
fn quota_day_end(now: Millis) -> Millis {
    let now = i64::try_from(now)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .unwrap_or_default();
    let end = crate::quota::classify::next_midnight_los_angeles(now);
    end.timestamp_millis().max(0) as Millis
}

/// The longest cooldown news may tell: a day and an hour (a per-day quota, DST included).
const MAX_COOLED: Millis = 25 * 3_600_000;

/// The longest cap news may tell: a month and a day.
const MAX_CAPPED: Millis = 32 * 24 * 3_600_000;

/// The longest model or method name news may carry.
const MAX_NAME: usize = 256;

impl News {
    /// Whether this is news keygate itself could have told: deadlines no longer than it ever
    /// sets, names no longer than Google's. Anything else from the shared store (a stale
    /// version, a hostile writer) is ignored.
    fn is_plausible(&self) -> bool {
        match self {
            News::Cooled { model, left_ms, .. } => {
                *left_ms <= MAX_COOLED && model.len() <= MAX_NAME
            }
            News::Capped { left_ms, .. } => *left_ms <= MAX_CAPPED,
            News::MethodBlocked { method, .. } => method.len() <= MAX_NAME,
            News::Served { model, .. } => model.len() <= MAX_NAME,
            News::CooldownsCleared { model, .. } => {
                model.as_ref().is_none_or(|m| m.len() <= MAX_NAME)
            }
            _ => true,
        }
    }
}

/// The penalty that records a cap told by its scope (`project`, `billing_account`) and kind
/// label: how the state file and the other instances name caps.
pub(super) fn cap_penalty(
    scope: &str,
    kind: &str,
    until: chrono::DateTime<chrono::Utc>,
) -> Option<Penalty> {
    match (scope, kind) {
        ("billing_account", _) => Some(Penalty::CapBillingAccount { until }),
        ("project", "spend_rate_limit") => Some(Penalty::CapProject {
            until,
            why: Cap::SpendRate,
        }),
        ("project", _) => Some(Penalty::CapProject {
            until,
            why: Cap::SpendCap,
        }),
        _ => None,
    }
}

/// What a piece of news becomes in this pool.
enum Learnt {
    Transition(Transition<'static>),
    Penalty(Penalty, String),
    Blocked(String),
}

/// The method a block names.
fn transition_method(transition: &Transition<'_>) -> String {
    match transition {
        Transition::Penalise { method, .. } => method.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::classify::DeadReason;
    use crate::quota::keys::tests::{penalise, picked, pool, pool_with_accounts};
    use crate::quota::keys::CapKind;
    use chrono::TimeZone;

    /// Every change made on `a` and told to `b` leaves `b` picking as `a` does.
    fn told(a: &KeyPool, b: &KeyPool, key: u32, transition: Transition<'_>, now: Millis) {
        a.change(KeyId(key), transition, now);
        for news in a.news(KeyId(key), &transition, now) {
            let text = serde_json::to_string(&news).unwrap();
            let back: News = serde_json::from_str(&text).unwrap();
            assert!(b.learn(&back, now + 5), "{text}");
        }
    }

    #[test]
    fn cooldowns_disables_and_clears_travel_between_instances() {
        let keys = [("a", "p1"), ("b", "p2"), ("c", "p3")];
        let (a, b) = (pool(&keys), pool(&keys));
        let until = chrono::Utc.timestamp_millis_opt(60_000).unwrap();
        let cool = Penalty::CoolProjectModel {
            until,
            why: Cooling::Tier,
        };
        told(&a, &b, 0, Transition::penalise(&cool, "m", "g"), 1000);
        let dead = Penalty::DisableKey(DeadReason::Suspended);
        told(&a, &b, 1, Transition::penalise(&dead, "m", "g"), 1000);
        for _ in 0..4 {
            assert_eq!(picked(&b, "m", &[], 2000), Some(2));
        }
        let report = &b.report(2000)[0].cooldowns[0];
        assert_eq!(
            (report.why, report.until),
            (CoolingKind::Unavailable, 60_005)
        );
        told(&a, &b, 0, Transition::ClearCooldowns { model: None }, 3000);
        told(&a, &b, 1, Transition::Enable, 3000);
        let mut seen: Vec<u32> = (0..6).filter_map(|_| picked(&b, "m", &[], 4000)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn caps_travel_and_a_success_lifts_them_everywhere() {
        let keys = [
            ("a", "p1", Some("acct")),
            ("b", "p2", Some("acct")),
            ("c", "p3", None),
        ];
        let (a, b) = (pool_with_accounts(&keys), pool_with_accounts(&keys));
        let until = chrono::Utc.timestamp_millis_opt(10_000_000).unwrap();
        let cap = Penalty::CapBillingAccount { until };
        told(&a, &b, 0, Transition::penalise(&cap, "m", "g"), 0);
        assert_eq!(b.cap_of(1, 1000), Some(CapKind::AccountSpendCap));
        let served = Transition::Served {
            model: "m",
            sent: 1000,
        };
        told(&a, &b, 1, served, 2000);
        assert_eq!(b.cap_of(1, 2000), None);
    }

    #[test]
    fn the_whole_table_is_news_and_unknown_names_are_ignored() {
        let keys = [("a", "p1"), ("b", "p2")];
        let (a, b) = (pool(&keys), pool(&keys));
        penalise(&a, KeyId(0), "m", "embedContent", &Penalty::BlockMethod);
        penalise(&a, KeyId(1), "m", "g", &Penalty::DisableProject);
        let all = a.all_news(0);
        assert_eq!(all.len(), 2, "{all:?}");
        for news in &all {
            assert!(b.learn(news, 0));
        }
        assert_eq!(b.disabled(KeyId(1)), Some(Disabled::Billing));
        let stranger = News::Recovered {
            key: "key#000000000000".into(),
        };
        assert!(!b.learn(&stranger, 0));
        let garbage: Result<News, _> = serde_json::from_str(r#"{"change":"launch_missiles"}"#);
        assert!(garbage.is_err());
        // A lasting state the store no longer holds is undone before the store's are learnt.
        let stale = b.stale_against(&[], 0);
        assert_eq!(stale.len(), 2, "{stale:?}");
        for news in &stale {
            assert!(b.learn(news, 0));
        }
        assert_eq!(b.disabled(KeyId(1)), None);
        // Deadlines keygate never sets are not believed.
        let forever = News::Cooled {
            project: "p1".into(),
            model: "m".into(),
            why: "quota".into(),
            left_ms: 1 << 50,
            escalations: 0,
        };
        assert!(!b.learn(&forever, 0));
    }
}
