//! keygate: a Pingora gateway in front of Google's Gemini API that spreads traffic over a pool
//! of API keys, reads Google's quota errors, cools the (project, model) that ran dry for as long
//! as Google says, and replays the same request on another key.
//!
//! The parts, from the bottom layer up (a part imports only from parts listed before it;
//! `tests/layout.rs` checks it):
//! - [`secret`], [`logging`]: keys and tokens that never print; the log, client values escaped;
//! - [`config`]: the YAML file, its validation, and the one endpoint parser;
//! - [`wire`]: requests and answers as text (paths, JSON strings, names, CORS, usage, errors);
//! - [`quota`]: what Google's answers mean, the key pool with its one door for health changes,
//!   the attempt plan, resource affinity;
//! - [`tenants`]: authentication, limits, fair shares, and what a tenant's request may be;
//! - [`cache`]: the response cache: which answers are kept, entry keys, the store;
//! - `upstream`: addresses (health-checked), connections, the one exchange, egress proxies;
//! - `telemetry`: Prometheus metrics, webhook alerts, the recent events the dashboard lists;
//! - `runtime`: what the gateway and the admin API share; health changes made known;
//! - `gateway`: the Pingora hooks and the one attempt loop, for requests and Live sessions;
//! - `fleet`: several instances as one, through Redis;
//! - `ops`: the admin API and its dashboard, key checks, the state file, signals and reload.

// Lints: the [lints] table in Cargo.toml (unwrap/expect outside tests, missing docs, locks held
// across an await, unsafe code denied but for the one allowed in upstream/mod.rs).

pub mod cache;
pub mod config;
pub(crate) mod fleet;
pub(crate) mod gateway;
pub mod logging;
pub(crate) mod ops;
pub mod quota;
pub(crate) mod runtime;
pub mod secret;
pub(crate) mod telemetry;
pub mod tenants;
pub(crate) mod upstream;
pub mod wire;

use config::Config;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::path::PathBuf;
use std::sync::Arc;

/// Read buffer per client connection.
const CLIENT_READ_BUFFER: usize = 16 * 1024;

/// Connections the admin listener holds at once (dashboards, scrapers, curl).
const ADMIN_CONNECTIONS: usize = 64;

/// How keygate was started.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The configuration file (re-read on SIGHUP and `POST /admin/reload`).
    pub config_path: PathBuf,
    /// Take the listening sockets over from a running keygate (Pingora's graceful upgrade).
    pub upgrade: bool,
}

/// Starts the gateway and serves until a signal stops it, then saves the state file. Returns
/// an error only when it cannot start.
pub fn run(config: Config, launch: Launch) -> Result<(), String> {
    // A process taking over the sockets of a running one (upgrade) cannot bind them itself.
    if !launch.upgrade {
        check_bindable(config.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
        if let Some(admin) = &config.admin {
            check_bindable(admin.listen)
                .map_err(|e| format!("cannot listen on {} (admin.listen): {e}", admin.listen))?;
        }
    }

    let conf = ServerConf {
        threads: config.threads,
        // SIGTERM: stop accepting, let in-flight requests finish for this long, then exit.
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        // One single-threaded runtime per worker thread, like nginx's workers: measured
        // cheaper per request than tokio's work-stealing pool (BENCHMARKS.md).
        work_stealing: false,
        // Pingora's own timeouts (an idle pooled connection's, write timeouts) on tokio's timer
        // wheel rather than its shared "fast" timer tree: each request leaves a minute-long
        // idle timeout behind, which the tree keeps until it expires even once the connection
        // is reused (3 MB more memory after a minute of load), and the wheel drops at once
        // (BENCHMARKS.md).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        upgrade_sock: config.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: launch.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    // The link to Redis is made first: the response cache of every runtime shares through it.
    let link = config.redis.as_ref().map(fleet::Fleet::new).transpose()?;
    let cache_shared = link
        .as_ref()
        .map(|l| Arc::new(fleet::FleetCache::new(l.clone())) as Arc<dyn cache::SharedStore>);
    let shared = Arc::new(runtime::Shared::new(&config, cache_shared)?);
    if let Some(path) = &config.state_file {
        ops::state::restore(&shared, path);
    }
    let gateway = gateway::Gateway::new(shared.clone());
    let proxy = pingora::proxy::http_proxy(&server.configuration, gateway);
    let limits = &config.client_limits;
    let max_connections = limits
        .max_connections
        .unwrap_or_else(default_max_connections);
    let connections = gateway::guard::ConnectionLimits::new(max_connections, limits.header_timeout);
    let mut service = Service::new(
        "keygate".to_string(),
        gateway::guard::Guarded::new(proxy, connections.clone()),
    );
    // Past the cap a connection is dropped at accept, before any TLS handshake is spent on it.
    service.set_connection_filter(Arc::new(gateway::guard::AtCapacity(connections)));
    // Pingora reads each client connection through a 64 KiB buffer by default. Gemini requests
    // are mostly small JSON, and a team gateway holds many keep-alive connections whose buffers,
    // once filled by a large body, stay resident: 16 KiB bounds that at a quarter.
    let l4 = L4BufferSettings::default().read(CLIENT_READ_BUFFER);
    let mut listener = ListenerConfig::tcp(config.listen.to_string()).l4_buffer(l4);
    if let Some((cert, key)) = &config.tls {
        // Checked when the config was loaded: Pingora panics on files it cannot use.
        let settings = pingora::listeners::tls::TlsSettings::intermediate(
            &cert.display().to_string(),
            &key.display().to_string(),
        )
        .map_err(|e| format!("tls: {e}"))?;
        listener = listener.tls(settings);
    }
    service.add_listener(listener);
    server.add_service(service);
    server.add_service(background_service(
        "upstreams",
        runtime::UpstreamKeeper::new(shared.clone()),
    ));
    if let Some(admin) = &config.admin {
        let app = ops::admin::Admin::new(
            shared.clone(),
            admin.token_sha256,
            launch.config_path.clone(),
        );
        // The admin listener has slots of its own: a flood of client connections cannot take
        // them, and a slow admin client cannot hold one past the header deadline.
        let admin_connections = gateway::guard::ConnectionLimits::new(
            ADMIN_CONNECTIONS,
            config.client_limits.header_timeout,
        );
        let mut service = Service::new(
            "admin".to_string(),
            gateway::guard::Guarded::new(HttpServer::new_app(app), admin_connections.clone()),
        );
        service.set_connection_filter(Arc::new(gateway::guard::AtCapacity(admin_connections)));
        match &admin.tls {
            // Checked when the config was loaded, like the client listener's.
            Some((cert, key)) => service
                .add_tls(
                    &admin.listen.to_string(),
                    &cert.display().to_string(),
                    &key.display().to_string(),
                )
                .map_err(|e| format!("admin.tls: {e}"))?,
            None => service.add_tcp(&admin.listen.to_string()),
        }
        server.add_service(service);
        let checker = ops::keycheck::KeyChecker::new(shared.clone(), admin.key_check_interval);
        server.add_service(background_service("key check", checker));
    }
    if let Some(alerts) = &shared.alerts {
        server.add_service(background_service("alerts", alerts.service()));
    }
    if let Some(link) = link {
        let _ = shared.fleet.set(link.clone());
        let _ = shared
            .limits
            .set(Arc::new(fleet::FleetLimits(link.clone())));
        let _ = shared
            .owners
            .set(Arc::new(fleet::FleetOwners(link.clone())));
        let _ = shared
            .probes
            .set(Arc::new(fleet::FleetProbes(link.clone())));
        let _ = shared
            .series
            .set(Arc::new(fleet::FleetSeries(link.clone())));
        let _ = shared
            .counters
            .set(Arc::new(fleet::FleetCounters(link.clone())));
        log::info!("health shared through redis at {}", link.url());
        server.add_service(background_service(
            "redis",
            fleet::FleetService::new(link, shared.clone()),
        ));
    }
    if let Some(path) = &config.state_file {
        let keeper = ops::state::StateKeeper::new(shared.clone(), path.clone());
        server.add_service(background_service("state file", keeper));
    }

    log::info!(
        "{}; at most {max_connections} client connections",
        config.summary()
    );
    let signals = ops::lifecycle::Signals::new(shared.clone(), launch.config_path);
    server.run(RunArgs {
        shutdown_signal: Box::new(signals),
    });
    // Every request has finished or been cut: this is the final word on the health table.
    if let Some(path) = &config.state_file {
        ops::state::save_now(&shared, path);
        log::info!("state saved to {}", path.display());
    }
    Ok(())
}

/// The default cap on client connections: half of the open files this process may hold (the
/// rest stay for upstream connections, the admin listener and files), at most 10,000. The soft
/// limit is raised to the hard one first, as servers do (systemd's default soft limit is 1024).
fn default_max_connections() -> usize {
    let files = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft))
        .unwrap_or(1024);
    usize::try_from(files / 2)
        .unwrap_or(usize::MAX)
        .clamp(16, 10_000)
}

/// Binds the address once, without listening, so a busy or forbidden address is a clear error
/// rather than a failure inside Pingora. Not listening matters: a listening socket would accept
/// (and then reset) a client that connects in that instant.
fn check_bindable(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}
