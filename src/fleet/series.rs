//! The dashboard's usage series added up across the fleet: each instance adds its requests and
//! tokens per minute into one Redis hash per key and per tenant, and `/admin/usage` reads the
//! sums back.
//!
//! A hash is named `{prefix}series:k:{hash of the pool}:{hash of the fingerprint}` for a key
//! and `{prefix}series:t:{hash of the name}` for a tenant (no key, no name a client chose);
//! its fields are `{minute}:r` (requests) and `{minute}:t` (tokens), the minute counted since
//! the Unix epoch, added to with `HINCRBY`. Each write sets the hash to expire a day and an
//! hour later, and a hash grown past two days of fields loses those older than a day: an idle
//! series is gone a day later, a busy one never holds more than [`MAX_FIELDS`] fields.
//!
//! The request path never calls Redis: requests count in the instance's rings as before, and
//! the writer here takes what was added since its last turn, once a second, in one pipeline.
//! A turn Redis does not take in time is lost to the fleet's sums (the instance still has it);
//! counts made while Redis is away are sent when it answers again, up to the last
//! [`CATCH_UP`] minutes.
//!
//! Garbage under the names (another type, fields keygate did not write, values that are not
//! numbers) is skipped on reading and replaced on writing; a read returns at most
//! [`MAX_FIELDS`] fields a series, each value at most 20 digits.

use super::store::h;
use super::Fleet;
use crate::quota::keys::now_millis;
use crate::quota::keys::series::{Minutes, SeriesOf, SharedSeries, CATCH_UP, MINUTES};
use crate::runtime::Shared;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// How often the counts made here are sent.
const EVERY: Duration = Duration::from_secs(1);

/// How long a series' hash lives after its last write: a day and an hour.
const TTL_MS: u64 = (MINUTES as u64 + 60) * 60_000;

/// Past this many fields a hash loses those older than a day (two fields a minute).
const MAX_FIELDS: usize = 2 * (MINUTES + CATCH_UP as usize);

/// Series read in one script call (a read is one pipeline of such calls).
const CHUNK: usize = 100;

/// Adds `ARGV[4..]` (field, count pairs) to the hash `KEYS[1]`, sets it to expire in `ARGV[3]`
/// ms and, past `ARGV[2]` fields, deletes the fields older than minute `ARGV[1]` and the
/// fields keygate does not write.
const ADD: &str = r"
local t = redis.call('TYPE', KEYS[1])
t = t.ok or t
if t ~= 'hash' and t ~= 'none' then
  redis.call('DEL', KEYS[1])
end
for i = 4, #ARGV, 2 do
  local r = redis.pcall('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  if type(r) == 'table' and r.err then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if redis.call('HLEN', KEYS[1]) > tonumber(ARGV[2]) then
  local cutoff = tonumber(ARGV[1])
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local m = tonumber(string.match(f, '^(%d+):[rt]$'))
    if not m or m < cutoff then
      redis.call('HDEL', KEYS[1], f)
    end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// For each hash `KEYS[i]`, a flat list of its fields and values of minutes `ARGV[1]` to
/// `ARGV[2]`, at most `ARGV[3]` fields, values of at most 20 characters; anything else is
/// left out.
const READ: &str = r"
local first, last, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
for i = 1, #KEYS do
  local one = {}
  local t = redis.call('TYPE', KEYS[i])
  t = t.ok or t
  if t == 'hash' then
    local all = redis.call('HGETALL', KEYS[i])
    for j = 1, #all, 2 do
      local m = tonumber(string.match(all[j], '^(%d+):[rt]$'))
      if m and m >= first and m <= last and #all[j + 1] <= 20 and #one < 2 * most then
        one[#one + 1] = all[j]
        one[#one + 1] = all[j + 1]
      end
    end
  end
  out[i] = one
end
return out
";

impl Fleet {
    /// The hash of `series`.
    fn series_name(&self, series: SeriesOf<'_>) -> String {
        let prefix = &self.config.key_prefix;
        match series {
            SeriesOf::Key { pool, fingerprint } => {
                format!("{prefix}series:k:{}:{}", h(pool), h(fingerprint))
            }
            SeriesOf::Tenant(name) => format!("{prefix}series:t:{}", h(name)),
        }
    }
}

/// Sends the counts made here once a second while Redis answers.
pub(super) async fn writer(fleet: &Fleet, shared: &Shared) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // While Redis is away the counts stay unsent in the rings, for when it is back.
        if !fleet.is_up_now() {
            continue;
        }
        let Some(mut c) = fleet.lock().clone() else {
            continue;
        };
        let (pipe, writes) = turn(fleet, shared);
        if writes == 0 {
            continue;
        }
        match tokio::time::timeout(fleet.config.timeout * 4, pipe.query_async::<()>(&mut c)).await {
            Ok(Ok(())) => {}
            _ => log::debug!("redis: a turn of usage counts was not taken in time; dropped"),
        }
    }
}

/// The writes of what was added to every series since the last turn.
fn turn(fleet: &Fleet, shared: &Shared) -> (redis::Pipeline, usize) {
    let mut pipe = redis::pipe();
    let mut writes = 0;
    let cutoff = (now_millis() / 60_000).saturating_sub(MINUTES as u64);
    let mut add = |series: SeriesOf<'_>, counts: Minutes| {
        if counts.is_empty() {
            return;
        }
        let cmd = pipe
            .cmd("EVAL")
            .arg(ADD)
            .arg(1)
            .arg(fleet.series_name(series))
            .arg(cutoff)
            .arg(MAX_FIELDS)
            .arg(TTL_MS);
        for (minute, [r, t]) in counts {
            if r > 0 {
                cmd.arg(format!("{minute}:r")).arg(r);
            }
            if t > 0 {
                cmd.arg(format!("{minute}:t")).arg(t);
            }
        }
        cmd.ignore();
        writes += 1;
    };
    let rt = shared.runtime.load();
    for pool in &rt.pools {
        let table = pool.keys.load();
        for k in 0..table.len() {
            let key = table.key(crate::quota::keys::KeyId(k as u32));
            let series = SeriesOf::Key {
                pool: pool.name(),
                fingerprint: &key.fingerprint,
            };
            add(series, key.usage.minutes.take_unsent());
        }
    }
    for t in rt.tenants.list().iter() {
        add(
            SeriesOf::Tenant(&t.name),
            t.state.usage.minutes.take_unsent(),
        );
    }
    (pipe, writes)
}

/// This instance's handle on the fleet's usage series.
pub struct FleetSeries(pub Arc<Fleet>);

#[async_trait]
impl SharedSeries for FleetSeries {
    async fn read(&self, series: &[SeriesOf<'_>], first: u64, last: u64) -> Option<Vec<Minutes>> {
        let fleet = &self.0;
        let mut c = fleet.lock().clone().filter(|_| fleet.is_up_now())?;
        let mut pipe = redis::pipe();
        for chunk in series.chunks(CHUNK) {
            let cmd = pipe.cmd("EVAL").arg(READ).arg(chunk.len());
            for s in chunk {
                cmd.arg(fleet.series_name(*s));
            }
            cmd.arg(first).arg(last).arg(MAX_FIELDS);
        }
        let answer = tokio::time::timeout(
            fleet.config.timeout,
            pipe.query_async::<Vec<Vec<Vec<String>>>>(&mut c),
        )
        .await;
        let Ok(Ok(chunks)) = answer else {
            return None;
        };
        let out: Vec<Minutes> = chunks.into_iter().flatten().map(parse).collect();
        // An answer of another shape than asked for is not the fleet's.
        (out.len() == series.len()).then_some(out)
    }
}

/// The counts in a flat list of fields and values; what is not keygate's is skipped.
fn parse(flat: Vec<String>) -> Minutes {
    let mut by_minute = std::collections::BTreeMap::<u64, [u64; 2]>::new();
    for pair in flat.chunks_exact(2) {
        let (Some((minute, kind)), Ok(n)) = (pair[0].split_once(':'), pair[1].parse::<i64>())
        else {
            continue;
        };
        let (Ok(minute), Ok(n)) = (minute.parse::<u64>(), u64::try_from(n)) else {
            continue;
        };
        let i = match kind {
            "r" => 0,
            "t" => 1,
            _ => continue,
        };
        let slot = by_minute.entry(minute).or_default();
        slot[i] = slot[i].saturating_add(n);
    }
    by_minute.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_fields_are_skipped() {
        let flat = [
            "100:r", "3", "100:t", "70", "101:r", "-5", "x:r", "1", "102:q", "1", "103:r", "nan",
            "104:t",
        ];
        let flat: Vec<String> = flat.iter().map(|s| s.to_string()).collect();
        assert_eq!(parse(flat), [(100, [3, 70])]);
    }
}
