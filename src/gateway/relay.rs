//! Relaying Google's answer to the client as it streams, and learning from it: tokens used,
//! resources created, uploads started.

use super::answers::{
    add_own_headers, error_reply, respond, scrub_headers, write_whole, ErrorReply,
};
use super::cache;
use super::client::{client_gone, prepare_downstream_header, watched, Waited};
use super::place::counts_tokens;
use super::{Ctx, Gateway, Job, Learn};
use crate::gateway::guard;
use crate::logging::printable;
use crate::quota::classify::Outcome;
use crate::quota::keys::{now_millis, KeyId, Millis};
use crate::tenants::Tenant;
use crate::upstream::exchange::{decoded_body, read_up_to, Answer};
use crate::wire::error::GatewayError;
use crate::wire::usage::BodyTap;
use crate::{quota::affinity, wire::alias, wire::names};
use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::future::{poll_fn, Future};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Largest answer body read to learn the names of created resources.
pub(super) const CREATED_ANSWER_LIMIT: usize = 256 * 1024;

/// Largest listing answer filtered for a tenant; a larger one is withheld (ask for a smaller
/// `pageSize`).
pub(super) const LISTING_LIMIT: usize = 8 * 1024 * 1024;

impl Gateway {
    /// Streams an answer to the client, chunk by chunk as it arrives, and afterwards records
    /// what it says: token usage, and for successful answers the resources it created.
    pub(super) async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        answer: Answer,
    ) -> pingora::Result<bool> {
        // The listings are boxed: their futures (~6 KB each) would otherwise be part of every
        // request's, which is copied whole into its box (BENCHMARKS.md).
        if matches!(job.learn, Learn::List) {
            return Box::pin(self.relay_listing(session, ctx, job, key, answer)).await;
        }
        if matches!(job.learn, Learn::Models) && answer.header.status.is_success() {
            return Box::pin(self.relay_models(session, ctx, job, key, answer)).await;
        }
        let Answer {
            mut header,
            mut body,
        } = answer;
        let success = header.status.is_success();
        let head = session.req_header().method == http::Method::HEAD;
        scrub_headers(&mut header, job.keys.scrubber())?;
        prepare_downstream_header(&mut header, head)?;
        // A 200 the response cache will keep is recorded whole, decoded, as it goes by.
        let mut recording = ctx.recording.take().filter(|_| header.status == 200);
        if let Some(r) = recording.as_mut() {
            r.header(&header.headers);
        }
        add_own_headers(&mut header, ctx)?;
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
            Learn::Create | Learn::Interaction | Learn::UploadContinue { .. } | Learn::Read
                if success =>
            {
                CREATED_ANSWER_LIMIT
            }
            _ => 0,
        };
        let keep_head = recording.as_ref().map_or(keep_head, |r| r.max_bytes());
        // Tokens are counted on answers to generation and embedding calls only: resources
        // (caches, batches) repeat a usage object each time they are read.
        let counts_tokens = counts_tokens(job.method);
        let mut tap =
            (success && (counts_tokens || keep_head > 0)).then(|| BodyTap::new(gzip, keep_head));
        // A new interaction is bound as soon as its answer names it, from the answer's start.
        let mut watch = None;
        if success && matches!(job.learn, Learn::Interaction) {
            let stream = header
                .headers
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            watch = Some(names::InteractionWatch::new(stream));
            tap = tap.map(BodyTap::keeping_prefix);
        }
        let upload_final = header
            .headers
            .get("x-goog-upload-status")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"final"));
        // The upstream connection goes back to the pool as soon as its body is complete, before
        // the client has the end of the answer: its next request can then reuse it.
        self.park(job, &mut body).await;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        let metrics = &self.shared.metrics;
        let pool = job.pool.metrics(metrics);
        metrics.time_to_first_byte(pool, ctx.started.elapsed().as_secs_f64());
        // What the answer taught (resources created, tokens) is recorded once its body is
        // complete but before its last bytes reach the client: a client that names a resource
        // the moment it has the answer must find it bound.
        let mut recorded = false;
        let limits = job.rt.client_limits;
        let mut pace = guard::SendPace::new(limits.send_timeout, limits.body_min_rate);
        let pre_read = std::mem::take(&mut body.read);
        let last_pre_read = pre_read.len();
        for (i, chunk) in pre_read.into_iter().enumerate() {
            let last = i + 1 == last_pre_read && body.http.is_none();
            if let Some(tap) = tap.as_mut() {
                tap.feed(&chunk);
                cache::hold(&mut recording, tap);
                self.watch_interaction(ctx, job, key, watch.as_mut(), tap, last);
            }
            if last {
                self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
                self.keep_answer(job, recording.take(), tap.as_mut()).await;
                recorded = true;
                ctx.answer_complete();
            }
            if !write_chunk(session, ctx, &mut pace, chunk).await? {
                return Ok(true);
            }
        }
        // Each read of the body is timed with the client's watch (see [`watched`]).
        let read_timeout = job.rt.timeouts.read;
        if let Some(http) = body.http.as_mut() {
            http.set_read_timeout(None);
        }
        while let Some(http) = body.http.as_mut() {
            // A client gone mid-stream stops the stream: Google stops when its connection goes.
            let chunk = match watched(session, http.read_response_body(), Some(read_timeout)).await
            {
                Waited::Done(chunk) => chunk?,
                Waited::ClientGone => {
                    session.set_keepalive(None);
                    return Ok(true);
                }
                Waited::TimedOut => {
                    return Err(Error::explain(
                        ErrorType::ReadTimedout,
                        "the answer's body stalled",
                    ))
                }
            };
            body.complete = chunk.is_none() || http.response_done();
            self.park(job, &mut body).await;
            if let Some(tap) = tap.as_mut() {
                if let Some(chunk) = chunk.as_ref() {
                    tap.feed(chunk);
                    cache::hold(&mut recording, tap);
                }
                self.watch_interaction(ctx, job, key, watch.as_mut(), tap, body.complete);
            }
            if body.complete && !recorded {
                self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
                self.keep_answer(job, recording.take(), tap.as_mut()).await;
                recorded = true;
                ctx.answer_complete();
            }
            match chunk {
                Some(chunk) => {
                    if !write_chunk(session, ctx, &mut pace, chunk).await? {
                        return Ok(true);
                    }
                }
                None => break,
            }
        }
        if !recorded {
            if let Some(tap) = tap.as_ref() {
                self.watch_interaction(ctx, job, key, watch.as_mut(), tap, true);
            }
            self.record_answer(ctx, job, key, tap.as_ref(), upload_final, counts_tokens);
            self.keep_answer(job, recording.take(), tap.as_mut()).await;
        }
        ctx.answer_complete();
        session.write_response_body(None, true).await?;
        Ok(true)
    }

    /// Relays an answer that is not a success, as a client may see it (see [`error_reply`]).
    pub(super) async fn relay_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        mut answer: Answer,
        outcome: &Outcome,
    ) -> pingora::Result<bool> {
        self.park(job, &mut answer.body).await;
        job.keys.key(key).usage.count_request();
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
    pub(super) async fn relay_listing(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        mut answer: Answer,
    ) -> pingora::Result<bool> {
        if !read_listing(session, &mut answer).await {
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
        self.park(job, &mut answer.body).await;
        job.keys.key(key).usage.count_request();
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

    /// Relays the first page of a model listing with the model aliases the tenant may use
    /// added, each naming the model it stands for. An answer keygate cannot read as a listing
    /// goes to the client as it came.
    pub(super) async fn relay_models(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        job: &Job<'_>,
        key: KeyId,
        mut answer: Answer,
    ) -> pingora::Result<bool> {
        if !read_listing(session, &mut answer).await {
            return Ok(client_gone(session, ctx));
        }
        if !answer.body.complete {
            let e = GatewayError::new(
                502,
                "UNAVAILABLE",
                "keygate: this model listing is larger than 8 MiB; ask for fewer entries with pageSize",
            );
            return respond(session, ctx, Some(job.forward.api), &e).await;
        }
        let aliases = job.rt.aliases_for(ctx.tenant.as_deref());
        let listed = alias::add_to_listing(&decoded_body(&answer, LISTING_LIMIT), &aliases);
        self.park(job, &mut answer.body).await;
        job.keys.key(key).usage.count_request();
        let mut header = answer.header;
        let body = match listed {
            Some(body) => {
                header.remove_header(&header::CONTENT_ENCODING);
                Bytes::from(body)
            }
            None => Bytes::from(answer.body.read.concat()),
        };
        scrub_headers(&mut header, job.keys.scrubber())?;
        ctx.served = true;
        write_whole(session, ctx, header, body, false).await?;
        Ok(true)
    }

    /// Counts a relayed answer for its key and tenant, and records what it taught.
    pub(super) fn record_answer(
        &self,
        ctx: &Ctx,
        job: &Job<'_>,
        key: KeyId,
        tap: Option<&BodyTap>,
        upload_final: bool,
        counts_tokens: bool,
    ) {
        let pool_key = job.keys.key(key);
        pool_key.usage.count_request();
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
    pub(super) fn rewrite_upload_url(
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
        // A relay may hand out the URL under its own path: keygate adds that path itself.
        let base_path = &job.pool.upstream.config().base_path;
        let google_url = crate::wire::request::without_base(&google_url, base_path).to_string();
        let session = affinity::UploadSession {
            owner: self.owner(job, key, tenant),
            key_fingerprint: job.keys.key(key).fingerprint.clone(),
            upstream_path_and_query: google_url.clone(),
        };
        match self.shared.start_upload(session, now_millis()) {
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
    pub(super) fn owner(
        &self,
        job: &Job<'_>,
        key: KeyId,
        tenant: Option<&Tenant>,
    ) -> affinity::Owner {
        let keys = &job.keys;
        affinity::Owner {
            pool: Arc::from(job.pool.name()),
            project: Arc::from(keys.project_name(keys.key(key).project)),
            tenant: tenant.map(|t| t.name.clone()),
        }
    }

    /// Records what a successful answer taught: resources created, deleted, or seen working.
    pub(super) fn learn(
        &self,
        ctx: &Ctx,
        job: &Job<'_>,
        key: KeyId,
        tap: &BodyTap,
        upload_final: bool,
    ) {
        let now = now_millis();
        let table = &self.shared.affinity;
        let bind = |name: &str| self.bind_created(ctx, job, key, name, now);
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
                    self.shared.forget(name);
                }
            }
            // Bound as the answer went by (`watch_interaction`).
            Learn::Interaction
            | Learn::Nothing
            | Learn::UploadStart { .. }
            | Learn::List
            | Learn::Models => {}
        }
        if let Learn::UploadContinue { id } = &job.learn {
            if upload_final {
                self.shared.finish_upload(id);
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

    /// Binds what an answer says was made to the owner of `key`: its pool and project, and the
    /// tenant that asked. A live binding is never taken over.
    fn bind_created(&self, ctx: &Ctx, job: &Job<'_>, key: KeyId, name: &str, now: Millis) {
        let owner = self.owner(job, key, ctx.tenant.as_deref());
        let project = owner.project.clone();
        if !self.shared.bind_new(name, owner, now) {
            log::warn!(
                "{} is already bound to another tenant or project; an answer of project {} named it too (kept the first owner)",
                printable(name),
                printable(&project)
            );
        }
    }

    /// Reads the answer to a new interaction as it arrives, and binds the interaction the moment
    /// the answer names it: a client may name it (to resume a stream, or to follow up on a
    /// background run) before the answer ends, or after hanging up mid-stream. `complete`: the
    /// body has ended.
    fn watch_interaction(
        &self,
        ctx: &Ctx,
        job: &Job<'_>,
        key: KeyId,
        watch: Option<&mut names::InteractionWatch>,
        tap: &BodyTap,
        complete: bool,
    ) {
        let Some(watch) = watch else {
            return;
        };
        if let Some(name) = watch.read(tap.prefix(), complete) {
            self.bind_created(ctx, job, key, &name, now_millis());
        }
    }
}

/// Writes one chunk of an answer to the client; false (and the connection not kept) when the
/// client takes the answer too slowly ([`guard::SendPace`]).
async fn write_chunk(
    session: &mut Session,
    ctx: &mut Ctx,
    pace: &mut guard::SendPace,
    chunk: Bytes,
) -> pingora::Result<bool> {
    let len = chunk.len();
    ctx.response_bytes += len as u64;
    // Most writes go out at once: only one that has to wait reads the clock.
    let took = {
        let mut write = pin!(session.write_response_body(Some(chunk), false));
        match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(written) => {
                written?;
                Duration::ZERO
            }
            Poll::Pending => {
                let started = Instant::now();
                write.await?;
                started.elapsed()
            }
        }
    };
    if pace.record(len, took) {
        return Ok(true);
    }
    log::debug!("client takes its answer too slowly: dropped");
    session.set_keepalive(None);
    Ok(false)
}

/// Reads a listing's body, up to [`LISTING_LIMIT`], unless the client hangs up first (false).
async fn read_listing(session: &mut Session, answer: &mut Answer) -> bool {
    let read = read_up_to(&mut answer.body, LISTING_LIMIT);
    !matches!(watched(session, read, None).await, Waited::ClientGone)
}
