//! The `redis:` section: where several keygate instances share their state.

use super::file::FileRedis;
use super::validate::invalid;
use super::{ConfigError, RedisConfig};
use crate::secret::Secret;
use std::path::Path;
use std::time::Duration;

/// The longest a Redis call may take unless the section says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// The longest `timeout_ms` allowed: a request never waits on Redis longer than this.
const MAX_TIMEOUT_MS: u64 = 2000;

/// Validates the `redis:` section. The password comes from the environment only, and a URL
/// carrying credentials is refused (it would end up in logs and process listings).
pub(super) fn validate_redis(
    file: FileRedis,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<RedisConfig, ConfigError> {
    let (tls, rest) = match file.url.split_once("://") {
        Some(("redis", rest)) => (false, rest),
        Some(("rediss", rest)) => (true, rest),
        _ => {
            return Err(invalid(
                "redis.url: expected redis://host[:port][/db] or rediss://host[:port][/db]",
            ))
        }
    };
    if rest.contains('@') {
        return Err(invalid(
            "redis.url: credentials in the URL are refused; use redis.username and redis.password_env",
        ));
    }
    let (authority, db) = match rest.split_once('/') {
        Some((a, "")) => (a, 0),
        Some((a, db)) => (
            a,
            db.parse::<i64>()
                .ok()
                .filter(|d| (0..=15_000).contains(d))
                .ok_or_else(|| invalid("redis.url: the database must be a number, e.g. /0"))?,
        ),
        None => (rest, 0),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| invalid("redis.url: bad port"))?,
        ),
        _ => (authority, 6379),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '?', '#', ' ']) {
        return Err(invalid("redis.url: bad host"));
    }
    let password = match &file.password_env {
        Some(var) => Some(Secret::new(env(var).ok_or_else(|| {
            invalid(format!(
                "redis.password_env: environment variable {var} is not set"
            ))
        })?)),
        None => None,
    };
    if file.tls_ca_file.is_some() && !tls {
        return Err(invalid("redis.tls_ca_file: only with a rediss:// URL"));
    }
    let key_prefix = file.key_prefix.unwrap_or_else(|| "keygate:".into());
    if key_prefix.is_empty() || key_prefix.len() > 64 || key_prefix.contains(['*', '?', '[', ' ']) {
        return Err(invalid(
            "redis.key_prefix: 1 to 64 characters, without spaces or the glob characters * ? [",
        ));
    }
    let timeout = match file.timeout_ms {
        None => DEFAULT_TIMEOUT,
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            return Err(invalid(format!(
                "redis.timeout_ms: must be 1 to {MAX_TIMEOUT_MS}"
            )))
        }
    };
    Ok(RedisConfig {
        tls,
        host: host.to_string(),
        port,
        db,
        username: file.username,
        password,
        tls_ca_file: file
            .tls_ca_file
            .map(|p| if p.is_absolute() { p } else { base.join(p) }),
        key_prefix,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use std::path::Path;
    use std::time::Duration;

    const MINIMAL: &str =
        "pools:\n  - name: main\n    upstream: https://example.com\n    keys: [k1]\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("."), &|_| None)
    }

    #[test]
    fn the_redis_section_is_checked() {
        let with = |section: &str| format!("{MINIMAL}redis:\n{section}");
        let ok = Config::parse(
            &with("  url: \"rediss://redis.internal:6380/2\"\n  username: keygate\n  password_env: RP\n  key_prefix: \"team-a:\"\n"),
            Path::new("/etc/keygate"),
            &|v| (v == "RP").then(|| "made-up-redis-password".into()),
        )
        .unwrap();
        let r = ok.redis.unwrap();
        assert_eq!(r.display_url(), "rediss://redis.internal:6380/2");
        assert_eq!(
            (r.username.as_deref(), r.key_prefix.as_str()),
            (Some("keygate"), "team-a:")
        );
        assert_eq!(r.timeout, Duration::from_millis(100));
        let d = parse(&with("  url: \"redis://127.0.0.1\"\n"))
            .unwrap()
            .redis
            .unwrap();
        assert_eq!((d.port, d.db, d.key_prefix.as_str()), (6379, 0, "keygate:"));
        assert!(
            parse(MINIMAL).unwrap().redis.is_none(),
            "no section: no sharing"
        );
        for (section, why) in [
            (
                "  url: \"redis://user:made-up-pass@h:6379\"\n",
                "credentials in the URL",
            ),
            ("  url: \"http://h\"\n", "expected redis://"),
            ("  url: \"redis://h:0\"\n", "bad port"),
            ("  url: \"redis://h/x\"\n", "database"),
            (
                "  url: \"redis://h\"\n  password_env: NOPE\n",
                "NOPE is not set",
            ),
            ("  url: \"redis://h\"\n  tls_ca_file: ca.pem\n", "rediss://"),
            ("  url: \"redis://h\"\n  key_prefix: \"a*\"\n", "glob"),
            ("  url: \"redis://h\"\n  timeout_ms: 5000\n", "timeout_ms"),
            ("  url: \"redis://h\"\n  colour: blue\n", "colour"),
        ] {
            let e = parse(&with(section)).unwrap_err().to_string();
            assert!(e.contains(why), "{section}: {e}");
            assert!(!e.contains("made-up-pass"), "{e}");
        }
    }
}
