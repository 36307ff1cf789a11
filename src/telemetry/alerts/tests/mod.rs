use super::*;
use crate::config::endpoint::redacted_url;
use pingora::services::background::BackgroundService;
use tokio::net::TcpListener;
use tokio::sync::watch;

mod hook;

use hook::*;

/// The most a batch of `notify` calls may take: they never wait, so this only has to stay under
/// what waiting for the sender would cost (its first backoff, or forever with no sender) while
/// leaving room for a loaded machine's scheduling stalls.
const AT_ONCE: Duration = Duration::from_millis(500);
const _: () = assert!(AT_ONCE.as_millis() * 2 <= FIRST_BACKOFF.as_millis());

#[tokio::test]
async fn one_post_per_event_with_the_right_json() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "gemini-2.5-pro"));
    alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
    alerts.notify(recovered("main", "key#1a2b3c4d5e6f"));
    let got = hook.received(3, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3, "{got:?}");
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hooks/T0/SECRET?x=1");
        assert_eq!(r.host, hook.addr.to_string());
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.json["source"], "keygate");
        assert_eq!(r.json["pool"], "main");
        let time = r.json["time"].as_str().unwrap();
        assert!(DateTime::parse_from_rfc3339(time).is_ok(), "{time}");
        assert!(time.ends_with('Z'), "{time}");
    }

    let e = &got[0].json;
    assert_eq!(e["event"], "pool_exhausted");
    assert_eq!(e["model"], "gemini-2.5-pro");
    assert_eq!(e["retry_after_seconds"], 42);
    assert_eq!(
        object_keys(e),
        [
            "event",
            "model",
            "pool",
            "retry_after_seconds",
            "source",
            "text",
            "time"
        ]
    );
    assert_eq!(
        e["text"],
        "keygate: pool `main` has no usable key for model `gemini-2.5-pro` (all keys \
         cooling or disabled); the first key is back in about 42 s."
    );

    let d = &got[1].json;
    assert_eq!(d["event"], "key_disabled");
    assert_eq!(d["key"], "key#1a2b3c4d5e6f");
    assert_eq!(d["reason"], "key_invalid");
    assert_eq!(
        object_keys(d),
        ["event", "key", "pool", "reason", "source", "text", "time"]
    );
    assert_eq!(
        d["text"],
        "keygate: key `key#1a2b3c4d5e6f` of pool `main` was disabled: Google says the key is \
         not valid."
    );

    let r = &got[2].json;
    assert_eq!(r["event"], "key_recovered");
    assert_eq!(r["key"], "key#1a2b3c4d5e6f");
    assert_eq!(
        object_keys(r),
        ["event", "key", "pool", "source", "text", "time"]
    );
    assert_eq!(
        r["text"],
        "keygate: key `key#1a2b3c4d5e6f` of pool `main` works again."
    );

    let stats = alerts.stats();
    assert_eq!(
        stats,
        AlertStats {
            delivered: 3,
            ..AlertStats::default()
        }
    );
}

#[tokio::test]
async fn the_same_event_within_min_interval_is_sent_once() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
    // Same kind, pool and key: a different reason does not make it a different event.
    alerts.notify(Event::KeyDisabled {
        pool: "main".into(),
        key: "key#1a2b3c4d5e6f".into(),
        reason: Disabled::Dead(DeadReason::Suspended),
    });
    let got = hook.received(2, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let stats = alerts.stats();
    assert_eq!(
        (stats.delivered, stats.dropped, stats.rate_limited),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn different_events_are_each_sent() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    let (_shutdown, _task) = start(&alerts);
    // A flapping key must not hide another key, another pool's exhaustion or another model.
    for _ in 0..5 {
        alerts.notify(disabled("main", "key#1a2b3c4d5e6f"));
    }
    alerts.notify(disabled("main", "key#ffffffff"));
    alerts.notify(recovered("main", "key#1a2b3c4d5e6f"));
    alerts.notify(exhausted("main", "gemini-2.5-pro"));
    alerts.notify(exhausted("main", "gemini-2.5-flash"));
    alerts.notify(exhausted("other", "gemini-2.5-pro"));
    let got = hook.received(6, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 6, "{got:?}");
    let stats = alerts.stats();
    assert_eq!((stats.delivered, stats.rate_limited), (6, 4));
}

#[tokio::test]
async fn the_same_event_is_sent_again_after_min_interval() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_millis(150), 0));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    alerts.notify(exhausted("main", "m"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    alerts.notify(exhausted("main", "m"));
    let got = hook.received(2, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(alerts.stats().rate_limited, 1);
}

#[tokio::test]
async fn zero_min_interval_sends_every_event() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::ZERO, 0));
    let (_shutdown, _task) = start(&alerts);
    for _ in 0..3 {
        alerts.notify(exhausted("main", "m"));
    }
    let got = hook.received(3, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 3);
}

#[tokio::test]
async fn server_errors_are_retried_until_delivered() {
    let hook = Hook::start(&[500, 500]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 3));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
    let got = hook.received(3, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 3, "delivered on the third try: {got:?}");
    assert!(
        got.iter().all(|r| r.raw == got[0].raw),
        "same body each try"
    );
    let stats = alerts.stats();
    assert_eq!((stats.delivered, stats.failed), (1, 0));
}

#[tokio::test]
async fn retries_are_bounded() {
    let hook = Hook::start(&[503; 10]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 2));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
    let got = hook.received(3, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 3, "one try and two retries");
    assert_eq!((alerts.stats().delivered, alerts.stats().failed), (0, 1));
    let sent = alerts.history();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].kind, sent[0].result.as_str()),
        ("pool_exhausted", "failed: HTTP 503")
    );
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let hook = Hook::start(&[404]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 3));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
    let got = hook.received(1, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1);
    // The next event goes through.
    alerts.notify(exhausted("main", "n"));
    wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
    assert_eq!((alerts.stats().delivered, alerts.stats().failed), (1, 1));
    // The dashboard's list of alerts sent: newest first, each with its result.
    let sent: Vec<(String, String)> = alerts
        .history()
        .into_iter()
        .map(|s| (s.result, s.text))
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].0 == "delivered" && sent[0].1.contains("`n`"),
        "{sent:?}"
    );
    assert!(
        sent[1].0 == "refused: HTTP 404" && sent[1].1.contains("`m`"),
        "{sent:?}"
    );
}

#[tokio::test]
async fn too_many_requests_is_retried() {
    let hook = Hook::start(&[429]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 1));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
    assert_eq!(hook.received(2, Duration::from_secs(1)).await.len(), 2);
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_receiver_that_is_down_is_retried_then_given_up_and_notify_never_blocks() {
    let port = closed_port().await;
    let url = format!("http://127.0.0.1:{port}/hook");
    let alerts = alerts(config(&url, Duration::from_secs(60), 2));
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "first"));
    let started = Instant::now();
    for i in 0..1000 {
        alerts.notify(exhausted("main", &format!("model-{i}")));
    }
    let spent = started.elapsed();
    assert!(spent < AT_ONCE, "1000 notify calls took {spent:?}");
    wait_until(Duration::from_secs(5), || alerts.stats().failed >= 1).await;
    let stats = alerts.stats();
    assert_eq!(stats.delivered, 0);
    assert!(stats.failed >= 1);
    // The first event is taken at once or sits in the queue with 255 others.
    assert!(stats.queue_full >= 1001 - QUEUE as u64 - 1, "{stats:?}");
    assert_eq!(stats.rate_limited, 0);
}

#[tokio::test]
async fn a_receiver_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Relaxed);
            held.push(stream);
        }
    });
    let mut cfg = config(&format!("http://{addr}/hook"), Duration::from_secs(60), 1);
    cfg.timeout = Duration::from_millis(150);
    let alerts = alerts(cfg);
    let (_shutdown, _task) = start(&alerts);
    let started = Instant::now();
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().failed == 1).await;
    let spent = started.elapsed();
    assert_eq!(alerts.stats().failed, 1);
    assert_eq!(accepted.load(Relaxed), 2, "one try and one retry");
    assert!(spent < Duration::from_secs(2), "{spent:?}");
}

#[tokio::test]
async fn a_full_queue_drops_without_blocking() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    // No sender yet: nothing empties the queue.
    let started = Instant::now();
    for i in 0..QUEUE + 44 {
        alerts.notify(disabled("main", &format!("key#{i:08x}")));
    }
    let spent = started.elapsed();
    assert!(
        spent < AT_ONCE,
        "{} notify calls took {spent:?}",
        QUEUE + 44
    );
    let stats = alerts.stats();
    assert_eq!(
        (stats.queue_full, stats.dropped, stats.rate_limited),
        (44, 44, 0)
    );
    // A dropped event was not recorded as sent: it can be queued once there is room.
    let (_shutdown, _task) = start(&alerts);
    wait_until(Duration::from_secs(10), || alerts.stats().delivered == 256).await;
    alerts.notify(disabled("main", &format!("key#{:08x}", QUEUE + 1)));
    wait_until(Duration::from_secs(5), || alerts.stats().delivered == 257).await;
    assert_eq!(alerts.stats().delivered, 257);
    assert_eq!(hook.received(257, Duration::from_secs(1)).await.len(), 257);
}

#[test]
fn notify_needs_no_runtime() {
    let alerts = Alerts::new(config("http://127.0.0.1:9/x", Duration::ZERO, 0)).unwrap();
    alerts.notify(exhausted("main", "m"));
    assert_eq!(alerts.stats(), AlertStats::default());
}

#[tokio::test]
async fn shutdown_flushes_the_queue() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    for i in 0..5 {
        alerts.notify(exhausted("main", &format!("m{i}")));
    }
    let (shutdown, task) = start(&alerts);
    shutdown.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alerts.stats().delivered, 5);
    // The sender is gone: later events are dropped, not queued forever.
    alerts.notify(exhausted("main", "late"));
    assert_eq!(alerts.stats().queue_full, 1);
}

#[tokio::test]
async fn shutdown_flush_is_bounded() {
    let port = closed_port().await;
    let url = format!("http://127.0.0.1:{port}/hook");
    let mut cfg = config(&url, Duration::from_secs(60), MAX_RETRIES);
    cfg.timeout = Duration::from_secs(1);
    let alerts = Alerts::build(cfg, Duration::from_millis(200), None).unwrap();
    for i in 0..20 {
        alerts.notify(exhausted("main", &format!("m{i}")));
    }
    let (shutdown, task) = start(&alerts);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    shutdown.send(true).unwrap();
    tokio::time::timeout(FLUSH_BUDGET + Duration::from_secs(2), task)
        .await
        .expect("the sender stops within the flush budget")
        .unwrap();
    assert!(started.elapsed() <= FLUSH_BUDGET + Duration::from_millis(500));
    let stats = alerts.stats();
    assert_eq!((stats.delivered, stats.failed), (0, 20), "{stats:?}");
}

#[tokio::test]
async fn a_second_sender_does_not_start() {
    let alerts = Alerts::new(config("http://127.0.0.1:9/x", Duration::ZERO, 0)).unwrap();
    let (_shutdown, _task) = start(&alerts);
    tokio::task::yield_now().await;
    let (_tx, rx) = watch::channel(false);
    tokio::time::timeout(Duration::from_secs(1), alerts.service().start(rx))
        .await
        .expect("returns at once");
}

#[tokio::test]
async fn a_host_name_is_resolved_in_the_background() {
    let hook = Hook::start(&[]).await;
    let url = format!("http://localhost:{}/hook", hook.addr.port());
    let alerts = alerts(config(&url, Duration::from_secs(60), 3));
    assert!(!alerts.inner.upstream.is_resolved());
    let (_shutdown, _task) = start(&alerts);
    alerts.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || alerts.stats().delivered == 1).await;
    let got = hook.received(1, Duration::from_secs(1)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].host, format!("localhost:{}", hook.addr.port()));
}

#[tokio::test]
async fn https_webhooks_get_http2_with_the_host_checked() {
    let (hook, ca) = Hook::start_tls().await;
    let mut ca_file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut ca_file, ca.as_bytes()).unwrap();
    let url = format!("https://localhost:{}/hooks/T0/SECRET", hook.addr.port());
    let cfg = config(&url, Duration::from_secs(60), 0);
    let trusting =
        Alerts::build(cfg, Duration::from_millis(20), Some(ca_file.path().into())).unwrap();
    let (_shutdown, _task) = start(&trusting);
    trusting.notify(exhausted("main", "m"));
    trusting.notify(recovered("main", "key#1a2b3c4d5e6f"));
    let got = hook.received(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    for r in &got {
        assert_eq!(r.version, http::Version::HTTP_2);
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hooks/T0/SECRET");
        assert_eq!(r.host, format!("localhost:{}", hook.addr.port()));
        assert_eq!(r.content_type, "application/json");
    }
    assert_eq!(got[1].json["event"], "key_recovered");
    assert_eq!(trusting.stats().delivered, 2);

    // Without the test CA, the certificate is refused: retried, then given up.
    let url = format!("https://localhost:{}/hooks/T0/SECRET", hook.addr.port());
    let untrusting = alerts(config(&url, Duration::from_secs(60), 1));
    let (_shutdown, _task) = start(&untrusting);
    untrusting.notify(exhausted("main", "m"));
    wait_until(Duration::from_secs(5), || untrusting.stats().failed == 1).await;
    assert_eq!(untrusting.stats().delivered, 0);
    assert!(hook.received(0, Duration::ZERO).await.is_empty());
}

#[tokio::test]
async fn never_sends_a_key_and_defuses_mentions() {
    let hook = Hook::start(&[]).await;
    let alerts = alerts(config(&hook.url(), Duration::from_secs(60), 0));
    let (_shutdown, _task) = start(&alerts);
    let raw_key = "made-up-alert-key-0123456789";
    alerts.notify(disabled("main", raw_key));
    alerts.notify(exhausted("main", "<!channel> @everyone `x`\nsecond line"));
    let got = hook.received(2, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    assert!(!got[0].raw.contains(raw_key));
    assert!(!got[0].raw.contains("made-up-alert-key"));
    assert_eq!(
        got[0].json["key"],
        crate::secret::fingerprint(raw_key.as_bytes())
    );
    let text = got[1].json["text"].as_str().unwrap();
    assert!(
        text.contains("`?!channel? ?everyone ?x?second line`"),
        "{text}"
    );
    // The field itself keeps the name (JSON-escaped), minus control characters.
    assert_eq!(got[1].json["model"], "<!channel> @everyone `x`second line");
}

#[test]
fn texts_read_well() {
    let e = Event::KeyDisabled {
        pool: "team".into(),
        key: "key#00000000".into(),
        reason: Disabled::Operator,
    };
    assert_eq!(
        e.text(),
        "keygate: key `key#00000000` of pool `team` was disabled: an operator disabled it."
    );
    let e = Event::PoolExhausted {
        pool: "team".into(),
        model: "gemini-2.5-pro".into(),
        retry_after_seconds: None,
    };
    assert_eq!(
        e.text(),
        "keygate: pool `team` has no usable key for model `gemini-2.5-pro` (all keys cooling \
         or disabled)."
    );
    assert_eq!(human_seconds(59), "59 s");
    assert_eq!(human_seconds(300), "5 min");
    assert_eq!(human_seconds(301), "6 min");
    assert_eq!(human_seconds(86_400), "24 h");
    let e = Event::KeyDisabled {
        pool: "p".into(),
        key: "key#00000000".into(),
        reason: Disabled::Billing,
    };
    assert!(e
        .text()
        .ends_with("was disabled: the key's project is out of prepaid credit."));
}

#[test]
fn urls_are_checked_without_echoing_them() {
    let ok = parse_webhook_url("https://hooks.slack.com/services/T0/B0/SECRET").unwrap();
    assert!(ok.upstream.tls);
    assert_eq!(ok.upstream.host, "hooks.slack.com");
    assert_eq!(ok.upstream.port, 443);
    assert_eq!(ok.path, "/services/T0/B0/SECRET");
    assert_eq!(
        ok.uri.to_string(),
        "https://hooks.slack.com/services/T0/B0/SECRET"
    );
    let ok = parse_webhook_url("http://[::1]:8080/hook?wait=true").unwrap();
    assert_eq!((ok.upstream.host.as_str(), ok.upstream.port), ("::1", 8080));
    assert_eq!(ok.path, "/hook?wait=true");
    assert_eq!(parse_webhook_url("http://example.com").unwrap().path, "/");
    assert_eq!(
        parse_webhook_url("http://example.com?a=b").unwrap().path,
        "/?a=b"
    );

    for bad in [
        "",
        "SECRET",
        "ftp://host/SECRET",
        "https:///SECRET",
        "https://user:SECRET@host/x",
        "https://host:99999/SECRET",
        "https://host:abc/SECRET",
        "https://host/SECRET#frag",
        "https://host/SECRET path",
        "https://[::1/SECRET",
        "https://host/SECRET\u{7f}",
    ] {
        let err = parse_webhook_url(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(err.starts_with("the webhook URL must be"), "{err}");
        assert!(!err.contains("SECRET"), "{bad:?}: {err}");
        let cfg = config(bad, Duration::ZERO, 0);
        assert!(Alerts::new(cfg).is_err());
    }

    let mut cfg = config("http://h/x", Duration::ZERO, MAX_RETRIES + 1);
    assert!(Alerts::new(cfg.clone()).unwrap_err().contains("retries"));
    cfg.retries = 0;
    cfg.timeout = Duration::ZERO;
    assert!(Alerts::new(cfg).unwrap_err().contains("timeout"));
}

#[test]
fn config_debug_hides_the_path() {
    let cfg = config(
        "https://discord.com/api/webhooks/1/SECRET",
        Duration::ZERO,
        0,
    );
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("SECRET"), "{shown}");
    assert!(shown.contains("https://discord.com/…"), "{shown}");
    assert_eq!(redacted_url("http://u:SECRET@h:1?SECRET"), "http://h:1/…");
}

#[test]
fn the_rate_table_is_bounded_and_forgets_the_oldest() {
    let min = Duration::from_secs(60);
    let mut table = RateTable::new(4);
    let start = Instant::now();
    let keys: Vec<EventKey> = (0..6)
        .map(|i| EventKey::of(&exhausted("p", &format!("m{i}"))))
        .collect();
    for (i, k) in keys.iter().enumerate() {
        table.record(k.clone(), start + Duration::from_millis(i as u64), min);
    }
    assert_eq!(table.len(), 4);
    let now = start + Duration::from_millis(10);
    assert!(!table.is_recent(&keys[0], now, min));
    assert!(!table.is_recent(&keys[1], now, min));
    for k in &keys[2..] {
        assert!(table.is_recent(k, now, min));
    }
    // Expired entries go before live ones.
    let later = start + min + Duration::from_millis(3);
    table.record(EventKey::of(&exhausted("p", "new")), later, min);
    assert_eq!(
        table.len(),
        3,
        "m2 and m3 expired; m4, m5 and the new one remain"
    );
    assert!(!table.is_recent(&keys[3], later, min));
    assert!(table.is_recent(&keys[4], later, min));
}
