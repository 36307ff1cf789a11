//! Model aliases (`model_aliases`) on the wire: a request naming an alias is rewritten to name
//! the model it stands for, in the path (`/models/{model}:method`) and in the body's top-level
//! `model` (the one body rewrite keygate makes: only that value changes, every other byte stays);
//! a model listing gets the aliases added, each saying what it stands for.
//!
//! Answers are not rewritten otherwise: Google names the real model in them (`modelVersion`, an
//! OpenAI-style `model`), which no client checks against what it asked for, and a client that
//! reads it learns what actually served it.

use crate::wire::json_strings;
use crate::wire::request::{model_from_path, Api};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// A request naming an alias, as it goes upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The model it stands for: what the request is routed, limited, cooled and counted as.
    pub model: String,
    /// The path naming the model (unchanged when the alias was in the body only).
    pub path: String,
    /// The body naming the model, when its top-level `model` named the alias.
    pub body: Option<Vec<u8>>,
}

/// Resolves the alias a request names, if it names one. `model` is what
/// [`crate::wire::request::model_of`] read (exactly one `model` already checked), `path` the
/// canonical path. An OpenAI-style model lookup (`/openai/models/{alias}`) names its model in
/// the path. `Err` when the alias sits where keygate does not rewrite it (a tuned model's
/// `baseModel`): Google would be asked for a model it does not know.
pub fn resolve(
    aliases: &BTreeMap<String, String>,
    api: Api,
    path: &str,
    model: &str,
    body: &[u8],
) -> Result<Option<Resolved>, String> {
    if aliases.is_empty() {
        return Ok(None);
    }
    let model = match model {
        "" if api == Api::OpenAi && path.contains("/openai/models/") => {
            model_from_path(path).unwrap_or_default()
        }
        model => model,
    };
    let Some(target) = aliases.get(model) else {
        return Ok(None);
    };
    let new_path = rewrite_path(path, model, target);
    let new_body = rewrite_body_model(body, model, target);
    if new_path.is_none() && new_body.is_none() {
        return Err(format!(
            "the model alias '{model}' is understood in the path (/models/{model}:method) and in a body's top-level \"model\"; name '{target}' here"
        ));
    }
    Ok(Some(Resolved {
        model: target.clone(),
        path: new_path.unwrap_or_else(|| path.to_string()),
        body: new_body,
    }))
}

/// `path` with its `/models/{alias}` segment naming `target` instead; `None` when the path does
/// not name `alias` there.
pub fn rewrite_path(path: &str, alias: &str, target: &str) -> Option<String> {
    let start = path.find("/models/")? + "/models/".len();
    let rest = &path[start..];
    let end = rest.find([':', '/']).unwrap_or(rest.len());
    (&rest[..end] == alias).then(|| format!("{}{target}{}", &path[..start], &rest[end..]))
}

/// `body` with its top-level `model` (`alias` or `models/alias`) naming `target` instead
/// (`models/` kept as written); every other byte as it was. `None` when the body's top-level
/// `model` does not name `alias`.
pub fn rewrite_body_model(body: &[u8], alias: &str, target: &str) -> Option<Vec<u8>> {
    if body.is_empty() {
        return None;
    }
    let mut found = None;
    json_strings::walk(body, |value| {
        if value.path.len() == 1 && value.path[0] == b"model" {
            found = Some((
                value.string.span.clone(),
                value.string.decoded().into_owned(),
            ));
            return false;
        }
        true
    });
    let (span, named) = found?;
    let named = String::from_utf8(named).ok()?;
    let (prefix, name) = match named.strip_prefix("models/") {
        Some(name) => ("models/", name),
        None => ("", named.as_str()),
    };
    if name != alias {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + target.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(&json_strings::quote(format!("{prefix}{target}").as_bytes()));
    out.extend_from_slice(&body[span.end..]);
    Some(out)
}

/// Whether `path` (canonical, no query) lists models: the native listing (`/v1beta/models`,
/// also `/v1/`, `/v1alpha/`) or the OpenAI-style one (`/v1beta/openai/models`).
pub fn is_model_listing(path: &str) -> bool {
    matches!(
        path.trim_end_matches('/'),
        "/v1/models" | "/v1beta/models" | "/v1alpha/models" | "/v1beta/openai/models"
    )
}

/// A model listing (native `{"models": [...]}` or OpenAI-style `{"data": [...]}`) with an
/// entry added for each (alias, model): a copy of the model's own entry when the page holds it,
/// named for the alias and saying what it stands for. `None` when the answer is neither.
pub fn add_to_listing(answer: &[u8], aliases: &[(&str, &str)]) -> Option<Vec<u8>> {
    let Value::Object(mut top) = serde_json::from_slice(answer).ok()? else {
        return None;
    };
    if let Some(Value::Array(models)) = top.get_mut("models") {
        for (alias, target) in aliases {
            let real = format!("models/{target}");
            let mut entry = find(models, "name", &real).unwrap_or_default();
            entry.insert("name".into(), json!(format!("models/{alias}")));
            entry.insert("baseModelId".into(), json!(target));
            entry.insert("displayName".into(), json!(alias));
            entry.insert(
                "description".into(),
                json!(format!("keygate alias of {real}")),
            );
            models.push(Value::Object(entry));
        }
    } else if let Some(Value::Array(data)) = top.get_mut("data") {
        // Google's own ids read `models/...`: the aliases' follow the page.
        let prefixed = data.iter().all(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| id.starts_with("models/"))
        });
        let prefix = if prefixed { "models/" } else { "" };
        for (alias, target) in aliases {
            let real = format!("{prefix}{target}");
            let mut entry = find(data, "id", &real).unwrap_or_else(|| {
                let mut m = Map::new();
                m.insert("object".into(), json!("model"));
                m.insert("owned_by".into(), json!("google"));
                m
            });
            entry.insert("id".into(), json!(format!("{prefix}{alias}")));
            entry.insert("alias_of".into(), json!(real));
            data.push(Value::Object(entry));
        }
    } else {
        return None;
    }
    serde_json::to_vec(&top).ok()
}

/// A copy of the object in `items` whose `field` is `value`.
fn find(items: &[Value], field: &str, value: &str) -> Option<Map<String, Value>> {
    items.iter().find_map(|item| match item {
        Value::Object(m) if m.get(field).and_then(Value::as_str) == Some(value) => Some(m.clone()),
        _ => None,
    })
}

#[cfg(test)]
mod tests;
