//! The state file: what keygate learned about its keys (cooldowns, disabled keys and projects,
//! blocked methods) and which project owns which resource, saved so that a restart or an
//! upgrade does not send requests to keys Google already refused.
//!
//! Written atomically (a temporary file, flushed to disk, then renamed over the old one) every
//! [`SAVE_EVERY`] and at shutdown. Keys never go into it: entries name keys by fingerprint and
//! projects by name. Loading is forgiving: a missing, unreadable, corrupt or stale file is a
//! warning and keygate starts clean.

use crate::quota::affinity::Owner;
use crate::quota::keys::{now_millis, Millis, PoolHealth};
use crate::runtime::Shared;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the state is saved while running.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);

/// A state file older than this is ignored: too much has changed since.
const STALE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// Format version; a file of another version is ignored with a warning.
const VERSION: u32 = 1;

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// Format version.
    pub version: u32,
    /// When it was written (ms since the epoch).
    pub written_at: Millis,
    /// Each pool's health table, by pool name.
    pub pools: BTreeMap<String, PoolHealth>,
    /// Resources and their owners.
    pub affinity: Vec<SavedOwner>,
}

/// One affinity entry.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedOwner {
    /// The resource (`files/abc`).
    pub name: String,
    /// Its pool.
    pub pool: String,
    /// Its project.
    pub project: String,
    /// The tenant that made it.
    pub tenant: Option<String>,
    /// When the entry expires.
    pub expires_at: Millis,
}

/// Collects what `shared` knows now.
pub fn snapshot(shared: &Shared, now: Millis) -> StateFile {
    let rt = shared.runtime.load();
    StateFile {
        version: VERSION,
        written_at: now,
        pools: rt
            .pools
            .iter()
            .map(|p| (p.name().to_string(), p.keys.load().export(now)))
            .collect(),
        affinity: shared
            .affinity
            .entries(now)
            .into_iter()
            .map(|(name, owner, expires_at)| SavedOwner {
                name,
                pool: owner.pool.to_string(),
                project: owner.project.to_string(),
                tenant: owner.tenant.map(|t| t.to_string()),
                expires_at,
            })
            .collect(),
    }
}

/// Writes `state` to `path` atomically, readable by the owner only.
pub fn save(path: &Path, state: &StateFile) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads the state file; `Err` says why it cannot be used (the caller warns and starts clean).
pub fn load(path: &Path, now: Millis) -> Result<StateFile, String> {
    let text = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "it does not exist yet".to_string(),
        kind => format!("it cannot be read ({kind})"),
    })?;
    let state: StateFile = serde_json::from_slice(&text)
        .map_err(|e| format!("it is not a keygate state file ({e})"))?;
    if state.version != VERSION {
        return Err(format!(
            "it has format version {}, this keygate reads version {VERSION}",
            state.version
        ));
    }
    if now.saturating_sub(state.written_at) > STALE_AFTER.as_millis() as Millis {
        return Err("it is more than 7 days old".to_string());
    }
    Ok(state)
}

/// Applies a loaded state to `shared`; returns (health entries, affinity entries) applied.
pub fn apply(shared: &Shared, state: &StateFile, now: Millis) -> (usize, usize) {
    let rt = shared.runtime.load();
    let ceiling = cooldown_ceiling(now);
    let mut health = 0;
    for pool in &rt.pools {
        if let Some(saved) = state.pools.get(pool.name()) {
            health += pool.keys.load().import(saved, now, ceiling);
        }
    }
    let entries: Vec<(String, Owner, Millis)> = state
        .affinity
        .iter()
        .filter(|e| rt.pool_index(&e.pool).is_some())
        .map(|e| {
            (
                e.name.clone(),
                Owner {
                    pool: Arc::from(e.pool.as_str()),
                    project: Arc::from(e.project.as_str()),
                    tenant: e.tenant.as_deref().map(Arc::from),
                },
                e.expires_at,
            )
        })
        .collect();
    let before = shared.affinity.len();
    shared.affinity.restore(entries, now);
    (health, shared.affinity.len().saturating_sub(before))
}

/// The furthest a restored cooldown may reach: the longest one keygate sets itself, a per-day
/// quota's (the next midnight in Los Angeles) or a per-minute one's cap, whichever is later.
fn cooldown_ceiling(now: Millis) -> Millis {
    let now_utc = chrono::DateTime::from_timestamp_millis(i64::try_from(now).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let midnight = crate::quota::classify::next_midnight_los_angeles(now_utc).timestamp_millis();
    let short =
        now.saturating_add(crate::quota::classify::MAX_SHORT_COOLDOWN.as_millis() as Millis);
    u64::try_from(midnight).unwrap_or(0).max(short)
}

/// Loads and applies the state file at start, logging what happened; never fails.
pub fn restore(shared: &Shared, path: &Path) {
    let now = now_millis();
    match load(path, now) {
        Ok(state) => {
            let (health, owners) = apply(shared, &state, now);
            log::info!(
                "state file {}: restored {health} health entries and {owners} resource owners",
                path.display()
            );
        }
        Err(why) => log::warn!(
            "state file {}: not used because {why}; starting with a clean health table",
            path.display()
        ),
    }
}

/// Saves the state now, logging a failure.
pub fn save_now(shared: &Shared, path: &Path) {
    if let Err(e) = save(path, &snapshot(shared, now_millis())) {
        log::warn!("cannot write the state file {}: {e}", path.display());
    }
}

/// Saves the state file on a schedule; the final save happens after the server stops.
pub struct StateKeeper {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl StateKeeper {
    /// A keeper saving `shared` to `path`.
    pub fn new(shared: Arc<Shared>, path: PathBuf) -> StateKeeper {
        StateKeeper { shared, path }
    }
}

#[async_trait]
impl BackgroundService for StateKeeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SAVE_EVERY) => save_now(&self.shared, &self.path),
                // At shutdown, save at once (requests still draining may add more; the last
                // save runs after they are done).
                _ = shutdown.changed() => {
                    save_now(&self.shared, &self.path);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_old_or_foreign_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(load(&path, 1).unwrap_err().contains("does not exist"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path, 1)
            .unwrap_err()
            .contains("not a keygate state file"));
        let old = StateFile {
            version: VERSION,
            written_at: 1_000,
            ..StateFile::default()
        };
        save(&path, &old).unwrap();
        let week = STALE_AFTER.as_millis() as Millis;
        assert!(load(&path, 1_000 + week + 1)
            .unwrap_err()
            .contains("7 days"));
        assert_eq!(load(&path, 2_000).unwrap(), old);
        let future = StateFile {
            version: VERSION + 1,
            ..StateFile::default()
        };
        save(&path, &future).unwrap();
        assert!(load(&path, 1).unwrap_err().contains("format version"));
    }

    #[test]
    fn saving_replaces_the_file_whole_and_keeps_it_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "old").unwrap();
        save(
            &path,
            &StateFile {
                version: VERSION,
                written_at: 5,
                ..StateFile::default()
            },
        )
        .unwrap();
        assert_eq!(load(&path, 5).unwrap().written_at, 5);
        assert!(!dir.path().join("state.json.tmp").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
