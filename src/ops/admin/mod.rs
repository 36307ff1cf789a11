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
//! - `GET  /admin/tenants`: tenants with their limits and usage (cache hits apart);
//! - `GET  /admin/usage?minutes=60&step=1`: requests and tokens per key and per tenant, per
//!   minute over the last day (or in points of `step` minutes);
//! - `GET  /admin/events`: the most recent quota events and the alerts sent;
//! - `GET  /admin/cache`: the response cache's settings and bytes used; `DELETE /admin/cache`
//!   purges it, `DELETE /admin/cache/tenants/{name}` one tenant's entries;
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
//! Without a token: `GET /healthz` (alive), `GET /readyz` (upstreams resolved, a key enabled),
//! and the dashboard's page and files (`GET /`, no data: it asks for the token).
//! With it: `GET /metrics` (Prometheus) and `POST /admin/reload` (re-read the config file).

mod activity;
mod cache;
mod keys;
use crate::ops::dashboard;
use crate::ops::lifecycle::reload_and_log;
use crate::quota::keys::series::SeriesOf;
use crate::quota::keys::{now_millis, KeyId, KeyReport, Millis};
use crate::runtime::{Pool, Shared};
use crate::secret::sha256;
use crate::telemetry::metrics::{CacheGauge, PoolGauge};
use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use http::{Response, StatusCode};
use keys::{cap_json, key_json};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
mod resources;

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
        let head = http.req_header();
        if head.method == http::Method::GET {
            if let Some(asset) = dashboard::asset(head.uri.path()) {
                crate::gateway::guard::header_received(http.stream());
                http.set_keepalive(None);
                return reply(StatusCode::OK, asset.content_type, asset.body.to_vec());
            }
        }
        // The usage series are long lists of numbers: one per line would multiply their size.
        let compact = head.uri.path() == "/admin/usage";
        let answer = self.handle(http).await;
        // The metrics text is the one answer that is not JSON.
        let (body, content_type) = match answer.1 {
            Value::String(text) if answer.0 == StatusCode::OK => (
                text.into_bytes(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            json if compact => (
                serde_json::to_vec(&json).unwrap_or_default(),
                "application/json",
            ),
            json => (
                serde_json::to_vec_pretty(&json).unwrap_or_default(),
                "application/json",
            ),
        };
        reply(answer.0, content_type, body)
    }
}

/// An admin answer with the dashboard's security headers (and no CORS header).
fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len());
    for (name, value) in dashboard::SECURITY_HEADERS {
        builder = builder.header(name, value);
    }
    builder.body(body).unwrap_or_default()
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
        let query = http.req_header().uri.query().map(str::to_string);
        let body = match read_body(http).await {
            Ok(b) => b,
            Err(a) => return a,
        };
        // Segments %-decoded after the split: a pool or tenant named `team a` arrives as
        // `team%20a` from the dashboard (encodeURIComponent) and from curl users.
        let segments: Vec<std::borrow::Cow<'_, str>> = path
            .trim_start_matches('/')
            .trim_end_matches('/')
            .split('/')
            .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy())
            .collect();
        let parts: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["admin", "pools"]) => Answer(StatusCode::OK, self.pools()),
            ("GET", ["admin", "usage"]) => self.usage(query.as_deref()).await,
            ("GET", ["admin", "events"]) => self.events(),
            ("GET", ["metrics"]) => Answer(StatusCode::OK, Value::String(self.metrics())),
            ("GET", ["admin", "tenants"]) => Answer(StatusCode::OK, self.tenants()),
            ("GET", ["admin", "cache"]) => self.cache(),
            ("DELETE", ["admin", "cache"]) => self.purge_cache(None).await,
            ("DELETE", ["admin", "cache", "tenants", name]) => self.purge_cache(Some(name)).await,
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
                    .flat_map(|k| k.cooldowns.iter().map(|c| c.until))
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
        if let Some(fleet) = self.shared.fleet.get() {
            self.shared.metrics.redis_up(fleet.is_up());
        }
        let cache = rt.cache.as_ref().map(|c| {
            let u = c.usage();
            CacheGauge {
                bytes: u.bytes,
                recording_bytes: u.recording_bytes,
                entries: u.entries,
                capacity: u.capacity,
            }
        });
        self.shared.metrics.render(&gauges, cache)
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
        // Redis down is a warning, not a problem: the instance serves from its own table.
        let redis = self
            .shared
            .fleet
            .get()
            .map(|f| if f.is_up() { "up" } else { "down" });
        if redis == Some("down") {
            problems.push("redis: down; serving from this instance's own table".into());
        }
        if usable_keys > 0 && rt.pools.iter().all(|p| p.upstream.is_resolved()) {
            Answer(
                StatusCode::OK,
                json!({ "status": "ready", "enabled_keys": usable_keys, "warnings": problems, "redis": redis }),
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
        let mut shared = self.shared.counters.get().is_some();
        let pools: Vec<Value> = rt
            .pools
            .iter()
            .map(|pool| {
                let keys = pool.keys.load();
                let list: Vec<Value> = keys
                    .report(now)
                    .iter()
                    .map(|k| {
                        let of = SeriesOf::Key {
                            pool: pool.name(),
                            fingerprint: &k.fingerprint,
                        };
                        let (counts, fleet) = self.shared.usage_counts(of, &k.usage);
                        shared &= fleet;
                        key_json(k, counts, now)
                    })
                    .collect();
                let caps: Vec<Value> = keys.caps(now).iter().map(|c| cap_json(c, now)).collect();
                json!({
                    "name": pool.name(),
                    "upstream": pool.config.upstream.authority(),
                    "models": if pool.config.models.is_empty() { json!(["*"]) } else { json!(pool.config.models) },
                    "caps": caps,
                    "keys": list,
                })
            })
            .collect();
        json!({
            "pools": pools,
            "affinity_entries": self.shared.affinity.len(),
            // Whether health is shared with other instances (a `redis:` section), and whether
            // the store answers now.
            "health_shared": self.shared.fleet.get().map(|f| json!({ "through": "redis", "up": f.is_up() })),
            // Whether the keys' request and token counts are the fleet's, or this instance's.
            "shared": shared,
        })
    }

    fn tenants(&self) -> Value {
        let rt = self.shared.runtime.load();
        let mut shared = self.shared.counters.get().is_some();
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
                let (counts, fleet) = self
                    .shared
                    .usage_counts(SeriesOf::Tenant(&t.name), &s.usage);
                shared &= fleet;
                json!({
                    "name": &*t.name,
                    "pools": pools,
                    "rpm": t.rpm,
                    "max_concurrent": t.max_concurrent,
                    "in_flight": s.in_flight(),
                    "requests": counts[0],
                    "prompt_tokens": counts[1],
                    "output_tokens": counts[2],
                    "total_tokens": counts[3],
                    "refused": {
                        "rpm": s.refused_rate.load(Relaxed),
                        "max_concurrent": s.refused_concurrency.load(Relaxed),
                        "fair_share": s.refused_fair_share.load(Relaxed),
                    },
                    "cache": {
                        "hits": s.cache.hits.load(Relaxed),
                        "misses": s.cache.misses.load(Relaxed),
                        "hit_bytes": s.cache.hit_bytes.load(Relaxed),
                        "saved_tokens": s.cache.saved_tokens.load(Relaxed),
                    },
                })
            })
            .collect();
        // Whether requests and tokens are the fleet's (Redis answers) or this instance's; the
        // other figures (in flight, refusals, cache) are always this instance's.
        json!({ "tenants": tenants, "shared": shared })
    }
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
