//! What the client gets when the answer is not Google's success: keygate's own errors, and
//! Google's errors as they may be relayed (never one naming a key).

use super::client::prepare_downstream_header;
use super::Ctx;
use crate::quota::classify::{self, Outcome, MAX_CLASSIFY_BODY};
use crate::quota::keys::{now_millis, Exhaustion, KeyId, KeyPool};
use crate::tenants::Refusal;
use crate::upstream::exchange::{gunzip, is_gzip, Answer};
use crate::wire::error::GatewayError;
use crate::wire::request::Api;
use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// What the client gets in place of an upstream answer that is not a success.
pub(super) enum ErrorReply {
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
pub(super) fn error_reply(
    answer: Answer,
    outcome: &Outcome,
    keys: &KeyPool,
    key: KeyId,
) -> ErrorReply {
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
pub(super) fn key_refused_error(
    status: u16,
    keys: &KeyPool,
    key: KeyId,
    outcome: &Outcome,
) -> GatewayError {
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
pub(super) fn status_name(code: u16) -> &'static str {
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
pub(super) fn scrub_headers(
    header: &mut ResponseHeader,
    scrubber: &crate::wire::scrub::Scrubber,
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
pub(super) async fn write_whole(
    session: &mut Session,
    ctx: &mut Ctx,
    mut header: ResponseHeader,
    body: Bytes,
    head: bool,
) -> pingora::Result<()> {
    prepare_downstream_header(&mut header, head)?;
    header.remove_header(&header::TRANSFER_ENCODING);
    header.insert_header(header::CONTENT_LENGTH, body.len())?;
    add_own_headers(&mut header, ctx)?;
    ctx.status = header.status.as_u16();
    ctx.response_bytes += body.len() as u64;
    ctx.answer_complete();
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The answer for "no key can serve this model now"; `project` when only one project could.
pub(super) fn exhausted_error(
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
pub(super) fn limit_error(tenant: &str, refusal: Refusal) -> GatewayError {
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
pub(super) fn fair_share_error(
    pool: &KeyPool,
    tenant: &str,
    model: &str,
    reserved: usize,
) -> GatewayError {
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
            "keygate: tenant '{tenant}' used pool '{}' more than other active tenants in the last minute, and the projects it may use are out of quota for model '{model}'; the {reserved} project(s) left are kept for the other tenants. Retry in {secs} s.",
            pool.name()
        ),
        retry_after: Some(secs),
    }
}

/// Adds the headers that are keygate's for this request to an answer, replacing any the
/// upstream sent: its CORS headers, and what the response cache did (`x-keygate-cache`).
pub(super) fn add_own_headers(header: &mut ResponseHeader, ctx: &Ctx) -> pingora::Result<()> {
    for (name, value) in &ctx.cors {
        if *name == "vary" {
            header.append_header(*name, value.as_str())?;
        } else {
            header.insert_header(*name, value.as_str())?;
        }
    }
    if let Some(status) = ctx.cache {
        header.insert_header(crate::cache::STATUS_HEADER, status.as_str())?;
    }
    Ok(())
}

/// Writes a bodiless answer of keygate's own (a CORS preflight).
pub(super) async fn respond_empty(
    session: &mut Session,
    ctx: &mut Ctx,
    code: u16,
) -> pingora::Result<bool> {
    let mut resp = ResponseHeader::build(code, Some(ctx.cors.len() + 1))?;
    resp.insert_header(header::CONTENT_LENGTH, 0)?;
    add_own_headers(&mut resp, ctx)?;
    ctx.status = code;
    session.write_response_header(Box::new(resp), true).await?;
    Ok(true)
}

/// Answers without reading the request body: the connection cannot be reused.
pub(super) async fn refuse(
    session: &mut Session,
    ctx: &mut Ctx,
    api: Api,
    e: &GatewayError,
) -> pingora::Result<bool> {
    session.set_keepalive(None);
    respond(session, ctx, Some(api), e).await
}

/// Writes one of keygate's own answers.
pub(super) async fn respond(
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
    add_own_headers(&mut resp, ctx)?;
    ctx.status = e.code;
    ctx.response_bytes += body.len() as u64;
    ctx.answer_complete();
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}
