//! The configuration file as written: serde types that mirror the YAML, with its defaults.
//! Unknown fields are errors that name their path; [`super::validate`] turns these into the
//! validated types the gateway runs on.

use super::{DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_BUFFERED_BYTES};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default = "default_listen")]
    pub(super) listen: String,
    #[serde(default)]
    pub(super) allow_unauthenticated: bool,
    pub(super) threads: Option<usize>,
    #[serde(default = "default_max_body")]
    pub(super) max_body_bytes: usize,
    #[serde(default = "default_grace")]
    pub(super) shutdown_grace_seconds: u64,
    #[serde(default)]
    pub(super) timeouts: FileTimeouts,
    #[serde(default)]
    pub(super) retry: FileRetry,
    #[serde(default = "default_upstream_health_check")]
    pub(super) upstream_health_check_seconds: u64,
    pub(super) pools: Vec<FilePool>,
    #[serde(default)]
    pub(super) tenants: Vec<FileTenant>,
    pub(super) admin: Option<FileAdmin>,
    pub(super) state_file: Option<PathBuf>,
    pub(super) cors: Option<FileCors>,
    pub(super) alerts: Option<FileAlerts>,
    #[serde(default = "default_upgrade_sock")]
    pub(super) upgrade_sock: PathBuf,
    pub(super) tls: Option<FileTls>,
    pub(super) public_url: Option<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default)]
    pub(super) client_limits: FileClientLimits,
    pub(super) cache: Option<super::cache::FileCache>,
    #[serde(default)]
    pub(super) model_aliases: BTreeMap<String, String>,
    pub(super) redis: Option<FileRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedis {
    pub(super) url: String,
    pub(super) username: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) tls_ca_file: Option<PathBuf>,
    pub(super) key_prefix: Option<String>,
    pub(super) timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileClientLimits {
    pub(super) header_timeout_seconds: u64,
    pub(super) body_timeout_seconds: u64,
    pub(super) body_min_rate_bytes_per_second: u64,
    pub(super) send_timeout_seconds: u64,
    pub(super) max_connections: Option<usize>,
    pub(super) max_buffered_body_bytes: usize,
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
pub(super) struct FileTls {
    pub(super) cert_file: PathBuf,
    pub(super) key_file: PathBuf,
}

pub(super) fn default_upgrade_sock() -> PathBuf {
    PathBuf::from("/tmp/keygate_upgrade.sock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAlerts {
    pub(super) webhook_url: Option<String>,
    pub(super) webhook_url_env: Option<String>,
    #[serde(default = "default_alert_interval")]
    pub(super) min_interval_seconds: u64,
    #[serde(default = "default_alert_retries")]
    pub(super) retries: u32,
    #[serde(default = "default_alert_timeout")]
    pub(super) timeout_seconds: u64,
}

pub(super) fn default_alert_interval() -> u64 {
    300
}

pub(super) fn default_alert_retries() -> u32 {
    3
}

pub(super) fn default_alert_timeout() -> u64 {
    10
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCors {
    pub(super) allowed_origins: Vec<String>,
    pub(super) allowed_headers: Option<Vec<String>>,
    #[serde(default = "default_cors_max_age")]
    pub(super) max_age_seconds: u64,
}

pub(super) fn default_cors_max_age() -> u64 {
    600
}

pub(super) fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

pub(super) fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

pub(super) fn default_grace() -> u64 {
    5
}

pub(super) fn default_upstream_health_check() -> u64 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileTimeouts {
    pub(super) connect_seconds: u64,
    pub(super) read_seconds: u64,
    pub(super) write_seconds: u64,
    pub(super) idle_seconds: u64,
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
pub(super) struct FileRetry {
    pub(super) transient_retries: u32,
    pub(super) backoff_ms: u64,
    pub(super) max_attempts: u32,
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
pub(super) struct FilePool {
    pub(super) name: String,
    pub(super) upstream: String,
    pub(super) upstream_addresses: Option<Vec<String>>,
    #[serde(default)]
    pub(super) keys: Vec<FileKey>,
    pub(super) keys_env: Option<String>,
    pub(super) keys_env_prefix: Option<String>,
    pub(super) keys_file: Option<PathBuf>,
    pub(super) tls_ca_file: Option<PathBuf>,
    pub(super) models: Option<Vec<String>>,
    pub(super) proxy: Option<String>,
    pub(super) proxy_auth_env: Option<String>,
    pub(super) cap_probe_seconds: Option<u64>,
    #[serde(default)]
    pub(super) fair_share: bool,
    pub(super) fair_share_active_seconds: Option<u64>,
    #[serde(default)]
    pub(super) cache_shared_across_tenants: bool,
    #[serde(default)]
    pub(super) upstream_headers: BTreeMap<String, FileEnvValue>,
}

/// A value that must come from the environment (`{env: VARIABLE}`); anything else is taken only
/// to be refused with a clear message.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FileEnvValue {
    Env(FileEnvRef),
    Other(serde::de::IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileEnvRef {
    pub(super) env: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FileKey {
    Bare(String),
    Full(FileKeyFull),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKeyFull {
    pub(super) key: String,
    pub(super) project: Option<String>,
    pub(super) billing_account: Option<String>,
    pub(super) note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTenant {
    pub(super) name: String,
    pub(super) token: Option<String>,
    pub(super) token_env: Option<String>,
    pub(super) token_sha256: Option<String>,
    pub(super) pools: Option<Vec<String>>,
    pub(super) rpm: Option<u32>,
    pub(super) max_concurrent: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    pub(super) listen: String,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    /// Accepted only to refuse it with a clear message: the admin token never sits in the file.
    pub(super) token: Option<serde::de::IgnoredAny>,
    #[serde(default = "default_key_check")]
    pub(super) key_check_interval_seconds: u64,
    pub(super) tls: Option<FileTls>,
}

pub(super) fn default_key_check() -> u64 {
    // Listing models spends no generation quota, but there is no reason to ask often: a key
    // Google disabled stays disabled for long.
    1800
}
