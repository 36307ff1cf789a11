//! The key pool and its health table: which key serves the next request for a model, and what
//! a key-level failure does to the table.
//!
//! Quotas belong to a Google project and a model, so cooldowns are kept per (project, model);
//! dead keys and billing-exhausted projects are kept per key and per project.
//!
//! The hot path ([`KeyPool::pick`]) is lock-free: it loads an immutable snapshot of the keys
//! that can serve the model (an `ArcSwap`), takes the next one round-robin from an atomic
//! counter, and re-checks that key's deadlines with a few atomic loads. Its cost does not
//! depend on how many keys are cooling. A snapshot is rebuilt (O(keys), under a mutex that is
//! never held across an `.await`) only when the table changes or a deadline in it passes.

use crate::classify::{DeadReason, Penalty};
use crate::config::PoolConfig;
use crate::secret::Secret;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Milliseconds since the Unix epoch: the health table's clock.
pub type Millis = u64;

/// A deadline that never passes on its own: an operator (or a restart) has to act.
pub const NEVER: Millis = Millis::MAX;

/// How many models can hold cooldowns at once; keeps memory bounded whatever clients send.
const MAX_MODELS: usize = 1024;

/// Index of a key within its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u32);

/// One key of the pool.
#[derive(Debug)]
pub struct PoolKey {
    /// The key itself.
    pub secret: Secret,
    /// Its fingerprint, computed once: what logs show.
    pub fingerprint: String,
    /// Index of its project in [`KeyPool::project_name`].
    pub project: u32,
}

/// The answer of [`KeyPool::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pick {
    /// Use this key.
    Key(KeyId),
    /// Keys can serve the model, but only ones of projects this request already tried.
    OnlyTriedProjects,
    /// No key can serve the model now.
    Exhausted(Exhaustion),
}

/// Why no key could serve, and when one will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhaustion {
    /// When the earliest key serves this model again; `None` when every key waits for an
    /// operator (disabled).
    pub retry_at: Option<Millis>,
    /// Keys out for a cooldown of this model.
    pub cooling: usize,
    /// Keys out until an operator acts.
    pub disabled: usize,
}

/// Keys that could serve one model when the snapshot was taken.
#[derive(Debug)]
struct Eligible {
    keys: Vec<u32>,
    /// The pool's generation this snapshot was built from.
    generation: u64,
    /// The snapshot must be rebuilt at this time: the earliest deadline among excluded keys.
    valid_until: Millis,
    cooling: usize,
    disabled: usize,
}

/// Cooldowns of one model, per project.
#[derive(Debug)]
struct ModelHealth {
    cool_until: Vec<AtomicU64>,
    eligible: ArcSwap<Eligible>,
}

impl ModelHealth {
    fn new(projects: usize) -> Self {
        ModelHealth {
            cool_until: (0..projects).map(|_| AtomicU64::new(0)).collect(),
            eligible: ArcSwap::from_pointee(Eligible {
                keys: Vec::new(),
                generation: u64::MAX, // stale: built on first use
                valid_until: 0,
                cooling: 0,
                disabled: 0,
            }),
        }
    }
}

/// A pool of keys with its shared health table.
#[derive(Debug)]
pub struct KeyPool {
    name: String,
    keys: Vec<PoolKey>,
    projects: Vec<String>,
    key_disabled_until: Vec<AtomicU64>,
    key_reason: Vec<AtomicU8>,
    project_disabled_until: Vec<AtomicU64>,
    /// (key, method) pairs Google refused with `API_KEY_SERVICE_BLOCKED`.
    blocked: ArcSwap<Vec<(u32, Box<str>)>>,
    any_blocked: AtomicBool,
    /// Models with at least one cooldown recorded. Models never refused share `base`.
    models: ArcSwap<HashMap<Box<str>, Arc<ModelHealth>>>,
    base: Arc<ModelHealth>,
    /// Bumped by every change that can affect any model's snapshot.
    generation: AtomicU64,
    next: AtomicUsize,
    /// Serialises snapshot rebuilds and map inserts. Held only for synchronous work.
    write: Mutex<()>,
}

impl KeyPool {
    /// Builds the pool from its validated configuration.
    pub fn new(config: &PoolConfig) -> KeyPool {
        let mut projects: Vec<String> = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::new();
        let mut keys = Vec::with_capacity(config.keys.len());
        for k in &config.keys {
            let project = *index.entry(k.project.as_str()).or_insert_with(|| {
                projects.push(k.project.clone());
                (projects.len() - 1) as u32
            });
            keys.push(PoolKey {
                fingerprint: k.secret.fingerprint(),
                secret: k.secret.clone(),
                project,
            });
        }
        let n_projects = projects.len();
        KeyPool {
            name: config.name.clone(),
            key_disabled_until: keys.iter().map(|_| AtomicU64::new(0)).collect(),
            key_reason: keys.iter().map(|_| AtomicU8::new(0)).collect(),
            project_disabled_until: (0..n_projects).map(|_| AtomicU64::new(0)).collect(),
            keys,
            projects,
            blocked: ArcSwap::from_pointee(Vec::new()),
            any_blocked: AtomicBool::new(false),
            models: ArcSwap::from_pointee(HashMap::new()),
            base: Arc::new(ModelHealth::new(n_projects)),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            write: Mutex::new(()),
        }
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A key by id.
    pub fn key(&self, id: KeyId) -> &PoolKey {
        &self.keys[id.0 as usize]
    }

    /// A project's name (from the config, or a key fingerprint for keys without one).
    pub fn project_name(&self, project: u32) -> &str {
        &self.projects[project as usize]
    }

    /// The next key, round-robin, that can serve `model` and `method` at `now`, skipping keys
    /// of the projects in `tried`.
    pub fn pick(&self, model: &str, method: &str, tried: &[u32], now: Millis) -> Pick {
        let health = self.health(model);
        let snapshot = self.snapshot(&health, now);
        let n = snapshot.keys.len();
        if n == 0 {
            return Pick::Exhausted(Exhaustion {
                retry_at: (snapshot.valid_until != NEVER).then_some(snapshot.valid_until),
                cooling: snapshot.cooling,
                disabled: snapshot.disabled,
            });
        }
        let start = self.next.fetch_add(1, Relaxed);
        for i in 0..n {
            let k = snapshot.keys[(start.wrapping_add(i)) % n];
            let project = self.keys[k as usize].project;
            if tried.contains(&project) {
                continue;
            }
            // The snapshot may be a moment old: re-check the key's own deadlines.
            if self.out_until(k, &health) > now {
                continue;
            }
            if self.any_blocked.load(Relaxed) && self.is_blocked(k, method) {
                continue;
            }
            return Pick::Key(KeyId(k));
        }
        Pick::OnlyTriedProjects
    }

    /// Records a key-level failure of `key` on `model` / `method`.
    pub fn penalise(&self, key: KeyId, model: &str, method: &str, penalty: &Penalty) {
        let k = key.0 as usize;
        let project = self.keys[k].project as usize;
        match penalty {
            Penalty::CoolProjectModel { until } => {
                let until = until.timestamp_millis().max(0) as Millis;
                match self.health_for_write(model) {
                    Some(health) => {
                        health.cool_until[project].fetch_max(until, Relaxed);
                    }
                    None => log::warn!(
                        "pool {}: too many models with cooldowns; not recording one for {:?}",
                        self.name,
                        model
                    ),
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

    /// Why a key is disabled, if it is.
    pub fn disabled_reason(&self, key: KeyId) -> Option<DeadReason> {
        reason_from_code(self.key_reason[key.0 as usize].load(Relaxed))
    }

    fn health(&self, model: &str) -> Arc<ModelHealth> {
        let models = self.models.load();
        if models.is_empty() {
            return self.base.clone();
        }
        models
            .get(model)
            .cloned()
            .unwrap_or_else(|| self.base.clone())
    }

    /// The model's health entry, created if needed; `None` when the map is full of live entries.
    fn health_for_write(&self, model: &str) -> Option<Arc<ModelHealth>> {
        if let Some(h) = self.models.load().get(model) {
            return Some(h.clone());
        }
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.models.load();
        if let Some(h) = current.get(model) {
            return Some(h.clone());
        }
        let mut map = HashMap::clone(&current);
        if map.len() >= MAX_MODELS {
            let now = now_millis();
            map.retain(|_, h| h.cool_until.iter().any(|t| t.load(Relaxed) > now));
            if map.len() >= MAX_MODELS {
                return None;
            }
        }
        let health = Arc::new(ModelHealth::new(self.projects.len()));
        map.insert(model.into(), health.clone());
        self.models.store(Arc::new(map));
        Some(health)
    }

    /// When key `k` is next usable for this model's health entry.
    fn out_until(&self, k: u32, health: &ModelHealth) -> Millis {
        let k = k as usize;
        let project = self.keys[k].project as usize;
        self.key_disabled_until[k]
            .load(Relaxed)
            .max(self.project_disabled_until[project].load(Relaxed))
            .max(health.cool_until[project].load(Relaxed))
    }

    fn is_blocked(&self, k: u32, method: &str) -> bool {
        self.blocked
            .load()
            .iter()
            .any(|(kk, m)| *kk == k && &**m == method)
    }

    fn snapshot(&self, health: &ModelHealth, now: Millis) -> Arc<Eligible> {
        let generation = self.generation.load(Relaxed);
        let current = health.eligible.load_full();
        if current.generation == generation && now < current.valid_until {
            return current;
        }
        let _guard = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation.load(Relaxed);
        let current = health.eligible.load_full();
        if current.generation == generation && now < current.valid_until {
            return current;
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut valid_until = NEVER;
        let (mut cooling, mut disabled) = (0, 0);
        for k in 0..self.keys.len() as u32 {
            let until = self.out_until(k, health);
            if until <= now {
                keys.push(k);
            } else if until == NEVER {
                disabled += 1;
            } else {
                cooling += 1;
                valid_until = valid_until.min(until);
            }
        }
        let fresh = Arc::new(Eligible {
            keys,
            generation,
            valid_until,
            cooling,
            disabled,
        });
        health.eligible.store(fresh.clone());
        fresh
    }
}

fn reason_code(reason: DeadReason) -> u8 {
    match reason {
        DeadReason::Invalid => 1,
        DeadReason::Suspended => 2,
        DeadReason::ServiceDisabled => 3,
        DeadReason::Restricted => 4,
    }
}

fn reason_from_code(code: u8) -> Option<DeadReason> {
    match code {
        1 => Some(DeadReason::Invalid),
        2 => Some(DeadReason::Suspended),
        3 => Some(DeadReason::ServiceDisabled),
        4 => Some(DeadReason::Restricted),
        _ => None,
    }
}

/// The wall clock as [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{KeyConfig, UpstreamConfig};
    use chrono::{TimeZone, Utc};

    fn pool(keys: &[(&str, &str)]) -> KeyPool {
        KeyPool::new(&PoolConfig {
            name: "main".into(),
            upstream: UpstreamConfig {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1,
            },
            keys: keys
                .iter()
                .map(|(k, p)| KeyConfig {
                    secret: Secret::new(*k),
                    project: p.to_string(),
                })
                .collect(),
            tls_ca_file: None,
        })
    }

    fn picked(pool: &KeyPool, model: &str, tried: &[u32], now: Millis) -> Option<u32> {
        match pool.pick(model, "generateContent", tried, now) {
            Pick::Key(k) => Some(k.0),
            _ => None,
        }
    }

    fn cool(pool: &KeyPool, key: u32, model: &str, until_ms: i64) {
        let until = Utc.timestamp_millis_opt(until_ms).unwrap();
        pool.penalise(
            KeyId(key),
            model,
            "generateContent",
            &Penalty::CoolProjectModel { until },
        );
    }

    #[test]
    fn round_robin_visits_every_key() {
        let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3")]);
        let mut seen: Vec<u32> = (0..6).filter_map(|_| picked(&p, "m", &[], 1000)).collect();
        assert_eq!(seen.len(), 6);
        seen.sort();
        assert_eq!(seen, vec![0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn cooldown_is_per_project_and_model() {
        let p = pool(&[("a", "p1"), ("b", "p1"), ("c", "p2")]);
        cool(&p, 0, "pro", 60_000);
        // Both keys of p1 are out for "pro", only key c serves it.
        for _ in 0..4 {
            assert_eq!(picked(&p, "pro", &[], 1000), Some(2));
        }
        // "flash" is untouched: all three keys serve it.
        let mut flash: Vec<u32> = (0..3)
            .filter_map(|_| picked(&p, "flash", &[], 1000))
            .collect();
        flash.sort();
        assert_eq!(flash, vec![0, 1, 2]);
        // After the deadline, p1 is back for "pro".
        let back: Vec<u32> = (0..3)
            .filter_map(|_| picked(&p, "pro", &[], 60_000))
            .collect();
        assert!(back.contains(&0) && back.contains(&1), "{back:?}");
    }

    #[test]
    fn exhausted_pool_says_when_the_first_key_returns() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        cool(&p, 0, "pro", 90_000);
        cool(&p, 1, "pro", 30_000);
        assert_eq!(
            p.pick("pro", "generateContent", &[], 1000),
            Pick::Exhausted(Exhaustion {
                retry_at: Some(30_000),
                cooling: 2,
                disabled: 0
            })
        );
        assert_eq!(picked(&p, "pro", &[], 30_000), Some(1));
    }

    #[test]
    fn dead_keys_and_billing_stay_out() {
        let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p2")]);
        p.penalise(
            KeyId(0),
            "pro",
            "generateContent",
            &Penalty::DisableKey(DeadReason::Invalid),
        );
        assert_eq!(p.disabled_reason(KeyId(0)), Some(DeadReason::Invalid));
        p.penalise(KeyId(1), "pro", "generateContent", &Penalty::DisableProject);
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
    fn tried_projects_are_skipped() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        for _ in 0..4 {
            assert_eq!(picked(&p, "m", &[0], 1000), Some(1));
        }
        assert_eq!(
            p.pick("m", "generateContent", &[0, 1], 1000),
            Pick::OnlyTriedProjects
        );
    }

    #[test]
    fn blocked_method_skips_only_that_method() {
        let p = pool(&[("a", "p1"), ("b", "p2")]);
        p.penalise(KeyId(0), "m", "embedContent", &Penalty::BlockMethod);
        for _ in 0..4 {
            assert_eq!(p.pick("m", "embedContent", &[], 1000), Pick::Key(KeyId(1)));
        }
        let gen: Vec<u32> = (0..2).filter_map(|_| picked(&p, "m", &[], 1000)).collect();
        assert!(gen.contains(&0));
    }

    #[test]
    fn cooling_keys_do_not_slow_selection_of_the_rest() {
        // 10,000 keys, 9,900 cooling: every pick still lands on a free key at once.
        let keys: Vec<(String, String)> = (0..10_000)
            .map(|i| (format!("k{i}"), format!("p{i}")))
            .collect();
        let refs: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
        let p = pool(&refs);
        for i in 0..9_900 {
            cool(&p, i, "pro", 60_000);
        }
        for _ in 0..200 {
            let k = picked(&p, "pro", &[], 1000).unwrap();
            assert!(k >= 9_900);
        }
    }
}
