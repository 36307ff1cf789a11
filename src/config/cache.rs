//! The `cache:` section: how long an answer may be reused and how much memory the in-process
//! cache may take. Without the section nothing is cached.

use super::validate::invalid;
use super::ConfigError;
use serde::Deserialize;
use std::time::Duration;

/// Default `ttl_seconds`.
const DEFAULT_TTL_SECONDS: u64 = 600;
/// Default `max_megabytes`.
const DEFAULT_MAX_MEGABYTES: u64 = 256;
/// Largest `max_megabytes` accepted (1 TiB): a bound that is a typo, not a budget.
const MAX_MEGABYTES: u64 = 1 << 20;
/// Longest `ttl_seconds` accepted (30 days).
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;

/// `cache:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCache {
    #[serde(default = "default_ttl")]
    ttl_seconds: u64,
    #[serde(default = "default_megabytes")]
    max_megabytes: u64,
}

fn default_ttl() -> u64 {
    DEFAULT_TTL_SECONDS
}

fn default_megabytes() -> u64 {
    DEFAULT_MAX_MEGABYTES
}

/// The response cache's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// How long a stored answer may be reused.
    pub ttl: Duration,
    /// Memory the in-process cache may hold, entries and answers still being recorded together.
    pub max_bytes: u64,
}

impl CacheConfig {
    /// The largest single entry: a sixteenth of the budget, so that one answer can never push
    /// out most of the others.
    pub fn max_entry_bytes(&self) -> u64 {
        self.max_bytes / 16
    }
}

impl FileCache {
    pub(super) fn validated(self) -> Result<CacheConfig, ConfigError> {
        if !(1..=MAX_TTL_SECONDS).contains(&self.ttl_seconds) {
            return Err(invalid(format!(
                "cache.ttl_seconds: must be 1 to {MAX_TTL_SECONDS} (leave the cache: section out to cache nothing)"
            )));
        }
        if !(1..=MAX_MEGABYTES).contains(&self.max_megabytes) {
            return Err(invalid(format!(
                "cache.max_megabytes: must be 1 to {MAX_MEGABYTES} (leave the cache: section out to cache nothing)"
            )));
        }
        Ok(CacheConfig {
            ttl: Duration::from_secs(self.ttl_seconds),
            max_bytes: self.max_megabytes << 20,
        })
    }
}
