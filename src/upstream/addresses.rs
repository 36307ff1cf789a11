//! The upstream host's addresses, kept by `pingora-load-balancing`: discovered from the system
//! resolver (or fixed: an IP literal, addresses pinned in the config), and left out of the
//! rotation while a TCP connect check fails. The rotation itself ([`Addresses::rotation`]) is
//! read after each lookup and check; requests take turns over it in `Upstream`. Keys are not backends: they stay
//! in keygate's own key pool; only addresses are.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::lb::discovery::{ServiceDiscovery, Static};
use pingora::lb::health_check::{HealthCheck, TcpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::{Error, ErrorType};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Looks a host name up. The system resolver in production; a script in unit tests.
#[async_trait]
pub(super) trait Resolve: Send + Sync {
    /// The addresses of `host`, with `port`.
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool: this waits, it does not block).
pub(super) struct System;

#[async_trait]
impl Resolve for System {
    async fn lookup(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        tokio::net::lookup_host((host, port))
            .await
            .map(|found| found.collect())
    }
}

/// What the lookups of a host name have found, shared by the discovery (which the balancer
/// owns) and [`Addresses`] (which answers questions about it).
#[derive(Default)]
struct Lookups {
    /// Why the last lookup failed, while it keeps failing (`None` once one succeeds).
    error: ArcSwap<Option<String>>,
    /// The last failed lookup's error as the resolver put it, for the log.
    failure: ArcSwap<Option<String>>,
}

/// Service discovery over DNS. A failed lookup is an error, so the balancer keeps the
/// addresses found before: a name server that stops answering does not make them wrong.
struct Dns {
    host: String,
    port: u16,
    resolver: Box<dyn Resolve>,
    lookups: Arc<Lookups>,
}

#[async_trait]
impl ServiceDiscovery for Dns {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        let found = self.resolver.lookup(&self.host, self.port).await;
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
        match found {
            Ok(found) => {
                self.lookups.error.store(Arc::new(None));
                Ok((backends(&found), HashMap::new()))
            }
            Err(e) => {
                let why = lookup_reason(&e);
                self.lookups.error.store(Arc::new(Some(why.clone())));
                self.lookups.failure.store(Arc::new(Some(e.to_string())));
                Err(Error::explain(ErrorType::ConnectNoRoute, why))
            }
        }
    }
}

fn backend(addr: SocketAddr) -> Backend {
    Backend {
        addr: PeerAddr::Inet(addr),
        weight: 1,
        ext: Default::default(),
    }
}

fn backends(addrs: &[SocketAddr]) -> BTreeSet<Backend> {
    addrs.iter().copied().map(backend).collect()
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

/// The TCP connect check, with log lines that name the upstream and the address.
struct ConnectCheck {
    tcp: TcpHealthCheck,
    authority: String,
}

#[async_trait]
impl HealthCheck for ConnectCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        self.tcp.check(target).await
    }

    fn backend_summary(&self, target: &Backend) -> String {
        format!("upstream {} address {}", self.authority, target.addr)
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.tcp.health_threshold(success)
    }
}

/// One host's addresses: the balancer that chooses among them and, for a host name, what its
/// lookups found.
pub(super) struct Addresses {
    lb: LoadBalancer<RoundRobin>,
    /// `None` when the addresses are fixed (an IP literal, pinned addresses).
    lookups: Option<Arc<Lookups>>,
    /// Whether a lookup has finished (succeeded or failed) since start.
    looked_up: AtomicBool,
    /// Woken after each lookup.
    resolved: Notify,
}

impl Addresses {
    /// Fixed addresses, known at once.
    pub(super) fn fixed(addrs: &[SocketAddr], authority: &str, connect: Duration) -> Addresses {
        let mut lb = LoadBalancer::from_backends(Backends::new(Static::new(backends(addrs))));
        lb.set_health_check(connect_check(authority, connect));
        let addresses = Addresses {
            lb,
            lookups: None,
            looked_up: AtomicBool::new(true),
            resolved: Notify::new(),
        };
        // A static discovery answers at once and cannot fail.
        if !matches!(ready_now(addresses.lb.update()), Some(Ok(()))) {
            log::error!("upstream {authority}: its fixed addresses could not be installed");
        }
        addresses
    }

    /// The addresses of `host`, looked up by `resolver` each time [`Addresses::refresh`] runs.
    pub(super) fn looked_up(
        host: &str,
        port: u16,
        resolver: Box<dyn Resolve>,
        authority: &str,
        connect: Duration,
    ) -> Addresses {
        let lookups = Arc::new(Lookups::default());
        let dns = Dns {
            host: host.to_string(),
            port,
            resolver,
            lookups: lookups.clone(),
        };
        let mut lb = LoadBalancer::from_backends(Backends::new(Box::new(dns)));
        lb.set_health_check(connect_check(authority, connect));
        Addresses {
            lb,
            lookups: Some(lookups),
            looked_up: AtomicBool::new(false),
            resolved: Notify::new(),
        }
    }

    /// Whether the addresses come from lookups.
    pub(super) fn is_looked_up(&self) -> bool {
        self.lookups.is_some()
    }

    /// Whether a lookup has finished, successfully or not (fixed addresses: always).
    pub(super) fn lookup_finished(&self) -> bool {
        self.looked_up.load(Relaxed)
    }

    /// Waits until the next lookup finishes.
    pub(super) fn lookup_done(&self) -> tokio::sync::futures::Notified<'_> {
        self.resolved.notified()
    }

    /// Every known address.
    pub(super) fn all(&self) -> Arc<BTreeSet<Backend>> {
        self.lb.backends().get_backend()
    }

    /// How many addresses are known.
    pub(super) fn len(&self) -> usize {
        self.all().len()
    }

    /// Why the last lookup failed, while lookups keep failing.
    pub(super) fn lookup_error(&self) -> Option<String> {
        self.lookups
            .as_ref()
            .and_then(|l| (**l.error.load()).clone())
    }

    /// Looks the host up again and installs what it finds; a failure keeps the addresses
    /// found before and says what the resolver said. Calls must not overlap (one task
    /// refreshes an upstream).
    pub(super) async fn refresh(&self) -> Result<usize, String> {
        let result = self.lb.update().await;
        self.looked_up.store(true, Relaxed);
        self.resolved.notify_waiters();
        match result {
            Ok(()) => Ok(self.len()),
            Err(e) => {
                let failure = self
                    .lookups
                    .as_ref()
                    .and_then(|l| (**l.failure.load()).clone());
                Err(failure.unwrap_or_else(|| e.to_string()))
            }
        }
    }

    /// One TCP connect check of every address (in parallel): an address that refuses or does
    /// not answer in time leaves the rotation until a check succeeds again.
    pub(super) async fn check_health(&self) {
        self.lb.backends().run_health_check(true).await;
    }

    /// Whether `addr` passed its last health check (true until one fails).
    #[cfg(test)]
    pub(super) fn healthy(&self, addr: SocketAddr) -> bool {
        self.lb.backends().ready(&backend(addr))
    }

    /// The addresses to take turns over: the healthy ones, or every one when none passed its
    /// health check (a check that fails everywhere, from the checker's own network or a filter
    /// on the probes, must not turn into a total outage; the attempt loop retries a connect
    /// error elsewhere anyway). Read after each lookup and health check, not per request:
    /// `pingora-load-balancing`'s own `select` costs about 1,800 instructions a request.
    pub(super) fn rotation(&self) -> Vec<SocketAddr> {
        let all = self.all();
        let backends = self.lb.backends();
        let inet = |b: &Backend| match b.addr {
            PeerAddr::Inet(a) => Some(a),
            PeerAddr::Unix(_) => None,
        };
        let healthy: Vec<SocketAddr> = all
            .iter()
            .filter(|b| backends.ready(b))
            .filter_map(inet)
            .collect();
        if healthy.is_empty() {
            all.iter().filter_map(inet).collect()
        } else {
            healthy
        }
    }
}

fn connect_check(authority: &str, connect: Duration) -> Box<ConnectCheck> {
    let mut tcp = TcpHealthCheck::default();
    tcp.peer_template.options.connection_timeout = Some(connect);
    Box::new(ConnectCheck {
        tcp,
        authority: authority.to_string(),
    })
}

/// Polls `future` once: its output if it is ready at once.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}
