//! One exchange with the upstream over a Pingora client session: write the request, read the
//! final answer header, read (part of) the body, give the connection back.

use crate::upstream::Upstream;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::upstreams::peer::HttpPeer;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

/// An upstream answer whose header has arrived.
pub(crate) struct Answer {
    pub(crate) header: ResponseHeader,
    pub(crate) body: AnswerBody,
}

/// An answer's body: the bytes read so far, and the connection the rest comes from.
pub(crate) struct AnswerBody {
    /// The connection, while the body is still to be read from it.
    pub(crate) http: Option<ClientSession>,
    pub(crate) peer: Option<Arc<HttpPeer>>,
    /// Body bytes already read.
    pub(crate) read: Vec<Bytes>,
    /// Whether `read` holds the whole body.
    pub(crate) complete: bool,
}

/// A connection to an upstream, ready for an exchange.
pub(crate) struct Connection {
    pub(crate) http: ClientSession,
    /// The peer it goes to: the connection goes back to the pool under it.
    pub(crate) peer: Arc<HttpPeer>,
    /// Whether it came from the pool (it may have been closed by the upstream meanwhile).
    pub(crate) reused: bool,
}

/// Why there is no connection.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// The host has no address: why.
    Unresolved(String),
    /// Connecting (TCP, TLS, or through the outbound proxy) failed.
    Connect(Box<pingora::Error>),
}

impl ConnectError {
    /// A short label for logs and key checks.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            ConnectError::Unresolved(_) => "unresolved",
            ConnectError::Connect(_) => "connect_error",
        }
    }
}

/// The first step of every outbound call (attempts, Live upgrades, key checks, webhooks): a
/// peer round-robin over the upstream's healthy addresses, waiting up to `wait` for the first
/// lookup, and a connection to it from Pingora's pool or a new one. `websocket`: a fresh
/// HTTP/1.1 connection with no read timeout, for a WebSocket upgrade.
pub(crate) async fn connect(
    upstream: &Upstream,
    wait: Duration,
    websocket: bool,
) -> Result<Connection, ConnectError> {
    let peer = if websocket {
        Arc::new(
            upstream
                .websocket_peer(wait)
                .await
                .map_err(ConnectError::Unresolved)?,
        )
    } else {
        upstream
            .peer(wait)
            .await
            .map_err(ConnectError::Unresolved)?
    };
    // Without TLS the upstream speaks HTTP/1.1 only, which Pingora's connector serves from its
    // HTTP/1 half: ask that half for a pooled connection first. Pingora's whole connect step
    // (TCP, TLS, ALPN, HTTP/2) is a future of ~9 KB that every request would otherwise carry
    // and copy (BENCHMARKS.md); it is boxed, and only built when a connection must be made.
    if let Some(connector) = &upstream.h1 {
        if let Some(h1) = connector.reused_http_session(&*peer).await {
            let http = ClientSession::H1(h1);
            return Ok(Connection {
                http,
                peer,
                reused: true,
            });
        }
        let (h1, reused) = Box::pin(connector.get_http_session(&*peer))
            .await
            .map_err(ConnectError::Connect)?;
        let http = ClientSession::H1(h1);
        return Ok(Connection { http, peer, reused });
    }
    let (http, reused) = Box::pin(upstream.connector.get_http_session(&*peer))
        .await
        .map_err(ConnectError::Connect)?;
    Ok(Connection { http, peer, reused })
}

/// Writes the request: header and body leave in one transmit (see [`crate::upstream::Cork`]).
pub(crate) async fn write_request(
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
    Ok(())
}

/// Reads the final response header: informational ones (100 Continue, 103 Early Hints) are
/// skipped; 101 Switching Protocols is final.
pub(crate) async fn read_final_header(http: &mut ClientSession) -> pingora::Result<()> {
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
pub(crate) async fn read_up_to(body: &mut AnswerBody, limit: usize) {
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
pub(crate) fn decoded_body(answer: &Answer, limit: usize) -> Vec<u8> {
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
pub(crate) fn gunzip(raw: &[u8], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let decoder = flate2::read::GzDecoder::new(raw).take(limit as u64 + 1);
    std::io::BufReader::new(decoder)
        .read_to_end(&mut out)
        .ok()?;
    (out.len() <= limit).then_some(out)
}

/// Whether an answer's body is gzip-encoded.
pub(crate) fn is_gzip(header: &ResponseHeader) -> bool {
    header
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
}

/// Gives a connection whose answer was read whole back to the pool, for `idle` at most.
pub(crate) async fn release(
    upstream: &Upstream,
    mut http: ClientSession,
    peer: &HttpPeer,
    idle: Duration,
) {
    if let ClientSession::H1(h1) = &mut http {
        h1.respect_keepalive();
    }
    match (http, &upstream.h1) {
        // The pool it came from (see [`connect`]).
        (ClientSession::H1(h1), Some(connector)) => {
            connector.release_http_session(h1, peer, Some(idle)).await
        }
        // Boxed like the connect step: Pingora's release for HTTP/1 and HTTP/2 is ~3 KB.
        (http, _) => {
            Box::pin(
                upstream
                    .connector
                    .release_http_session(http, peer, Some(idle)),
            )
            .await
        }
    }
}
