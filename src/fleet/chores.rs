//! Small writes made in the background, in order: slots given back, owners and uploads written
//! through. A request queues them and never waits; one that Redis does not take in time is
//! dropped (a slot's lease then ends on its own; an owner another instance misses is looked
//! for again and, failing that, found as it would be without Redis).

use super::Fleet;
use tokio::sync::mpsc;

/// One background write.
#[derive(Debug)]
pub(super) enum Chore {
    /// Gives back the slot `member` of the slots entry `name`.
    Release { name: String, member: String },
    /// Sets `name` to `value` for `ttl_ms`; unless `replace`, only when it is missing.
    Put {
        name: String,
        value: String,
        ttl_ms: u64,
        replace: bool,
    },
    /// Deletes `name`.
    Delete { name: String },
}

impl Fleet {
    /// Queues `chore`; dropped when the queue is full.
    pub(super) fn chore(&self, chore: Chore) {
        let _ = self.chores.try_send(chore);
    }
}

/// Carries out the chores queued, each within the configured timeout.
pub(super) async fn run(fleet: &Fleet, mut queued: mpsc::Receiver<Chore>) {
    while let Some(chore) = queued.recv().await {
        if !fleet.is_up_now() {
            continue;
        }
        let Some(mut c) = fleet.lock().clone() else {
            continue;
        };
        let cmd = match &chore {
            Chore::Release { name, member } => {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(name).arg(member);
                cmd
            }
            Chore::Put {
                name,
                value,
                ttl_ms,
                replace,
            } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(name).arg(value).arg("PX").arg((*ttl_ms).max(1));
                if !replace {
                    cmd.arg("NX");
                }
                cmd
            }
            Chore::Delete { name } => {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(name);
                cmd
            }
        };
        let done = tokio::time::timeout(
            fleet.config.timeout,
            cmd.query_async::<redis::Value>(&mut c),
        );
        if done.await.is_err() {
            log::debug!("redis: a background write timed out; dropped");
        }
    }
}
