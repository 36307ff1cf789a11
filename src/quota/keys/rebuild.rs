//! A pool rebuilt with other keys (the admin API adds or removes one, a reload changes them)
//! keeps the health of the keys, projects and billing accounts the two share.

use super::{KeyPool, ModelHealth};
use crate::config::KeyConfig;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

impl KeyPool {
    /// The keys as configuration entries (secret and project), in pool order.
    pub fn key_configs(&self) -> Vec<KeyConfig> {
        self.keys
            .iter()
            .map(|k| KeyConfig {
                secret: k.secret.clone(),
                project: self.projects[k.project as usize].clone(),
                billing_account: self.accounts[self.account_of[k.project as usize] as usize]
                    .clone(),
                note: k.note.clone(),
            })
            .collect()
    }

    /// A new pool of `keys` that keeps this pool's health table for the keys and projects the
    /// two share (cooldowns, disabled keys and projects, blocked methods) and its usage counts.
    /// This is how keys are added or removed at run time: requests already running finish on
    /// the old pool.
    pub fn rebuilt(&self, keys: &[KeyConfig]) -> KeyPool {
        let old_by_fp: HashMap<&str, usize> = self
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.fingerprint.as_str(), i))
            .collect();
        let fresh = KeyPool::build(&self.name, keys, |fp| {
            old_by_fp.get(fp).map(|&i| self.keys[i].usage.clone())
        })
        .probing_every(std::time::Duration::from_millis(self.probe_every))
        .scrubbing(self.others.clone());
        for (k, key) in fresh.keys.iter().enumerate() {
            if let Some(&old) = old_by_fp.get(key.fingerprint.as_str()) {
                fresh.key_disabled_until[k]
                    .store(self.key_disabled_until[old].load(Relaxed), Relaxed);
                fresh.key_reason[k].store(self.key_reason[old].load(Relaxed), Relaxed);
            }
        }
        let project_map: Vec<Option<usize>> = fresh
            .projects
            .iter()
            .map(|name| self.projects.iter().position(|p| p == name))
            .collect();
        for (new_p, old_p) in project_map.iter().enumerate() {
            if let Some(old_p) = old_p {
                fresh.project_disabled_until[new_p]
                    .store(self.project_disabled_until[*old_p].load(Relaxed), Relaxed);
                fresh.project_caps[new_p].copy_from(&self.project_caps[*old_p]);
            }
        }
        for (new_a, name) in fresh.accounts.iter().enumerate() {
            let old_a = match name {
                Some(name) => self.accounts.iter().position(|a| a.as_ref() == Some(name)),
                // A project's own account: the same project's own account before.
                None => fresh
                    .account_of
                    .iter()
                    .position(|&a| a as usize == new_a)
                    .and_then(|new_p| {
                        let old_p = project_map[new_p]?;
                        let old_a = self.account_of[old_p] as usize;
                        self.accounts[old_a].is_none().then_some(old_a)
                    }),
            };
            if let Some(old_a) = old_a {
                fresh.account_caps[new_a].copy_from(&self.account_caps[old_a]);
            }
        }
        let mut models = HashMap::new();
        for (name, health) in self.models.load().iter() {
            let copy = ModelHealth::new(fresh.projects.len());
            for (new_p, old_p) in project_map.iter().enumerate() {
                if let Some(old_p) = old_p {
                    let old_p = *old_p;
                    copy.cool_until[new_p].store(health.cool_until[old_p].load(Relaxed), Relaxed);
                    copy.why[new_p].store(health.why[old_p].load(Relaxed), Relaxed);
                    copy.quota[new_p].copy_from(&health.quota[old_p]);
                }
            }
            models.insert(name.clone(), Arc::new(copy));
        }
        fresh.models.store(Arc::new(models));
        let blocked: Vec<(u32, Box<str>)> = self
            .blocked
            .load()
            .iter()
            .filter_map(|(old, method)| {
                let fp = &self.keys[*old as usize].fingerprint;
                let new = fresh.keys.iter().position(|k| &k.fingerprint == fp)?;
                Some((new as u32, method.clone()))
            })
            .collect();
        fresh.any_blocked.store(!blocked.is_empty(), Relaxed);
        fresh.blocked.store(Arc::new(blocked));
        fresh
    }

    /// The same keys with an empty health table (usage counts kept): what a cold start takes
    /// when the shared store already holds the fleet's health.
    pub fn without_health(&self) -> KeyPool {
        let usage: HashMap<&str, Arc<super::Usage>> = self
            .keys
            .iter()
            .map(|k| (k.fingerprint.as_str(), k.usage.clone()))
            .collect();
        KeyPool::build(&self.name, &self.key_configs(), |fp| usage.get(fp).cloned())
            .probing_every(std::time::Duration::from_millis(self.probe_every))
            .scrubbing(self.others.clone())
    }
}

#[cfg(test)]
mod tests {
    use crate::quota::keys::tests::pool;
    use crate::secret::Secret;

    #[test]
    fn a_table_without_health_still_scrubs_the_upstream_headers() {
        let token = "relay-token-0123456789";
        let p = pool(&[("a", "p1")]).scrubbing(vec![(
            Secret::new(token),
            "[upstream header cf-aig-authorization]".into(),
        )]);
        let fresh = p.without_health();
        let text = format!("bad token {token}");
        let scrubbed = fresh.scrubber().body(text.as_bytes()).into_owned();
        let scrubbed = String::from_utf8(scrubbed).unwrap();
        assert!(!scrubbed.contains(token), "{scrubbed}");
    }
}
