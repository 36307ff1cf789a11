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
}

/// One write of a piece of news.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// Sets the entry if it is missing or ends sooner than `ttl_ms` from now.
    Lengthen {
        name: String,
        value: String,
        ttl_ms: Millis,
    },
    /// Sets the entry, with no TTL.
    Put { name: String, value: String },
    /// Deletes the entry.
    Delete { name: String },
    /// Deletes every entry whose name matches the glob `pattern`.
    DeleteMatching { pattern: String },
}

/// Lengthens an entry's TTL, never shortens it: `KEYS[1]`, value `ARGV[1]`, TTL `ARGV[2]` ms.
pub(super) const LENGTHEN: &str = r"
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

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

    /// What writing `news` of `pool` takes.
    pub(super) fn writes(&self, pool: &str, news: &News) -> Vec<Write> {
        let value = || {
            serde_json::to_string(&Entry {
                pool: pool.to_string(),
                news: news.clone(),
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
                Some(model) => vec![Write::Delete {
                    name: self.name("cool", &[project, model]),
                }],
                None => vec![
                    Write::DeleteMatching {
                        pattern: format!("{}:*", self.name("cool", &[project])),
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
        }
    }

    #[test]
    fn names_hold_hashes_only() {
        let names = Names::new("kg:", "main");
        let writes = names.writes("main", &cooled(5000));
        let Write::Lengthen {
            name,
            value,
            ttl_ms,
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
        let cool = names.writes("main", &cooled(5000));
        let clear = names.writes(
            "main",
            &News::CooldownsCleared {
                key: "key#1".into(),
                project: "p1:*".into(),
                account: "p1:*".into(),
                model: None,
            },
        );
        let Write::Lengthen { name, .. } = &cool[0] else {
            panic!()
        };
        let Write::DeleteMatching { pattern } = &clear[0] else {
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
