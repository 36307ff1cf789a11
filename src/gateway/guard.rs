//! Client connections: how many may be open, and how long a request header may take.
//!
//! Pingora reads a request header before any keygate hook runs, and resets its read timeout at
//! every byte: a client sending one byte every few seconds keeps its connection forever, and a
//! few hundred such clients use up the process's file descriptors. Pingora's options have no
//! total header deadline and no connection cap, so keygate wraps the listener's application
//! ([`Guarded`]) instead of patching Pingora:
//! - every accepted connection takes a slot; past `max_connections` a connection is refused at
//!   once (after the TCP accept, before the TLS handshake when there is one, through Pingora's
//!   connection filter) so descriptors stay free for upstream connections and the admin listener;
//! - every connection's stream is wrapped ([`DeadlineStream`]) so a request header must arrive
//!   whole within `header_timeout`: counted from the accept for the first request, and from the
//!   first byte of each later one on a kept-alive connection (idle time between requests is
//!   Pingora's keep-alive timeout). keygate's hooks tell the stream when a header is complete
//!   and when a request is over ([`header_received`], [`request_finished`]).
//!
//! The request body is keygate's own to read, so its pace is checked where it is read (see the
//! gateway's body reader), and the memory all bodies hold together is bounded by
//! `runtime::budget::BodyBudget`.

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::ConnectionFilter;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::TlsRef;
use pingora::protocols::{GetProxyDigest, GetSocketDigest, GetTimingDigest};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType, ALPN};
use pingora::protocols::{SocketDigest, TimingDigest};
use pingora::server::ShutdownWatch;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Open connections and the limits on them, shared by every connection of one listener.
#[derive(Debug)]
pub struct ConnectionLimits {
    open: AtomicUsize,
    max: usize,
    header_timeout: Duration,
    /// Connections refused for being past `max`, for the log.
    refused: AtomicU64,
}

impl ConnectionLimits {
    /// At most `max` open connections, each request header whole within `header_timeout`.
    pub fn new(max: usize, header_timeout: Duration) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            open: AtomicUsize::new(0),
            max,
            header_timeout,
            refused: AtomicU64::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// Takes a slot, or `None` when every slot is taken.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut open = self.open.load(Relaxed);
        loop {
            if open >= self.max {
                let refused = self.refused.fetch_add(1, Relaxed) + 1;
                // One line per thousand refusals: a flood must not flood the log too.
                if refused % 1000 == 1 {
                    log::warn!(
                        "client connections at the limit ({} open, client_limits.max_connections); refusing new ones ({refused} so far)",
                        self.max
                    );
                }
                return None;
            }
            match self
                .open
                .compare_exchange_weak(open, open + 1, Relaxed, Relaxed)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(seen) => open = seen,
            }
        }
    }
}

/// One open connection's place under the cap, given back when the connection ends.
#[derive(Debug)]
struct Slot(Arc<ConnectionLimits>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// Refuses connections at accept time once the cap is reached, before any TLS handshake.
#[derive(Debug)]
pub struct AtCapacity(pub Arc<ConnectionLimits>);

#[async_trait]
impl ConnectionFilter for AtCapacity {
    async fn should_accept(&self, _addr: Option<&std::net::SocketAddr>) -> bool {
        self.0.open() < self.0.max
    }
}

/// A listener application with a connection cap and a header deadline around `app`.
pub struct Guarded<A> {
    app: Arc<A>,
    limits: Arc<ConnectionLimits>,
}

impl<A> Guarded<A> {
    /// Guards `app` with `limits`.
    pub fn new(app: A, limits: Arc<ConnectionLimits>) -> Guarded<A> {
        Guarded {
            app: Arc::new(app),
            limits,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A stream handed back for reuse is already guarded.
        if stream.as_any().is::<DeadlineStream>() {
            return self.app.process_new(stream, shutdown).await;
        }
        let Some(slot) = self.limits.admit() else {
            refuse(stream).await;
            return None;
        };
        let stream = DeadlineStream::new(stream, self.limits.header_timeout, slot);
        self.app.process_new(Box::new(stream), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Tells a connection past the cap to come back later, then closes it.
async fn refuse(mut stream: Stream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = r#"{"error":{"code":503,"message":"keygate: too many open connections; retry shortly","status":"UNAVAILABLE"}}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), write).await;
}

/// By when the next bytes of a body (a request body, a Live message) must come: within
/// `body_timeout` of the last bytes, and before the bytes so far (`bytes` since `started`) fall
/// below `body_min_rate` once `body_timeout` has passed.
pub fn body_due(
    limits: &crate::config::ClientLimits,
    started: tokio::time::Instant,
    last_progress: tokio::time::Instant,
    bytes: usize,
) -> tokio::time::Instant {
    let due = last_progress + limits.body_timeout;
    if limits.body_min_rate == 0 {
        return due;
    }
    let at_rate = Duration::from_secs_f64(bytes as f64 / limits.body_min_rate as f64);
    due.min(started + limits.body_timeout + at_rate)
}

/// The pace at which a client takes an answer. Writing to a client that reads nothing stalls;
/// a write timeout catches a client that stops, and this catches one that takes a few bytes now
/// and then: once writes have waited `grace` in all, the bytes written must come to at least
/// `min_rate` per second of waiting. Time spent waiting for Google does not count.
#[derive(Debug)]
pub struct SendPace {
    waited: Duration,
    bytes: u64,
    grace: Duration,
    min_rate: u64,
}

impl SendPace {
    /// A pace of at least `min_rate` bytes per second of waiting (0: none), after `grace`.
    pub fn new(grace: Duration, min_rate: u64) -> SendPace {
        SendPace {
            waited: Duration::ZERO,
            bytes: 0,
            grace,
            min_rate,
        }
    }

    /// Records a write of `bytes` that took `took`; false when the client is too slow.
    pub fn record(&mut self, bytes: usize, took: Duration) -> bool {
        self.bytes += bytes as u64;
        self.waited += took;
        self.min_rate == 0
            || self.waited <= self.grace
            || self.bytes as f64 >= self.min_rate as f64 * self.waited.as_secs_f64()
    }
}

/// The header clock is off: a header was received and its request is being served.
const OFF: u8 = 0;
/// The clock starts at the next byte received (between requests on a kept-alive connection).
const AT_NEXT_BYTE: u8 = 1;
/// The clock runs: the header must be complete by the deadline.
const RUNNING: u8 = 2;

/// A client stream whose request headers must arrive within a deadline. Reads past the deadline
/// fail with `TimedOut`, which ends the connection.
#[derive(Debug)]
pub struct DeadlineStream {
    inner: Stream,
    timeout: Duration,
    born: Instant,
    phase: AtomicU8,
    /// Deadline, in nanoseconds since `born`.
    deadline: AtomicU64,
    sleep: Option<Pin<Box<Sleep>>>,
    _slot: Slot,
}

impl DeadlineStream {
    fn new(inner: Stream, timeout: Duration, slot: Slot) -> DeadlineStream {
        let stream = DeadlineStream {
            inner,
            timeout,
            born: Instant::now(),
            phase: AtomicU8::new(RUNNING),
            deadline: AtomicU64::new(0),
            sleep: None,
            _slot: slot,
        };
        stream.start_clock();
        stream
    }

    fn start_clock(&self) {
        let deadline = self.born.elapsed() + self.timeout;
        self.deadline.store(
            u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX),
            Relaxed,
        );
        self.phase.store(RUNNING, Relaxed);
    }

    fn deadline(&self) -> Instant {
        self.born + Duration::from_nanos(self.deadline.load(Relaxed))
    }

    /// The whole header has arrived: stop the clock.
    pub fn header_received(&self) {
        self.phase.store(OFF, Relaxed);
    }

    /// The request is over: the next request's header is timed from its first byte.
    pub fn request_finished(&self) {
        self.phase.store(AT_NEXT_BYTE, Relaxed);
    }
}

/// Stops the header clock of the client connection `stream` (keygate's request hook calls it
/// once the header is parsed).
pub fn header_received(stream: Option<&Stream>) {
    if let Some(s) = stream.and_then(|s| s.as_any().downcast_ref::<DeadlineStream>()) {
        s.header_received();
    }
}

/// Marks the request on `stream` as over (keygate's logging hook calls it).
pub fn request_finished(stream: Option<&Stream>) {
    if let Some(s) = stream.and_then(|s| s.as_any().downcast_ref::<DeadlineStream>()) {
        s.request_finished();
    }
}

impl AsyncRead for DeadlineStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let phase = self.phase.load(Relaxed);
        if phase == RUNNING && Instant::now() >= self.deadline() {
            return Poll::Ready(Err(header_timed_out()));
        }
        if phase != RUNNING && self.sleep.is_some() {
            // The header came: its timer must not wake the connection later for nothing.
            self.sleep = None;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        match (&read, phase) {
            (Poll::Ready(Ok(())), AT_NEXT_BYTE) if buf.filled().len() > before => {
                self.start_clock();
                self.sleep = None;
            }
            (Poll::Pending, RUNNING) => {
                let deadline = tokio::time::Instant::from_std(self.deadline());
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(header_timed_out()));
                }
            }
            _ => {}
        }
        read
    }
}

fn header_timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "request header not complete in time (client_limits.header_timeout_seconds)",
    )
}

impl AsyncWrite for DeadlineStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

use std::future::Future;

#[async_trait]
impl Shutdown for DeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for DeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for DeadlineStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for DeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for DeadlineStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for DeadlineStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for DeadlineStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(
        timeout: Duration,
    ) -> (DeadlineStream, tokio::net::TcpStream, Arc<ConnectionLimits>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let limits = ConnectionLimits::new(2, timeout);
        let slot = limits.admit().unwrap();
        let stream: Stream = Box::new(pingora::protocols::l4::stream::Stream::from(server));
        (DeadlineStream::new(stream, timeout, slot), client, limits)
    }

    #[tokio::test]
    async fn a_header_must_arrive_within_the_deadline_counted_from_accept() {
        let (mut server, mut client, _) = pair(Duration::from_millis(300)).await;
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let feeder = tokio::spawn(async move {
            for _ in 0..20 {
                if client.write_all(b"G").await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            client
        });
        let mut got = 0;
        let err = loop {
            match server.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_millis(600),
            "{took:?}"
        );
        assert!(got >= 3, "{got}");
        drop(feeder.await.unwrap());
    }

    #[tokio::test]
    async fn the_clock_stops_for_a_request_and_restarts_at_the_next_byte() {
        let (mut server, mut client, _) = pair(Duration::from_millis(200)).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(server.read(&mut buf).await.unwrap() > 0);
        server.header_received();
        // Serving may take long: no deadline now.
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        server.request_finished();
        // Idle between requests: no deadline until the next byte...
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"G").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        // ...then the next header has 200 ms.
        let started = Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[test]
    fn a_client_taking_an_answer_drop_by_drop_is_too_slow() {
        let s = Duration::from_secs(1);
        // Pauses of a client that reads, now and then: fine.
        let mut pace = SendPace::new(60 * s, 1024);
        for _ in 0..100 {
            assert!(pace.record(64 * 1024, 2 * s));
        }
        // 16 KB every 55 s of waiting: fine during the grace, then too slow.
        let mut pace = SendPace::new(60 * s, 1024);
        assert!(pace.record(16 * 1024, 55 * s));
        assert!(!pace.record(16 * 1024, 55 * s));
        // No minimum: never too slow.
        assert!(SendPace::new(s, 0).record(1, 1000 * s));
    }

    #[tokio::test]
    async fn slots_are_capped_and_given_back() {
        let limits = ConnectionLimits::new(2, Duration::from_secs(1));
        let a = limits.admit().unwrap();
        let b = limits.admit().unwrap();
        assert!(limits.admit().is_none());
        assert_eq!(limits.open(), 2);
        assert!(!AtCapacity(limits.clone()).should_accept(None).await);
        drop(a);
        assert!(AtCapacity(limits.clone()).should_accept(None).await);
        let _c = limits.admit().unwrap();
        drop(b);
        assert_eq!(limits.open(), 1);
    }
}
