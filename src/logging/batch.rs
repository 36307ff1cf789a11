//! Where log lines go: stderr, one write per line, except access lines while keygate is busy,
//! which leave in batches. A write per request was the largest system-call cost keygate added
//! to Pingora's own (BENCHMARKS.md); an idle gateway still writes each line as it happens.

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The longest an access line waits for its batch.
const WAIT: Duration = Duration::from_millis(5);
/// An access line is written at once when nothing was written for this long.
const IDLE: Duration = Duration::from_millis(1);
/// A batch this large is written at once.
const FULL: usize = 16 * 1024;

/// Access lines not written yet, and when stderr was last written.
struct Batch {
    lines: Vec<u8>,
    written: Option<Instant>,
}

static BATCH: Mutex<Batch> = Mutex::new(Batch {
    lines: Vec::new(),
    written: None,
});

/// Wakes the thread that writes waiting lines: it sleeps until a line waits, then writes
/// the batch [`WAIT`] later. An idle gateway never wakes it.
static WAITING: Condvar = Condvar::new();

/// Whether that thread runs (started with the first line that waits).
static FLUSHER: OnceLock<bool> = OnceLock::new();

/// Writes an access line: at once when keygate was idle, else with its batch.
pub(super) fn access(line: &[u8]) {
    let mut batch = lock();
    let now = Instant::now();
    let idle = batch
        .written
        .is_none_or(|at| now.duration_since(at) >= IDLE);
    if batch.lines.is_empty() && idle {
        write(line);
        batch.written = Some(now);
        return;
    }
    let first = batch.lines.is_empty();
    batch.lines.extend_from_slice(line);
    let flusher = *FLUSHER.get_or_init(|| {
        std::thread::Builder::new()
            .name("keygate-log".into())
            .spawn(write_batches)
            .is_ok()
    });
    if batch.lines.len() >= FULL || !flusher {
        batch.write_out(now);
    } else if first {
        WAITING.notify_one();
    }
}

/// The flusher thread: waits for a line to wait, gives it [`WAIT`] to gather others, writes.
fn write_batches() {
    loop {
        let mut batch = lock();
        while batch.lines.is_empty() {
            batch = WAITING.wait(batch).unwrap_or_else(PoisonError::into_inner);
        }
        drop(batch);
        std::thread::sleep(WAIT);
        flush();
    }
}

/// Writes any other line at once, after the access lines that came before it.
pub(super) fn line(line: &[u8]) {
    let mut batch = lock();
    let now = Instant::now();
    batch.write_out(now);
    write(line);
    batch.written = Some(now);
}

/// Writes the access lines that wait.
pub(super) fn flush() {
    lock().write_out(Instant::now());
}

fn lock() -> MutexGuard<'static, Batch> {
    BATCH.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Batch {
    fn write_out(&mut self, now: Instant) {
        if self.lines.is_empty() {
            return;
        }
        write(&self.lines);
        self.lines.clear();
        if self.lines.capacity() > 4 * FULL {
            self.lines = Vec::new();
        }
        self.written = Some(now);
    }
}

fn write(bytes: &[u8]) {
    let _ = std::io::stderr().lock().write_all(bytes);
}
