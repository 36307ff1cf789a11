//! The gateway: what happens to a client's request, from the Pingora hooks to the answer.
//!
//! Everything happens in `request_filter` ([`hooks`]): admit the request (CORS, tenant, limits,
//! body within its budget), place it on a pool ([`place`]), then the one attempt loop
//! ([`attempts`]) tries keys as the attempt plan says until one serves, and the answer is
//! streamed to the client ([`relay`]) or replaced by keygate's own ([`answers`]). With a
//! response cache, a placed request is looked up first ([`cache`]): a hit is answered at once. A Live
//! session ([`live`]) goes through the same attempts for its upgrade. Pingora's own retry is not
//! used: it replays at most 64 KiB of body and decides on headers alone.

mod answers;
mod attempts;
mod cache;
mod client;
mod events;
pub mod guard;
mod hooks;
mod limits;
mod live;
pub mod live_frames;
mod place;
mod relay;

use crate::quota::classify::Outcome;
use crate::quota::keys::{KeyId, KeyPool};
use crate::runtime::budget::Reservation;
use crate::runtime::{Pool, Runtime, Shared};
use crate::tenants::Tenant;
use crate::upstream::exchange::Answer;
use crate::wire::error::GatewayError;
use crate::wire::request;
use bytes::Bytes;
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
    /// The tenant's concurrency slot, released once the answer is whole
    /// ([`Ctx::answer_complete`]), or when the context is dropped.
    in_flight: Option<limits::Slot>,
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
    /// What the response cache did (`x-keygate-cache`), when one is configured and was asked.
    cache: Option<crate::cache::Status>,
    /// The answer being recorded for the response cache (a miss).
    recording: Option<Box<crate::cache::Recording>>,
}

impl Ctx {
    /// A request's context before anything is known of it.
    pub(super) fn new() -> Ctx {
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
            cache: None,
            recording: None,
        }
    }

    /// The answer is whole and its last bytes are about to go out: the tenant's concurrency
    /// slot is free now. Held until the context is dropped (after the logging hook), it would
    /// still count a request whose client already has its answer and sends the next.
    fn answer_complete(&mut self) {
        self.in_flight = None;
    }
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
    /// A new interaction (a first turn or a follow-up, `POST .../interactions`): the answer
    /// names it (a JSON answer's `id`, a stream's first event).
    Interaction,
    /// A successful DELETE of these resources.
    Delete(Vec<String>),
    /// A listing of project-bound resources, shown to a tenant: only its own entries stay.
    List,
    /// The first page of a model listing: the model aliases are added to it.
    Models,
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
    /// The runtime snapshot the request was admitted under: one configuration for all of it,
    /// even across a reload.
    rt: Arc<Runtime>,
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
