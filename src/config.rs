//! The configuration file: its YAML format (serde types, `deny_unknown_fields`) kept apart from
//! the validated runtime types the gateway runs on.
//!
//! Loading never panics and never echoes a key or a token: every error message goes through
//! [`redact`] before it reaches the user.

use crate::alerts::AlertConfig;
use crate::egress::ProxyConfig;
use crate::secret::{parse_sha256_hex, sha256, Secret};
use serde::Deserialize;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Gemini's own request size limit: the default for `max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

/// Default for `client_limits.max_buffered_body_bytes`: request bodies held at once, all
/// requests together (a dozen bodies of the largest size).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

/// Longest `client_limits.header_timeout_seconds` accepted.
pub const MAX_HEADER_TIMEOUT_SECONDS: u64 = 30;

/// What can go wrong loading a configuration. Messages name the file, the field or the pool,
/// never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file (the config, a keys file) could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// Which file, and for a keys file which pool.
        path: String,
        /// The I/O error kind.
        reason: String,
    },
    /// The YAML does not match the format: the message starts with the field's path.
    #[error("{0}")]
    Parse(String),
    /// The values are inconsistent or unusable.
    #[error("{0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default)]
    allow_unauthenticated: bool,
    threads: Option<usize>,
    #[serde(default = "default_max_body")]
    max_body_bytes: usize,
    #[serde(default = "default_grace")]
    shutdown_grace_seconds: u64,
    #[serde(default)]
    timeouts: FileTimeouts,
    #[serde(default)]
    retry: FileRetry,
    #[serde(default = "default_upstream_health_check")]
    upstream_health_check_seconds: u64,
    pools: Vec<FilePool>,
    #[serde(default)]
    tenants: Vec<FileTenant>,
    admin: Option<FileAdmin>,
    state_file: Option<PathBuf>,
    cors: Option<FileCors>,
    alerts: Option<FileAlerts>,
    #[serde(default = "default_upgrade_sock")]
    upgrade_sock: PathBuf,
    tls: Option<FileTls>,
    public_url: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default)]
    client_limits: FileClientLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileClientLimits {
    header_timeout_seconds: u64,
    body_timeout_seconds: u64,
    body_min_rate_bytes_per_second: u64,
    send_timeout_seconds: u64,
    max_connections: Option<usize>,
    max_buffered_body_bytes: usize,
}

impl Default for FileClientLimits {
    fn default() -> Self {
        FileClientLimits {
            header_timeout_seconds: 10,
            body_timeout_seconds: 10,
            body_min_rate_bytes_per_second: 1024,
            send_timeout_seconds: 60,
            max_connections: None,
            max_buffered_body_bytes: DEFAULT_MAX_BUFFERED_BYTES,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn default_upgrade_sock() -> PathBuf {
    PathBuf::from("/tmp/keygate_upgrade.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAlerts {
    webhook_url: Option<String>,
    webhook_url_env: Option<String>,
    #[serde(default = "default_alert_interval")]
    min_interval_seconds: u64,
    #[serde(default = "default_alert_retries")]
    retries: u32,
    #[serde(default = "default_alert_timeout")]
    timeout_seconds: u64,
}

fn default_alert_interval() -> u64 {
    300
}
fn default_alert_retries() -> u32 {
    3
}
fn default_alert_timeout() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCors {
    allowed_origins: Vec<String>,
    allowed_headers: Option<Vec<String>>,
    #[serde(default = "default_cors_max_age")]
    max_age_seconds: u64,
}

fn default_cors_max_age() -> u64 {
    600
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_grace() -> u64 {
    5
}
fn default_upstream_health_check() -> u64 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileTimeouts {
    connect_seconds: u64,
    read_seconds: u64,
    write_seconds: u64,
    idle_seconds: u64,
}

impl Default for FileTimeouts {
    fn default() -> Self {
        FileTimeouts {
            connect_seconds: 10,
            // A thinking model can take minutes before its first byte.
            read_seconds: 600,
            write_seconds: 60,
            idle_seconds: 60,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileRetry {
    transient_retries: u32,
    backoff_ms: u64,
    max_attempts: u32,
}

impl Default for FileRetry {
    fn default() -> Self {
        FileRetry {
            transient_retries: 2,
            backoff_ms: 250,
            max_attempts: 64,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePool {
    name: String,
    upstream: String,
    upstream_addresses: Option<Vec<String>>,
    #[serde(default)]
    keys: Vec<FileKey>,
    keys_env: Option<String>,
    keys_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
    models: Option<Vec<String>>,
    proxy: Option<String>,
    proxy_auth_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileKey {
    Bare(String),
    Full(FileKeyFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyFull {
    key: String,
    project: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    name: String,
    token: Option<String>,
    token_env: Option<String>,
    token_sha256: Option<String>,
    pools: Option<Vec<String>>,
    rpm: Option<u32>,
    max_concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: String,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    /// Accepted only to refuse it with a clear message: the admin token never sits in the file.
    token: Option<serde::de::IgnoredAny>,
    #[serde(default = "default_key_check")]
    key_check_interval_seconds: u64,
}

fn default_key_check() -> u64 {
    // Listing models spends no generation quota, but there is no reason to ask often: a key
    // Google disabled stays disabled for long.
    1800
}

// ---------------------------------------------------------------------------------------------
// Runtime types
// ---------------------------------------------------------------------------------------------

/// The validated configuration the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the client listener.
    pub listen: SocketAddr,
    /// Worker threads for the proxy service.
    pub threads: usize,
    /// Largest request body accepted (and replayed); larger ones get 413.
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Upstream timeouts.
    pub timeouts: Timeouts,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// How often each upstream address gets a TCP connect check; zero turns the checks off.
    pub upstream_health_check: Duration,
    /// Key pools; requests go to the first one.
    pub pools: Vec<PoolConfig>,
    /// Clients allowed in; empty means anyone (loopback only unless `allow_unauthenticated`).
    pub tenants: Vec<TenantConfig>,
    /// The admin listener, if configured.
    pub admin: Option<AdminConfig>,
    /// Where the health and affinity tables are saved, if anywhere.
    pub state_file: Option<PathBuf>,
    /// Browser access, if allowed.
    pub cors: Option<CorsConfig>,
    /// Webhook alerts, if configured.
    pub alerts: Option<AlertConfig>,
    /// Unix socket over which a new keygate started with `-u` takes the listeners over.
    pub upgrade_sock: PathBuf,
    /// TLS for the client listener: (certificate chain file, private key file), both PEM.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where clients reach keygate (`https://host[:port][/prefix]`, no trailing slash), for the
    /// URLs keygate hands out; `None`: from the request (`Host`, or a trusted proxy's
    /// `X-Forwarded-*`).
    pub public_url: Option<String>,
    /// Peers whose `X-Forwarded-Proto` / `X-Forwarded-Host` are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// What a client connection may take.
    pub client_limits: ClientLimits,
}

/// Limits on client connections and requests (slow or hostile clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// A request header must arrive whole within this.
    pub header_timeout: Duration,
    /// Longest pause while a request body arrives; also the grace before `body_min_rate` counts.
    pub body_timeout: Duration,
    /// After `body_timeout`, a body must have arrived at this mean rate (bytes/s); 0: no minimum.
    pub body_min_rate: u64,
    /// Longest stall writing an answer to a client (one that stops reading is dropped then).
    pub send_timeout: Duration,
    /// Open client connections allowed; `None`: half the open-file limit (at most 10,000).
    pub max_connections: Option<usize>,
    /// Request bodies held in memory at once, all requests together.
    pub max_buffered_body_bytes: usize,
}

/// Which web pages may call keygate from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Origins (`https://app.example.com`) or `*`.
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send.
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age_seconds: u64,
}

/// The admin API's listener and credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// SHA-256 of the admin token.
    pub token_sha256: [u8; 32],
    /// How often every key is checked (a model listing, no quota spent); zero turns it off.
    pub key_check_interval: Duration,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (and, separately, TLS handshake) timeout.
    pub connect: Duration,
    /// Longest wait for any single read from upstream, the response header included.
    pub read: Duration,
    /// Longest wait for any single write to upstream.
    pub write: Duration,
    /// How long an unused upstream connection stays in the pool.
    pub idle: Duration,
}

/// How many times, and how, a request is re-sent.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries of answers that are nobody's fault: connect errors, timeouts, 500/503,
    /// Google's shared-capacity 429.
    pub transient_retries: u32,
    /// First backoff before a transient retry; doubles each time.
    pub backoff: Duration,
    /// Hard cap on upstream attempts per request, key-level failures included.
    pub max_attempts: u32,
}

/// One pool of keys in front of one upstream.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The pool's name, used in logs and error messages.
    pub name: String,
    /// Where its requests go.
    pub upstream: UpstreamConfig,
    /// Its keys, deduplicated, in file order.
    pub keys: Vec<KeyConfig>,
    /// CA bundle to verify the upstream with instead of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Model globs this pool serves; empty means every model.
    pub models: Vec<String>,
    /// Outbound proxy its requests go through, if any.
    pub proxy: Option<ProxyConfig>,
}

impl PoolConfig {
    /// Whether this pool serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|g| glob_match(g, model))
    }
}

/// Matches `text` against a glob where `*` stands for any run of characters (and `?` for one).
pub fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t) = (glob.as_bytes(), text.as_bytes());
    let (mut gi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if gi < g.len() && (g[gi] == b'?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == b'*' {
            star = Some((gi, ti));
            gi += 1;
        } else if let Some((sg, st)) = star {
            gi = sg + 1;
            ti = st + 1;
            star = Some((sg, st + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == b'*')
}

/// A parsed `http(s)://host[:port]` upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `https` or not.
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, defaulted from the scheme.
    pub port: u16,
    /// Addresses pinned in the config (`upstream_addresses`, like curl's `--resolve`): used
    /// instead of looking the host up. Empty: the host is an IP literal or is looked up.
    pub addresses: Vec<SocketAddr>,
}

impl UpstreamConfig {
    /// Value for the `Host` header / `:authority`.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// One API key and the Google project whose quota it spends.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The key.
    pub secret: Secret,
    /// The project: keys of one project share its quota. Defaults to the key's fingerprint.
    pub project: String,
}

/// A client allowed to use the gateway.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// Name shown in logs.
    pub name: String,
    /// SHA-256 of the token: only the hash is kept in memory.
    pub token_sha256: [u8; 32],
    /// Indices into [`Config::pools`] of the pools this tenant may use, in config order.
    pub pools: Vec<usize>,
    /// Requests per minute allowed, if limited.
    pub rpm: Option<u32>,
    /// Requests in flight allowed, if limited.
    pub max_concurrent: Option<u32>,
}

impl Config {
    /// Reads and validates the file at `path`, taking `keys_env` and `token_env` values from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.kind().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base, &|name| std::env::var(name).ok())
    }

    /// Parses and validates YAML text. `base` resolves relative `keys_file` paths; `env` looks
    /// up environment variables (a parameter so tests need not touch the real environment).
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = redact_path(&e.path().to_string());
            let inner = e.into_inner().to_string();
            // serde_yaml may start its message with its own (shorter) path: drop it.
            let inner = match inner.split_once(": ") {
                Some((head, tail)) if !head.contains(' ') => tail.to_string(),
                _ => inner,
            };
            let inner = redact(&inner);
            if path == "." || path.is_empty() {
                ConfigError::Parse(inner)
            } else {
                ConfigError::Parse(format!("{path}: {inner}"))
            }
        })?;
        validate(file, base, env)
    }

    /// One line saying what this configuration serves, without any secret.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|p| {
                let projects: HashSet<&str> = p.keys.iter().map(|k| k.project.as_str()).collect();
                format!(
                    "{} ({} keys in {} projects -> {})",
                    p.name,
                    p.keys.len(),
                    projects.len(),
                    p.upstream.authority()
                )
            })
            .collect();
        let auth = if self.tenants.is_empty() {
            "no tenants: open access".to_string()
        } else {
            format!("{} tenants", self.tenants.len())
        };
        let admin = match &self.admin {
            Some(a) => format!("; admin API on {}", a.listen),
            None => String::new(),
        };
        let state = match &self.state_file {
            Some(p) => format!("; state file {}", p.display()),
            None => String::new(),
        };
        format!(
            "config OK: listen {}, {} pool(s): {}; {}{admin}{state}",
            self.listen,
            self.pools.len(),
            pools.join(", "),
            auth
        )
    }
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

fn validate(
    file: FileConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let listen: SocketAddr = file.listen.parse().map_err(|_| {
        invalid(format!(
            "listen: {:?} is not an address like 127.0.0.1:8080",
            file.listen
        ))
    })?;
    if file.pools.is_empty() {
        return Err(invalid("pools: at least one pool is needed"));
    }
    if file.max_body_bytes == 0 {
        return Err(invalid("max_body_bytes: must be greater than 0"));
    }
    let t = &file.timeouts;
    for (name, value) in [
        ("connect_seconds", t.connect_seconds),
        ("read_seconds", t.read_seconds),
        ("write_seconds", t.write_seconds),
    ] {
        if value == 0 {
            return Err(invalid(format!("timeouts.{name}: must be greater than 0")));
        }
    }
    if file.retry.max_attempts == 0 {
        return Err(invalid("retry.max_attempts: must be at least 1"));
    }
    if file.threads == Some(0) {
        return Err(invalid("threads: must be at least 1"));
    }

    let mut pools = Vec::with_capacity(file.pools.len());
    let mut names = HashSet::new();
    for (i, pool) in file.pools.into_iter().enumerate() {
        let ctx = format!("pools[{i}]");
        if pool.name.trim().is_empty() {
            return Err(invalid(format!("{ctx}.name: must not be empty")));
        }
        if !names.insert(pool.name.clone()) {
            return Err(invalid(format!(
                "{ctx}.name: pool {:?} is defined twice",
                pool.name
            )));
        }
        pools.push(validate_pool(pool, &ctx, base, env)?);
    }

    let mut tenants = Vec::with_capacity(file.tenants.len());
    let mut tenant_names = HashSet::new();
    let mut hashes = HashSet::new();
    for (i, tenant) in file.tenants.into_iter().enumerate() {
        let ctx = format!("tenants[{i}]");
        if tenant.name.trim().is_empty() {
            return Err(invalid(format!("{ctx}.name: must not be empty")));
        }
        if !tenant_names.insert(tenant.name.clone()) {
            return Err(invalid(format!(
                "{ctx}.name: tenant {:?} is defined twice",
                tenant.name
            )));
        }
        let hash = tenant_hash(&tenant, &ctx, env)?;
        if !hashes.insert(hash) {
            return Err(invalid(format!(
                "{ctx}: tenant {:?} has the same token as another tenant",
                tenant.name
            )));
        }
        let allowed = match &tenant.pools {
            None => (0..pools.len()).collect(),
            Some(names) if names.is_empty() => {
                return Err(invalid(format!(
                    "{ctx}.pools: an empty list would let tenant {:?} use nothing; leave it out to allow every pool",
                    tenant.name
                )))
            }
            Some(names) => {
                let mut allowed = Vec::with_capacity(names.len());
                for name in names {
                    let Some(i) = pools.iter().position(|p: &PoolConfig| &p.name == name) else {
                        return Err(invalid(format!(
                            "{ctx}.pools: no pool is named {name:?}"
                        )));
                    };
                    if !allowed.contains(&i) {
                        allowed.push(i);
                    }
                }
                // The first matching pool in config order wins, whatever order the tenant lists.
                allowed.sort_unstable();
                allowed
            }
        };
        if tenant.rpm == Some(0) {
            return Err(invalid(format!("{ctx}.rpm: must be at least 1")));
        }
        if tenant.max_concurrent == Some(0) {
            return Err(invalid(format!("{ctx}.max_concurrent: must be at least 1")));
        }
        tenants.push(TenantConfig {
            name: tenant.name,
            token_sha256: hash,
            pools: allowed,
            rpm: tenant.rpm,
            max_concurrent: tenant.max_concurrent,
        });
    }

    let admin = match file.admin {
        Some(admin) => Some(validate_admin(admin, listen, base, env)?),
        None => None,
    };

    if tenants.is_empty() && !listen.ip().is_loopback() && !file.allow_unauthenticated {
        return Err(invalid(format!(
            "listen: {listen} is reachable from other machines but no tenants are configured, so \
             anyone could spend your keys; add tenants, listen on 127.0.0.1, or set \
             allow_unauthenticated: true"
        )));
    }

    Ok(Config {
        listen,
        threads: file.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        max_body_bytes: file.max_body_bytes,
        shutdown_grace: Duration::from_secs(file.shutdown_grace_seconds),
        timeouts: Timeouts {
            connect: Duration::from_secs(t.connect_seconds),
            read: Duration::from_secs(t.read_seconds),
            write: Duration::from_secs(t.write_seconds),
            idle: Duration::from_secs(t.idle_seconds),
        },
        retry: RetryPolicy {
            transient_retries: file.retry.transient_retries,
            backoff: Duration::from_millis(file.retry.backoff_ms),
            max_attempts: file.retry.max_attempts,
        },
        upstream_health_check: Duration::from_secs(file.upstream_health_check_seconds),
        pools,
        tenants,
        admin,
        state_file: file
            .state_file
            .map(|p| if p.is_absolute() { p } else { base.join(p) }),
        cors: file.cors.map(validate_cors).transpose()?,
        alerts: match file.alerts {
            Some(a) => Some(validate_alerts(a, env)?),
            None => None,
        },
        upgrade_sock: if file.upgrade_sock.is_absolute() {
            file.upgrade_sock
        } else {
            base.join(file.upgrade_sock)
        },
        tls: file.tls.map(|t| validate_tls(t, base)).transpose()?,
        public_url: file
            .public_url
            .map(|u| validate_public_url(&u))
            .transpose()?,
        trusted_proxies: file
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                parse_net(p).map_err(|why| invalid(format!("trusted_proxies[{i}]: {why}")))
            })
            .collect::<Result<_, _>>()?,
        client_limits: validate_client_limits(&file.client_limits)?,
    })
}

/// `https://host[:port][/prefix]`, without credentials, query or fragment; returned without a
/// trailing slash.
fn validate_public_url(url: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| invalid(format!("public_url: {url:?} {why}"));
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with https:// or http://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    if authority.contains('@') {
        return Err(bad("may not hold credentials"));
    }
    if url.contains(['?', '#']) || url.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(bad(
            "may hold no query, fragment, space or control character",
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// An address (`10.0.0.1`) or a network (`10.0.0.0/8`).
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or a network like 10.0.0.0/8"))
}

fn validate_client_limits(l: &FileClientLimits) -> Result<ClientLimits, ConfigError> {
    if !(1..=MAX_HEADER_TIMEOUT_SECONDS).contains(&l.header_timeout_seconds) {
        return Err(invalid(format!(
            "client_limits.header_timeout_seconds: must be 1 to {MAX_HEADER_TIMEOUT_SECONDS}"
        )));
    }
    if l.body_timeout_seconds == 0 {
        return Err(invalid(
            "client_limits.body_timeout_seconds: must be greater than 0",
        ));
    }
    if l.send_timeout_seconds == 0 {
        return Err(invalid(
            "client_limits.send_timeout_seconds: must be greater than 0",
        ));
    }
    if l.max_connections == Some(0) {
        return Err(invalid("client_limits.max_connections: must be at least 1"));
    }
    if l.max_buffered_body_bytes == 0 {
        return Err(invalid(
            "client_limits.max_buffered_body_bytes: must be greater than 0",
        ));
    }
    Ok(ClientLimits {
        header_timeout: Duration::from_secs(l.header_timeout_seconds),
        body_timeout: Duration::from_secs(l.body_timeout_seconds),
        body_min_rate: l.body_min_rate_bytes_per_second,
        send_timeout: Duration::from_secs(l.send_timeout_seconds),
        max_connections: l.max_connections,
        max_buffered_body_bytes: l.max_buffered_body_bytes,
    })
}

/// Loads the listener's certificate and key once, the way Pingora will, so that a bad file is a
/// config error here instead of a panic when the listener starts.
fn validate_tls(tls: FileTls, base: &Path) -> Result<(PathBuf, PathBuf), ConfigError> {
    use pingora::tls::{load_certs_and_key_files, version, ServerConfig};
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
    let (cert, key) = (resolve(tls.cert_file), resolve(tls.key_file));
    let (cert_text, key_text) = (cert.display().to_string(), key.display().to_string());
    let loaded = load_certs_and_key_files(&cert_text, &key_text).map_err(|e| {
        invalid(format!(
            "tls: cannot read {cert_text} or {key_text}: {}",
            e.etype().as_str()
        ))
    })?;
    let Some((certs, private_key)) = loaded else {
        return Err(invalid(format!(
            "tls: {cert_text} holds no PEM certificate or {key_text} no PEM private key"
        )));
    };
    pingora::tls::install_default_crypto_provider();
    ServerConfig::builder_with_protocol_versions(&[&version::TLS12, &version::TLS13])
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| invalid(format!("tls: the key does not fit the certificate: {e}")))?;
    Ok((cert, key))
}

fn validate_alerts(
    alerts: FileAlerts,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AlertConfig, ConfigError> {
    // A webhook URL often holds its own secret (Slack, Discord): it may come from the environment.
    let url = match (alerts.webhook_url, &alerts.webhook_url_env) {
        (Some(url), None) => url,
        (None, Some(var)) => env(var).ok_or_else(|| {
            invalid(format!(
                "alerts.webhook_url_env: environment variable {var} is not set"
            ))
        })?,
        _ => {
            return Err(invalid(
                "alerts: needs exactly one of webhook_url, webhook_url_env",
            ))
        }
    };
    let config = AlertConfig {
        url,
        min_interval: Duration::from_secs(alerts.min_interval_seconds),
        retries: alerts.retries,
        timeout: Duration::from_secs(alerts.timeout_seconds),
    };
    // Checked here so a bad URL is a config error; the message never repeats the URL.
    crate::alerts::Alerts::new(config.clone())
        .map_err(|e| invalid(format!("alerts.webhook_url: {e}")))?;
    Ok(config)
}

fn validate_cors(cors: FileCors) -> Result<CorsConfig, ConfigError> {
    if cors.allowed_origins.is_empty() {
        return Err(invalid(
            "cors.allowed_origins: list the origins (https://app.example.com) or \"*\"; leave `cors` out to turn it off",
        ));
    }
    for (i, origin) in cors.allowed_origins.iter().enumerate() {
        let ok = origin == "*"
            || ((origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.trim_end_matches('/').contains(['?', '#'])
                && origin.matches('/').count() <= 3);
        if !ok {
            return Err(invalid(format!(
                "cors.allowed_origins[{i}]: {origin:?} is not an origin like https://app.example.com (scheme, host, optional port) or \"*\""
            )));
        }
    }
    Ok(CorsConfig {
        allowed_origins: cors.allowed_origins,
        allowed_headers: cors.allowed_headers.unwrap_or_else(|| {
            crate::gateway::cors::DEFAULT_HEADERS
                .iter()
                .map(|h| h.to_string())
                .collect()
        }),
        max_age_seconds: cors.max_age_seconds,
    })
}

fn validate_admin(
    admin: FileAdmin,
    listen: SocketAddr,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AdminConfig, ConfigError> {
    let addr: SocketAddr = admin.listen.parse().map_err(|_| {
        invalid(format!(
            "admin.listen: {:?} is not an address like 127.0.0.1:9090",
            admin.listen
        ))
    })?;
    if addr == listen {
        return Err(invalid(
            "admin.listen: must differ from listen (the admin API has its own listener)",
        ));
    }
    if admin.token.is_some() {
        return Err(invalid(
            "admin.token: the admin token may not be written in the config file; use token_env              (an environment variable) or token_file",
        ));
    }
    let token = match (&admin.token_env, &admin.token_file) {
        (Some(var), None) => env(var).ok_or_else(|| {
            invalid(format!(
                "admin.token_env: environment variable {var} is not set"
            ))
        })?,
        (None, Some(file)) => {
            let path = if file.is_absolute() {
                file.clone()
            } else {
                base.join(file)
            };
            std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                path: format!("admin.token_file {}", path.display()),
                reason: e.kind().to_string(),
            })?
        }
        _ => return Err(invalid("admin: needs exactly one of token_env, token_file")),
    };
    let token = token.trim();
    if token.len() < 16 {
        return Err(invalid(
            "admin: the admin token must be at least 16 characters long",
        ));
    }
    Ok(AdminConfig {
        listen: addr,
        token_sha256: sha256(token.as_bytes()),
        key_check_interval: Duration::from_secs(admin.key_check_interval_seconds),
    })
}

fn validate_pool(
    pool: FilePool,
    ctx: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PoolConfig, ConfigError> {
    let mut upstream =
        parse_upstream(&pool.upstream).map_err(|why| invalid(format!("{ctx}.upstream: {why}")))?;
    if let Some(pinned) = &pool.upstream_addresses {
        if pool.proxy.is_some() {
            return Err(invalid(format!(
                "{ctx}.upstream_addresses: cannot be combined with proxy (the proxy resolves \
                 the upstream's host name itself)"
            )));
        }
        upstream.addresses = parse_pinned_addresses(pinned, upstream.port)
            .map_err(|why| invalid(format!("{ctx}.upstream_addresses: {why}")))?;
    }
    let proxy_auth = match &pool.proxy_auth_env {
        None => None,
        Some(var) => {
            let value = env(var).ok_or_else(|| {
                invalid(format!(
                    "{ctx}.proxy_auth_env: environment variable {var} is not set"
                ))
            })?;
            let (user, password) = value.split_once(':').ok_or_else(|| {
                invalid(format!(
                    "{ctx}.proxy_auth_env: ${var} must hold `user:password`"
                ))
            })?;
            Some((user.to_string(), Secret::new(password)))
        }
    };
    let proxy = match &pool.proxy {
        None if proxy_auth.is_some() => {
            return Err(invalid(format!(
                "{ctx}.proxy_auth_env: set without a proxy"
            )))
        }
        None => None,
        Some(url) => Some(
            ProxyConfig::parse(url, proxy_auth)
                .map_err(|why| invalid(format!("{ctx}.proxy: {why}")))?,
        ),
    };

    // (key, explicit project) in the order: inline, environment, file.
    let mut raw: Vec<(String, Option<String>, String)> = Vec::new();
    for (j, key) in pool.keys.into_iter().enumerate() {
        let (k, p) = match key {
            FileKey::Bare(k) => (k, None),
            FileKey::Full(f) => (f.key, f.project),
        };
        raw.push((k, p, format!("{ctx}.keys[{j}]")));
    }
    if let Some(var) = &pool.keys_env {
        match env(var) {
            Some(value) => {
                for (j, item) in value.split(',').enumerate() {
                    let item = item.trim();
                    if item.is_empty() {
                        continue;
                    }
                    let (k, p) = match item.split_once(':') {
                        Some((k, p)) => (k.trim().to_string(), Some(p.trim().to_string())),
                        None => (item.to_string(), None),
                    };
                    raw.push((k, p, format!("{ctx}.keys_env ${var}, entry {}", j + 1)));
                }
            }
            None => log::warn!("{ctx}.keys_env: environment variable {var} is not set"),
        }
    }
    if let Some(file) = &pool.keys_file {
        let path = if file.is_absolute() {
            file.clone()
        } else {
            base.join(file)
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
            path: format!("{ctx}.keys_file {}", path.display()),
            reason: e.kind().to_string(),
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let k = words.next().unwrap_or("").to_string();
            let p = words.next().map(str::to_string);
            if words.next().is_some() {
                return Err(invalid(format!(
                    "{ctx}.keys_file {} line {}: expected `KEY` or `KEY project`",
                    path.display(),
                    n + 1
                )));
            }
            raw.push((k, p, format!("{ctx}.keys_file line {}", n + 1)));
        }
    }

    let mut keys = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    for (key, project, place) in raw {
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(invalid(format!("{place}: empty key")));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(format!(
                "{place}: a key may hold only visible ASCII characters"
            )));
        }
        let secret = Secret::new(key);
        if !seen.insert(secret.expose().to_string()) {
            log::warn!("{place}: {secret} is listed twice; using it once");
            continue;
        }
        let project = match project.map(|p| p.trim().to_string()) {
            Some(p) if !p.is_empty() => p,
            Some(_) => return Err(invalid(format!("{place}: empty project"))),
            None => secret.fingerprint(),
        };
        keys.push(KeyConfig { secret, project });
    }
    if keys.is_empty() {
        let mut sources = vec!["keys".to_string()];
        if let Some(var) = &pool.keys_env {
            sources.push(format!("keys_env (${var})"));
        }
        if pool.keys_file.is_some() {
            sources.push("keys_file".into());
        }
        return Err(invalid(format!(
            "{ctx}: pool {:?} has no keys; looked in {}",
            pool.name,
            sources.join(", ")
        )));
    }
    Ok(PoolConfig {
        name: pool.name,
        upstream,
        keys,
        tls_ca_file: pool
            .tls_ca_file
            .map(|p| if p.is_absolute() { p } else { base.join(p) }),
        models: match pool.models {
            Some(globs) if globs.is_empty() || globs.iter().any(|g| g.trim().is_empty()) => {
                return Err(invalid(format!(
                    "{ctx}.models: globs must not be empty; leave `models` out to serve every model"
                )))
            }
            Some(globs) => globs
                .into_iter()
                .map(|g| g.trim().trim_start_matches("models/").to_string())
                .collect(),
            None => Vec::new(),
        },
        proxy,
    })
}

fn tenant_hash(
    tenant: &FileTenant,
    ctx: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<[u8; 32], ConfigError> {
    let given = [
        tenant.token.is_some(),
        tenant.token_env.is_some(),
        tenant.token_sha256.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(invalid(format!(
            "{ctx}: tenant {:?} needs exactly one of token, token_env, token_sha256",
            tenant.name
        )));
    }
    if let Some(token) = &tenant.token {
        if token.trim().is_empty() {
            return Err(invalid(format!("{ctx}.token: must not be empty")));
        }
        return Ok(sha256(token.as_bytes()));
    }
    if let Some(var) = &tenant.token_env {
        return match env(var) {
            Some(v) if !v.trim().is_empty() => Ok(sha256(v.trim().as_bytes())),
            _ => Err(invalid(format!(
                "{ctx}.token_env: environment variable {var} is not set"
            ))),
        };
    }
    let hex = tenant.token_sha256.as_deref().unwrap_or("");
    parse_sha256_hex(hex)
        .ok_or_else(|| invalid(format!("{ctx}.token_sha256: expected 64 hex digits")))
}

/// Parses `http(s)://host[:port]` (no path, no credentials).
///
/// By hand rather than with `http::Uri`, which is lenient where a config file must not be: it
/// reads `host:99999` and `host:` as "no port" (so the default port, silently), drops a
/// `#fragment` and takes `HTTP://`. The alert URLs and egress proxy URLs are checked the same way.
pub fn parse_upstream(text: &str) -> Result<UpstreamConfig, String> {
    let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = text.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with http:// or https://".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err("must be scheme://host[:port] with no path, query or credentials".into());
    }
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (h, after) = inner.split_once(']').ok_or("unclosed [ in IPv6 address")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after ]".into()),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err("missing host".into());
    }
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        None if tls => 443,
        None => 80,
    };
    Ok(UpstreamConfig {
        tls,
        host,
        port,
        addresses: Vec::new(),
    })
}

/// Most addresses one upstream may pin.
const MAX_PINNED_ADDRESSES: usize = 64;

/// Parses pinned upstream addresses: `ip:port`, `[v6]:port`, or a bare IP that takes the
/// upstream's `port`. Duplicates are dropped; the list must not be empty.
fn parse_pinned_addresses(items: &[String], port: u16) -> Result<Vec<SocketAddr>, String> {
    if items.is_empty() {
        return Err("must list at least one address; leave it out to look the host up".into());
    }
    if items.len() > MAX_PINNED_ADDRESSES {
        return Err(format!("at most {MAX_PINNED_ADDRESSES} addresses"));
    }
    let mut out: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let text = item.trim();
        let addr = text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, port)))
            .map_err(|_| {
                format!("[{i}]: {text:?} is not an IP address (like 192.0.2.1 or 192.0.2.1:443)")
            })?;
        if addr.port() == 0 {
            return Err(format!("[{i}]: {text:?}: port 0"));
        }
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// A field path such as `pools[0].upstreem`, with any segment that does not look like one of
/// our field names (a key typed as a field name, say) replaced by `…`.
fn redact_path(path: &str) -> String {
    path.split('.')
        .map(|segment| {
            let name = segment.split('[').next().unwrap_or("");
            let field_like = name.len() <= 32
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if field_like {
                segment.to_string()
            } else {
                "…".to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Removes values from a serde error message so a key typed in the wrong place is never
/// echoed back. serde quotes values with `"…"` and names fields with backticks; a backticked
/// word is kept only when it looks like one of our field names.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[start] as char;
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        match after.find(quote) {
            Some(end) => {
                let inner = &after[..end];
                let field_like = quote == '`'
                    && !inner.is_empty()
                    && inner.len() <= 32
                    && inner
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                out.push(quote);
                out.push_str(if field_like { inner } else { "…" });
                out.push(quote);
                rest = &after[end + 1..];
            }
            None => {
                out.push('…');
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."), &|_| None)
    }

    const MINIMAL: &str =
        "pools:\n  - name: main\n    upstream: https://example.com\n    keys: [k1]\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.max_body_bytes, 20 * 1024 * 1024);
        assert_eq!(c.pools[0].upstream.port, 443);
        assert_eq!(
            c.pools[0].keys[0].project,
            c.pools[0].keys[0].secret.fingerprint()
        );
        assert!(c.summary().contains("1 keys in 1 projects"));
    }

    #[test]
    fn client_limits_public_url_and_trusted_proxies() {
        let c = parse(MINIMAL).unwrap();
        let l = c.client_limits;
        assert_eq!(l.header_timeout, Duration::from_secs(10));
        assert_eq!(l.body_timeout, Duration::from_secs(10));
        assert_eq!(l.body_min_rate, 1024);
        assert_eq!(l.send_timeout, Duration::from_secs(60));
        assert_eq!(l.max_connections, None);
        assert_eq!(l.max_buffered_body_bytes, DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(c.public_url, None);
        assert!(c.trusted_proxies.is_empty());
        let c = parse(&format!(
            "{MINIMAL}public_url: \"https://gw.example.com/ai/\"\ntrusted_proxies: [10.0.0.0/8, \"::1\", 192.168.1.7]\nclient_limits:\n  header_timeout_seconds: 30\n  max_connections: 50\n  body_min_rate_bytes_per_second: 0\n"
        ))
        .unwrap();
        assert_eq!(c.public_url.as_deref(), Some("https://gw.example.com/ai"));
        assert_eq!(c.trusted_proxies.len(), 3);
        assert!(c.trusted_proxies[0].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
        assert_eq!(c.client_limits.max_connections, Some(50));
        assert_eq!(c.client_limits.body_min_rate, 0);
        for (extra, why) in [
            (
                "client_limits:\n  header_timeout_seconds: 31\n",
                "header_timeout_seconds: must be 1 to 30",
            ),
            (
                "client_limits:\n  header_timeout_seconds: 0\n",
                "header_timeout_seconds",
            ),
            ("client_limits:\n  max_connections: 0\n", "max_connections"),
            (
                "client_limits:\n  send_timeout_seconds: 0\n",
                "send_timeout_seconds",
            ),
            (
                "client_limits:\n  body_timeout_seconds: 0\n",
                "body_timeout_seconds",
            ),
            (
                "client_limits:\n  max_buffered_body_bytes: 0\n",
                "max_buffered_body_bytes",
            ),
            (
                "client_limits:\n  header_timeout: 5\n",
                "unknown field `header_timeout`",
            ),
            (
                "public_url: \"gw.example.com\"\n",
                "must start with https://",
            ),
            ("public_url: \"https://user:pw@gw\"\n", "credentials"),
            ("public_url: \"https://gw/?x=1\"\n", "query"),
            ("public_url: \"https:///x\"\n", "no host"),
            ("trusted_proxies: [\"10.0.0.0/99\"]\n", "trusted_proxies[0]"),
            ("trusted_proxies: [\"proxy.local\"]\n", "trusted_proxies[0]"),
        ] {
            let e = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(e.contains(why), "{extra}: {e}");
        }
    }

    #[test]
    fn unknown_field_error_names_its_path() {
        let e = parse("pools:\n  - name: main\n    upstreem: https://x\n    keys: [k1]\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pools[0]"), "{e}");
        assert!(e.contains("unknown field `upstreem`"), "{e}");
    }

    #[test]
    fn a_key_in_the_wrong_place_is_not_echoed() {
        let e =
            parse("pools:\n  - name: main\n    upstream: https://x\n    keys: MadeUpKeyValue123\n")
                .unwrap_err()
                .to_string();
        assert!(!e.contains("MadeUpKeyValue123"), "{e}");
        assert!(e.contains("pools[0].keys"), "{e}");
        let e =
            parse("pools:\n  - name: main\n    upstream: https://x\n    MadeUpKeyValue123: 1\n")
                .unwrap_err()
                .to_string();
        assert!(!e.contains("MadeUpKeyValue123"), "{e}");
    }

    #[test]
    fn keys_from_all_three_sources_with_projects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("keys"),
            "# comment\nfile-key-1 proj-f\nfile-key-2   # trailing comment\n\n",
        )
        .unwrap();
        let text = "pools:\n  - name: main\n    upstream: http://127.0.0.1:9\n    keys:\n      - key: inline-1\n        project: p1\n      - inline-2\n    keys_env: KEYS\n    keys_file: keys\n";
        let c = Config::parse(text, dir.path(), &|name| {
            (name == "KEYS").then(|| "env-1, env-2:proj-e,".to_string())
        })
        .unwrap();
        let got: Vec<(&str, &str)> = c.pools[0]
            .keys
            .iter()
            .map(|k| (k.secret.expose(), k.project.as_str()))
            .collect();
        assert_eq!(got.len(), 6);
        assert_eq!(got[0], ("inline-1", "p1"));
        assert_eq!(got[3], ("env-2", "proj-e"));
        assert_eq!(got[4], ("file-key-1", "proj-f"));
        assert_eq!(got[5].0, "file-key-2");
        assert!(got[5].1.starts_with("key#"));
    }

    #[test]
    fn empty_pool_is_an_error_naming_the_sources() {
        let e = parse("pools:\n  - name: main\n    upstream: https://x\n    keys_env: NOPE\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no keys") && e.contains("$NOPE"), "{e}");
    }

    #[test]
    fn missing_keys_file_is_an_error_not_a_panic() {
        let e = parse(
            "pools:\n  - name: main\n    upstream: https://x\n    keys_file: /nonexistent/keys\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/keys"), "{e}");
    }

    #[test]
    fn open_access_only_on_loopback_unless_explicit() {
        let public = format!("listen: 0.0.0.0:8080\n{MINIMAL}");
        let e = parse(&public).unwrap_err().to_string();
        assert!(e.contains("allow_unauthenticated"), "{e}");
        assert!(parse(&format!("allow_unauthenticated: true\n{public}")).is_ok());
        let with_tenant = format!("{public}tenants:\n  - name: a\n    token: t\n");
        assert!(parse(&with_tenant).is_ok());
    }

    #[test]
    fn tenants_need_exactly_one_token_form() {
        let two = format!("{MINIMAL}tenants:\n  - name: a\n    token: t\n    token_env: X\n");
        assert!(parse(&two).is_err());
        let hashed = format!(
            "{MINIMAL}tenants:\n  - name: a\n    token_sha256: {}\n",
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        let c = parse(&hashed).unwrap();
        assert_eq!(c.tenants[0].token_sha256, sha256(b"test"));
        let dup = format!(
            "{MINIMAL}tenants:\n  - name: a\n    token: dup-token-value\n  - name: b\n    token: dup-token-value\n"
        );
        let e = parse(&dup).unwrap_err().to_string();
        assert!(
            e.contains("same token") && !e.contains("dup-token-value"),
            "{e}"
        );
    }

    #[test]
    fn pinned_upstream_addresses_are_checked() {
        let pinned = |list: &str| {
            parse(&format!("{MINIMAL}    upstream_addresses: {list}\n"))
                .map(|c| c.pools[0].upstream.addresses.clone())
        };
        let ok =
            pinned("[\"192.0.2.1\", \"192.0.2.2:8443\", \"[2001:db8::1]:443\", \"192.0.2.1\"]")
                .unwrap();
        let text: Vec<String> = ok.iter().map(|a| a.to_string()).collect();
        assert_eq!(
            text,
            ["192.0.2.1:443", "192.0.2.2:8443", "[2001:db8::1]:443"],
            "bare IPs take the upstream's port; duplicates go"
        );
        for (bad, says) in [
            ("[]", "at least one address"),
            (
                "[\"example.com:443\"]",
                "[0]: \"example.com:443\" is not an IP address",
            ),
            ("[\"192.0.2.1\", \"192.0.2.999\"]", "[1]:"),
            ("[\"192.0.2.1:0\"]", "port 0"),
            ("\"192.0.2.1\"", "upstream_addresses"),
        ] {
            let e = pinned(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("pools[0].upstream_addresses"), "{bad}: {e}");
        }
        let e = parse(&format!(
            "{MINIMAL}    upstream_addresses: [\"192.0.2.1\"]\n    proxy: \"http://127.0.0.1:3128\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot be combined with proxy"), "{e}");
        assert!(parse(MINIMAL).unwrap().pools[0]
            .upstream
            .addresses
            .is_empty());
    }

    #[test]
    fn upstream_health_check_interval() {
        assert_eq!(
            parse(MINIMAL).unwrap().upstream_health_check,
            Duration::from_secs(5)
        );
        let off = parse(&format!("upstream_health_check_seconds: 0\n{MINIMAL}")).unwrap();
        assert!(off.upstream_health_check.is_zero());
        assert!(parse(&format!("upstream_health_check_seconds: -1\n{MINIMAL}")).is_err());
    }

    #[test]
    fn parses_upstreams() {
        assert_eq!(
            parse_upstream("https://generativelanguage.googleapis.com").unwrap(),
            UpstreamConfig {
                tls: true,
                host: "generativelanguage.googleapis.com".into(),
                port: 443,
                addresses: Vec::new(),
            }
        );
        let u = parse_upstream("http://127.0.0.1:8081/").unwrap();
        assert_eq!(
            (u.tls, u.port, u.authority()),
            (false, 8081, "127.0.0.1:8081".into())
        );
        let v6 = parse_upstream("http://[::1]:9000").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.authority(), "[::1]:9000");
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("https://x/v1beta").is_err());
        assert!(parse_upstream("https://user:pw@x").is_err());
        // What http::Uri would let through as "no port".
        assert!(parse_upstream("https://x:99999").is_err());
        assert!(parse_upstream("https://x:").is_err());
    }

    #[test]
    fn redact_keeps_field_names_and_drops_values() {
        assert_eq!(
            redact("invalid type: string \"MadeUpXYZ\", expected a sequence"),
            "invalid type: string \"…\", expected a sequence"
        );
        assert_eq!(
            redact("unknown field `upstreem`, expected one of `name`, `upstream`"),
            "unknown field `upstreem`, expected one of `name`, `upstream`"
        );
        assert_eq!(redact("unknown field `MadeUpKeyX`"), "unknown field `…`");
    }

    #[test]
    fn model_globs() {
        assert!(glob_match("gemini-2.5-pro*", "gemini-2.5-pro"));
        assert!(glob_match(
            "gemini-2.5-pro*",
            "gemini-2.5-pro-preview-05-06"
        ));
        assert!(!glob_match("gemini-2.5-pro*", "gemini-2.5-flash"));
        assert!(glob_match("*flash*", "gemini-2.0-flash-lite"));
        assert!(glob_match("gemini-?.5-*", "gemini-2.5-flash"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "a"));
        assert!(glob_match("a*b*c", "axxbyybzc"));
    }

    const TWO_POOLS: &str = "pools:\n  - name: pro\n    upstream: https://example.com\n    keys: [k1]\n    models: [\"gemini-2.5-pro*\"]\n  - name: flash\n    upstream: https://example.com\n    keys: [k2]\n";

    #[test]
    fn tenants_name_their_pools_and_limits() {
        let c = parse(&format!(
            "{TWO_POOLS}tenants:\n  - name: ci\n    token: t-ci\n    pools: [flash, pro]\n    rpm: 60\n    max_concurrent: 8\n  - name: all\n    token: t-all\n"
        ))
        .unwrap();
        assert!(c.pools[0].serves("gemini-2.5-pro"));
        assert!(!c.pools[0].serves("gemini-2.5-flash"));
        assert!(c.pools[1].serves("anything"));
        // Config order, whatever order the tenant lists them in.
        assert_eq!(c.tenants[0].pools, vec![0, 1]);
        assert_eq!(
            (c.tenants[0].rpm, c.tenants[0].max_concurrent),
            (Some(60), Some(8))
        );
        assert_eq!(c.tenants[1].pools, vec![0, 1]);
        let e = parse(&format!(
            "{TWO_POOLS}tenants:\n  - name: ci\n    token: t-ci\n    pools: [lite]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("tenants[0].pools: no pool is named \"lite\""),
            "{e}"
        );
        let e = parse(&format!(
            "{TWO_POOLS}tenants:\n  - name: ci\n    token: t\n    rpm: 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("tenants[0].rpm"), "{e}");
    }

    #[test]
    fn admin_token_comes_from_env_or_file_never_inline() {
        let env = |name: &str| (name == "ADM").then(|| "admin-token-0123456789".to_string());
        let yaml = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token_env: ADM\n");
        let c = Config::parse(&yaml, Path::new("."), &env).unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.token_sha256, sha256(b"admin-token-0123456789"));
        assert_eq!(admin.key_check_interval, Duration::from_secs(1800));

        let inline = format!(
            "{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token: inline-secret-value-123\n"
        );
        let e = parse(&inline).unwrap_err().to_string();
        assert!(
            e.contains("admin.token: the admin token may not be written"),
            "{e}"
        );
        assert!(!e.contains("inline-secret-value-123"), "{e}");

        let unset = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:9090\n  token_env: NOPE\n");
        let e = parse(&unset).unwrap_err().to_string();
        assert!(e.contains("NOPE is not set"), "{e}");

        let same = format!("{MINIMAL}admin:\n  listen: 127.0.0.1:8080\n  token_env: ADM\n");
        let e = Config::parse(&same, Path::new("."), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("must differ from listen"), "{e}");
    }

    #[test]
    fn a_bad_tls_file_is_a_config_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        for (cert, key) in [
            ("missing.pem".to_string(), "missing.key".to_string()),
            (junk.display().to_string(), junk.display().to_string()),
        ] {
            let yaml = format!("{MINIMAL}tls:\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n");
            let e = Config::parse(&yaml, dir.path(), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("tls: "), "{e}");
        }
    }
}
