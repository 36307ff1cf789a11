//! `model_aliases`: names clients send (`gemini-pro-chat`) for Gemini models
//! (`gemini-2.5-pro`), checked against the pools that will serve them.

use super::validate::invalid;
use super::{ConfigError, PoolConfig};
use std::collections::BTreeMap;

/// Longest alias or target accepted.
const MAX_NAME: usize = 128;

/// The aliases, each mapped to its model (both without a `models/` prefix). An alias must be a
/// plain name (letters, digits, `-`, `_`, `.`), may not stand for itself or for another alias,
/// and its model must be served by some pool.
pub(super) fn validated(
    aliases: &BTreeMap<String, String>,
    pools: &[PoolConfig],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (alias, target) in aliases {
        let alias = bare(alias);
        let target = bare(target);
        let ctx = format!("model_aliases.{alias}");
        for (what, name) in [("the alias", alias), ("its model", target)] {
            if !plain_name(name) {
                return Err(invalid(format!(
                    "{ctx}: {what} {name:?} must be a model name of letters, digits, '-', '_' and '.' (at most {MAX_NAME})"
                )));
            }
        }
        if alias == target {
            return Err(invalid(format!("{ctx}: an alias may not stand for itself")));
        }
        if out.insert(alias.to_string(), target.to_string()).is_some() {
            return Err(invalid(format!(
                "{ctx}: written twice (with and without models/)"
            )));
        }
    }
    for (alias, target) in &out {
        let ctx = format!("model_aliases.{alias}");
        if out.contains_key(target) {
            return Err(invalid(format!(
                "{ctx}: {target:?} is itself an alias; name the model it stands for"
            )));
        }
        if !pools.iter().any(|p| p.serves(target)) {
            return Err(invalid(format!(
                "{ctx}: no pool serves {target:?} (check the pools' models)"
            )));
        }
    }
    Ok(out)
}

/// A name without its `models/` prefix.
fn bare(name: &str) -> &str {
    let name = name.trim();
    name.strip_prefix("models/").unwrap_or(name)
}

/// A model name as it can stand in a path (`/models/{name}:method`) and a body alike.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}
