//! The Live API: a WebSocket session whose upgrade goes through the attempt loop, then whose
//! frames are relayed both ways on the one key that accepted it.

use super::answers::{add_own_headers, error_reply, refuse, write_whole, ErrorReply};
use super::attempts::SendError;
use super::client::{client_gone, wait_until};
use super::{Ctx, Ending, Gateway, Job, Kind, Learn};
use crate::gateway::live_frames;
use crate::logging::printable;
use crate::quota::classify::Outcome;
use crate::quota::keys::{now_millis, KeyId, KeyPool};
use crate::runtime::{Route, Runtime};
use crate::tenants::Tenant;
use crate::upstream::exchange::{connect, read_final_header, Answer};
use crate::wire::error::GatewayError;
use crate::wire::request::{self, Api};
use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::pin::Pin;
use std::sync::Arc;

/// The health table's name for Live API sessions: a quota refusal of the upgrade cools
/// (project, `live`), apart from the project's other models.
pub(super) const LIVE_MODEL: &str = "live";

impl Gateway {
    /// A Live API session: the WebSocket upgrade goes to a key like any request (a refusal
    /// before the switch, 429 or 403, moves to another key), and once Google switches protocols
    /// the frames are relayed both ways, on that one key, for the session's life.
    pub(super) async fn websocket(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        rt: &Arc<Runtime>,
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
            rt: rt.clone(),
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
        keys.key(key).usage.count_request();
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
    pub(super) async fn upgrade(
        &self,
        job: &Job<'_>,
        key: &str,
        plain: bool,
    ) -> Result<(ClientSession, ResponseHeader), SendError> {
        let upstream = &job.pool.upstream;
        let timeouts = job.rt.timeouts;
        let mut http = connect(upstream, timeouts.connect, true).await?.http;
        let target = upstream.target(false);
        let exchange_error = |error| SendError::Exchange {
            error,
            reused: false,
        };
        let mut req = request::upstream_request(&job.outgoing, &job.forward, key, &target)
            .map_err(exchange_error)?;
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
        read_final_header(&mut http).await.map_err(exchange_error)?;
        let header = http.response_header().cloned().ok_or_else(|| {
            exchange_error(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "no response header",
            ))
        })?;
        // Frames may be far apart: no read timeout once switched.
        http.set_read_timeout(None);
        Ok((http, header))
    }

    /// Switches the client's connection too, then copies bytes both ways until either side
    /// closes. With `check` (a tenant's session), each client message is read first and the
    /// session closed if it names a resource that is not the tenant's.
    pub(super) async fn relay_frames(
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
        add_own_headers(&mut switch, ctx)?;
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
                        match self.checked(check, &bytes).await {
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
    pub(super) async fn write_refusal(
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

    /// The frames of the client's next `bytes` that may go on to Google, each message checked
    /// against the owners of the names it holds. A name this instance does not know is asked
    /// of the other instances first (with `redis:`), as a request's would be: a file uploaded
    /// through another instance is the tenant's here too.
    async fn checked(
        &self,
        check: &mut live_frames::MessageCheck,
        bytes: &[u8],
    ) -> Result<Vec<Bytes>, live_frames::Close> {
        let mut out = Vec::new();
        for item in check.take(bytes)? {
            match item {
                live_frames::Ready::Control(frame) => out.push(frame),
                live_frames::Ready::Message { frames, payload } => {
                    let affinity = &self.shared.affinity;
                    let unknown = check.unknown_names(&payload, affinity, now_millis());
                    if !unknown.is_empty() {
                        self.shared.learn_owners(&unknown).await;
                    }
                    check.check_message(&payload, affinity, now_millis())?;
                    out.push(frames);
                }
            }
        }
        Ok(out)
    }
}

/// Ends a Live session on keygate's side: a close frame to the client, then the end.
pub(super) async fn close_session(
    session: &mut Session,
    close: live_frames::Close,
) -> pingora::Result<bool> {
    session
        .write_response_body(Some(close.frame()), false)
        .await?;
    session.write_response_body(None, true).await?;
    Ok(true)
}
