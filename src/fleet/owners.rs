//! Resource owners and uploads in progress, in Redis.
//!
//! - An owner is `{prefix}r:{hash of the resource name}`, holding the name, the pool, the
//!   project and a hash of the tenant's name, for the resource kind's lifetime; the first owner
//!   written wins (`SET NX`), as on one instance, except an operator's binding.
//! - An upload is `{prefix}u:{hash of keygate's upload id}`, holding the pool, the project, the
//!   tenant's hash, the fingerprint of the key that started it and Google's upload path, whose
//!   `upload_id` is a bearer capability: it lives as long as the upload may (7 days) and goes
//!   when the upload finishes.
//!
//! Both are written in the background, and written back when Redis answers again after an
//! outage (an entry the store holds already is kept); read back only for a name or an id this
//! instance does not know, in one round trip within the configured timeout. What is read is bounded and
//! checked; an entry keygate did not write, or of a tenant or pool this instance does not
//! have, is ignored with a warning.

use super::chores::Chore;
use super::store::h;
use super::Fleet;
use crate::quota::affinity::{Owner, UploadSession};
use crate::quota::keys::Millis;
use crate::runtime::owners::SharedOwners;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// The longest value read back: an entry is a few hundred bytes.
const MAX_VALUE: usize = 4096;

/// The longest name, pool, project, fingerprint or upload path taken from an entry.
const MAX_FIELD: usize = 2048;

/// An owner or an upload, as stored.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// The resource's name (owners), or empty (uploads: the id is not stored).
    #[serde(default)]
    name: String,
    pool: String,
    project: String,
    /// The hash of the tenant's name; none without tenants.
    tenant: Option<String>,
    /// Uploads only: the fingerprint of the key that started it and Google's upload path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upload: Option<String>,
}

fn stored(name: &str, owner: &Owner) -> Stored {
    Stored {
        name: name.to_string(),
        pool: owner.pool.to_string(),
        project: owner.project.to_string(),
        tenant: owner.tenant.as_deref().map(h),
        key: None,
        upload: None,
    }
}

/// An entry read back, when it is one keygate wrote and within bounds.
fn parse(value: &[u8]) -> Option<Stored> {
    if value.len() > MAX_VALUE {
        return None;
    }
    let s: Stored = serde_json::from_slice(value).ok()?;
    let fields = [&s.pool, &s.project];
    if fields.iter().any(|f| f.is_empty() || f.len() > MAX_FIELD) || s.name.len() > MAX_FIELD {
        return None;
    }
    Some(s)
}

/// The owner `s` names, when its tenant is one of `tenants` (or it has none).
fn owner_in(s: &Stored, tenants: &[Arc<str>]) -> Option<Owner> {
    let tenant = match &s.tenant {
        None => None,
        Some(hash) => Some(tenants.iter().find(|t| h(t) == *hash)?.clone()),
    };
    Some(Owner {
        pool: Arc::from(s.pool.as_str()),
        project: Arc::from(s.project.as_str()),
        tenant,
    })
}

/// The owner an entry read back holds, when it is one keygate wrote for `name` and its tenant
/// is one of `tenants`.
fn owner_of(value: &[u8], name: &str, tenants: &[Arc<str>]) -> Option<Owner> {
    let s = parse(value).filter(|s| s.name == name)?;
    owner_in(&s, tenants)
}

/// The upload an entry read back holds, when it is one keygate wrote.
fn upload_of(value: &[u8], tenants: &[Arc<str>]) -> Option<UploadSession> {
    let s = parse(value)?;
    let (Some(key), Some(path)) = (&s.key, &s.upload) else {
        return None;
    };
    let sane = path.starts_with("/upload/")
        && path.contains("upload_id=")
        && path.len() <= MAX_FIELD
        && !path.bytes().any(|b| b <= b' ' || b == 0x7f)
        && key.len() <= 64;
    if !sane {
        return None;
    }
    Some(UploadSession {
        owner: owner_in(&s, tenants)?,
        key_fingerprint: key.clone(),
        upstream_path_and_query: path.clone(),
    })
}

/// The entry of the owner of `name`.
fn owner_entry(fleet: &Fleet, name: &str) -> String {
    format!("{}r:{}", fleet.config.key_prefix, h(name))
}

/// Entries written back per round trip.
const WRITE_BACK_BATCH: usize = 1000;

/// Writes `entries` (name, owner, expiry) back to the store, each unless the store holds an
/// owner for it already.
pub(super) async fn write_back(
    fleet: &Fleet,
    c: &mut redis::aio::ConnectionManager,
    entries: Vec<(String, Owner, Millis)>,
) -> redis::RedisResult<()> {
    let entries = entries
        .into_iter()
        .filter_map(|(name, owner, expires_at)| {
            let value = serde_json::to_string(&stored(&name, &owner)).ok()?;
            Some((owner_entry(fleet, &name), value, expires_at))
        })
        .collect();
    set_missing(c, entries).await
}

/// Sets each (entry, value, expiry) of `entries` that the store does not hold, living until its
/// expiry: a round trip per [`WRITE_BACK_BATCH`].
async fn set_missing(
    c: &mut redis::aio::ConnectionManager,
    entries: Vec<(String, String, Millis)>,
) -> redis::RedisResult<()> {
    let now = crate::quota::keys::now_millis();
    for batch in entries.chunks(WRITE_BACK_BATCH) {
        let mut pipe = redis::pipe();
        for (entry, value, expires_at) in batch {
            let ttl = expires_at.saturating_sub(now).max(1);
            pipe.cmd("SET")
                .arg(entry)
                .arg(value)
                .arg("PX")
                .arg(ttl)
                .arg("NX")
                .ignore();
        }
        pipe.query_async::<()>(c).await?;
    }
    Ok(())
}

/// The entry of keygate's upload id `id`.
fn upload_entry(fleet: &Fleet, id: &str) -> String {
    format!("{}u:{}", fleet.config.key_prefix, h(id))
}

/// The entry value of `session`.
fn upload_value(session: &UploadSession) -> Option<String> {
    let mut s = stored("", &session.owner);
    s.key = Some(session.key_fingerprint.clone());
    s.upload = Some(session.upstream_path_and_query.clone());
    serde_json::to_string(&s).ok()
}

/// Writes `uploads` (id, session, expiry) started here while Redis was away back to the
/// store, each unless the store holds it already.
pub(super) async fn write_back_uploads(
    fleet: &Fleet,
    c: &mut redis::aio::ConnectionManager,
    uploads: Vec<(String, UploadSession, Millis)>,
) -> redis::RedisResult<()> {
    let entries = uploads
        .into_iter()
        .filter_map(|(id, session, expires_at)| {
            Some((
                upload_entry(fleet, &id),
                upload_value(&session)?,
                expires_at,
            ))
        })
        .collect();
    set_missing(c, entries).await
}

/// This instance's handle on the owners and uploads shared through Redis.
pub struct FleetOwners(pub Arc<Fleet>);

impl FleetOwners {
    fn owner_name(&self, name: &str) -> String {
        owner_entry(&self.0, name)
    }

    fn upload_name(&self, id: &str) -> String {
        upload_entry(&self.0, id)
    }

    /// Says once that an entry was not one keygate understands.
    fn foreign(&self, name: &str) {
        if !self.0.foreign_owner_warned.swap(true, Relaxed) {
            log::warn!("redis entry {name}: not one keygate understands, or of a tenant or pool this instance does not have; ignored");
        }
    }
}

#[async_trait]
impl SharedOwners for FleetOwners {
    fn bound(&self, name: &str, owner: &Owner, replace: bool) {
        let Some(kind) = crate::wire::names::kind_of(name) else {
            return;
        };
        let Ok(value) = serde_json::to_string(&stored(name, owner)) else {
            return;
        };
        self.0.chore(Chore::Put {
            name: self.owner_name(name),
            value,
            ttl_ms: u64::try_from(kind.ttl().as_millis()).unwrap_or(u64::MAX),
            replace,
        });
    }

    fn forgot(&self, name: &str) {
        self.0.chore(Chore::Delete {
            name: self.owner_name(name),
        });
    }

    fn upload_started(&self, id: &str, session: &UploadSession, ttl_ms: Millis) {
        let Some(value) = upload_value(session) else {
            return;
        };
        self.0.chore(Chore::Put {
            name: self.upload_name(id),
            value,
            ttl_ms,
            replace: true,
        });
    }

    fn upload_finished(&self, id: &str) {
        self.0.chore(Chore::Delete {
            name: self.upload_name(id),
        });
    }

    async fn owners(&self, names: &[String], tenants: &[Arc<str>]) -> Vec<(String, Owner, Millis)> {
        let fleet = &self.0;
        let Some(mut c) = fleet.lock().clone().filter(|_| fleet.is_up_now()) else {
            return Vec::new();
        };
        let entries: Vec<String> = names.iter().map(|n| self.owner_name(n)).collect();
        let mut pipe = redis::pipe();
        for entry in &entries {
            pipe.cmd("GET").arg(entry).cmd("PTTL").arg(entry);
        }
        let read = tokio::time::timeout(
            fleet.config.timeout,
            pipe.query_async::<Vec<(Option<Vec<u8>>, i64)>>(&mut c),
        )
        .await;
        let Ok(Ok(read)) = read else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for ((name, entry), (value, left)) in names.iter().zip(&entries).zip(read) {
            let Some(value) = value else {
                continue;
            };
            match owner_of(&value, name, tenants).filter(|_| left > 0) {
                Some(owner) => found.push((name.clone(), owner, left as Millis)),
                None => self.foreign(entry),
            }
        }
        found
    }

    async fn upload(&self, id: &str, tenants: &[Arc<str>]) -> Option<(UploadSession, Millis)> {
        let fleet = &self.0;
        let mut c = fleet.lock().clone().filter(|_| fleet.is_up_now())?;
        let entry = self.upload_name(id);
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&entry).cmd("PTTL").arg(&entry);
        let read = tokio::time::timeout(
            fleet.config.timeout,
            pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut c),
        )
        .await;
        let (value, left) = read.ok()?.ok()?;
        let value = value?;
        match upload_of(&value, tenants).filter(|_| left > 0) {
            Some(session) => Some((session, left as Millis)),
            None => {
                self.foreign(&entry);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Owner {
        Owner {
            pool: Arc::from("main"),
            project: Arc::from("p1"),
            tenant: Some(Arc::from("alice")),
        }
    }

    #[test]
    fn owners_read_back_as_written_and_name_no_tenant() {
        let value = serde_json::to_vec(&stored("files/abc", &alice())).unwrap();
        assert!(!String::from_utf8_lossy(&value).contains("alice"));
        let tenants = [Arc::from("bob"), Arc::from("alice")];
        assert_eq!(owner_of(&value, "files/abc", &tenants), Some(alice()));
        // Another name's entry, an unknown tenant, garbage: ignored.
        assert_eq!(owner_of(&value, "files/other", &tenants), None);
        assert_eq!(owner_of(&value, "files/abc", &[Arc::from("bob")]), None);
        assert_eq!(owner_of(b"\xff{not json", "files/abc", &tenants), None);
        let huge = format!(
            r#"{{"name":"files/abc","pool":"main","project":"{}","tenant":null}}"#,
            "p".repeat(5000)
        );
        assert_eq!(owner_of(huge.as_bytes(), "files/abc", &tenants), None);
    }

    #[test]
    fn uploads_read_back_as_written_and_bad_paths_are_refused() {
        let session = UploadSession {
            owner: alice(),
            key_fingerprint: "key#0123abcd".into(),
            upstream_path_and_query:
                "/upload/v1beta/files?upload_id=G00gle&upload_protocol=resumable".into(),
        };
        let mut s = stored("", &session.owner);
        s.key = Some(session.key_fingerprint.clone());
        s.upload = Some(session.upstream_path_and_query.clone());
        let value = serde_json::to_vec(&s).unwrap();
        let tenants = [Arc::from("alice")];
        assert_eq!(upload_of(&value, &tenants), Some(session));
        s.upload = Some("/upload/v1beta/files?upload_id=x\r\nHost: evil".into());
        assert_eq!(upload_of(&serde_json::to_vec(&s).unwrap(), &tenants), None);
        s.upload = Some("https://evil.example/upload?upload_id=x".into());
        assert_eq!(upload_of(&serde_json::to_vec(&s).unwrap(), &tenants), None);
    }
}
