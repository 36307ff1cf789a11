//! Where log lines go: stderr, one write per line, except access lines while keygate is busy,
//! which leave in batches. A write per request was the largest system-call cost keygate added
//! to Pingora's own (BENCHMARKS.md); an idle gateway still writes each line as it happens.
//!
//! The batch is only ever held for an append or a swap: writing happens outside it, so a
//! request thread appending its line never waits for a write to stderr (at saturation it did,
//! and the waits cost more CPU than the lines). Lines keep their order: whoever writes holds
//! stderr's lock first, then takes the batch.

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
    let idle = batch.written.is_none_or(|at| at.elapsed() >= IDLE);
    let first = batch.lines.is_empty();
    batch.lines.extend_from_slice(line);
    let wait = !(first && idle) && batch.lines.len() < FULL && flusher_runs();
    drop(batch);
    if !wait {
        write_waiting(&[]);
    } else if first {
        // Woken once the batch is let go: it would otherwise wake only to wait for it.
        WAITING.notify_one();
    }
}

/// Whether the flusher thread runs (started on the first call).
fn flusher_runs() -> bool {
    *FLUSHER.get_or_init(|| {
        std::thread::Builder::new()
            .name("keygate-log".into())
            .spawn(write_batches)
            .is_ok()
    })
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
    write_waiting(line);
}

/// Writes the access lines that wait.
pub(super) fn flush() {
    write_waiting(&[]);
}

/// Writes the access lines that wait, then `then`.
fn write_waiting(then: &[u8]) {
    let mut stderr = std::io::stderr().lock();
    let lines = {
        let mut batch = lock();
        if batch.lines.is_empty() && then.is_empty() {
            return;
        }
        batch.written = Some(Instant::now());
        std::mem::take(&mut batch.lines)
    };
    let _ = stderr.write_all(&lines);
    let _ = stderr.write_all(then);
    drop(stderr);
    // The buffer goes back for the next batch, unless a rare burst made it large.
    if lines.capacity() <= 4 * FULL {
        let mut batch = lock();
        if batch.lines.is_empty() {
            let mut lines = lines;
            lines.clear();
            batch.lines = lines;
        }
    }
}

fn lock() -> MutexGuard<'static, Batch> {
    BATCH.lock().unwrap_or_else(PoisonError::into_inner)
}
