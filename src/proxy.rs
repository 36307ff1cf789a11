//! The Pingora hooks and the attempt loop.
//!
//! Everything happens in `request_filter`: authenticate the tenant, buffer the body (bounded),
//! then pick a key, send, read the answer's header (and for 4xx/5xx its small body), classify,
//! and either replay on another key or stream the answer to the client. Pingora's own retry is
//! not used: it replays at most 64 KiB of body and decides on headers alone.

use crate::affinity;
use crate::alerts::Event;
use crate::classify::{self, classify, classify_prefix, Outcome, Penalty, MAX_CLASSIFY_BODY};
use crate::config::{ClientLimits, RetryPolicy, Timeouts};
use crate::cors;
use crate::endpoints;
use crate::error::GatewayError;
use crate::guard::{self, Reservation};
use crate::health::{self, Cause};
use crate::keys::{now_millis, Disabled, Exhaustion, KeyId, KeyPool, Millis, Transition};
use crate::live_frames;
use crate::logging::printable;
use crate::names;
use crate::path;
use crate::plan::{Next, Plan, Then};
use crate::request::{self, Api};
use crate::runtime::{Pool, Route, Runtime, Shared};
use crate::tenants::{Auth, InFlight, Refusal, Tenant};
use crate::upstream::Upstream;
use crate::usage::BodyTap;
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
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The gateway: the Pingora proxy over the shared runtime.
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// A gateway serving `shared` (which the admin API may change under it).
    pub fn new(shared: Arc<Shared>) -> Gateway {
        Gateway { shared }
    }
}

/// Per-request state, also what the access log line is made of.
pub struct Ctx {
    started: Instant,
    /// `METHOD /path?query` without any `key=` parameter.
    target: String,
    tenant: Option<Arc<Tenant>>,
    /// The tenant's concurrency slot, released when the context is dropped.
    in_flight: Option<InFlight>,
    model: String,
    /// The keys the attempts used, to name them in the access line.
    keys: Option<Arc<KeyPool>>,
    /// The pool serving the request, once chosen.
    pool: Option<Arc<Pool>>,
    /// CORS headers every answer to this request carries (an allowed browser origin).
    cors: Vec<(&'static str, String)>,
    /// Request body bytes read, response body bytes written.
    request_bytes: u64,
    response_bytes: u64,
    attempts: Vec<AttemptLog>,
    status: u16,
    /// Google served the request (a 2xx was relayed): its model may become a metric label.
    served: bool,
    /// The request body's share of the memory budget for bodies.
    body_reservation: Option<Reservation>,
}

/// The status logged for a request whose client hung up before its answer (nginx's 499).
const CLIENT_GONE: u16 = 499;

/// One upstream attempt, for the access log.
struct AttemptLog {
    key: KeyId,
    outcome: &'static str,
    /// Time from sending to the answer's header, when one came.
    latency: Option<Duration>,
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

impl SendError {
    fn label(&self) -> &'static str {
        match self {
            SendError::Unresolved(_) => "unresolved",
            SendError::Connect(_) => "connect_error",
            SendError::Exchange { error, .. } if is_timeout(error) => "timeout",
            SendError::Exchange { .. } => "upstream_error",
            SendError::ClientGone => "client_gone",
        }
    }

    fn into_gateway_error(self, pool: &str) -> GatewayError {
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
fn unresolved_error(pool: &str, why: &str) -> GatewayError {
    GatewayError::new(
        502,
        "UNAVAILABLE",
        format!("keygate: pool '{pool}' cannot reach Google: {why}; no key was tried"),
    )
}

fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
    )
}

/// What a successful answer teaches keygate, decided before the request goes out.
enum Learn {
    /// Nothing beyond token usage.
    Nothing,
    /// A resumable upload starts: hand out keygate's own upload URL instead of Google's.
    UploadStart {
        /// `scheme://host[:port]` the client reached keygate at.
        public_base: String,
    },
    /// Bytes of an upload keygate handed out; the final answer names the new file.
    UploadContinue {
        /// keygate's upload id.
        id: String,
    },
    /// A request that may create resources (caches, batches, operations...): the answer names
    /// them.
    Create,
    /// A successful DELETE of these resources.
    Delete(Vec<String>),
    /// A listing of project-bound resources, shown to a tenant: only its own entries stay.
    List,
    /// A read of a known resource (an operation, a batch): files its answer names (a generated
    /// video, a batch's results) belong to the same owner.
    Read,
}

/// Everything the attempt loop needs about the request.
struct Job<'a> {
    /// What the attempts send of the client's request.
    outgoing: request::Outgoing,
    forward: request::Forward<'a>,
    body: Bytes,
    model: &'a str,
    method: &'a str,
    pool: Arc<Pool>,
    keys: Arc<KeyPool>,
    /// Only keys of this project may serve (a resource Google bound to it).
    project: Option<u32>,
    /// Resources the request names that keygate does not know the owner of yet: bound to the
    /// project that serves the request successfully.
    unbound: Vec<String>,
    learn: Learn,
    /// Projects this request may not use: left to tenants lighter than this one.
    reserved: Vec<u32>,
    /// The retry policy of the request's runtime snapshot.
    retry: RetryPolicy,
    kind: Kind,
}

/// What an attempt sends.
#[derive(Clone, Copy)]
enum Kind {
    /// The client's request.
    Request,
    /// A Live session's WebSocket upgrade. `plain`: ask for no per-message compression, so
    /// that keygate can read the client's messages.
    Upgrade { plain: bool },
}

/// How the attempts ended.
enum Ending {
    /// Google served (2xx; 101 for a Live session): hand the answer on.
    Served { key: KeyId, answer: Answer },
    /// Google's answer for the client to read as it is (its own mistake, or the last refusal).
    Refused {
        key: KeyId,
        answer: Answer,
        outcome: Outcome,
    },
    /// keygate's own answer: the pool is exhausted, the tenant's share used, no upstream answer.
    Failed(GatewayError),
    /// The client hung up.
    ClientGone,
}

/// What Google's answer means. An error body over the read limit is judged by its start.
fn classify_answer(answer: &Answer) -> Outcome {
    let status = answer.header.status.as_u16();
    if status < 400 {
        classify(status, &[])
    } else if answer.body.complete {
        classify(status, &decoded_body(answer, MAX_CLASSIFY_BODY))
    } else {
        classify_prefix(status, &decoded_body(answer, MAX_CLASSIFY_BODY))
    }
}

/// Largest answer body read to learn the names of created resources.
const CREATED_ANSWER_LIMIT: usize = 256 * 1024;

/// Largest listing answer filtered for a tenant; a larger one is withheld (ask for a smaller
/// `pageSize`).
const LISTING_LIMIT: usize = 8 * 1024 * 1024;

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            target: String::new(),
            tenant: None,
            in_flight: None,
            model: String::new(),
            keys: None,
            pool: None,
            cors: Vec::new(),
            request_bytes: 0,
            response_bytes: 0,
            attempts: Vec::new(),
            status: 0,
            served: false,
            body_reservation: None,
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
        // The header is in: its deadline no longer applies.
        guard::header_received(session.stream());
        let rt = self.shared.runtime.load_full();
        // A client that stops reading its answer is dropped, with what it holds upstream.
        session.set_write_timeout(Some(rt.client_limits.send_timeout));
        let req = session.req_header();
        let query = path::split_query(req.uri.query());
        let canonical = path::canonical(req.uri.path());
        let logged_path = canonical.as_deref().unwrap_or(req.uri.path());
        let target = request::with_query(logged_path, query.forwarded.as_deref());
        ctx.target = format!(
            "{} {}",
            req.method,
            printable(&affinity::redact_upload_id(&target))
        );
        match rt.cors.as_ref().map(|c| c.verdict(req)) {
            Some(cors::Verdict::Preflight(headers)) => {
                ctx.cors = headers;
                return respond_empty(session, ctx, 204).await;
            }
            Some(cors::Verdict::Refused) => {
                let e = GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    "keygate: this origin may not call keygate from a browser (cors.allowed_origins)",
                );
                return respond(session, ctx, None, &e).await;
            }
            Some(cors::Verdict::Allowed(headers)) => ctx.cors = headers,
            _ => {}
        }
        // What keygate routes by is what Google serves: a path the two could read differently
        // is refused before anything else looks at it.
        let path = match canonical {
            Ok(path) => path,
            Err(why) => {
                let e = GatewayError::new(400, "INVALID_ARGUMENT", format!("keygate: {why}"));
                return refuse(session, ctx, Api::Gemini, &e).await;
            }
        };
        // Tools that only take an "OpenAI base URL" append /chat/completions & co. to it.
        let path = request::openai_alias(&path, req, query.key.is_some()).unwrap_or(path);
        let path_and_query = request::with_query(&path, query.forwarded.as_deref());

        let Some(api) = request::api_of(&path) else {
            let e = GatewayError::new(
                404,
                "NOT_FOUND",
                "keygate forwards /v1/, /v1beta/, /v1alpha/, /upload/ and /ws/google.ai.generativelanguage.* paths, and the OpenAI-style /v1/chat/completions, /v1/embeddings, /v1/models",
            );
            return respond(session, ctx, None, &e).await;
        };

        // The bytes of a resumable upload come with keygate's upload id and, from the SDKs, no
        // credential: the id (unguessable, bound to a tenant) is the credential then.
        let upload_id = path
            .starts_with("/upload/")
            .then(|| query.forwarded.as_deref().and_then(affinity::upload_id_of))
            .flatten()
            .map(str::to_string);
        let token = request::client_token(req, query.key.as_deref());
        let tenant = match rt.tenants.authenticate(token.as_deref()) {
            Auth::Open => None,
            Auth::Tenant(t) => Some(t),
            Auth::Missing if upload_id.is_some() => None,
            Auth::Missing | Auth::Wrong => {
                let e = GatewayError::new(
                    401,
                    "UNAUTHENTICATED",
                    "keygate: missing or unknown gateway token; send your keygate token where \
                     your SDK sends its API key (x-goog-api-key, ?key=, Authorization: Bearer \
                     or X-Access-Token)",
                );
                return refuse(session, ctx, api, &e).await;
            }
        };
        let now = now_millis();
        let upload = match &upload_id {
            None => None,
            Some(id) => match self.shared.uploads.get(id, now) {
                Some(up) if tenant.is_none() || tenant_name(&tenant) == up.owner.tenant => {
                    Some((id.clone(), up))
                }
                found => {
                    let e = match found {
                        Some(_) => GatewayError::new(
                            403,
                            "PERMISSION_DENIED",
                            "keygate: this upload was started by another tenant",
                        ),
                        None => GatewayError::new(
                            404,
                            "NOT_FOUND",
                            "keygate: unknown or expired upload id; start the upload again",
                        ),
                    };
                    return refuse(session, ctx, api, &e).await;
                }
            },
        };
        // An upload continuation without a credential counts against the tenant that started it.
        let tenant = tenant.or_else(|| {
            let owner = upload.as_ref()?.1.owner.tenant.as_deref()?;
            rt.tenants.by_name(owner).cloned()
        });
        ctx.tenant = tenant.clone();

        if let Some(t) = &tenant {
            match t.admit(now_micros()) {
                Ok(slot) => ctx.in_flight = Some(slot),
                Err(refusal) => {
                    let e = limit_error(&t.name, refusal);
                    return refuse(session, ctx, api, &e).await;
                }
            }
        }

        if request::is_live_api(&path) {
            let forwarded = query.forwarded.as_deref();
            let refusal = tenant
                .as_ref()
                .and_then(|_| endpoints::live_refusal(&path, forwarded));
            if let Some(e) = refusal {
                return refuse(session, ctx, api, &e).await;
            }
            return self
                .websocket(session, ctx, &rt, tenant.as_deref(), &path_and_query)
                .await;
        }
        // With tenants, only endpoints keygate can keep tenants apart on go through, with bodies
        // it reads the way Google will.
        if tenant.is_some() {
            let req = session.req_header();
            let forwarded = query.forwarded.as_deref();
            if let Some(e) = endpoints::refusal_before_body(req, &path, forwarded, upload.is_some())
            {
                return refuse(session, ctx, api, &e).await;
            }
        }

        let share = tenant
            .as_ref()
            .filter(|_| rt.tenants.list().len() > 1)
            .map(|t| t.state.buffered.clone());
        let budget = self.shared.body_budget.reservation(share);
        let body = match read_body(session, rt.max_body, budget, &rt.client_limits).await? {
            BodyRead::Body(body, reservation) => {
                ctx.body_reservation = Some(reservation);
                body
            }
            BodyRead::ClientGone => return Ok(client_gone(session, ctx)),
            refused => {
                let e = body_error(&refused, rt.max_body);
                return refuse(session, ctx, api, &e).await;
            }
        };

        ctx.request_bytes = body.len() as u64;
        // What keygate reads in a tenant's body must be what Google reads (an upload's bytes
        // are media).
        if tenant.is_some() && upload.is_none() {
            let method = &session.req_header().method;
            let forwarded = query.forwarded.as_deref();
            if let Some(e) = endpoints::refusal_of_body(method, &path, forwarded, &body) {
                return refuse(session, ctx, api, &e).await;
            }
        }
        let is_post = session.req_header().method == http::Method::POST;
        let creates = is_post && creates_resources(&path);
        let model = match request::model_of(api, &path, creates, &body) {
            Ok(model) => model,
            Err(why) => {
                let e = GatewayError::new(400, "INVALID_ARGUMENT", format!("keygate: {why}"));
                return respond(session, ctx, Some(api), &e).await;
            }
        };
        ctx.model = model.clone();
        // An OpenAI-style batch names its models inside an uploaded file, which keygate does not
        // read: a tenant held to some pools may not start one.
        if let Some(t) = &tenant {
            let batch =
                api == Api::OpenAi && is_post && request::method_of(&path).starts_with("batches");
            if batch && t.pools.len() < rt.pools.len() {
                let e = GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    "keygate: OpenAI-style batches name their models inside the uploaded file, which keygate cannot check against this tenant's pools; use the native batch API (models/{model}:batchGenerateContent)",
                );
                return respond(session, ctx, Some(api), &e).await;
            }
        }

        let placed = match upload {
            Some((id, up)) => self.place_upload(&rt, id, up),
            None => self.place(
                &rt,
                session.req_header(),
                tenant.as_deref(),
                &path,
                &model,
                &body,
                session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip()),
                now,
            ),
        };
        let placed = match placed {
            Ok(p) => p,
            Err(e) => return respond(session, ctx, Some(api), &e).await,
        };
        let keys = placed.pool.keys.load_full();
        ctx.keys = Some(keys.clone());
        ctx.pool = Some(placed.pool.clone());
        let project = match &placed.project {
            None => None,
            Some(name) => match keys.project_index(name) {
                Some(p) => Some(p),
                None => {
                    let e = GatewayError::new(
                        503,
                        "UNAVAILABLE",
                        format!(
                            "keygate: the resource this request names belongs to project '{name}', which no longer has keys in pool '{}'",
                            placed.pool.name()
                        ),
                    );
                    return respond(session, ctx, Some(api), &e).await;
                }
            },
        };
        // No address for the upstream: say so at once, without spending attempts on keys.
        if let Err(why) = placed
            .pool
            .upstream
            .wait_resolved(rt.timeouts.connect)
            .await
        {
            let e = unresolved_error(placed.pool.name(), &why);
            return respond(session, ctx, Some(api), &e).await;
        }

        // A tenant that used the pool more than others lately leaves some projects to them.
        let mut reserved = Vec::new();
        if let Some(t) = &tenant {
            if project.is_none() && rt.tenants.list().len() > 1 {
                let lighter = placed.pool.fair.lighter_than(&t.name, now);
                if lighter > 0 {
                    reserved = keys.reserved_projects(&model, lighter, now);
                }
            }
        }

        let path_and_query = placed.path_and_query.unwrap_or(path_and_query);
        // The attempts build their requests from this, so the client connection stays free to be
        // watched for a hang-up while they run.
        let mut job = Job {
            outgoing: request::Outgoing::from_client(session.req_header()),
            forward: request::Forward {
                api,
                path_and_query: &path_and_query,
                body_len: body.len(),
            },
            body,
            model: &model,
            method: request::method_of(&path),
            pool: placed.pool,
            keys,
            project,
            unbound: placed.unbound,
            learn: placed.learn,
            reserved,
            retry: rt.retry,
            kind: Kind::Request,
        };
        match self.attempts(session, ctx, &job).await {
            Ending::Served { key, answer } => {
                // The body is not sent again: its memory goes back to the budget before a slow
                // reader can hold it for as long as the answer takes.
                job.body = Bytes::new();
                ctx.body_reservation = None;
                self.relay(session, ctx, &job, key, answer).await
            }
            Ending::Refused {
                key,
                answer,
                outcome,
            } => {
                self.relay_error(session, ctx, &job, key, answer, &outcome)
                    .await
            }
            Ending::Failed(e) => respond(session, ctx, Some(api), &e).await,
            Ending::ClientGone => Ok(client_gone(session, ctx)),
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        // The next request on this connection gets its own header deadline.
        guard::request_finished(session.stream());
        let status = match ctx.status {
            0 => session.response_written().map_or(0, |r| r.status.as_u16()),
            s => s,
        };
        if let Some(t) = &ctx.tenant {
            t.state.usage.requests.fetch_add(1, Relaxed);
        }
        let metrics = &self.shared.metrics;
        let pool_name = ctx.pool.as_ref().map_or("-", |p| p.name());
        for a in &ctx.attempts {
            metrics.attempt(pool_name, a.outcome);
            if let Some(latency) = a.latency {
                metrics.upstream_latency(pool_name, latency.as_secs_f64());
            }
        }
        // A model becomes a label value only once Google served it (a 2xx): names a client made
        // up cannot use up the bounded label set.
        let model = if ctx.pool.is_some() {
            ctx.model.as_str()
        } else {
            "-"
        };
        metrics.request(
            ctx.tenant.as_ref().map_or("-", |t| &*t.name),
            pool_name,
            model,
            ctx.served,
            status,
            ctx.attempts.len(),
            ctx.request_bytes,
            ctx.response_bytes,
        );
        let attempts: Vec<String> = match &ctx.keys {
            Some(keys) => ctx
                .attempts
                .iter()
                .map(|a| format!("{}:{}", keys.key(a.key).fingerprint, a.outcome))
                .collect(),
            None => Vec::new(),
        };
        let error = error
            .map(|e| format!(" error={}", e.etype().as_str()))
            .unwrap_or_default();
        log::info!(
            target: "keygate::access",
            "tenant={} \"{}\" model={} status={} attempts=[{}] ms={}{}",
            printable(ctx.tenant.as_ref().map_or("-", |t| &*t.name)),
            ctx.target,
            if ctx.model.is_empty() { "-".into() } else { printable(&ctx.model) },
            status,
            attempts.join(","),
            ctx.started.elapsed().as_millis(),
            error
        );
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // What a client does to its own connection (hanging up, stalling) is not an operator's
        // problem: the access line says what happened.
        error.esource() == &pingora::ErrorSource::Downstream
    }

    fn request_summary(&self, _session: &Session, ctx: &Ctx) -> String {
        // Pingora's default summary prints the raw URI, `?key=` included: never use it.
        ctx.target.clone()
    }
}

/// Where a request goes, decided before any attempt.
struct Placed {
    pool: Arc<Pool>,
    /// Name of the only project that may serve it.
    project: Option<String>,
    /// The upstream path, when it is not the client's (upload continuations).
    path_and_query: Option<String>,
    unbound: Vec<String>,
    learn: Learn,
}

impl Gateway {
    /// Chooses the pool (and, for resources bound to a project, the project) of a request.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        rt: &Runtime,
        req: &RequestHeader,
        tenant: Option<&Tenant>,
        path: &str,
        model: &str,
        body: &Bytes,
        peer: Option<std::net::IpAddr>,
        now: Millis,
    ) -> Result<Placed, GatewayError> {
        let tenants = !rt.tenants.list().is_empty();
        let mut names = names::names_in_path(path);
        if tenants || !self.shared.affinity.is_empty() {
            for name in names::names_in_body(body) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        // A batch from a file runs whatever requests the file holds, which keygate does not read.
        if tenants && creates_resources(path) && names::has_batch_input_file(body) {
            return Err(GatewayError::new(
                403,
                "PERMISSION_DENIED",
                "keygate: with tenants, a batch must carry its requests inline (inputConfig.requests): keygate cannot check the requests inside an input file",
            ));
        }
        if tenants && names.len() > names::MAX_NAMES {
            return Err(GatewayError::new(
                400,
                "INVALID_ARGUMENT",
                format!(
                    "keygate: a request may name at most {} files, caches or other resources",
                    names::MAX_NAMES
                ),
            ));
        }
        let is_post = req.method == http::Method::POST;
        let learn = if is_post && path.starts_with("/upload/") && request::is_upload_start(req) {
            Learn::UploadStart {
                public_base: self.public_base(rt, req, peer),
            }
        } else if req.method == http::Method::DELETE && !names.is_empty() {
            Learn::Delete(names.clone())
        } else if is_post && creates_resources(path) {
            Learn::Create
        } else if tenants && req.method == http::Method::GET && names::is_listing(path) {
            Learn::List
        } else if req.method == http::Method::GET && !names.is_empty() {
            Learn::Read
        } else {
            Learn::Nothing
        };
        // A name a create request chooses (an upload's `file.name`, a tuned model's id) must not
        // be another tenant's: its resource would be taken over.
        if tenants && matches!(learn, Learn::Create | Learn::UploadStart { .. }) {
            let mut chosen = names::chosen_names(body);
            if let Some(id) = query_value(req, "tunedModelId") {
                chosen.push(format!("tunedModels/{id}"));
            }
            let me = tenant.map(|t| t.name.clone());
            for name in chosen {
                if self
                    .shared
                    .affinity
                    .owner(&name, now)
                    .is_some_and(|o| o.tenant != me)
                {
                    return Err(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!("keygate: {name} belongs to another tenant"),
                    ));
                }
            }
        }

        // Every resource named must be this tenant's. One keygate does not know is refused with
        // tenants: searching the projects for it could find another tenant's.
        let tenant_name = tenant.map(|t| t.name.clone());
        let mut owner = None;
        let mut unbound = Vec::new();
        for name in names {
            match self.shared.affinity.owner(&name, now) {
                Some(o) if o.tenant != tenant_name => {
                    return Err(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!("keygate: {name} belongs to another tenant"),
                    ));
                }
                Some(o) => {
                    owner.get_or_insert((name, o));
                }
                None if tenants => {
                    return Err(GatewayError::new(
                        403,
                        "PERMISSION_DENIED",
                        format!(
                            "keygate: {name} is not known to keygate for this tenant: create it through keygate, or ask an operator to bind it (POST /admin/resources)"
                        ),
                    ));
                }
                None => unbound.push(name),
            }
        }
        if let Some((name, owner)) = owner {
            let allowed = rt
                .pool_index(&owner.pool)
                .filter(|i| tenant.is_none_or(|t| t.pools.contains(i)));
            let Some(i) = allowed else {
                return Err(GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!("keygate: {name} was created in a pool this tenant may not use"),
                ));
            };
            // A tenant's pools serve it the models they list, resources or not. (A tuned model
            // is the resource itself.)
            let pool = &rt.pools[i];
            let tuned = model.starts_with("tunedModels/");
            if tenant.is_some() && !model.is_empty() && !tuned && !pool.config.serves(model) {
                return Err(GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    format!(
                        "keygate: {name} is in pool '{}', which does not serve model '{}'",
                        pool.name(),
                        printable(model)
                    ),
                ));
            }
            return Ok(Placed {
                pool: rt.pools[i].clone(),
                project: Some(owner.project.to_string()),
                path_and_query: None,
                unbound,
                learn,
            });
        }
        match rt.route(tenant, model) {
            Route::Pool(i) => Ok(Placed {
                pool: rt.pools[i].clone(),
                project: None,
                path_and_query: None,
                unbound,
                learn,
            }),
            Route::NoPool => Err(GatewayError::new(
                403,
                "PERMISSION_DENIED",
                format!(
                    "keygate: model '{}' is not available to this tenant",
                    printable(model)
                ),
            )),
        }
    }

    /// `scheme://host[:port][/prefix]` where clients reach keygate, for the URLs it hands out:
    /// `public_url` when configured; otherwise the `Host` the client used, or the
    /// `X-Forwarded-Proto` / `X-Forwarded-Host` of a trusted proxy in front.
    fn public_base(
        &self,
        rt: &Runtime,
        req: &RequestHeader,
        peer: Option<std::net::IpAddr>,
    ) -> String {
        if let Some(url) = &rt.public_url {
            return url.clone();
        }
        let tls = self.shared.started.tls.is_some();
        let trusted = peer.is_some_and(|ip| rt.trusted_proxies.iter().any(|n| n.contains(&ip)));
        public_base(req, tls, trusted)
    }

    /// Places the bytes of an upload keygate handed out: the pool and project that started it,
    /// Google's own upload URL.
    fn place_upload(
        &self,
        rt: &Runtime,
        id: String,
        up: affinity::UploadSession,
    ) -> Result<Placed, GatewayError> {
        let Some(i) = rt.pool_index(&up.owner.pool) else {
            return Err(GatewayError::new(
                503,
                "UNAVAILABLE",
                format!(
                    "keygate: pool '{}' that started this upload no longer exists",
                    up.owner.pool
                ),
            ));
        };
        Ok(Placed {
            pool: rt.pools[i].clone(),
            project: Some(up.owner.project.to_string()),
            path_and_query: Some(up.upstream_path_and_query),
            unbound: Vec::new(),
            learn: Learn::UploadContinue { id },
        })
    }

    /// The attempts of a request or a Live session's upgrade, as its [`Plan`] directs: each
    /// answer is classified, health changes go through the door, and the loop ends with the
    /// answer to hand on or keygate's own.
    async fn attempts(&self, session: &mut Session, ctx: &mut Ctx, job: &Job<'_>) -> Ending {
        let keys = &job.keys;
        let mut plan = Plan::new(
            job.retry,
            job.project,
            job.reserved.clone(),
            ctx.tenant.is_none(),
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
            // The fair-share count is of requests the pool took, not of refused ones.
            if plan.attempts() == 1 {
                if let Some(t) = &ctx.tenant {
                    job.pool.fair.record(&t.name, now);
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
                    last_error = Some(err);
                    plan.failed(project, stale)
                }
                Ok(mut answer) => {
                    let latency = Some(sent.elapsed());
                    let outcome = classify_answer(&answer);
                    ctx.attempts.push(AttemptLog {
                        key,
                        outcome: outcome.label(),
                        latency,
                    });
                    self.note(keys, key, &outcome);
                    let verdict = outcome.verdict(Utc::now());
                    let then = plan.answered(project, &outcome, verdict, answer.body.complete);
                    match &then {
                        Then::Relay => return Ending::Served { key, answer },
                        Then::Answer => {
                            return Ending::Refused {
                                key,
                                answer,
                                outcome,
                            }
                        }
                        Then::Penalise(penalty) => {
                            let change = health::penalise(penalty, job.model, job.method);
                            self.shared
                                .change_health(keys, key, change, Cause::Answer(&outcome));
                        }
                        Then::Wait(_) | Then::Again | Then::Fail => {}
                    }
                    // Read whole: its connection goes back to the pool before any wait.
                    self.park(&job.pool, &mut answer.body).await;
                    last = Some((answer, key, outcome));
                    then
                }
            };
            match then {
                Then::Wait(wait) => {
                    if unless_client_gone(session, tokio::time::sleep(wait))
                        .await
                        .is_none()
                    {
                        return Ending::ClientGone;
                    }
                }
                Then::Fail => break,
                Then::Relay | Then::Answer | Then::Penalise(_) | Then::Again => {}
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
    fn note(&self, pool: &KeyPool, key: KeyId, outcome: &Outcome) {
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
    async fn send(
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
                let (http, header) = self
                    .upgrade(&job.pool, &job.forward, &job.outgoing, secret, plain)
                    .await?;
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
    async fn send_request(
        &self,
        session: &mut Session,
        pool: &Pool,
        job: &Job<'_>,
        key: KeyId,
    ) -> Result<Answer, SendError> {
        let upstream = &pool.upstream;
        let timeouts = self.shared.runtime.load().timeouts;
        let peer = upstream
            .peer(timeouts.connect)
            .await
            .map_err(SendError::Unresolved)?;
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
            &job.outgoing,
            &job.forward,
            job.keys.key(key).secret.expose(),
            &target,
        )
        .map_err(|error| SendError::Exchange {
            error,
            reused: false,
        })?;
        http.set_read_timeout(Some(timeouts.read));
        http.set_write_timeout(Some(timeouts.write));
        match exchange(&mut http, req, &job.body, Some(session)).await {
            Ok(true) => {}
            Ok(false) => return Err(SendError::ClientGone),
            Err(error) => return Err(SendError::Exchange { error, reused }),
        }
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
    async fn park(&self, pool: &Pool, body: &mut AnswerBody) {
        if !body.complete {
            return;
        }
        if let (Some(http), Some(peer)) = (body.http.take(), body.peer.take()) {
            let idle = self.shared.runtime.load().timeouts.idle;
            release(&pool.upstream, http, &peer, idle).await;
        }
    }

    /// Streams an answer to the client, chunk by chunk as it arrives, and afterwards records
    /// what it says: token usage, and for successful answers the resources it created.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        answer: Answer,
    ) -> pingora::Result<bool> {
        if matches!(job.learn, Learn::List) {
            return self.relay_listing(session, ctx, job, key, answer).await;
        }
        let Answer {
            mut header,
            mut body,
        } = answer;
        let success = header.status.is_success();
        let head = session.req_header().method == http::Method::HEAD;
        scrub_headers(&mut header, job.keys.scrubber())?;
        prepare_downstream_header(&mut header, head)?;
        add_cors(&mut header, ctx)?;
        if success {
            self.rewrite_upload_url(&mut header, job, key, ctx.tenant.as_deref())?;
            ctx.served = true;
        }
        ctx.status = header.status.as_u16();
        let gzip = header
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let keep_head = match job.learn {
            Learn::Create | Learn::UploadContinue { .. } | Learn::Read if success => {
                CREATED_ANSWER_LIMIT
            }
            _ => 0,
        };
        // Tokens are counted on answers to generation and embedding calls only: resources
        // (caches, batches) repeat a usage object each time they are read.
        let counts_tokens = counts_tokens(job.method);
        let mut tap =
            (success && (counts_tokens || keep_head > 0)).then(|| BodyTap::new(gzip, keep_head));
        let upload_final = header
            .headers
            .get("x-goog-upload-status")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"final"));
        // The upstream connection goes back to the pool as soon as its body is complete, before
        // the client has the end of the answer: its next request can then reuse it.
        self.park(&job.pool, &mut body).await;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        let metrics = &self.shared.metrics;
        metrics.time_to_first_byte(job.pool.name(), ctx.started.elapsed().as_secs_f64());
        // What the answer taught (resources created, tokens) is recorded once its body is
        // complete but before its last bytes reach the client: a client that names a resource
        // the moment it has the answer must find it bound.
        let mut recorded = false;
        let limits = self.shared.runtime.load().client_limits;
        let mut pace = guard::SendPace::new(limits.send_timeout, limits.body_min_rate);
        let pre_read = std::mem::take(&mut body.read);
        let last_pre_read = pre_read.len();
        for (i, chunk) in pre_read.into_iter().enumerate() {
            if let Some(tap) = tap.as_mut() {
                tap.feed(&chunk);
            }
            if i + 1 == last_pre_read && body.http.is_none() {
                self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
                recorded = true;
            }
            if !send(session, ctx, &mut pace, chunk).await? {
                return Ok(true);
            }
        }
        while let Some(http) = body.http.as_mut() {
            // A client gone mid-stream stops the stream: Google stops when its connection goes.
            let chunk = {
                let read = http.read_response_body();
                tokio::pin!(read);
                unless_client_gone(session, read.as_mut()).await
            };
            let Some(chunk) = chunk else {
                session.set_keepalive(None);
                return Ok(true);
            };
            let chunk = chunk?;
            body.complete = chunk.is_none() || http.response_done();
            self.park(&job.pool, &mut body).await;
            if let (Some(tap), Some(chunk)) = (tap.as_mut(), chunk.as_ref()) {
                tap.feed(chunk);
            }
            if body.complete && !recorded {
                self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
                recorded = true;
            }
            match chunk {
                Some(chunk) => {
                    if !send(session, ctx, &mut pace, chunk).await? {
                        return Ok(true);
                    }
                }
                None => break,
            }
        }
        if !recorded {
            self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
        }
        session.write_response_body(None, true).await?;
        Ok(true)
    }

    /// Relays an answer that is not a success, as a client may see it (see [`error_reply`]).
    async fn relay_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        mut answer: Answer,
        outcome: &Outcome,
    ) -> pingora::Result<bool> {
        self.park(&job.pool, &mut answer.body).await;
        job.keys.key(key).usage.requests.fetch_add(1, Relaxed);
        let head = session.req_header().method == http::Method::HEAD;
        match error_reply(answer, outcome, &job.keys, key) {
            ErrorReply::Own(e) => respond(session, ctx, Some(job.forward.api), &e).await,
            ErrorReply::Relay(header, body) => {
                write_whole(session, ctx, header, body, head).await?;
                Ok(true)
            }
        }
    }

    /// Relays a listing of project-bound resources to a tenant: only the entries bound to that
    /// tenant stay (Google lists the whole project's, other tenants' included).
    async fn relay_listing(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        mut answer: Answer,
    ) -> pingora::Result<bool> {
        let found = unless_client_gone(session, read_up_to(&mut answer.body, LISTING_LIMIT)).await;
        if found.is_none() {
            return Ok(client_gone(session, ctx));
        }
        let filtered = answer.body.complete.then(|| {
            let me = ctx.tenant.as_ref().map(|t| t.name.clone());
            let now = now_millis();
            let table = &self.shared.affinity;
            names::filter_listing(&decoded_body(&answer, LISTING_LIMIT), |name| {
                table.owner(name, now).is_some_and(|o| o.tenant == me)
            })
        });
        self.park(&job.pool, &mut answer.body).await;
        job.keys.key(key).usage.requests.fetch_add(1, Relaxed);
        let Some(body) = filtered.flatten() else {
            let e = GatewayError::new(
                502,
                "UNAVAILABLE",
                "keygate: this listing could not be filtered for the tenant (larger than 8 MiB or not JSON); ask for fewer entries with pageSize",
            );
            return respond(session, ctx, Some(job.forward.api), &e).await;
        };
        let mut header = answer.header;
        header.remove_header(&header::CONTENT_ENCODING);
        scrub_headers(&mut header, job.keys.scrubber())?;
        ctx.served = true;
        write_whole(session, ctx, header, Bytes::from(body), false).await?;
        Ok(true)
    }

    /// Counts a relayed answer for its key and tenant, and records what it taught.
    fn record_answer(
        &self,
        ctx: &Ctx,
        job: &Job<'_>,
        key: KeyId,
        tap: Option<&BodyTap>,
        upload_final: bool,
        counts_tokens: bool,
    ) {
        let pool_key = job.keys.key(key);
        pool_key.usage.requests.fetch_add(1, Relaxed);
        let Some(tap) = tap else {
            return;
        };
        self.learn(ctx, job, key, tap, upload_final);
        if let Some(t) = tap.tokens().filter(|_| counts_tokens) {
            pool_key.usage.add_tokens(t.prompt, t.output, t.total);
            if let Some(tenant) = &ctx.tenant {
                tenant.state.usage.add_tokens(t.prompt, t.output, t.total);
            }
        }
    }

    /// Hands out keygate's own upload URL in place of Google's, bound to the tenant and the
    /// project of `key`.
    fn rewrite_upload_url(
        &self,
        header: &mut ResponseHeader,
        job: &Job<'_>,
        key: KeyId,
        tenant: Option<&Tenant>,
    ) -> pingora::Result<()> {
        let Learn::UploadStart { public_base } = &job.learn else {
            return Ok(());
        };
        let Some(google_url) = header
            .headers
            .get("x-goog-upload-url")
            .and_then(|v| v.to_str().ok())
            .and_then(affinity::upstream_path_of)
        else {
            return Ok(());
        };
        let session = affinity::UploadSession {
            owner: self.owner(job, key, tenant),
            key_fingerprint: job.keys.key(key).fingerprint.clone(),
            upstream_path_and_query: google_url.clone(),
        };
        match self.shared.uploads.start(session, now_millis()) {
            Some(id) => {
                let url = affinity::rewrite_upload_url(&google_url, public_base, &id);
                header.insert_header("x-goog-upload-url", url)?;
            }
            None => {
                log::error!("no randomness for an upload id: the upload URL is withheld");
                header.remove_header("x-goog-upload-url");
            }
        }
        Ok(())
    }

    /// Who owns what this request creates: the pool, the project of `key`, the tenant.
    fn owner(&self, job: &Job<'_>, key: KeyId, tenant: Option<&Tenant>) -> affinity::Owner {
        let keys = &job.keys;
        affinity::Owner {
            pool: Arc::from(job.pool.name()),
            project: Arc::from(keys.project_name(keys.key(key).project)),
            tenant: tenant.map(|t| t.name.clone()),
        }
    }

    /// Records what a successful answer taught: resources created, deleted, or seen working.
    fn learn(&self, ctx: &Ctx, job: &Job<'_>, key: KeyId, tap: &BodyTap, upload_final: bool) {
        let now = now_millis();
        let table = &self.shared.affinity;
        let owner = || self.owner(job, key, ctx.tenant.as_deref());
        let bind = |name: &str| {
            if !table.bind_new(name, owner(), now) {
                log::warn!(
                    "{} is already bound to another tenant or project; an answer of project {} named it too (kept the first owner)",
                    printable(name),
                    printable(&owner().project)
                );
            }
        };
        match &job.learn {
            Learn::Create | Learn::UploadContinue { .. } => {
                for name in tap.head().map(names::created_names).unwrap_or_default() {
                    bind(&name);
                }
            }
            Learn::Read => {
                // What Google made for a resource this request's owner has (a video, a batch's
                // results file) is that owner's too; names already bound keep their owner.
                for name in tap.head().map(names::names_in_answer).unwrap_or_default() {
                    if table.owner(&name, now).is_none() {
                        bind(&name);
                    }
                }
            }
            Learn::Delete(names) => {
                for name in names {
                    table.forget(name);
                }
            }
            Learn::Nothing | Learn::UploadStart { .. } | Learn::List => {}
        }
        if let Learn::UploadContinue { id } = &job.learn {
            if upload_final {
                self.shared.uploads.finish(id);
            }
        }
        // A resource keygate did not know the owner of is bound to the project that served it,
        // but only without tenants: with tenants, a name another tenant made (and keygate
        // forgot) must not become the asker's.
        if !matches!(job.learn, Learn::Delete(_)) && ctx.tenant.is_none() {
            for name in &job.unbound {
                bind(name);
            }
        }
    }
}

/// The health table's name for Live API sessions: a quota refusal of the upgrade cools
/// (project, `live`), apart from the project's other models.
const LIVE_MODEL: &str = "live";

impl Gateway {
    /// A Live API session: the WebSocket upgrade goes to a key like any request (a refusal
    /// before the switch, 429 or 403, moves to another key), and once Google switches protocols
    /// the frames are relayed both ways, on that one key, for the session's life.
    async fn websocket(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        rt: &Runtime,
        tenant: Option<&Tenant>,
        path_and_query: &str,
    ) -> pingora::Result<bool> {
        if !session.is_upgrade_req() {
            let e = GatewayError::new(
                400,
                "INVALID_ARGUMENT",
                "keygate: the Live API needs a WebSocket upgrade (Upgrade: websocket)",
            );
            return refuse(session, ctx, Api::Gemini, &e).await;
        }
        ctx.model = LIVE_MODEL.to_string();
        let pool = match rt.route(tenant, "") {
            // A session names its model inside itself, where keygate does not look: a tenant held
            // to some pools may open one only on a pool that serves every model.
            Route::Pool(i)
                if tenant.is_some_and(|t| t.pools.len() < rt.pools.len())
                    && !rt.pools[i].config.models.is_empty() =>
            {
                let e = GatewayError::new(
                    403,
                    "PERMISSION_DENIED",
                    "keygate: a Live session names its model inside the session, which keygate does not read; this tenant may open one only on a pool that serves every model",
                );
                return refuse(session, ctx, Api::Gemini, &e).await;
            }
            Route::Pool(i) => rt.pools[i].clone(),
            Route::NoPool => {
                let e =
                    GatewayError::new(403, "PERMISSION_DENIED", "keygate: no pool for this tenant");
                return refuse(session, ctx, Api::Gemini, &e).await;
            }
        };
        let keys = pool.keys.load_full();
        ctx.keys = Some(keys.clone());
        ctx.pool = Some(pool.clone());
        let job = Job {
            outgoing: request::Outgoing::from_client(session.req_header()),
            forward: request::Forward {
                api: Api::Gemini,
                path_and_query,
                body_len: 0,
            },
            body: Bytes::new(),
            model: LIVE_MODEL,
            method: request::method_of(path_and_query.split('?').next().unwrap_or("")),
            pool,
            keys,
            project: None,
            unbound: Vec::new(),
            learn: Learn::Nothing,
            reserved: Vec::new(),
            retry: rt.retry,
            kind: Kind::Upgrade {
                plain: tenant.is_some(),
            },
        };
        let (key, answer, outcome) = match self.attempts(session, ctx, &job).await {
            Ending::Served { key, answer } if answer.header.status.as_u16() == 101 => {
                (key, answer, None)
            }
            Ending::Served { key, answer } => (key, answer, Some(Outcome::Success)),
            Ending::Refused {
                key,
                answer,
                outcome,
            } => (key, answer, Some(outcome)),
            Ending::Failed(e) => return refuse(session, ctx, Api::Gemini, &e).await,
            Ending::ClientGone => return Ok(client_gone(session, ctx)),
        };
        let keys = &job.keys;
        if let Some(outcome) = outcome {
            // Refused before the switch: Google's answer, as any other is relayed.
            return self
                .write_refusal(session, ctx, answer, &outcome, keys, key)
                .await;
        }
        let Answer { header, body } = answer;
        let Some(http) = body.http else {
            let e = GatewayError::new(
                502,
                "UNAVAILABLE",
                "keygate: the upgrade lost its connection",
            );
            return refuse(session, ctx, Api::Gemini, &e).await;
        };
        keys.key(key).usage.requests.fetch_add(1, Relaxed);
        let share = tenant
            .filter(|_| rt.tenants.list().len() > 1)
            .map(|t| t.state.buffered.clone());
        let check = tenant.map(|t| {
            live_frames::MessageCheck::new(
                t.name.clone(),
                Arc::from(keys.project_name(keys.key(key).project)),
                rt.max_body,
                self.shared.body_budget.reservation(share),
                rt.client_limits,
            )
        });
        self.relay_frames(session, ctx, http, header, check).await
    }

    /// Sends the upgrade request on a fresh HTTP/1.1 connection; the connection and the final
    /// answer header (101 or a refusal). `plain`: ask for no per-message compression, so that
    /// keygate can read the client's messages.
    async fn upgrade(
        &self,
        pool: &Pool,
        forward: &request::Forward<'_>,
        client: &request::Outgoing,
        key: &str,
        plain: bool,
    ) -> Result<(ClientSession, ResponseHeader), SendError> {
        let upstream = &pool.upstream;
        let timeouts = self.shared.runtime.load().timeouts;
        let peer = upstream
            .websocket_peer(timeouts.connect)
            .await
            .map_err(SendError::Unresolved)?;
        let (mut http, _) = upstream
            .connector
            .get_http_session(&peer)
            .await
            .map_err(SendError::Connect)?;
        let target = request::Target {
            authority: upstream.authority(),
            tls: upstream.tls(),
            h2: false,
        };
        let exchange_error = |error| SendError::Exchange {
            error,
            reused: false,
        };
        let mut req =
            request::upstream_request(client, forward, key, &target).map_err(exchange_error)?;
        // The handshake's hop-by-hop headers, which upstream_request leaves out.
        req.insert_header(header::CONNECTION, "Upgrade")
            .map_err(exchange_error)?;
        req.insert_header(header::UPGRADE, "websocket")
            .map_err(exchange_error)?;
        req.remove_header(&header::CONTENT_LENGTH);
        if plain {
            req.remove_header(&header::SEC_WEBSOCKET_EXTENSIONS);
        }
        http.set_read_timeout(Some(timeouts.read));
        http.set_write_timeout(Some(timeouts.write));
        http.write_request_header(Box::new(req))
            .await
            .map_err(exchange_error)?;
        loop {
            http.read_response_header().await.map_err(exchange_error)?;
            let header = http.response_header().cloned().ok_or_else(|| {
                exchange_error(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "no response header",
                ))
            })?;
            if header.status.is_informational() && header.status.as_u16() != 101 {
                continue;
            }
            // Frames may be far apart: no read timeout once switched.
            http.set_read_timeout(None);
            return Ok((http, header));
        }
    }

    /// Switches the client's connection too, then copies bytes both ways until either side
    /// closes. With `check` (a tenant's session), each client message is read first and the
    /// session closed if it names a resource that is not the tenant's.
    async fn relay_frames(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        mut http: ClientSession,
        header: ResponseHeader,
        mut check: Option<live_frames::MessageCheck>,
    ) -> pingora::Result<bool> {
        let mut switch = ResponseHeader::build(101, Some(header.headers.len()))?;
        for (name, value) in header.headers.iter() {
            switch.append_header(name.clone(), value.clone())?;
        }
        add_cors(&mut switch, ctx)?;
        ctx.status = 101;
        session
            .write_response_header(Box::new(switch), false)
            .await?;
        // A session may be quiet for minutes: the client side waits as long as Google does.
        session.set_read_timeout(None);
        if let ClientSession::H1(h1) = &mut http {
            h1.maybe_upgrade_body_writer();
        }
        let mut client_open = true;
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let due = check.as_ref().and_then(live_frames::MessageCheck::due);
            tokio::select! {
                _ = wait_until(&mut timer, due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                    return close_session(session, live_frames::Close::too_slow()).await;
                }
                from_client = session.read_request_body(), if client_open => match from_client {
                    Ok(Some(bytes)) => {
                        ctx.request_bytes += bytes.len() as u64;
                        let Some(check) = check.as_mut() else {
                            http.write_request_body(bytes, false).await?;
                            continue;
                        };
                        match check.feed(&bytes, &self.shared.affinity, now_millis()) {
                            Ok(frames) => {
                                for frames in frames {
                                    http.write_request_body(frames, false).await?;
                                }
                            }
                            Err(close) => {
                                log::warn!(
                                    "Live session of tenant {} closed: {}",
                                    printable(check.tenant()),
                                    printable(&close.reason)
                                );
                                return close_session(session, close).await;
                            }
                        }
                    }
                    Ok(None) => {
                        client_open = false;
                        http.finish_request_body().await?;
                    }
                    Err(e) => return Err(e),
                },
                from_google = http.read_response_body() => match from_google? {
                    Some(bytes) => {
                        ctx.response_bytes += bytes.len() as u64;
                        session.write_response_body(Some(bytes), false).await?;
                    }
                    None => break,
                },
            }
        }
        session.write_response_body(None, true).await?;
        Ok(true)
    }

    /// Writes Google's refusal of an upgrade to the client, as [`error_reply`] allows.
    async fn write_refusal(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        answer: Answer,
        outcome: &Outcome,
        keys: &KeyPool,
        key: KeyId,
    ) -> pingora::Result<bool> {
        session.set_keepalive(None);
        match error_reply(answer, outcome, keys, key) {
            ErrorReply::Own(e) => refuse(session, ctx, Api::Gemini, &e).await,
            ErrorReply::Relay(header, body) => {
                write_whole(session, ctx, header, body, false).await?;
                Ok(true)
            }
        }
    }
}

/// Ends a Live session on keygate's side: a close frame to the client, then the end.
async fn close_session(session: &mut Session, close: live_frames::Close) -> pingora::Result<bool> {
    session
        .write_response_body(Some(close.frame()), false)
        .await?;
    session.write_response_body(None, true).await?;
    Ok(true)
}

/// Writes one chunk of an answer to the client; false (and the connection not kept) when the
/// client takes the answer too slowly ([`guard::SendPace`]).
async fn send(
    session: &mut Session,
    ctx: &mut Ctx,
    pace: &mut guard::SendPace,
    chunk: Bytes,
) -> pingora::Result<bool> {
    let len = chunk.len();
    ctx.response_bytes += len as u64;
    let started = Instant::now();
    session.write_response_body(Some(chunk), false).await?;
    if pace.record(len, started.elapsed()) {
        return Ok(true);
    }
    log::debug!("client takes its answer too slowly: dropped");
    session.set_keepalive(None);
    Ok(false)
}

/// What the client gets in place of an upstream answer that is not a success.
enum ErrorReply {
    /// keygate's own answer.
    Own(GatewayError),
    /// Google's answer, cleaned: header and whole body.
    Relay(ResponseHeader, Bytes),
}

/// The answer a client may see for Google's `answer` (read up to [`MAX_CLASSIFY_BODY`]):
/// - a refusal of the key itself (dead, suspended, billing, method) is never relayed, since it
///   names the key: keygate answers with Google's status, the key's fingerprint and the reason;
/// - a body over the read limit is withheld;
/// - any other is relayed whole, with every pool key in its header and body replaced by the
///   key's fingerprint (a gzip body is sent decoded when a key had to be taken out of it).
fn error_reply(answer: Answer, outcome: &Outcome, keys: &KeyPool, key: KeyId) -> ErrorReply {
    let status = answer.header.status.as_u16();
    if outcome.is_key_level() {
        return ErrorReply::Own(key_refused_error(status, keys, key, outcome));
    }
    if !answer.body.complete {
        return ErrorReply::Own(GatewayError::new(
            status,
            status_name(status),
            format!(
                "keygate: Google answered {status} with an error body larger than {} KiB, which keygate does not relay",
                MAX_CLASSIFY_BODY / 1024
            ),
        ));
    }
    let raw = Bytes::from(answer.body.read.concat());
    let gzip = is_gzip(&answer.header);
    let encoded = answer
        .header
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded && !gzip {
        // keygate asks for gzip or nothing; a body in another encoding cannot be checked for keys.
        return ErrorReply::Own(GatewayError::new(
            status,
            status_name(status),
            format!("keygate: Google answered {status} in an encoding keygate does not read"),
        ));
    }
    let plain = if gzip {
        match gunzip(&raw, MAX_CLASSIFY_BODY * 16) {
            Some(plain) => std::borrow::Cow::Owned(plain),
            None => {
                return ErrorReply::Own(GatewayError::new(
                    status,
                    status_name(status),
                    format!(
                        "keygate: Google answered {status} with a body keygate could not decode"
                    ),
                ))
            }
        }
    } else {
        std::borrow::Cow::Borrowed(&raw[..])
    };
    let mut header = answer.header;
    let scrubber = keys.scrubber();
    let body = match scrubber.body(&plain) {
        std::borrow::Cow::Borrowed(_) => raw.clone(),
        std::borrow::Cow::Owned(clean) => {
            header.remove_header(&header::CONTENT_ENCODING);
            Bytes::from(clean)
        }
    };
    if let Err(e) = scrub_headers(&mut header, scrubber) {
        log::debug!("cannot clean an error answer's header: {e}");
        return ErrorReply::Own(GatewayError::new(
            status,
            status_name(status),
            format!("keygate: Google answered {status}"),
        ));
    }
    ErrorReply::Relay(header, body)
}

/// keygate's answer in place of Google's refusal of a key (which names the key).
fn key_refused_error(status: u16, keys: &KeyPool, key: KeyId, outcome: &Outcome) -> GatewayError {
    let why = match outcome {
        Outcome::KeyDead(classify::DeadReason::Invalid) => "the key is not valid (or expired)",
        Outcome::KeyDead(classify::DeadReason::Suspended) => "the key is suspended",
        Outcome::KeyDead(classify::DeadReason::ServiceDisabled) => {
            "the Generative Language API is disabled for the key's project"
        }
        Outcome::KeyDead(classify::DeadReason::Restricted) => {
            "the key's restrictions refuse calls from this gateway"
        }
        Outcome::BillingExhausted => "the key's project is out of prepaid credit",
        Outcome::MethodBlocked => "the key may not call this method",
        _ => "the key was refused",
    };
    GatewayError::new(
        status,
        status_name(status),
        format!(
            "keygate: Google refused key {} of pool '{}' ({}: {why}); keygate took it out of service, and no other key could serve this request",
            keys.key(key).fingerprint,
            keys.name(),
            outcome.label()
        ),
    )
}

/// Google's status name for an HTTP status, for keygate's own Gemini-shaped answers.
fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ALREADY_EXISTS",
        402 | 429 => "RESOURCE_EXHAUSTED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 | 502 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// Replaces pool keys in every header value (Google never sends one; this makes sure).
fn scrub_headers(
    header: &mut ResponseHeader,
    scrubber: &crate::scrub::Scrubber,
) -> pingora::Result<()> {
    let dirty: Vec<(http::HeaderName, Vec<u8>)> = header
        .headers
        .iter()
        .filter_map(|(name, value)| Some((name.clone(), scrubber.header(value.as_bytes())?)))
        .collect();
    for (name, clean) in dirty {
        header.remove_header(&name);
        header.insert_header(name, clean)?;
    }
    Ok(())
}

/// Writes a whole answer (header and a body of known length) to the client.
async fn write_whole(
    session: &mut Session,
    ctx: &mut Ctx,
    mut header: ResponseHeader,
    body: Bytes,
    head: bool,
) -> pingora::Result<()> {
    prepare_downstream_header(&mut header, head)?;
    header.remove_header(&header::TRANSFER_ENCODING);
    header.insert_header(header::CONTENT_LENGTH, body.len())?;
    add_cors(&mut header, ctx)?;
    ctx.status = header.status.as_u16();
    ctx.response_bytes += body.len() as u64;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Writes the request and reads the final (non-1xx) response header. While it waits for the
/// answer it watches `client` (when given) for a hang-up: `Ok(false)` then, the exchange
/// abandoned.
async fn exchange(
    http: &mut ClientSession,
    req: RequestHeader,
    body: &Bytes,
    mut client: Option<&mut Session>,
) -> pingora::Result<bool> {
    let cork = crate::upstream::Cork::hold(http);
    http.write_request_header(Box::new(req)).await?;
    if !body.is_empty() {
        http.write_request_body(body.clone(), true).await?;
    }
    http.finish_request_body().await?;
    drop(cork); // header and body leave together now
    loop {
        match client.as_deref_mut() {
            Some(session) => {
                let read = http.read_response_header();
                match unless_client_gone(session, read).await {
                    Some(read) => read?,
                    None => return Ok(false),
                }
            }
            None => http.read_response_header().await?,
        }
        let informational = http.response_header().is_some_and(|h| {
            h.status.is_informational() && h.status != http::StatusCode::SWITCHING_PROTOCOLS
        });
        if !informational || !matches!(http, ClientSession::H1(_)) {
            return Ok(true);
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

/// The buffered body, gunzipped when Google compressed it (as much as decodes, at most 16
/// times `limit`: a body cut short still gives its start).
fn decoded_body(answer: &Answer, limit: usize) -> Vec<u8> {
    let raw: Vec<u8> = answer.body.read.concat();
    if !is_gzip(&answer.header) {
        return raw;
    }
    let mut out = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(raw.as_slice()).take(limit as u64 * 16);
    let mut buf = [0u8; 8192];
    while let Ok(n) = decoder.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// A whole gzip body decoded, if it decodes within `limit` bytes.
fn gunzip(raw: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(raw).take(limit as u64 + 1);
    std::io::BufReader::new(decoder)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() <= limit).then_some(out)
}

/// Whether an answer's body is gzip-encoded.
fn is_gzip(header: &ResponseHeader) -> bool {
    header
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
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

/// How long work may take before keygate starts watching its client for a hang-up. Most
/// answers come sooner, and the watch costs a read of the client's socket; a client that hangs
/// up while Google thinks for seconds or minutes is noticed within this.
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(100);

/// Runs `work` unless the client hangs up first (`None` then). The request body has been read
/// whole by now, so any read from the client means it is gone (or, pipelining, sending more
/// than it should): Pingora's idle read only ever ends with an error.
async fn unless_client_gone<T>(
    session: &mut Session,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let watch = async {
        pingora::time::fast_timeout::fast_sleep(WATCH_CLIENT_AFTER).await;
        let _ = session.read_body_or_idle(true).await;
    };
    tokio::select! {
        biased;
        out = work => Some(out),
        _ = watch => None,
    }
}

/// Ends a request whose client hung up: nothing more is sent or attempted, the tenant's
/// concurrency slot is given back at once, and the access line says 499.
fn client_gone(session: &mut Session, ctx: &mut Ctx) -> bool {
    ctx.in_flight = None;
    ctx.status = CLIENT_GONE;
    session.set_keepalive(None);
    true
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
    // Which pages may read an answer is keygate's decision (`cors`), never the upstream's.
    let cors: Vec<http::HeaderName> = header
        .headers
        .keys()
        .filter(|n| n.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in cors {
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

/// How reading a request body ended.
enum BodyRead {
    /// The whole body, and its share of the memory budget.
    Body(Bytes, Reservation),
    /// Larger than `max_body_bytes`.
    TooLarge,
    /// The bodies held by all requests would pass `client_limits.max_buffered_body_bytes`.
    OverBudget,
    /// The body paused too long or came too slowly (`client_limits`).
    TooSlow,
    /// The client hung up.
    ClientGone,
}

/// Reads the whole request body, within `limit` bytes, the memory `budget` and the pace
/// `limits` ask for: no pause longer than `body_timeout`, and after that much time at least
/// `body_min_rate` bytes a second on average.
async fn read_body(
    session: &mut Session,
    limit: usize,
    mut reservation: Reservation,
    limits: &ClientLimits,
) -> pingora::Result<BodyRead> {
    let declared = session
        .req_header()
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Ok(BodyRead::TooLarge);
    }
    // Memory is reserved as bytes arrive, not on the declared length: a client that declares a
    // large body and sends it slowly holds only what it sent.
    let expects_continue = session
        .req_header()
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session.write_continue_response().await?;
    }
    let started = tokio::time::Instant::now();
    let mut last_progress = started;
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        let due = guard::body_due(limits, started, last_progress, total);
        // Most bodies are in before they are asked for: the timer is made only when a read
        // has to wait.
        let read = tokio::select! {
            biased;
            read = session.read_request_body() => read,
            _ = wait_until(&mut timer, due) => return Ok(BodyRead::TooSlow),
        };
        let chunk = match read {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                return match e.etype() {
                    ErrorType::ReadTimedout => Ok(BodyRead::TooSlow),
                    ErrorType::ConnectionClosed | ErrorType::ReadError => Ok(BodyRead::ClientGone),
                    _ => Err(e),
                }
            }
        };
        total += chunk.len();
        if total > limit {
            return Ok(BodyRead::TooLarge);
        }
        if total > reservation.bytes() && !reservation.grow(total - reservation.bytes()) {
            return Ok(BodyRead::OverBudget);
        }
        last_progress = tokio::time::Instant::now();
        chunks.push(chunk);
    }
    let body = match chunks.len() {
        0 => Bytes::new(),
        // The common case, one chunk: no copy.
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    };
    Ok(BodyRead::Body(body, reservation))
}

/// Sleeps until `due` on `timer`, made on first use and moved on after.
async fn wait_until(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>, due: tokio::time::Instant) {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
    if sleep.deadline() != due {
        sleep.as_mut().reset(due);
    }
    sleep.as_mut().await
}

/// keygate's answer to a body it did not take.
fn body_error(read: &BodyRead, limit: usize) -> GatewayError {
    match read {
        BodyRead::TooLarge => GatewayError::new(
            413,
            "INVALID_ARGUMENT",
            format!("keygate: request body larger than max_body_bytes ({limit} bytes)"),
        ),
        BodyRead::OverBudget => GatewayError {
            code: 503,
            status: "UNAVAILABLE",
            message: "keygate: too many request bodies are held in memory right now (client_limits.max_buffered_body_bytes); retry shortly".to_string(),
            retry_after: Some(2),
        },
        _ => GatewayError::new(
            408,
            "DEADLINE_EXCEEDED",
            "keygate: the request body came too slowly (client_limits.body_timeout_seconds, body_min_rate_bytes_per_second)",
        ),
    }
}

/// The answer for "no key can serve this model now"; `project` when only one project could.
fn exhausted_error(
    pool: &KeyPool,
    model: &str,
    ex: &Exhaustion,
    retry_after: Option<u64>,
    project: Option<u32>,
) -> GatewayError {
    let what = if model.is_empty() {
        String::new()
    } else {
        format!(" for model '{model}'")
    };
    let whose = match project {
        Some(p) => format!(
            "the keys of project '{}' (which owns a resource this request names) in pool '{}'",
            pool.project_name(p),
            pool.name()
        ),
        None => format!("every key of pool '{}'", pool.name()),
    };
    match retry_after {
        Some(secs) => {
            GatewayError {
                code: 429,
                status: "RESOURCE_EXHAUSTED",
                message: format!(
                    "keygate: {whose} are out of quota{what} ({} cooling, {} disabled); the first one is back in {secs} s",
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
                "keygate: none of {whose} can serve{what}: {} are disabled (invalid, suspended, out of credit or by an operator); an operator must add or fix keys",
                ex.disabled
            ),
        ),
    }
}

/// The answer for a request refused by the tenant's own limits.
fn limit_error(tenant: &str, refusal: Refusal) -> GatewayError {
    match refusal {
        Refusal::Rate { retry_after, rpm } => GatewayError {
            code: 429,
            status: "RESOURCE_EXHAUSTED",
            message: format!(
                "keygate: tenant '{tenant}' is over its own limit of {rpm} requests per minute (rpm); retry in {retry_after} s. The key pool is not exhausted."
            ),
            retry_after: Some(retry_after),
        },
        Refusal::Concurrency { limit } => GatewayError {
            code: 429,
            status: "RESOURCE_EXHAUSTED",
            message: format!(
                "keygate: tenant '{tenant}' already has {limit} requests in flight, its own limit (max_concurrent); retry when one finishes. The key pool is not exhausted."
            ),
            retry_after: Some(1),
        },
    }
}

/// The answer for a tenant whose share of the pool is used up: the projects left are kept for
/// tenants that used the pool less.
fn fair_share_error(pool: &KeyPool, tenant: &str, model: &str, reserved: usize) -> GatewayError {
    let secs = pool
        .availability(model, now_millis())
        .next_recovery
        .map_or(1, |at| {
            at.saturating_sub(now_millis()).div_ceil(1000).max(1)
        });
    GatewayError {
        code: 429,
        status: "RESOURCE_EXHAUSTED",
        message: format!(
            "keygate: tenant '{tenant}' used pool '{}' more than other tenants in the last minute, and the projects it may use are out of quota for model '{model}'; the {reserved} project(s) left are kept for the other tenants. Retry in {secs} s.",
            pool.name()
        ),
        retry_after: Some(secs),
    }
}

/// Adds the request's CORS headers to an answer, replacing any the upstream sent.
fn add_cors(header: &mut ResponseHeader, ctx: &Ctx) -> pingora::Result<()> {
    for (name, value) in &ctx.cors {
        if *name == "vary" {
            header.append_header(*name, value.as_str())?;
        } else {
            header.insert_header(*name, value.as_str())?;
        }
    }
    Ok(())
}

/// Writes a bodiless answer of keygate's own (a CORS preflight).
async fn respond_empty(session: &mut Session, ctx: &mut Ctx, code: u16) -> pingora::Result<bool> {
    let mut resp = ResponseHeader::build(code, Some(ctx.cors.len() + 1))?;
    resp.insert_header(header::CONTENT_LENGTH, 0)?;
    add_cors(&mut resp, ctx)?;
    ctx.status = code;
    session.write_response_header(Box::new(resp), true).await?;
    Ok(true)
}

/// Answers without reading the request body: the connection cannot be reused.
async fn refuse(
    session: &mut Session,
    ctx: &mut Ctx,
    api: Api,
    e: &GatewayError,
) -> pingora::Result<bool> {
    session.set_keepalive(None);
    respond(session, ctx, Some(api), e).await
}

fn tenant_name(tenant: &Option<Arc<Tenant>>) -> Option<Arc<str>> {
    tenant.as_ref().map(|t| t.name.clone())
}

/// Microseconds since the epoch, for rate limits.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Whether answers to `method` report the tokens a call used.
fn counts_tokens(method: &str) -> bool {
    matches!(
        method,
        "generateContent"
            | "streamGenerateContent"
            | "embedContent"
            | "batchEmbedContents"
            | "chat/completions"
            | "completions"
            | "embeddings"
    )
}

/// The value of query parameter `name`, %-decoded, if there is one.
fn query_value(req: &RequestHeader, name: &str) -> Option<String> {
    let value = req
        .uri
        .query()?
        .split(['&', ';'])
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))?;
    Some(
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Whether a successful POST to `path` may create resources Google binds to a project.
fn creates_resources(path: &str) -> bool {
    [
        "/cachedContents",
        "/batches",
        "/tunedModels",
        "/files",
        ":batchGenerateContent",
        ":asyncBatchEmbedContent",
        ":predictLongRunning",
    ]
    .iter()
    .any(|p| path.contains(p))
}

/// `scheme://host[:port]` as the client reached keygate (`tls`: keygate's own listener speaks
/// TLS), for URLs handed back to it. A `trusted` proxy in front (TLS termination) says so with
/// `X-Forwarded-Proto` / `X-Forwarded-Host`; from anyone else those headers are ignored.
fn public_base(req: &RequestHeader, tls: bool, trusted: bool) -> String {
    let header = |name: &str| {
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let forwarded = |name: &str| header(name).filter(|_| trusted);
    let scheme = match forwarded("x-forwarded-proto").as_deref() {
        _ if tls => "https",
        Some("https") => "https",
        _ => "http",
    };
    let host = forwarded("x-forwarded-host")
        .or_else(|| header("host"))
        .or_else(|| req.uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".to_string());
    // A host header is the client's own word: keep only characters a host[:port] may hold.
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'))
        .collect();
    format!("{scheme}://{host}")
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
    add_cors(&mut resp, ctx)?;
    ctx.status = e.code;
    ctx.response_bytes += body.len() as u64;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

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
const KEY_CHECK_PATH: &str = "/v1beta/models?pageSize=1";

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
        Ok((status, body)) => match classify(status, &body) {
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
            let transition = health::penalise(&dead, "", KEY_CHECK_PATH);
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

/// GETs the key check path with `key`; the status and the (decoded, bounded) body.
async fn fetch(
    upstream: &Upstream,
    key: &str,
    timeouts: Timeouts,
) -> Result<(u16, Vec<u8>), &'static str> {
    let peer = upstream
        .peer(timeouts.connect)
        .await
        .map_err(|_| "unresolved")?;
    let (mut http, _) = upstream
        .connector
        .get_http_session(&*peer)
        .await
        .map_err(|_| "connect_error")?;
    let client = RequestHeader::build("GET", KEY_CHECK_PATH.as_bytes(), None)
        .map_err(|_| "request_error")?;
    let forward = request::Forward {
        api: Api::Gemini,
        path_and_query: KEY_CHECK_PATH,
        body_len: 0,
    };
    let target = request::Target {
        authority: upstream.authority(),
        tls: upstream.tls(),
        h2: matches!(http, ClientSession::H2(_)),
    };
    let req = request::upstream_request(
        &request::Outgoing::from_client(&client),
        &forward,
        key,
        &target,
    )
    .map_err(|_| "request_error")?;
    http.set_read_timeout(Some(timeouts.read.min(Duration::from_secs(30))));
    http.set_write_timeout(Some(timeouts.write));
    exchange(&mut http, req, &Bytes::new(), None)
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
