//! From the file as written to the validated configuration: every value checked, every error
//! naming the field and what would be right, never a secret.

use super::endpoint::{
    parse_pinned_addresses, parse_upstream, parse_webhook_url, upstream_headers,
};
use super::file::*;
use super::*;
use super::{aliases, keys};
use crate::secret::{parse_sha256_hex, sha256, Secret};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

pub(super) fn validated(
    file: FileConfig,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    env_names: &[String],
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
        if pool.cache_shared_across_tenants && file.cache.is_none() {
            return Err(invalid(format!(
                "{ctx}.cache_shared_across_tenants: set without a cache: section"
            )));
        }
        if pool.name.trim().is_empty() {
            return Err(invalid(format!("{ctx}.name: must not be empty")));
        }
        if !names.insert(pool.name.clone()) {
            return Err(invalid(format!(
                "{ctx}.name: pool {:?} is defined twice",
                pool.name
            )));
        }
        pools.push(validate_pool(pool, &ctx, base, env, env_names)?);
    }
    keys::notes_quote_no_key(&pools)?;

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

    let model_aliases = aliases::validated(&file.model_aliases, &pools)?;

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
        redis: file
            .redis
            .map(|r| super::redis::validate_redis(r, base, env))
            .transpose()?,
        model_aliases,
        cache: file.cache.map(|c| c.validated()).transpose()?,
    })
}

/// `https://host[:port][/prefix]`, without credentials, query or fragment; returned without a
/// trailing slash.
pub(super) fn validate_public_url(url: &str) -> Result<String, ConfigError> {
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
pub(super) fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not an address or a network like 10.0.0.0/8"))
}

pub(super) fn validate_client_limits(l: &FileClientLimits) -> Result<ClientLimits, ConfigError> {
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
pub(super) fn validate_tls(tls: FileTls, base: &Path) -> Result<(PathBuf, PathBuf), ConfigError> {
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

pub(super) fn validate_alerts(
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
    parse_webhook_url(&config.url).map_err(|e| invalid(format!("alerts.webhook_url: {e}")))?;
    Ok(config)
}

pub(super) fn validate_cors(cors: FileCors) -> Result<CorsConfig, ConfigError> {
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
        allowed_headers: cors
            .allowed_headers
            .unwrap_or_else(|| DEFAULT_CORS_HEADERS.iter().map(|h| h.to_string()).collect()),
        max_age_seconds: cors.max_age_seconds,
    })
}

pub(super) fn validate_admin(
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
    let tls = match admin.tls {
        Some(t) => Some(validate_tls(t, base).map_err(|e| match e {
            ConfigError::Invalid(why) => invalid(format!("admin.{why}")),
            other => other,
        })?),
        None => None,
    };
    Ok(AdminConfig {
        listen: addr,
        token_sha256: sha256(token.as_bytes()),
        key_check_interval: Duration::from_secs(admin.key_check_interval_seconds),
        tls,
    })
}

pub(super) fn validate_pool(
    mut pool: FilePool,
    ctx: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    names: &[String],
) -> Result<PoolConfig, ConfigError> {
    let mut upstream =
        parse_upstream(&pool.upstream).map_err(|why| invalid(format!("{ctx}.upstream: {why}")))?;
    upstream.headers = upstream_headers(&pool.upstream_headers, ctx, env)?;
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

    let (keys, key_variables) = keys::pool_keys(&mut pool, ctx, base, env, names)?;
    let fair_share = match (pool.fair_share, pool.fair_share_active_seconds) {
        (false, Some(_)) => {
            return Err(invalid(format!(
                "{ctx}.fair_share_active_seconds: set without fair_share: true"
            )))
        }
        (false, None) => None,
        (true, None) => Some(DEFAULT_FAIR_SHARE_ACTIVE),
        (true, Some(secs @ 1..=3600)) => Some(Duration::from_secs(secs)),
        (true, Some(_)) => {
            return Err(invalid(format!(
                "{ctx}.fair_share_active_seconds: must be 1 to 3600"
            )))
        }
    };
    Ok(PoolConfig {
        name: pool.name,
        upstream,
        keys,
        key_variables,
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
        cap_probe: match pool.cap_probe_seconds {
            Some(0) => {
                return Err(invalid(format!(
                    "{ctx}.cap_probe_seconds: must be at least 1"
                )))
            }
            Some(seconds) => Duration::from_secs(seconds),
            None => DEFAULT_CAP_PROBE,
        },
        fair_share,
        cache_shared_across_tenants: pool.cache_shared_across_tenants,
    })
}

/// How often a monthly spend cap is probed unless a pool says otherwise.
const DEFAULT_CAP_PROBE: Duration = Duration::from_secs(3600);

pub(super) fn tenant_hash(
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
