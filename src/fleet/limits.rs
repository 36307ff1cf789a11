//! Tenant limits counted across the fleet, in Redis.
//!
//! - rpm: GCRA in one Lua script that reads Redis's own clock (`TIME`), so no two instances'
//!   clocks need to agree: the entry holds the tenant's theoretical arrival time, in
//!   microseconds of Redis's clock, with a TTL of when it stops mattering.
//! - max_concurrent: slots are leases in a sorted set scored by their expiry in Redis's clock.
//!   Taking one drops the expired ones and adds a lease when fewer than the limit are left;
//!   giving one back removes it. A lease lasts [`LEASE`] and the instance holding it renews it
//!   every [`RENEW`] while the request is in flight (streams and Live sessions included), so a
//!   crashed instance's slots come back within [`LEASE`].
//!
//! Both checks are one script (one round trip): a request of a tenant with limits asks it once
//! (twice when the response cache sits between its slot and its rate), and gives its slot back
//! with one more command, sent in the background. Entries are named by a hash of the tenant's
//! name; no token is ever in Redis.

use super::chores::Chore;
use super::store::h;
use super::Fleet;
use crate::tenants::shared::{Lease, SharedLimits, Verdict};
use crate::tenants::{Refusal, Tenant};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// How long a concurrency slot is held without renewal: what a crashed instance holds at most.
pub(super) const LEASE: Duration = Duration::from_secs(30);

/// How often the leases of requests still in flight are renewed.
pub(super) const RENEW: Duration = Duration::from_secs(10);

/// Admission: `KEYS[1]` the rate entry, `KEYS[2]` the slots; `ARGV` the GCRA interval and
/// tolerance in µs (interval 0: no rate check), the slot limit (0: no slot), the lease's member
/// and its length in ms. Returns `{0, 0}` admitted, `{1, 0}` no slot, `{2, wait_µs}` over rpm.
/// A refusal changes nothing.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[3])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
  if redis.call('ZCARD', KEYS[2]) >= limit then
    return {1, 0}
  end
end
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '') or 0
  if tat > now + 61000000 then
    tat = 0
  end
  local start = math.max(tat, now)
  local ahead = start - now
  local tolerance = tonumber(ARGV[2])
  if ahead > tolerance then
    return {2, ahead - tolerance}
  end
  local next = start + interval
  redis.call('SET', KEYS[1], string.format('%.0f', next), 'PX', math.floor((next - now) / 1000) + 1000)
end
if limit > 0 then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], string.format('%.0f', now + lease * 1000), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], lease * 2)
end
return {0, 0}
";

/// [`ADMIT`], hashed once: redis-rs sends `EVALSHA`, and `EVAL` when Redis does not have it.
static ADMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ADMIT));

/// Renewal: the members in `ARGV[2..]` of the slots `KEYS[1]` that are still there get a lease
/// of `ARGV[1]` ms from now (Redis's clock); a lease already given back is not taken again.
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = tonumber(ARGV[1])
local expiry = string.format('%.0f', now + lease * 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 0
";

/// The entries of tenant `name` under `prefix`: its rate and its slots.
fn names(prefix: &str, name: &str) -> (String, String) {
    let stem = format!("{prefix}t:{}", h(name));
    (format!("{stem}:rate"), format!("{stem}:slots"))
}

/// The slots this instance holds in Redis, to renew while their requests run.
#[derive(Default)]
pub(super) struct Held {
    next: std::sync::atomic::AtomicU64,
    /// Lease number → (slots entry, member).
    leases: std::sync::Mutex<HashMap<u64, (String, String)>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (String, String)>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A slot held in Redis; dropping it gives it back (in the background: a request never waits
/// on Redis to end).
struct HeldLease {
    fleet: Arc<Fleet>,
    number: u64,
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let held = self.fleet.held.lock().remove(&self.number);
        let Some((name, member)) = held else {
            return;
        };
        // On this thread's own connection when it has one (no other thread woken), else in
        // the background writer's queue; full queue: the lease ends on its own within LEASE.
        let here = tokio::runtime::Handle::try_current().ok();
        match (self.fleet.local_connection(), here) {
            (Some(mut c), Some(runtime)) => {
                let timeout = self.fleet.config.timeout;
                runtime.spawn(async move {
                    let mut zrem = redis::cmd("ZREM");
                    zrem.arg(name).arg(member);
                    let gone = zrem.query_async::<redis::Value>(&mut c);
                    let _ = tokio::time::timeout(timeout, gone).await;
                });
            }
            _ => self.fleet.chore(Chore::Release { name, member }),
        }
    }
}

/// The share of `SharedLimits` a request of `tenant` asks for: rpm's interval and tolerance
/// (µs), the slot limit.
fn asked(tenant: &Tenant, rate: bool, slot: bool) -> (u64, u64, u32) {
    let (interval, tolerance) = match tenant.rpm.filter(|_| rate) {
        Some(rpm) => {
            let rpm = u64::from(rpm.max(1));
            let interval = 60_000_000 / rpm;
            (interval, interval * (rpm - 1))
        }
        None => (0, 0),
    };
    let limit = tenant.max_concurrent.filter(|_| slot).unwrap_or(0);
    (interval, tolerance, limit)
}

/// This instance's handle on the fleet's tenant limits.
pub struct FleetLimits(pub Arc<Fleet>);

#[async_trait]
impl SharedLimits for FleetLimits {
    async fn admit(&self, tenant: &Tenant, rate: bool, slot: bool) -> Option<Verdict> {
        let fleet = &self.0;
        let (interval, tolerance, limit) = asked(tenant, rate, slot);
        if interval == 0 && limit == 0 {
            return Some(Verdict::Admitted(None));
        }
        if !fleet.is_up_now() {
            return None;
        }
        let (rate_name, slots_name) = names(&fleet.config.key_prefix, &tenant.name);
        let number = fleet.held.next.fetch_add(1, Relaxed);
        let member = format!("{}-{number:x}", fleet.id);
        let mut call = ADMIT_SCRIPT.key(&rate_name);
        call.key(&slots_name)
            .arg(interval)
            .arg(tolerance)
            .arg(limit)
            .arg(&member)
            .arg(LEASE.as_millis() as u64);
        // This thread's own connection, else the shared one (see `local`).
        let local = fleet.local_connection();
        let shared = if local.is_none() {
            fleet.lock().clone()
        } else {
            None
        };
        let t = fleet.config.timeout;
        let answer = match (local, shared) {
            (Some(mut c), _) => {
                tokio::time::timeout(t, call.invoke_async::<(i64, i64)>(&mut c)).await
            }
            (None, Some(mut c)) => {
                tokio::time::timeout(t, call.invoke_async::<(i64, i64)>(&mut c)).await
            }
            (None, None) => return None,
        };
        match answer {
            Ok(Ok((0, _))) => {
                if limit == 0 {
                    return Some(Verdict::Admitted(None));
                }
                fleet.held.lock().insert(number, (slots_name, member));
                let lease: Lease = Box::new(HeldLease {
                    fleet: fleet.clone(),
                    number,
                });
                Some(Verdict::Admitted(Some(lease)))
            }
            Ok(Ok((1, _))) => Some(Verdict::Refused(Refusal::Concurrency { limit })),
            Ok(Ok((2, wait_us))) => Some(Verdict::Refused(Refusal::Rate {
                retry_after: (wait_us.max(0) as u64).div_ceil(1_000_000).max(1),
                rpm: tenant.rpm.unwrap_or(0),
            })),
            Ok(Ok(_)) => None,
            Ok(Err(e)) if is_link_error(&e) => {
                fleet.went_down("a tenant limit check failed");
                None
            }
            Ok(Err(_)) => {
                if !fleet.foreign_limit_warned.swap(true, Relaxed) {
                    log::warn!(
                        "redis entries of tenant {:?} are not ones keygate understands; its limits are counted on this instance alone while they stay",
                        tenant.name
                    );
                }
                None
            }
            Err(_) => {
                fleet.went_down("a tenant limit check timed out");
                None
            }
        }
    }
}

/// An error of the link (Redis down or unreachable), not of the entries.
fn is_link_error(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Renews the leases of the requests in flight here, every [`RENEW`].
pub(super) async fn renewer(fleet: &Fleet) {
    loop {
        tokio::time::sleep(RENEW).await;
        let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
        for (name, member) in fleet.held.lock().values() {
            by_name
                .entry(name.clone())
                .or_default()
                .push(member.clone());
        }
        if by_name.is_empty() {
            continue;
        }
        let Some(mut c) = fleet.lock().clone() else {
            continue;
        };
        let mut pipe = redis::pipe();
        for (name, members) in &by_name {
            pipe.cmd("EVAL")
                .arg(RENEW_SCRIPT)
                .arg(1)
                .arg(name)
                .arg(LEASE.as_millis() as u64)
                .arg(members)
                .ignore();
        }
        let renewed =
            tokio::time::timeout(fleet.config.timeout * 4, pipe.query_async::<()>(&mut c)).await;
        if !matches!(renewed, Ok(Ok(()))) {
            log::debug!("redis: the renewal of tenant slots failed; they end on their own");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_named_by_a_hash_of_the_tenant() {
        let (rate, slots) = names("kg:", "alice");
        assert!(
            rate.starts_with("kg:t:") && rate.ends_with(":rate"),
            "{rate}"
        );
        assert_eq!(
            rate.trim_end_matches(":rate"),
            slots.trim_end_matches(":slots")
        );
        assert!(!rate.contains("alice"));
    }

    #[test]
    fn a_request_asks_only_for_the_limits_it_has() {
        let tenant = |rpm, max_concurrent| Tenant {
            name: "t".into(),
            pools: vec![0],
            rpm,
            max_concurrent,
            state: Arc::default(),
        };
        assert_eq!(
            asked(&tenant(Some(4), None), true, true),
            (15_000_000, 45_000_000, 0)
        );
        assert_eq!(asked(&tenant(Some(4), Some(2)), false, true), (0, 0, 2));
        assert_eq!(asked(&tenant(None, None), true, true), (0, 0, 0));
    }
}
