//! Property tests (proptest, stable Rust) for the parsers a hostile client or upstream feeds:
//! the classifier, the resource-name scanner, the path and query parser with the OpenAI-style
//! aliases, and the config loader. Each runs a bounded number of cases in `cargo test`
//! (`PROPTEST_CASES` raises it for a longer local run); a failing case is kept in
//! `tests/proptest-regressions/fuzz.txt` and replayed first from then on.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keygate::quota::classify::{
    classify, classify_prefix, parse_retry_delay, Outcome, MAX_SHORT_COOLDOWN,
};
use keygate::wire::names::{names_in_body, names_in_path, MAX_NAMES};
use keygate::wire::path::{canonical, split_query};
use keygate::wire::request::{model_from_path, model_of, openai_alias, Api};
use proptest::prelude::*;
use std::time::Duration;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    ProptestConfig {
        cases,
        // Relative to the package root, where cargo runs tests: kept in git.
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct(
                "tests/proptest-regressions/fuzz.txt",
            ),
        )),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Resource names: every spelling Google decodes is found
// ---------------------------------------------------------------------------------------------

/// `text` with the characters chosen by `mask` written as %-escapes.
fn percent_some(text: &str, mask: &[bool]) -> String {
    text.chars()
        .zip(mask.iter().cycle())
        .map(|(c, &esc)| match esc && c.is_ascii() {
            true => format!("%{:02X}", c as u8),
            false => c.to_string(),
        })
        .collect()
}

/// `text` as a JSON string literal with the characters chosen by `mask` written as `\uXXXX`
/// (or `\/` for a slash, as PHP writes it).
fn json_literal(text: &str, mask: &[bool]) -> String {
    let mut out = String::from("\"");
    for (c, &esc) in text.chars().zip(mask.iter().cycle()) {
        match (c, esc) {
            ('"', _) => out.push_str("\\\""),
            ('\\', _) => out.push_str("\\\\"),
            ('/', true) => out.push_str("\\/"),
            (c, true) => out.push_str(&format!("\\u{:04x}", c as u32)),
            (c, false) => out.push(c),
        }
    }
    out.push('"');
    out
}

fn random_case(word: &str, mask: &[bool]) -> String {
    word.chars()
        .zip(mask.iter().cycle())
        .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_reference_is_found_however_it_is_spelt(
        id in "[a-z0-9][a-z0-9_-]{0,24}",
        form in 0usize..4,
        dots in 0usize..3,
        case in proptest::collection::vec(any::<bool>(), 1..8),
        percent in proptest::collection::vec(prop::bool::weighted(0.2), 1..16),
        escape in proptest::collection::vec(prop::bool::weighted(0.2), 1..16),
        key_escape in proptest::collection::vec(prop::bool::weighted(0.3), 1..8),
        field in 0usize..4,
        pad in "[ \t]{0,2}",
    ) {
        let word = random_case("files", &case);
        let dotted = ["", "x/../", "./"][dots];
        let value = match form {
            0 => format!("{dotted}{word}/{id}"),
            1 => format!("https://generativelanguage.googleapis.com/v1beta/{dotted}{word}/{id}"),
            2 => format!("http://127.0.0.1:8080/v1/{dotted}{word}/{id}?alt=media"),
            _ => format!("HTTPS://h/v1alpha/{dotted}{word}/{id}#x"),
        };
        let value = format!("{pad}{}{pad}", percent_some(&value, &percent));
        let field = ["fileUri", "file_uri", "FILEURI", "cachedContent"][field];
        let body = format!(
            r#"{{"contents":[{{"parts":[{{"text":"files/decoy"}},{{"fileData":{{{}:{}}}}}]}}]}}"#,
            json_literal(field, &key_escape),
            json_literal(&value, &escape),
        );
        let found = names_in_body(body.as_bytes());
        let want = format!("files/{id}");
        prop_assert!(found.contains(&want), "{body} gave {found:?}");
        prop_assert!(!found.contains(&"files/decoy".to_string()), "{found:?}");
    }

    #[test]
    fn paths_and_tool_arguments_are_not_references(
        dir in "[a-z][a-z0-9_-]{0,8}",
        id in "[a-z0-9]{1,12}",
        word in prop_oneof![Just("files"), Just("cachedContents"), Just("batches")],
        field in prop_oneof![Just("fileName"), Just("file_name"), Just("path"), Just("model")],
        other in prop_oneof![Just("path"), Just("source"), Just("title")],
        host in "[a-z]{3,10}\\.(com|org|io)",
    ) {
        prop_assume!(!dir.starts_with("v1") && dir != "models" && !dir.eq_ignore_ascii_case(word));
        // A repository path in a field that is not a reference, a URL of another API in a
        // prompt, and a reference field inside a tool's arguments.
        let repo_path = format!("{dir}/{word}/{id}.txt");
        let url = format!("https://{host}/v1/{word}/{id}");
        let body = format!(
            r#"{{"contents":[{{"parts":[{{"text":"{url}"}},{{"functionCall":{{"name":"f","args":{{"{field}":"{word}/{id}"}}}}}}]}}],"{other}":"{repo_path}"}}"#
        );
        prop_assert!(names_in_body(body.as_bytes()).is_empty(), "{}", body);
    }

    #[test]
    fn the_name_scanner_takes_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let found = names_in_body(&body);
        prop_assert!(found.len() <= MAX_NAMES + 1);
        for name in found {
            prop_assert!(name.split_once('/').is_some_and(|(w, id)| !w.is_empty() && !id.is_empty()));
        }
    }

    #[test]
    fn the_name_scanner_takes_any_text(body in "\\PC{0,400}") {
        let _ = names_in_body(body.as_bytes());
        let _ = names_in_path(&body);
    }
}

// ---------------------------------------------------------------------------------------------
// Paths: what keygate routes by is what Google reads
// ---------------------------------------------------------------------------------------------

/// A path as Google reads it: %-escapes decoded, empty and `.` segments dropped, `..`
/// resolved.
fn google_reading(raw: &str) -> Vec<String> {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    let mut out: Vec<String> = Vec::new();
    for s in decoded.split('/') {
        match s {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_string()),
        }
    }
    out
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1beta".to_string()),
        Just("v1".to_string()),
        Just("models".to_string()),
        Just("gemini-2.5-flash:generateContent".to_string()),
        Just("gemini-2.5-pro".to_string()),
        Just("files".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2E.".to_string()),
        Just("%2f".to_string()),
        Just("a%2Fb".to_string()),
        Just("%61bc".to_string()),
        Just("x;key=1".to_string()),
        Just("".to_string()),
        Just("openai".to_string()),
        Just("chat".to_string()),
        Just("completions".to_string()),
        "[a-zA-Z0-9._~-]{1,8}",
        "[ -~]{1,4}",
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_canonical_path_reads_the_same_to_google(
        segments in proptest::collection::vec(segment(), 0..8),
        trailing in any::<bool>(),
    ) {
        let raw = format!("/{}{}", segments.join("/"), if trailing { "/" } else { "" });
        let Ok(path) = canonical(&raw) else { return Ok(()) };
        // Forwarding the canonical form does not change what Google reads...
        prop_assert_eq!(google_reading(&path), google_reading(&raw), "{} -> {}", raw, path);
        // ...keygate reads the same model from it as Google does...
        let decoded = format!("/{}", google_reading(&raw).join("/"));
        prop_assert_eq!(
            model_from_path(&path).map(|m| google_reading(m).join("/")),
            model_from_path(&decoded).map(str::to_string)
        );
        // ...and it has nothing left to resolve.
        prop_assert!(!path.contains("//") || path == "//");
        for s in path.split('/') {
            prop_assert!(s != "." && s != "..", "{}", path);
        }
        prop_assert!(!path.to_ascii_lowercase().contains("%2f"));
        prop_assert_eq!(canonical(&path), Ok(path.clone()));
        if let Some(alias) = openai_alias(&path, &pingora::http::RequestHeader::build("POST", b"/", None).unwrap(), false) {
            prop_assert!(alias.starts_with("/v1beta/openai/"), "{}", alias);
            prop_assert_eq!(canonical(&alias), Ok(alias.clone()));
        }
    }

    #[test]
    fn any_target_is_parsed_without_panic(raw in "\\PC{0,200}") {
        let _ = canonical(&raw);
        let _ = split_query(Some(&raw));
    }

    #[test]
    fn no_spelling_of_the_key_parameter_is_forwarded(
        params in proptest::collection::vec(
            (prop_oneof![
                Just("key"), Just("KEY"), Just("Key"), Just("%6Bey"), Just("k%65Y"),
                Just("+key+"), Just("alt"), Just("pageSize"), Just("upload_id"), Just("keyword"),
            ], "[a-zA-Z0-9%+]{0,6}", prop_oneof![Just('&'), Just(';')]),
            0..8,
        ),
    ) {
        let query: String = params
            .iter()
            .enumerate()
            .map(|(i, (name, value, sep))| {
                let sep = if i == 0 { String::new() } else { sep.to_string() };
                format!("{sep}{name}={value}")
            })
            .collect();
        let split = split_query(Some(&query));
        let is_key = |name: &str| {
            let d = percent_encoding::percent_decode_str(&name.replace('+', " ")).decode_utf8_lossy().into_owned();
            d.trim().eq_ignore_ascii_case("key")
        };
        for param in split.forwarded.as_deref().unwrap_or("").split(['&', ';']) {
            let name = param.split('=').next().unwrap_or("");
            prop_assert!(!is_key(name), "{} forwarded from {}", param, query);
        }
        let keys = params.iter().filter(|(n, _, _)| is_key(n)).count();
        prop_assert_eq!(split.key.is_some(), keys > 0);
    }

    #[test]
    fn an_openai_body_names_one_model_or_is_refused(
        models in proptest::collection::vec(prop_oneof![
            Just(r#""model":"gemini-2.5-flash""#),
            Just(r#""\u006dodel":"gemini-2.5-pro""#),
            Just(r#""model":["gemini-2.5-pro"]"#),
            Just(r#""model":null"#),
            Just(r#""models":"x""#),
        ], 0..4),
    ) {
        let body = format!("{{{}}}", models.join(","));
        let real = models.iter().filter(|m| !m.starts_with(r#""models""#)).count();
        let got = model_of(Api::OpenAi, "/v1beta/openai/chat/completions", false, body.as_bytes());
        if real == 1 && (models.iter().any(|m| m.ends_with(r#":"gemini-2.5-flash""#) || m.ends_with(r#":"gemini-2.5-pro""#))) {
            prop_assert!(got.is_ok(), "{} -> {:?}", body, got);
        } else {
            prop_assert!(got.is_err(), "{} -> {:?}", body, got);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The classifier
// ---------------------------------------------------------------------------------------------

const PER_MINUTE: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"model":"m"}}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"DELAY"}]}}"#;
const PER_DAY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_classifier_takes_any_answer(status in 0u16..1000, body in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = classify(status, &body);
        let _ = classify_prefix(status, &body);
    }

    #[test]
    fn a_per_minute_cooldown_never_passes_the_cap(delay in prop_oneof![
        "[0-9]{1,14}s", "[0-9]{1,6}\\.[0-9]{1,12}s", "[ !#-\\[\\]-~]{0,12}",
    ]) {
        let body = PER_MINUTE.replace("DELAY", &delay);
        match classify(429, body.as_bytes()) {
            Outcome::QuotaShort { cooldown } => prop_assert!(cooldown <= MAX_SHORT_COOLDOWN),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn durations_are_read_only_in_googles_syntax(text in "[0-9.eE+ s-]{0,12}") {
        let grammar = {
            let n = text.strip_suffix('s').unwrap_or("x");
            let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
            let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
            !whole.is_empty() && whole.len() <= 12 && digits(whole)
                && (!n.contains('.') || (!frac.is_empty() && frac.len() <= 9 && digits(frac)))
        };
        prop_assert_eq!(parse_retry_delay(&text).is_some(), grammar, "{}", text);
        if let (Some(d), Some(n)) = (parse_retry_delay(&text), text.strip_suffix('s')) {
            let expect: f64 = n.parse().unwrap();
            prop_assert!((d.as_secs_f64() - expect).abs() < 1e-6);
        }
    }

    #[test]
    fn a_per_day_refusal_cut_anywhere_after_its_quota_id_is_still_per_day(cut in 0usize..400) {
        let after_id = PER_DAY.find("PerDay").unwrap() + "PerDayPerProjectPerModel-FreeTier\"".len();
        let end = (after_id + cut).min(PER_DAY.len());
        prop_assert_eq!(classify_prefix(429, &PER_DAY.as_bytes()[..end]), Outcome::QuotaDaily);
    }

    #[test]
    fn a_short_delay_cools_for_itself_plus_a_second(secs in 0u64..3000) {
        let body = PER_MINUTE.replace("DELAY", &format!("{secs}s"));
        prop_assert_eq!(
            classify(429, body.as_bytes()),
            Outcome::QuotaShort { cooldown: Duration::from_secs(secs + 1) }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The config loader
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_config_loader_takes_any_text(text in "\\PC{0,300}") {
        let _ = keygate::config::Config::parse(&text, std::path::Path::new("."), &|_| None);
    }

    #[test]
    fn config_errors_never_echo_a_key(
        key in "[A-Za-z0-9_-]{8,40}",
        upstream in prop_oneof![Just("https://generativelanguage.googleapis.com".to_string()), "[ -~]{0,30}"],
        listen in prop_oneof![Just("127.0.0.1:8080".to_string()), "[ -~]{0,20}"],
        field in prop_oneof![Just("keys"), Just("kyes"), Just("models"), Just("proxy")],
        extra in "[ -~]{0,20}",
        number in any::<i64>(),
    ) {
        let yaml = format!(
            "listen: \"{}\"\nmax_body_bytes: {number}\npools:\n  - name: main\n    upstream: \"{}\"\n    {field}: [\"{key}\", \"{}\"]\n",
            listen.replace(['"', '\\'], ""),
            upstream.replace(['"', '\\'], ""),
            extra.replace(['"', '\\'], ""),
        );
        let env = |name: &str| (name == "K").then(|| format!("{key}:p1"));
        if let Err(e) = keygate::config::Config::parse(&yaml, std::path::Path::new("."), &env) {
            prop_assert!(!e.to_string().contains(&key), "{}", e);
        }
    }
}
