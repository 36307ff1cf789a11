//! The process's life: signals (SIGHUP reloads the configuration; SIGTERM drains and stops;
//! SIGQUIT hands the listeners to a new process for Pingora's graceful upgrade; SIGINT stops at
//! once), the reload itself, and readiness notification to systemd.

use crate::config::Config;
use crate::runtime::{Runtime, Shared};
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Re-reads the configuration at `path` and switches new requests to it. Requests already
/// running finish on what they started with. A configuration that does not load is refused
/// and the current one keeps serving. Returns a one-line summary of the new configuration.
pub fn reload(shared: &Shared, path: &Path) -> Result<String, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let started = &shared.started;
    // Settings the running server was built with: a reload cannot change them.
    let restart_only = [
        ("listen", config.listen != started.listen),
        ("tls", config.tls != started.tls),
        ("threads", config.threads != started.threads),
        ("state_file", config.state_file != started.state_file),
        (
            "shutdown_grace_seconds",
            config.shutdown_grace != started.shutdown_grace,
        ),
        ("upgrade_sock", config.upgrade_sock != started.upgrade_sock),
        (
            "admin (listener, token, key checks)",
            config.admin != started.admin,
        ),
        ("alerts", config.alerts != started.alerts),
        (
            "client_limits (header_timeout_seconds, max_connections, max_buffered_body_bytes)",
            (
                config.client_limits.header_timeout,
                config.client_limits.max_connections,
                config.client_limits.max_buffered_body_bytes,
            ) != (
                started.client_limits.header_timeout,
                started.client_limits.max_connections,
                started.client_limits.max_buffered_body_bytes,
            ),
        ),
    ];
    let ignored: Vec<&str> = restart_only
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect();
    if !ignored.is_empty() {
        log::warn!(
            "reload: {} changed; that takes a restart, the rest of the new configuration applies now",
            ignored.join(", ")
        );
    }
    let old = shared.runtime.load_full();
    let fresh = Runtime::reloaded(&config, &old, shared.cache_shared.clone());
    shared.runtime.store(Arc::new(fresh));
    shared.upstreams_changed.send_replace(());
    Ok(config.summary())
}

/// Reloads and logs the outcome.
pub fn reload_and_log(shared: &Shared, path: &Path) -> Result<String, String> {
    match reload(shared, path) {
        Ok(summary) => {
            log::info!("reload: {summary}");
            Ok(summary)
        }
        Err(e) => {
            log::error!("reload refused: {e}; still serving the previous configuration");
            Err(e)
        }
    }
}

/// keygate's signal handling, in place of Pingora's: the same shutdown signals, plus SIGHUP for
/// a reload (which would otherwise kill the process).
pub struct Signals {
    shared: Arc<Shared>,
    config_path: PathBuf,
}

impl Signals {
    /// Signals for a server running `shared`, loaded from `config_path`.
    pub fn new(shared: Arc<Shared>, config_path: PathBuf) -> Signals {
        Signals {
            shared,
            config_path,
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        if self.shared.started.tls.is_some() {
            // A plain TCP probe of a TLS listener would be logged as a failed handshake: Pingora
            // has started every service by now, and the address was checked to be free.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                sd_notify("READY=1");
            });
        } else {
            tokio::spawn(notify_ready_when_listening(self.shared.started.listen));
        }
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    log::info!("SIGHUP: reloading {}", self.config_path.display());
                    let _ = reload_and_log(&self.shared, &self.config_path);
                    sd_notify("READY=1");
                }
                _ = term.recv() => {
                    sd_notify("STOPPING=1");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = quit.recv() => return ShutdownSignal::GracefulUpgrade,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
            }
        }
    }
}

/// Tells systemd (`Type=notify`) that keygate is ready once its listener accepts connections.
async fn notify_ready_when_listening(listen: SocketAddr) {
    let probe = match listen.ip() {
        ip if ip.is_unspecified() && listen.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], listen.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], listen.port())),
        _ => listen,
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            sd_notify("READY=1");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log::warn!("listener {listen} did not answer within 10 s; not reporting ready");
}

/// Sends `state` to systemd's notification socket, if keygate runs under `Type=notify`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        log::warn!("sd_notify {state}: {e}");
    }
}
