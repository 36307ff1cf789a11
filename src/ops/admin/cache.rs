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
    /// kept for that tenant; those of pools that share entries belong to no tenant and go with
    /// everything).
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
        match cache.purge(tenant).await {
            Ok(purged) => Answer(
                StatusCode::OK,
                json!({
                    "purged": purged,
                    "tenant": tenant,
                    "bytes_used": cache.usage().bytes,
                }),
            ),
            Err(fault) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cache could not be purged: {fault}"),
            ),
        }
    }
}
