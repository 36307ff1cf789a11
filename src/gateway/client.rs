//! The client side of a request: reading its body within limits and deadlines, and noticing
//! a client that hangs up.

use super::{Ctx, CLIENT_GONE};
use crate::config::ClientLimits;
use crate::gateway::guard;
use crate::runtime::budget::Reservation;
use crate::tenants::Tenant;
use crate::wire::error::GatewayError;
use crate::wire::request;
use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::ErrorType;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How long work may take before keygate starts watching its client for a hang-up. Most
/// answers come sooner, and the watch costs a read of the client's socket; a client that hangs
/// up while Google thinks for seconds or minutes is noticed within this.
pub(super) const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(100);

/// How a wait on the upstream ended.
pub(super) enum Waited<T> {
    Done(T),
    /// The client hung up meanwhile.
    ClientGone,
    /// The wait took longer than its timeout.
    TimedOut,
}

/// Runs `work` (a wait on the upstream) unless the client hangs up first or, with a
/// `timeout`, it takes longer than that. The request body has been read whole by now, so any
/// read from the client means it is gone (or, pipelining, sending more than it should):
/// Pingora's idle read only ever ends with an error.
///
/// One timer serves both, and only when `work` has to wait: first until [`WATCH_CLIENT_AFTER`]
/// (then the client is watched), then until the timeout. Timers were the largest cost keygate
/// added to a request over Pingora's own proxy (BENCHMARKS.md), so the upstream read timeouts
/// of the request path are kept here rather than in Pingora's session.
pub(super) async fn watched<T>(
    session: &mut Session,
    work: impl Future<Output = T>,
    timeout: Option<Duration>,
) -> Waited<T> {
    let mut work = pin!(work);
    let mut timer = pin!(None::<Sleep>);
    // When the watch starts, and the deadline: known once the work first waits.
    let mut at: Option<(Instant, Option<Instant>)> = None;
    // Until the watch starts: the work alone.
    let first = poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let (watch_from, deadline) = *at.get_or_insert_with(|| {
            let now = Instant::now();
            (now + WATCH_CLIENT_AFTER, timeout.map(|t| now + t))
        });
        if timer.is_none() {
            let first = deadline.map_or(watch_from, |d| d.min(watch_from));
            timer.set(Some(tokio::time::sleep_until(first)));
        }
        match timer.as_mut().as_pin_mut() {
            Some(sleep) => sleep.poll(cx).map(|()| Err((watch_from, deadline))),
            None => Poll::Pending,
        }
    })
    .await;
    let deadline = match first {
        Ok(out) => return Waited::Done(out),
        Err((watch_from, Some(deadline))) if deadline <= watch_from => return Waited::TimedOut,
        Err((_, deadline)) => deadline,
    };
    // From now on the same timer waits for the deadline, if there is one.
    if let (Some(deadline), Some(sleep)) = (deadline, timer.as_mut().as_pin_mut()) {
        sleep.reset(deadline);
    }
    let expiry = async {
        match (deadline, timer.as_pin_mut()) {
            (Some(_), Some(sleep)) => sleep.await,
            _ => std::future::pending().await,
        }
    };
    let watch = session.read_body_or_idle(true);
    tokio::select! {
        biased;
        out = work => Waited::Done(out),
        _ = watch => Waited::ClientGone,
        () = expiry => Waited::TimedOut,
    }
}

/// Ends a request whose client hung up: nothing more is sent or attempted, the tenant's
/// concurrency slot is given back at once, and the access line says 499.
pub(super) fn client_gone(session: &mut Session, ctx: &mut Ctx) -> bool {
    ctx.in_flight = None;
    ctx.status = CLIENT_GONE;
    session.set_keepalive(None);
    true
}

/// Whether an answer's header `name` stays between keygate and the upstream: the hop-by-hop
/// headers (they describe the upstream's connection, not the client's) and the CORS ones
/// (which pages may read an answer is keygate's decision, `cors`, never the upstream's).
fn upstream_only(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
    ) || name.as_str().starts_with("access-control-")
}

/// Turns an upstream response header into one fit for the client connection: hop-by-hop
/// headers removed, HTTP/1.1 framing chosen (chunked when the length is unknown).
pub(super) fn prepare_downstream_header(
    header: &mut ResponseHeader,
    head_request: bool,
) -> pingora::Result<()> {
    // One pass over the names, removals only when there is one: most answers carry none.
    let listed = request::connection_listed(&header.headers);
    let doomed = |n: &http::HeaderName| upstream_only(n) || listed.contains(n);
    if header.headers.keys().any(doomed) {
        let names: Vec<http::HeaderName> = header
            .headers
            .keys()
            .filter(|n| doomed(n))
            .cloned()
            .collect();
        for name in names {
            header.remove_header(&name);
        }
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
pub(super) enum BodyRead {
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
pub(super) async fn read_body(
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
pub(super) async fn wait_until(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    due: tokio::time::Instant,
) {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
    if sleep.deadline() != due {
        sleep.as_mut().reset(due);
    }
    sleep.as_mut().await
}

/// keygate's answer to a body it did not take.
pub(super) fn body_error(read: &BodyRead, limit: usize) -> GatewayError {
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

pub(super) fn tenant_name(tenant: &Option<Arc<Tenant>>) -> Option<Arc<str>> {
    tenant.as_ref().map(|t| t.name.clone())
}

/// Microseconds since the epoch, for rate limits.
pub(super) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut header = ResponseHeader::build(200, None).expect("a status");
        for (name, value) in headers {
            header
                .append_header(name.to_string(), *value)
                .expect("a header");
        }
        header
    }

    fn names(header: &ResponseHeader) -> Vec<&str> {
        let mut names: Vec<&str> = header.headers.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn the_upstreams_connection_and_cors_headers_do_not_reach_the_client() {
        let mut header = answer(&[
            ("content-type", "application/json"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("access-control-allow-origin", "*"),
            ("content-length", "2"),
            ("x-goog-request-id", "abc"),
        ]);
        prepare_downstream_header(&mut header, false).expect("prepared");
        assert_eq!(
            names(&header),
            ["content-length", "content-type", "x-goog-request-id"]
        );
    }

    #[test]
    fn an_answer_of_unknown_length_is_sent_chunked_and_a_plain_one_untouched() {
        let mut header = answer(&[("content-type", "text/event-stream")]);
        prepare_downstream_header(&mut header, false).expect("prepared");
        assert_eq!(names(&header), ["content-type", "transfer-encoding"]);
        let mut head = answer(&[("content-type", "application/json")]);
        prepare_downstream_header(&mut head, true).expect("prepared");
        assert_eq!(names(&head), ["content-type"]);
    }
}
