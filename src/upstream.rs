//! Where a pool's requests go: the upstream's resolved addresses (refreshed by a background
//! service, never on the request path), the ready-made peers for them, and the connection
//! pool that reuses connections across requests and attempts.

use crate::config::{PoolConfig, Timeouts, UpstreamConfig};
use crate::egress::ProxyConnect;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::{HttpPeer, Peer};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often a resolved host name is looked up again.
const REFRESH: Duration = Duration::from_secs(30);
/// How soon a failed lookup is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(2);
/// Concurrent HTTP/2 streams allowed on one upstream connection.
const MAX_H2_STREAMS: usize = 100;

/// One pool's upstream: resolved peers plus the connection pool.
pub struct Upstream {
    config: UpstreamConfig,
    /// The pool's outbound proxy: connections are tunnelled through it, and the proxy
    /// resolves the host name.
    proxy: Option<Arc<ProxyConnect>>,
    timeouts: Timeouts,
    authority: String,
    peers: ArcSwap<Vec<Arc<HttpPeer>>>,
    next: AtomicUsize,
    resolved: Notify,
    /// Why the last lookup failed, while it keeps failing (`None` once one succeeds).
    lookup_error: ArcSwap<Option<String>>,
    /// Whether a lookup has finished (succeeded or failed) since start.
    looked_up: std::sync::atomic::AtomicBool,
    /// Pingora's connector: TLS (rustls), ALPN h2/h1, and the idle connection pool.
    pub connector: Connector,
}

impl Upstream {
    /// Sets up the upstream of `pool`. An IP literal is ready at once; a host name waits for
    /// the resolver service.
    pub fn new(pool: &PoolConfig, timeouts: Timeouts) -> Upstream {
        let mut options = ConnectorOptions::new(256);
        if let Some(ca) = &pool.tls_ca_file {
            options.ca_file = Some(ca.display().to_string());
        }
        let proxy = pool.proxy.as_ref().map(|p| {
            Arc::new(ProxyConnect::new(
                p.clone(),
                &pool.name,
                &pool.upstream.host,
                pool.upstream.port,
                timeouts.connect,
            ))
        });
        let upstream = Upstream {
            authority: pool.upstream.authority(),
            config: pool.upstream.clone(),
            proxy,
            timeouts,
            peers: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            resolved: Notify::new(),
            lookup_error: ArcSwap::from_pointee(None),
            looked_up: std::sync::atomic::AtomicBool::new(false),
            connector: Connector::new(Some(options)),
        };
        if upstream.proxy.is_some() {
            // The proxy connects by host name; the peer's address is only a placeholder (and
            // the connection pool's key), never dialled.
            upstream.set_addresses(&[SocketAddr::from(([0, 0, 0, 0], upstream.config.port))]);
        } else if let Ok(ip) = upstream.config.host.parse::<IpAddr>() {
            upstream.set_addresses(&[SocketAddr::new(ip, upstream.config.port)]);
        }
        upstream
    }

    /// `host[:port]` for the `Host` header / `:authority`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Whether requests use TLS.
    pub fn tls(&self) -> bool {
        self.config.tls
    }

    /// Whether the host is a name that the resolver must look up (not when a proxy does).
    pub fn needs_dns(&self) -> bool {
        self.proxy.is_none() && self.config.host.parse::<IpAddr>().is_err()
    }

    /// Whether at least one address is known.
    pub fn is_resolved(&self) -> bool {
        !self.peers.load().is_empty()
    }

    /// The host name, for messages.
    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// What keeps the upstream from having an address, if anything: for `/readyz` and for the
    /// answer to requests that cannot be sent.
    pub fn address_problem(&self) -> Option<String> {
        if self.is_resolved() {
            return None;
        }
        Some(match &**self.lookup_error.load() {
            Some(why) => format!(
                "upstream host '{}' does not resolve ({why})",
                self.config.host
            ),
            None => format!(
                "upstream host '{}' has not been looked up yet",
                self.config.host
            ),
        })
    }

    /// The next peer, round-robin over the resolved addresses. Before the first lookup has
    /// finished it waits for it, up to `wait`; once lookups fail and no address was ever
    /// found, it answers at once: `Err` says why.
    pub async fn peer(&self, wait: Duration) -> Result<Arc<HttpPeer>, String> {
        if let Some(p) = self.next_peer() {
            return Ok(p);
        }
        self.wait_resolved(wait).await?;
        self.next_peer().ok_or_else(|| {
            self.address_problem()
                .unwrap_or_else(|| format!("upstream host '{}' has no address", self.config.host))
        })
    }

    /// Like [`Upstream::peer`] without taking a peer (the round-robin stays where it is).
    pub async fn wait_resolved(&self, wait: Duration) -> Result<(), String> {
        if self.is_resolved() {
            return Ok(());
        }
        let _ = tokio::time::timeout(wait, async {
            loop {
                let notified = self.resolved.notified();
                if self.is_resolved() || self.looked_up.load(Relaxed) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        match self.address_problem() {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }

    /// A peer for one WebSocket session: like [`Upstream::peer`], but HTTP/1.1 only, since the
    /// upgrade handshake is an HTTP/1.1 exchange (no WebSockets over HTTP/2 here).
    pub async fn websocket_peer(&self, wait: Duration) -> Result<HttpPeer, String> {
        let shared = self.peer(wait).await?;
        let mut peer = HttpPeer::clone(&shared);
        peer.options.set_http_version(1, 1);
        // A session may stay quiet for long: its reads wait as long as the client does.
        peer.options.read_timeout = None;
        Ok(peer)
    }

    fn next_peer(&self) -> Option<Arc<HttpPeer>> {
        let peers = self.peers.load();
        if peers.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Relaxed) % peers.len();
        Some(peers[i].clone())
    }

    /// Looks the host name up once and installs the addresses found.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        let found = tokio::net::lookup_host((self.config.host.as_str(), self.config.port))
            .await
            .map(|addrs| addrs.collect());
        self.apply_lookup(found)
    }

    /// Installs the result of a lookup. A failed lookup keeps the addresses found before (a
    /// name server that stops answering does not make the upstream's addresses wrong), and
    /// records why it failed.
    fn apply_lookup(&self, found: std::io::Result<Vec<SocketAddr>>) -> std::io::Result<usize> {
        let found = found.and_then(|found| {
            if found.is_empty() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no addresses",
                ))
            } else {
                Ok(found)
            }
        });
        let found = match found {
            Ok(found) => {
                self.lookup_error.store(Arc::new(None));
                found
            }
            Err(e) => {
                self.lookup_error.store(Arc::new(Some(lookup_reason(&e))));
                self.looked_up.store(true, Relaxed);
                self.resolved.notify_waiters();
                return Err(e);
            }
        };
        let same = {
            let current = self.peers.load();
            current.len() == found.len()
                && current
                    .iter()
                    .zip(&found)
                    .all(|(p, a)| matches!(p.address(), PeerAddr::Inet(x) if x == a))
        };
        if !same {
            self.set_addresses(&found);
        }
        self.looked_up.store(true, Relaxed);
        Ok(found.len())
    }

    fn set_addresses(&self, addrs: &[SocketAddr]) {
        let peers = addrs.iter().map(|a| Arc::new(self.make_peer(*a))).collect();
        self.peers.store(Arc::new(peers));
        self.resolved.notify_waiters();
    }

    fn make_peer(&self, addr: SocketAddr) -> HttpPeer {
        // SNI is always the host name: an empty SNI would turn certificate checks off.
        // A SocketAddr converts without any DNS lookup.
        let mut peer = HttpPeer::new(addr, self.config.tls, self.config.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.timeouts.connect);
        o.total_connection_timeout = Some(self.timeouts.connect * 2);
        o.read_timeout = Some(self.timeouts.read);
        o.write_timeout = Some(self.timeouts.write);
        o.idle_timeout = Some(self.timeouts.idle);
        if let Some(proxy) = &self.proxy {
            o.custom_l4 = Some(proxy.clone());
        }
        if self.config.tls {
            // Offer HTTP/2, fall back to HTTP/1.1; many requests share one connection.
            o.set_http_version(2, 1);
            o.max_h2_streams = MAX_H2_STREAMS;
            o.h2_ping_interval = Some(Duration::from_secs(30));
        }
        peer
    }
}

/// A short, stable reason for a failed lookup (the system resolver's message varies).
fn lookup_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("failed to lookup address") || text.contains("Name or service not known") {
        "no such host, or no name server answered".to_string()
    } else {
        text
    }
}

/// The background service that keeps host names resolved: the upstreams of the current
/// runtime, so upstreams a reload brings in are looked up too.
pub struct Resolver {
    shared: Arc<crate::runtime::Shared>,
}

impl Resolver {
    /// A resolver for the upstreams of `shared`'s runtime that have host names.
    pub fn new(shared: Arc<crate::runtime::Shared>) -> Resolver {
        Resolver { shared }
    }

    async fn refresh_all(&self) -> bool {
        let upstreams: Vec<Arc<Upstream>> = self
            .shared
            .runtime
            .load()
            .upstreams()
            .into_iter()
            .filter(|u| u.needs_dns())
            .collect();
        let mut all_ok = true;
        for u in &upstreams {
            // Only a change is news: a name that keeps failing is said once, not every 2 s.
            let was_failing = u.lookup_error.load().is_some();
            match u.resolve().await {
                Ok(n) => {
                    if was_failing {
                        log::warn!("{} resolves again: {n} address(es)", u.authority());
                    }
                    log::debug!("resolved {}: {n} address(es)", u.authority());
                }
                Err(e) => {
                    all_ok = false;
                    if was_failing {
                        log::debug!("{} still does not resolve: {e}", u.authority());
                    } else if u.is_resolved() {
                        log::warn!(
                            "cannot re-resolve {}: {e}; keeping the last addresses found",
                            u.authority()
                        );
                    } else {
                        log::error!(
                            "cannot resolve {}: {e}; requests to it get 502 until it resolves (looked up again every 2 s)",
                            u.authority()
                        );
                    }
                }
            }
        }
        all_ok
    }
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let wait = if self.refresh_all().await {
                REFRESH
            } else {
                RETRY_FAILED
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.upstreams_changed.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Holds an HTTP/1.1 upstream socket's writes back (`TCP_CORK`) while a request's header and
/// body are written, so they leave in one transmit. Pingora's h1 client flushes the header on
/// its own; without the cork the upstream is woken twice per request, and on loopback each
/// transmit costs the sender ~9 µs (BENCHMARKS.md). Dropping the guard uncorks, which sends
/// whatever is queued at once: keep it alive only until the body is written.
pub struct Cork(Option<std::os::fd::RawFd>);

impl Cork {
    /// Corks the session's socket if it is HTTP/1.x over TCP; otherwise does nothing.
    pub fn hold(http: &pingora::protocols::http::client::HttpSession) -> Cork {
        use pingora::protocols::UniqueID;
        match http {
            pingora::protocols::http::client::HttpSession::H1(h1) => {
                let fd = h1.id();
                Cork(set_cork(fd, true).then_some(fd))
            }
            _ => Cork(None),
        }
    }
}

impl Drop for Cork {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            set_cork(fd, false);
        }
    }
}

/// Sets or clears `TCP_CORK`; false when the socket does not take it (not TCP).
///
/// The one `unsafe` in keygate: Pingora hands out the session's socket only as a raw fd
/// (`UniqueID::id`); its `Stream` implements `AsRawFd` but not `AsFd`, and the TCP socket inside
/// is private, so there is no safe way to the `AsFd` that socket2 wants.
#[allow(unsafe_code)]
fn set_cork(fd: std::os::fd::RawFd, on: bool) -> bool {
    // SAFETY: `fd` is the socket of a session the caller borrows, so it stays open for the
    // borrow, which ends with this function.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&fd).set_tcp_cork(on).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cork_is_set_and_cleared_on_tcp_only() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let corked = || socket2::SockRef::from(&tcp).tcp_cork().unwrap();
        assert!(set_cork(tcp.as_raw_fd(), true));
        assert!(corked());
        assert!(set_cork(tcp.as_raw_fd(), false));
        assert!(!corked());
        let (unix, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!set_cork(unix.as_raw_fd(), true));
    }

    fn upstream(host: &str) -> Upstream {
        let pool = crate::config::Config::parse(
            &format!("pools:\n  - name: p\n    upstream: \"http://{host}:8080\"\n    keys: [k]\n"),
            std::path::Path::new("."),
            &|_| None,
        )
        .expect("config");
        let timeouts = pool.timeouts;
        Upstream::new(&pool.pools[0], timeouts)
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_good_addresses() {
        let up = upstream("api.example.test");
        assert!(up.address_problem().unwrap().contains("not been looked up"));
        let addr: SocketAddr = "192.0.2.7:8080".parse().unwrap();
        assert_eq!(up.apply_lookup(Ok(vec![addr])).unwrap(), 1);
        let fail = || {
            Err(std::io::Error::other(
                "failed to lookup address information",
            ))
        };
        assert!(up.apply_lookup(fail()).is_err());
        assert!(up.is_resolved());
        assert_eq!(up.address_problem(), None);
        let peer = up.peer(Duration::ZERO).await.unwrap();
        assert!(matches!(peer.address(), PeerAddr::Inet(a) if *a == addr));
    }

    #[tokio::test]
    async fn checking_for_an_address_does_not_move_the_rotation() {
        let up = upstream("api.example.test");
        let a: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:8080".parse().unwrap();
        up.apply_lookup(Ok(vec![a, b])).unwrap();
        let mut firsts = Vec::new();
        for _ in 0..4 {
            up.wait_resolved(Duration::ZERO).await.unwrap();
            let peer = up.peer(Duration::ZERO).await.unwrap();
            firsts.push(match peer.address() {
                PeerAddr::Inet(x) => *x,
                _ => unreachable!(),
            });
        }
        assert_eq!(firsts, vec![a, b, a, b]);
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_is_refused_at_once() {
        let up = upstream("api.example.test");
        let fail = Err(std::io::Error::other(
            "failed to lookup address information",
        ));
        assert!(up.apply_lookup(fail).is_err());
        let started = std::time::Instant::now();
        let why = up.peer(Duration::from_secs(10)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(why.contains("'api.example.test' does not resolve"), "{why}");
        assert!(up.apply_lookup(Ok(Vec::new())).is_err());
    }
}
