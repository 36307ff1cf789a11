//! What an upstream answer means for the key that got it: a pure function from status and body
//! to an [`Outcome`], and from an outcome to what the gateway does next ([`Verdict`]).
//!
//! The rules follow Google's documented error shapes (see the README, "How classification
//! works"). Decisions use structured fields (`status`, `ErrorInfo.reason`, `QuotaFailure`
//! quota ids, `RetryInfo`), and fall back to the message text only where Google gives nothing
//! else (location not supported, file permission, unregistered callers).

use chrono::{DateTime, Duration as ChronoDuration, NaiveTime, TimeZone, Utc};
use chrono_tz::America::Los_Angeles;
use serde_json::Value;
use std::time::Duration;

/// Statuses whose body must be read before deciding: they may name a key-level failure.
pub fn needs_body(status: u16) -> bool {
    matches!(status, 400 | 401 | 402 | 403 | 429)
}

/// Largest error body read for classification; a bigger one is classified on this much of its
/// start ([`classify_prefix`]) and never relayed.
pub const MAX_CLASSIFY_BODY: usize = 64 * 1024;

/// Longest cooldown taken from Google's `retryDelay` on a per-minute quota. Google's delays are
/// seconds to a minute; a larger one (seen: "604800s") would take a project out for days on a
/// per-minute limit, so it is cut here. Per-day quotas keep their own rule (midnight in Los
/// Angeles).
pub const MAX_SHORT_COOLDOWN: Duration = Duration::from_secs(3600);

/// What an upstream answer says about the key that received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 1xx/2xx/3xx: hand it to the client.
    Success,
    /// A per-minute (or other short-window) quota of the key's project for this model ran out.
    QuotaShort {
        /// How long until it clears: `RetryInfo.retryDelay` + 1 s, or 60 s when absent.
        cooldown: Duration,
    },
    /// A per-day quota ran out: it resets at midnight in Los Angeles.
    QuotaDaily,
    /// A 429 with no details: Google's shared capacity, not this key's quota.
    SharedCapacity,
    /// 402: the project's prepaid credits are gone.
    BillingExhausted,
    /// The key is invalid, expired, suspended, or its service is disabled.
    KeyDead(DeadReason),
    /// The key may not call this method (`API_KEY_SERVICE_BLOCKED`).
    MethodBlocked,
    /// The gateway's outbound IP is in a region Google does not serve: no key will do better.
    LocationUnsupported,
    /// 403 "unregistered callers": no key reached Google, a gateway bug.
    NoKeyReachedGoogle,
    /// 403 on a file or other resource owned by another project.
    ResourceOfOtherProject,
    /// Any other 4xx: the request itself is wrong; pass it on untouched.
    ClientError,
    /// 500/502/503/504: Google's side; retry with backoff without blaming the key.
    ServerError,
}

/// Why a key was taken out of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// `API_KEY_INVALID` (also expired or not found).
    Invalid,
    /// `CONSUMER_SUSPENDED`.
    Suspended,
    /// `SERVICE_DISABLED`: the Generative Language API is off for the project.
    ServiceDisabled,
    /// The key's restrictions (IP, referrer, app) refuse calls from this gateway.
    Restricted,
}

impl DeadReason {
    /// Short label for logs and the access line.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Invalid => "key_invalid",
            DeadReason::Suspended => "key_suspended",
            DeadReason::ServiceDisabled => "service_disabled",
            DeadReason::Restricted => "key_restricted",
        }
    }
}

impl Outcome {
    /// Whether Google refused the key itself (dead, suspended, out of credit, barred from the
    /// method): such an answer names the key, so it is never relayed.
    pub fn is_key_level(&self) -> bool {
        matches!(
            self,
            Outcome::KeyDead(_) | Outcome::BillingExhausted | Outcome::MethodBlocked
        )
    }

    /// Short label for the access log and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success => "ok",
            Outcome::QuotaShort { .. } => "quota_minute",
            Outcome::QuotaDaily => "quota_day",
            Outcome::SharedCapacity => "shared_capacity",
            Outcome::BillingExhausted => "billing",
            Outcome::KeyDead(r) => r.as_str(),
            Outcome::MethodBlocked => "method_blocked",
            Outcome::LocationUnsupported => "location",
            Outcome::NoKeyReachedGoogle => "unregistered",
            Outcome::ResourceOfOtherProject => "other_project",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
        }
    }

    /// What to do about this outcome at time `now`.
    pub fn verdict(&self, now: DateTime<Utc>) -> Verdict {
        use Penalty as P;
        use Verdict as V;
        match self {
            Outcome::QuotaShort { cooldown } => V::OtherKey(P::CoolProjectModel {
                until: now + ChronoDuration::from_std(*cooldown).unwrap_or(ChronoDuration::MAX),
            }),
            Outcome::QuotaDaily => V::OtherKey(P::CoolProjectModel {
                until: next_midnight_los_angeles(now),
            }),
            Outcome::BillingExhausted => V::OtherKey(P::DisableProject),
            Outcome::KeyDead(reason) => V::OtherKey(P::DisableKey(*reason)),
            Outcome::MethodBlocked => V::OtherKey(P::BlockMethod),
            Outcome::SharedCapacity | Outcome::ServerError => V::Transient,
            Outcome::Success
            | Outcome::LocationUnsupported
            | Outcome::NoKeyReachedGoogle
            | Outcome::ResourceOfOtherProject
            | Outcome::ClientError => V::PassThrough,
        }
    }
}

/// What the attempt loop does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Give this answer to the client.
    PassThrough,
    /// The key's fault: record the penalty and replay on a key of another project.
    OtherKey(Penalty),
    /// Nobody's fault: back off and retry (bounded), without blaming the key.
    Transient,
}

/// How the health table records a key-level failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Penalty {
    /// The key's project may not serve this model until `until`.
    CoolProjectModel {
        /// When the quota clears.
        until: DateTime<Utc>,
    },
    /// Every key of the project is out until an operator acts (billing).
    DisableProject,
    /// This key is out until an operator acts.
    DisableKey(DeadReason),
    /// This key may not call this method.
    BlockMethod,
}

/// Classifies an upstream answer. `body` may be empty (not read) for statuses where
/// [`needs_body`] is false.
pub fn classify(status: u16, body: &[u8]) -> Outcome {
    match status {
        100..=399 => Outcome::Success,
        500 | 502 | 503 | 504 => Outcome::ServerError,
        402 => Outcome::BillingExhausted,
        400 | 401 | 403 | 429 => classify_error(status, &parse_error(body)),
        _ => Outcome::ClientError,
    }
}

/// Classifies an answer of which only the first bytes were read (its body was larger than
/// [`MAX_CLASSIFY_BODY`]): the same rules, on the facts found in the cut JSON. A 429 that shows
/// no detail in its prefix is taken for shared capacity (retried elsewhere, nobody blamed).
pub fn classify_prefix(status: u16, prefix: &[u8]) -> Outcome {
    match status {
        400 | 401 | 403 | 429 => classify_error(status, &facts_from_prefix(prefix)),
        other => classify(other, &[]),
    }
}

/// The facts of an error body that may be cut short: read from its string literals (keys and
/// the values after them) rather than by parsing the whole document.
fn facts_from_prefix(prefix: &[u8]) -> ErrorFacts {
    let mut facts = ErrorFacts::default();
    let mut key = Vec::new();
    for s in crate::wire::json_strings::strings(prefix) {
        let text = s.decoded();
        if s.is_key {
            key = text.into_owned();
            continue;
        }
        let value = String::from_utf8_lossy(&text);
        match key.as_slice() {
            b"status" if facts.status.is_empty() => facts.status = value.into_owned(),
            b"message" if facts.message.is_empty() => facts.message = value.into_owned(),
            b"reason" => facts.reasons.push(value.into_owned()),
            b"quotaId" => facts.quota_ids.push(value.into_owned()),
            b"retryDelay" => facts.retry_delay = parse_retry_delay(&value),
            b"@type" => facts.has_details = true,
            _ => {}
        }
        key.clear();
    }
    facts
}

/// The parts of a Google error body that matter here.
#[derive(Debug, Default)]
struct ErrorFacts {
    status: String,
    message: String,
    reasons: Vec<String>,
    quota_ids: Vec<String>,
    retry_delay: Option<Duration>,
    has_details: bool,
}

fn parse_error(body: &[u8]) -> ErrorFacts {
    let mut facts = ErrorFacts::default();
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return facts;
    };
    // The OpenAI-compatible endpoints wrap the error object in an array.
    let value = match value {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    };
    let Some(error) = value.get("error") else {
        return facts;
    };
    facts.status = error
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    facts.message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let details = error
        .get("details")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    facts.has_details = !details.is_empty();
    for detail in details {
        let kind = detail.get("@type").and_then(Value::as_str).unwrap_or("");
        if kind.ends_with("google.rpc.ErrorInfo") {
            if let Some(reason) = detail.get("reason").and_then(Value::as_str) {
                facts.reasons.push(reason.to_string());
            }
        } else if kind.ends_with("google.rpc.QuotaFailure") {
            for v in detail
                .get("violations")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(id) = v.get("quotaId").and_then(Value::as_str) {
                    facts.quota_ids.push(id.to_string());
                }
            }
        } else if kind.ends_with("google.rpc.RetryInfo") {
            facts.retry_delay = detail
                .get("retryDelay")
                .and_then(Value::as_str)
                .and_then(parse_retry_delay);
        }
    }
    facts
}

fn classify_error(status: u16, facts: &ErrorFacts) -> Outcome {
    let has_reason = |r: &str| facts.reasons.iter().any(|x| x == r);
    if has_reason("API_KEY_INVALID") || has_reason("API_KEY_EXPIRED") {
        return Outcome::KeyDead(DeadReason::Invalid);
    }
    if has_reason("CONSUMER_SUSPENDED") {
        return Outcome::KeyDead(DeadReason::Suspended);
    }
    if has_reason("SERVICE_DISABLED") {
        return Outcome::KeyDead(DeadReason::ServiceDisabled);
    }
    if has_reason("API_KEY_IP_ADDRESS_BLOCKED")
        || has_reason("API_KEY_HTTP_REFERRER_BLOCKED")
        || has_reason("API_KEY_ANDROID_APP_BLOCKED")
        || has_reason("API_KEY_IOS_APP_BLOCKED")
    {
        return Outcome::KeyDead(DeadReason::Restricted);
    }
    if has_reason("API_KEY_SERVICE_BLOCKED") {
        return Outcome::MethodBlocked;
    }
    match status {
        429 => classify_429(facts),
        400 if facts.status == "FAILED_PRECONDITION"
            && facts.message.contains("location is not supported") =>
        {
            Outcome::LocationUnsupported
        }
        403 if facts.message.contains("unregistered callers") => Outcome::NoKeyReachedGoogle,
        403 if facts.message.contains("permission to access")
            || facts.message.contains("may not exist") =>
        {
            Outcome::ResourceOfOtherProject
        }
        _ => Outcome::ClientError,
    }
}

fn classify_429(facts: &ErrorFacts) -> Outcome {
    if !facts.has_details {
        return Outcome::SharedCapacity;
    }
    // Several violations may come together: the longest one wins, and a per-day quota is
    // longer than any per-minute one (its short retryDelay is to be ignored).
    if facts.quota_ids.iter().any(|id| id.contains("PerDay")) {
        return Outcome::QuotaDaily;
    }
    if facts.quota_ids.is_empty() && facts.retry_delay.is_none() {
        return Outcome::SharedCapacity;
    }
    let cooldown = facts
        .retry_delay
        .map(|d| (d + Duration::from_secs(1)).min(MAX_SHORT_COOLDOWN))
        .unwrap_or(Duration::from_secs(60));
    Outcome::QuotaShort { cooldown }
}

/// Parses a protobuf JSON duration as Google writes it: whole seconds, an optional fraction of
/// one to nine digits, and `s` (`"53s"`, `"0.5s"`, `"1.234567s"`). Anything else (`"1e5s"`,
/// `"-1s"`, `"53"`, `" 5s"`) is not a duration.
pub fn parse_retry_delay(text: &str) -> Option<Duration> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || whole.len() > 12 || !digits(whole) {
        return None;
    }
    if number.contains('.') && (fraction.is_empty() || fraction.len() > 9 || !digits(fraction)) {
        return None;
    }
    let secs: u64 = whole.parse().ok()?;
    let nanos: u32 = format!("{fraction:0<9}").parse().ok()?;
    Some(Duration::new(secs, nanos))
}

/// The next midnight in America/Los_Angeles after `now`, when Google's per-day quotas reset.
/// Daylight saving time is applied: a day there is 23, 24 or 25 hours long.
pub fn next_midnight_los_angeles(now: DateTime<Utc>) -> DateTime<Utc> {
    let local = now.with_timezone(&Los_Angeles);
    let mut day = local.date_naive();
    // Walk forward from tomorrow; midnight always exists in Los Angeles (DST changes at 2 am),
    // but do not rely on it: take the earliest valid instant of the day.
    for _ in 0..3 {
        day = day.succ_opt().unwrap_or(day);
        let naive = day.and_time(NaiveTime::MIN);
        if let Some(t) = Los_Angeles.from_local_datetime(&naive).earliest() {
            return t.with_timezone(&Utc);
        }
    }
    // Unreachable with a sane tz database; a day later is a safe answer.
    now + ChronoDuration::days(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_MINUTE: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. ...","status":"RESOURCE_EXHAUSTED","details":[
 {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-pro"},"quotaValue":"5"}]},
 {"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"...","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},
 {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"53s"}]}}"#;

    fn with_quota(ids: &[&str], delay: Option<&str>) -> String {
        let violations: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"quotaId":"{id}","quotaDimensions":{{"model":"m"}}}}"#))
            .collect();
        let mut details = vec![format!(
            r#"{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{}]}}"#,
            violations.join(",")
        )];
        if let Some(d) = delay {
            details.push(format!(
                r#"{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{d}"}}"#
            ));
        }
        format!(
            r#"{{"error":{{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{}]}}}}"#,
            details.join(",")
        )
    }

    fn error_info(code: u16, status: &str, message: &str, reason: &str) -> String {
        format!(
            r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}","details":[{{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"{reason}","domain":"googleapis.com","metadata":{{"service":"generativelanguage.googleapis.com"}}}}]}}}}"#
        )
    }

    fn plain(code: u16, status: &str, message: &str) -> String {
        format!(r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}"}}}}"#)
    }

    #[test]
    fn per_minute_quota_cools_for_retry_delay_plus_one_second() {
        assert_eq!(
            classify(429, PER_MINUTE.as_bytes()),
            Outcome::QuotaShort {
                cooldown: Duration::from_secs(54)
            }
        );
        let tokens = with_quota(
            &["GenerateContentInputTokensPerModelPerMinute"],
            Some("7.5s"),
        );
        assert_eq!(
            classify(429, tokens.as_bytes()),
            Outcome::QuotaShort {
                cooldown: Duration::from_millis(8500)
            }
        );
    }

    #[test]
    fn a_long_retry_delay_on_a_per_minute_quota_is_capped() {
        let week = with_quota(
            &["GenerateRequestsPerMinutePerProjectPerModel"],
            Some("604800s"),
        );
        assert_eq!(
            classify(429, week.as_bytes()),
            Outcome::QuotaShort {
                cooldown: MAX_SHORT_COOLDOWN
            }
        );
        // Not Duration syntax: as if there were no RetryInfo (a minute).
        let odd = with_quota(
            &["GenerateRequestsPerMinutePerProjectPerModel"],
            Some("1e5s"),
        );
        assert_eq!(
            classify(429, odd.as_bytes()),
            Outcome::QuotaShort {
                cooldown: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn a_body_cut_at_the_limit_is_classified_on_its_prefix() {
        let padded = PER_MINUTE.replace(
            r#""description":"...""#,
            &format!(r#""description":"{}""#, "x".repeat(70_000)),
        );
        let prefix = &padded.as_bytes()[..MAX_CLASSIFY_BODY];
        // The RetryInfo is past the cut: the quota id alone says per minute, a minute's cooldown.
        assert_eq!(
            classify_prefix(429, prefix),
            Outcome::QuotaShort {
                cooldown: Duration::from_secs(60)
            }
        );
        let daily = with_quota(
            &["GenerateRequestsPerDayPerProjectPerModel-FreeTier"],
            Some("22s"),
        );
        assert_eq!(
            classify_prefix(429, &daily.as_bytes()[..daily.len() - 5]),
            Outcome::QuotaDaily
        );
        let suspended = error_info(
            403,
            "PERMISSION_DENIED",
            "Consumer has been suspended.",
            "CONSUMER_SUSPENDED",
        );
        assert_eq!(
            classify_prefix(403, &suspended.as_bytes()[..suspended.len() - 10]),
            Outcome::KeyDead(DeadReason::Suspended)
        );
        assert_eq!(
            classify_prefix(429, br#"{"error":{"code":429,"message":"xxxx"#),
            Outcome::SharedCapacity
        );
        assert_eq!(classify_prefix(400, b"garbage"), Outcome::ClientError);
        assert_eq!(classify_prefix(503, b""), Outcome::ServerError);
        assert!(Outcome::KeyDead(DeadReason::Invalid).is_key_level());
        assert!(Outcome::BillingExhausted.is_key_level());
        assert!(Outcome::MethodBlocked.is_key_level());
        assert!(!Outcome::QuotaDaily.is_key_level());
    }

    #[test]
    fn per_minute_quota_without_retry_info_cools_a_minute() {
        let body = with_quota(&["GenerateRequestsPerMinutePerProjectPerModel"], None);
        assert_eq!(
            classify(429, body.as_bytes()),
            Outcome::QuotaShort {
                cooldown: Duration::from_secs(60)
            }
        );
    }

    #[test]
    fn per_day_quota_ignores_its_short_retry_delay_and_wins_over_per_minute() {
        let day = with_quota(
            &["GenerateRequestsPerDayPerProjectPerModel-FreeTier"],
            Some("22s"),
        );
        assert_eq!(classify(429, day.as_bytes()), Outcome::QuotaDaily);
        let both = with_quota(
            &[
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
            ],
            Some("22s"),
        );
        assert_eq!(classify(429, both.as_bytes()), Outcome::QuotaDaily);
    }

    #[test]
    fn bare_429_is_shared_capacity() {
        let body = plain(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
        );
        assert_eq!(classify(429, body.as_bytes()), Outcome::SharedCapacity);
        assert_eq!(classify(429, b"not json"), Outcome::SharedCapacity);
        assert_eq!(classify(429, b""), Outcome::SharedCapacity);
    }

    #[test]
    fn billing_and_dead_keys() {
        let body = plain(
            402,
            "RESOURCE_EXHAUSTED",
            "Your prepayment credits are depleted.",
        );
        assert_eq!(classify(402, body.as_bytes()), Outcome::BillingExhausted);
        let invalid = error_info(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            "API_KEY_INVALID",
        );
        assert_eq!(
            classify(400, invalid.as_bytes()),
            Outcome::KeyDead(DeadReason::Invalid)
        );
        // The reason decides, not the message: "API key expired" carries the same reason.
        let expired = error_info(
            400,
            "INVALID_ARGUMENT",
            "API key expired. Please renew the API key.",
            "API_KEY_INVALID",
        );
        assert_eq!(
            classify(400, expired.as_bytes()),
            Outcome::KeyDead(DeadReason::Invalid)
        );
        let suspended = error_info(
            403,
            "PERMISSION_DENIED",
            "Permission denied: Consumer has been suspended.",
            "CONSUMER_SUSPENDED",
        );
        assert_eq!(
            classify(403, suspended.as_bytes()),
            Outcome::KeyDead(DeadReason::Suspended)
        );
        let disabled = error_info(
            403,
            "PERMISSION_DENIED",
            "API has not been used in project",
            "SERVICE_DISABLED",
        );
        assert_eq!(
            classify(403, disabled.as_bytes()),
            Outcome::KeyDead(DeadReason::ServiceDisabled)
        );
        let blocked = error_info(
            403,
            "PERMISSION_DENIED",
            "Requests to this API method are blocked.",
            "API_KEY_SERVICE_BLOCKED",
        );
        assert_eq!(classify(403, blocked.as_bytes()), Outcome::MethodBlocked);
    }

    #[test]
    fn openai_array_wrapped_errors_are_understood() {
        let invalid = error_info(
            400,
            "INVALID_ARGUMENT",
            "API key not valid.",
            "API_KEY_INVALID",
        );
        let wrapped = format!("[{invalid}]");
        assert_eq!(
            classify(400, wrapped.as_bytes()),
            Outcome::KeyDead(DeadReason::Invalid)
        );
        let quota = format!("[{PER_MINUTE}]");
        assert!(matches!(
            classify(429, quota.as_bytes()),
            Outcome::QuotaShort { .. }
        ));
    }

    #[test]
    fn answers_that_are_not_the_keys_fault() {
        let location = plain(
            400,
            "FAILED_PRECONDITION",
            "User location is not supported for the API use.",
        );
        assert_eq!(
            classify(400, location.as_bytes()),
            Outcome::LocationUnsupported
        );
        let unregistered = plain(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.");
        assert_eq!(
            classify(403, unregistered.as_bytes()),
            Outcome::NoKeyReachedGoogle
        );
        let file = plain(
            403,
            "PERMISSION_DENIED",
            "You do not have permission to access the File abc or it may not exist.",
        );
        assert_eq!(
            classify(403, file.as_bytes()),
            Outcome::ResourceOfOtherProject
        );
        let bad_request = plain(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
        assert_eq!(classify(400, bad_request.as_bytes()), Outcome::ClientError);
        assert_eq!(classify(404, b""), Outcome::ClientError);
        assert_eq!(classify(503, b""), Outcome::ServerError);
        assert_eq!(classify(500, b""), Outcome::ServerError);
        assert_eq!(classify(501, b""), Outcome::ClientError);
        assert_eq!(classify(200, b""), Outcome::Success);
    }

    #[test]
    fn verdicts_follow_the_table() {
        let now = Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap();
        assert_eq!(
            Outcome::QuotaShort {
                cooldown: Duration::from_secs(54)
            }
            .verdict(now),
            Verdict::OtherKey(Penalty::CoolProjectModel {
                until: now + ChronoDuration::seconds(54)
            })
        );
        assert_eq!(Outcome::SharedCapacity.verdict(now), Verdict::Transient);
        assert_eq!(Outcome::ServerError.verdict(now), Verdict::Transient);
        assert_eq!(Outcome::ClientError.verdict(now), Verdict::PassThrough);
        assert_eq!(
            Outcome::LocationUnsupported.verdict(now),
            Verdict::PassThrough
        );
        assert_eq!(
            Outcome::ResourceOfOtherProject.verdict(now),
            Verdict::PassThrough
        );
        assert_eq!(
            Outcome::BillingExhausted.verdict(now),
            Verdict::OtherKey(Penalty::DisableProject)
        );
    }

    #[test]
    fn retry_delays_parse() {
        assert_eq!(parse_retry_delay("53s"), Some(Duration::from_secs(53)));
        assert_eq!(parse_retry_delay("0.25s"), Some(Duration::from_millis(250)));
        assert_eq!(parse_retry_delay("53"), None);
        assert_eq!(parse_retry_delay("-1s"), None);
        assert_eq!(parse_retry_delay("NaNs"), None);
        assert_eq!(parse_retry_delay("1e5s"), None);
        assert_eq!(parse_retry_delay(" 5s"), None);
        assert_eq!(parse_retry_delay("5.s"), None);
        assert_eq!(parse_retry_delay(".5s"), None);
        assert_eq!(parse_retry_delay("1.0000000001s"), None);
        assert_eq!(parse_retry_delay("inf s"), None);
        assert_eq!(
            parse_retry_delay("1.234567891s"),
            Some(Duration::new(1, 234_567_891))
        );
        assert_eq!(
            parse_retry_delay("604800s"),
            Some(Duration::from_secs(604_800))
        );
        assert_eq!(parse_retry_delay("99999999999999s"), None);
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn daily_reset_in_winter_and_summer() {
        // 2026-01-15 10:00 PST = 18:00 UTC; next midnight PST = 2026-01-16 08:00 UTC.
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 1, 15, 18, 0)),
            utc(2026, 1, 16, 8, 0)
        );
        // 2026-07-15 10:00 PDT = 17:00 UTC; next midnight PDT = 2026-07-16 07:00 UTC.
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 7, 15, 17, 0)),
            utc(2026, 7, 16, 7, 0)
        );
        // One minute before midnight: the reset is one minute away, not a day.
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 7, 16, 6, 59)),
            utc(2026, 7, 16, 7, 0)
        );
        // Exactly at midnight: the next reset is the following one.
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 7, 16, 7, 0)),
            utc(2026, 7, 17, 7, 0)
        );
    }

    #[test]
    fn daily_reset_across_spring_forward() {
        // DST starts 2026-03-08 at 02:00 PST. The day of March 8 is 23 hours long.
        let before = utc(2026, 3, 8, 7, 30); // 2026-03-07 23:30 PST
        assert_eq!(next_midnight_los_angeles(before), utc(2026, 3, 8, 8, 0));
        let after = utc(2026, 3, 8, 19, 0); // 2026-03-08 12:00 PDT
        assert_eq!(next_midnight_los_angeles(after), utc(2026, 3, 9, 7, 0));
        let day_start = utc(2026, 3, 8, 8, 0);
        assert_eq!(
            next_midnight_los_angeles(day_start) - day_start,
            ChronoDuration::hours(23)
        );
    }

    #[test]
    fn daily_reset_across_fall_back() {
        // DST ends 2026-11-01 at 02:00 PDT. The day of November 1 is 25 hours long.
        let before = utc(2026, 11, 1, 6, 30); // 2026-10-31 23:30 PDT
        assert_eq!(next_midnight_los_angeles(before), utc(2026, 11, 1, 7, 0));
        let day_start = utc(2026, 11, 1, 7, 0);
        assert_eq!(next_midnight_los_angeles(day_start), utc(2026, 11, 2, 8, 0));
        assert_eq!(
            next_midnight_los_angeles(day_start) - day_start,
            ChronoDuration::hours(25)
        );
        // 01:30 happens twice that night; either way the reset is the coming midnight PST.
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 11, 1, 8, 30)), // 01:30 PDT
            utc(2026, 11, 2, 8, 0)
        );
        assert_eq!(
            next_midnight_los_angeles(utc(2026, 11, 1, 9, 30)), // 01:30 PST
            utc(2026, 11, 2, 8, 0)
        );
    }
}
