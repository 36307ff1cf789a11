//! What an upstream answer means for the key that got it: a pure function from status and body
//! to an [`Outcome`], and from an outcome to what the gateway does next ([`Verdict`]).
//!
//! The rules follow Google's documented error shapes (see the README, "How classification
//! works"). Decisions use structured fields (`status`, `ErrorInfo.reason`, `QuotaFailure`
//! quota ids and values, `RetryInfo`), and fall back to the message text only where Google
//! gives nothing else (location not supported, file permission, unregistered callers, the
//! limits above the project, a detail-less quota refusal); each fallback is a named function
//! with its source, pinned by a test.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveTime, TimeZone, Utc};
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

/// How long a spend-based rate limit holds when Google gives no `retryDelay`: its rolling
/// window ("about 10 minutes", Gemini API rate-limits page, "Spend-based rate limits", 2026).
pub const SPEND_WINDOW: Duration = Duration::from_secs(600);

/// How long a detail-less quota refusal cools its (project, model) the first time.
pub const UNSPECIFIED_COOLDOWN: Duration = Duration::from_secs(60);

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
    /// The model is not in the project's tier (a quota of `limit: 0`): it will not serve there
    /// today, whatever `retryDelay` says.
    TierUnavailable,
    /// "You exceeded your current quota" with no details: the project's own quota for this
    /// model, of a window Google does not say.
    QuotaUnspecified,
    /// The billing account's monthly spending cap: every project on it stops, for every model,
    /// until the month turns or the cap is raised.
    BillingAccountCapped,
    /// The project's own monthly spend cap: the project stops, for every model, until the
    /// month turns or the cap is raised.
    ProjectCapped,
    /// A spend-based rate limit: the project stops, for every model, for `window`.
    SpendRateLimited {
        /// `RetryInfo.retryDelay`, or [`SPEND_WINDOW`] when absent.
        window: Duration,
    },
    /// A 429 that blames nobody's key: Google's shared capacity (no details, "Resource has
    /// been exhausted"), or no capacity for the model (`MODEL_CAPACITY_EXHAUSTED`).
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
    /// A relay in front of Google (Cloudflare's AI Gateway, a corporate relay) refused the
    /// request itself: its own 401 or 429, not Google's. No key is to blame, and no other key
    /// would do better.
    RelayRefused,
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
            Outcome::TierUnavailable => "tier_unavailable",
            Outcome::QuotaUnspecified => "quota_unspecified",
            Outcome::BillingAccountCapped => "billing_account_cap",
            Outcome::ProjectCapped => "project_cap",
            Outcome::SpendRateLimited { .. } => "spend_rate",
            Outcome::SharedCapacity => "shared_capacity",
            Outcome::BillingExhausted => "billing",
            Outcome::KeyDead(r) => r.as_str(),
            Outcome::MethodBlocked => "method_blocked",
            Outcome::LocationUnsupported => "location",
            Outcome::NoKeyReachedGoogle => "unregistered",
            Outcome::ResourceOfOtherProject => "other_project",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::RelayRefused => "relay_refused",
        }
    }

    /// What to do about this outcome at time `now`.
    pub fn verdict(&self, now: DateTime<Utc>) -> Verdict {
        use Penalty as P;
        use Verdict as V;
        let after =
            |d: &Duration| now + ChronoDuration::from_std(*d).unwrap_or(ChronoDuration::MAX);
        // Computed only for the outcomes that need them: a success, the common case, needs neither.
        let midnight = || next_midnight_los_angeles(now);
        let month = || next_month_los_angeles(now);
        match self {
            Outcome::QuotaShort { cooldown } => V::OtherKey(P::CoolProjectModel {
                until: after(cooldown),
                why: Cooling::Quota {
                    ceiling: midnight(),
                },
            }),
            Outcome::QuotaUnspecified => V::OtherKey(P::CoolProjectModel {
                until: after(&UNSPECIFIED_COOLDOWN),
                why: Cooling::Quota {
                    ceiling: midnight(),
                },
            }),
            Outcome::QuotaDaily => V::OtherKey(P::CoolProjectModel {
                until: midnight(),
                why: Cooling::Day,
            }),
            Outcome::TierUnavailable => V::OtherKey(P::CoolProjectModel {
                until: midnight(),
                why: Cooling::Tier,
            }),
            Outcome::BillingAccountCapped => V::OtherKey(P::CapBillingAccount { until: month() }),
            Outcome::ProjectCapped => V::OtherKey(P::CapProject {
                until: month(),
                why: Cap::SpendCap,
            }),
            Outcome::SpendRateLimited { window } => V::OtherKey(P::CapProject {
                until: after(window),
                why: Cap::SpendRate,
            }),
            Outcome::BillingExhausted => V::OtherKey(P::DisableProject),
            Outcome::KeyDead(reason) => V::OtherKey(P::DisableKey(*reason)),
            Outcome::MethodBlocked => V::OtherKey(P::BlockMethod),
            Outcome::SharedCapacity | Outcome::ServerError => V::Transient,
            Outcome::RelayRefused => V::NotGoogle,
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
    /// The relay in front of Google refused: answer keygate's own 502, blaming no key.
    NotGoogle,
}

/// How the health table records a key-level failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Penalty {
    /// The key's project may not serve this model until `until`.
    CoolProjectModel {
        /// When the quota clears.
        until: DateTime<Utc>,
        /// Which kind of quota it is.
        why: Cooling,
    },
    /// The key's project may not serve any model until `until`.
    CapProject {
        /// When the cap ends on its own.
        until: DateTime<Utc>,
        /// Which cap it is.
        why: Cap,
    },
    /// No project of the key's billing account may serve any model until `until` (the month
    /// turns), unless a probe finds the cap raised.
    CapBillingAccount {
        /// The first instant of next month in Los Angeles.
        until: DateTime<Utc>,
    },
    /// Every key of the project is out until an operator acts (billing).
    DisableProject,
    /// This key is out until an operator acts.
    DisableKey(DeadReason),
    /// This key may not call this method.
    BlockMethod,
}

/// Why a (project, model) cools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cooling {
    /// A quota of Google's stated (or unstated) short window. A repeat soon after it ended
    /// escalates it (doubling), never past `ceiling`.
    Quota {
        /// The longest an escalated cooldown may last: the next midnight in Los Angeles.
        ceiling: DateTime<Utc>,
    },
    /// A per-day quota: until midnight in Los Angeles.
    Day,
    /// The model is not in the project's tier: until midnight in Los Angeles.
    Tier,
}

/// Why a whole project stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Its monthly spend cap: until the month turns, probed meanwhile.
    SpendCap,
    /// A spend-based rate limit: for its window.
    SpendRate,
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

/// Classifies an answer that came through a relay in front of Google (an upstream with a base
/// path or headers of its own; `complete`: the whole body was read, else its start). A 400,
/// 401, 402, 403 or 429 whose body is not Google's error object (`{"error":{..., "status": "..."}}`, or that
/// wrapped in an array on the OpenAI-compatible paths) is the relay's own refusal: Cloudflare's
/// AI Gateway writes `{"success":false,"error":[{"code":2009,"message":"Unauthorized"}]}`, a
/// proxy an HTML page. Everything else is classified as Google's.
pub fn classify_relayed(status: u16, body: &[u8], complete: bool) -> Outcome {
    // Any refusal whose body is read (400, 401, 402, 403, 429): Google's always carry its
    // error object, a relay's own do not.
    if needs_body(status) {
        let facts = if complete {
            parse_error(body)
        } else {
            facts_from_prefix(body)
        };
        if facts.status.is_empty() {
            return Outcome::RelayRefused;
        }
    }
    if complete {
        classify(status, body)
    } else {
        classify_prefix(status, body)
    }
}

/// Classifies an answer of which only the first bytes were read (its body was larger than
/// [`MAX_CLASSIFY_BODY`]): the same rules, on the facts found in the cut JSON (a 429 that shows
/// no detail in its prefix is read as a detail-less one).
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
            b"quotaValue" => facts.quota_values.push(value.into_owned()),
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
    /// `QuotaFailure` violations' `quotaValue`s (the limit), as written.
    quota_values: Vec<String>,
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
        // A reason counts wherever it is: an ErrorInfo's, or a bare `{"reason": ...}` detail
        // (the capacity refusal is captured that way).
        if let Some(reason) = detail.get("reason").and_then(Value::as_str) {
            facts.reasons.push(reason.to_string());
        }
        if kind.ends_with("google.rpc.QuotaFailure") {
            for v in detail
                .get("violations")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(id) = v.get("quotaId").and_then(Value::as_str) {
                    facts.quota_ids.push(id.to_string());
                }
                if let Some(limit) = v.get("quotaValue").and_then(Value::as_str) {
                    facts.quota_values.push(limit.to_string());
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
    let has_reason = |r: &str| facts.reasons.iter().any(|x| x == r);
    // "No capacity available for model on the server": nobody's key (shared notes, 2026).
    if has_reason("MODEL_CAPACITY_EXHAUSTED") {
        return Outcome::SharedCapacity;
    }
    // Limits above the project carry no structured field of their own in the answers seen so
    // far: they are told apart by their message, each a named, tested fallback below.
    let words = without_links(&facts.message);
    // A quota id naming a spend limit is structured: it wins over any message.
    let spend_quota = facts.quota_ids.iter().any(|id| id.contains("Spend"));
    if !spend_quota && is_billing_account_cap(&words) {
        return Outcome::BillingAccountCapped;
    }
    if !spend_quota && is_project_spend_cap(&words) {
        return Outcome::ProjectCapped;
    }
    if spend_quota || is_spend_rate_limit(&words) {
        return Outcome::SpendRateLimited {
            // A window of under a second would not stop the project at all.
            window: facts
                .retry_delay
                .filter(|d| *d >= Duration::from_secs(1))
                .map_or(SPEND_WINDOW, |d| d.min(MAX_SHORT_COOLDOWN)),
        };
    }
    if is_limit_zero(facts) {
        return Outcome::TierUnavailable;
    }
    if !facts.has_details {
        // Google's quota message with nothing else: the project's own quota (seen for days on
        // one (project, model) while its other models serve; shared notes, "Quota 429 with no
        // details"). Any other detail-less 429 ("Resource has been exhausted (e.g. check
        // quota).") is shared capacity.
        return if facts.message.starts_with(QUOTA_MESSAGE) {
            Outcome::QuotaUnspecified
        } else {
            Outcome::SharedCapacity
        };
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

/// How Google's quota refusals begin ("You exceeded your current quota, please check your plan
/// and billing details. ...").
const QUOTA_MESSAGE: &str = "You exceeded your current quota";

/// The billing account's monthly spending cap. The only literal capture (shared notes, "Limits
/// above the project"; also quoted in public write-ups of the 2026 caps): "Your billing account
/// has exceeded its monthly spending cap. Please go to AI Studio ...".
fn is_billing_account_cap(message: &str) -> bool {
    message.contains("billing account has exceeded its monthly spending cap")
}

/// A project's own spend cap ("Project Spend Caps", Gemini API billing docs, 2026). No literal
/// answer has been published; Google calls it a "spend cap" on a project in its docs and
/// e-mails ("Your Gemini API services paused due to spend caps"). Narrow on purpose: the
/// message must name a spend (or spending) cap and a project, and not the billing account.
fn is_project_spend_cap(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("spend cap") || m.contains("spending cap"))
        && m.contains("project")
        && !m.contains("billing account")
}

/// A spend-based rate limit (Gemini API rate-limits page, "Spend-based rate limits", 2026:
/// evaluated over a rolling window of about 10 minutes, answered with 429 RESOURCE_EXHAUSTED),
/// by its message when no quota id names it.
fn is_spend_rate_limit(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("spend-based") || m.contains("spend based")
}

/// `message` without its links: a URL (`.../rate-limits#spend-based-rate-limits`) must not
/// make an ordinary refusal read as something else.
fn without_links(message: &str) -> String {
    message
        .split_whitespace()
        .filter(|w| !w.contains("://"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A quota whose limit is 0: the model is not in the project's tier. Structured first (a
/// violation's `quotaValue` of "0"); then the message Google writes for it ("Quota exceeded
/// for metric: ..., limit: 0, model: gemini-2.5-pro", public captures 2025-2026).
fn is_limit_zero(facts: &ErrorFacts) -> bool {
    // The structured limit, when Google gives one, decides.
    if !facts.quota_values.is_empty() {
        return facts.quota_values.iter().any(|v| v.trim() == "0");
    }
    let m = facts.message.as_str();
    m.match_indices("limit: 0").any(|(at, found)| {
        !m[at + found.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit() || c == '.')
    })
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

/// The first instant of next month in America/Los_Angeles after `now`, when monthly spend
/// caps end. Daylight saving time is applied (the month may turn at 07:00 or 08:00 UTC).
pub fn next_month_los_angeles(now: DateTime<Utc>) -> DateTime<Utc> {
    let local = now.with_timezone(&Los_Angeles).date_naive();
    let (year, month) = match local.month() {
        12 => (local.year() + 1, 1),
        m => (local.year(), m + 1),
    };
    chrono::NaiveDate::from_ymd_opt(year, month, 1)
        .map(|day| day.and_time(NaiveTime::MIN))
        .and_then(|naive| Los_Angeles.from_local_datetime(&naive).earliest())
        .map_or(now + ChronoDuration::days(31), |t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests;
