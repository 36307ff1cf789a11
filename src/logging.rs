//! The log: `RUST_LOG` as usual, with two rules that no setting can loosen.
//!
//! - Other crates log at `info` at most, whatever `RUST_LOG` says. At `debug` Pingora prints the
//!   raw header of a malformed request (a tenant's token with it) and at `trace` the headers it
//!   sends upstream (the pool key); keygate's own lines, at every level, name keys by
//!   fingerprint only.
//! - An ERROR line means an operator has to act. The errors Pingora logs for things a client or
//!   the network did (a header that never finished, a failed TLS handshake, a pooled upstream
//!   connection that went stale) are logged at `debug` instead, which the first rule drops.
//!
//! Values a client controls (paths, model names) go into log lines through [`printable`], so a
//! newline cannot start a forged line.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::borrow::Cow;
use std::io::Write;

/// Pingora errors that are about a client or a benign race, not the operator's setup.
const NOT_ERRORS: [&str; 7] = [
    "failed to acquire reusable stream",
    "Downstream handshake error",
    "Downstream handshake timeout",
    "while reading request headers",
    "H2 handshake error",
    "failed to send error response to downstream",
    "Prematurely before response",
];

/// Installs the logger; `RUST_LOG` (default `info`) sets the levels within the rules above.
pub fn init() {
    // Built without env_logger's colour feature, and with a plain line of our own: no check for
    // a terminal, no escape codes written and stripped again (BENCHMARKS.md: 3,500 instructions
    // and one system call an access line).
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(plain_line)
        .build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Capped { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// env_logger's default line: `[2026-11-30T03:44:03Z INFO  target] message`.
fn plain_line(buf: &mut env_logger::fmt::Formatter, record: &Record) -> std::io::Result<()> {
    let time = buf.timestamp_seconds();
    match record.target() {
        "" => writeln!(buf, "[{time} {:<5}] {}", record.level(), record.args()),
        target => writeln!(
            buf,
            "[{time} {:<5} {target}] {}",
            record.level(),
            record.args()
        ),
    }
}

/// env_logger behind keygate's rules.
struct Capped {
    inner: env_logger::Logger,
}

/// Whether a target is keygate's own (`keygate`, `keygate::access`...).
fn is_own(target: &str) -> bool {
    target == "keygate" || target.starts_with("keygate::")
}

impl Log for Capped {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= cap(metadata.target()) && self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if record.level() == Level::Error && !is_own(record.target()) {
            let text = record.args().to_string();
            if NOT_ERRORS.iter().any(|n| text.contains(n)) {
                return; // logged at debug, which the cap drops
            }
        }
        self.inner.log(record);
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The most detailed level a target may log at.
pub fn cap(target: &str) -> LevelFilter {
    if is_own(target) {
        LevelFilter::Trace
    } else {
        LevelFilter::Info
    }
}

/// `text` fit for one log line: control characters, `"` and `\` escaped (`\n`, `\"`, `\u{7}`).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_values_cannot_break_a_line() {
        assert!(matches!(printable("gemini-2.5-flash"), Cow::Borrowed(_)));
        assert_eq!(
            printable("a\nINFO forged\r\t\"q\"\\\u{7}é"),
            "a\\nINFO forged\\r\\t\\\"q\\\"\\\\\\u{7}é"
        );
    }

    #[test]
    fn other_crates_are_capped_at_info() {
        assert_eq!(cap("keygate::access"), LevelFilter::Trace);
        assert_eq!(cap("keygate"), LevelFilter::Trace);
        assert_eq!(cap("pingora_core::protocols"), LevelFilter::Info);
        assert_eq!(cap("keygatex"), LevelFilter::Info);
        let capped = Capped {
            inner: env_logger::Builder::new()
                .filter_level(LevelFilter::Trace)
                .build(),
        };
        let meta = |target, level| Metadata::builder().target(target).level(level).build();
        assert!(capped.enabled(&meta("keygate::proxy", Level::Trace)));
        assert!(!capped.enabled(&meta("pingora_proxy", Level::Debug)));
        assert!(!capped.enabled(&meta("h2::codec", Level::Trace)));
        assert!(capped.enabled(&meta("pingora_core", Level::Warn)));
    }
}
