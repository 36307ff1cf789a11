//! The health table's one door: every change of a key's health ([`Transition`]) goes through
//! [`KeyPool::change`], which says what changed ([`Changed`]). Saying it to operators (logs,
//! alerts, metrics) is `runtime::health`'s.

use super::{CapKind, CoolingKind, KeyId, KeyPool, Millis, NEVER};
use crate::quota::classify::{Cap, Cooling, DeadReason, Penalty};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Why a key is out until someone acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disabled {
    /// Google refused the key itself.
    Dead(DeadReason),
    /// Its project ran out of prepaid credit (402).
    Billing,
    /// An operator disabled it through the admin API.
    Operator,
}

impl Disabled {
    /// Every reason, for reading labels back.
    const ALL: [Disabled; 6] = [
        Disabled::Dead(DeadReason::Invalid),
        Disabled::Dead(DeadReason::Suspended),
        Disabled::Dead(DeadReason::ServiceDisabled),
        Disabled::Dead(DeadReason::Restricted),
        Disabled::Billing,
        Disabled::Operator,
    ];

    /// The reason whose [`Disabled::as_str`] is `label`.
    pub fn from_label(label: &str) -> Option<Disabled> {
        Disabled::ALL.into_iter().find(|d| d.as_str() == label)
    }

    /// Short label for the admin API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Disabled::Dead(reason) => reason.as_str(),
            Disabled::Billing => "project_billing",
            Disabled::Operator => "disabled_by_operator",
        }
    }
}

/// A change to a key's health. Every change goes through [`KeyPool::change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition<'a> {
    /// Google refused a request on the key: record the penalty for `model` / `method`.
    Penalise {
        /// What to record.
        penalty: &'a Penalty,
        /// The model the request was for (cooldowns are per project and model).
        model: &'a str,
        /// The method it called (blocks are per key and method).
        method: &'a str,
    },
    /// An operator takes the key out until enabled again.
    Disable,
    /// An operator puts the key back: whatever disabled it (the key itself, or its project's
    /// billing) is forgotten, and methods blocked for it are unblocked. Cooldowns stay.
    Enable,
    /// A key check found the key working: Google's refusal of it is forgotten. An operator's
    /// disable and the project's billing stay.
    Recover,
    /// The cooldowns of the key's project end, for one model or for every model; for every
    /// model, the caps on its project and billing account end too.
    ClearCooldowns {
        /// Only this model's, if given.
        model: Option<&'a str>,
    },
    /// Google served a request on the key for `model`, sent at `sent`: a probed cap on its
    /// project or billing account set before that ends (the request was its probe), and the
    /// model's escalation starts over unless a refusal came after the request was sent.
    Served {
        /// The model served.
        model: &'a str,
        /// When the request was sent.
        sent: Millis,
    },
}

impl<'a> Transition<'a> {
    /// Google's refusal of a request on `model` / `method`: record `penalty`.
    pub fn penalise(penalty: &'a Penalty, model: &'a str, method: &'a str) -> Transition<'a> {
        Transition::Penalise {
            penalty,
            model,
            method,
        }
    }
}

/// What a [`Transition`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    /// Why the key was out for every model before, if it was.
    pub before: Option<Disabled>,
    /// Why it is out now, if it is.
    pub after: Option<Disabled>,
    /// Cooldowns that were running and ended.
    pub cooldowns_ended: usize,
    /// A cap that started: its project or billing account was serving before.
    pub capped: Option<CapKind>,
    /// Caps that held and ended early (a probe's success, an operator).
    pub caps_lifted: Vec<CapKind>,
    /// A cooldown that started for a model not in the project's tier.
    pub unavailable: bool,
    /// A short-window cooldown that came back soon after it ended, made this long instead.
    pub escalated: Option<Millis>,
    /// A cooldown started, or one running now ends at least a second later than it did. Another
    /// refusal of a request that was already in flight changes nothing.
    pub cooled: bool,
}

impl Changed {
    /// Why the key went out, when that is news: it was serving and stopped, or Google gave a
    /// new reason for a key already out. An operator's disable of a key already out is not.
    pub fn went_out(&self) -> Option<Disabled> {
        match (self.before, self.after) {
            (_, None) => None,
            (before, after) if before == after => None,
            (Some(_), Some(Disabled::Operator)) => None,
            (_, after) => after,
        }
    }

    /// Why the key was out, when it is back in service.
    pub fn came_back(&self) -> Option<Disabled> {
        match (self.before, self.after) {
            (Some(before), None) => Some(before),
            _ => None,
        }
    }
}

/// `key_reason` code of a key an operator disabled.
const OPERATOR: u8 = 5;

fn reason_code(reason: DeadReason) -> u8 {
    match reason {
        DeadReason::Invalid => 1,
        DeadReason::Suspended => 2,
        DeadReason::ServiceDisabled => 3,
        DeadReason::Restricted => 4,
    }
}

pub(super) fn reason_from_code(code: u8) -> Option<Disabled> {
    match code {
        1 => Some(Disabled::Dead(DeadReason::Invalid)),
        2 => Some(Disabled::Dead(DeadReason::Suspended)),
        3 => Some(Disabled::Dead(DeadReason::ServiceDisabled)),
        4 => Some(Disabled::Dead(DeadReason::Restricted)),
        OPERATOR => Some(Disabled::Operator),
        _ => None,
    }
}

impl KeyPool {
    /// The one door for health changes: applies `transition` to `key` and says what changed.
    /// Saying it (logs, alerts, metrics) is the caller's: see `health`.
    pub fn change(&self, key: KeyId, transition: Transition<'_>, now: Millis) -> Changed {
        let mut changed = Changed {
            before: self.disabled(key),
            after: None,
            cooldowns_ended: 0,
            capped: None,
            caps_lifted: Vec::new(),
            unavailable: false,
            escalated: None,
            cooled: false,
        };
        match transition {
            Transition::Penalise {
                penalty,
                model,
                method,
            } => self.penalise(key, model, method, penalty, now, &mut changed),
            Transition::Disable => self.disable(key),
            Transition::Enable => self.enable(key),
            Transition::Recover => self.revive(key),
            Transition::ClearCooldowns { model } => {
                changed.cooldowns_ended = self.clear_cooldowns(key, model, now);
                if model.is_none() {
                    changed.caps_lifted = self.lift_caps(key, now);
                }
            }
            Transition::Served { model, sent } => {
                changed.caps_lifted = self.probe_served(key, sent, now);
                let project = self.keys[key.0 as usize].project as usize;
                if let Some(health) = self.models.load().get(model) {
                    health.quota[project].served(sent);
                }
            }
        }
        changed.after = self.disabled(key);
        changed
    }

    /// Whether [`Transition::Served`] would change anything for `key` and `model` at `now`:
    /// a few atomic loads, so that a success costs nothing more when there is nothing to say.
    pub fn served_is_news(&self, key: KeyId, model: &str, now: Millis) -> bool {
        let project = self.keys[key.0 as usize].project;
        if self.cap_of(project, now).is_some() {
            return true;
        }
        let models = self.models.load();
        models
            .get(model)
            .is_some_and(|h| h.quota[project as usize].remembers())
    }

    /// Records a key-level failure of `key` on `model` / `method`.
    fn penalise(
        &self,
        key: KeyId,
        model: &str,
        method: &str,
        penalty: &Penalty,
        now: Millis,
        changed: &mut Changed,
    ) {
        let k = key.0 as usize;
        let project = self.keys[k].project as usize;
        let millis = |t: &chrono::DateTime<chrono::Utc>| t.timestamp_millis().max(0) as Millis;
        match penalty {
            Penalty::CoolProjectModel { until, why } => match self.health_for_write(model) {
                Some(health) => {
                    let (until, kind) = match why {
                        Cooling::Quota { ceiling } => {
                            let memory = &health.quota[project];
                            let (end, doubled) =
                                memory.refused(millis(until), millis(ceiling), now);
                            if doubled > 0 {
                                changed.escalated = Some(end.saturating_sub(now));
                            }
                            (end, CoolingKind::Quota)
                        }
                        Cooling::Day => (millis(until), CoolingKind::Day),
                        Cooling::Tier => {
                            changed.unavailable = health.cool_until[project].load(Relaxed) <= now
                                || health.why[project].load(Relaxed)
                                    != CoolingKind::Unavailable.code();
                            (millis(until), CoolingKind::Unavailable)
                        }
                    };
                    let before = health.cool_until[project].fetch_max(until, Relaxed);
                    if before < until {
                        health.why[project].store(kind.code(), Relaxed);
                    }
                    changed.cooled = before <= now && until > now || until >= before + 1000;
                }
                None => log::warn!(
                    "pool {}: too many models with cooldowns; not recording one for {:?}",
                    self.name,
                    model
                ),
            },
            Penalty::CapProject { until, why } => {
                let kind = match why {
                    Cap::SpendCap => CapKind::ProjectSpendCap,
                    Cap::SpendRate => CapKind::SpendRate,
                };
                let held = &self.project_caps[project];
                if held.set(kind, millis(until), now, self.probe_every) {
                    changed.capped = Some(kind);
                }
            }
            Penalty::CapBillingAccount { until } => {
                let account = self.account_of[project] as usize;
                let held = &self.account_caps[account];
                let kind = CapKind::AccountSpendCap;
                if held.set(kind, millis(until), now, self.probe_every) {
                    changed.capped = Some(kind);
                }
            }
            Penalty::DisableProject => {
                self.project_disabled_until[project].store(NEVER, Relaxed);
            }
            Penalty::DisableKey(reason) => {
                self.key_reason[k].store(reason_code(*reason), Relaxed);
                self.key_disabled_until[k].store(NEVER, Relaxed);
            }
            Penalty::BlockMethod => {
                let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
                let mut list = Vec::clone(&self.blocked.load());
                if !list.iter().any(|(kk, m)| *kk == key.0 && &**m == method) {
                    list.push((key.0, method.into()));
                }
                self.blocked.store(Arc::new(list));
                self.any_blocked.store(true, Relaxed);
            }
        }
        self.generation.fetch_add(1, Relaxed);
    }

    /// Why a key is out for every model until someone acts, if it is.
    pub fn disabled(&self, key: KeyId) -> Option<Disabled> {
        let k = key.0 as usize;
        if self.key_disabled_until[k].load(Relaxed) == NEVER {
            return reason_from_code(self.key_reason[k].load(Relaxed));
        }
        let project = self.keys[k].project as usize;
        (self.project_disabled_until[project].load(Relaxed) == NEVER).then_some(Disabled::Billing)
    }

    /// An operator takes `key` out of service until enabled again.
    fn disable(&self, key: KeyId) {
        let k = key.0 as usize;
        self.key_reason[k].store(OPERATOR, Relaxed);
        self.key_disabled_until[k].store(NEVER, Relaxed);
        self.generation.fetch_add(1, Relaxed);
    }

    /// An operator (or a successful key check) puts `key` back: whatever disabled it (the key
    /// itself, or its project's billing) is forgotten, and methods blocked for it are unblocked.
    /// Cooldowns stay: they end on their own.
    fn enable(&self, key: KeyId) {
        let k = key.0 as usize;
        self.key_reason[k].store(0, Relaxed);
        self.key_disabled_until[k].store(0, Relaxed);
        self.project_disabled_until[self.keys[k].project as usize].store(0, Relaxed);
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<(u32, Box<str>)> = self
            .blocked
            .load()
            .iter()
            .filter(|(kk, _)| *kk != key.0)
            .cloned()
            .collect();
        self.any_blocked.store(!list.is_empty(), Relaxed);
        self.blocked.store(Arc::new(list));
        self.generation.fetch_add(1, Relaxed);
    }

    /// A key check found `key` working: whatever Google's refusal disabled it is forgotten.
    /// Unlike [`KeyPool::enable`], an operator's disable and the project's billing stay.
    fn revive(&self, key: KeyId) {
        let k = key.0 as usize;
        if matches!(self.disabled(key), Some(Disabled::Dead(_))) {
            self.key_reason[k].store(0, Relaxed);
            self.key_disabled_until[k].store(0, Relaxed);
            self.generation.fetch_add(1, Relaxed);
        }
    }

    /// A request on `key` sent at `sent` was served: the probed caps on its project and
    /// billing account set before then end. Says which ended.
    fn probe_served(&self, key: KeyId, sent: Millis, now: Millis) -> Vec<CapKind> {
        let project = self.keys[key.0 as usize].project as usize;
        let account = self.account_of[project] as usize;
        let lifted: Vec<CapKind> = [&self.project_caps[project], &self.account_caps[account]]
            .into_iter()
            .filter_map(|held| held.served(sent, now))
            .collect();
        if !lifted.is_empty() {
            self.generation.fetch_add(1, Relaxed);
        }
        lifted
    }

    /// Ends the caps on `key`'s project and billing account; says which held.
    fn lift_caps(&self, key: KeyId, now: Millis) -> Vec<CapKind> {
        let project = self.keys[key.0 as usize].project as usize;
        let account = self.account_of[project] as usize;
        let lifted: Vec<CapKind> = [&self.project_caps[project], &self.account_caps[account]]
            .into_iter()
            .filter_map(|held| held.lift(now))
            .collect();
        if !lifted.is_empty() {
            self.generation.fetch_add(1, Relaxed);
        }
        lifted
    }

    /// Ends the cooldowns of `key`'s project, for `model` or for every model. Returns how many
    /// cooldowns were running.
    fn clear_cooldowns(&self, key: KeyId, model: Option<&str>, now: Millis) -> usize {
        let project = self.keys[key.0 as usize].project as usize;
        let mut cleared = 0;
        for (name, health) in self.models.load().iter() {
            if model.is_some_and(|m| m != &**name) {
                continue;
            }
            if health.cool_until[project].swap(0, Relaxed) > now {
                cleared += 1;
            }
            health.quota[project].forget();
        }
        self.generation.fetch_add(1, Relaxed);
        cleared
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::keys::tests::{cool, cooldowns, penalise, picked, pool};
    use crate::quota::keys::{Exhaustion, Pick};

    use chrono::{TimeZone, Utc};

    fn refused<'a>(penalty: &'a Penalty) -> Transition<'a> {
        Transition::Penalise {
            penalty,
            model: "m",
            method: "generateContent",
        }
    }

    #[test]
    fn a_refused_key_going_out_is_news_once() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        let dead = Penalty::DisableKey(DeadReason::Invalid);
        let first = p.change(KeyId(0), refused(&dead), 1000);
        assert_eq!(first.before, None);
        assert_eq!(first.went_out(), Some(Disabled::Dead(DeadReason::Invalid)));
        assert_eq!(first.came_back(), None);
        // Another request met the same key before the table changed: nothing new to say.
        let again = p.change(KeyId(0), refused(&dead), 1000);
        assert_eq!(again.went_out(), None);
        // A different reason from Google for a key already out is news.
        let suspended = Penalty::DisableKey(DeadReason::Suspended);
        let other = p.change(KeyId(0), refused(&suspended), 1000);
        assert_eq!(
            other.went_out(),
            Some(Disabled::Dead(DeadReason::Suspended))
        );
    }

    #[test]
    fn an_operators_disable_and_enable_say_what_changed() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        let off = p.change(KeyId(0), Transition::Disable, 1000);
        assert_eq!(off.went_out(), Some(Disabled::Operator));
        // Disabling a key already out (here: dead) is the operator's own doing, not news.
        let dead = Penalty::DisableKey(DeadReason::Invalid);
        p.change(KeyId(1), refused(&dead), 1000);
        let again = p.change(KeyId(1), Transition::Disable, 1000);
        assert_eq!(again.after, Some(Disabled::Operator));
        assert_eq!(again.went_out(), None);
        // Enabling brings either back, whatever took it out.
        let on = p.change(KeyId(1), Transition::Enable, 1000);
        assert_eq!(on.came_back(), Some(Disabled::Operator));
        assert_eq!(p.disabled(KeyId(1)), None);
        // Enabling a key that was serving changes nothing.
        let noop = p.change(KeyId(1), Transition::Enable, 1000);
        assert_eq!((noop.went_out(), noop.came_back()), (None, None));
    }

    #[test]
    fn a_key_check_brings_back_only_what_google_took_out() {
        let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p2")]);
        let dead = Penalty::DisableKey(DeadReason::Restricted);
        p.change(KeyId(0), refused(&dead), 1000);
        let back = p.change(KeyId(0), Transition::Recover, 1000);
        assert_eq!(
            back.came_back(),
            Some(Disabled::Dead(DeadReason::Restricted))
        );
        // An operator's disable stays.
        p.change(KeyId(0), Transition::Disable, 1000);
        let kept = p.change(KeyId(0), Transition::Recover, 1000);
        assert_eq!(kept.after, Some(Disabled::Operator));
        assert_eq!(kept.came_back(), None);
        // A dead key of a project out of credit is not back: its project still is out.
        p.change(KeyId(1), refused(&Penalty::DisableProject), 1000);
        p.change(KeyId(2), refused(&dead), 1000);
        let still = p.change(KeyId(2), Transition::Recover, 1000);
        assert_eq!(still.after, Some(Disabled::Billing));
        assert_eq!(still.came_back(), None);
    }

    #[test]
    fn billing_takes_out_the_whole_project_and_is_said_once() {
        let p = pool(&[("a", "p1"), ("b", "p1"), ("c", "p2")]);
        let billing = p.change(KeyId(0), refused(&Penalty::DisableProject), 1000);
        assert_eq!(billing.went_out(), Some(Disabled::Billing));
        assert_eq!(p.disabled(KeyId(1)), Some(Disabled::Billing));
        assert_eq!(p.disabled(KeyId(2)), None);
        let second = p.change(KeyId(1), refused(&Penalty::DisableProject), 1000);
        assert_eq!(second.went_out(), None);
    }

    #[test]
    fn cooldowns_and_blocked_methods_are_not_disables() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        let until = Utc.timestamp_millis_opt(60_000).unwrap();
        let cool = p.change(
            KeyId(0),
            refused(&Penalty::CoolProjectModel {
                until,
                why: Cooling::Day,
            }),
            1000,
        );
        assert_eq!((cool.went_out(), cool.came_back()), (None, None));
        assert!(cool.cooled, "a cooldown started");
        // The same refusal again (a request that was in flight) is no news; a later end is.
        let again = |until_ms: i64| {
            let until = Utc.timestamp_millis_opt(until_ms).unwrap();
            let why = Cooling::Day;
            p.change(
                KeyId(0),
                refused(&Penalty::CoolProjectModel { until, why }),
                1000,
            )
            .cooled
        };
        assert!(!again(60_000));
        assert!(!again(60_500));
        assert!(again(61_500));
        assert_eq!(picked(&p, "m", &[], 1000), Some(1));
        let blocked = p.change(KeyId(1), refused(&Penalty::BlockMethod), 1000);
        assert_eq!((blocked.before, blocked.after), (None, None));
        assert!(!matches!(
            p.pick("m", "generateContent", &[], 1000),
            Pick::Key(_)
        ));
        assert_eq!(p.pick("m", "embedContent", &[], 1000), Pick::Key(KeyId(1)));
        // Clearing says how many cooldowns were running.
        let clear = Transition::ClearCooldowns { model: Some("m") };
        assert_eq!(p.change(KeyId(0), clear, 1000).cooldowns_ended, 1);
        assert_eq!(p.change(KeyId(0), clear, 1000).cooldowns_ended, 0);
        assert_eq!(picked(&p, "m", &[], 1000), Some(0));
    }

    #[test]
    fn operator_disable_enable_and_clear() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        p.disable(KeyId(0));
        assert_eq!(p.disabled(KeyId(0)), Some(Disabled::Operator));
        for _ in 0..3 {
            assert_eq!(picked(&p, "m", &[], 1000), Some(1));
        }
        p.enable(KeyId(0));
        assert_eq!(p.disabled(KeyId(0)), None);
        cool(&p, 1, "m", 90_000);
        assert_eq!(cooldowns(&p, 1), vec![("m".to_string(), 90_000)]);
        assert_eq!(p.clear_cooldowns(KeyId(1), Some("m"), 1000), 1);
        assert!(p.report(1000)[1].cooldowns.is_empty());
        let mut both: Vec<u32> = (0..4).filter_map(|_| picked(&p, "m", &[], 1000)).collect();
        both.sort();
        both.dedup();
        assert_eq!(both, vec![0, 1]);
    }

    #[test]
    fn dead_keys_and_billing_stay_out() {
        let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p2")]);
        penalise(
            &p,
            KeyId(0),
            "pro",
            "generateContent",
            &Penalty::DisableKey(DeadReason::Invalid),
        );
        assert_eq!(
            p.disabled(KeyId(0)),
            Some(Disabled::Dead(DeadReason::Invalid))
        );
        penalise(
            &p,
            KeyId(1),
            "pro",
            "generateContent",
            &Penalty::DisableProject,
        );
        let far_future = 4_000_000_000_000;
        assert_eq!(
            p.pick("flash", "generateContent", &[], far_future),
            Pick::Exhausted(Exhaustion {
                retry_at: None,
                cooling: 0,
                disabled: 3
            })
        );
    }

    #[test]
    fn blocked_method_skips_only_that_method() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        penalise(&p, KeyId(0), "m", "embedContent", &Penalty::BlockMethod);
        for _ in 0..4 {
            assert_eq!(p.pick("m", "embedContent", &[], 1000), Pick::Key(KeyId(1)));
        }
        let gen: Vec<u32> = (0..2).filter_map(|_| picked(&p, "m", &[], 1000)).collect();
        assert!(gen.contains(&0));
    }
}
