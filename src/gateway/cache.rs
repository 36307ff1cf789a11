//! The response cache on the request path. A request is looked up once it is placed on a pool
//! (so its tenant may use the pool and the resources it names are known): a hit is answered
//! here, spending no key and no rpm; a miss's answer is recorded as [`super::relay`] streams it
//! and kept once it ended cleanly. What is cached, and under which key, is `crate::cache`'s.

use super::answers::write_whole;
use super::{Ctx, Gateway, Job};
use crate::cache::{self, Ask, Cache, Entry, Plan, Recording, Status};
use crate::quota::keys::now_millis;
use crate::runtime::{Pool, Runtime};
use crate::wire::usage::BodyTap;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use std::sync::atomic::Ordering::Relaxed;

/// Where a placed request is, for the cache.
pub(super) struct Placed<'a> {
    /// The pool it was placed on.
    pub(super) pool: &'a Pool,
    /// The canonical path (OpenAI aliases resolved).
    pub(super) path: &'a str,
    /// The query as forwarded.
    pub(super) query: Option<&'a str>,
    /// The model routed by.
    pub(super) model: &'a str,
    /// The request body.
    pub(super) body: &'a [u8],
}

impl Gateway {
    /// Asks the response cache (when one is configured) about a placed request: `Some` when a
    /// hit answered it. Otherwise `ctx` says what the cache did and, on a miss, holds the
    /// recording of the answer to come.
    pub(super) async fn ask_cache(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        rt: &Runtime,
        placed: Placed<'_>,
    ) -> Option<pingora::Result<bool>> {
        let cache = rt.cache.as_ref()?;
        // Boxed: the lookup and the hit's write would otherwise enlarge every request's future
        // (and its copies), cache or not.
        Box::pin(self.lookup(session, ctx, cache, placed)).await
    }

    async fn lookup(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        cache: &Cache,
        placed: Placed<'_>,
    ) -> Option<pingora::Result<bool>> {
        let req = session.req_header();
        let plan = cache::plan(&Ask {
            tenant: ctx.tenant.as_ref().map(|t| &t.name),
            pool: placed.pool.name(),
            shared: placed.pool.config.cache_shared_across_tenants,
            method: &req.method,
            path: placed.path,
            query: placed.query,
            model: placed.model,
            headers: &req.headers,
            body: placed.body,
        });
        let Plan::Use {
            key,
            lookup,
            max_age,
            openai_stream,
        } = plan
        else {
            self.count_cache(ctx, placed.pool, Status::Bypass);
            return None;
        };
        if lookup {
            let now = now_millis();
            if let Some(entry) = cache.lookup(&key, max_age, now).await {
                self.count_cache(ctx, placed.pool, Status::Hit);
                return Some(self.serve_hit(session, ctx, &entry, now).await);
            }
        }
        self.count_cache(ctx, placed.pool, Status::Miss);
        ctx.recording = Some(Box::new(cache.recording(key, openai_stream)));
        None
    }

    /// Notes what the cache did with a request: the answer's header, the tenant's counts, the
    /// metrics.
    fn count_cache(&self, ctx: &mut Ctx, pool: &Pool, status: Status) {
        ctx.cache = Some(status);
        let tenant = ctx.tenant.as_ref();
        if let Some(t) = tenant {
            match status {
                Status::Hit => t.state.cache.hits.fetch_add(1, Relaxed),
                Status::Miss => t.state.cache.misses.fetch_add(1, Relaxed),
                Status::Bypass => 0,
            };
        }
        let name = tenant.map_or("-", |t| &*t.name);
        self.shared
            .metrics
            .cache_request(name, pool.name(), status.as_str());
    }

    /// Answers from the cache: the entry's header fields and body, at once and whole (a
    /// stream's events all together), with its `age`.
    async fn serve_hit(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &Entry,
        now: u64,
    ) -> pingora::Result<bool> {
        let mut header = ResponseHeader::build(200, Some(entry.headers.len() + 4))?;
        for (name, value) in &entry.headers {
            header.append_header(name.clone(), value.clone())?;
        }
        header.insert_header(header::AGE, now.saturating_sub(entry.stored_at) / 1000)?;
        ctx.served = true;
        let bytes = entry.body.len() as u64;
        if let Some(t) = &ctx.tenant {
            t.state.cache.hit_bytes.fetch_add(bytes, Relaxed);
            t.state.cache.saved_tokens.fetch_add(entry.tokens, Relaxed);
        }
        let tenant = ctx.tenant.as_ref().map_or("-", |t| &*t.name);
        self.shared.metrics.cache_hit(tenant, bytes, entry.tokens);
        write_whole(session, ctx, header, entry.body.clone(), false).await?;
        Ok(true)
    }

    /// Keeps a recorded answer whose body the tap has seen whole: in the cache, unless it is
    /// not clean or not whole (a gzip body that did not check out).
    pub(super) async fn keep_answer(
        &self,
        job: &Job<'_>,
        recording: Option<Box<Recording>>,
        tap: Option<&mut BodyTap>,
    ) {
        let (Some(recording), Some(tap), Some(cache)) = (recording, tap, job.rt.cache.as_ref())
        else {
            return;
        };
        let tokens = tap.tokens().map_or(0, |t| t.total);
        if let Some(body) = tap.take_head() {
            // Boxed, like the lookup: only answers being kept pay for it.
            Box::pin(cache.keep(*recording, body, tokens, now_millis())).await;
        }
    }
}

/// Counts what the tap holds of an answer being recorded; stops the recording (and frees what
/// the tap kept of it) when the answer outgrew an entry or the budget has no room for it.
pub(super) fn hold(recording: &mut Option<Box<Recording>>, tap: &mut BodyTap) {
    let Some(r) = recording.as_mut() else {
        return;
    };
    if tap.head_lost() || !r.hold(tap.head_held()) {
        *recording = None;
        tap.drop_head();
    }
}
