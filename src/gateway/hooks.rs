//! The Pingora hooks: a request is admitted (CORS, tenant, limits, body), placed on a pool,
//! tried on keys until one serves, and logged.

use super::answers::{limit_error, refuse, respond, respond_empty};
use super::attempts::unresolved_error;
use super::cache;
use super::client::{body_error, client_gone, read_body, tenant_name, BodyRead};
use super::place::creates_resources;
use super::{Ctx, Ending, Gateway, Job, Kind};
use crate::cache::{cacheable_kind, Status};
use crate::gateway::guard;
use crate::logging::printable;
use crate::quota::keys::now_millis;
use crate::tenants::Auth;
use crate::wire::error::GatewayError;
use crate::wire::request::{self, Api};
use crate::{quota::affinity, tenants::endpoints, wire::alias, wire::cors, wire::path};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use std::future::Future;
use std::pin::Pin;

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::new()
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

    // Written out rather than by async_trait: its `Box::pin(async move { .. })` builds this ~9 KB
    // future on the stack and copies it whole into the box (an unwind path keeps the stack copy
    // alive); allocating first lets the three arguments be written in place. Measured: 9 KB of
    // memcpy per request gone.
    fn request_filter<'a, 'b, 'c, 'f>(
        &'a self,
        session: &'b mut Session,
        ctx: &'c mut Ctx,
    ) -> Pin<Box<dyn Future<Output = pingora::Result<bool>> + Send + 'f>>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        boxed_in_place(|| self.answer(session, ctx))
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        // The next request on this connection gets its own header deadline.
        guard::request_finished(session.stream());
        let status = match ctx.status {
            0 => session.response_written().map_or(0, |r| r.status.as_u16()),
            s => s,
        };
        if let Some(t) = &ctx.tenant {
            t.state.usage.count_request();
        }
        let metrics = &self.shared.metrics;
        let pool = match &ctx.pool {
            Some(p) => p.metrics(metrics),
            None => metrics.no_pool(),
        };
        for a in &ctx.attempts {
            metrics.attempt(pool, a.outcome);
            if let Some(latency) = a.latency {
                metrics.upstream_latency(pool, latency.as_secs_f64());
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
            pool,
            model,
            ctx.served,
            status,
            ctx.attempts.len(),
            ctx.request_bytes,
            ctx.response_bytes,
        );
        if log::log_enabled!(target: "keygate::access", log::Level::Info) {
            let line = access_line(ctx, status, error);
            log::info!(target: "keygate::access", "{line}");
        }
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

/// The access line of a request: `tenant=.. "METHOD /path" model=.. status=.. attempts=[..]
/// (cache=..) ms=.. (error=..)`. Written piece by piece: through `format_args!` its ten
/// arguments cost more than the rest of the logging hook (BENCHMARKS.md).
fn access_line(ctx: &Ctx, status: u16, error: Option<&Error>) -> String {
    let mut number = itoa::Buffer::new();
    let mut line = String::with_capacity(160 + ctx.target.len());
    line.push_str("tenant=");
    line.push_str(&printable(ctx.tenant.as_ref().map_or("-", |t| &*t.name)));
    line.push_str(" \"");
    line.push_str(&ctx.target);
    line.push_str("\" model=");
    match ctx.model.as_str() {
        "" => line.push('-'),
        model => line.push_str(&printable(model)),
    }
    line.push_str(" status=");
    line.push_str(number.format(status));
    line.push_str(" attempts=[");
    if let Some(keys) = &ctx.keys {
        for (i, a) in ctx.attempts.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&keys.key(a.key).fingerprint);
            line.push(':');
            line.push_str(a.outcome);
        }
    }
    line.push(']');
    line.push_str(ctx.cache.map_or("", |c| match c {
        Status::Hit => " cache=hit",
        Status::Miss => " cache=miss",
        Status::Bypass => " cache=bypass",
    }));
    line.push_str(" ms=");
    line.push_str(number.format(ctx.started.elapsed().as_millis()));
    if let Some(e) = error {
        line.push_str(" error=");
        line.push_str(e.etype().as_str());
    }
    line
}

impl Gateway {
    /// Admits, places and answers one request (see [`ProxyHttp::request_filter`]).
    async fn answer(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
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
        let logged = affinity::redact_upload_id(&target);
        let logged = printable(&logged);
        ctx.target = String::with_capacity(req.method.as_str().len() + 1 + logged.len());
        ctx.target.push_str(req.method.as_str());
        ctx.target.push(' ');
        ctx.target.push_str(&logged);
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
            Some(id) => match self.shared.upload_session(id, now).await {
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

        // A request the response cache may answer counts against rpm only once it missed: rpm
        // protects quota, and a hit spends none.
        let rate_later = rt.cache.is_some() && cacheable_kind(&session.req_header().method, &path);
        if let Some(t) = &tenant {
            match self.admit_tenant(t, rate_later).await {
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
            // Boxed: a Live session's state is the largest of all, and would otherwise be
            // copied (memcpy) with every request's future (BENCHMARKS.md).
            let live = self.websocket(session, ctx, &rt, tenant.as_deref(), &path_and_query);
            return Box::pin(live).await;
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
        // The path names a collection whose POST creates resources (computed once: it is a
        // handful of substring searches).
        let creates_path = creates_resources(&path);
        let creates = is_post && creates_path;
        let model = match request::model_of(api, &path, creates, &body) {
            Ok(model) => model,
            Err(why) => {
                let e = GatewayError::new(400, "INVALID_ARGUMENT", format!("keygate: {why}"));
                return respond(session, ctx, Some(api), &e).await;
            }
        };
        // A model alias is the model it stands for from here on: routed, limited, cooled and
        // counted as that, and forwarded naming it (the path, the body's `model`).
        let (model, path, path_and_query, body) =
            match alias::resolve(&rt.model_aliases, api, &path, &model, &body) {
                Ok(None) => (model, path, path_and_query, body),
                Ok(Some(resolved)) => {
                    let forwarded = request::with_query(&resolved.path, query.forwarded.as_deref());
                    let body = resolved.body.map_or(body, Bytes::from);
                    (resolved.model, resolved.path, forwarded, body)
                }
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
            None => {
                let peer = session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .map(|a| a.ip());
                let req = session.req_header();
                let place = |missing: &mut Vec<String>| {
                    let t = tenant.as_deref();
                    self.place(
                        &rt,
                        req,
                        t,
                        &path,
                        creates_path,
                        &model,
                        &body,
                        peer,
                        now,
                        missing,
                    )
                };
                let mut missing = Vec::new();
                let placed = place(&mut missing);
                // Names this instance does not know may be known to the others: one bounded
                // read of the store, then the request is placed again with what it held.
                if !missing.is_empty() && self.shared.learn_owners(&missing).await > 0 {
                    place(&mut Vec::new())
                } else {
                    placed
                }
            }
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
        let at = cache::Placed {
            pool: &placed.pool,
            path: &path,
            query: query.forwarded.as_deref(),
            model: &model,
            body: &body,
        };
        if let Some(hit) = self.ask_cache(session, ctx, &rt, at).await {
            return hit;
        }
        if let Some(t) = tenant.as_ref().filter(|_| rate_later) {
            if let Err(refusal) = self.admit_tenant_rate(t).await {
                return respond(session, ctx, Some(api), &limit_error(&t.name, refusal)).await;
            }
        }
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

        // With fair share on, a tenant that used the pool more than other active tenants lately
        // leaves some projects to them. Every request makes its tenant active, served or not.
        let mut reserved = Vec::new();
        if let (Some(t), Some(fair)) = (&tenant, &placed.pool.fair) {
            let lighter = fair.arrive(&t.name, now);
            if project.is_none() && lighter > 0 {
                reserved = keys.reserved_projects(&model, lighter, now);
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
            rt: rt.clone(),
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
                // Boxed, like the listings: only a refusal pays for its future.
                Box::pin(self.relay_error(session, ctx, &job, key, answer, &outcome)).await
            }
            Ending::Failed(e) => respond(session, ctx, Some(api), &e).await,
            Ending::ClientGone => Ok(client_gone(session, ctx)),
        }
    }
}

/// `Box::pin(make())` with the box allocated before the future is made, so that the future is
/// written straight into it instead of being built on the stack and copied.
#[inline(always)]
fn boxed_in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    let slot = Box::<F>::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_line_says_what_happened_on_one_line() {
        let mut ctx = Ctx::new();
        ctx.target = "POST /v1beta/models/m:generateContent".into();
        ctx.model = "m\nINFO forged".into();
        ctx.cache = Some(Status::Hit);
        let error = Error::explain(ErrorType::ReadTimedout, "slow");
        let line = access_line(&ctx, 504, Some(&error));
        let ms = line.rsplit(" ms=").next().and_then(|r| r.split(' ').next());
        assert!(ms.is_some_and(|ms| ms.parse::<u64>().is_ok()), "{line}");
        let ms = ms.unwrap_or_default();
        assert_eq!(
            line,
            format!(
                "tenant=- \"POST /v1beta/models/m:generateContent\" model=m\\nINFO forged \
                 status=504 attempts=[] cache=hit ms={ms} error=ReadTimedout"
            )
        );
        ctx.model.clear();
        ctx.cache = None;
        let line = access_line(&ctx, 200, None);
        assert!(line.starts_with("tenant=- \"POST /v1beta/models/m:generateContent\" model=- status=200 attempts=[] ms="), "{line}");
        assert!(!line.contains("error="), "{line}");
    }
}
