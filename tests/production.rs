//! keygate in production: metrics, health endpoints, the state file across restarts, reloads
//! without downtime, draining on SIGTERM. All against the Rust mock Gemini.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The value of the sample whose line starts with `prefix` (name and labels), 0 if absent.
fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn promtool_check(text: &str) {
    if std::env::var_os("KEYGATE_SKIP_PROMTOOL").is_some() {
        eprintln!("KEYGATE_SKIP_PROMTOOL is set: not running promtool");
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect(
            "promtool is not on PATH: `make test` installs it (Debian package `prometheus`), \
             or set KEYGATE_SKIP_PROMTOOL=1",
        );
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_with_traffic_pass_promtool_and_hold_no_secret() {
    let mock = Mock::start().await;
    mock.key("metric-key-1", "p1").key("metric-key-2", "p2");
    mock.per_minute_limit("p1", "gemini-2.5-flash", 0, "30s");
    let yaml = with_tenant(
        &pool_yaml(
            &mock.url(),
            &[("metric-key-1", "p1"), ("metric-key-2", "p2")],
        ),
        "team",
        "metric-tenant-token",
    );
    let (kg, admin) = start_with_admin(&yaml);
    let (status, _) = get(&format!("{admin}/metrics"), None).await;
    assert_eq!(status, 401, "metrics need the admin token");

    for _ in 0..3 {
        let (status, _, _) =
            generate(&kg.url(), "gemini-2.5-flash", Some("metric-tenant-token")).await;
        assert_eq!(status, 200);
    }
    // Random model names from a client: the label set stays bounded.
    for i in 0..100 {
        generate(
            &kg.url(),
            &format!("random-model-{i}"),
            Some("metric-tenant-token"),
        )
        .await;
    }
    // The access line (and the metrics) are recorded just after the answer.
    kg.wait_for_log("random-model-99");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, text) = get(&format!("{admin}/metrics"), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let ok = sample(
        &text,
        "keygate_requests_total{model=\"gemini-2.5-flash\",pool=\"main\",status_class=\"2xx\",tenant=\"team\"}",
    );
    assert_eq!(ok, 3.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "keygate_upstream_attempts_total{outcome=\"quota_minute\",pool=\"main\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "keygate_upstream_attempts_total{outcome=\"ok\",pool=\"main\"}"
        ) >= 103.0
    );
    assert_eq!(
        sample(&text, "keygate_keys{pool=\"main\",state=\"cooling\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "keygate_keys{pool=\"main\",state=\"ok\"}"),
        1.0,
        "{text}"
    );
    let recovery = sample(&text, "keygate_pool_next_recovery_seconds{pool=\"main\"}");
    assert!((25.0..=31.0).contains(&recovery), "{recovery}");
    assert!(
        sample(
            &text,
            "keygate_upstream_latency_seconds_count{pool=\"main\"}"
        ) >= 103.0
    );
    assert!(sample(&text, "keygate_response_bytes_total{pool=\"main\"}") > 0.0);
    let models: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("keygate_requests_total{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert!(models.len() <= 65, "{} model label values", models.len());
    assert!(models.contains("other"), "{models:?}");
    for secret in [
        "metric-key-1",
        "metric-key-2",
        "metric-tenant-token",
        ADMIN_TOKEN,
    ] {
        assert!(!text.contains(secret), "{secret} in metrics");
    }
    promtool_check(&text);
    kg.assert_logs_clean(&[
        "metric-key-1",
        "metric-key-2",
        "metric-tenant-token",
        ADMIN_TOKEN,
    ]);
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_need_no_token_and_readiness_needs_a_key() {
    let mock = Mock::start().await;
    mock.key("good-key", "p1").invalid_key("dead-key");
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("good-key", "p1")]));
    assert_eq!(get(&format!("{admin}/healthz"), None).await.0, 200);
    let (status, body) = get(&format!("{admin}/readyz"), None).await;
    assert_eq!(status, 200, "{body}");
    drop(kg);

    // Only a dead key: alive, but not ready once keygate knows the key is dead.
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("dead-key", "p1")]));
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 503);
    assert_eq!(get(&format!("{admin}/healthz"), None).await.0, 200);
    let (status, body) = get(&format!("{admin}/readyz"), None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no enabled key"), "{body}");

    // An upstream that does not resolve: not ready.
    let (_kg, admin) = start_with_admin(
        "pools:\n  - name: main\n    upstream: \"http://no-such-host.invalid:9\"\n    keys: [k]\n",
    );
    // Not ready before the first lookup ends either; under load that can take a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(&format!("{admin}/readyz"), None).await;
        assert_eq!(status, 503, "{body}");
        if body.contains("does not resolve") {
            break;
        }
        assert!(body.contains("has not been looked up yet"), "{body}");
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pool of `keys` saving its state at `state`.
fn yaml_with_state(mock: &Mock, keys: &[(&str, &str)], state: &Path) -> String {
    format!(
        "state_file: \"{}\"\nshutdown_grace_seconds: 1\n{}",
        state.display(),
        pool_yaml(&mock.url(), keys)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cooldowns_and_dead_keys_survive_a_restart() {
    let mock = Mock::start().await;
    mock.key("live-key", "p1").invalid_key("dead-key");
    mock.per_minute_limit("p1", "gemini-2.5-pro", 0, "50s");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let keys = [("dead-key", "p0"), ("live-key", "p1")];
    let mut kg = Keygate::start(&yaml_with_state(&mock, &keys, &state));
    // The dead key is found out, and p1 is cooled for pro.
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-pro", None).await;
    assert_eq!(status, 429);
    assert_eq!(mock.seen().len(), 2);
    kg.signal(libc::SIGTERM);
    assert_eq!(
        kg.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        kg.logs()
    );
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        saved.contains("key_invalid") && saved.contains("gemini-2.5-pro"),
        "{saved}"
    );
    for secret in ["live-key", "dead-key"] {
        assert!(!saved.contains(&format!("\"{secret}\"")), "{saved}");
    }

    // After the restart: 429 with the remaining cooldown, and Google is not asked at all.
    let kg = Keygate::start(&yaml_with_state(&mock, &keys, &state));
    let (status, headers, body) = generate(&kg.url(), "gemini-2.5-pro", None).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((45..=51).contains(&retry_after), "{retry_after}");
    assert_eq!(
        mock.seen().len(),
        2,
        "no upstream contact after the restart"
    );
    // Flash works, on the live key only: the dead one is still known dead.
    for _ in 0..3 {
        let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
        assert_eq!(status, 200);
    }
    assert!(mock.keys_seen()[2..].iter().all(|k| k == "live-key"));
    assert!(kg.logs().contains("restored"), "{}", kg.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_file_is_a_warning_not_a_failure() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{\"version\": 1, \"pools\": [garbage").unwrap();
    let kg = Keygate::start(&yaml_with_state(&mock, &[("k1", "p1")], &state));
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 200);
    let logs = kg.logs();
    assert!(
        logs.contains("not used because it is not a keygate state file"),
        "{logs}"
    );
}

/// Under load access lines leave in batches (src/logging/batch.rs): none may be lost, also
/// when keygate stops straight after the burst.
#[tokio::test(flavor = "multi_thread")]
async fn every_request_of_a_burst_has_its_access_line_after_a_stop() {
    const BURST: usize = 200;
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let mut kg = Keygate::start(&pool_yaml(&mock.url(), &[("k1", "p1")]));
    let url = kg.url();
    let burst = (0..BURST).map(|i| {
        let url = url.clone();
        tokio::spawn(async move { generate(&url, &format!("burst-{i}"), None).await.0 })
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status.unwrap(), 200);
    }
    // A batch waits milliseconds, not until something else is logged.
    let line = |i: usize| format!("model=burst-{i} status=200");
    let deadline = Instant::now() + Duration::from_secs(2);
    while (0..BURST).any(|i| !kg.logs().contains(&line(i))) {
        assert!(Instant::now() < deadline, "lines missing:\n{}", kg.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second burst, and the stop at once: keygate writes what waits before it exits.
    let burst = (BURST..2 * BURST).map(|i| {
        let url = url.clone();
        tokio::spawn(async move { generate(&url, &format!("burst-{i}"), None).await.0 })
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status.unwrap(), 200);
    }
    kg.signal(libc::SIGTERM);
    assert_eq!(kg.wait_exit(Duration::from_secs(10)), Some(0));
    let logs = kg.logs();
    for i in 0..2 * BURST {
        assert_eq!(logs.matches(&line(i)).count(), 1, "{}:\n{logs}", line(i));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_adds_a_key_and_a_broken_config_keeps_the_old_one() {
    let mock = Mock::start().await;
    mock.key("first-key", "p1").key("second-key", "p2");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("first-key", "p1")]));
    assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);

    // Only the second key in the new config: the next requests use it.
    kg.rewrite_config(&pool_yaml(&mock.url(), &[("second-key", "p2")]));
    kg.signal(libc::SIGHUP);
    kg.wait_for_log("reload: config OK");
    let before = mock.seen().len();
    for _ in 0..3 {
        assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    }
    assert!(mock.keys_seen()[before..].iter().all(|k| k == "second-key"));

    // A broken config is refused with its reason; the previous one keeps serving.
    kg.rewrite_config("pools:\n  - name: main\n    upstreem: x\n");
    kg.signal(libc::SIGHUP);
    let logs = kg.wait_for_log("reload refused");
    assert!(logs.contains("reload refused: pools[0]"), "{logs}");
    assert!(
        logs.contains("still serving the previous configuration"),
        "{logs}"
    );
    let before = mock.seen().len();
    assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    assert_eq!(mock.keys_seen()[before..], ["second-key".to_string()]);
    kg.assert_logs_clean(&["first-key", "second-key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_reload_endpoint_reloads_and_reports_refusals() {
    let mock = Mock::start().await;
    mock.key("first-key", "p1").key("second-key", "p2");
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("first-key", "p1")]));
    // The admin section stays in the file: a reload cannot move the admin listener.
    let addr = admin.trim_start_matches("http://");
    kg.rewrite_config(&format!(
        "{}admin:\n  listen: \"{addr}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n",
        pool_yaml(&mock.url(), &[("second-key", "p2")])
    ));
    let resp = client()
        .post(format!("{admin}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    assert_eq!(mock.keys_seen().last().unwrap(), "second-key");
    kg.rewrite_config("pools: []\n");
    let resp = client()
        .post(format!("{admin}/admin/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("at least one pool"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sse_stream_in_flight_survives_a_reload() {
    let mock = Mock::start().await;
    mock.key("first-key", "p1")
        .key("second-key", "p2")
        .sse(6, Duration::from_millis(200));
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("first-key", "p1")]));
    let resp = stream_sse(&kg.url(), "gemini-2.5-flash").await;
    assert_eq!(resp.status(), 200);
    // Mid-stream, a reload removes the stream's key.
    kg.rewrite_config(&pool_yaml(&mock.url(), &[("second-key", "p2")]));
    kg.signal(libc::SIGHUP);
    kg.wait_for_log("reload: config OK");
    let text = resp.text().await.unwrap();
    for i in 0..6 {
        assert!(text.contains(&format!("chunk {i} ")), "{text}");
    }
    assert!(
        text.contains("usageMetadata"),
        "the stream ended whole: {text}"
    );
    assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    assert_eq!(mock.keys_seen().last().unwrap(), "second-key");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_request_fails_during_reloads_under_steady_load() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").key("key-b", "p2");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    let load = steady_load(kg.url(), Duration::from_secs(3), 8);
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let keys: &[(&str, &str)] = if i % 2 == 0 {
            &[("key-b", "p2")]
        } else {
            &[("key-a", "p1"), ("key-b", "p2")]
        };
        kg.rewrite_config(&pool_yaml(&mock.url(), keys));
        kg.signal(libc::SIGHUP);
    }
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    assert!(statuses.len() > 100, "{} requests", statuses.len());
    assert_eq!(failed, 0, "{failed} of {} failed", statuses.len());
    assert!(
        kg.logs().matches("reload: config OK").count() >= 5,
        "{}",
        kg.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_requests_in_flight_then_exits() {
    let mock = Mock::start().await;
    mock.key("k1", "p1").delay(Duration::from_millis(1500));
    let yaml = format!(
        "shutdown_grace_seconds: 4\n{}",
        pool_yaml(&mock.url(), &[("k1", "p1")])
    );
    let mut kg = Keygate::start(&yaml);
    let url = kg.url();
    let slow = tokio::spawn(async move { generate(&url, "gemini-2.5-flash", None).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.connections() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    kg.signal(libc::SIGTERM);
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(status, 200, "the request in flight finished: {body}");
    // New connections are refused once the listener is closed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(kg.addr).is_err(),
        "still accepting after SIGTERM"
    );
    let code = kg.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "{}", kg.logs());
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "exit took {took:?} with a 4 s grace period"
    );
}

/// A local webhook receiver: the JSON bodies it was sent.
async fn start_receiver() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let sink = sink.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let sink = sink.clone();
                        async move {
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            sink.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap());
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_webhook_fires_once_per_event() {
    let (receiver, got) = start_receiver().await;
    let mock = Mock::start().await;
    mock.key("alert-live-key", "p1")
        .invalid_key("alert-dead-key");
    mock.per_minute_limit("p1", "gemini-2.5-pro", 0, "40s");
    let yaml = format!(
        "{}alerts:\n  webhook_url: \"http://{receiver}/hooks/secret-path\"\n  min_interval_seconds: 300\n",
        pool_yaml(&mock.url(), &[("alert-dead-key", "p0"), ("alert-live-key", "p1")])
    );
    let (kg, admin) = start_with_admin(&yaml);
    // The dead key is found out (once, however many requests follow).
    for _ in 0..4 {
        assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    }
    // The pool runs dry for pro: three exhausted answers, one alert.
    for _ in 0..3 {
        assert_eq!(generate(&kg.url(), "gemini-2.5-pro", None).await.0, 429);
    }
    // Google takes the dead key back; a key check brings it back into service.
    mock.key("alert-dead-key", "p0");
    let resp = client()
        .post(format!("{admin}/admin/pools/main/check"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Anything more would have arrived by now too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = got.lock().unwrap().clone();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["key_disabled", "pool_exhausted", "key_recovered"],
        "{events:?}\n{}",
        kg.logs()
    );
    let dead = keygate::secret::fingerprint(b"alert-dead-key");
    assert_eq!(events[0]["key"], dead.as_str());
    assert_eq!(events[0]["reason"], "key_invalid");
    assert_eq!(events[1]["model"], "gemini-2.5-pro");
    assert!(events[1]["retry_after_seconds"].as_u64().unwrap() <= 41);
    assert_eq!(events[2]["key"], dead.as_str());
    // The metrics count the same changes, once each.
    let (_, metrics) = get(&format!("{admin}/metrics"), Some(ADMIN_TOKEN)).await;
    let disabled = "keygate_key_disabled_total{pool=\"main\",reason=\"key_invalid\"}";
    assert_eq!(sample(&metrics, disabled), 1.0, "{metrics}");
    let recovered = "keygate_key_recovered_total{pool=\"main\"}";
    assert_eq!(sample(&metrics, recovered), 1.0, "{metrics}");
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("alert-dead-key") && !text.contains("alert-live-key"),
        "{text}"
    );
    kg.assert_logs_clean(&["alert-dead-key", "alert-live-key", "secret-path"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_upgrade_hands_the_listener_to_a_new_process() {
    let mock = Mock::start().await;
    mock.key("k1", "p1").delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("upgrade.sock");
    let yaml = format!(
        "upgrade_sock: \"{}\"\nshutdown_grace_seconds: 2\n{}",
        sock.display(),
        pool_yaml(&mock.url(), &[("k1", "p1")])
    );
    let mut old = Keygate::start(&yaml);
    // Steady traffic through the whole upgrade.
    let load = steady_load(old.url(), Duration::from_secs(4), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The new process waits on the upgrade socket; SIGQUIT makes the old one send it the
    // listening sockets, then drain and exit.
    let log = dir.path().join("new.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut new = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(old.config_path())
        .arg("-u")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    old.signal(libc::SIGQUIT);
    assert_eq!(
        old.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        old.logs()
    );
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    // Requests keep being served on the same address, by the new process now.
    let (status, _, _) = generate(&format!("http://{}", old.addr), "gemini-2.5-flash", None).await;
    let new_log = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = new.kill();
    let _ = new.wait();
    assert_eq!(status, 200, "{new_log}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} failed:\n{new_log}",
        statuses.len()
    );
    assert!(
        new_log.contains("keygate::access"),
        "the new process served:\n{new_log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_seen_by_a_request_in_flight_during_a_reload_is_kept() {
    let mock = Mock::start().await;
    mock.key("old-key", "p1")
        .key("new-key", "p2")
        .delay(Duration::from_millis(500))
        .per_minute_limit("p1", "gemini-2.5-pro", 0, "40s");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("old-key", "p1")]));
    let url = kg.url();
    let in_flight = tokio::spawn(async move { generate(&url, "gemini-2.5-pro", None).await.0 });
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.connections() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While that request waits for Google, a reload rebuilds the pool with a second key.
    kg.rewrite_config(&pool_yaml(
        &mock.url(),
        &[("old-key", "p1"), ("new-key", "p2")],
    ));
    kg.signal(libc::SIGHUP);
    kg.wait_for_log("reload: config OK");
    assert_eq!(
        in_flight.await.unwrap(),
        429,
        "p1 refused it, and it had no other key"
    );
    // The new table knows p1 is cooling for pro: nothing more goes to old-key.
    let before = mock.seen().len();
    for _ in 0..4 {
        assert_eq!(generate(&kg.url(), "gemini-2.5-pro", None).await.0, 200);
    }
    assert!(
        mock.keys_seen()[before..].iter().all(|k| k == "new-key"),
        "{:?}",
        mock.keys_seen()
    );
}

const LIVE: &str = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

/// A Live session's upgrade goes through the same attempts as a request: a transient refusal
/// is retried after the backoff, an exhausted pool is counted and alerted.
#[tokio::test(flavor = "multi_thread")]
async fn a_live_session_backs_off_and_an_exhausted_pool_is_counted_and_alerted() {
    let (receiver, got) = start_receiver().await;
    let mock = Mock::start().await;
    mock.key("live-key-1", "p1").key("live-key-2", "p2");
    let yaml = format!(
        "retry:\n  backoff_ms: 400\n{}alerts:\n  webhook_url: \"http://{receiver}/hooks\"\n",
        pool_yaml(&mock.url(), &[("live-key-1", "p1"), ("live-key-2", "p2")])
    );
    let (kg, admin) = start_with_admin(&yaml);
    let url = format!("ws://{}{LIVE}", kg.addr);

    // Google's side fails once (503): the session opens after the backoff, not at once.
    mock.respond_next(
        None,
        1,
        503,
        r#"{"error":{"code":503,"status":"UNAVAILABLE"}}"#,
    );
    let started = Instant::now();
    let (ws, status) = ws_connect(&url, &[]).await.unwrap();
    assert_eq!(status, 101);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "opened after {:?}: no backoff",
        started.elapsed()
    );
    drop(ws);
    let statuses: Vec<u16> = mock.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 101]);

    // Both projects run out of Live quota: the client gets keygate's 429 with when to retry,
    // the metric counts it and the webhook hears of it, as for any request.
    mock.per_minute_limit("p1", "live", 0, "30s")
        .per_minute_limit("p2", "live", 0, "30s");
    let refused = ws_connect(&url, &[]).await.unwrap_err();
    assert!(refused.starts_with("429"), "{refused}");
    let (_, metrics) = get(&format!("{admin}/metrics"), Some(ADMIN_TOKEN)).await;
    // The model label is `other` until a model was served; either way the pool's count is 1.
    let exhausted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("keygate_pool_exhausted_total{") && l.contains("pool=\"main\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(exhausted, 1.0, "{metrics}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = got.lock().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["event"], "pool_exhausted");
    assert_eq!(events[0]["model"], "live");
    assert!(events[0]["retry_after_seconds"].as_u64().unwrap() <= 31);
    kg.assert_logs_clean(&["live-key-1", "live-key-2"]);
}
