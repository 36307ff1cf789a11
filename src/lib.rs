//! keygate: a Pingora gateway in front of Google's Gemini API that spreads traffic over a pool
//! of API keys, reads Google's quota errors, cools the (project, model) that ran dry for as long
//! as Google says, and replays the same request on another key.
//!
//! Modules, by responsibility:
//! - [`config`]: the YAML file and its validated runtime form;
//! - [`secret`]: keys and tokens that never print, and their fingerprints;
//! - [`classify`]: what an upstream answer means (pure);
//! - [`keys`]: the key pool and its health table (pick a key, record a failure);
//! - [`tenants`]: client authentication, per-tenant limits and fair shares;
//! - [`affinity`]: which project owns a file, cache, batch... and uploads in progress;
//! - [`usage`]: token counts read from answers as they stream by;
//! - [`request`]: the client request and its upstream form (pure);
//! - [`upstream`]: resolved upstream addresses and the connection pool;
//! - [`runtime`]: pools, tenants and tables shared by the proxy and the admin API;
//! - [`proxy`]: the Pingora hooks and the attempt loop;
//! - [`admin`]: the admin API and the scheduled key check;
//! - [`error`]: keygate's own Gemini-shaped error answers.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![warn(clippy::await_holding_lock, missing_docs)]

pub mod admin;
pub mod affinity;
pub mod classify;
pub mod config;
pub mod error;
pub mod keys;
pub mod proxy;
pub mod request;
pub mod runtime;
pub mod secret;
pub mod tenants;
pub mod upstream;
pub mod usage;

use config::Config;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::protocols::l4::stream::L4BufferSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;

/// Read buffer per client connection.
const CLIENT_READ_BUFFER: usize = 16 * 1024;

/// Starts the gateway and serves until a signal stops it. Returns only on a start-up error.
pub fn run(config: Config) -> Result<(), String> {
    check_bindable(config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    if let Some(admin) = &config.admin {
        check_bindable(admin.listen)
            .map_err(|e| format!("cannot listen on {} (admin.listen): {e}", admin.listen))?;
    }

    let conf = ServerConf {
        threads: config.threads,
        // SIGTERM: stop accepting, let in-flight requests finish for this long, then exit.
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        // One single-threaded runtime per worker thread, like nginx's workers: measured
        // cheaper per request than tokio's work-stealing pool (BENCHMARKS.md).
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let shared = Arc::new(runtime::Shared::new(&config));
    let gateway = proxy::Gateway::new(shared.clone());
    let resolver = upstream::Resolver::new(shared.runtime.load().upstreams());
    let mut service =
        pingora::proxy::http_proxy_service_with_name(&server.configuration, gateway, "keygate");
    // Pingora reads each client connection through a 64 KiB buffer by default. Gemini requests
    // are mostly small JSON, and a team gateway holds many keep-alive connections whose buffers,
    // once filled by a large body, stay resident: 16 KiB bounds that at a quarter.
    let l4 = L4BufferSettings::default().read(CLIENT_READ_BUFFER);
    service.add_listener(ListenerConfig::tcp(config.listen.to_string()).l4_buffer(l4));
    server.add_service(service);
    server.add_service(background_service("dns", resolver));
    if let Some(admin) = &config.admin {
        let app = admin::Admin::new(shared.clone(), admin.token_sha256);
        let mut service = Service::new("admin".to_string(), HttpServer::new_app(app));
        service.add_tcp(&admin.listen.to_string());
        server.add_service(service);
        let checker = admin::KeyChecker::new(shared.clone(), admin.key_check_interval);
        server.add_service(background_service("key check", checker));
    }

    log::info!("{}", config.summary());
    server.run_forever()
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
