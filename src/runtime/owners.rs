//! Resource owners and uploads in progress, shared with the other instances (the `redis:`
//! section): what one instance binds or starts is written through to the store in the
//! background, and a name or an upload id this instance does not know is asked of the store
//! once, within its timeout, before the request goes on as it would without it.

use crate::quota::affinity::{Owner, UploadSession};
use crate::quota::keys::{now_millis, Millis};
use crate::runtime::Shared;
use async_trait::async_trait;
use std::sync::Arc;

/// Where owners and uploads are shared with the other instances.
#[async_trait]
pub trait SharedOwners: Send + Sync {
    /// `name` is now `owner`'s on this instance; never waits. Unless `replace` (an operator's
    /// binding), an owner the store holds already is kept.
    fn bound(&self, name: &str, owner: &Owner, replace: bool);
    /// `name` was deleted; never waits.
    fn forgot(&self, name: &str);
    /// The upload `id` started, live for `ttl_ms`; never waits.
    fn upload_started(&self, id: &str, session: &UploadSession, ttl_ms: Millis);
    /// The upload `id` finished; never waits.
    fn upload_finished(&self, id: &str);
    /// The owners the store holds for `names`, with the milliseconds they have left; a
    /// tenant is one of `tenants` (an entry naming another is ignored). Empty when the store
    /// does not answer in time.
    async fn owners(&self, names: &[String], tenants: &[Arc<str>]) -> Vec<(String, Owner, Millis)>;
    /// The upload `id` as the store holds it, with the milliseconds it has left.
    async fn upload(&self, id: &str, tenants: &[Arc<str>]) -> Option<(UploadSession, Millis)>;
}

impl Shared {
    /// The configured tenants' names, to read owners back by.
    fn tenant_names(&self) -> Vec<Arc<str>> {
        let rt = self.runtime.load();
        rt.tenants.list().iter().map(|t| t.name.clone()).collect()
    }

    /// Asks the store for the owners of `names` (not known here) and takes in what it holds;
    /// how many it took in.
    pub async fn learn_owners(&self, names: &[String]) -> usize {
        let Some(owners) = self.owners.get() else {
            return 0;
        };
        let found = owners.owners(names, &self.tenant_names()).await;
        let now = now_millis();
        let before = self.affinity.len();
        let rt = self.runtime.load();
        let entries = found
            .into_iter()
            .filter(|(_, owner, _)| rt.pool_index(&owner.pool).is_some())
            .map(|(name, owner, left)| (name, owner, now.saturating_add(left)))
            .collect();
        self.affinity.restore(entries, now);
        self.affinity.len().saturating_sub(before)
    }

    /// The live upload behind keygate's id `id`: this instance's, or one another instance
    /// started (asked of the store once).
    pub async fn upload_session(&self, id: &str, now: Millis) -> Option<UploadSession> {
        if let Some(session) = self.uploads.get(id, now) {
            return Some(session);
        }
        let (session, left) = self.owners.get()?.upload(id, &self.tenant_names()).await?;
        self.uploads
            .adopt(id, session, now.saturating_add(left), now);
        self.uploads.get(id, now)
    }

    /// Binds `name` to `owner` unless another owner holds it, and tells the fleet; whether
    /// `name` is `owner`'s now.
    pub fn bind_new(&self, name: &str, owner: Owner, now: Millis) -> bool {
        let told = self.owners.get().map(|o| (o, owner.clone()));
        let bound = self.affinity.bind_new(name, owner, now);
        if let (true, Some((owners, owner))) = (bound, told) {
            owners.bound(name, &owner, false);
        }
        bound
    }

    /// Binds `name` to `owner` (an operator's binding replaces any) and tells the fleet.
    pub fn bind(&self, name: &str, owner: Owner, now: Millis) {
        if let Some(owners) = self.owners.get() {
            owners.bound(name, &owner, true);
        }
        self.affinity.bind(name, owner, now);
    }

    /// Forgets `name` here and in the fleet.
    pub fn forget(&self, name: &str) {
        self.affinity.forget(name);
        if let Some(owners) = self.owners.get() {
            owners.forgot(name);
        }
    }

    /// Registers an upload and tells the fleet; keygate's id for it.
    pub fn start_upload(&self, session: UploadSession, now: Millis) -> Option<String> {
        let told = self.owners.get().map(|o| (o, session.clone()));
        let id = self.uploads.start(session, now)?;
        if let Some((owners, session)) = told {
            let ttl = Millis::try_from(crate::quota::affinity::UPLOAD_TTL.as_millis());
            owners.upload_started(&id, &session, ttl.unwrap_or(Millis::MAX));
        }
        Some(id)
    }

    /// Ends an upload here and in the fleet.
    pub fn finish_upload(&self, id: &str) {
        self.uploads.finish(id);
        if let Some(owners) = self.owners.get() {
            owners.upload_finished(id);
        }
    }
}
