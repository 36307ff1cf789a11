//! Request and token counters, and fair-share use, added up across the fleet.
//!
//! - Counters: each instance adds what its tenants and keys counted since its last turn to one
//!   Redis hash per tenant (`{prefix}usage:t:{hash of the name}`) and per key
//!   (`{prefix}usage:k:{hash of the pool}:{hash of the fingerprint}`), fields `r`, `p`, `o`,
//!   `t` (requests, prompt, output and total tokens) added to with `HINCRBY`, and reads the
//!   sums back in the same script call. `/admin/tenants` and `/admin/pools` answer those sums
//!   plus what this instance has not told yet, never less than its own counts. A hash lives
//!   [`COUNTERS_TTL_MS`] after its last write. A turn Redis does not answer is told again at
//!   the next (a turn Redis took but whose answer was lost would then count twice: rare, and
//!   never less than the truth); counts made while Redis is away are told when it answers.
//! - Fair share: each pool with `fair_share: true` has one hash `{prefix}fair:{hash of the
//!   pool}`, fields `{hash of the tenant}:{minute}` (requests the pool took in that minute,
//!   since the epoch) and `{hash of the tenant}:seen` (its last request, ms since the epoch on
//!   the clock of the instance that saw it). Each turn adds this instance's new counts, drops
//!   minutes older than the previous one, and reads the rest back into the pool's
//!   [`FairShare`](crate::tenants::FairShare): the request path reads only that table.
//!
//! One turn a second, two round trips, in the background: a request never waits on Redis for
//! this. What is read back is checked; a field or value keygate did not write is skipped.

use super::store::h;
use super::Fleet;
use crate::quota::keys::series::SeriesOf;
use crate::quota::keys::{now_millis, KeyId};
use crate::runtime::counters::SharedCounters;
use crate::runtime::{Runtime, Shared};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How often counts are told and the fleet's read back.
const EVERY: Duration = Duration::from_secs(1);

/// How long a counters hash lives after its last write: 30 days.
const COUNTERS_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Hashes read and written in one script call.
const CHUNK: usize = 200;

/// The most fields read back from a pool's fair-share hash.
const MAX_FAIR_FIELDS: usize = 4096;

/// For each hash `KEYS[i]`, adds `ARGV[1 + 4(i-1) + j]` to its field j (`r`, `p`, `o`, `t`),
/// sets it to expire in `ARGV[1]` ms when anything was added, and returns its four fields.
/// Another type under the name is replaced; a field that is not a number is overwritten.
const ADD: &str = r"
local fields = {'r', 'p', 'o', 't'}
local out = {}
for i = 1, #KEYS do
  local t = redis.call('TYPE', KEYS[i])
  t = t.ok or t
  if t ~= 'hash' and t ~= 'none' then
    redis.call('DEL', KEYS[i])
  end
  local any = false
  for j = 1, 4 do
    local d = ARGV[1 + (i - 1) * 4 + j]
    if tonumber(d) > 0 then
      local r = redis.pcall('HINCRBY', KEYS[i], fields[j], d)
      if type(r) == 'table' and r.err then
        redis.call('HSET', KEYS[i], fields[j], d)
      end
      any = true
    end
  end
  if any then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  end
  out[i] = redis.call('HMGET', KEYS[i], 'r', 'p', 'o', 't')
end
return out
";

/// A pool's fair-share hash `KEYS[1]`: `ARGV[1]` the current minute, `ARGV[2]` the TTL in ms,
/// `ARGV[3]` how many (field, count) pairs to add follow, then (seen field, ms) pairs kept at
/// their highest. Drops fields of minutes before the previous one and fields keygate does not
/// write; returns the rest, flat (field, value), at most `ARGV[4]` fields.
const FAIR: &str = r"
local t = redis.call('TYPE', KEYS[1])
t = t.ok or t
if t ~= 'hash' and t ~= 'none' then
  redis.call('DEL', KEYS[1])
end
local m = tonumber(ARGV[1])
local i = 5
for _ = 1, tonumber(ARGV[3]) do
  local r = redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if type(r) == 'table' and r.err then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
while i < #ARGV do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0
  if tonumber(ARGV[i + 1]) > old then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  i = i + 2
end
if #ARGV > 4 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local f, v = all[j], all[j + 1]
  local minute = tonumber(string.match(f, '^%x+:(%d+)$'))
  local seen = string.match(f, '^%x+:seen$')
  if (minute and minute < m - 1) or (not minute and not seen) then
    redis.call('HDEL', KEYS[1], f)
  elseif #v <= 20 and #out < 2 * tonumber(ARGV[4]) then
    out[#out + 1] = f
    out[#out + 1] = v
  end
end
return out
";

/// What this instance told the fleet of each counters hash, and the fleet's sums read back.
#[derive(Default)]
pub(super) struct Counted {
    /// Hash name → this instance's counts when last told.
    told: HashMap<String, [u64; 4]>,
    /// Hash name → the fleet's sums read at the last turn.
    sums: HashMap<String, [u64; 4]>,
    /// The sums are current (the last turn was answered and Redis answers).
    known: bool,
}

impl Fleet {
    /// The counters hash of `of`.
    fn counters_name(&self, of: SeriesOf<'_>) -> String {
        let prefix = &self.config.key_prefix;
        match of {
            SeriesOf::Key { pool, fingerprint } => {
                format!("{prefix}usage:k:{}:{}", h(pool), h(fingerprint))
            }
            SeriesOf::Tenant(name) => format!("{prefix}usage:t:{}", h(name)),
        }
    }

    fn counted(&self) -> std::sync::MutexGuard<'_, Counted> {
        self.counted.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// This instance's handle on the fleet's counters.
pub struct FleetCounters(pub Arc<Fleet>);

impl SharedCounters for FleetCounters {
    fn counts(&self, of: SeriesOf<'_>, local: [u64; 4]) -> Option<[u64; 4]> {
        if !self.0.is_up_now() {
            return None;
        }
        let name = self.0.counters_name(of);
        let counted = self.0.counted();
        if !counted.known {
            return None;
        }
        let sums = counted.sums.get(&name).copied().unwrap_or_default();
        let told = counted.told.get(&name).copied().unwrap_or_default();
        Some(added(sums, told, local))
    }
}

/// The fleet's `sums` read back, plus what this instance counted since it `told` them
/// (`local` now); never below `local` (Redis wiped or restarted empty).
fn added(sums: [u64; 4], told: [u64; 4], local: [u64; 4]) -> [u64; 4] {
    std::array::from_fn(|i| {
        let unsent = local[i].saturating_sub(told[i]);
        sums[i].saturating_add(unsent).max(local[i])
    })
}

/// Tells the counts made here and reads the fleet's, once a second while Redis answers.
pub(super) async fn writer(fleet: &Fleet, shared: &Shared) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rt = shared.runtime.load_full();
        let link = fleet.lock().clone().filter(|_| fleet.is_up_now());
        let Some(mut c) = link else {
            fleet.counted().known = false;
            for pool in &rt.pools {
                if let Some(fair) = &pool.fair {
                    fair.clear_fleet();
                }
            }
            continue;
        };
        let known = counters_turn(fleet, &rt, &mut c).await;
        fleet.counted().known = known;
        fair_turn(fleet, &rt, &mut c).await;
    }
}

/// Every tenant's and key's counts now, by counters hash.
fn local_counts(fleet: &Fleet, rt: &Runtime) -> Vec<(String, [u64; 4])> {
    let mut out = Vec::new();
    for t in rt.tenants.list() {
        let of = SeriesOf::Tenant(&t.name);
        out.push((fleet.counters_name(of), t.state.usage.totals()));
    }
    for pool in &rt.pools {
        let table = pool.keys.load();
        for k in 0..table.len() {
            let key = table.key(KeyId(k as u32));
            let of = SeriesOf::Key {
                pool: pool.name(),
                fingerprint: &key.fingerprint,
            };
            out.push((fleet.counters_name(of), key.usage.totals()));
        }
    }
    out
}

/// One turn of the counters: tells what changed, reads the sums; whether Redis answered.
async fn counters_turn(fleet: &Fleet, rt: &Runtime, c: &mut redis::aio::ConnectionManager) -> bool {
    let local = local_counts(fleet, rt);
    if local.is_empty() {
        return true;
    }
    let mut pipe = redis::pipe();
    {
        let counted = fleet.counted();
        for chunk in local.chunks(CHUNK) {
            let cmd = pipe.cmd("EVAL").arg(ADD).arg(chunk.len());
            for (name, _) in chunk {
                cmd.arg(name);
            }
            cmd.arg(COUNTERS_TTL_MS);
            for (name, now) in chunk {
                let told = counted.told.get(name).copied().unwrap_or_default();
                // Counts below what was told: a key or tenant counted anew (removed and
                // added back); all of it is new.
                let fresh = now.iter().zip(&told).any(|(n, t)| n < t);
                for i in 0..4 {
                    cmd.arg(if fresh { now[i] } else { now[i] - told[i] });
                }
            }
        }
    }
    let answer = tokio::time::timeout(
        fleet.config.timeout * 4,
        pipe.query_async::<Vec<Vec<Vec<Option<String>>>>>(c),
    )
    .await;
    let Ok(Ok(chunks)) = answer else {
        log::debug!("redis: a turn of the usage counters was not answered in time; told again");
        return false;
    };
    let read: Vec<Vec<Option<String>>> = chunks.into_iter().flatten().collect();
    if read.len() != local.len() {
        return false;
    }
    let mut counted = fleet.counted();
    let mut garbage = false;
    counted.sums.clear();
    for ((name, now), fields) in local.into_iter().zip(read) {
        let mut sums = [0u64; 4];
        for (i, field) in fields.iter().take(4).enumerate() {
            match field.as_deref().map(str::parse::<u64>) {
                Some(Ok(n)) => sums[i] = n,
                Some(Err(_)) => garbage = true,
                None => {}
            }
        }
        counted.sums.insert(name.clone(), sums);
        counted.told.insert(name, now);
    }
    if garbage {
        log::warn!("redis: a usage counter keygate did not write (not a number); ignored");
    }
    true
}

/// One turn of fair share, for every pool that has it: tells this instance's new counts and
/// takes in the fleet's. A turn Redis does not answer loses its counts to the fleet (fair
/// share is an estimate over a minute), and the pool decides on this instance's use alone.
async fn fair_turn(fleet: &Fleet, rt: &Runtime, c: &mut redis::aio::ConnectionManager) {
    let by_hash: HashMap<String, Arc<str>> = rt
        .tenants
        .list()
        .iter()
        .map(|t| (h(&t.name), t.name.clone()))
        .collect();
    for pool in &rt.pools {
        let Some(fair) = &pool.fair else {
            continue;
        };
        let now = now_millis();
        let minute = now / 60_000;
        let unsent = fair.take_unsent(now);
        let mut counts = Vec::new();
        let mut seen = Vec::new();
        for (name, by_minute, last) in &unsent {
            for (m, n) in by_minute {
                counts.push((format!("{}:{m}", h(name)), *n));
            }
            if let Some(ms) = last {
                seen.push((format!("{}:seen", h(name)), *ms));
            }
        }
        let active = pool.config.fair_share.map_or(0, |d| d.as_millis() as u64);
        let ttl = active.max(120_000) + 60_000;
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(FAIR)
            .arg(1)
            .arg(format!(
                "{}fair:{}",
                fleet.config.key_prefix,
                h(pool.name())
            ))
            .arg(minute)
            .arg(ttl)
            .arg(counts.len())
            .arg(MAX_FAIR_FIELDS);
        for (field, n) in counts.iter().chain(&seen) {
            cmd.arg(field).arg(*n);
        }
        let answer =
            tokio::time::timeout(fleet.config.timeout * 4, cmd.query_async::<Vec<String>>(c)).await;
        match answer {
            Ok(Ok(flat)) => fair.set_fleet(minute, &read_fair(&flat, &by_hash, minute), now),
            _ => {
                log::debug!("redis: a turn of fair share was not answered in time");
                fair.clear_fleet();
            }
        }
    }
}

/// The fleet's fair-share counts in a pool's hash read back: per configured tenant, its
/// requests in `minute` and the one before, and its last request. Fields of tenants this
/// instance does not have, and values that are not numbers, are skipped.
fn read_fair(
    flat: &[String],
    by_hash: &HashMap<String, Arc<str>>,
    minute: u64,
) -> HashMap<Arc<str>, [u64; 3]> {
    let mut out: HashMap<Arc<str>, [u64; 3]> = HashMap::new();
    for pair in flat.chunks_exact(2) {
        let (Some((hash, what)), Ok(n)) = (pair[0].split_once(':'), pair[1].parse::<u64>()) else {
            continue;
        };
        let Some(name) = by_hash.get(hash) else {
            continue;
        };
        let slot = match what {
            "seen" => 2,
            m if m.parse::<u64>().ok() == Some(minute) => 0,
            m if m.parse::<u64>().ok() == Some(minute.saturating_sub(1)) => 1,
            _ => continue,
        };
        let entry = out.entry(name.clone()).or_default();
        entry[slot] = entry[slot].max(n);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleets_counts_add_what_is_not_told_yet_and_never_fall_below_ours() {
        // The fleet holds 10 requests, 5 of them ours; we served 2 more since.
        assert_eq!(
            added([10, 70, 0, 70], [5, 35, 0, 35], [7, 49, 0, 49]),
            [12, 84, 0, 84]
        );
        // Redis wiped: the sums start again, never below what we served ourselves.
        assert_eq!(
            added([1, 7, 0, 7], [7, 49, 0, 49], [8, 56, 0, 56]),
            [8, 56, 0, 56]
        );
    }

    #[test]
    fn fair_fields_of_strangers_and_garbage_are_skipped() {
        let alice: Arc<str> = Arc::from("alice");
        let by_hash = HashMap::from([(h("alice"), alice.clone())]);
        let a = h("alice");
        let flat: Vec<String> = [
            (format!("{a}:100"), "7"),
            (format!("{a}:99"), "3"),
            (format!("{a}:98"), "50"),
            (format!("{a}:seen"), "123"),
            (format!("{}:100", h("mallory")), "9"),
            (format!("{a}:100x"), "1"),
            ("junk".to_string(), "1"),
            (format!("{a}:101"), "not a number"),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f, v.to_string()])
        .collect();
        let read = read_fair(&flat, &by_hash, 100);
        assert_eq!(read, HashMap::from([(alice, [7, 3, 123])]));
    }
}
