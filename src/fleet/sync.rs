//! The keeper: watches the link to Redis, and after each (re)connection replays what this
//! instance changed meanwhile, writes back its table and loads the others'.

use super::store::{self, Names, Write};
use super::{after, apply, scan, send, Envelope, Fleet, KindLabel, RECONNECT};
use crate::quota::keys::{now_millis, News};
use crate::runtime::Shared;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Watches the link: reconnects, and after each (re)connection writes back this instance's
/// table and loads the others'.
pub(super) async fn keeper(fleet: &Fleet, shared: &Shared) {
    let mut first = true;
    loop {
        let ping = async {
            let mut c = fleet.connection().await?;
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
            pong.ok().map(|_| c)
        };
        match tokio::time::timeout(RECONNECT * 2, ping).await {
            Ok(Some(mut c)) => {
                if fleet.behind.swap(false, Relaxed) {
                    match sync(fleet, shared, &mut c, first).await {
                        Ok(()) => {
                            first = false;
                            fleet.went_up();
                        }
                        Err(e) => fleet.went_down(&format!("sync failed ({})", e.kind_label())),
                    }
                } else {
                    fleet.went_up();
                }
            }
            _ => fleet.went_down("cannot connect"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT) => {}
            _ = fleet.resync.notified() => fleet.behind.store(true, Relaxed),
        }
    }
}

/// Writes this instance's table back to the store (unless this is a cold start and the store
/// holds the fleet's health already: then the store wins) and loads what is there.
async fn sync(
    fleet: &Fleet,
    shared: &Shared,
    c: &mut ConnectionManager,
    cold_start: bool,
) -> redis::RedisResult<()> {
    let marker: bool = c.exists(fleet.marker()).await?;
    let rt = shared.runtime.load();
    // Instances sharing a prefix must serve the same pools: say so when they do not.
    let ours: Vec<&str> = rt.pools.iter().map(|p| p.name()).collect();
    let ours = ours.join(",");
    let pools_key = format!("{}pools", fleet.config.key_prefix);
    let theirs: Option<String> = c.get(&pools_key).await?;
    match theirs {
        Some(theirs) if theirs != ours => log::warn!(
            "redis at {}: another instance with key prefix {:?} serves the pools [{theirs}], this one [{ours}]; only pools of the same name share their health (give each fleet its own redis.key_prefix)",
            fleet.url(),
            fleet.config.key_prefix
        ),
        Some(_) => {}
        None => c.set::<_, _, ()>(&pools_key, &ours).await?,
    }
    // What was changed here while Redis did not answer goes first, in order: an enable or a
    // clear then deletes the entries that would otherwise be loaded back.
    let journal: Vec<Envelope> =
        std::mem::take(&mut *fleet.journal.lock().unwrap_or_else(|e| e.into_inner())).into();
    for envelope in &journal {
        let names = Names::new(&fleet.config.key_prefix, &envelope.pool);
        let writes: Vec<Write> = envelope
            .news
            .iter()
            .flat_map(|n| {
                let mut w = names.writes(&envelope.pool, n, envelope.at);
                w.extend(after(shared, &names, &envelope.pool, n));
                w
            })
            .collect();
        send(fleet, c, envelope, &writes).await?;
    }
    // Everything is written back when the store is new or wiped, or a change was lost;
    // otherwise only what ends on its own (cooldowns, caps: the later deadline wins), so that a
    // key another instance enabled is not disabled again by this one's old view of it.
    let everything = !marker || fleet.lost.swap(false, Relaxed);
    // At a cold start the store's health wins over the state file's, unless this instance has
    // changed its health since it started (it served while Redis was away).
    let store_wins = cold_start && marker && !fleet.changed_here.load(Relaxed);
    for pool in &rt.pools {
        let names = Names::new(&fleet.config.key_prefix, pool.name());
        if store_wins {
            let old = pool.keys.load_full();
            let fresh = Arc::new(old.without_health());
            // An admin change that replaced the table meanwhile keeps it.
            let _ = pool.keys.compare_and_swap(&old, fresh);
        } else {
            let now = now_millis();
            let news = pool.keys.load().all_news(now);
            // A cooldown goes back with when it was learnt: one a clear made since then covers
            // is refused (see `versions`).
            let at = |n: &News| match n {
                News::Cooled { project, model, .. } => {
                    fleet.versions.penalised_at(pool.name(), project, model)
                }
                _ => now,
            };
            let writes: Vec<Write> = news
                .iter()
                .filter(|n| everything || matches!(n, News::Cooled { .. } | News::Capped { .. }))
                .flat_map(|n| names.writes(pool.name(), n, at(n)))
                .collect();
            apply(c, &writes).await?;
        }
        let mut entries = Vec::new();
        for name in scan(c, &names.all()).await? {
            let (value, ttl): (Option<String>, i64) = redis::pipe()
                .get(&name)
                .cmd("PTTL")
                .arg(&name)
                .query_async(c)
                .await?;
            let ttl = (ttl >= 0).then_some(ttl as u64);
            match value.as_deref().and_then(|v| store::read(v, ttl)) {
                Some(entry) if entry.pool == pool.name() => entries.push(entry),
                Some(_) => {}
                None if value.is_some() => {
                    log::warn!("redis entry {name}: not one keygate understands; ignored")
                }
                None => {}
            }
        }
        let learnt = versioned(fleet, shared, pool.name(), entries);
        if !everything {
            // The store wins for lasting states: what it no longer holds was undone elsewhere
            // (this instance's own changes were replayed above).
            let stale = pool.keys.load().stale_against(&learnt, now_millis());
            shared.learn(pool.name(), &stale);
        }
        let used = shared.learn(pool.name(), &learnt);
        log::info!(
            "pool {}: loaded {used} shared health entries from redis",
            pool.name()
        );
    }
    c.set::<_, _, ()>(fleet.marker(), "1").await?;
    // Owners bound here while Redis was away (or before this instance started: its state
    // file) are written back; an owner the store holds already keeps its entry.
    super::owners::write_back(fleet, c, shared.affinity.entries(now_millis())).await?;
    // So are the uploads started here meanwhile: another instance may be sent their bytes.
    let uploads = shared.uploads.entries(now_millis());
    super::owners::write_back_uploads(fleet, c, uploads).await?;
    Ok(())
}

/// The news of `entries` read back for `pool`, once the clears among them (tombstones) are
/// applied here as far as they are newer than what this instance learnt, and without the
/// cooldowns they cover.
fn versioned(fleet: &Fleet, shared: &Shared, pool: &str, entries: Vec<store::Entry>) -> Vec<News> {
    let v = &fleet.versions;
    for e in &entries {
        if let News::Cooled { project, model, .. } = &e.news {
            v.penalty(pool, project, model, e.at);
        }
    }
    let (clears, rest): (Vec<_>, Vec<_>) = entries
        .into_iter()
        .partition(|e| matches!(e.news, News::CooldownsCleared { .. }));
    for e in clears {
        fleet.learn_versioned(shared, pool, std::slice::from_ref(&e.news), e.at);
    }
    v.prune(now_millis());
    rest.into_iter()
        .filter(|e| match &e.news {
            News::Cooled { project, model, .. } => v.cleared_at(pool, project, model) < e.at,
            _ => true,
        })
        .map(|e| v.unescalated(pool, &e.news, e.at))
        .collect()
}
