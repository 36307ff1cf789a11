//! The one attempt loop, for requests and Live upgrades alike: the [`Plan`] says which key
//! next, each answer is classified, and health changes go through the door.

use super::answers::{exhausted_error, fair_share_error};
use super::client::{watched, Waited};
use super::events::{is_news, quota_event};
use super::{AttemptLog, Ctx, Ending, Gateway, Job, Kind};
use crate::quota::classify::{
    classify, classify_prefix, classify_relayed, Outcome, MAX_CLASSIFY_BODY,
};
use crate::quota::keys::{now_millis, KeyId, KeyPool, Millis, Scope, Transition};
use crate::quota::plan::{Next, Plan, Then};
use crate::runtime::health::Cause;
use crate::runtime::Pool;
use crate::telemetry::alerts::Event;
use crate::upstream::exchange::{
    connect, decoded_body, read_final_header, read_up_to, release, write_request, Answer,
    AnswerBody, ConnectError, Connection,
};
use crate::wire::error::GatewayError;
use crate::wire::request;
use chrono::Utc;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Why an attempt got no answer.
pub(super) enum SendError {
    /// The host has no address: why.
    Unresolved(String),
    /// Connecting (TCP or TLS) failed.
    Connect(Box<Error>),
    /// The exchange failed after connecting; `reused` says whether the connection came from
    /// the pool (a stale pooled connection is retried at once).
    Exchange { error: Box<Error>, reused: bool },
    /// The client hung up while the answer was awaited.
    ClientGone,
}

impl From<ConnectError> for SendError {
    fn from(e: ConnectError) -> SendError {
        match e {
            ConnectError::Unresolved(why) => SendError::Unresolved(why),
            ConnectError::Connect(e) => SendError::Connect(e),
        }
    }
}

impl SendError {
    pub(super) fn label(&self) -> &'static str {
        match self {
            SendError::Unresolved(_) => "unresolved",
            SendError::Connect(_) => "connect_error",
            SendError::Exchange { error, .. } if is_timeout(error) => "timeout",
            SendError::Exchange { .. } => "upstream_error",
            SendError::ClientGone => "client_gone",
        }
    }

    pub(super) fn into_gateway_error(self, pool: &str) -> GatewayError {
        match self {
            SendError::Unresolved(why) => unresolved_error(pool, &why),
            // An outbound proxy's failure explains itself (it names the pool's proxy).
            SendError::Connect(e) if e.etype() == &ErrorType::ConnectProxyFailure => {
                let why = e.context.as_ref().map(|c| c.as_str().to_string());
                GatewayError::new(
                    502,
                    "UNAVAILABLE",
                    format!(
                        "keygate: {}",
                        why.unwrap_or_else(|| format!("the proxy of pool '{pool}' failed"))
                    ),
                )
            }
            SendError::Connect(e) => GatewayError::new(
                502,
                "UNAVAILABLE",
                format!(
                    "keygate: cannot connect to the upstream of pool '{pool}': {}",
                    e.etype().as_str()
                ),
            ),
            SendError::Exchange { error, .. } if is_timeout(&error) => GatewayError::new(
                504,
                "DEADLINE_EXCEEDED",
                format!("keygate: the upstream of pool '{pool}' did not answer in time"),
            ),
            SendError::Exchange { error, .. } => GatewayError::new(
                502,
                "UNAVAILABLE",
                format!(
                    "keygate: the upstream of pool '{pool}' failed: {}",
                    error.etype().as_str()
                ),
            ),
            SendError::ClientGone => {
                GatewayError::new(499, "CANCELLED", "keygate: the client closed the request")
            }
        }
    }
}

/// The answer when the upstream has no address: at once, no key tried.
pub(super) fn unresolved_error(pool: &str, why: &str) -> GatewayError {
    GatewayError::new(
        502,
        "UNAVAILABLE",
        format!("keygate: pool '{pool}' cannot reach Google: {why}; no key was tried"),
    )
}

pub(super) fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
    )
}

/// What Google's answer means. An error body over the read limit is judged by its start.
/// `relay`: the upstream is a relay in front of Google, whose own refusals are told apart.
pub(super) fn classify_answer(answer: &Answer, relay: bool) -> Outcome {
    let status = answer.header.status.as_u16();
    let complete = answer.body.complete;
    if status < 400 {
        classify(status, &[])
    } else if relay {
        classify_relayed(status, &decoded_body(answer, MAX_CLASSIFY_BODY), complete)
    } else if complete {
        classify(status, &decoded_body(answer, MAX_CLASSIFY_BODY))
    } else {
        classify_prefix(status, &decoded_body(answer, MAX_CLASSIFY_BODY))
    }
}

/// The answer when the relay in front of Google refused a request itself (its own 401 or
/// 429): no key was at fault, and none would do better.
pub(super) fn relay_refused_error(pool: &Pool, status: u16) -> GatewayError {
    GatewayError::new(
        502,
        "UNAVAILABLE",
        format!(
            "keygate: the upstream of pool '{}' ({}) refused the request itself with {status}, not Google; no key was blamed (check the pool's upstream_headers)",
            pool.name(),
            pool.upstream.config().label()
        ),
    )
}

impl Gateway {
    /// Whether a key of `project`, just picked, may go: always, unless it is the probe of a
    /// cap and another instance claimed this interval's probe.
    async fn probe_is_ours(&self, keys: &KeyPool, project: u32, now: Millis) -> bool {
        let Some(probes) = self.shared.probes.get() else {
            return true;
        };
        let Some(cap) = keys.cap_of(project, now) else {
            return true;
        };
        let scope = cap.scope();
        let name = match scope {
            Scope::BillingAccount => keys.billing_account_of(project),
            Scope::Project => None,
        }
        .unwrap_or_else(|| keys.project_name(project));
        let every = keys.probe_every();
        probes
            .claim_probe(keys.name(), scope.as_str(), name, every)
            .await
    }

    /// The attempts of a request or a Live session's upgrade, as its [`Plan`] directs: each
    /// answer is classified, health changes go through the door, and the loop ends with the
    /// answer to hand on or keygate's own.
    pub(super) async fn attempts(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
    ) -> Ending {
        let keys = &job.keys;
        let mut plan = Plan::new(
            job.rt.retry,
            job.project,
            job.reserved.clone(),
            // A Live session names no resource keygate could look for.
            ctx.tenant.is_none() && matches!(job.kind, Kind::Request),
        );
        let mut last: Option<(Answer, KeyId, Outcome)> = None;
        let mut last_error: Option<SendError> = None;
        loop {
            let now = now_millis();
            let key = match plan.next(keys, job.model, job.method, now) {
                Next::Try(key) => key,
                Next::Exhausted {
                    exhaustion,
                    retry_after,
                    whole_pool,
                } => {
                    let pool = job.pool.name();
                    self.shared.metrics.pool_exhausted(pool, job.model);
                    if whole_pool {
                        self.shared.alert(Event::PoolExhausted {
                            pool: pool.to_string(),
                            model: job.model.to_string(),
                            retry_after_seconds: exhaustion
                                .retry_at
                                .map(|at| at.saturating_sub(now).div_ceil(1000)),
                        });
                    }
                    let whose = job.project;
                    return Ending::Failed(exhausted_error(
                        keys,
                        job.model,
                        &exhaustion,
                        retry_after,
                        whose,
                    ));
                }
                Next::FairShare => {
                    if let Some(t) = &ctx.tenant {
                        t.state.refused_fair_share.fetch_add(1, Relaxed);
                    }
                    let tenant = ctx.tenant.as_ref().map_or("-", |t| &*t.name);
                    let reserved = job.reserved.len();
                    return Ending::Failed(fair_share_error(keys, tenant, job.model, reserved));
                }
                Next::GiveLast => break,
            };
            let project = keys.key(key).project;
            // A key under a cap is a probe: the fleet's one for this interval, or none.
            if !self.probe_is_ours(keys, project, now).await {
                plan.skip(project);
                continue;
            }
            // The fair-share count is of requests the pool took, not of refused ones.
            if plan.attempts() == 1 {
                if let (Some(t), Some(fair)) = (&ctx.tenant, &job.pool.fair) {
                    fair.record(&t.name, now);
                }
            }
            let sent = Instant::now();
            let then = match self.send(session, job, key).await {
                // A client that hangs up ends the attempts: nobody would read the answer.
                Err(SendError::ClientGone) => return Ending::ClientGone,
                Err(SendError::Unresolved(why)) => {
                    return Ending::Failed(unresolved_error(job.pool.name(), &why))
                }
                Err(err) => {
                    ctx.attempts.push(AttemptLog {
                        key,
                        outcome: err.label(),
                        latency: None,
                    });
                    let stale = matches!(err, SendError::Exchange { reused: true, .. });
                    let then = plan.failed(project, stale);
                    // No retry left for an attempt that got no answer: that failure is the
                    // client's answer, not an older refusal.
                    if then == Then::Fail {
                        return Ending::Failed(err.into_gateway_error(keys.name()));
                    }
                    last_error = Some(err);
                    then
                }
                Ok(mut answer) => {
                    let latency = Some(sent.elapsed());
                    let outcome = classify_answer(&answer, job.pool.upstream.config().is_relay());
                    ctx.attempts.push(AttemptLog {
                        key,
                        outcome: outcome.label(),
                        latency,
                    });
                    self.note(keys, key, &outcome);
                    let verdict = outcome.verdict(Utc::now());
                    let then = plan.answered(project, &outcome, verdict, answer.body.complete);
                    match &then {
                        Then::Relay => {
                            self.shared.served(keys, key, job.model, now);
                            return Ending::Served { key, answer };
                        }
                        Then::Answer => {
                            return Ending::Refused {
                                key,
                                answer,
                                outcome,
                            }
                        }
                        Then::Penalise(penalty) => {
                            let change = Transition::penalise(penalty, job.model, job.method);
                            let changed =
                                self.shared.change_health(keys, key, change, Cause::Answer);
                            if is_news(penalty, &changed) {
                                self.shared.quota_events.push(quota_event(
                                    keys, key, job.model, &outcome, penalty, &changed, &answer,
                                ));
                            }
                        }
                        Then::NotGoogle => {
                            let status = answer.header.status.as_u16();
                            return Ending::Failed(relay_refused_error(&job.pool, status));
                        }
                        Then::Wait(_) | Then::Again | Then::Fail => {}
                    }
                    // Read whole: its connection goes back to the pool before any wait.
                    self.park(job, &mut answer.body).await;
                    last = Some((answer, key, outcome));
                    then
                }
            };
            match then {
                Then::Wait(wait) => {
                    let waited = watched(session, tokio::time::sleep(wait), None).await;
                    if matches!(waited, Waited::ClientGone) {
                        return Ending::ClientGone;
                    }
                }
                Then::Relay
                | Then::Answer
                | Then::Penalise(_)
                | Then::Again
                | Then::Fail
                | Then::NotGoogle => {}
            }
        }

        // Attempts exhausted, or only already-tried projects are left: give the client the
        // last real answer rather than an invented one (never one naming a key).
        match (last, last_error) {
            (Some((answer, key, outcome)), _) => Ending::Refused {
                key,
                answer,
                outcome,
            },
            (None, Some(err)) => Ending::Failed(err.into_gateway_error(keys.name())),
            (None, None) => Ending::Failed(GatewayError::new(
                503,
                "UNAVAILABLE",
                "keygate: no key could be tried",
            )),
        }
    }

    /// Logs outcomes an operator should hear about that change no key's health.
    pub(super) fn note(&self, pool: &KeyPool, key: KeyId, outcome: &Outcome) {
        match outcome {
            Outcome::LocationUnsupported => log::error!(
                "pool {}: Google says this gateway's location is not supported; no key will do better (use an egress in a supported region)",
                pool.name()
            ),
            Outcome::NoKeyReachedGoogle => log::error!(
                "pool {}: Google saw no API key on a request sent with {}: a keygate bug, please report it",
                pool.name(),
                pool.key(key).fingerprint
            ),
            _ => {}
        }
    }

    /// Sends an attempt on `key`: the request, or the Live session's upgrade. A refusal's body
    /// is read (up to what the classifier needs).
    pub(super) async fn send(
        &self,
        session: &mut Session,
        job: &Job<'_>,
        key: KeyId,
    ) -> Result<Answer, SendError> {
        match job.kind {
            Kind::Request => {
                let mut answer = self.send_request(session, &job.pool, job, key).await?;
                if !answer.header.status.is_success() {
                    read_up_to(&mut answer.body, MAX_CLASSIFY_BODY).await;
                }
                Ok(answer)
            }
            Kind::Upgrade { plain } => {
                let secret = job.keys.key(key).secret.expose();
                // Boxed, like the Live session itself: its state would otherwise enlarge every
                // request's attempt future (and its copies).
                let (http, header) = Box::pin(self.upgrade(job, secret, plain)).await?;
                let switched = header.status.as_u16() == 101;
                let mut body = AnswerBody {
                    http: Some(http),
                    peer: None,
                    read: Vec::new(),
                    complete: false,
                };
                if !switched {
                    read_up_to(&mut body, MAX_CLASSIFY_BODY).await;
                    // A refused handshake leaves the connection in no state to be reused.
                    body.http = None;
                }
                Ok(Answer { header, body })
            }
        }
    }

    /// Sends the request on `key` and reads the answer's header.
    pub(super) async fn send_request(
        &self,
        session: &mut Session,
        pool: &Pool,
        job: &Job<'_>,
        key: KeyId,
    ) -> Result<Answer, SendError> {
        let upstream = &pool.upstream;
        let timeouts = job.rt.timeouts;
        let Connection {
            mut http,
            peer,
            reused,
        } = connect(upstream, timeouts.connect, false).await?;
        let target = upstream.target(matches!(http, ClientSession::H2(_)));
        let req = request::upstream_request(
            &job.outgoing,
            &job.forward,
            job.keys.key(key).secret.expose(),
            &target,
        )
        .map_err(|error| SendError::Exchange {
            error,
            reused: false,
        })?;
        // The header's wait is timed with the client's watch, by one timer (see [`watched`]);
        // the rest of the answer is read under Pingora's per-read timeout.
        http.set_read_timeout(None);
        http.set_write_timeout(Some(timeouts.write));
        write_request(&mut http, req, &job.body)
            .await
            .map_err(|error| SendError::Exchange { error, reused })?;
        match watched(session, read_final_header(&mut http), Some(timeouts.read)).await {
            Waited::Done(Ok(())) => {}
            Waited::ClientGone => return Err(SendError::ClientGone),
            Waited::Done(Err(error)) => return Err(SendError::Exchange { error, reused }),
            Waited::TimedOut => {
                let error = Error::explain(ErrorType::ReadTimedout, "no answer header in time");
                return Err(SendError::Exchange { error, reused });
            }
        }
        http.set_read_timeout(Some(timeouts.read));
        let header = http
            .response_header()
            .cloned()
            .ok_or_else(|| SendError::Exchange {
                error: Error::explain(ErrorType::InvalidHTTPHeader, "no response header"),
                reused,
            })?;
        Ok(Answer {
            header,
            body: AnswerBody {
                http: Some(http),
                peer: Some(peer),
                read: Vec::new(),
                complete: false,
            },
        })
    }

    /// Returns a fully read answer's connection to the pool, keeping the bytes. Does nothing
    /// while the body is still being read.
    pub(super) async fn park(&self, job: &Job<'_>, body: &mut AnswerBody) {
        if !body.complete {
            return;
        }
        if let (Some(http), Some(peer)) = (body.http.take(), body.peer.take()) {
            release(&job.pool.upstream, http, &peer, job.rt.timeouts.idle).await;
        }
    }
}
