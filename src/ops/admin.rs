//! The admin API: its own listener, a token of its own, JSON in and out.
//!
//! Endpoints (all need `Authorization: Bearer <admin token>`):
//! - `GET  /admin/pools`: every pool and key: fingerprint, project, state, cooldowns, usage;
//! - `POST /admin/pools/{pool}/keys` `{"key": "...", "project": "..."}`: add a key;
//! - `DELETE /admin/pools/{pool}/keys/{fingerprint}`: remove a key;
//! - `POST /admin/pools/{pool}/keys/{fingerprint}/disable` | `/enable`: take out, put back;
//! - `POST /admin/pools/{pool}/keys/{fingerprint}/clear-cooldown` `{"model": "..."}` (optional
//!   model: all models when absent);
//! - `POST /admin/pools/{pool}/keys/{fingerprint}/check`, `POST /admin/pools/{pool}/check`: ask
//!   Google whether keys work (a model listing, no quota spent);
//! - `GET  /admin/tenants`: tenants with their limits and usage;
//! - `GET  /admin/resources`, `POST /admin/resources` `{"name": "files/abc", "project": "p1",
//!   "tenant": "alice"}` (`pool` optional), `DELETE /admin/resources/files/abc`: which project
//!   and tenant own a file, cache, batch...; binding one made outside keygate lets its tenant
//!   use it (keygate never searches the projects for a tenant).
//!
//! Keys are named by fingerprint (`key#1a2b3c4d5e6f`, or `1a2b3c4d5e6f` in a URL); a key never appears
//! in an answer. Every change says whether it survives a restart: added and removed keys do not
//! (keygate writes no keys anywhere; the config file is the place for lasting changes), while
//! disabling, enabling and clearing cooldowns are kept by the state file when one is configured.
//!
//! Without a token: `GET /healthz` (alive) and `GET /readyz` (upstreams resolved, a key enabled).
//! With it: `GET /metrics` (Prometheus) and `POST /admin/reload` (re-read the config file).

use crate::config::KeyConfig;
use crate::ops::keycheck::{check_key, KeyCheck};
use crate::ops::lifecycle::reload_and_log;
use crate::quota::keys::KeyReport;
use crate::quota::keys::{now_millis, KeyId, KeyPool, Millis, Transition};
use crate::runtime::health::Cause;
use crate::runtime::{Pool, Shared};
use crate::secret::{sha256, Secret};
use crate::telemetry::metrics::PoolGauge;
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Largest admin request body read.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// What every change answers about persistence.
const NOT_PERSISTED: &str =
    "runtime change only: lost on restart; put lasting changes in the config file";

/// The admin API service.
pub struct Admin {
    shared: Arc<Shared>,
    token_sha256: [u8; 32],
    config_path: PathBuf,
    /// Serialises key additions and removals: each replaces the pool's key set whole, so two at
    /// once would lose one. Held only for synchronous work.
    key_changes: std::sync::Mutex<()>,
}

impl Admin {
    /// The admin API over `shared`, accepting the token whose SHA-256 is `token_sha256`;
    /// `config_path` is what `POST /admin/reload` re-reads.
    pub fn new(shared: Arc<Shared>, token_sha256: [u8; 32], config_path: PathBuf) -> Admin {
        Admin {
            shared,
            token_sha256,
            config_path,
            key_changes: std::sync::Mutex::new(()),
        }
    }
}

/// An admin answer: status and JSON body.
struct Answer(StatusCode, Value);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer(status, json!({ "error": message.into() }))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, http: &mut ServerSession) -> Response<Vec<u8>> {
        let answer = self.handle(http).await;
        // The metrics text is the one answer that is not JSON.
        let (body, content_type) = match answer.1 {
            Value::String(text) if answer.0 == StatusCode::OK => (
                text.into_bytes(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            json => (
                serde_json::to_vec_pretty(&json).unwrap_or_default(),
                "application/json",
            ),
        };
        Response::builder()
            .status(answer.0)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .header("cache-control", "no-store")
            .body(body)
            .unwrap_or_default()
    }
}

impl Admin {
    async fn handle(&self, http: &mut ServerSession) -> Answer {
        // The header is in: its deadline is over. One request per connection keeps the admin
        // listener's slots for whoever needs them next.
        crate::gateway::guard::header_received(http.stream());
        http.set_keepalive(None);
        // Health endpoints are for load balancers and systemd: no token, nothing secret.
        match (
            http.req_header().method.as_str(),
            http.req_header().uri.path(),
        ) {
            ("GET", "/healthz") => return Answer(StatusCode::OK, json!({ "status": "alive" })),
            ("GET", "/readyz") => return self.readiness(),
            _ => {}
        }
        if !authorized(self.token_sha256, http) {
            http.set_keepalive(None);
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token (Authorization: Bearer <token>)",
            );
        }
        let method = http.req_header().method.clone();
        let path = http.req_header().uri.path().to_string();
        let body = match read_body(http).await {
            Ok(b) => b,
            Err(a) => return a,
        };
        let parts: Vec<&str> = path
            .trim_start_matches('/')
            .trim_end_matches('/')
            .split('/')
            .collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["admin", "pools"]) => Answer(StatusCode::OK, self.pools()),
            ("GET", ["metrics"]) => Answer(StatusCode::OK, Value::String(self.metrics())),
            ("GET", ["admin", "tenants"]) => Answer(StatusCode::OK, self.tenants()),
            ("POST", ["admin", "reload"]) => {
                match reload_and_log(&self.shared, &self.config_path) {
                    Ok(summary) => Answer(StatusCode::OK, json!({ "reloaded": summary })),
                    Err(e) => error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("reload refused, still serving the previous configuration: {e}"),
                    ),
                }
            }
            ("POST", ["admin", "pools", pool, "keys"]) => self.add_key(pool, &body),
            ("GET", ["admin", "resources"]) => Answer(StatusCode::OK, self.resources()),
            ("POST", ["admin", "resources"]) => self.bind_resource(&body),
            ("DELETE", ["admin", "resources", collection, id]) => {
                self.unbind_resource(&format!("{collection}/{id}"))
            }
            ("POST", ["admin", "pools", pool, "check"]) => self.check_pool(pool).await,
            ("DELETE", ["admin", "pools", pool, "keys", fp]) => self.remove_key(pool, fp),
            ("POST", ["admin", "pools", pool, "keys", fp, action]) => {
                self.key_action(pool, fp, action, &body).await
            }
            _ => error(
                StatusCode::NOT_FOUND,
                format!("no admin endpoint {method} {path}; see the README's admin API section"),
            ),
        }
    }

    /// The Prometheus text, with the key gauges taken from the health tables now.
    fn metrics(&self) -> String {
        let rt = self.shared.runtime.load();
        let now = now_millis();
        let gauges: Vec<PoolGauge> = rt
            .pools
            .iter()
            .map(|pool| {
                let report = pool.keys.load().report(now);
                let disabled = report.iter().filter(|k| k.disabled.is_some()).count();
                let cooling: Vec<&KeyReport> = report
                    .iter()
                    .filter(|k| k.disabled.is_none() && !k.cooldowns.is_empty())
                    .collect();
                let next = cooling
                    .iter()
                    .flat_map(|k| k.cooldowns.iter().map(|(_, until)| *until))
                    .min();
                PoolGauge {
                    pool: pool.name().to_string(),
                    keys_ok: report.len() - disabled - cooling.len(),
                    keys_cooling: cooling.len(),
                    keys_disabled: disabled,
                    seconds_to_recovery: next
                        .map_or(0.0, |t| t.saturating_sub(now) as f64 / 1000.0),
                }
            })
            .collect();
        self.shared.metrics.render(&gauges)
    }

    /// Ready when every pool's upstream has an address and at least one key can serve.
    fn readiness(&self) -> Answer {
        let rt = self.shared.runtime.load();
        let mut problems = Vec::new();
        let mut usable_keys = 0;
        for pool in &rt.pools {
            if let Some(problem) = pool.upstream.address_problem() {
                problems.push(format!("pool '{}': {problem}", pool.name()));
            }
            let keys = pool.keys.load();
            let usable = (0..keys.len())
                .filter(|&k| keys.disabled(KeyId(k as u32)).is_none())
                .count();
            if usable == 0 {
                problems.push(format!("pool '{}': no enabled key", pool.name()));
            }
            usable_keys += usable;
        }
        if usable_keys > 0 && rt.pools.iter().all(|p| p.upstream.is_resolved()) {
            Answer(
                StatusCode::OK,
                json!({ "status": "ready", "enabled_keys": usable_keys, "warnings": problems }),
            )
        } else {
            Answer(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "not ready", "problems": problems }),
            )
        }
    }

    fn pool(&self, name: &str) -> Result<Arc<Pool>, Answer> {
        let rt = self.shared.runtime.load();
        rt.pools
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .ok_or_else(|| error(StatusCode::NOT_FOUND, format!("no pool named '{name}'")))
    }

    fn pools(&self) -> Value {
        let rt = self.shared.runtime.load();
        let now = now_millis();
        let pools: Vec<Value> = rt
            .pools
            .iter()
            .map(|pool| {
                let keys = pool.keys.load();
                let list: Vec<Value> = keys.report(now).iter().map(|k| key_json(k, now)).collect();
                json!({
                    "name": pool.name(),
                    "upstream": pool.config.upstream.authority(),
                    "models": if pool.config.models.is_empty() { json!(["*"]) } else { json!(pool.config.models) },
                    "keys": list,
                })
            })
            .collect();
        json!({
            "pools": pools,
            "affinity_entries": self.shared.affinity.len(),
        })
    }

    fn tenants(&self) -> Value {
        let rt = self.shared.runtime.load();
        let tenants: Vec<Value> = rt
            .tenants
            .list()
            .iter()
            .map(|t| {
                let s = &t.state;
                let pools: Vec<&str> = t
                    .pools
                    .iter()
                    .filter_map(|&i| rt.pools.get(i).map(|p| p.name()))
                    .collect();
                json!({
                    "name": &*t.name,
                    "pools": pools,
                    "rpm": t.rpm,
                    "max_concurrent": t.max_concurrent,
                    "in_flight": s.in_flight(),
                    "requests": s.usage.requests.load(Relaxed),
                    "prompt_tokens": s.usage.prompt_tokens.load(Relaxed),
                    "output_tokens": s.usage.output_tokens.load(Relaxed),
                    "total_tokens": s.usage.total_tokens.load(Relaxed),
                    "refused": {
                        "rpm": s.refused_rate.load(Relaxed),
                        "max_concurrent": s.refused_concurrency.load(Relaxed),
                        "fair_share": s.refused_fair_share.load(Relaxed),
                    },
                })
            })
            .collect();
        json!({ "tenants": tenants })
    }

    /// Every resource keygate knows the owner of.
    fn resources(&self) -> Value {
        let now = now_millis();
        let list: Vec<Value> = self
            .shared
            .affinity
            .entries(now)
            .into_iter()
            .map(|(name, owner, expires)| {
                json!({
                    "name": name,
                    "pool": &*owner.pool,
                    "project": &*owner.project,
                    "tenant": owner.tenant.as_deref(),
                    "expires": rfc3339(expires),
                })
            })
            .collect();
        json!({ "resources": list })
    }

    /// Binds a resource made outside keygate (or forgotten by it) to a project and a tenant, so
    /// that the tenant's requests naming it go to that project. keygate never searches the
    /// projects for a resource on a tenant's behalf: an operator says whose it is.
    fn bind_resource(&self, body: &[u8]) -> Answer {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Binding {
            name: String,
            project: String,
            tenant: Option<String>,
            pool: Option<String>,
        }
        let b: Binding = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected {{\"name\": \"files/abc\", \"project\": \"...\", \"tenant\": \"...\", \"pool\": \"...\"}} (pool optional; tenant required when tenants are configured): invalid JSON at line {} column {}",
                        e.line(),
                        e.column()
                    ),
                )
            }
        };
        let name = b.name.trim().to_string();
        if crate::wire::names::kind_of(&name).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "'{name}' is not a resource name keygate binds: files/ID, cachedContents/ID, tunedModels/ID, batches/ID or operations/ID"
                ),
            );
        }
        let rt = self.shared.runtime.load();
        let tenant = match (&b.tenant, rt.tenants.list().is_empty()) {
            (None, true) => None,
            (Some(_), true) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "no tenants are configured: leave out \"tenant\"",
                )
            }
            (None, false) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "tenants are configured: say whose resource it is (\"tenant\")",
                )
            }
            (Some(t), false) => match rt.tenants.by_name(t) {
                Some(t) => Some(t.clone()),
                None => return error(StatusCode::NOT_FOUND, format!("no tenant named '{t}'")),
            },
        };
        let holds = |i: &usize| rt.pools[*i].keys.load().project_index(&b.project).is_some();
        let candidates: Vec<usize> = match &b.pool {
            Some(p) => match rt.pool_index(p) {
                Some(i) => vec![i],
                None => return error(StatusCode::NOT_FOUND, format!("no pool named '{p}'")),
            },
            None => (0..rt.pools.len()).collect(),
        };
        let found: Vec<usize> = candidates.into_iter().filter(holds).collect();
        let i = match found.as_slice() {
            [i] => *i,
            [] => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no pool has keys of project '{}'", b.project),
                )
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "project '{}' has keys in several pools: say which (\"pool\")",
                        b.project
                    ),
                )
            }
        };
        if let Some(t) = &tenant {
            if !t.pools.contains(&i) {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "tenant '{}' may not use pool '{}'",
                        t.name,
                        rt.pools[i].name()
                    ),
                );
            }
        }
        let pool = rt.pools[i].name().to_string();
        let owner = crate::quota::affinity::Owner {
            pool: Arc::from(pool.as_str()),
            project: Arc::from(b.project.as_str()),
            tenant: tenant.as_ref().map(|t| t.name.clone()),
        };
        let now = now_millis();
        self.shared.affinity.bind(&name, owner, now);
        let expires = self
            .shared
            .affinity
            .entries(now)
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, at)| rfc3339(at));
        log::warn!(
            "admin: bound {name} to project {} of pool {pool}{}",
            b.project,
            tenant
                .as_ref()
                .map(|t| format!(", tenant {}", t.name))
                .unwrap_or_default()
        );
        let saved = self.shared.started.state_file.is_some();
        Answer(
            StatusCode::CREATED,
            json!({
                "name": name,
                "pool": pool,
                "project": b.project,
                "tenant": tenant.as_ref().map(|t| &*t.name),
                "expires": expires,
                "survives_restart": saved,
            }),
        )
    }

    fn unbind_resource(&self, name: &str) -> Answer {
        let known = self.shared.affinity.owner(name, now_millis()).is_some();
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                format!("keygate knows no owner of '{name}'"),
            );
        }
        self.shared.affinity.forget(name);
        log::warn!("admin: forgot the owner of {name}");
        Answer(StatusCode::OK, json!({ "forgotten": name }))
    }

    fn add_key(&self, pool_name: &str, body: &[u8]) -> Answer {
        let pool = match self.pool(pool_name) {
            Ok(p) => p,
            Err(a) => return a,
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NewKey {
            key: String,
            project: Option<String>,
        }
        let new: NewKey = match serde_json::from_slice(body) {
            Ok(k) => k,
            Err(e) => {
                // serde_json quotes offending values: say where, never what.
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "expected {{\"key\": \"...\", \"project\": \"...\"}} (project optional): invalid JSON at line {} column {}",
                        e.line(),
                        e.column()
                    ),
                );
            }
        };
        let key = new.key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return error(
                StatusCode::BAD_REQUEST,
                "a key must be non-empty visible ASCII",
            );
        }
        let secret = Secret::new(key);
        let fingerprint = secret.fingerprint();
        let project = match new.project.as_deref().map(str::trim) {
            Some("") => return error(StatusCode::BAD_REQUEST, "project must not be empty"),
            Some(p) => p.to_string(),
            None => fingerprint.clone(),
        };
        let _serial = self.key_changes.lock().unwrap_or_else(|e| e.into_inner());
        let old = pool.keys.load_full();
        if old.find(&fingerprint).is_some() {
            return error(
                StatusCode::CONFLICT,
                format!("{fingerprint} is already in pool '{pool_name}'"),
            );
        }
        let mut configs = old.key_configs();
        configs.push(KeyConfig {
            secret,
            project: project.clone(),
        });
        pool.keys.store(Arc::new(old.rebuilt(&configs)));
        log::warn!("admin: added {fingerprint} (project {project}) to pool {pool_name}");
        Answer(
            StatusCode::CREATED,
            json!({
                "added": fingerprint,
                "pool": pool_name,
                "project": project,
                "survives_restart": false,
                "note": NOT_PERSISTED,
            }),
        )
    }

    fn remove_key(&self, pool_name: &str, fp: &str) -> Answer {
        let _serial = self.key_changes.lock().unwrap_or_else(|e| e.into_inner());
        let (pool, old, id) = match self.find_key(pool_name, fp) {
            Ok(found) => found,
            Err(a) => return a,
        };
        let fingerprint = old.key(id).fingerprint.clone();
        let configs: Vec<KeyConfig> = old
            .key_configs()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != id.0 as usize)
            .map(|(_, k)| k)
            .collect();
        pool.keys.store(Arc::new(old.rebuilt(&configs)));
        log::warn!("admin: removed {fingerprint} from pool {pool_name}");
        Answer(
            StatusCode::OK,
            json!({
                "removed": fingerprint,
                "pool": pool_name,
                "keys_left": configs.len(),
                "survives_restart": false,
                "note": NOT_PERSISTED,
            }),
        )
    }

    async fn key_action(&self, pool_name: &str, fp: &str, action: &str, body: &[u8]) -> Answer {
        let (pool, keys, id) = match self.find_key(pool_name, fp) {
            Ok(found) => found,
            Err(a) => return a,
        };
        let fingerprint = keys.key(id).fingerprint.clone();
        let done = match action {
            "disable" => {
                self.shared
                    .change_health(&keys, id, Transition::Disable, Cause::Operator);
                log::warn!("admin: disabled {fingerprint} in pool {pool_name}");
                json!({ "disabled": fingerprint })
            }
            "enable" => {
                self.shared
                    .change_health(&keys, id, Transition::Enable, Cause::Operator);
                log::warn!("admin: enabled {fingerprint} in pool {pool_name}");
                json!({ "enabled": fingerprint })
            }
            "clear-cooldown" => {
                let model = serde_json::from_slice::<Value>(body)
                    .ok()
                    .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_string))
                    .map(|m| m.trim_start_matches("models/").to_string());
                let clear = Transition::ClearCooldowns {
                    model: model.as_deref(),
                };
                let cleared = self
                    .shared
                    .change_health(&keys, id, clear, Cause::Operator)
                    .cooldowns_ended;
                log::warn!(
                    "admin: cleared {cleared} cooldown(s) of {fingerprint}'s project in pool {pool_name}"
                );
                json!({
                    "cleared": cleared,
                    "project": keys.project_name(keys.key(id).project),
                    "model": model,
                })
            }
            "check" => {
                let timeouts = self.shared.runtime.load().timeouts;
                let check = check_key(&self.shared, &pool, &keys, id, timeouts).await;
                return Answer(
                    StatusCode::OK,
                    json!({ "checks": [check_json(&keys, id, &check)] }),
                );
            }
            other => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("unknown key action '{other}': disable, enable, clear-cooldown, check"),
                )
            }
        };
        // Disabled keys and cooldowns are part of the health table, which the state file keeps.
        let saved = self.shared.started.state_file.is_some();
        let mut done = done;
        done["pool"] = json!(pool_name);
        done["survives_restart"] = json!(saved);
        done["note"] = json!(if saved {
            "kept across reloads, and across restarts through the state file"
        } else {
            "kept across reloads; lost on restart (no state_file is configured)"
        });
        Answer(StatusCode::OK, done)
    }

    async fn check_pool(&self, pool_name: &str) -> Answer {
        let pool = match self.pool(pool_name) {
            Ok(p) => p,
            Err(a) => return a,
        };
        let keys = pool.keys.load_full();
        let timeouts = self.shared.runtime.load().timeouts;
        let mut checks = Vec::with_capacity(keys.len());
        for k in 0..keys.len() {
            let id = KeyId(k as u32);
            let check = check_key(&self.shared, &pool, &keys, id, timeouts).await;
            checks.push(check_json(&keys, id, &check));
        }
        Answer(StatusCode::OK, json!({ "checks": checks }))
    }

    fn find_key(
        &self,
        pool_name: &str,
        fp: &str,
    ) -> Result<(Arc<Pool>, Arc<KeyPool>, KeyId), Answer> {
        let pool = self.pool(pool_name)?;
        let keys = pool.keys.load_full();
        let fp = fp.replace("%23", "#");
        let id = keys.find(&fp).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("no key with fingerprint '{fp}' in pool '{pool_name}'"),
            )
        })?;
        Ok((pool, keys, id))
    }
}

fn check_json(keys: &KeyPool, id: KeyId, check: &KeyCheck) -> Value {
    let result = match check {
        KeyCheck::Alive => "ok".to_string(),
        KeyCheck::Dead(reason) => reason.as_str().to_string(),
        KeyCheck::Inconclusive(label) => format!("inconclusive: {label}"),
    };
    json!({
        "key": keys.key(id).fingerprint,
        "result": result,
        "state": keys.disabled(id).map_or("enabled", |d| d.as_str()),
    })
}

fn key_json(k: &KeyReport, now: Millis) -> Value {
    let cooldowns: Vec<Value> = k
        .cooldowns
        .iter()
        .map(|(model, until)| {
            json!({
                "model": model,
                "until": rfc3339(*until),
                "seconds_left": until.saturating_sub(now).div_ceil(1000),
            })
        })
        .collect();
    let state = match (k.disabled, k.cooldowns.is_empty()) {
        (Some(_), _) => "disabled",
        (None, false) => "cooling",
        (None, true) => "ok",
    };
    json!({
        "key": k.fingerprint,
        "project": k.project,
        "state": state,
        "reason": k.disabled.map(|d| d.as_str()),
        "cooldowns": cooldowns,
        "blocked_methods": k.blocked_methods,
        "requests": k.usage.requests.load(Relaxed),
        "prompt_tokens": k.usage.prompt_tokens.load(Relaxed),
        "output_tokens": k.usage.output_tokens.load(Relaxed),
        "total_tokens": k.usage.total_tokens.load(Relaxed),
    })
}

fn rfc3339(ms: Millis) -> String {
    Utc.timestamp_millis_opt(ms.min(i64::MAX as u64) as i64)
        .single()
        .map_or_else(String::new, |t| t.to_rfc3339())
}

/// Whether the request carries the admin token. Digests are compared in constant time
/// (`subtle` keeps the optimiser from turning the comparison into an early exit).
fn authorized(expected: [u8; 32], http: &ServerSession) -> bool {
    use subtle::ConstantTimeEq;
    let Some(token) = crate::wire::request::bearer_token(&http.req_header().headers) else {
        return false;
    };
    sha256(token).ct_eq(&expected).into()
}

async fn read_body(http: &mut ServerSession) -> Result<Vec<u8>, Answer> {
    let mut body = Vec::new();
    loop {
        match http.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_ADMIN_BODY {
                    http.set_keepalive(None);
                    return Err(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "admin request body too large",
                    ));
                }
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                http.set_keepalive(None);
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {}", e.etype().as_str()),
                ));
            }
        }
    }
}

/// Checks every key on a slow schedule, so dead keys are found before a request needs them and
/// recovered ones come back.
pub struct KeyChecker {
    shared: Arc<Shared>,
    interval: Duration,
}

impl KeyChecker {
    /// A checker running every `interval`.
    pub fn new(shared: Arc<Shared>, interval: Duration) -> KeyChecker {
        KeyChecker { shared, interval }
    }
}

/// Pause between two keys' checks, so a large pool is not checked in one burst.
const BETWEEN_CHECKS: Duration = Duration::from_millis(500);

#[async_trait]
impl BackgroundService for KeyChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
            // The keys to check, by name: each is looked up again when its turn comes, so a
            // check lands in the pool as it is then (after a reload or an admin change).
            let todo: Vec<(String, String)> = self
                .shared
                .runtime
                .load()
                .pools
                .iter()
                .flat_map(|pool| {
                    let keys = pool.keys.load();
                    (0..keys.len())
                        .map(|k| {
                            (
                                pool.name().to_string(),
                                keys.key(KeyId(k as u32)).fingerprint.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            for (pool_name, fingerprint) in todo {
                let rt = self.shared.runtime.load_full();
                let Some(pool) = rt.pools.iter().find(|p| p.name() == pool_name) else {
                    continue;
                };
                let keys = pool.keys.load_full();
                if let Some(id) = keys.find(&fingerprint) {
                    check_key(&self.shared, pool, &keys, id, rt.timeouts).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(BETWEEN_CHECKS) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
