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
use std::cell::RefCell;
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

mod batch;

/// The target of the access lines, one per request.
const ACCESS: &str = "keygate::access";

/// Installs the logger; `RUST_LOG` (default `info`) sets the levels within the rules above.
pub fn init() {
    let inner =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max = inner.filter();
    if log::set_boxed_logger(Box::new(Capped { inner })).is_ok() {
        log::set_max_level(max);
    }
}

/// Writes `record` to stderr as one line, in one write: `[2026-11-30T03:44:03Z INFO  target]
/// message`, env_logger's default line without colours. env_logger only filters: its
/// formatter checked for a terminal and formatted the time anew for every line, and an access
/// line is written for every request (BENCHMARKS.md). Access lines may wait a few
/// milliseconds for a batch ([`batch`]).
fn write_line(record: &Record) {
    thread_local! {
        static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    let write = |line: &mut Vec<u8>| {
        line.clear();
        // The level padded to five, as env_logger writes it.
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        // Piece by piece: `writeln!` with five arguments cost as much as the access line's own
        // fields.
        line.push(b'[');
        stamp(line);
        line.push(b' ');
        line.extend_from_slice(level.as_bytes());
        if !record.target().is_empty() {
            line.push(b' ');
            line.extend_from_slice(record.target().as_bytes());
        }
        line.extend_from_slice(b"] ");
        let _ = match record.args().as_str() {
            Some(text) => line.write_all(text.as_bytes()),
            None => line.write_fmt(*record.args()),
        };
        line.push(b'\n');
        if record.target() == ACCESS && record.level() == Level::Info {
            batch::access(line);
        } else {
            batch::line(line);
        }
        // A rare long line does not keep its memory for the thread's life.
        if line.capacity() > 64 * 1024 {
            *line = Vec::new();
        }
    };
    // A line written while writing one (a `Display` that logs), or while the thread ends,
    // gets a buffer of its own.
    let written = LINE.try_with(|line| match line.try_borrow_mut() {
        Ok(mut line) => write(&mut line),
        Err(_) => write(&mut Vec::new()),
    });
    if written.is_err() {
        write(&mut Vec::new());
    }
}

/// Appends the time of a line, to the second in UTC (`2026-11-30T03:44:03Z`), formatted once a
/// second.
fn stamp(line: &mut Vec<u8>) {
    thread_local! {
        static LAST: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    const FORMAT: &str = "%Y-%m-%dT%H:%M:%SZ";
    let now = chrono::Utc::now();
    let cached = LAST.try_with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return false;
        };
        if last.0 != now.timestamp() {
            *last = (now.timestamp(), now.format(FORMAT).to_string());
        }
        line.extend_from_slice(last.1.as_bytes());
        true
    });
    if !cached.unwrap_or(false) {
        let _ = write!(line, "{}", now.format(FORMAT));
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
        if self.inner.matches(record) {
            write_line(record);
        }
    }

    fn flush(&self) {
        batch::flush();
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
    // ASCII control characters, `"` and `\` are single bytes; other control characters
    // (U+0080..U+009F) start with the byte 0xC2. A text with none of these is fine as it is.
    const SUSPECT: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            table[b] =
                b < 0x20 || b == 0x7f || b == b'"' as usize || b == b'\\' as usize || b == 0xc2;
            b += 1;
        }
        table
    };
    if !text.bytes().any(|b| SUSPECT[usize::from(b)]) {
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
        assert_eq!(printable("del\u{7f} nel\u{85}"), "del\\u{7f} nel\\u{85}");
        assert!(matches!(printable("café ü €"), Cow::Borrowed(_)));
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
