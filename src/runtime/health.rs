//! Where a key's health changes, and what operators hear of it.
//!
//! Every change (Google's refusal, a key check, an operator's action) goes through
//! [`Shared::change_health`]: it applies the [`Transition`] through [`KeyPool::change`], the
//! health table's one door, and turns what changed into log lines, alerts and metrics. A key
//! already out is not news: nothing is said twice.

use crate::quota::keys::{Changed, Disabled, KeyId, KeyPool, Millis, News, Scope, Transition};
use crate::runtime::Shared;
use crate::telemetry::alerts::Event;
use std::sync::Arc;

/// Where the health changes of this instance are told to the others (the `redis:` section).
pub trait Announce: Send + Sync {
    /// Tells the other instances what changed in `pool`; never waits.
    fn announce(&self, pool: &str, news: Vec<News>);
    /// Whether the shared store answers now.
    fn is_up(&self) -> bool;
}

/// Where the probe of a capped scope is claimed across instances, so that one request of the
/// whole fleet, not one per instance, tests a cap each probe interval.
#[async_trait::async_trait]
pub trait SharedProbes: Send + Sync {
    /// Claims the probe of the cap on `scope` (`project`, `billing_account`) `name` of `pool`
    /// for `every_ms`: false when another instance holds it. True when the store does not
    /// answer in time (each instance then probes on its own).
    async fn claim_probe(&self, pool: &str, scope: &str, name: &str, every_ms: Millis) -> bool;
}

/// Who changed a key's health.
#[derive(Debug, Clone, Copy)]
pub enum Cause {
    /// Google's answer to a request sent with the key.
    Answer,
    /// The key check (scheduled or asked for through the admin API).
    KeyCheck,
    /// An operator, through the admin API.
    Operator,
}

impl Shared {
    /// Google served a request on `key` for `model`, sent at `sent`: a cap it was the probe of
    /// ends, and the model's escalation starts over. Costs a few atomic loads when there is
    /// nothing to change.
    pub fn served(&self, keys: &Arc<KeyPool>, key: KeyId, model: &str, sent: Millis) {
        if keys.served_is_news(key, model, crate::quota::keys::now_millis()) {
            let served = Transition::Served { model, sent };
            self.change_health(keys, key, served, Cause::Answer);
        }
    }

    /// Applies `transition` to `key` of `keys` and says what changed. If a reload or an admin
    /// change has replaced the pool's table since `keys` was read, the change is made in the
    /// current table too, so it is not lost with the old one.
    pub fn change_health(
        &self,
        keys: &Arc<KeyPool>,
        key: KeyId,
        transition: Transition<'_>,
        cause: Cause,
    ) -> Changed {
        let now = crate::quota::keys::now_millis();
        let changed = keys.change(key, transition, now);
        if let Some(fleet) = self.fleet.get() {
            fleet.announce(keys.name(), keys.news(key, &transition, now));
        }
        if let Some(current) = self.current_table(keys) {
            if let Some(id) = current.find(&keys.key(key).fingerprint) {
                current.change(id, transition, now);
            }
        }
        self.say(keys, key, cause, &changed);
        changed
    }

    /// The pool's current table, when it is not `keys`.
    fn current_table(&self, keys: &Arc<KeyPool>) -> Option<Arc<KeyPool>> {
        let rt = self.runtime.load();
        let current = rt.pools.iter().find(|p| p.name() == keys.name())?;
        let current = current.keys.load_full();
        (!Arc::ptr_eq(&current, keys)).then_some(current)
    }

    /// The log lines and metrics for caps, tier refusals and escalated cooldowns.
    fn say_limits(&self, keys: &KeyPool, key: KeyId, changed: &Changed) {
        let pool = keys.name();
        let project = keys.key(key).project;
        let project_name = keys.project_name(project);
        if let Some(cap) = changed.capped {
            let scope = match (cap.scope(), keys.billing_account_of(project)) {
                (Scope::BillingAccount, Some(account)) => format!("billing account {account:?}"),
                (Scope::BillingAccount, None) => {
                    format!("the billing account of project {project_name:?}")
                }
                (Scope::Project, _) => format!("project {project_name:?}"),
            };
            log::warn!(
                "pool {pool}: {scope} hit its {}: its keys stay out for every model until it ends on its own, one probe request a while finds it raised, or an operator clears it",
                cap.as_str().replace('_', " ")
            );
            self.metrics
                .quota_limit(pool, cap.scope().as_str(), cap.as_str());
        }
        for cap in &changed.caps_lifted {
            log::warn!(
                "pool {pool}: the {} on project {project_name:?} (or its billing account) is lifted: its keys serve again",
                cap.as_str().replace('_', " ")
            );
            self.metrics.cap_lifted(pool, cap.scope().as_str());
        }
        if changed.unavailable {
            log::warn!(
                "pool {pool}: a model is not in project {project_name:?}'s tier (quota limit 0): its keys skip that model until midnight in Los Angeles"
            );
            self.metrics
                .quota_limit(pool, "project_model", "unavailable");
        }
        if let Some(len) = changed.escalated {
            log::info!(
                "pool {pool}: project {project_name:?} was refused again soon after its cooldown ended: cooling it {} s",
                len.div_ceil(1000)
            );
            self.metrics.quota_limit(pool, "project_model", "escalated");
        }
    }

    /// The log lines, alerts and metrics for a change.
    fn say(&self, keys: &KeyPool, key: KeyId, cause: Cause, changed: &Changed) {
        let pool = keys.name();
        let fp = &keys.key(key).fingerprint;
        if let Some(reason) = changed.went_out() {
            match (cause, reason) {
                (Cause::Answer, Disabled::Billing) => log::warn!(
                    "pool {pool}: project {} is out of prepaid credit (402); its keys stay out until an operator enables one of them, or a restart",
                    keys.project_name(keys.key(key).project)
                ),
                (Cause::Answer, _) => log::warn!(
                    "pool {pool}: disabling {fp}: {}; it stays out until a key check finds it working, an operator enables it, or a restart",
                    reason.as_str()
                ),
                (Cause::KeyCheck, _) => {
                    log::warn!("pool {pool}: key check: disabling {fp}: {}", reason.as_str())
                }
                (Cause::Operator, _) => {}
            }
            self.metrics.key_disabled(pool, reason.as_str());
            self.alert(Event::KeyDisabled {
                pool: pool.to_string(),
                key: fp.clone(),
                reason,
            });
        }
        self.say_limits(keys, key, changed);
        if let Some(was) = changed.came_back() {
            if let Cause::KeyCheck = cause {
                log::warn!(
                    "pool {pool}: {fp} works again (was {}): back in service",
                    was.as_str()
                );
            }
            self.metrics.key_recovered(pool);
            self.alert(Event::KeyRecovered {
                pool: pool.to_string(),
                key: fp.clone(),
            });
        }
    }
}

impl Shared {
    /// Applies what another instance says changed in the pool named `pool`, through the door,
    /// without telling anyone again (no log line at warn, no alert: that instance said it).
    /// Returns how many pieces of news this instance could use.
    pub fn learn(&self, pool: &str, news: &[News]) -> usize {
        let rt = self.runtime.load();
        let Some(pool) = rt.pools.iter().find(|p| p.name() == pool) else {
            return 0;
        };
        let keys = pool.keys.load_full();
        let now = crate::quota::keys::now_millis();
        news.iter().filter(|n| keys.learn(n, now)).count()
    }
}
