//! The transport under the gateway: TLS with certificate checks, HTTP/2 to the upstream, host
//! names resolved by the background resolver, addresses that fail their health check leaving
//! the rotation, `Expect: 100-continue`, streams cut mid-way, and upstream timeouts.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::Duration;

const FLASH: &str = "gemini-2.5-flash";

fn with_ca(yaml: String, ca_path: &std::path::Path) -> String {
    format!("{yaml}    tls_ca_file: \"{}\"\n", ca_path.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_by_name_speaks_http2_on_one_verified_connection() {
    let (mock, ca) = Mock::start_tls().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    mock.respond_next(None, 1, 429, &per_minute_429(FLASH, "30s"));
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca).unwrap();
    let upstream = format!("https://localhost:{}", mock.addr.port());
    let kg = Keygate::start(&with_ca(
        pool_yaml(&upstream, &[("key-a", "p1"), ("key-b", "p2")]),
        &ca_path,
    ));

    // A 100 KB body, refused once by the first key and replayed over HTTP/2.
    let text = "y".repeat(100 * 1024);
    let body = format!(r#"{{"contents":[{{"parts":[{{"text":"{text}"}}]}}]}}"#);
    let resp = client()
        .post(format!(
            "{}/v1beta/models/{FLASH}:generateContent",
            kg.url()
        ))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for _ in 0..4 {
        let (status, _, _) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200);
    }
    let seen = mock.seen();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "HTTP/2 negotiated by ALPN"
    );
    assert!(
        seen[..2].iter().all(|s| s.body == body.as_bytes()),
        "replayed intact over h2"
    );
    assert_eq!(
        mock.connections(),
        1,
        "one connection carried every request and attempt"
    );
    assert!(
        seen.iter().all(|s| s.headers.get("host").is_none()),
        "h2 uses :authority"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_is_refused() {
    let (mock, _ca) = Mock::start_tls().await;
    mock.key("key-a", "p1");
    let upstream = format!("https://localhost:{}", mock.addr.port());
    let kg = Keygate::start(&format!(
        "retry:\n  transient_retries: 0\n{}",
        pool_yaml(&upstream, &[("key-a", "p1")])
    ));
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        mock.seen().is_empty(),
        "no request crossed an unverified connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let body = prompt();
    let addr = kg.addr;
    let (interim, full) = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "POST /v1beta/models/{FLASH}:generateContent HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        // keygate must say "go on" before the body is sent (curl waits for it).
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        let interim = String::from_utf8_lossy(&buf[..n]).to_string();
        s.write_all(body.as_bytes()).unwrap();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        (interim, rest)
    })
    .await
    .unwrap();
    assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim:?}");
    assert!(
        full.contains("200 OK") && full.contains("hello from p1"),
        "{full}"
    );
    assert!(mock.seen()[0].headers.get("expect").is_none());
}

/// A streamed answer's text as far as it came, and the error that ended it, if one did.
async fn read_stream(resp: reqwest::Response) -> (String, Option<reqwest::Error>) {
    use futures_util::StreamExt;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(e) => return (text, Some(e)),
        }
    }
    (text, None)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_cut_upstream_is_cut_for_the_client_too() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1")
        .sse(5, Duration::from_millis(20))
        .sse_abort_after(2);
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let resp = stream_sse(&kg.url(), FLASH).await;
    assert_eq!(resp.status(), 200);
    let (text, error) = read_stream(resp).await;
    assert_eq!(text.matches("data: ").count(), 2, "{text}");
    assert!(
        error.is_some(),
        "the client must see a broken stream, not a clean end"
    );
    assert_eq!(mock.seen().len(), 1, "output had started: no retry");
}

/// A stream whose upstream goes silent for longer than `timeouts.read_seconds` between two
/// events is cut there: the client sees what came and a broken stream, within about the
/// timeout, instead of waiting as long as the upstream does.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_stalls_past_the_read_timeout_is_cut() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").sse(3, Duration::from_secs(4));
    let kg = Keygate::start(&format!(
        "timeouts:\n  read_seconds: 1\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")])
    ));
    let started = std::time::Instant::now();
    let resp = stream_sse(&kg.url(), FLASH).await;
    assert_eq!(resp.status(), 200);
    let (text, error) = read_stream(resp).await;
    let took = started.elapsed();
    assert_eq!(text.matches("data: ").count(), 1, "{text}");
    assert!(error.is_some(), "a broken stream, not a clean end: {text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "cut after about read_seconds, not after the upstream's 4 s gap: {took:?}"
    );
    assert_eq!(mock.seen().len(), 1, "output had started: no retry");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_never_answers_is_a_504() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").delay(Duration::from_secs(4));
    let kg = Keygate::start(&format!(
        "timeouts:\n  read_seconds: 1\nretry:\n  transient_retries: 0\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")])
    ));
    let (status, _, body) = generate(&kg.url(), FLASH, None).await;
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("DEADLINE_EXCEEDED"), "{body}");
}

/// The access lines of requests for `model`, once there are `n` of them (bounded wait: each is
/// written just after its answer).
fn access_lines(kg: &Keygate, model: &str, n: usize) -> Vec<String> {
    let needle = format!("model={model} ");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<String> = kg
            .logs()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_that_refuses_connections_leaves_the_rotation_and_no_request_fails() {
    let mock = Mock::start().await;
    mock.key("lb-key-1", "p1");
    let port = mock.addr.port();
    // One host, two addresses: the mock on 127.0.0.1, and 127.0.0.2 (loopback too) where
    // nothing listens, so connections to it are refused.
    let live = format!("127.0.0.1:{port}");
    let dead = format!("127.0.0.2:{port}");
    assert!(
        std::net::TcpStream::connect(&dead).is_err(),
        "{dead} refuses"
    );
    let pool = format!(
        "{}    upstream_addresses: [\"{live}\", \"{dead}\"]\n",
        pool_yaml(&format!("http://gemini.test:{port}"), &[("lb-key-1", "p1")])
    );
    // Health checks off at first: the dead address stays in the rotation.
    let kg = Keygate::start(&format!("upstream_health_check_seconds: 0\n{pool}"));

    // In the rotation, every other first attempt goes to the dead address: its connect error
    // is retried on the live one, and the client never sees it.
    const BEFORE: &str = "gemini-before-check";
    for _ in 0..6 {
        assert_eq!(generate(&kg.url(), BEFORE, None).await.0, 200);
    }
    let lines = access_lines(&kg, BEFORE, 6);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    assert!(lines.iter().all(|l| l.contains("status=200")), "{lines:#?}");
    let refused = lines
        .iter()
        .filter(|l| l.contains(":connect_error"))
        .count();
    assert!(refused >= 2, "the dead address was tried: {lines:#?}");

    // Checks every second from the reload on: the first one takes the dead address out.
    // Requests keep flowing meanwhile, and none fails.
    kg.rewrite_config(&format!("upstream_health_check_seconds: 1\n{pool}"));
    kg.signal(libc::SIGHUP);
    const DURING: &str = "gemini-during-check";
    let marked = format!("address {dead} becomes unhealthy");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut during = 0;
    while !kg.logs().contains(&marked) {
        assert!(
            std::time::Instant::now() < deadline,
            "never marked:\n{}",
            kg.logs()
        );
        assert_eq!(generate(&kg.url(), DURING, None).await.0, 200);
        during += 1;
    }
    let lines = access_lines(&kg, DURING, during);
    assert!(lines.iter().all(|l| l.contains("status=200")), "{lines:#?}");
    assert!(!kg
        .logs()
        .contains(&format!("address {live} becomes unhealthy")));

    // Marked: no attempt goes to the dead address any more (each request takes one attempt,
    // on the live address), and no request fails.
    const AFTER: &str = "gemini-after-check";
    for _ in 0..10 {
        assert_eq!(generate(&kg.url(), AFTER, None).await.0, 200);
    }
    let lines = access_lines(&kg, AFTER, 10);
    assert_eq!(lines.len(), 10, "{lines:#?}");
    for line in &lines {
        assert!(line.contains("status=200"), "{line}");
        assert!(!line.contains("connect_error"), "{line}");
        let attempts = line.split("attempts=[").nth(1).unwrap_or("");
        let attempts = attempts.split(']').next().unwrap_or("");
        assert_eq!(attempts.split(',').count(), 1, "one attempt: {line}");
    }
}
