//! The admin API on keys: add and remove them, disable, enable, clear cooldowns, check.

use super::{error, rfc3339, Admin, Answer, NOT_PERSISTED};
use crate::config::KeyConfig;
use crate::ops::keycheck::{check_key, KeyCheck};
use crate::quota::keys::{CapReport, KeyId, KeyPool, KeyReport, Millis, Transition};
use crate::runtime::health::Cause;
use crate::runtime::Pool;
use crate::secret::Secret;
use http::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) fn check_json(keys: &KeyPool, id: KeyId, check: &KeyCheck) -> Value {
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

/// A key for `/admin/pools`, with its requests, prompt, output and total tokens `counts` (the
/// fleet's when instances share their state).
pub(super) fn key_json(k: &KeyReport, counts: [u64; 4], now: Millis) -> Value {
    let cooldowns: Vec<Value> = k
        .cooldowns
        .iter()
        .map(|c| {
            json!({
                "model": c.model,
                "until": rfc3339(c.until),
                "seconds_left": c.until.saturating_sub(now).div_ceil(1000),
                "kind": c.why.as_str(),
                "escalations": c.escalations,
            })
        })
        .collect();
    let state = match (k.disabled, k.capped, k.cooldowns.is_empty()) {
        (Some(_), _, _) => "disabled",
        (None, Some(_), _) => "capped",
        (None, None, false) => "cooling",
        (None, None, true) => "ok",
    };
    json!({
        "key": k.fingerprint,
        "project": k.project,
        "billing_account": k.billing_account,
        "note": k.note,
        "state": state,
        "reason": k.disabled.map(|d| d.as_str()).or(k.capped.map(|c| c.as_str())),
        "cooldowns": cooldowns,
        "blocked_methods": k.blocked_methods,
        "requests": counts[0],
        "prompt_tokens": counts[1],
        "output_tokens": counts[2],
        "total_tokens": counts[3],
    })
}

/// A cap on a project or billing account, for `/admin/pools`.
pub(super) fn cap_json(c: &CapReport, now: Millis) -> Value {
    json!({
        "scope": c.kind.scope().as_str(),
        "name": c.name,
        "state": "capped",
        "kind": c.kind.as_str(),
        "until": rfc3339(c.until),
        "seconds_left": c.until.saturating_sub(now).div_ceil(1000),
        "next_probe": c.next_probe.map(|t| rfc3339(t.max(now))),
    })
}

impl Admin {
    pub(super) fn add_key(&self, pool_name: &str, body: &[u8]) -> Answer {
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
        // A key pasted into the project field would be logged and shown as the project.
        let configs = old.key_configs();
        let mut keys: Vec<&str> = configs.iter().map(|c| c.secret.expose()).collect();
        keys.push(key);
        if crate::config::quotes_a_key(&project, &keys) {
            return error(
                StatusCode::BAD_REQUEST,
                "project holds an API key; name the key's project instead",
            );
        }
        if old.find(&fingerprint).is_some() {
            return error(
                StatusCode::CONFLICT,
                format!("{fingerprint} is already in pool '{pool_name}'"),
            );
        }
        let mut configs = configs;
        // A key added at run time joins its project's billing account, if the pool knows one.
        let billing_account = configs
            .iter()
            .find(|c| c.project == project)
            .and_then(|c| c.billing_account.clone());
        configs.push(KeyConfig {
            secret,
            project: project.clone(),
            billing_account,
            note: Some("added through the admin API: runtime only".into()),
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

    pub(super) fn remove_key(&self, pool_name: &str, fp: &str) -> Answer {
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

    pub(super) async fn key_action(
        &self,
        pool_name: &str,
        fp: &str,
        action: &str,
        body: &[u8],
    ) -> Answer {
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

    pub(super) async fn check_pool(&self, pool_name: &str) -> Answer {
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

    pub(super) fn find_key(
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
