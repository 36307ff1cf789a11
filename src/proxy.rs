//! The Pingora hooks and the attempt loop.
//!
//! Everything happens in `request_filter`: authenticate the tenant, buffer the body (bounded),
//! then pick a key, send, read the answer's header (and for 4xx/5xx its small body), classify,
//! and either replay on another key or stream the answer to the client. Pingora's own retry is
//! not used: it replays at most 64 KiB of body and decides on headers alone.

use crate::classify::{self, classify, Outcome, Penalty, Verdict, MAX_CLASSIFY_BODY};
use crate::config::{Config, RetryPolicy, Timeouts};
use crate::error::GatewayError;
use crate::keys::{now_millis, Exhaustion, KeyId, KeyPool, Pick};
use crate::request::{self, Api};
use crate::tenants::{Auth, Tenants};
use crate::upstream::Upstream;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One pool at run time: its keys with their health, and its upstream.
pub struct PoolRuntime {
    /// Keys and health table.
    pub keys: KeyPool,
    /// Addresses and connections.
    pub upstream: Arc<Upstream>,
}

/// The gateway: what every request shares.
pub struct Gateway {
    pools: Vec<PoolRuntime>,
    tenants: Tenants,
    max_body: usize,
    retry: RetryPolicy,
    timeouts: Timeouts,
}

impl Gateway {
    /// Builds the gateway from a validated config.
    pub fn new(config: &Config) -> Gateway {
        Gateway {
            pools: config
                .pools
                .iter()
                .map(|p| PoolRuntime {
                    keys: KeyPool::new(p),
                    upstream: Arc::new(Upstream::new(p, config.timeouts)),
                })
                .collect(),
            tenants: Tenants::new(&config.tenants),
            max_body: config.max_body_bytes,
            retry: config.retry,
            timeouts: config.timeouts,
        }
    }

    /// Every pool's upstream, for the resolver service.
    pub fn upstreams(&self) -> Vec<Arc<Upstream>> {
        self.pools.iter().map(|p| p.upstream.clone()).collect()
    }
}

/// Per-request state, also what the access log line is made of.
pub struct Ctx {
    started: Instant,
    /// `METHOD /path?query` without any `key=` parameter.
    target: String,
    tenant: Option<Arc<str>>,
    model: String,
    /// Index of the pool serving the request: the first, until pools are chosen by model.
    pool: usize,
    attempts: Vec<AttemptLog>,
    status: u16,
}

/// One upstream attempt, for the access log.
struct AttemptLog {
    key: KeyId,
    outcome: &'static str,
}

/// An upstream answer whose header has arrived.
struct Answer {
    header: ResponseHeader,
    body: AnswerBody,
}

/// An answer's body: the bytes read so far, and the connection the rest comes from.
struct AnswerBody {
    /// The connection, while the body is still to be read from it.
    http: Option<ClientSession>,
    peer: Option<Arc<HttpPeer>>,
    /// Body bytes already read.
    read: Vec<Bytes>,
    /// Whether `read` holds the whole body.
    complete: bool,
}

/// Why an attempt got no answer.
enum SendError {
    /// The host has no resolved address.
    Unresolved,
    /// Connecting (TCP or TLS) failed.
    Connect(Box<Error>),
    /// The exchange failed after connecting; `reused` says whether the connection came from
    /// the pool (a stale pooled connection is retried at once).
    Exchange { error: Box<Error>, reused: bool },
}

impl SendError {
    fn label(&self) -> &'static str {
        match self {
            SendError::Unresolved => "unresolved",
            SendError::Connect(_) => "connect_error",
            SendError::Exchange { error, .. } if is_timeout(error) => "timeout",
            SendError::Exchange { .. } => "upstream_error",
        }
    }

    fn into_gateway_error(self, pool: &str) -> GatewayError {
        match self {
            SendError::Unresolved => GatewayError::new(
                502,
                "UNAVAILABLE",
                format!("keygate: the upstream of pool '{pool}' has not resolved to any address"),
            ),
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
        }
    }
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
    )
}

/// Everything the attempt loop needs about the request.
struct Job<'a> {
    forward: request::Forward<'a>,
    body: Bytes,
    model: &'a str,
    method: &'a str,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            target: String::new(),
            tenant: None,
            model: String::new(),
            pool: 0,
            attempts: Vec::new(),
            status: 0,
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Never reached: request_filter always answers the request itself.
        Error::e_explain(
            ErrorType::InternalError,
            "keygate answers every request in request_filter",
        )
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let path_and_query = request::clean_path_and_query(req);
        ctx.target = format!("{} {}", req.method, path_and_query);

        let Some(api) = request::api_of(&path) else {
            let e = GatewayError::new(
                404,
                "NOT_FOUND",
                "keygate forwards /v1/, /v1beta/, /v1alpha/ and /upload/ paths only",
            );
            return respond(session, ctx, None, &e).await;
        };

        match self
            .tenants
            .authenticate(request::client_token(req).as_deref())
        {
            Auth::Open => {}
            Auth::Tenant(name) => ctx.tenant = Some(name),
            Auth::Missing | Auth::Wrong => {
                let e = GatewayError::new(
                    401,
                    "UNAUTHENTICATED",
                    "keygate: missing or unknown gateway token; send your keygate token where \
                     your SDK sends its API key (x-goog-api-key, ?key=, Authorization: Bearer \
                     or X-Access-Token)",
                );
                // The body was not read: do not reuse the connection.
                session.set_keepalive(None);
                return respond(session, ctx, Some(api), &e).await;
            }
        }

        let body = match read_body(session, self.max_body).await? {
            Some(body) => body,
            None => {
                let e = GatewayError::new(
                    413,
                    "INVALID_ARGUMENT",
                    format!(
                        "keygate: request body larger than max_body_bytes ({} bytes)",
                        self.max_body
                    ),
                );
                session.set_keepalive(None);
                return respond(session, ctx, Some(api), &e).await;
            }
        };

        let model = match api {
            Api::Gemini => request::model_from_path(&path).map(str::to_string),
            Api::OpenAi => request::model_from_openai_body(&body),
        }
        .unwrap_or_default();
        ctx.model = model.clone();
        let job = Job {
            forward: request::Forward {
                api,
                path_and_query: &path_and_query,
                body_len: body.len(),
            },
            body,
            model: &model,
            method: request::method_of(&path),
        };
        self.attempt_loop(session, ctx, &job).await
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        let status = match ctx.status {
            0 => session.response_written().map_or(0, |r| r.status.as_u16()),
            s => s,
        };
        let pool = &self.pools[ctx.pool].keys;
        let attempts: Vec<String> = ctx
            .attempts
            .iter()
            .map(|a| format!("{}:{}", pool.key(a.key).fingerprint, a.outcome))
            .collect();
        let error = error
            .map(|e| format!(" error={}", e.etype().as_str()))
            .unwrap_or_default();
        log::info!(
            target: "keygate::access",
            "tenant={} \"{}\" model={} status={} attempts=[{}] ms={}{}",
            ctx.tenant.as_deref().unwrap_or("-"),
            ctx.target,
            if ctx.model.is_empty() { "-" } else { &ctx.model },
            status,
            attempts.join(","),
            ctx.started.elapsed().as_millis(),
            error
        );
    }

    fn request_summary(&self, _session: &Session, ctx: &Ctx) -> String {
        // Pingora's default summary prints the raw URI, `?key=` included: never use it.
        ctx.target.clone()
    }
}

impl Gateway {
    async fn attempt_loop(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
    ) -> pingora::Result<bool> {
        let pool = &self.pools[ctx.pool];
        // Projects not to use again for this request: `avoid` because they refused it
        // (quota, billing), `prefer_not` because they just failed transiently; the latter
        // are used again when no other project is left.
        let mut avoid: Vec<u32> = Vec::new();
        let mut prefer_not: Vec<u32> = Vec::new();
        let mut transient_left = self.retry.transient_retries;
        let mut backoff = self.retry.backoff;
        let mut stale_retry_left = true;
        let mut last: Option<Answer> = None;
        let mut last_error: Option<SendError> = None;

        for _ in 0..self.retry.max_attempts {
            let now = now_millis();
            let both: Vec<u32> = avoid.iter().chain(&prefer_not).copied().collect();
            let pick = match pool.keys.pick(job.model, job.method, &both, now) {
                Pick::OnlyTriedProjects if !prefer_not.is_empty() => {
                    prefer_not.clear();
                    pool.keys.pick(job.model, job.method, &avoid, now)
                }
                pick => pick,
            };
            let key = match pick {
                Pick::Key(k) => k,
                Pick::Exhausted(ex) => {
                    let e = exhausted_error(&pool.keys, job.model, &ex);
                    return respond(session, ctx, Some(job.forward.api), &e).await;
                }
                Pick::OnlyTriedProjects => break,
            };
            let project = pool.keys.key(key).project;
            let mut answer = match self.send(pool, job, session.req_header(), key).await {
                Ok(a) => a,
                Err(err) => {
                    ctx.attempts.push(AttemptLog {
                        key,
                        outcome: err.label(),
                    });
                    let stale = matches!(err, SendError::Exchange { reused: true, .. });
                    if stale && stale_retry_left {
                        stale_retry_left = false;
                    } else if transient_left > 0 {
                        transient_left -= 1;
                        prefer_not.push(project);
                        sleep_backoff(&mut backoff).await;
                    } else {
                        let e = err.into_gateway_error(pool.keys.name());
                        return respond(session, ctx, Some(job.forward.api), &e).await;
                    }
                    last_error = Some(err);
                    continue;
                }
            };

            let status = answer.header.status.as_u16();
            let transient_status = classify(status, &[]) == Outcome::ServerError;
            let outcome = if classify::needs_body(status) || transient_status {
                read_up_to(&mut answer.body, MAX_CLASSIFY_BODY).await;
                if answer.body.complete {
                    classify(status, &decoded_body(&answer))
                } else if transient_status {
                    Outcome::ServerError
                } else {
                    Outcome::ClientError
                }
            } else {
                classify(status, &[])
            };
            ctx.attempts.push(AttemptLog {
                key,
                outcome: outcome.label(),
            });
            self.note(&pool.keys, key, &outcome);

            let mut back_off = false;
            match outcome.verdict(Utc::now()) {
                Verdict::PassThrough => return self.relay(session, ctx, pool, answer).await,
                Verdict::OtherKey(penalty) => {
                    pool.keys.penalise(key, job.model, job.method, &penalty);
                    match penalty {
                        Penalty::CoolProjectModel { .. } | Penalty::DisableProject => {
                            avoid.push(project)
                        }
                        // The key, not its project, is at fault: other projects first, but the
                        // project's other keys remain a fallback.
                        Penalty::DisableKey(_) | Penalty::BlockMethod => prefer_not.push(project),
                    }
                }
                Verdict::Transient => {
                    if transient_left == 0 || !answer.body.complete {
                        return self.relay(session, ctx, pool, answer).await;
                    }
                    transient_left -= 1;
                    prefer_not.push(project);
                    back_off = true;
                }
            }
            // The answer was read whole: its connection goes back to the pool before any wait.
            self.park(pool, &mut answer.body).await;
            last = Some(answer);
            if back_off {
                sleep_backoff(&mut backoff).await;
            }
        }

        // Attempts exhausted, or only already-tried projects are left: give the client the
        // last real answer rather than an invented one.
        match (last, last_error) {
            (Some(answer), _) => self.relay(session, ctx, pool, answer).await,
            (None, Some(err)) => {
                let e = err.into_gateway_error(pool.keys.name());
                respond(session, ctx, Some(job.forward.api), &e).await
            }
            (None, None) => {
                let e = GatewayError::new(503, "UNAVAILABLE", "keygate: no key could be tried");
                respond(session, ctx, Some(job.forward.api), &e).await
            }
        }
    }

    /// Logs outcomes an operator should hear about.
    fn note(&self, pool: &KeyPool, key: KeyId, outcome: &Outcome) {
        let fp = &pool.key(key).fingerprint;
        match outcome {
            Outcome::KeyDead(reason) => log::warn!(
                "pool {}: disabling {fp}: {}; it stays out until restart or reload",
                pool.name(),
                reason.as_str()
            ),
            Outcome::BillingExhausted => log::warn!(
                "pool {}: project {} is out of prepaid credit (402); its keys stay out until restart or reload",
                pool.name(),
                pool.project_name(pool.key(key).project)
            ),
            Outcome::LocationUnsupported => log::error!(
                "pool {}: Google says this gateway's location is not supported; no key will do better (use an egress in a supported region)",
                pool.name()
            ),
            Outcome::NoKeyReachedGoogle => log::error!(
                "pool {}: Google saw no API key on a request sent with {fp}: a keygate bug, please report it",
                pool.name()
            ),
            _ => {}
        }
    }

    /// Sends the request on `key` and reads the answer's header.
    async fn send(
        &self,
        pool: &PoolRuntime,
        job: &Job<'_>,
        client: &RequestHeader,
        key: KeyId,
    ) -> Result<Answer, SendError> {
        let upstream = &pool.upstream;
        let peer = upstream
            .peer(self.timeouts.connect)
            .await
            .ok_or(SendError::Unresolved)?;
        let (mut http, reused) = upstream
            .connector
            .get_http_session(&*peer)
            .await
            .map_err(SendError::Connect)?;
        let target = request::Target {
            authority: upstream.authority(),
            tls: upstream.tls(),
            h2: matches!(http, ClientSession::H2(_)),
        };
        let req = request::upstream_request(
            client,
            &job.forward,
            pool.keys.key(key).secret.expose(),
            &target,
        )
        .map_err(|error| SendError::Exchange {
            error,
            reused: false,
        })?;
        http.set_read_timeout(Some(self.timeouts.read));
        http.set_write_timeout(Some(self.timeouts.write));
        exchange(&mut http, req, &job.body)
            .await
            .map_err(|error| SendError::Exchange { error, reused })?;
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
    async fn park(&self, pool: &PoolRuntime, body: &mut AnswerBody) {
        if !body.complete {
            return;
        }
        if let (Some(http), Some(peer)) = (body.http.take(), body.peer.take()) {
            release(&pool.upstream, http, &peer, self.timeouts.idle).await;
        }
    }

    /// Streams an answer to the client, chunk by chunk as it arrives.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        pool: &PoolRuntime,
        answer: Answer,
    ) -> pingora::Result<bool> {
        let Answer {
            mut header,
            mut body,
        } = answer;
        let head = session.req_header().method == http::Method::HEAD;
        prepare_downstream_header(&mut header, head)?;
        ctx.status = header.status.as_u16();
        // The upstream connection goes back to the pool as soon as its body is complete, before
        // the client has the end of the answer: its next request can then reuse it.
        self.park(pool, &mut body).await;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        for chunk in std::mem::take(&mut body.read) {
            session.write_response_body(Some(chunk), false).await?;
        }
        while let Some(http) = body.http.as_mut() {
            let chunk = http.read_response_body().await?;
            body.complete = chunk.is_none() || http.response_done();
            self.park(pool, &mut body).await;
            match chunk {
                Some(chunk) => session.write_response_body(Some(chunk), false).await?,
                None => break,
            }
        }
        session.write_response_body(None, true).await?;
        Ok(true)
    }
}

/// Writes the request and reads the final (non-1xx) response header.
async fn exchange(
    http: &mut ClientSession,
    req: RequestHeader,
    body: &Bytes,
) -> pingora::Result<()> {
    let cork = crate::upstream::Cork::hold(http);
    http.write_request_header(Box::new(req)).await?;
    if !body.is_empty() {
        http.write_request_body(body.clone(), true).await?;
    }
    http.finish_request_body().await?;
    drop(cork); // header and body leave together now
    loop {
        http.read_response_header().await?;
        let informational = http.response_header().is_some_and(|h| {
            h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS
        });
        if !informational || !matches!(http, ClientSession::H1(_)) {
            return Ok(());
        }
    }
}

/// Reads the answer's body until it ends or `limit` bytes are buffered.
async fn read_up_to(body: &mut AnswerBody, limit: usize) {
    let Some(http) = body.http.as_mut() else {
        return;
    };
    let mut size: usize = body.read.iter().map(Bytes::len).sum();
    while size <= limit {
        match http.read_response_body().await {
            Ok(Some(chunk)) => {
                size += chunk.len();
                body.read.push(chunk);
            }
            Ok(None) => {
                body.complete = true;
                return;
            }
            Err(e) => {
                log::debug!("reading an error body failed: {e}");
                return;
            }
        }
    }
}

/// The buffered body, gunzipped when Google compressed it.
fn decoded_body(answer: &Answer) -> Vec<u8> {
    let raw: Vec<u8> = answer.body.read.concat();
    let gzip = answer
        .header
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
    if !gzip {
        return raw;
    }
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(raw.as_slice());
    match decoder
        .take(MAX_CLASSIFY_BODY as u64 * 16)
        .read_to_end(&mut out)
    {
        Ok(_) => out,
        Err(_) => Vec::new(),
    }
}

async fn release(upstream: &Upstream, mut http: ClientSession, peer: &HttpPeer, idle: Duration) {
    if let ClientSession::H1(h1) = &mut http {
        h1.respect_keepalive();
    }
    upstream
        .connector
        .release_http_session(http, peer, Some(idle))
        .await;
}

async fn sleep_backoff(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Turns an upstream response header into one fit for the client connection: hop-by-hop
/// headers removed, HTTP/1.1 framing chosen (chunked when the length is unknown).
fn prepare_downstream_header(
    header: &mut ResponseHeader,
    head_request: bool,
) -> pingora::Result<()> {
    for name in request::connection_listed(&header.headers) {
        header.remove_header(&name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
    ] {
        header.remove_header(name);
    }
    header.set_version(http::Version::HTTP_11);
    let no_body = head_request
        || matches!(header.status.as_u16(), 204 | 304)
        || header.status.is_informational();
    if !no_body && header.headers.get(header::CONTENT_LENGTH).is_none() {
        header.insert_header(header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

/// Reads the whole request body; `None` when it is larger than `limit`.
async fn read_body(session: &mut Session, limit: usize) -> pingora::Result<Option<Bytes>> {
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await?;
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = session.read_request_body().await? {
        total += chunk.len();
        if total > limit {
            return Ok(None);
        }
        chunks.push(chunk);
    }
    Ok(Some(match chunks.len() {
        0 => Bytes::new(),
        // The common case, one chunk: no copy.
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    }))
}

/// The answer for "no key can serve this model now".
fn exhausted_error(pool: &KeyPool, model: &str, ex: &Exhaustion) -> GatewayError {
    let what = if model.is_empty() {
        String::new()
    } else {
        format!(" for model '{model}'")
    };
    match ex.retry_at {
        Some(at) => {
            let secs = at.saturating_sub(now_millis()).div_ceil(1000).max(1);
            GatewayError {
                code: 429,
                status: "RESOURCE_EXHAUSTED",
                message: format!(
                    "keygate: every key of pool '{}' is out of quota{what} ({} cooling, {} disabled); the first one is back in {secs} s",
                    pool.name(),
                    ex.cooling,
                    ex.disabled
                ),
                retry_after: Some(secs),
            }
        }
        None => GatewayError::new(
            503,
            "UNAVAILABLE",
            format!(
                "keygate: no key of pool '{}' can serve{what}: all {} are disabled (invalid, suspended or out of credit); an operator must add or fix keys",
                pool.name(),
                ex.disabled
            ),
        ),
    }
}

/// Writes one of keygate's own answers.
async fn respond(
    session: &mut Session,
    ctx: &mut Ctx,
    api: Option<Api>,
    e: &GatewayError,
) -> pingora::Result<bool> {
    let body = e.body(api);
    let mut resp = ResponseHeader::build(e.code, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json; charset=UTF-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    if let Some(secs) = e.retry_after {
        resp.insert_header(header::RETRY_AFTER, secs)?;
    }
    ctx.status = e.code;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}
