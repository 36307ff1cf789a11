//! The configuration file: its YAML format (serde types, `deny_unknown_fields`) kept apart from
//! the validated runtime types the gateway runs on.
//!
//! Loading never panics and never echoes a key or a token: every error message goes through
//! [`redact`] before it reaches the user.

mod aliases;
mod cache;
pub mod endpoint;
mod file;
mod keys;
mod redis;
mod validate;

use crate::secret::Secret;
pub use cache::CacheConfig;
use endpoint::redacted_url;
pub use endpoint::{parse_upstream, ProxyConfig, ProxyKind};
pub(crate) use keys::quotes_a_key;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Gemini's own request size limit: the default for `max_body_bytes`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

/// Default for `client_limits.max_buffered_body_bytes`: request bodies held at once, all
/// requests together (a dozen bodies of the largest size).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 256 * 1024 * 1024;

/// Longest `client_limits.header_timeout_seconds` accepted.
pub const MAX_HEADER_TIMEOUT_SECONDS: u64 = 30;

/// How long after its last request a tenant counts as active on a fair-share pool, unless
/// `fair_share_active_seconds` says otherwise: Google's quotas are per minute.
pub const DEFAULT_FAIR_SHARE_ACTIVE: Duration = Duration::from_secs(60);

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
    /// The response cache, if turned on (`cache:`).
    pub cache: Option<CacheConfig>,
    /// Names clients may send for models (`gemini-pro-chat`), each with the model it stands for
    /// (`gemini-2.5-pro`), both without `models/`: resolved before routing.
    pub model_aliases: BTreeMap<String, String>,
    /// Where several instances share their state, if anywhere.
    pub redis: Option<RedisConfig>,
}

/// The `redis:` section: where several instances share their state.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `rediss://`: TLS to Redis.
    pub tls: bool,
    /// Its host name or address.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database number.
    pub db: i64,
    /// The ACL user, if any.
    pub username: Option<String>,
    /// The password, from the environment.
    pub password: Option<Secret>,
    /// CA bundle to verify a `rediss://` server with instead of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// What every key keygate writes starts with.
    pub key_prefix: String,
    /// The longest one Redis call may take.
    pub timeout: Duration,
}

impl RedisConfig {
    /// `redis[s]://host:port/db`, for logs: no credentials.
    pub fn display_url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}/{}", self.port, self.db)
    }
}

/// Request headers a browser may send by default (`cors.allowed_headers`): what the Gemini and OpenAI SDKs send from a browser.
pub const DEFAULT_CORS_HEADERS: [&str; 21] = [
    "x-goog-api-key",
    "authorization",
    "content-type",
    "accept",
    "x-access-token",
    "x-goog-api-client",
    "x-goog-user-project",
    "x-goog-upload-protocol",
    "x-goog-upload-command",
    "x-goog-upload-header-content-length",
    "x-goog-upload-header-content-type",
    "x-goog-upload-offset",
    "x-goog-upload-file-name",
    "x-stainless-arch",
    "x-stainless-lang",
    "x-stainless-os",
    "x-stainless-package-version",
    "x-stainless-retry-count",
    "x-stainless-runtime",
    "x-stainless-runtime-version",
    "x-stainless-timeout",
];

/// Where and how alerts are sent.
#[derive(Clone, PartialEq, Eq)]
pub struct AlertConfig {
    /// The webhook: `http(s)://host[:port]/path` (a query is allowed).
    pub url: String,
    /// Least time between two sends of one distinct event (kind, pool, key or model).
    pub min_interval: Duration,
    /// Retries after the first try, on connect errors, timeouts, 5xx, 408 and 429.
    pub retries: u32,
    /// Limit on one try: resolving, connecting, sending and reading the answer's header.
    pub timeout: Duration,
}

impl fmt::Debug for AlertConfig {
    /// Shows the scheme and host only: the path of a webhook URL is often a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertConfig")
            .field("url", &redacted_url(&self.url))
            .field("min_interval", &self.min_interval)
            .field("retries", &self.retries)
            .field("timeout", &self.timeout)
            .finish()
    }
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
    /// Certificate and private key files (PEM) when the admin listener speaks TLS, as the
    /// client listener's `tls:`; the dashboard then needs no SSH tunnel.
    pub tls: Option<(PathBuf, PathBuf)>,
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
    /// What `keys_env_prefix` found, if the pool has one.
    pub key_variables: Option<KeyVariables>,
    /// CA bundle to verify the upstream with instead of the system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Model globs this pool serves; empty means every model.
    pub models: Vec<String>,
    /// Outbound proxy its requests go through, if any.
    pub proxy: Option<ProxyConfig>,
    /// How often one request may test a monthly spend cap (a project's or its billing
    /// account's) before the month turns.
    pub cap_probe: Duration,
    /// Fair share between tenants, if turned on: how long after its last request a tenant
    /// still counts as active (projects are kept only for active tenants).
    pub fair_share: Option<Duration>,
    /// Whether tenants share cached answers on this pool (`cache_shared_across_tenants`);
    /// otherwise each tenant has entries of its own.
    pub cache_shared_across_tenants: bool,
}

impl PoolConfig {
    /// Whether this pool serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|g| glob_match(g, model))
    }
}

/// What a pool's `keys_env_prefix` found: counts only, for `--check` (never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVariables {
    /// The prefix (`GOOGLE_AI_STUDIO_KEY_CHAT`).
    pub prefix: String,
    /// Variables set: the bare one and the numbered ones.
    pub variables: usize,
    /// Keys read from them (before duplicates were dropped).
    pub keys: usize,
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

/// A parsed `http(s)://host[:port][/base/path]` upstream, with the headers sent to it.
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
    /// The path the upstream lives under (a relay such as Cloudflare's AI Gateway:
    /// `/v1/ACCOUNT/GATEWAY/google-ai-studio`), without a trailing slash; empty for Google
    /// itself. Every outbound path is appended to it.
    pub base_path: String,
    /// Extra headers sent with every request to this upstream (`upstream_headers`), lower-case
    /// names; the values come from the environment and never print.
    pub headers: Vec<(String, Secret)>,
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

    /// `scheme://host[:port]/…` (the base path, which may name an account, left out): how
    /// keygate's own answers name the upstream.
    pub fn label(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let tail = if self.base_path.is_empty() {
            ""
        } else {
            "/…"
        };
        format!("{scheme}://{}{tail}", self.authority())
    }

    /// Whether the upstream is a relay in front of Google (a base path or headers of its own):
    /// its own refusals (401, 429) are then told apart from Google's.
    pub fn is_relay(&self) -> bool {
        !self.base_path.is_empty() || !self.headers.is_empty()
    }
}

/// One API key and the Google project whose quota it spends.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    /// The key.
    pub secret: Secret,
    /// The project: keys of one project share its quota. Defaults to the key's fingerprint.
    pub project: String,
    /// The billing account above the project, whose monthly spending cap stops all of its
    /// projects. `None`: the project is its own.
    pub billing_account: Option<String>,
    /// The operator's note on the key (where it comes from, whose it is), shown beside it on
    /// the dashboard and in `/admin/pools`. Never the key.
    pub note: Option<String>,
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
        let names: Vec<String> = std::env::vars_os()
            .filter_map(|(name, _)| name.into_string().ok())
            .collect();
        Config::parse_with_names(&text, base, &|name| std::env::var(name).ok(), &names)
    }

    /// Parses and validates YAML text. `base` resolves relative `keys_file` paths; `env` looks
    /// up environment variables (a parameter so tests need not touch the real environment).
    /// `env` has no list of names here: a `keys_env_prefix` finds only its bare variable (see
    /// [`Config::parse_with_names`]).
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Config::parse_with_names(text, base, env, &[])
    }

    /// [`Config::parse`], with the names of the environment's variables (`env_names`), among
    /// which `keys_env_prefix` finds its numbered variables.
    pub fn parse_with_names(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
        env_names: &[String],
    ) -> Result<Config, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let file: file::FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
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
        validate::validated(file, base, env, env_names)
    }

    /// One line saying what this configuration serves, without any secret.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self
            .pools
            .iter()
            .map(|p| {
                let projects: HashSet<&str> = p.keys.iter().map(|k| k.project.as_str()).collect();
                let found = match &p.key_variables {
                    Some(v) => format!(
                        "; keys_env_prefix {}: {} keys in {} variables",
                        v.prefix, v.keys, v.variables
                    ),
                    None => String::new(),
                };
                format!(
                    "{} ({} keys in {} projects -> {}{}{found})",
                    p.name,
                    p.keys.len(),
                    projects.len(),
                    p.upstream.authority(),
                    if p.upstream.base_path.is_empty() {
                        ""
                    } else {
                        "/…"
                    }
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
        let aliases = match self.model_aliases.len() {
            0 => String::new(),
            n => format!("; {n} model alias(es)"),
        };
        let state = match &self.state_file {
            Some(p) => format!("; state file {}", p.display()),
            None => String::new(),
        };
        format!(
            "config OK: listen {}, {} pool(s): {}; {}{aliases}{admin}{state}",
            self.listen,
            self.pools.len(),
            pools.join(", "),
            auth
        )
    }
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
mod tests;
