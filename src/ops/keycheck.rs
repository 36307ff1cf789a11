//! The key check: asks Google whether a key works with a request that spends no quota, and
//! records the answer through the health door.

use crate::config::Timeouts;
use crate::quota::classify::{self, classify, Outcome, Penalty, MAX_CLASSIFY_BODY};
use crate::quota::keys::{Disabled, KeyId, KeyPool, Transition};
use crate::runtime::health::Cause;
use crate::runtime::{Pool, Shared};
use crate::upstream::exchange::{
    connect, decoded_body, read_final_header, read_up_to, release, write_request, Answer,
    AnswerBody, Connection,
};
use crate::upstream::Upstream;
use crate::wire::request::{self, Api};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

/// What a key check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyCheck {
    /// Google accepted the key.
    Alive,
    /// Google refused the key itself.
    Dead(classify::DeadReason),
    /// Nothing can be said about the key (network error, quota, Google's side): the label says
    /// what happened.
    Inconclusive(&'static str),
}

/// Path of the key check: a one-model listing, which spends no generation quota.
pub(crate) const KEY_CHECK_PATH: &str = "/v1beta/models?pageSize=1";

/// Asks Google whether `key` works, with a request that spends no quota, and updates the health
/// table: a dead key is disabled; a key disabled as dead that works again is put back (keys an
/// operator disabled, and projects out of credit, stay as they are).
pub async fn check_key(
    shared: &Shared,
    pool: &Pool,
    keys: &Arc<KeyPool>,
    key: KeyId,
    timeouts: Timeouts,
) -> KeyCheck {
    // An operator's decision is not the check's to overturn, either way.
    if keys.disabled(key) == Some(Disabled::Operator) {
        return KeyCheck::Inconclusive("disabled_by_operator");
    }
    let result = fetch(&pool.upstream, keys.key(key).secret.expose(), timeouts).await;
    let check = match result {
        Err(label) => KeyCheck::Inconclusive(label),
        Ok((status, body)) => match classify_relayed_if(pool, status, &body) {
            Outcome::Success => KeyCheck::Alive,
            Outcome::KeyDead(reason) => KeyCheck::Dead(reason),
            other => KeyCheck::Inconclusive(other.label()),
        },
    };
    match &check {
        KeyCheck::Alive => {
            shared.change_health(keys, key, Transition::Recover, Cause::KeyCheck);
        }
        KeyCheck::Dead(reason) => {
            let dead = Penalty::DisableKey(*reason);
            let transition = Transition::penalise(&dead, "", KEY_CHECK_PATH);
            shared.change_health(keys, key, transition, Cause::KeyCheck);
        }
        KeyCheck::Inconclusive(label) => log::info!(
            "pool {}: key check of {} inconclusive: {label}",
            keys.name(),
            keys.key(key).fingerprint
        ),
    }
    check
}

/// What the key check's answer means; through a relay, its own refusals blame no key.
fn classify_relayed_if(pool: &Pool, status: u16, body: &[u8]) -> Outcome {
    if pool.upstream.config().is_relay() {
        classify::classify_relayed(status, body, true)
    } else {
        classify(status, body)
    }
}

/// GETs the key check path with `key`; the status and the (decoded, bounded) body.
pub(crate) async fn fetch(
    upstream: &Upstream,
    key: &str,
    timeouts: Timeouts,
) -> Result<(u16, Vec<u8>), &'static str> {
    let Connection { mut http, peer, .. } = connect(upstream, timeouts.connect, false)
        .await
        .map_err(|e| e.label())?;
    let client = RequestHeader::build("GET", KEY_CHECK_PATH.as_bytes(), None)
        .map_err(|_| "request_error")?;
    let forward = request::Forward {
        api: Api::Gemini,
        path_and_query: KEY_CHECK_PATH,
        body_len: 0,
    };
    let target = upstream.target(matches!(http, ClientSession::H2(_)));
    let req = request::upstream_request(
        &request::Outgoing::from_client(&client),
        &forward,
        key,
        &target,
    )
    .map_err(|_| "request_error")?;
    http.set_read_timeout(Some(timeouts.read.min(Duration::from_secs(30))));
    http.set_write_timeout(Some(timeouts.write));
    write_request(&mut http, req, &Bytes::new())
        .await
        .map_err(|_| "upstream_error")?;
    read_final_header(&mut http)
        .await
        .map_err(|_| "upstream_error")?;
    let header = http.response_header().cloned().ok_or("upstream_error")?;
    let mut answer = Answer {
        header,
        body: AnswerBody {
            http: Some(http),
            peer: Some(peer.clone()),
            read: Vec::new(),
            complete: false,
        },
    };
    read_up_to(&mut answer.body, MAX_CLASSIFY_BODY).await;
    let body = decoded_body(&answer, MAX_CLASSIFY_BODY);
    if answer.body.complete {
        if let Some(http) = answer.body.http.take() {
            release(upstream, http, &peer, timeouts.idle).await;
        }
    }
    Ok((answer.header.status.as_u16(), body))
}

/// Checks every key on a slow schedule, so dead keys are found before a request needs them and
/// recovered ones come back.
pub struct KeyChecker {
    shared: Arc<Shared>,
    interval: Duration,
}

impl KeyChecker {
    /// A checker running every `interval`.
    pub fn new(shared: Arc<Shared>, interval: Duration) -> KeyChecker {
        KeyChecker { shared, interval }
    }
}

/// Pause between two keys' checks, so a large pool is not checked in one burst.
const BETWEEN_CHECKS: Duration = Duration::from_millis(500);

#[async_trait]
impl BackgroundService for KeyChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if self.interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => return,
            }
            // The keys to check, by name: each is looked up again when its turn comes, so a
            // check lands in the pool as it is then (after a reload or an admin change).
            let todo: Vec<(String, String)> = self
                .shared
                .runtime
                .load()
                .pools
                .iter()
                .flat_map(|pool| {
                    let keys = pool.keys.load();
                    (0..keys.len())
                        .map(|k| {
                            (
                                pool.name().to_string(),
                                keys.key(KeyId(k as u32)).fingerprint.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            for (pool_name, fingerprint) in todo {
                let rt = self.shared.runtime.load_full();
                let Some(pool) = rt.pools.iter().find(|p| p.name() == pool_name) else {
                    continue;
                };
                let keys = pool.keys.load_full();
                if let Some(id) = keys.find(&fingerprint) {
                    check_key(&self.shared, pool, &keys, id, rt.timeouts).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(BETWEEN_CHECKS) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
