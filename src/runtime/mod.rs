//! What the gateway runs on, shared by the proxy and the admin API: the pools with their keys
//! and upstreams, the tenants, and the tables that outlive a configuration (affinity, uploads).
//!
//! Requests take a snapshot (`Arc`) of what they need when they start, so a change (a key added
//! through the admin API) applies to the next request while running ones finish on what they
//! started with. [`UpstreamKeeper`] keeps the upstreams of the runtime in force looked up and
//! health-checked.

pub mod budget;
pub mod counters;
pub mod health;
pub mod owners;

use crate::cache::{Cache, SharedStore};
use crate::config::{ClientLimits, Config, PoolConfig, RetryPolicy, Timeouts};
use crate::quota::affinity::{Affinity, Uploads};
use crate::quota::keys::{KeyPool, Millis};
use crate::telemetry::alerts::{Alerts, Event};
use crate::telemetry::events::{QuotaEvent, Recent, QUOTA_EVENTS};
use crate::telemetry::metrics::{Metrics, PoolMetrics};
use crate::tenants::{FairShare, Tenant, Tenants};
use crate::upstream::{self, Upstream};
use crate::wire::cors::Cors;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use budget::BodyBudget;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How many resources (files, caches, batches...) keygate remembers the owner of.
const AFFINITY_CAPACITY: usize = 100_000;
/// How many resumable uploads can be in progress at once.
const UPLOADS_CAPACITY: usize = 10_000;

/// One pool: its keys (swapped whole when keys are added or removed), its upstream, and the
/// fair-share table of the tenants using it.
pub struct Pool {
    /// The pool's configuration as loaded (its `keys` are the ones of the first `KeyPool`).
    pub config: PoolConfig,
    /// Keys and their health table.
    pub keys: ArcSwap<KeyPool>,
    /// Addresses and connections.
    pub upstream: Arc<Upstream>,
    /// Who used the pool lately; `None` when fair share is off for this pool.
    pub fair: Option<FairShare>,
    /// Its metrics' handles, taken at its first request.
    pub metrics: OnceLock<PoolMetrics>,
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The handles of the pool's metrics in `metrics`.
    pub fn metrics<'a>(&'a self, metrics: &Metrics) -> &'a PoolMetrics {
        self.metrics.get_or_init(|| metrics.pool(self.name()))
    }
}

/// Settings and tables that one configuration defines.
pub struct Runtime {
    /// Pools in config order.
    pub pools: Vec<Arc<Pool>>,
    /// Tenants.
    pub tenants: Tenants,
    /// Largest request body accepted.
    pub max_body: usize,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// How often each upstream address gets a TCP connect check; zero: never.
    pub upstream_health_check: Duration,
    /// Browser access, if configured.
    pub cors: Option<Cors>,
    /// What a client may take (the body pace is read from here; the connection cap, header
    /// deadline and body budget are fixed at start).
    pub client_limits: ClientLimits,
    /// Where clients reach keygate, for URLs handed back to them.
    pub public_url: Option<String>,
    /// Proxies whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Model aliases: the name a client sends, the model it stands for.
    pub model_aliases: std::collections::BTreeMap<String, String>,
    /// The response cache, if configured. A reload with the same settings keeps its entries.
    pub cache: Option<Arc<Cache>>,
}

/// Everything the proxy and the admin API share.
pub struct Shared {
    /// The current configuration's runtime.
    pub runtime: ArcSwap<Runtime>,
    /// Which project owns which resource.
    pub affinity: Affinity,
    /// Resumable uploads handed out.
    pub uploads: Uploads,
    /// The configuration keygate started with (a reload cannot change its listeners).
    pub started: Config,
    /// Bumped by each reload, so that [`UpstreamKeeper`] looks the new upstreams up and checks
    /// them at once (a watch: its lookup and its check loop each see every change).
    pub upstreams_changed: tokio::sync::watch::Sender<()>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Webhook alerts, if configured.
    pub alerts: Option<Alerts>,
    /// The memory all request bodies may hold together.
    pub body_budget: Arc<BodyBudget>,
    /// Where health changes are told to the other instances, when several share their state.
    pub fleet: std::sync::OnceLock<Arc<dyn health::Announce>>,
    /// The most recent refusals that changed a key's health, for the dashboard.
    pub quota_events: Recent<QuotaEvent>,
    /// Where tenant limits are counted across instances, when several share their state.
    pub limits: std::sync::OnceLock<Arc<dyn crate::tenants::shared::SharedLimits>>,
    /// Where resource owners and uploads are shared with the other instances.
    pub owners: std::sync::OnceLock<Arc<dyn owners::SharedOwners>>,
    /// Where cap probes are claimed across instances.
    pub probes: std::sync::OnceLock<Arc<dyn health::SharedProbes>>,
    /// Where the usage series of the instances are added up.
    pub series: std::sync::OnceLock<Arc<dyn crate::quota::keys::series::SharedSeries>>,
    /// Where the response cache shares its entries with the other instances (Redis), given
    /// at start to every runtime's cache.
    pub cache_shared: Option<Arc<dyn SharedStore>>,
    /// Where the request and token counters of the instances are added up.
    pub counters: std::sync::OnceLock<Arc<dyn counters::SharedCounters>>,
}

/// Where a request goes.
pub enum Route {
    /// This pool (index into [`Runtime::pools`]).
    Pool(usize),
    /// No pool the tenant may use serves the model.
    NoPool,
}

impl Runtime {
    /// Builds the runtime of a validated configuration; its response cache (if configured)
    /// shares entries through `cache_shared`, when given.
    pub fn new(config: &Config, cache_shared: Option<Arc<dyn SharedStore>>) -> Runtime {
        Runtime::build(config, None, cache_shared)
    }

    /// Builds the runtime of a reloaded configuration, carrying over from `old` what belongs
    /// to pools, keys and tenants that keep their names: health tables, usage counts, fair-share
    /// windows, and upstream connections when the upstream is unchanged.
    pub fn reloaded(
        config: &Config,
        old: &Runtime,
        cache_shared: Option<Arc<dyn SharedStore>>,
    ) -> Runtime {
        Runtime::build(config, Some(old), cache_shared)
    }

    fn build(
        config: &Config,
        old: Option<&Runtime>,
        cache_shared: Option<Arc<dyn SharedStore>>,
    ) -> Runtime {
        let pools = config
            .pools
            .iter()
            .map(|p| {
                let previous = old.and_then(|o| o.pools.iter().find(|q| q.name() == p.name));
                let keys = match previous {
                    Some(q) => q
                        .keys
                        .load()
                        .rebuilt(&p.keys)
                        .probing_every(p.cap_probe)
                        .scrubbing(crate::quota::keys::header_secrets(p)),
                    None => KeyPool::new(p),
                };
                let same_upstream = previous.filter(|q| {
                    q.config.upstream == p.upstream
                        && q.config.tls_ca_file == p.tls_ca_file
                        && q.config.proxy == p.proxy
                });
                let upstream = match same_upstream {
                    Some(q) if config.timeouts == old.map_or(config.timeouts, |o| o.timeouts) => {
                        q.upstream.clone()
                    }
                    _ => Arc::new(Upstream::new(p, config.timeouts)),
                };
                Arc::new(Pool {
                    config: p.clone(),
                    keys: ArcSwap::from_pointee(keys),
                    upstream,
                    fair: p.fair_share.map(|active| {
                        let active = active.as_millis() as Millis;
                        match previous.and_then(|q| q.fair.as_ref()) {
                            Some(f) => f.carried_over(active, |name| {
                                config.tenants.iter().any(|t| t.name == name)
                            }),
                            None => FairShare::new(active),
                        }
                    }),
                    metrics: OnceLock::new(),
                })
            })
            .collect();
        Runtime {
            pools,
            tenants: Tenants::new(&config.tenants, old.map(|o| &o.tenants)),
            max_body: config.max_body_bytes,
            retry: config.retry,
            timeouts: config.timeouts,
            upstream_health_check: config.upstream_health_check,
            cors: config.cors.as_ref().map(Cors::new),
            client_limits: config.client_limits,
            public_url: config.public_url.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            model_aliases: config.model_aliases.clone(),
            cache: config.cache.map(|c| {
                let previous = old.and_then(|o| o.cache.as_deref());
                Arc::new(Cache::new(c, previous, cache_shared.clone()))
            }),
        }
    }

    /// The first pool (in config order) that `tenant` may use and that serves `model`. A
    /// request without a model (listing models, files) goes to the tenant's first pool.
    pub fn route(&self, tenant: Option<&Tenant>, model: &str) -> Route {
        let allowed = |i: usize| tenant.is_none_or(|t| t.pools.contains(&i));
        let found = self
            .pools
            .iter()
            .enumerate()
            .find(|(i, p)| allowed(*i) && (model.is_empty() || p.config.serves(model)));
        match found {
            Some((i, _)) => Route::Pool(i),
            None => Route::NoPool,
        }
    }

    /// The aliases `tenant` may use (those whose model one of its pools serves), in name order.
    pub fn aliases_for(&self, tenant: Option<&Tenant>) -> Vec<(&str, &str)> {
        self.model_aliases
            .iter()
            .filter(|(_, target)| matches!(self.route(tenant, target), Route::Pool(_)))
            .map(|(alias, target)| (alias.as_str(), target.as_str()))
            .collect()
    }

    /// The index of the pool named `name`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name() == name)
    }

    /// Every pool's upstream, for [`UpstreamKeeper`].
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.pools.iter().map(|p| p.upstream.clone()).collect()
    }
}

impl Shared {
    /// Sends `event` to the webhook, if one is configured (never blocks).
    pub fn alert(&self, event: Event) {
        if let Some(alerts) = &self.alerts {
            alerts.notify(event);
        }
    }

    /// The shared state of a freshly started gateway, its response cache sharing entries
    /// through `cache_shared` when given.
    pub fn new(
        config: &Config,
        cache_shared: Option<Arc<dyn SharedStore>>,
    ) -> Result<Shared, String> {
        let metrics = Metrics::new().map_err(|e| format!("cannot set up metrics: {e}"))?;
        let alerts = match &config.alerts {
            Some(a) => Some(Alerts::new(a.clone()).map_err(|e| format!("alerts: {e}"))?),
            None => None,
        };
        Ok(Shared {
            runtime: ArcSwap::from_pointee(Runtime::new(config, cache_shared.clone())),
            affinity: Affinity::new(AFFINITY_CAPACITY),
            uploads: Uploads::new(UPLOADS_CAPACITY),
            started: config.clone(),
            upstreams_changed: tokio::sync::watch::Sender::new(()),
            metrics,
            alerts,
            body_budget: BodyBudget::new(config.client_limits.max_buffered_body_bytes),
            fleet: std::sync::OnceLock::new(),
            quota_events: Recent::new(QUOTA_EVENTS),
            limits: std::sync::OnceLock::new(),
            owners: std::sync::OnceLock::new(),
            probes: std::sync::OnceLock::new(),
            series: std::sync::OnceLock::new(),
            cache_shared,
            counters: std::sync::OnceLock::new(),
        })
    }
}

/// How long the check loop sleeps while health checks are turned off (a reload wakes it).
const CHECKS_OFF: Duration = Duration::from_secs(3600);

/// The background service that keeps the upstreams of the runtime in force looked up (every
/// 30 s, a failed lookup again after 2 s) and their addresses health-checked (every
/// `upstream_health_check_seconds`), so upstreams a reload brings in get both at once. Two
/// loops, so a slow check never delays a lookup nor the other way round.
pub struct UpstreamKeeper {
    shared: Arc<Shared>,
}

impl UpstreamKeeper {
    /// A keeper for the upstreams of `shared`'s runtime.
    pub fn new(shared: Arc<Shared>) -> UpstreamKeeper {
        UpstreamKeeper { shared }
    }

    /// Looks every host name up once; false if any lookup failed.
    async fn refresh_all(&self) -> bool {
        let upstreams: Vec<Arc<Upstream>> = self
            .shared
            .runtime
            .load()
            .upstreams()
            .into_iter()
            .filter(|u| u.needs_dns())
            .collect();
        let mut all_ok = true;
        for u in &upstreams {
            all_ok &= u.refresh().await;
        }
        all_ok
    }

    /// One connect check of every address of every upstream, the upstreams side by side.
    async fn check_all(&self) {
        let mut passes = tokio::task::JoinSet::new();
        for u in self.shared.runtime.load().upstreams() {
            passes.spawn(async move { u.check_health().await });
        }
        while passes.join_next().await.is_some() {}
    }

    async fn lookups(&self, mut shutdown: ShutdownWatch) {
        let mut changed = self.shared.upstreams_changed.subscribe();
        loop {
            let wait = tokio::select! {
                ok = self.refresh_all() => if ok { upstream::REFRESH } else { upstream::RETRY_FAILED },
                _ = shutdown.changed() => return,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Ok(()) = changed.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    async fn checks(&self, mut shutdown: ShutdownWatch) {
        let mut changed = self.shared.upstreams_changed.subscribe();
        loop {
            let interval = self.shared.runtime.load().upstream_health_check;
            if !interval.is_zero() {
                tokio::select! {
                    _ = self.check_all() => {}
                    _ = shutdown.changed() => return,
                }
            }
            let wait = if interval.is_zero() {
                CHECKS_OFF
            } else {
                interval
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                Ok(()) = changed.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[async_trait]
impl BackgroundService for UpstreamKeeper {
    async fn start(&self, shutdown: ShutdownWatch) {
        tokio::join!(self.lookups(shutdown.clone()), self.checks(shutdown));
    }
}
