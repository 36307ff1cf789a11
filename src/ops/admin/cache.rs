//! The admin API's view of the response cache: what it holds, and purging it (everything, or
//! one tenant's entries).

use super::{error, Admin, Answer};
use http::StatusCode;
use serde_json::json;

impl Admin {
    /// `GET /admin/cache`: the settings and the memory used, in bytes as the cache counts them
    /// (entries and answers still being recorded).
    pub(super) fn cache(&self) -> Answer {
        let rt = self.shared.runtime.load();
        let Some(cache) = &rt.cache else {
            return error(
                StatusCode::NOT_FOUND,
                "the response cache is off (no cache: section)",
            );
        };
        let config = cache.config();
        let usage = cache.usage();
        Answer(
            StatusCode::OK,
            json!({
                "ttl_seconds": config.ttl.as_secs(),
                "capacity_bytes": usage.capacity,
                "max_entry_bytes": config.max_entry_bytes(),
                "bytes_used": usage.bytes,
                "recording_bytes": usage.recording_bytes,
                "entries": usage.entries,
            }),
        )
    }

    /// `DELETE /admin/cache` (everything) or `DELETE /admin/cache/tenants/{name}` (the entries
    /// kept for that tenant). Entries of pools with `cache_shared_across_tenants` belong to no
    /// tenant (all of its tenants read them): only a purge of everything removes them, and a
    /// tenant's purge says so. With Redis, the entries there go too, and the other instances
    /// drop theirs from memory.
    pub(super) async fn purge_cache(&self, tenant: Option<&str>) -> Answer {
        let rt = self.shared.runtime.load_full();
        let Some(cache) = &rt.cache else {
            return error(
                StatusCode::NOT_FOUND,
                "the response cache is off (no cache: section)",
            );
        };
        if let Some(name) = tenant {
            if rt.tenants.by_name(name).is_none() {
                return error(StatusCode::NOT_FOUND, format!("no tenant named '{name}'"));
            }
        }
        let purged = match cache.purge(tenant).await {
            Ok(p) => p,
            Err(fault) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the cache could not be purged: {fault}"),
                )
            }
        };
        let shared_pools: Vec<&str> = rt
            .pools
            .iter()
            .filter(|p| p.config.cache_shared_across_tenants)
            .map(|p| p.name())
            .collect();
        let mut body = json!({
            "purged": purged.here,
            "tenant": tenant,
            "bytes_used": cache.usage().bytes,
        });
        if tenant.is_some() && !shared_pools.is_empty() {
            body["shared_pools_kept"] = json!(shared_pools);
            body["note"] = json!("entries of pools with cache_shared_across_tenants belong to no tenant and are kept; DELETE /admin/cache purges them");
        }
        match purged.shared {
            None => Answer(StatusCode::OK, body),
            Some(Ok(n)) => {
                body["purged_in_redis"] = json!(n);
                Answer(StatusCode::OK, body)
            }
            Some(Err(why)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} entries purged from this instance's memory, but not from Redis ({why}): entries there remain until they expire, and the other instances keep theirs; try again",
                    purged.here
                ),
            ),
        }
    }
}
