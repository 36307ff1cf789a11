//! The admin API on resources: which project and tenant own a file, cache, batch...

use super::{error, rfc3339, Admin, Answer};
use crate::quota::keys::now_millis;
use http::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;

impl Admin {
    /// Every resource keygate knows the owner of.
    pub(super) fn resources(&self) -> Value {
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
    pub(super) fn bind_resource(&self, body: &[u8]) -> Answer {
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
        self.shared.bind(&name, owner, now);
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

    pub(super) fn unbind_resource(&self, name: &str) -> Answer {
        let known = self.shared.affinity.owner(name, now_millis()).is_some();
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                format!("keygate knows no owner of '{name}'"),
            );
        }
        self.shared.forget(name);
        log::warn!("admin: forgot the owner of {name}");
        Answer(StatusCode::OK, json!({ "forgotten": name }))
    }
}
