//! End-to-end behaviour of the gateway against the mock Gemini: what a client sees, and what
//! reached "Google".

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::{Duration, Instant};

const PRO: &str = "gemini-2.5-pro";
const FLASH: &str = "gemini-2.5-flash";

#[tokio::test(flavor = "multi_thread")]
async fn rotates_across_keys() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1")
        .key("key-b", "p2")
        .key("key-c", "p3");
    let kg = Keygate::start(&pool_yaml(
        &mock.url(),
        &[("key-a", "p1"), ("key-b", "p2"), ("key-c", "p3")],
    ));
    for _ in 0..6 {
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("hello from p"), "{body}");
    }
    let mut keys = mock.keys_seen();
    keys.sort();
    assert_eq!(keys, ["key-a", "key-a", "key-b", "key-b", "key-c", "key-c"]);
    kg.assert_logs_clean(&["key-a", "key-b", "key-c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_minute_429_is_retried_on_another_project_and_the_project_cools() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    mock.per_minute_limit("p1", PRO, 0, "53s");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p2")]));

    for _ in 0..6 {
        let (status, _, body) = generate(&kg.url(), PRO, None).await;
        assert_eq!(status, 200, "the client never sees the 429: {body}");
        assert!(body.contains("hello from p2"), "{body}");
    }
    let keys = mock.keys_seen();
    assert_eq!(
        keys.iter().filter(|k| *k == "key-a").count(),
        1,
        "key-a is asked once, then cooled: {keys:?}"
    );
    assert_eq!(keys.iter().filter(|k| *k == "key-b").count(), 6);
    let logs = kg.wait_for_log("quota_minute");
    assert!(
        logs.contains(":quota_minute,"),
        "the access line shows the failed attempt:\n{logs}"
    );
    kg.assert_logs_clean(&["key-a", "key-b"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_encoded_errors_are_understood_and_passed_on_encoded() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    mock.per_minute_limit("p1", PRO, 0, "53s");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p2")]));
    let url = format!("{}/v1beta/models/{PRO}:generateContent", kg.url());
    for _ in 0..4 {
        let resp = client()
            .post(&url)
            .header("accept-encoding", "gzip")
            .body(prompt())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The gzipped per-minute 429 was read as such: p1 was asked once and cooled.
    let seen = mock.seen();
    assert_eq!(
        seen.iter().filter(|s| s.status == 429).count(),
        1,
        "{seen:?}"
    );
    // A client error passes through still compressed, exactly as Google sent it.
    let resp = client()
        .post(&url)
        .header("accept-encoding", "gzip")
        .body(r#"{"INVALID_PAYLOAD":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let zipped = resp.bytes().await.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&zipped[..]), &mut text)
        .unwrap();
    assert_eq!(text, BAD_REQUEST_BODY);
}

#[tokio::test(flavor = "multi_thread")]
async fn exhausted_pool_answers_429_with_retry_after_and_stays_off_upstream() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p1");
    mock.per_minute_limit("p1", PRO, 0, "53s");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p1")]));

    let (status, headers, body) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 429, "{body}");
    // Cooled for retryDelay + 1 s: 54 s (53 when a second ticked between).
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (53..=54).contains(&retry_after),
        "retry-after {retry_after}"
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], 429);
    assert_eq!(json["error"]["status"], "RESOURCE_EXHAUSTED");
    assert_eq!(
        mock.seen().len(),
        1,
        "both keys share p1: one refusal cools both"
    );

    // While cooling: answered at once, nothing goes upstream.
    for _ in 0..3 {
        let (status, headers, _) = generate(&kg.url(), PRO, None).await;
        assert_eq!(status, 429);
        let ra: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((50..=54).contains(&ra), "retry-after {ra}");
    }
    assert_eq!(mock.seen().len(), 1);

    // The same keys still serve another model.
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn cooldown_ends_after_the_stated_delay() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    mock.per_minute_limit("p1", PRO, 0, "1s");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let (status, headers, _) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    // Google now has quota again; keygate must wait out the cooldown, then use the key.
    mock.per_minute_limit("p1", PRO, 100, "1s");
    let (status, _, _) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 429, "still cooling");
    assert_eq!(mock.seen().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _, body) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn per_day_429_cools_until_midnight_in_los_angeles() {
    use chrono::{TimeZone, Utc};
    use chrono_tz::America::Los_Angeles;
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    mock.per_day_limit("p1", PRO, 0);
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let (status, headers, _) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 429);
    let retry_after: i64 = headers["retry-after"].to_str().unwrap().parse().unwrap();

    let now = Utc::now();
    let tomorrow = now
        .with_timezone(&Los_Angeles)
        .date_naive()
        .succ_opt()
        .unwrap();
    let midnight = Los_Angeles
        .from_local_datetime(&tomorrow.and_hms_opt(0, 0, 0).unwrap())
        .earliest()
        .unwrap();
    let expected = (midnight.with_timezone(&Utc) - now).num_seconds();
    assert!(
        (retry_after - expected).abs() <= 2,
        "retry-after {retry_after}, expected about {expected} (the 22s retryDelay must be ignored)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_and_suspended_keys_are_never_used_again() {
    let mock = Mock::start().await;
    mock.invalid_key("key-bad")
        .suspended_key("key-susp")
        .key("key-good", "p3");
    let kg = Keygate::start(&pool_yaml(
        &mock.url(),
        &[("key-bad", "p1"), ("key-susp", "p2"), ("key-good", "p3")],
    ));
    for _ in 0..8 {
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "{body}");
    }
    let keys = mock.keys_seen();
    assert_eq!(
        keys.iter().filter(|k| *k == "key-bad").count(),
        1,
        "{keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| *k == "key-susp").count(),
        1,
        "{keys:?}"
    );
    // Disabled for every model, not just the one that found out.
    let (status, _, _) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 200);
    assert_eq!(mock.keys_seen().last().unwrap(), "key-good");
    let logs = kg.wait_for_log("key_suspended");
    assert!(
        logs.contains("key_invalid") && logs.contains("key_suspended"),
        "{logs}"
    );
    kg.assert_logs_clean(&["key-bad", "key-susp", "key-good"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_5_mb_body_is_replayed_byte_for_byte() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    mock.respond_next(None, 1, 429, &per_minute_429(PRO, "30s"));
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p2")]));
    // 5 MB of valid JSON with varied bytes.
    let filler: String = (0..5 * 1024 * 1024 / 16u64)
        .map(|i| format!("{:015x},", i * 7919))
        .collect();
    let body = format!(r#"{{"contents":[{{"role":"user","parts":[{{"text":"{filler}"}}]}}]}}"#);
    let resp = client()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", kg.url()))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = mock.seen();
    assert_eq!(seen.len(), 2, "refused once, replayed once");
    assert_ne!(seen[0].key, seen[1].key);
    for s in &seen {
        assert_eq!(s.body.len(), body.len());
        assert!(s.body == body.as_bytes(), "body changed in transit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_gets_413_without_upstream_contact() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&format!(
        "max_body_bytes: 1000\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")])
    ));
    let resp = client()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", kg.url()))
        .body("x".repeat(1001))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], 413);
    // A chunked body of unknown length is cut off just the same.
    let chunks =
        futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 100])));
    let resp = client()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", kg.url()))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // Exactly at the limit is fine.
    let resp = client()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", kg.url()))
        .body("x".repeat(1000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_error_passes_through_once_without_penalty() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let resp = client()
        .post(format!("{}/v1beta/models/{PRO}:generateContent", kg.url()))
        .body(r#"{"INVALID_PAYLOAD":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.text().await.unwrap(),
        BAD_REQUEST_BODY,
        "Google's answer, untouched"
    );
    assert_eq!(mock.seen().len(), 1, "not retried");
    let (status, _, _) = generate(&kg.url(), PRO, None).await;
    assert_eq!(status, 200, "the key was not penalised");
    // A model Google does not know: 404, passed through once.
    let (status, _, body) = generate(&kg.url(), "no-such-model", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(mock.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_credentials_are_stripped_in_all_four_forms() {
    let mock = Mock::start().await;
    mock.key("pool-key-1", "p1");
    let yaml = with_tenant(
        &pool_yaml(&mock.url(), &[("pool-key-1", "p1")]),
        "alice",
        "tok-alice-secret",
    );
    let kg = Keygate::start(&yaml);
    let url = format!("{}/v1beta/models/{FLASH}:generateContent", kg.url());
    let c = client();
    let forms = [
        c.post(&url).header("x-goog-api-key", "tok-alice-secret"),
        c.post(format!("{url}?key=tok-alice-secret")),
        c.post(&url)
            .header("authorization", "Bearer tok-alice-secret"),
        c.post(&url).header("x-access-token", "tok-alice-secret"),
    ];
    for req in forms {
        let resp = req.body(prompt()).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The OpenAI-compatible path: the pool key goes as a Bearer token.
    let resp = c
        .post(format!("{}/v1beta/openai/chat/completions", kg.url()))
        .header("authorization", "Bearer tok-alice-secret")
        .body(format!(
            r#"{{"model":"{FLASH}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let seen = mock.seen();
    assert_eq!(seen.len(), 5);
    for (i, s) in seen.iter().enumerate() {
        let dump = format!("{:?} {:?} {:?}", s.headers, s.query, s.path);
        assert!(
            !dump.contains("tok-alice-secret"),
            "request {i} leaked the tenant token: {dump}"
        );
        assert!(
            s.query.as_deref().is_none_or(|q| !q.contains("key=")),
            "key in URL: {dump}"
        );
        assert!(s.headers.get("x-access-token").is_none());
        assert_eq!(s.headers["host"], mock.addr.to_string());
    }
    for s in &seen[..4] {
        assert_eq!(s.headers["x-goog-api-key"], "pool-key-1");
        assert!(s.headers.get("authorization").is_none());
    }
    assert_eq!(seen[4].headers["authorization"], "Bearer pool-key-1");
    assert!(seen[4].headers.get("x-goog-api-key").is_none());
    let logs = kg.wait_for_log("chat/completions");
    assert!(logs.contains("tenant=alice"), "{logs}");
    kg.assert_logs_clean(&["tok-alice-secret", "pool-key-1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_wrong_token_gets_401_without_upstream_contact() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let yaml = with_tenant(
        &pool_yaml(&mock.url(), &[("key-a", "p1")]),
        "alice",
        "tok-alice",
    );
    let kg = Keygate::start(&yaml);
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 401);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["status"], "UNAUTHENTICATED");
    let (status, _, _) = generate(&kg.url(), FLASH, Some("tok-mallory")).await;
    assert_eq!(status, 401);
    // On the OpenAI-compatible path the error comes wrapped in an array.
    let resp = client()
        .post(format!("{}/v1beta/openai/chat/completions", kg.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json[0]["error"]["code"], 401);
    assert!(mock.seen().is_empty());
    kg.assert_logs_clean(&["tok-mallory", "tok-alice"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_are_not_forwarded() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let resp = client()
        .get(format!("{}/admin", kg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(mock.seen().is_empty());
}

/// Reads a streamed response, noting when each chunk arrived.
async fn timed_chunks(resp: reqwest::Response) -> Vec<(Duration, String)> {
    use futures_util::StreamExt;
    let start = Instant::now();
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        out.push((
            start.elapsed(),
            String::from_utf8_lossy(&chunk.unwrap()).to_string(),
        ));
    }
    out
}

fn assert_spaced(chunks: &[(Duration, String)], events: usize, gap: Duration) {
    let text: String = chunks.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(text.matches("data: ").count(), events, "{text}");
    // Each event arrives on its own, about `gap` after the previous one: nothing is buffered.
    let arrivals: Vec<Duration> = chunks
        .iter()
        .filter(|(_, c)| c.contains("data: "))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(arrivals.len(), events, "one chunk per event: {chunks:?}");
    for pair in arrivals.windows(2) {
        let spacing = pair[1] - pair[0];
        assert!(
            spacing >= gap.mul_f32(0.6),
            "events arrived {spacing:?} apart, sent {gap:?} apart: {arrivals:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_chunks_arrive_at_their_original_spacing_also_after_a_retry() {
    let mock = Mock::start().await;
    let gap = Duration::from_millis(200);
    mock.key("key-a", "p1").key("key-b", "p2").sse(5, gap);
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p2")]));
    let resp = stream_sse(&kg.url(), FLASH).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_spaced(&timed_chunks(resp).await, 5, gap);

    // The next key refuses before any output: the stream comes from the other one, as spaced.
    mock.respond_next(None, 1, 429, &per_minute_429(FLASH, "30s"));
    let resp = stream_sse(&kg.url(), FLASH).await;
    assert_eq!(resp.status(), 200);
    assert_spaced(&timed_chunks(resp).await, 5, gap);
    let seen = mock.seen();
    assert_eq!(seen.len(), 3);
    assert_ne!(seen[1].key, seen[2].key);
    assert_eq!(seen[2].query.as_deref(), Some("alt=sse"));
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_paths_stream_and_report_exhaustion_in_their_own_shape() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").sse(3, Duration::from_millis(50));
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let url = format!("{}/v1beta/openai/chat/completions", kg.url());
    let resp = client()
        .post(&url)
        .body(format!(
            r#"{{"model":"{PRO}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    mock.per_minute_limit("p1", PRO, 0, "10s");
    let resp = client()
        .post(&url)
        .body(format!(r#"{{"model":"models/{PRO}","messages":[]}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "11");
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json[0]["error"]["status"], "RESOURCE_EXHAUSTED");
    // The model came from the body: flash on the same key is unaffected.
    let resp = client()
        .post(&url)
        .body(format!(r#"{{"model":"{FLASH}","messages":[]}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_and_shared_capacity_get_a_bounded_retry_without_penalty() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&format!(
        "retry:\n  transient_retries: 2\n  backoff_ms: 10\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")])
    ));
    // One overload, then success: the client sees only the success.
    mock.respond_next(None, 1, 503, OVERLOADED_BODY);
    let (status, _, _) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 200);
    assert_eq!(mock.seen().len(), 2);
    // A bare 429 is Google's shared capacity: retried, and the key is not cooled.
    mock.respond_next(None, 1, 429, SHARED_CAPACITY_BODY);
    let (status, _, _) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 200);
    assert_eq!(mock.seen().len(), 4);
    // Overloaded for good: 1 try + 2 retries, then Google's answer goes to the client.
    mock.respond_next(None, 10, 503, OVERLOADED_BODY);
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 503);
    assert_eq!(body, OVERLOADED_BODY);
    assert_eq!(mock.seen().len(), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused_across_requests_and_retries() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    // One worker thread: every request and attempt must share one upstream connection. (With
    // several workers Pingora's pool may open one more when a connection released on one
    // thread is asked for on another in the same instant.)
    let kg = Keygate::start(&format!(
        "threads: 1\nretry:\n  backoff_ms: 1\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1"), ("key-b", "p2")])
    ));
    for i in 0..6 {
        // Google's shared-capacity 429: retried at once, nobody cooled.
        mock.respond_next(None, 1, 429, SHARED_CAPACITY_BODY);
        let (status, _, _) = generate(&kg.url(), PRO, None).await;
        assert_eq!(status, 200, "request {i}");
    }
    let seen = mock.seen();
    assert_eq!(seen.len(), 12, "each request: one refusal, one replay");
    for pair in seen.chunks(2) {
        assert_eq!(
            pair[0].connection, pair[1].connection,
            "a retry goes out on the connection its first attempt used"
        );
    }
    assert_eq!(mock.connections(), 1, "12 attempts over one connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_a_clear_502() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let kg = Keygate::start(&format!(
        "retry:\n  backoff_ms: 10\n{}",
        pool_yaml(&format!("http://127.0.0.1:{port}"), &[("key-a", "p1")])
    ));
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("cannot connect to the upstream of pool 'main'"),
        "{body}"
    );
}

/// With no retry left, an attempt that got no answer is what the client hears: a timeout is a
/// 504, not the quota refusal an earlier project gave.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_with_no_retry_left_is_the_answer_not_an_older_refusal() {
    let mock = Mock::start().await;
    mock.key("quota-key", "p1").key("slow-key", "p2");
    mock.per_minute_limit("p1", "gemini-2.5-flash", 0, "30s");
    mock.slow_key("slow-key", Duration::from_secs(3));
    let kg = Keygate::start(&format!(
        "retry:\n  transient_retries: 0\ntimeouts:\n  read_seconds: 1\n{}",
        pool_yaml(&mock.url(), &[("quota-key", "p1"), ("slow-key", "p2")])
    ));
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    let keys: Vec<String> = mock.seen().iter().filter_map(|s| s.key.clone()).collect();
    assert_eq!(
        keys.first().map(String::as_str),
        Some("quota-key"),
        "{keys:?}"
    );
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("did not answer in time"), "{body}");
    kg.assert_logs_clean(&["quota-key", "slow-key"]);
}
