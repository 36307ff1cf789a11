//! Which came last, a penalty or an operator's clear of the same cooldown, across instances
//! and outages.
//!
//! Every change carries when it was made (`at`, ms since the epoch on the clock of the
//! instance that made it). A clear leaves a tombstone in Redis with its `at` (kept longer than
//! any cooldown); a penalty older than a tombstone covering it is refused by Redis and ignored
//! by the peers, and a clear deletes only the cooldowns made before it. So a clear made while
//! Redis was away holds when it returns, even if another instance comes back later with the
//! old penalty, and a penalty learnt after the clear (Google refused again) holds too. Only the
//! order of a clear and a penalty made within the clock skew of two instances can come out
//! wrong; durations never depend on these clocks.
//!
//! An escalation level (how many times a cooldown was doubled) is versioned the same way: a
//! success starts it over on every instance, and a cooldown told with a level but made before
//! that success was sent keeps its deadline and loses its level.

use super::Fleet;
use crate::quota::keys::{now_millis, Millis, News};
use crate::runtime::Shared;
use std::collections::HashMap;

/// How long a stamp is kept: as long as a tombstone.
const KEEP_MS: Millis = super::store::TOMBSTONE_MS;

/// The most scopes stamped: past it, new scopes go unstamped (they then count as old) until
/// old stamps are pruned. Far above what real pools have (projects × models).
const MAX_STAMPS: usize = 100_000;

/// The scope of a stamp: pool, project, model (none: every model of the project).
type Scope = (String, String, Option<String>);

/// When a scope was last penalised, cleared, and started over by a success.
type Stamps = (Millis, Millis, Millis);

/// When this instance last learnt a penalty of, a clear of, and a success on each scope.
#[derive(Default)]
pub(super) struct Versions {
    stamps: std::sync::Mutex<HashMap<Scope, Stamps>>,
}

impl Versions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Stamps>> {
        self.stamps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn scope(pool: &str, project: &str, model: Option<&str>) -> Scope {
        (pool.into(), project.into(), model.map(str::to_string))
    }

    /// The stamps of `scope`, made if there is room.
    fn stamp(&self, scope: Scope, stamp: impl FnOnce(&mut Stamps)) {
        let mut stamps = self.lock();
        if stamps.len() >= MAX_STAMPS && !stamps.contains_key(&scope) {
            return;
        }
        stamp(stamps.entry(scope).or_default());
    }

    /// Notes a penalty of (`project`, `model`) made at `at`.
    pub(super) fn penalty(&self, pool: &str, project: &str, model: &str, at: Millis) {
        self.stamp(Versions::scope(pool, project, Some(model)), |s| {
            s.0 = s.0.max(at)
        });
    }

    /// Notes a clear of `project` (one `model`'s, or all) made at `at`.
    pub(super) fn clear(&self, pool: &str, project: &str, model: Option<&str>, at: Millis) {
        self.stamp(Versions::scope(pool, project, model), |s| s.1 = s.1.max(at));
    }

    /// Notes a success on (`project`, `model`) of a request sent at `at`: it starts the
    /// escalation over.
    pub(super) fn reset(&self, pool: &str, project: &str, model: &str, at: Millis) {
        self.stamp(Versions::scope(pool, project, Some(model)), |s| {
            s.2 = s.2.max(at)
        });
    }

    /// When a request on (`project`, `model`) that succeeded was last sent (0: none known).
    pub(super) fn reset_at(&self, pool: &str, project: &str, model: &str) -> Millis {
        let stamps = self.lock();
        stamps
            .get(&Versions::scope(pool, project, Some(model)))
            .map_or(0, |s| s.2)
    }

    /// `news` without the escalation level of a cooldown made at `at`, before a success that
    /// started it over.
    pub(super) fn unescalated(&self, pool: &str, news: &News, at: Millis) -> News {
        let mut news = news.clone();
        if let News::Cooled {
            project,
            model,
            escalations,
            ..
        } = &mut news
        {
            if *escalations > 0 && self.reset_at(pool, project, model) >= at {
                *escalations = 0;
            }
        }
        news
    }

    /// When (`project`, `model`) was last penalised, as far as this instance knows (0: never
    /// since it started).
    pub(super) fn penalised_at(&self, pool: &str, project: &str, model: &str) -> Millis {
        let stamps = self.lock();
        stamps
            .get(&Versions::scope(pool, project, Some(model)))
            .map_or(0, |s| s.0)
    }

    /// When (`project`, `model`) was last cleared (its own or all of the project's).
    pub(super) fn cleared_at(&self, pool: &str, project: &str, model: &str) -> Millis {
        let stamps = self.lock();
        let of = |m: Option<&str>| {
            stamps
                .get(&Versions::scope(pool, project, m))
                .map_or(0, |s| s.1)
        };
        of(None).max(of(Some(model)))
    }

    /// When this very scope (one model's, or all of the project's) was last cleared.
    fn cleared_exactly(&self, pool: &str, project: &str, model: Option<&str>) -> Millis {
        let stamps = self.lock();
        stamps
            .get(&Versions::scope(pool, project, model))
            .map_or(0, |s| s.1)
    }

    /// The models of `project` penalised after `at`.
    fn penalised_after(&self, pool: &str, project: &str, at: Millis) -> Vec<String> {
        let stamps = self.lock();
        stamps
            .iter()
            .filter(|((p, j, m), s)| p == pool && j == project && m.is_some() && s.0 > at)
            .filter_map(|((_, _, m), _)| m.clone())
            .collect()
    }

    /// Drops stamps no tombstone can outlive.
    pub(super) fn prune(&self, now: Millis) {
        self.lock()
            .retain(|_, s| s.0.max(s.1).max(s.2).saturating_add(KEEP_MS) > now);
    }

    /// Notes what this instance itself changed, made at `at`.
    pub(super) fn made(&self, pool: &str, news: &[News], at: Millis) {
        for n in news {
            match n {
                News::Cooled { project, model, .. } => self.penalty(pool, project, model, at),
                News::CooldownsCleared { project, model, .. } => {
                    self.clear(pool, project, model.as_deref(), at)
                }
                News::Served {
                    project,
                    model,
                    sent_ago_ms,
                    ..
                } => self.reset(pool, project, model, at.saturating_sub(*sent_ago_ms)),
                _ => {}
            }
        }
    }
}

impl Fleet {
    /// Applies news another instance made at `at` (told, or read back from Redis), leaving out
    /// what a later change here supersedes: a penalty older than a clear of its scope, and the
    /// part of a clear older than a penalty of a model. How many changes were applied.
    pub(super) fn learn_versioned(
        &self,
        shared: &Shared,
        pool: &str,
        news: &[News],
        at: Millis,
    ) -> usize {
        let v = &self.versions;
        let mut fresh = Vec::new();
        let mut kept = Vec::new();
        for n in news {
            match n {
                News::Cooled { project, model, .. } => {
                    if v.cleared_at(pool, project, model) >= at {
                        continue;
                    }
                    v.penalty(pool, project, model, at);
                    fresh.push(v.unescalated(pool, n, at));
                    continue;
                }
                News::Served {
                    project,
                    model,
                    sent_ago_ms,
                    ..
                } => v.reset(pool, project, model, at.saturating_sub(*sent_ago_ms)),
                News::CooldownsCleared { project, model, .. } => {
                    if v.cleared_exactly(pool, project, model.as_deref()) >= at {
                        continue; // known here already (this instance's own, or read before)
                    }
                    let newer = match model {
                        Some(m) if v.penalised_at(pool, project, m) > at => vec![m.clone()],
                        Some(_) => Vec::new(),
                        None => v.penalised_after(pool, project, at),
                    };
                    v.clear(pool, project, model.as_deref(), at);
                    if newer.is_empty() {
                        fresh.push(n.clone());
                        continue;
                    }
                    if model.is_some() {
                        continue;
                    }
                    // A clear of every model, older than a penalty of some: those penalties
                    // are put back as they stand here once the clear is applied.
                    kept.extend(still_cooling(shared, pool, project, &newer));
                }
                _ => {}
            }
            fresh.push(n.clone());
        }
        let used = shared.learn(pool, &fresh);
        shared.learn(pool, &kept);
        used
    }
}

/// The cooldowns `models` of `project` have left in `pool` now.
fn still_cooling(shared: &Shared, pool: &str, project: &str, models: &[String]) -> Vec<News> {
    let rt = shared.runtime.load();
    let Some(p) = rt.pools.iter().find(|p| p.name() == pool) else {
        return Vec::new();
    };
    let all = p.keys.load().all_news(now_millis());
    all.into_iter()
        .filter(|n| {
            matches!(n, News::Cooled { project: j, model, .. } if j == project && models.contains(model))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clear_covers_the_penalties_made_before_it_only() {
        let v = Versions::default();
        v.penalty("main", "p1", "flash", 100);
        v.penalty("main", "p1", "pro", 300);
        v.clear("main", "p1", None, 200);
        assert_eq!(v.cleared_at("main", "p1", "flash"), 200);
        assert_eq!(v.penalised_after("main", "p1", 200), ["pro"]);
        // One model's clear covers that model alone; a later clear of all wins over it.
        v.clear("main", "p2", Some("flash"), 500);
        assert_eq!(v.cleared_at("main", "p2", "flash"), 500);
        assert_eq!(v.cleared_at("main", "p2", "pro"), 0);
        v.clear("main", "p2", None, 600);
        assert_eq!(v.cleared_at("main", "p2", "flash"), 600);
        // Stamps never go back, and pools are apart.
        v.penalty("main", "p1", "pro", 250);
        assert_eq!(v.penalised_at("main", "p1", "pro"), 300);
        assert_eq!(v.penalised_at("other", "p1", "pro"), 0);
        v.prune(600 + KEEP_MS);
        assert_eq!(v.cleared_at("main", "p2", "flash"), 0, "pruned");
    }

    #[test]
    fn a_success_takes_the_level_off_the_cooldowns_made_before_it() {
        let v = Versions::default();
        let cooled = |escalations| News::Cooled {
            project: "p1".into(),
            model: "flash".into(),
            why: "quota".into(),
            left_ms: 5000,
            escalations,
        };
        let served = News::Served {
            key: "key#1".into(),
            project: "p1".into(),
            account: "p1".into(),
            model: "flash".into(),
            sent_ago_ms: 50,
        };
        // A success told at 250, of a request sent at 200.
        v.made("main", &[served], 250);
        assert_eq!(v.reset_at("main", "p1", "flash"), 200);
        // A level-2 cooldown made at 150 arrives late: its deadline stays, its level goes.
        assert_eq!(v.unescalated("main", &cooled(2), 150), cooled(0));
        // One made after the request was sent (refused again) keeps it; so do other models.
        assert_eq!(v.unescalated("main", &cooled(2), 201), cooled(2));
        assert_eq!(v.unescalated("other", &cooled(2), 150), cooled(2));
    }
}
