//! A pool's keys from their four sources (inline, `keys_env`, `keys_env_prefix`, `keys_file`):
//! read, checked and deduplicated, every error naming where the key was found, never the key.

use super::file::{FileKey, FilePool};
use super::validate::invalid;
use super::{ConfigError, KeyConfig, KeyVariables};
use crate::secret::Secret;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// A key as the configuration spells it: the key, its project and billing account if given,
/// and where it was found (for error messages). Notes ride beside it (see [`Notes`]).
type RawKey = (String, Option<String>, Option<String>, String);

/// The notes of inline keys, by the place their key was found (only inline keys carry one).
type Notes = HashMap<String, String>;

/// Longest note kept; a longer one is an error that says so.
const MAX_NOTE: usize = 200;

/// The keys of `pool` (its `keys` are taken), in the order: inline, `keys_env`,
/// `keys_env_prefix` (the bare variable, then `_1`, `_2`... by number), `keys_file`; and what
/// the prefix found. `names` are the environment's variable names.
pub(super) fn pool_keys(
    pool: &mut FilePool,
    ctx: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    names: &[String],
) -> Result<(Vec<KeyConfig>, Option<KeyVariables>), ConfigError> {
    let mut raw: Vec<RawKey> = Vec::new();
    let mut notes = Notes::new();
    for (j, key) in std::mem::take(&mut pool.keys).into_iter().enumerate() {
        let (k, p, b) = match key {
            FileKey::Bare(k) => (k, None, None),
            FileKey::Full(f) => {
                if let Some(note) = f.note.map(|n| n.trim().to_string()) {
                    if note.chars().count() > MAX_NOTE || note.chars().any(char::is_control) {
                        return Err(invalid(format!(
                            "{ctx}.keys[{j}].note: at most {MAX_NOTE} characters, on one line"
                        )));
                    }
                    if !note.is_empty() {
                        notes.insert(format!("{ctx}.keys[{j}]"), note);
                    }
                }
                (f.key, f.project, f.billing_account)
            }
        };
        if b.is_some() && p.is_none() {
            return Err(invalid(format!(
                "{ctx}.keys[{j}]: a billing_account needs the key's project beside it"
            )));
        }
        raw.push((k, p, b, format!("{ctx}.keys[{j}]")));
    }
    if let Some(var) = &pool.keys_env {
        match env(var) {
            Some(value) => raw.extend(env_keys(&value, &format!("{ctx}.keys_env ${var}"))?),
            None => log::warn!("{ctx}.keys_env: environment variable {var} is not set"),
        }
    }
    let mut found = None;
    if let Some(prefix) = &pool.keys_env_prefix {
        if prefix.is_empty() || prefix.ends_with('_') || prefix.contains('=') {
            return Err(invalid(format!(
                "{ctx}.keys_env_prefix: write the variable's name without a trailing _ (GOOGLE_AI_STUDIO_KEY_CHAT reads it and GOOGLE_AI_STUDIO_KEY_CHAT_1, _2, ...)"
            )));
        }
        let before = raw.len();
        let mut variables = 0;
        for var in numbered_variables(prefix, names) {
            let Some(value) = env(&var) else { continue };
            variables += 1;
            raw.extend(env_keys(&value, &format!("{ctx}.keys_env_prefix ${var}"))?);
        }
        if variables == 0 {
            log::warn!("{ctx}.keys_env_prefix: no variable {prefix} or {prefix}_<number> is set");
        }
        found = Some(KeyVariables {
            prefix: prefix.clone(),
            variables,
            keys: raw.len() - before,
        });
    }
    if let Some(file) = &pool.keys_file {
        raw.extend(file_keys(ctx, &resolve(base, file))?);
    }
    let keys = assemble(raw, &notes)?;
    if keys.is_empty() {
        let mut sources = vec!["keys".to_string()];
        if let Some(var) = &pool.keys_env {
            sources.push(format!("keys_env (${var})"));
        }
        if let Some(prefix) = &pool.keys_env_prefix {
            sources.push(format!("keys_env_prefix (${prefix}, ${prefix}_1, ...)"));
        }
        if pool.keys_file.is_some() {
            sources.push("keys_file".into());
        }
        return Err(invalid(format!(
            "{ctx}: pool {:?} has no keys; looked in {}",
            pool.name,
            sources.join(", ")
        )));
    }
    Ok((keys, found))
}

fn resolve(base: &Path, file: &Path) -> std::path::PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        base.join(file)
    }
}

/// The variables `keys_env_prefix: PREFIX` reads, among `names`: `PREFIX` itself, then every
/// `PREFIX_<decimal digits>` in the order of their numbers (gaps and leading zeros allowed;
/// `_01` and `_1` are two variables, both read). Anything else after the prefix (`PREFIX_OLD`,
/// `PREFIX_1A`) is not a key variable.
pub(super) fn numbered_variables(prefix: &str, names: &[String]) -> Vec<String> {
    let mut numbered: Vec<(u128, &str, &String)> = names
        .iter()
        .filter_map(|name| {
            let digits = name.strip_prefix(prefix)?.strip_prefix('_')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Past 38 digits the order is by text alone: no one numbers keys that far.
            let number = digits.parse::<u128>().unwrap_or(u128::MAX);
            Some((number, digits, name))
        })
        .collect();
    numbered.sort();
    numbered.dedup_by(|a, b| a.2 == b.2);
    std::iter::once(prefix.to_string())
        .chain(numbered.into_iter().map(|(_, _, name)| name.clone()))
        .collect()
}

/// The keys of one environment variable's value: comma-separated, each `KEY`, `KEY:project` or
/// `KEY:project:billing_account`; `place` names the variable in errors.
pub(super) fn env_keys(value: &str, place: &str) -> Result<Vec<RawKey>, ConfigError> {
    let mut out = Vec::new();
    for (j, item) in value.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let place = format!("{place}, entry {}", j + 1);
        let mut parts = item.split(':').map(|s| s.trim().to_string());
        let k = parts.next().unwrap_or_default();
        let (p, b) = (parts.next(), parts.next());
        if parts.next().is_some() {
            return Err(invalid(format!(
                "{place}: expected `KEY`, `KEY:project` or `KEY:project:billing_account`"
            )));
        }
        out.push((k, p, b, place));
    }
    Ok(out)
}

/// The keys of a `keys_file`: one `KEY`, `KEY project` or `KEY project billing_account` per
/// line, `#` starting a comment.
fn file_keys(ctx: &str, path: &Path) -> Result<Vec<RawKey>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: format!("{ctx}.keys_file {}", path.display()),
        reason: e.kind().to_string(),
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let k = words.next().unwrap_or("").to_string();
        let p = words.next().map(str::to_string);
        let b = words.next().map(str::to_string);
        if words.next().is_some() {
            return Err(invalid(format!(
                "{ctx}.keys_file {} line {}: expected `KEY`, `KEY project` or `KEY project billing_account`",
                path.display(),
                n + 1
            )));
        }
        out.push((k, p, b, format!("{ctx}.keys_file line {}", n + 1)));
    }
    Ok(out)
}

/// Checks the keys and builds their configuration: a key listed twice is used once, a key
/// without a project is its own (named by its fingerprint), and a project names one billing
/// account.
fn assemble(raw: Vec<RawKey>, notes: &Notes) -> Result<Vec<KeyConfig>, ConfigError> {
    let mut keys = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    // The billing account each project named first, and where.
    let mut accounts: HashMap<String, (Option<String>, String)> = HashMap::new();
    for (key, project, billing_account, place) in raw {
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(invalid(format!("{place}: empty key")));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(format!(
                "{place}: a key may hold only visible ASCII characters"
            )));
        }
        let secret = Secret::new(key);
        if !seen.insert(secret.expose().to_string()) {
            log::warn!("{place}: {secret} is listed twice; using it once");
            continue;
        }
        let project = match project.map(|p| p.trim().to_string()) {
            Some(p) if !p.is_empty() => p,
            Some(_) => return Err(invalid(format!("{place}: empty project"))),
            None => secret.fingerprint(),
        };
        let billing_account = match billing_account.map(|b| b.trim().to_string()) {
            Some(b) if b.is_empty() => {
                return Err(invalid(format!("{place}: empty billing account")))
            }
            b => b,
        };
        for (what, name) in [
            ("project", Some(&project)),
            ("billing account", billing_account.as_ref()),
        ] {
            if name.is_some_and(|n| looks_like_a_key(n) || seen.contains(n.as_str())) {
                // Not echoed: it may be a key pasted one place too far.
                return Err(invalid(format!(
                    "{place}: the {what} name looks like an API key; a key's line is `KEY`, `KEY project` or `KEY project billing_account`"
                )));
            }
        }
        match accounts.get(&project) {
            Some((first, first_place)) if *first != billing_account => {
                let name = |b: &Option<String>| match b {
                    Some(b) => format!("billing account {b:?}"),
                    None => "no billing account".into(),
                };
                return Err(invalid(format!(
                    "{place}: project {project:?} is on {} here and on {} at {first_place}; a project has one billing account",
                    name(&billing_account),
                    name(first)
                )));
            }
            Some(_) => {}
            None => {
                accounts.insert(project.clone(), (billing_account.clone(), place.clone()));
            }
        }
        if let Some(note) = notes.get(&place) {
            let quoted = |w: &str| looks_like_a_key(w) || w == secret.expose() || seen.contains(w);
            if note.split_whitespace().any(quoted) {
                return Err(invalid(format!(
                    "{place}.note: the note looks like an API key; name the key's origin instead"
                )));
            }
        }
        keys.push(KeyConfig {
            secret,
            project,
            billing_account,
            note: notes.get(&place).cloned(),
        });
    }
    Ok(keys)
}

/// Whether `name` has the shape of a Google API key (`AIza` and 35 more characters).
fn looks_like_a_key(name: &str) -> bool {
    name.len() == 39 && name.starts_with("AIza")
}

/// Refuses a key note that quotes a key once every pool is read: a note is shown by the admin
/// API and the dashboard. Quoting means holding, anywhere in the note, a key of any pool (one of
/// at least [`QUOTED_LEN`] characters; a shorter one only as a whole word) or a run shaped like
/// a Google API key (`AIza` and 35 of `[0-9A-Za-z_-]`).
pub(super) fn notes_quote_no_key(pools: &[super::PoolConfig]) -> Result<(), ConfigError> {
    let keys: Vec<&str> = pools
        .iter()
        .flat_map(|p| p.keys.iter().map(|k| k.secret.expose()))
        .collect();
    for (i, pool) in pools.iter().enumerate() {
        for (j, key) in pool.keys.iter().enumerate() {
            let Some(note) = &key.note else { continue };
            if quotes_a_key(note, &keys) {
                return Err(invalid(format!(
                    "pools[{i}] ({:?}) key #{}: the note holds an API key; name the key's origin instead",
                    pool.name,
                    j + 1
                )));
            }
        }
    }
    Ok(())
}

/// Whether `text` holds one of `keys` (one of at least [`QUOTED_LEN`] characters anywhere, a
/// shorter one as a whole word) or a run shaped like a Google API key.
pub(crate) fn quotes_a_key(text: &str, keys: &[&str]) -> bool {
    let word = |c: char| c.is_whitespace() || c.is_ascii_punctuation() && c != '-' && c != '_';
    holds_key_shape(text)
        || keys.iter().filter(|k| !k.is_empty()).any(|k| {
            if k.len() >= QUOTED_LEN {
                text.contains(k)
            } else {
                text.split(word).any(|w| w == *k)
            }
        })
}

/// Keys this long are looked for anywhere in a note; shorter ones (made-up test keys) only as
/// whole words, so that a note may say `k1`'s neighbour without quoting `k1`.
const QUOTED_LEN: usize = 12;

/// Whether `text` holds, anywhere, `AIza` followed by 35 of `[0-9A-Za-z_-]`.
fn holds_key_shape(text: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices("AIza").any(|(i, _)| {
        bytes[i + 4..].len() >= 35
            && bytes[i + 4..i + 39]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn numbered_variables_in_order_with_gaps_and_leading_zeros() {
        let env = names(&[
            "K_CHAT_10",
            "K_CHAT_2",
            "K_CHAT",
            "K_CHAT_02",
            "K_CHAT_OLD",
            "K_CHAT_1A",
            "K_CHAT_",
            "K_CHATTY_1",
            "K_CHAT_X_1",
            "K_1",
            "PATH",
        ]);
        assert_eq!(
            numbered_variables("K_CHAT", &env),
            ["K_CHAT", "K_CHAT_02", "K_CHAT_2", "K_CHAT_10"]
        );
        // The bare variable is always asked for, set or not.
        assert_eq!(numbered_variables("NONE", &env), ["NONE"]);
        // A number too long for u128 sorts last, not a panic.
        let long = format!("K_{}", "9".repeat(60));
        assert_eq!(
            numbered_variables("K", &names(&[&long, "K_3"])),
            ["K".to_string(), "K_3".to_string(), long]
        );
    }

    #[test]
    fn env_values_take_keys_env_spelling() {
        let got = env_keys(" a , b:p1,, c:p2:acct ", "$V").unwrap();
        let short: Vec<_> = got
            .iter()
            .map(|(k, p, b, _)| (k.as_str(), p.as_deref(), b.as_deref()))
            .collect();
        assert_eq!(
            short,
            [
                ("a", None, None),
                ("b", Some("p1"), None),
                ("c", Some("p2"), Some("acct"))
            ]
        );
        assert_eq!(got[1].3, "$V, entry 2");
        let e = env_keys("made-up-key:p:b:extra", "$V")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("$V, entry 1") && !e.contains("made-up-key"),
            "{e}"
        );
    }

    use crate::config::Config;
    use std::path::Path;

    #[test]
    fn keys_pasted_as_project_or_billing_names_are_refused_unechoed() {
        let dir = tempfile::tempdir().unwrap();
        let k = |n: u32| format!("AIza{n:0>35}");
        std::fs::write(
            dir.path().join("keys"),
            format!("{} {} {}\n", k(1), k(2), k(3)),
        )
        .unwrap();
        let text = "pools:\n  - name: main\n    upstream: https://x\n    keys_file: keys\n";
        let e = Config::parse(text, dir.path(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("looks like an API key"), "{e}");
        for n in 1..=3 {
            assert!(!e.contains(&k(n)), "{e}");
        }
        // Another configured key in a project's place, whatever its shape.
        let env = Config::parse(
            "pools:\n  - name: main\n    upstream: https://x\n    keys_env: KEYS\n",
            Path::new("."),
            &|_| Some("key-one, key-two:key-one".to_string()),
        );
        let e = env.unwrap_err().to_string();
        assert!(
            e.contains("looks like an API key") && !e.contains("key-one"),
            "{e}"
        );
    }

    #[test]
    fn a_note_rides_with_its_key_and_is_refused_when_it_quotes_one() {
        let yaml = |note: &str| {
            format!(
                "pools:\n  - name: main\n    upstream: https://x\n    keys:\n      - key: made-up-key-1\n        note: {note:?}\n      - made-up-key-2\n"
            )
        };
        let c = Config::parse(&yaml("<b>Bob's</b> laptop"), Path::new("."), &|_| None).unwrap();
        let notes: Vec<_> = c.pools[0].keys.iter().map(|k| k.note.as_deref()).collect();
        assert_eq!(notes, [Some("<b>Bob's</b> laptop"), None]);
        for bad in ["copy of made-up-key-1", "line\none", &"x".repeat(201)] {
            let e = Config::parse(&yaml(bad), Path::new("."), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("keys[0].note") && !e.contains("made-up-key-1"),
                "{e}"
            );
        }
        // Quoted with punctuation, a key listed later or in another pool, a key-shaped run.
        let shaped = format!("key=AIza{}", "x".repeat(35));
        let later = "pools:\n  - name: main\n    upstream: https://x\n    keys:\n      - key: made-up-key-1\n        note: \"(made-up-key-2)\"\n      - made-up-key-2\n";
        let other = "pools:\n  - name: a\n    upstream: https://x\n    keys:\n      - key: made-up-key-1\n        note: \"backup=made-up-key-3\"\n  - name: b\n    upstream: https://x\n    keys: [made-up-key-3]\n";
        for yaml in [yaml(&shaped), later.to_string(), other.to_string()] {
            let e = Config::parse(&yaml, Path::new("."), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("the note holds an API key")
                    && !e.contains("made-up-key")
                    && !e.contains("AIza"),
                "{e}"
            );
        }
    }
}
