//! How the fleet's health sits in Redis: one entry per running state, named by hashes of the
//! pool, project, model and key fingerprint (never a key), holding the news that recreates it.
//! Deadlines are Redis TTLs, so no two clocks need to agree; a penalty only ever lengthens an
//! entry's TTL (the later deadline wins), a deliberate change deletes entries.

use crate::quota::keys::{Millis, News};
use serde::{Deserialize, Serialize};

/// An entry's value.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Entry {
    /// The pool's name (entry names hold only its hash).
    pub(super) pool: String,
    /// What recreates the state; a deadline in it is replaced by the entry's TTL on reading.
    pub(super) news: News,
    /// When the change was made (ms since the epoch, the clock of the instance that made it):
    /// orders a penalty and an operator's clear of the same scope (see [`super::versions`]).
    #[serde(default)]
    pub(super) at: Millis,
}

/// How long a clear's tombstone is kept: longer than any cooldown read back (25 h).
pub(super) const TOMBSTONE_MS: Millis = 26 * 3600 * 1000;

/// One write of a piece of news.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// Sets the entry if it is missing or ends sooner than `ttl_ms` from now, unless one of
    /// the `cleared` tombstones is as recent as `at`.
    Lengthen {
        name: String,
        value: String,
        ttl_ms: Millis,
        at: Millis,
        cleared: Vec<String>,
    },
    /// Sets a clear's tombstone unless one as recent as `at` is there.
    Tombstone {
        name: String,
        value: String,
        at: Millis,
    },
    /// Deletes the entries matching the glob `pattern` (or named `pattern`, without a glob)
    /// that were made before `at`.
    DeleteOlder { pattern: String, at: Millis },
    /// Sets the entry, with no TTL.
    Put { name: String, value: String },
    /// Deletes the entry.
    Delete { name: String },
    /// Deletes every entry whose name matches the glob `pattern`.
    DeleteMatching { pattern: String },
}

/// The `at` of the entry value `v` (0 when it has none or is not JSON), in Lua.
const AT_OF: &str = r"
local function at_of(v)
  if not v then return nil end
  local ok, e = pcall(cjson.decode, v)
  if ok and type(e) == 'table' then return tonumber(e.at) or 0 end
  return 0
end
";

/// Lengthens an entry's TTL, never shortens it: `KEYS[1]`, value `ARGV[1]`, TTL `ARGV[2]` ms;
/// refused (-1) when a tombstone among `KEYS[2..]` is as recent as `ARGV[3]`.
pub(super) fn lengthen() -> String {
    format!("{AT_OF}{LENGTHEN}")
}

const LENGTHEN: &str = r"
for i = 2, #KEYS do
  local t = at_of(redis.call('GET', KEYS[i]))
  if t and t >= tonumber(ARGV[3]) then
    return -1
  end
end
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Sets a tombstone `KEYS[1]` to `ARGV[1]` for `ARGV[3]` ms unless one as recent as
/// `ARGV[2]` is there.
pub(super) fn tombstone() -> String {
    format!(
        "{AT_OF}{}",
        r"
local t = at_of(redis.call('GET', KEYS[1]))
if t and t >= tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"
    )
}

/// Deletes the entries `KEYS[..]` made before `ARGV[1]` (a value without `at` counts as old).
pub(super) fn delete_older() -> String {
    format!(
        "{AT_OF}{}",
        r"
local n = 0
for i = 1, #KEYS do
  local t = at_of(redis.call('GET', KEYS[i]))
  if t and t < tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"
    )
}

/// A name part: 16 hex digits of the SHA-256 of `text`. Names never hold names a client or an
/// operator chose (no glob characters, no colons), and never a key.
pub(super) fn h(text: &str) -> String {
    hex::encode(&crate::secret::sha256(text.as_bytes())[..8])
}

/// Names of one pool's entries under `prefix`.
pub(super) struct Names<'a> {
    prefix: &'a str,
    pool: String,
}

impl<'a> Names<'a> {
    pub(super) fn new(prefix: &'a str, pool: &str) -> Names<'a> {
        Names {
            prefix,
            pool: h(pool),
        }
    }

    fn name(&self, kind: &str, parts: &[&str]) -> String {
        let parts: Vec<String> = parts.iter().map(|p| h(p)).collect();
        format!("{}h:{}:{kind}:{}", self.prefix, self.pool, parts.join(":"))
    }

    /// The claim of the probe of the cap on `scope` `name` (see `probes`).
    pub(super) fn probe(&self, scope: &str, name: &str) -> String {
        // Outside the pool's health entries (`all`): a claim recreates no state.
        format!("{}p:{}:{}:{}", self.prefix, self.pool, h(scope), h(name))
    }

    /// Deletes the entry of a cap on `scope` (`project`, `billing_account`) `name`.
    pub(super) fn delete_cap(&self, scope: &str, name: &str) -> Write {
        Write::Delete {
            name: self.name("cap", &[scope, name]),
        }
    }

    /// Deletes the entry of the key with fingerprint `key`.
    pub(super) fn delete_key(&self, key: &str) -> Write {
        Write::Delete {
            name: self.name("key", &[key]),
        }
    }

    /// The glob that matches every entry of the pool.
    pub(super) fn all(&self) -> String {
        format!("{}h:{}:*", self.prefix, self.pool)
    }

    /// The tombstones of clears that cover (`project`, `model`): all of the project's, the
    /// model's.
    pub(super) fn tombstones(&self, project: &str, model: &str) -> Vec<String> {
        vec![
            self.name("cleared", &[project]),
            self.name("cleared", &[project, model]),
        ]
    }

    /// What writing `news` of `pool`, made at `at`, takes.
    pub(super) fn writes(&self, pool: &str, news: &News, at: Millis) -> Vec<Write> {
        let value = || {
            serde_json::to_string(&Entry {
                pool: pool.to_string(),
                news: news.clone(),
                at,
            })
            .unwrap_or_default()
        };
        let cap = |scope: &str, name: &str| self.name("cap", &[scope, name]);
        match news {
            News::Cooled {
                project,
                model,
                left_ms,
                ..
            } => vec![Write::Lengthen {
                name: self.name("cool", &[project, model]),
                value: value(),
                ttl_ms: *left_ms,
                at,
                cleared: self.tombstones(project, model),
            }],
            News::Capped {
                scope,
                name,
                left_ms,
                ..
            } => vec![Write::Lengthen {
                name: cap(scope, name),
                value: value(),
                ttl_ms: *left_ms,
                at,
                cleared: Vec::new(),
            }],
            News::KeyDisabled { key, .. } => vec![Write::Put {
                name: self.name("key", &[key]),
                value: value(),
            }],
            News::ProjectDisabled { project } => vec![Write::Put {
                name: self.name("billing", &[project]),
                value: value(),
            }],
            News::MethodBlocked { key, method } => vec![Write::Put {
                name: self.name("blocked", &[key, method]),
                value: value(),
            }],
            News::Enabled { key, project } => vec![
                Write::Delete {
                    name: self.name("key", &[key]),
                },
                Write::Delete {
                    name: self.name("billing", &[project]),
                },
                Write::DeleteMatching {
                    pattern: format!("{}:*", self.name("blocked", &[key])),
                },
            ],
            // Recovery forgets Google's refusal, not an operator's disable: the entry is
            // rewritten from the instance's table after it (see `Fleet::after`).
            News::Recovered { .. } => Vec::new(),
            News::CooldownsCleared {
                project,
                account,
                model,
                ..
            } => match model {
                // A clear deletes the cooldowns made before it and leaves a tombstone, so that
                // an older penalty written back later (an instance that was away) is refused.
                Some(model) => vec![
                    Write::DeleteOlder {
                        pattern: self.name("cool", &[project, model]),
                        at,
                    },
                    Write::Tombstone {
                        name: self.name("cleared", &[project, model]),
                        value: value(),
                        at,
                    },
                ],
                None => vec![
                    Write::DeleteOlder {
                        pattern: format!("{}:*", self.name("cool", &[project])),
                        at,
                    },
                    Write::Tombstone {
                        name: self.name("cleared", &[project]),
                        value: value(),
                        at,
                    },
                    Write::Delete {
                        name: cap("project", project),
                    },
                    Write::Delete {
                        name: cap("billing_account", account),
                    },
                ],
            },
            // A probe's success ends the caps; the peers' own tables say which (a straggler's
            // success ends none), so the entries go only when no cap is left: see `Fleet::after`.
            News::Served { .. } => Vec::new(),
        }
    }
}

/// The news an entry recreates, read back with `ttl_ms` left (`None`: no TTL): deadlines come
/// from the TTL, not from the value. `None` when the value is not one of keygate's entries.
pub(super) fn read(value: &str, ttl_ms: Option<Millis>) -> Option<Entry> {
    let mut entry: Entry = serde_json::from_str(value).ok()?;
    match (&mut entry.news, ttl_ms) {
        (News::Cooled { left_ms, .. } | News::Capped { left_ms, .. }, Some(ttl)) => *left_ms = ttl,
        (News::Cooled { .. } | News::Capped { .. }, None) => return None,
        _ => {}
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cooled(left_ms: Millis) -> News {
        News::Cooled {
            project: "p1:*".into(),
            model: "gemini-2.5-flash".into(),
            why: "quota".into(),
            left_ms,
            escalations: 0,
        }
    }

    #[test]
    fn names_hold_hashes_only() {
        let names = Names::new("kg:", "main");
        let writes = names.writes("main", &cooled(5000), 1);
        let Write::Lengthen {
            name,
            value,
            ttl_ms,
            ..
        } = &writes[0]
        else {
            panic!("{writes:?}");
        };
        assert!(
            name.starts_with("kg:h:") && name.split(':').count() == 6,
            "{name}"
        );
        assert!(!name.contains("p1") && !name.contains('*') && !name.contains("gemini"));
        assert_eq!(*ttl_ms, 5000);
        // Read back, the deadline is the TTL left, not what the value said.
        let entry = read(value, Some(1200)).unwrap();
        assert_eq!((entry.pool.as_str(), entry.news), ("main", cooled(1200)));
        assert!(
            read(value, None).is_none(),
            "a cooldown without a TTL is not one"
        );
    }

    #[test]
    fn a_clear_deletes_what_the_penalties_wrote() {
        let names = Names::new("kg:", "main");
        let cool = names.writes("main", &cooled(5000), 1);
        let clear = names.writes(
            "main",
            &News::CooldownsCleared {
                key: "key#1".into(),
                project: "p1:*".into(),
                account: "p1:*".into(),
                model: None,
            },
            2,
        );
        let Write::Lengthen { name, .. } = &cool[0] else {
            panic!()
        };
        let Write::DeleteOlder { pattern, at: 2 } = &clear[0] else {
            panic!("{clear:?}")
        };
        let stem = pattern.trim_end_matches('*');
        assert!(name.starts_with(stem), "{name} {pattern}");
    }

    #[test]
    fn foreign_values_are_ignored() {
        assert!(read("not json", Some(5)).is_none());
        assert!(read(r#"{"pool":"main","news":{"change":"explode"}}"#, None).is_none());
    }
}
