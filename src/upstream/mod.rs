//! Where a pool's requests go: the upstream host's addresses (kept by `pingora-load-balancing`:
//! looked up in the background, never on the request path, and health-checked; see
//! [`addresses`]), the ready-made peers for them, and the connection pool that reuses
//! connections across requests and attempts.

mod addresses;
pub mod egress;
pub mod exchange;

use crate::config::{PoolConfig, Timeouts, UpstreamConfig};
use crate::upstream::egress::ProxyConnect;
use addresses::{Addresses, Resolve, System};
use arc_swap::ArcSwap;
use pingora::connectors::http::{v1, Connector};
use pingora::connectors::ConnectorOptions;
use pingora::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// How often a resolved host name is looked up again.
pub const REFRESH: Duration = Duration::from_secs(30);
/// How soon a failed lookup is tried again.
pub const RETRY_FAILED: Duration = Duration::from_secs(2);
/// Concurrent HTTP/2 streams allowed on one upstream connection.
const MAX_H2_STREAMS: usize = 100;

/// How a pool's connections reach its upstream.
enum Route {
    /// Through the pool's outbound proxy, which resolves the host name: one peer whose
    /// address is only a placeholder (and the connection pool's key), never dialled.
    Proxy(Arc<HttpPeer>),
    /// Straight to the host's addresses.
    Direct(Box<Addresses>),
}

/// One pool's upstream: its addresses, the peers for them, and the connection pool.
pub struct Upstream {
    config: UpstreamConfig,
    /// The pool's outbound proxy: connections are tunnelled through it.
    proxy: Option<Arc<ProxyConnect>>,
    timeouts: Timeouts,
    authority: String,
    /// The upstream's own headers (`upstream_headers`), ready to send; marked sensitive.
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    route: Route,
    /// The peer of each address seen so far (an address's peer is built once).
    peers: ArcSwap<HashMap<SocketAddr, Arc<HttpPeer>>>,
    /// The peers requests take turns over: those of the healthy addresses (see
    /// [`Addresses::rotation`]), rebuilt after each lookup and health check.
    rotation: ArcSwap<Vec<Arc<HttpPeer>>>,
    next: AtomicUsize,
    /// Pingora's connector: TLS (rustls), ALPN h2/h1, and the idle connection pool.
    pub connector: Connector,
    /// Pingora's HTTP/1.x connector, for an upstream without TLS (always HTTP/1.1); `None`
    /// with TLS. It is the one [`Connector`] itself uses for such a peer; calling it directly
    /// lets a request take a pooled connection without building the whole connect step (see
    /// [`exchange::connect`]).
    pub(crate) h1: Option<v1::Connector>,
}

impl Upstream {
    /// Sets up the upstream of `pool`. An IP literal or pinned addresses are ready at once; a
    /// host name waits for its first lookup ([`Upstream::refresh`]).
    pub fn new(pool: &PoolConfig, timeouts: Timeouts) -> Upstream {
        Upstream::with_resolver(pool, timeouts, Box::new(System))
    }

    fn with_resolver(
        pool: &PoolConfig,
        timeouts: Timeouts,
        resolver: Box<dyn Resolve>,
    ) -> Upstream {
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
        let config = &pool.upstream;
        let authority = config.authority();
        let route = if proxy.is_some() {
            let placeholder = SocketAddr::from(([0, 0, 0, 0], config.port));
            Route::Proxy(Arc::new(make_peer(
                config,
                &timeouts,
                proxy.as_ref(),
                placeholder,
            )))
        } else {
            let connect = timeouts.connect;
            let addresses = if !config.addresses.is_empty() {
                Addresses::fixed(&config.addresses, &authority, connect)
            } else if let Ok(ip) = config.host.parse::<IpAddr>() {
                Addresses::fixed(&[SocketAddr::new(ip, config.port)], &authority, connect)
            } else {
                Addresses::looked_up(&config.host, config.port, resolver, &authority, connect)
            };
            Route::Direct(Box::new(addresses))
        };
        let headers = config
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let name = http::HeaderName::from_bytes(name.as_bytes()).ok()?;
                let mut value = http::HeaderValue::from_str(value.expose()).ok()?;
                value.set_sensitive(true);
                Some((name, value))
            })
            .collect();
        let upstream = Upstream {
            authority,
            headers,
            config: config.clone(),
            proxy,
            timeouts,
            route,
            peers: ArcSwap::from_pointee(HashMap::new()),
            rotation: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            h1: (!config.tls).then(|| v1::Connector::new(Some(options.clone()))),
            connector: Connector::new(Some(options)),
        };
        upstream.sync_peers();
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

    /// Where a request on a connection (`h2`: speaking HTTP/2) goes: the authority, the base
    /// path and the upstream's own headers.
    pub fn target(&self, h2: bool) -> crate::wire::request::Target<'_> {
        crate::wire::request::Target {
            authority: &self.authority,
            tls: self.config.tls,
            h2,
            base_path: &self.config.base_path,
            headers: &self.headers,
        }
    }

    /// The upstream as configured.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Whether the host is a name that must be looked up (not when a proxy does it, nor when
    /// its addresses are pinned).
    pub fn needs_dns(&self) -> bool {
        matches!(&self.route, Route::Direct(a) if a.is_looked_up())
    }

    /// Whether at least one address is known.
    pub fn is_resolved(&self) -> bool {
        match &self.route {
            Route::Proxy(_) => true,
            Route::Direct(a) => a.len() > 0,
        }
    }

    /// What keeps the upstream from having an address, if anything: for `/readyz` and for the
    /// answer to requests that cannot be sent.
    pub fn address_problem(&self) -> Option<String> {
        if self.is_resolved() {
            return None;
        }
        let why = match &self.route {
            Route::Direct(a) => a.lookup_error(),
            Route::Proxy(_) => None,
        };
        Some(match why {
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

    /// The next peer, round-robin over the healthy addresses (over all of them when none
    /// passed its health check). Before the first lookup has finished it waits for it, up to
    /// `wait`; once lookups fail and no address was ever found, it answers at once: `Err`
    /// says why.
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
        if let Route::Direct(addresses) = &self.route {
            let _ = tokio::time::timeout(wait, async {
                loop {
                    let done = addresses.lookup_done();
                    if self.is_resolved() || addresses.lookup_finished() {
                        return;
                    }
                    done.await;
                }
            })
            .await;
        }
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
        match &self.route {
            Route::Proxy(peer) => Some(peer.clone()),
            Route::Direct(_) => {
                let rotation = self.rotation.load();
                if rotation.is_empty() {
                    return None;
                }
                let turn = self.next.fetch_add(1, Relaxed) % rotation.len();
                Some(rotation[turn].clone())
            }
        }
    }

    /// Looks the host name up once and installs the addresses found; a failed lookup keeps
    /// the addresses found before. The number of addresses, or why the lookup failed.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        let Route::Direct(addresses) = &self.route else {
            return Ok(1);
        };
        if !addresses.is_looked_up() {
            return Ok(addresses.len());
        }
        let result = addresses.refresh().await;
        self.sync_peers();
        result.map_err(std::io::Error::other)
    }

    /// [`Upstream::resolve`], logging what changed: a name that keeps failing is said once,
    /// not every retry. False when the lookup failed (look again soon).
    pub async fn refresh(&self) -> bool {
        let Route::Direct(addresses) = &self.route else {
            return true;
        };
        if !addresses.is_looked_up() {
            return true;
        }
        let was_failing = addresses.lookup_error().is_some();
        match self.resolve().await {
            Ok(n) => {
                if was_failing {
                    log::warn!("{} resolves again: {n} address(es)", self.authority());
                }
                log::debug!("resolved {}: {n} address(es)", self.authority());
                true
            }
            Err(e) => {
                if was_failing {
                    log::debug!("{} still does not resolve: {e}", self.authority());
                } else if self.is_resolved() {
                    log::warn!(
                        "cannot re-resolve {}: {e}; keeping the last addresses found",
                        self.authority()
                    );
                } else {
                    log::error!(
                        "cannot resolve {}: {e}; requests to it get 502 until it resolves (looked up again every {} s)",
                        self.authority(),
                        RETRY_FAILED.as_secs()
                    );
                }
                false
            }
        }
    }

    /// One TCP connect check of each address: one that fails leaves the rotation until a
    /// check succeeds again. Nothing to check behind a proxy (it dials the host itself).
    pub async fn check_health(&self) {
        if let Route::Direct(addresses) = &self.route {
            addresses.check_health().await;
            self.sync_rotation();
        }
    }

    /// Builds the peers of addresses that have none yet and drops those of addresses gone.
    fn sync_peers(&self) {
        let Route::Direct(addresses) = &self.route else {
            return;
        };
        let all = addresses.all();
        let current = self.peers.load();
        let inet = |b: &pingora::lb::Backend| match b.addr {
            pingora::protocols::l4::socket::SocketAddr::Inet(a) => Some(a),
            pingora::protocols::l4::socket::SocketAddr::Unix(_) => None,
        };
        let same = current.len() == all.len()
            && all
                .iter()
                .filter_map(inet)
                .all(|a| current.contains_key(&a));
        if same {
            self.sync_rotation();
            return;
        }
        let peers = all
            .iter()
            .filter_map(inet)
            .map(|a| {
                let peer = current
                    .get(&a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(self.make_peer(a)));
                (a, peer)
            })
            .collect();
        self.peers.store(Arc::new(peers));
        self.sync_rotation();
    }

    /// Rebuilds the rotation from the addresses' current health.
    fn sync_rotation(&self) {
        let Route::Direct(addresses) = &self.route else {
            return;
        };
        let peers = self.peers.load();
        let rotation: Vec<Arc<HttpPeer>> = addresses
            .rotation()
            .into_iter()
            .map(|a| {
                peers
                    .get(&a)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(self.make_peer(a)))
            })
            .collect();
        self.rotation.store(Arc::new(rotation));
    }

    fn make_peer(&self, addr: SocketAddr) -> HttpPeer {
        make_peer(&self.config, &self.timeouts, self.proxy.as_ref(), addr)
    }
}

/// The peer for one address of `config`'s host: TLS with the host name as SNI, ALPN h2/h1,
/// the timeouts, and the proxy to tunnel through, if any.
fn make_peer(
    config: &UpstreamConfig,
    timeouts: &Timeouts,
    proxy: Option<&Arc<ProxyConnect>>,
    addr: SocketAddr,
) -> HttpPeer {
    // SNI is always the host name: an empty SNI would turn certificate checks off.
    // A SocketAddr converts without any DNS lookup.
    let mut peer = HttpPeer::new(addr, config.tls, config.host.clone());
    let o = &mut peer.options;
    o.connection_timeout = Some(timeouts.connect);
    o.total_connection_timeout = Some(timeouts.connect * 2);
    o.read_timeout = Some(timeouts.read);
    o.write_timeout = Some(timeouts.write);
    o.idle_timeout = Some(timeouts.idle);
    if let Some(proxy) = proxy {
        o.custom_l4 = Some(proxy.clone());
    }
    if config.tls {
        // Offer HTTP/2, fall back to HTTP/1.1; many requests share one connection.
        o.set_http_version(2, 1);
        o.max_h2_streams = MAX_H2_STREAMS;
        o.h2_ping_interval = Some(Duration::from_secs(30));
    }
    peer
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
    use async_trait::async_trait;
    use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
    use pingora::upstreams::peer::Peer;
    use std::collections::VecDeque;
    use std::sync::Mutex;

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

    type Lookup = std::io::Result<Vec<SocketAddr>>;

    /// Answers lookups from a script, one entry per lookup.
    struct Scripted(Mutex<VecDeque<Lookup>>);

    #[async_trait]
    impl Resolve for Scripted {
        async fn lookup(&self, _host: &str, _port: u16) -> Lookup {
            let next = self.0.lock().unwrap().pop_front();
            next.unwrap_or_else(|| Err(std::io::Error::other("script ran out")))
        }
    }

    fn pool(yaml_tail: &str, host: &str) -> PoolConfig {
        let config = crate::config::Config::parse(
            &format!(
                "pools:\n  - name: p\n    upstream: \"http://{host}:8080\"\n    keys: [k]\n{yaml_tail}"
            ),
            std::path::Path::new("."),
            &|_| None,
        )
        .expect("config");
        config.pools[0].clone()
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(1),
            write: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        }
    }

    /// An upstream for a host name whose lookups answer `script`, in order.
    fn upstream(host: &str, script: Vec<Lookup>) -> Upstream {
        let resolver = Box::new(Scripted(Mutex::new(script.into())));
        Upstream::with_resolver(&pool("", host), timeouts(), resolver)
    }

    fn fail() -> Lookup {
        Err(std::io::Error::other(
            "failed to lookup address information",
        ))
    }

    /// An upstream whose host's addresses are pinned to `addrs`.
    fn pinned(addrs: &[SocketAddr]) -> Upstream {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        let tail = format!("    upstream_addresses: [{}]\n", list.join(", "));
        Upstream::new(&pool(&tail, "api.example.test"), timeouts())
    }

    /// Whether `addr` of `up` passed its last health check.
    fn healthy(up: &Upstream, addr: SocketAddr) -> bool {
        matches!(&up.route, Route::Direct(a) if a.healthy(addr))
    }

    fn address(peer: &HttpPeer) -> SocketAddr {
        match peer.address() {
            PeerAddr::Inet(x) => *x,
            PeerAddr::Unix(_) => unreachable!(),
        }
    }

    #[tokio::test]
    async fn a_failed_lookup_keeps_the_last_good_addresses() {
        let addr: SocketAddr = "192.0.2.7:8080".parse().unwrap();
        let up = upstream("api.example.test", vec![Ok(vec![addr]), fail()]);
        assert!(up.address_problem().unwrap().contains("not been looked up"));
        assert_eq!(up.resolve().await.unwrap(), 1);
        assert!(up.resolve().await.is_err());
        assert!(up.is_resolved());
        assert_eq!(up.address_problem(), None);
        let peer = up.peer(Duration::ZERO).await.unwrap();
        assert_eq!(address(&peer), addr);
    }

    #[tokio::test]
    async fn checking_for_an_address_does_not_move_the_rotation() {
        let a: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:8080".parse().unwrap();
        let up = upstream("api.example.test", vec![Ok(vec![a, b])]);
        up.resolve().await.unwrap();
        let mut firsts = Vec::new();
        for _ in 0..4 {
            up.wait_resolved(Duration::ZERO).await.unwrap();
            let peer = up.peer(Duration::ZERO).await.unwrap();
            firsts.push(address(&peer));
        }
        assert_eq!(firsts, vec![a, b, a, b]);
    }

    #[tokio::test]
    async fn a_name_that_never_resolved_is_refused_at_once() {
        let up = upstream("api.example.test", vec![fail(), Ok(Vec::new())]);
        assert!(up.resolve().await.is_err());
        let started = std::time::Instant::now();
        let why = up.peer(Duration::from_secs(10)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(why.contains("'api.example.test' does not resolve"), "{why}");
        assert!(up.resolve().await.is_err());
    }

    #[tokio::test]
    async fn a_waiting_request_gets_the_first_lookup_s_address() {
        let addr: SocketAddr = "192.0.2.9:8080".parse().unwrap();
        let up = Arc::new(upstream("api.example.test", vec![Ok(vec![addr])]));
        let waiter = tokio::spawn({
            let up = up.clone();
            async move { up.peer(Duration::from_secs(10)).await.map(|p| address(&p)) }
        });
        tokio::task::yield_now().await;
        up.resolve().await.unwrap();
        assert_eq!(waiter.await.unwrap(), Ok(addr));
    }

    #[tokio::test]
    async fn ip_literals_and_pinned_addresses_are_ready_at_once() {
        let up = Upstream::new(&pool("", "192.0.2.3"), timeouts());
        assert!(!up.needs_dns());
        assert_eq!(
            address(&up.peer(Duration::ZERO).await.unwrap()).to_string(),
            "192.0.2.3:8080"
        );
        let pinned = pool(
            "    upstream_addresses: [\"192.0.2.4\", \"192.0.2.5:9000\"]\n",
            "api.example.test",
        );
        let up = Upstream::new(&pinned, timeouts());
        assert!(!up.needs_dns());
        assert_eq!(up.address_problem(), None);
        let seen: Vec<String> = [
            up.peer(Duration::ZERO).await.unwrap(),
            up.peer(Duration::ZERO).await.unwrap(),
        ]
        .iter()
        .map(|p| address(p).to_string())
        .collect();
        assert_eq!(seen, ["192.0.2.4:8080", "192.0.2.5:9000"]);
        // SNI and Host stay the host name, whatever address is dialled.
        assert_eq!(
            up.peer(Duration::ZERO).await.unwrap().sni(),
            "api.example.test"
        );
        assert_eq!(up.authority(), "api.example.test:8080");
    }

    #[tokio::test]
    async fn an_address_that_refuses_connections_leaves_the_rotation() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let live: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Loopback too, but nothing listens there: connections are refused.
        let dead: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let up = pinned(&[live, dead]);
        assert!(healthy(&up, dead), "healthy until a check fails");
        up.check_health().await;
        assert!(healthy(&up, live));
        assert!(!healthy(&up, dead));
        for _ in 0..6 {
            assert_eq!(address(&up.peer(Duration::ZERO).await.unwrap()), live);
        }
    }

    #[tokio::test]
    async fn when_every_address_fails_its_check_all_are_still_tried() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Nothing listens on either (the port was free a moment ago).
        let a: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
        let b: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        let up = pinned(&[a, b]);
        up.check_health().await;
        assert!(!healthy(&up, a) && !healthy(&up, b));
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..4 {
            seen.insert(address(&up.peer(Duration::ZERO).await.unwrap()));
        }
        assert_eq!(seen.len(), 2, "both still in rotation: {seen:?}");
    }

    #[tokio::test]
    async fn behind_a_proxy_nothing_is_looked_up_or_checked() {
        let proxied = pool("    proxy: \"http://127.0.0.1:3128\"\n", "api.example.test");
        let up = Upstream::new(&proxied, timeouts());
        assert!(!up.needs_dns());
        assert!(up.is_resolved());
        assert!(up.refresh().await);
        up.check_health().await;
        let peer = up.peer(Duration::ZERO).await.unwrap();
        assert_eq!(address(&peer), SocketAddr::from(([0, 0, 0, 0], 8080)));
        assert!(peer.options.custom_l4.is_some());
    }
}
