//! Connections to Redis on the request's own thread, for tenant admission.
//!
//! The fleet's shared connection runs its driver task on the fleet service's runtime, so each
//! admission through it wakes a thread of another runtime twice (the command out, the answer
//! back): most of a limited tenant's cost under load. Each worker thread that admits tenants
//! gets its own multiplexed connection instead, made in the background on the thread's runtime
//! (its driver then runs beside the requests that use it). Until it is there, or when it
//! breaks, admission goes through the shared connection; a broken one is dropped and made anew
//! once Redis answers again.

use super::Fleet;
use redis::aio::MultiplexedConnection;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// How long a thread waits for its connection before asking for another.
const MAKING: Duration = Duration::from_secs(2);

/// A thread's connection: being made (since), or made for one link generation.
enum Local {
    Making(Instant),
    Ready(u64, MultiplexedConnection),
}

thread_local! {
    /// This thread's connection, by fleet (its address: one per process in practice).
    static LOCAL: RefCell<HashMap<usize, Local>> = RefCell::new(HashMap::new());
}

/// Connections made in the background, waiting for their thread to take them.
#[derive(Default)]
pub(super) struct Made(std::sync::Mutex<HashMap<ThreadId, (u64, MultiplexedConnection)>>);

impl Made {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ThreadId, (u64, MultiplexedConnection)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Fleet {
    /// This thread's connection when it has one for the current link; otherwise `None`, and
    /// one is made in the background on this thread's runtime.
    pub(super) fn local_connection(self: &Arc<Self>) -> Option<MultiplexedConnection> {
        let me = Arc::as_ptr(self) as usize;
        let generation = self.link_generation.load(Relaxed);
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            match local.get(&me) {
                Some(Local::Ready(g, c)) if *g == generation => return Some(c.clone()),
                Some(Local::Making(since)) => {
                    let since = *since;
                    let made = self.made.lock().remove(&std::thread::current().id());
                    if let Some((g, c)) = made.filter(|(g, _)| *g == generation) {
                        local.insert(me, Local::Ready(g, c.clone()));
                        return Some(c);
                    }
                    if since.elapsed() < MAKING {
                        return None;
                    }
                }
                _ => {}
            }
            let runtime = tokio::runtime::Handle::try_current().ok()?;
            local.insert(me, Local::Making(Instant::now()));
            let fleet = self.clone();
            let thread = std::thread::current().id();
            runtime.spawn(async move {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(super::RECONNECT)
                    .set_response_timeout(fleet.config.timeout);
                let made = fleet
                    .client
                    .get_multiplexed_async_connection_with_config(&config);
                if let Ok(Ok(c)) = tokio::time::timeout(MAKING, made).await {
                    fleet.made.lock().insert(thread, (generation, c));
                }
            });
            None
        })
    }

    /// The link broke: every thread's connection is dropped and made anew.
    pub(super) fn new_link(&self) {
        self.link_generation.fetch_add(1, Relaxed);
        self.made.lock().clear();
    }
}
