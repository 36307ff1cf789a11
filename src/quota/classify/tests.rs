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
            until: now + ChronoDuration::seconds(54),
            why: Cooling::Quota {
                ceiling: next_midnight_los_angeles(now)
            }
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

/// The billing-account cap as captured (shared notes, "Limits above the project").
const ACCOUNT_CAP: &str = r#"{"error":{"code":429,"message":"Your billing account has exceeded its monthly spending cap. Please go to AI Studio at https://aistudio.google.com to manage your billing. Learn more at https://ai.google.dev/gemini-api/docs/billing.","status":"RESOURCE_EXHAUSTED"}}"#;

/// A tier without the model: "limit: 0" in the message, no quotaValue, a short RetryInfo.
const LIMIT_ZERO: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, model: gemini-2.5-pro\nPlease retry in 11.767792953s.","status":"RESOURCE_EXHAUSTED","details":[
 {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-pro"}}]},
 {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"11s"}]}}"#;

#[test]
fn a_billing_account_cap_stops_the_account_until_the_month_turns() {
    assert_eq!(
        classify(429, ACCOUNT_CAP.as_bytes()),
        Outcome::BillingAccountCapped
    );
    // Cut short, and wrapped as the OpenAI-compatible paths do, it reads the same.
    assert_eq!(
        classify_prefix(429, &ACCOUNT_CAP.as_bytes()[..140]),
        Outcome::BillingAccountCapped
    );
    let wrapped = format!("[{ACCOUNT_CAP}]");
    assert_eq!(
        classify(429, wrapped.as_bytes()),
        Outcome::BillingAccountCapped
    );
    let now = utc(2026, 6, 10, 12, 0);
    assert_eq!(
        Outcome::BillingAccountCapped.verdict(now),
        Verdict::OtherKey(Penalty::CapBillingAccount {
            until: utc(2026, 7, 1, 7, 0)
        })
    );
}

#[test]
fn a_project_spend_cap_is_told_by_its_words_only() {
    let capped = plain(
        429,
        "RESOURCE_EXHAUSTED",
        "Your project has exceeded its monthly spend cap. Raise it in AI Studio.",
    );
    assert_eq!(classify(429, capped.as_bytes()), Outcome::ProjectCapped);
    let spending = plain(429, "RESOURCE_EXHAUSTED", "Project spending cap reached.");
    assert_eq!(classify(429, spending.as_bytes()), Outcome::ProjectCapped);
    // A spend cap with no project named is not taken for one.
    let vague = plain(429, "RESOURCE_EXHAUSTED", "A spend cap applies.");
    assert_eq!(classify(429, vague.as_bytes()), Outcome::SharedCapacity);
    let now = utc(2026, 12, 20, 12, 0);
    assert_eq!(
        Outcome::ProjectCapped.verdict(now),
        Verdict::OtherKey(Penalty::CapProject {
            until: utc(2027, 1, 1, 8, 0),
            why: Cap::SpendCap
        })
    );
}

#[test]
fn a_spend_based_rate_limit_stops_the_project_for_its_window() {
    let by_message = plain(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your spend-based rate limit. Try again later.",
    );
    assert_eq!(
        classify(429, by_message.as_bytes()),
        Outcome::SpendRateLimited {
            window: SPEND_WINDOW
        }
    );
    let by_quota_id = with_quota(&["GenerateContentSpendPerTenMinutes-Tier1"], Some("120s"));
    assert_eq!(
        classify(429, by_quota_id.as_bytes()),
        Outcome::SpendRateLimited {
            window: Duration::from_secs(120)
        }
    );
    let now = utc(2026, 6, 10, 12, 0);
    assert_eq!(
        Outcome::SpendRateLimited {
            window: SPEND_WINDOW
        }
        .verdict(now),
        Verdict::OtherKey(Penalty::CapProject {
            until: now + ChronoDuration::minutes(10),
            why: Cap::SpendRate
        })
    );
}

#[test]
fn limit_zero_means_the_model_is_not_in_the_tier_until_midnight() {
    assert_eq!(
        classify(429, LIMIT_ZERO.as_bytes()),
        Outcome::TierUnavailable
    );
    // The structured field alone says it too.
    let zero_value = r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel","quotaValue":"0"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"9s"}]}}"#;
    assert_eq!(
        classify(429, zero_value.as_bytes()),
        Outcome::TierUnavailable
    );
    // A limit of 05 or 0.5 is not 0; a limit of 50 neither.
    for other in ["limit: 05, model", "limit: 0.5, model", "limit: 50, model"] {
        let body = with_quota(&["GenerateRequestsPerMinutePerProjectPerModel"], Some("9s"))
            .replace("\"quota\"", &format!("\"{other}\""));
        assert!(
            matches!(classify(429, body.as_bytes()), Outcome::QuotaShort { .. }),
            "{other}"
        );
    }
    let now = utc(2026, 6, 10, 12, 0);
    assert_eq!(
        Outcome::TierUnavailable.verdict(now),
        Verdict::OtherKey(Penalty::CoolProjectModel {
            until: next_midnight_los_angeles(now),
            why: Cooling::Tier
        })
    );
}

#[test]
fn a_detail_less_quota_refusal_is_the_projects_and_escalates() {
    let body = plain(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    );
    assert_eq!(classify(429, body.as_bytes()), Outcome::QuotaUnspecified);
    let now = utc(2026, 6, 10, 12, 0);
    assert_eq!(
        Outcome::QuotaUnspecified.verdict(now),
        Verdict::OtherKey(Penalty::CoolProjectModel {
            until: now + ChronoDuration::seconds(60),
            why: Cooling::Quota {
                ceiling: next_midnight_los_angeles(now)
            }
        })
    );
    // Google's shared capacity keeps blaming nobody.
    let shared = plain(
        429,
        "RESOURCE_EXHAUSTED",
        "Resource has been exhausted (e.g. check quota).",
    );
    assert_eq!(classify(429, shared.as_bytes()), Outcome::SharedCapacity);
}

#[test]
fn no_capacity_for_the_model_is_nobodys_key() {
    let body = r#"{"error":{"code":429,"message":"No capacity available for model gemini-2.5-pro on the server","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"MODEL_CAPACITY_EXHAUSTED","domain":"googleapis.com"},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#;
    assert_eq!(classify(429, body.as_bytes()), Outcome::SharedCapacity);
    assert_eq!(
        classify_prefix(429, &body.as_bytes()[..body.len() - 3]),
        Outcome::SharedCapacity
    );
}

#[test]
fn the_month_turns_at_midnight_in_los_angeles() {
    // (now, the next turn), in UTC. The month turns at 08:00 UTC in PST, 07:00 in PDT.
    let cases = [
        // 2026-01-31 23:59 PST: one minute before the turn.
        (utc(2026, 2, 1, 7, 59), utc(2026, 2, 1, 8, 0)),
        // At the turn itself: the next one.
        (utc(2026, 2, 1, 8, 0), utc(2026, 3, 1, 8, 0)),
        (utc(2026, 7, 15, 12, 0), utc(2026, 8, 1, 7, 0)),
        // Months whose turns straddle a DST change (March 8, November 1).
        (utc(2026, 2, 20, 0, 0), utc(2026, 3, 1, 8, 0)),
        (utc(2026, 3, 20, 0, 0), utc(2026, 4, 1, 7, 0)),
        (utc(2026, 10, 20, 0, 0), utc(2026, 11, 1, 7, 0)),
        (utc(2026, 11, 20, 0, 0), utc(2026, 12, 1, 8, 0)),
        // 2026-12-31 20:00 PST is already 2027 in UTC, still December there.
        (utc(2027, 1, 1, 4, 0), utc(2027, 1, 1, 8, 0)),
    ];
    for (now, turn) in cases {
        assert_eq!(next_month_los_angeles(now), turn, "from {now}");
    }
}

#[test]
fn structured_fields_win_over_the_message() {
    // The capacity refusal as captured: a bare reason, no @type, with a RetryInfo.
    let capacity = r#"{"error":{"code":429,"message":"No capacity available for model gemini-2.5-pro on the server","status":"RESOURCE_EXHAUSTED","details":[{"reason":"MODEL_CAPACITY_EXHAUSTED"},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"30s"}]}}"#;
    assert_eq!(classify(429, capacity.as_bytes()), Outcome::SharedCapacity);
    // A quotaValue of 250 decides, whatever the message says of "limit: 0".
    let stated = r#"{"error":{"code":429,"message":"see limit: 0 docs","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel","quotaValue":"250"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"9s"}]}}"#;
    assert!(matches!(
        classify(429, stated.as_bytes()),
        Outcome::QuotaShort { .. }
    ));
    // A spend quota id decides over words about a project spend cap.
    let spend = with_quota(&["GenerateContentSpendPerTenMinutes"], Some("120s"))
        .replace("\"quota\"", "\"Your project spend cap ...\"");
    assert!(matches!(
        classify(429, spend.as_bytes()),
        Outcome::SpendRateLimited { .. }
    ));
}

#[test]
fn a_spend_window_is_never_shorter_than_a_second_and_links_say_nothing() {
    let zero = plain(
        429,
        "RESOURCE_EXHAUSTED",
        "Spend-based rate limit exceeded.",
    )
    .replace(
        "}}",
        r#","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"0s"}]}}"#,
    );
    assert_eq!(
        classify(429, zero.as_bytes()),
        Outcome::SpendRateLimited {
            window: SPEND_WINDOW
        }
    );
    let linked = with_quota(&["GenerateRequestsPerMinutePerProjectPerModel"], Some("9s")).replace(
        "\"quota\"",
        "\"Quota exceeded. See https://ai.google.dev/gemini-api/docs/rate-limits#spend-based-rate-limits\"",
    );
    assert!(matches!(
        classify(429, linked.as_bytes()),
        Outcome::QuotaShort { .. }
    ));
}

#[test]
fn a_relay_s_own_refusal_is_told_from_google_s() {
    // Cloudflare's AI Gateway, a proxy's HTML page, an empty body: the relay's, not Google's.
    let cloudflare =
        br#"{"success":false,"result":[],"messages":[],"error":[{"code":2009,"message":"Unauthorized"}]}"#;
    for status in [401, 429] {
        for body in [&cloudflare[..], b"<html>429 Too Many Requests</html>", b""] {
            assert_eq!(
                classify_relayed(status, body, true),
                Outcome::RelayRefused,
                "{status} {}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            classify_relayed(status, cloudflare, false),
            Outcome::RelayRefused
        );
    }
    assert_eq!(
        Outcome::RelayRefused.verdict(Utc::now()),
        Verdict::NotGoogle
    );
    // Google's answers through the relay keep their meaning, array-wrapped or cut short.
    assert!(matches!(
        classify_relayed(429, PER_MINUTE.as_bytes(), true),
        Outcome::QuotaShort { .. }
    ));
    let wrapped = format!("[{PER_MINUTE}]");
    assert!(matches!(
        classify_relayed(429, wrapped.as_bytes(), true),
        Outcome::QuotaShort { .. }
    ));
    assert_eq!(
        classify_relayed(429, &PER_MINUTE.as_bytes()[..300], false),
        classify_prefix(429, &PER_MINUTE.as_bytes()[..300])
    );
    let google_401 = plain(
        401,
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials.",
    );
    assert_eq!(
        classify_relayed(401, google_401.as_bytes(), true),
        Outcome::ClientError
    );
    // A relay's own 402 or 403 is the relay's too: it disables no project or key.
    for status in [400, 402, 403] {
        assert_eq!(
            classify_relayed(status, cloudflare, true),
            Outcome::RelayRefused,
            "{status}"
        );
    }
    // Statuses whose body is not read, and 5xx, are never the relay's refusal; without a relay
    // nothing changes.
    assert_eq!(classify_relayed(404, b"", true), Outcome::ClientError);
    assert_eq!(classify_relayed(503, b"", true), Outcome::ServerError);
    assert_eq!(classify(429, cloudflare), Outcome::SharedCapacity);
}
