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

use crate::config::{KeyConfig, PoolConfig};
use crate::secret::Secret;
use crate::wire::scrub::Scrubber;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

mod caps;
mod escalation;
mod health;
mod news;
mod rebuild;
mod report;
mod saved;
pub mod series;

pub use caps::{CapKind, CapReport, Scope};
pub use health::{Changed, Disabled, Transition};
pub use news::News;
pub use report::{Cooldown, CoolingKind, KeyReport};
pub use saved::{KeyHealth, PoolHealth, ProjectHealth};

/// Milliseconds since the Unix epoch: the health table's clock.
pub type Millis = u64;

/// A deadline that never passes on its own: an operator (or a restart) has to act.
pub const NEVER: Millis = Millis::MAX;

/// How many models can hold cooldowns at once; keeps memory bounded whatever clients send.
const MAX_MODELS: usize = 1024;

/// The shortest `upstream_headers` value treated as a secret in answers.
const MIN_SECRET_HEADER: usize = 12;

/// How often a monthly cap is probed unless the pool says otherwise: hourly.
const DEFAULT_PROBE_EVERY: Millis = 3_600_000;

/// The values of a pool's `upstream_headers`, each with what replaces it in an answer
/// (`[upstream header NAME]`): the whole value, and the credential of a `Bearer TOKEN` (or any
/// `SCHEME CREDENTIAL`) value alone, which a relay's error could quote.
/// Values shorter than [`MIN_SECRET_HEADER`] are settings (`true`, `3600`), not credentials:
/// scrubbing them would rewrite unrelated text in every answer.
pub fn header_secrets(config: &PoolConfig) -> Vec<(Secret, String)> {
    let mut out = Vec::new();
    let long = |v: &str| v.len() >= MIN_SECRET_HEADER;
    for (name, value) in &config.upstream.headers {
        let replacement = format!("[upstream header {name}]");
        let whole = value.expose();
        if let Some((_, credential)) = whole.split_once(' ') {
            let credential = credential.trim();
            if long(credential) {
                out.push((Secret::new(credential), replacement.clone()));
            }
        }
        if long(whole) {
            out.push((Secret::new(whole), replacement));
        }
    }
    out
}

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
    /// Requests and tokens it served; shared with the pools that replace this one (admin
    /// changes), so counts survive them.
    pub usage: Arc<Usage>,
    /// The operator's note from the configuration.
    pub note: Option<String>,
}

/// Requests and tokens counted for a key or a tenant.
#[derive(Debug, Default)]
pub struct Usage {
    /// Requests answered (any status), counted once per request, not per attempt.
    pub requests: AtomicU64,
    /// Prompt tokens Google reported.
    pub prompt_tokens: AtomicU64,
    /// Output tokens (candidates and thoughts) Google reported.
    pub output_tokens: AtomicU64,
    /// Total tokens Google reported.
    pub total_tokens: AtomicU64,
    /// Requests and total tokens per minute over the last day.
    pub minutes: series::MinuteSeries,
}

impl Usage {
    /// Counts one request, now.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Relaxed);
        self.minutes.add(now_millis(), 1, 0);
    }

    /// Adds one answer's token counts.
    pub fn add_tokens(&self, prompt: u64, output: u64, total: u64) {
        self.prompt_tokens.fetch_add(prompt, Relaxed);
        self.output_tokens.fetch_add(output, Relaxed);
        self.total_tokens.fetch_add(total, Relaxed);
        self.minutes.add(now_millis(), 0, total);
    }

    /// Requests, prompt, output and total tokens counted so far.
    pub fn totals(&self) -> [u64; 4] {
        [
            &self.requests,
            &self.prompt_tokens,
            &self.output_tokens,
            &self.total_tokens,
        ]
        .map(|c| c.load(Relaxed))
    }
}

/// Which keys can serve a model right now, for fairness decisions and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    /// Distinct projects with at least one usable key.
    pub usable_projects: usize,
    /// Keys cooling for this model.
    pub cooling: usize,
    /// Keys disabled until an operator acts.
    pub disabled: usize,
    /// When the first cooling key is back, if any is cooling.
    pub next_recovery: Option<Millis>,
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
    /// Distinct projects among `keys`, ascending.
    projects: Vec<u32>,
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
    /// The [`CoolingKind`] code of each project's last cooldown.
    why: Vec<AtomicU8>,
    /// Each project's memory of its short-window refusals, for escalation.
    quota: Vec<escalation::QuotaMemory>,
    eligible: ArcSwap<Eligible>,
}

impl ModelHealth {
    fn new(projects: usize) -> Self {
        ModelHealth {
            cool_until: (0..projects).map(|_| AtomicU64::new(0)).collect(),
            why: (0..projects).map(|_| AtomicU8::new(0)).collect(),
            quota: (0..projects)
                .map(|_| escalation::QuotaMemory::default())
                .collect(),
            eligible: ArcSwap::from_pointee(Eligible {
                keys: Vec::new(),
                projects: Vec::new(),
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
    /// Each project's spend cap or spend-based rate limit.
    project_caps: Vec<caps::Held>,
    /// Each project's billing account: an index into `accounts`.
    account_of: Vec<u32>,
    /// Billing accounts by name; `None` for a project that names none (its own account).
    accounts: Vec<Option<String>>,
    /// Each billing account's monthly spending cap.
    account_caps: Vec<caps::Held>,
    /// How often a probe may test a monthly cap.
    probe_every: Millis,
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
    /// Other secrets answers must not show, each with what replaces it: the values of the
    /// upstream's own headers (`upstream_headers`).
    others: Vec<(Secret, String)>,
    /// Finds these keys (and `others`) in answers; built on first use (an error answer to
    /// relay).
    scrubber: std::sync::OnceLock<Scrubber>,
}

impl KeyPool {
    /// Builds the pool from its validated configuration.
    pub fn new(config: &PoolConfig) -> KeyPool {
        KeyPool::build(&config.name, &config.keys, |_| None)
            .probing_every(config.cap_probe)
            .scrubbing(header_secrets(config))
    }

    /// This pool, scrubbing `others` from answers too (each secret with its replacement).
    pub fn scrubbing(mut self, others: Vec<(Secret, String)>) -> KeyPool {
        self.others = others;
        self.scrubber = std::sync::OnceLock::new();
        self
    }

    /// This pool, probing monthly caps every `every`.
    pub fn probing_every(mut self, every: std::time::Duration) -> KeyPool {
        self.probe_every = every.as_millis().clamp(1, Millis::MAX as u128) as Millis;
        self
    }

    fn build(
        name: &str,
        configs: &[KeyConfig],
        usage_of: impl Fn(&str) -> Option<Arc<Usage>>,
    ) -> KeyPool {
        let mut projects: Vec<String> = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::new();
        let mut keys = Vec::with_capacity(configs.len());
        let mut accounts: Vec<Option<String>> = Vec::new();
        let mut account_of: Vec<u32> = Vec::new();
        for k in configs {
            let project = *index.entry(k.project.as_str()).or_insert_with(|| {
                projects.push(k.project.clone());
                (projects.len() - 1) as u32
            });
            if account_of.len() == project as usize {
                // The project's first key says its billing account (validation made sure the
                // others agree); a project that names none is its own.
                let named = k.billing_account.as_ref();
                let account =
                    match named.and_then(|b| accounts.iter().position(|a| a.as_ref() == Some(b))) {
                        Some(a) => a,
                        None => {
                            accounts.push(named.cloned());
                            accounts.len() - 1
                        }
                    };
                account_of.push(account as u32);
            }
            let fingerprint = k.secret.fingerprint();
            keys.push(PoolKey {
                usage: usage_of(&fingerprint).unwrap_or_default(),
                fingerprint,
                secret: k.secret.clone(),
                project,
                note: k.note.clone(),
            });
        }
        let n_projects = projects.len();
        KeyPool {
            name: name.to_string(),
            key_disabled_until: keys.iter().map(|_| AtomicU64::new(0)).collect(),
            key_reason: keys.iter().map(|_| AtomicU8::new(0)).collect(),
            project_disabled_until: (0..n_projects).map(|_| AtomicU64::new(0)).collect(),
            project_caps: (0..n_projects).map(|_| caps::Held::default()).collect(),
            account_caps: accounts.iter().map(|_| caps::Held::default()).collect(),
            account_of,
            accounts,
            probe_every: DEFAULT_PROBE_EVERY,
            keys,
            projects,
            blocked: ArcSwap::from_pointee(Vec::new()),
            any_blocked: AtomicBool::new(false),
            models: ArcSwap::from_pointee(HashMap::new()),
            base: Arc::new(ModelHealth::new(n_projects)),
            generation: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            write: Mutex::new(()),
            others: Vec::new(),
            scrubber: std::sync::OnceLock::new(),
        }
    }

    /// What replaces this pool's keys with their fingerprints in answers (and the upstream's
    /// header values with their names).
    pub fn scrubber(&self) -> &Scrubber {
        self.scrubber.get_or_init(|| {
            Scrubber::new(
                self.keys
                    .iter()
                    .map(|k| (k.secret.expose(), k.fingerprint.as_str()))
                    .chain(self.others.iter().map(|(s, r)| (s.expose(), r.as_str()))),
            )
        })
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
        self.pick_where(model, method, tried, None, now, false)
    }

    /// Like [`KeyPool::pick`], but only keys of `project`: for resources Google bound to it.
    /// When none of them can serve, the answer says when the project is back.
    pub fn pick_in_project(&self, model: &str, method: &str, project: u32, now: Millis) -> Pick {
        match self.pick_where(model, method, &[], Some(project), now, false) {
            // Counted for the project alone: an empty snapshot's numbers are the whole pool's.
            Pick::OnlyTriedProjects | Pick::Exhausted(_) => {
                Pick::Exhausted(self.exhaustion(&self.health(model), Some(project), now))
            }
            pick => pick,
        }
    }

    /// Why no key (of `only`, when given) serves `model` at `now`, counted from the keys' own
    /// deadlines rather than a snapshot.
    fn exhaustion(&self, health: &ModelHealth, only: Option<u32>, now: Millis) -> Exhaustion {
        let mut ex = Exhaustion {
            retry_at: None,
            cooling: 0,
            disabled: 0,
        };
        for (k, key) in self.keys.iter().enumerate() {
            if only.is_some_and(|p| p != key.project) {
                continue;
            }
            match self.out_until(k as u32, health) {
                NEVER => ex.disabled += 1,
                until if until > now => {
                    ex.cooling += 1;
                    ex.retry_at = Some(ex.retry_at.map_or(until, |r| r.min(until)));
                }
                _ => {}
            }
        }
        ex
    }

    fn pick_where(
        &self,
        model: &str,
        method: &str,
        tried: &[u32],
        only: Option<u32>,
        now: Millis,
        retried: bool,
    ) -> Pick {
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
        // Whether a key was passed over for this request's sake (its project tried or not
        // asked for, its method blocked), not because the pool changed under the snapshot.
        let mut passed_over = false;
        for i in 0..n {
            let k = snapshot.keys[(start.wrapping_add(i)) % n];
            let project = self.keys[k as usize].project;
            if tried.contains(&project) || only.is_some_and(|p| p != project) {
                passed_over = true;
                continue;
            }
            if self.any_blocked.load(Relaxed) && self.is_blocked(k, method) {
                passed_over = true;
                continue;
            }
            // The snapshot may be a moment old: re-check the key's own deadlines, and another
            // request may have taken the probe it still offers.
            if self.out_until(k, &health) > now || !self.take_probes(project, now) {
                continue;
            }
            return Pick::Key(KeyId(k));
        }
        if passed_over {
            return Pick::OnlyTriedProjects;
        }
        // Every key the snapshot offered went out since it was made (a cooldown, a probe
        // another request took, whose taker may not have said so yet): a second look sees them
        // out and says when they are back.
        if !retried {
            self.generation.fetch_add(1, Relaxed);
            return self.pick_where(model, method, tried, only, now, true);
        }
        Pick::Exhausted(self.exhaustion(&health, only, now))
    }

    /// How many keys the pool holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the pool holds no key (possible after the admin API removed them all).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key with this fingerprint (`key#1a2b3c4d5e6f` or just `1a2b3c4d`).
    pub fn find(&self, fingerprint: &str) -> Option<KeyId> {
        let hex = fingerprint.strip_prefix("key#").unwrap_or(fingerprint);
        self.keys
            .iter()
            .position(|k| k.fingerprint.strip_prefix("key#") == Some(hex))
            .map(|i| KeyId(i as u32))
    }

    /// The index of the project named `name`.
    pub fn project_index(&self, name: &str) -> Option<u32> {
        self.projects
            .iter()
            .position(|p| p == name)
            .map(|i| i as u32)
    }

    /// Which keys can serve `model` at `now`.
    pub fn availability(&self, model: &str, now: Millis) -> Availability {
        let snapshot = self.snapshot(&self.health(model), now);
        Availability {
            usable_projects: snapshot.projects.len(),
            cooling: snapshot.cooling,
            disabled: snapshot.disabled,
            next_recovery: (snapshot.cooling > 0).then_some(snapshot.valid_until),
        }
    }

    /// The last `count` projects (in pool order) that can serve `model` now: the ones a heavy
    /// tenant leaves to lighter ones. While no key is cooling for the model one usable project
    /// stays outside the reserve, so a heavy tenant is not shut out of a pool under no pressure;
    /// once keys cool, the last projects are all kept for the lighter tenants.
    pub fn reserved_projects(&self, model: &str, count: usize, now: Millis) -> Vec<u32> {
        let snapshot = self.snapshot(&self.health(model), now);
        let usable = &snapshot.projects;
        let keep = if snapshot.cooling > 0 { 0 } else { 1 };
        let count = count.min(usable.len().saturating_sub(keep));
        usable[usable.len() - count..].to_vec()
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
        let account = self.account_of[project] as usize;
        self.key_disabled_until[k]
            .load(Relaxed)
            .max(self.project_disabled_until[project].load(Relaxed))
            .max(health.cool_until[project].load(Relaxed))
            .max(self.project_caps[project].open_at())
            .max(self.account_caps[account].open_at())
    }

    /// How often a probe may test a monthly cap.
    pub fn probe_every(&self) -> Millis {
        self.probe_every
    }

    /// The billing account `project` names, if it names one.
    pub fn billing_account_of(&self, project: u32) -> Option<&str> {
        self.accounts[self.account_of[project as usize] as usize].as_deref()
    }

    /// The cap stopping `project` (its own, or its billing account's) at `now`, if one does.
    pub fn cap_of(&self, project: u32, now: Millis) -> Option<CapKind> {
        let account = self.account_of[project as usize] as usize;
        self.account_caps[account]
            .kind(now)
            .or_else(|| self.project_caps[project as usize].kind(now))
    }

    /// For a key of `project` that is otherwise usable at `now`: takes the probes its capped
    /// scopes allow, so that one request and no more tests each cap. False when a cap holds and
    /// its probe is not this request's to take.
    fn take_probes(&self, project: u32, now: Millis) -> bool {
        let account = self.account_of[project as usize] as usize;
        let (p, a) = (
            &self.project_caps[project as usize],
            &self.account_caps[account],
        );
        if p.kind(now).is_none() && a.kind(now).is_none() {
            return true;
        }
        let Some(project_due) = p.take_probe(now, self.probe_every) else {
            return false;
        };
        if a.take_probe(now, self.probe_every).is_none() {
            // The account's probe went to another project of it: this one is not used.
            p.give_back(project_due);
            return false;
        }
        log::info!(
            "pool {}: probing project {} with one request: is its spend cap lifted?",
            self.name,
            self.projects[project as usize]
        );
        // The snapshots of every model must leave the scope out again until the next probe.
        self.generation.fetch_add(1, Relaxed);
        true
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
        let mut usable_projects = vec![false; self.projects.len()];
        for k in 0..self.keys.len() as u32 {
            let until = self.out_until(k, health);
            if until <= now {
                keys.push(k);
                usable_projects[self.keys[k as usize].project as usize] = true;
            } else if until == NEVER {
                disabled += 1;
            } else {
                cooling += 1;
                valid_until = valid_until.min(until);
            }
        }
        let fresh = Arc::new(Eligible {
            keys,
            projects: (0..usable_projects.len() as u32)
                .filter(|&p| usable_projects[p as usize])
                .collect(),
            generation,
            valid_until,
            cooling,
            disabled,
        });
        health.eligible.store(fresh.clone());
        fresh
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
mod limit_tests;
#[cfg(test)]
pub(crate) mod tests;
