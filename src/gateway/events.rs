//! A refusal that changed a key's health, written down for the dashboard's recent quota events:
//! the key by its fingerprint, and Google's message only once every pool key in it is replaced.

use crate::quota::classify::{Outcome, Penalty, MAX_CLASSIFY_BODY};
use crate::quota::keys::{Changed, KeyId, KeyPool, Millis};
use crate::telemetry::events::QuotaEvent;
use crate::upstream::exchange::{decoded_body, Answer};

/// Longest message kept, in characters.
const MAX_MESSAGE: usize = 300;

/// Whether applying `penalty` changed anything worth an event: a burst of requests refused
/// together sets one cooldown, and writes one event, not one per request.
pub(super) fn is_news(penalty: &Penalty, changed: &Changed) -> bool {
    match penalty {
        Penalty::CoolProjectModel { .. } => changed.cooled || changed.escalated.is_some(),
        Penalty::CapProject { .. } | Penalty::CapBillingAccount { .. } => changed.capped.is_some(),
        Penalty::DisableProject | Penalty::DisableKey(_) | Penalty::BlockMethod => true,
    }
}

/// Longest model name kept, in characters (a client chooses it).
const MAX_MODEL: usize = 200;

/// The event for `answer` (classified `outcome`) that made keygate apply `penalty` to `key`.
pub(super) fn quota_event(
    keys: &KeyPool,
    key: KeyId,
    model: &str,
    outcome: &Outcome,
    penalty: &Penalty,
    changed: &Changed,
    answer: &Answer,
) -> QuotaEvent {
    let now = crate::quota::keys::now_millis();
    let ms = |t: &chrono::DateTime<chrono::Utc>| t.timestamp_millis().max(0) as Millis;
    let (action, until) = match penalty {
        Penalty::CoolProjectModel { until, .. } => (
            "cooling",
            Some(changed.escalated.map_or(ms(until), |len| now + len)),
        ),
        Penalty::CapProject { until, .. } | Penalty::CapBillingAccount { until } => {
            ("capped", Some(ms(until)))
        }
        Penalty::DisableProject | Penalty::DisableKey(_) => ("disabled", None),
        Penalty::BlockMethod => ("method_blocked", None),
    };
    let pool_key = keys.key(key);
    QuotaEvent {
        at: now,
        pool: keys.name().to_string(),
        key: pool_key.fingerprint.clone(),
        project: keys.project_name(pool_key.project).to_string(),
        model: model.chars().take(MAX_MODEL).collect(),
        reason: outcome.label(),
        action,
        until,
        message: google_message(keys, answer),
    }
}

/// `error.message` of Google's JSON answer, scrubbed of the pool's keys and clipped.
fn google_message(keys: &KeyPool, answer: &Answer) -> Option<String> {
    let body = decoded_body(answer, MAX_CLASSIFY_BODY);
    // The body first (keys escaped or %-encoded in its strings), then the message as decoded.
    let json: serde_json::Value = serde_json::from_slice(&keys.scrubber().body(&body)).ok()?;
    // Google's OpenAI-compatible endpoints wrap the error in a list.
    let error = json.get(0).unwrap_or(&json);
    let message = error.pointer("/error/message")?.as_str()?;
    let scrubbed = keys.scrubber().body(message.as_bytes());
    let text = String::from_utf8_lossy(&scrubbed);
    Some(text.chars().take(MAX_MESSAGE).collect())
}
