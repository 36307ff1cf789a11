//! Several keygate instances as one through a real `redis-server`: what one learns, the others
//! know; Redis killed, restarted empty or gone for a while costs no request.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const FLASH: &str = "gemini-2.5-flash";

/// Requests the mock got with `key`.
fn asked(mock: &Mock, key: &str) -> usize {
    mock.keys_seen().iter().filter(|k| *k == key).count()
}

/// A keygate with an admin listener, sharing its health through `redis`.
fn instance(mock: &Mock, keys: &[(&str, &str)], redis: &RedisServer) -> (Keygate, String) {
    shared(&format!("{}{}", pool_yaml(&mock.url(), keys), redis.yaml()))
}

/// A keygate with an admin listener started with `yaml` (a `redis:` section in it), once it
/// says its health is shared.
fn shared(yaml: &str) -> (Keygate, String) {
    let (kg, admin) = start_with_admin(yaml);
    wait_shared(&admin);
    (kg, admin)
}

/// Waits until the instance at `admin` says its health is shared and Redis answers.
fn wait_shared(admin: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = raw_http(
            admin.trim_start_matches("http://").parse().unwrap(),
            b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        let json = body.split("\r\n\r\n").nth(1).unwrap_or("");
        let up = serde_json::from_str::<Value>(json).is_ok_and(|v| v["redis"] == "up");
        if status == 200 && up {
            return;
        }
        assert!(Instant::now() < deadline, "never shared: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn readyz(admin: &str) -> Value {
    let resp = client()
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .unwrap();
    resp.json().await.unwrap()
}

async fn all_served(kg: &Keygate, n: usize) {
    for i in 0..n {
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
}

/// The state (`ok`, `cooling`, ...) `/admin/pools` at `admin` gives `key`.
async fn key_state(admin: &str, key: &str) -> String {
    let fp = keygate::secret::fingerprint(key.as_bytes());
    let (status, pools) = admin_call("GET", admin, "/admin/pools", None).await;
    assert_eq!(status, 200, "{pools}");
    pools["pools"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == fp.as_str())
        .map(|k| k["state"].as_str().unwrap().to_string())
        .unwrap()
}

/// Polls the instance at `admin` until it says `key` is cooling: what another instance learnt
/// has reached it (through Redis).
async fn until_cooling(admin: &str, key: &str) {
    until_read(admin, "cooling".to_string(), |a| key_state(a, key)).await
}

/// Sends requests to `kg` until the mock has refused `key` once.
async fn until_refused(mock: &Mock, kg: &Keygate, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mock
        .seen()
        .iter()
        .any(|s| s.key.as_deref() == Some(key) && s.status == 429)
    {
        assert!(Instant::now() < deadline, "{key} never refused");
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cooldown_learnt_on_one_instance_keeps_the_other_off_the_project() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "50s");
    let keys = [("k1", "p1"), ("k2", "p2")];
    let (a, _) = instance(&mock, &keys, &redis);
    let (b, admin_b) = instance(&mock, &keys, &redis);
    until_refused(&mock, &a, "k1").await;
    until_cooling(&admin_b, "k1").await;
    let before = asked(&mock, "k1");
    all_served(&b, 10).await;
    assert_eq!(
        asked(&mock, "k1"),
        before,
        "B asked the cooling project again"
    );
    // Nothing in Redis holds a key.
    for (name, value) in redis.dump() {
        assert!(!value.contains("\"k1\""), "{name} {value}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_disable_on_one_instance_reaches_the_other_within_a_second() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let keys = [("k1", "p1"), ("k2", "p2")];
    let (_a, admin_a) = instance(&mock, &keys, &redis);
    let (b, _) = instance(&mock, &keys, &redis);
    let fp = keygate::secret::fingerprint(b"k1");
    let hex = fp.trim_start_matches("key#");
    let (status, body) = admin(
        "POST",
        &format!("{admin_a}/admin/pools/main/keys/{hex}/disable"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = asked(&mock, "k1");
    all_served(&b, 10).await;
    assert_eq!(asked(&mock, "k1"), before, "B still uses the disabled key");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_under_load_fails_no_request_and_holds_none_up() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    // p1 keeps refusing with a short delay: health changes go on while Redis is gone.
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "0.3s");
    let keys = [("k1", "p1"), ("k2", "p2")];
    let (a, admin_a) = instance(&mock, &keys, &redis);
    let (b, _) = instance(&mock, &keys, &redis);
    let mut load = Vec::new();
    for kg in [a.url(), b.url()] {
        for _ in 0..4 {
            let url = kg.clone();
            load.push(tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut failed = 0;
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(3) {
                    let sent = Instant::now();
                    let (status, _, _) = generate(&url, FLASH, None).await;
                    slowest = slowest.max(sent.elapsed());
                    failed += usize::from(status != 200);
                }
                (failed, slowest)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.kill();
    for task in load {
        let (failed, slowest) = task.await.unwrap();
        assert_eq!(failed, 0);
        assert!(
            slowest < Duration::from_secs(2),
            "a request took {slowest:?}"
        );
    }
    // Still ready, and says Redis is down.
    let ready = readyz(&admin_a).await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["redis"], "down", "{ready}");
    assert!(a.logs().contains("keygate goes on with its own table"));
}

#[tokio::test(flavor = "multi_thread")]
async fn after_redis_restarts_empty_sharing_resumes_and_what_was_learnt_holds() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .key("k3", "p3")
        .per_minute_limit("p1", FLASH, 0, "50s");
    let keys = [("k1", "p1"), ("k2", "p2"), ("k3", "p3")];
    let (a, admin_a) = instance(&mock, &keys, &redis);
    let (b, admin_b) = instance(&mock, &keys, &redis);
    until_refused(&mock, &a, "k1").await;
    redis.kill();
    let redis = RedisServer::start_on(port);
    wait_shared(&admin_a);
    wait_shared(&admin_b);
    // What A learnt before is back in the new Redis (written back on reconnecting).
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis
        .cli(&["--scan", "--pattern", "keygate:h:*"])
        .lines()
        .count()
        == 0
    {
        assert!(Instant::now() < deadline, "nothing written back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And a change made now on A reaches B again.
    mock.per_minute_limit("p2", FLASH, 0, "50s");
    until_refused(&mock, &a, "k2").await;
    until_cooling(&admin_b, "k2").await;
    let before = (asked(&mock, "k1"), asked(&mock, "k2"));
    all_served(&b, 10).await;
    assert_eq!((asked(&mock, "k1"), asked(&mock, "k2")), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_restarted_without_a_state_file_remember_what_the_fleet_learnt() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "50s");
    let keys = [("k1", "p1"), ("k2", "p2")];
    {
        let (a, _) = instance(&mock, &keys, &redis);
        let (_b, admin_b) = instance(&mock, &keys, &redis);
        until_refused(&mock, &a, "k1").await;
        // Through Redis: what the restarted instances will find there.
        until_cooling(&admin_b, "k1").await;
    }
    let before = asked(&mock, "k1");
    let (a2, _) = instance(&mock, &keys, &redis);
    let (b2, _) = instance(&mock, &keys, &redis);
    all_served(&a2, 6).await;
    all_served(&b2, 6).await;
    assert_eq!(
        asked(&mock, "k1"),
        before,
        "a restarted instance asked the cooling project"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_key_or_token_travels_through_redis() {
    let redis = RedisServer::start();
    let monitor = tempfile::NamedTempFile::new().unwrap();
    let mut watch = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(monitor.reopen().unwrap())
        .spawn()
        .unwrap();
    let mock = Mock::start().await;
    mock.key("secret-key-1", "p1")
        .key("secret-key-2", "p2")
        .per_minute_limit("p1", FLASH, 0, "50s")
        .suspended_key("secret-key-3");
    let keys = [
        ("secret-key-1", "p1"),
        ("secret-key-2", "p2"),
        ("secret-key-3", "p3"),
    ];
    // A tenant with limits (their entries) that uploads a file (its owner, the upload), on a
    // pool with fair share (its counts).
    let yaml = with_tenant(
        &format!(
            "{}    fair_share: true\n{}",
            pool_yaml(&mock.url(), &keys),
            redis.yaml()
        ),
        "alice",
        "secret-token-alice",
    ) + "    rpm: 1000\n    max_concurrent: 5\n";
    let (kg, _) = shared(&yaml);
    for _ in 0..8 {
        generate(&kg.url(), FLASH, Some("secret-token-alice")).await;
    }
    let upload = start_upload(&kg, "secret-token-alice").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(send_bytes(&upload, None).await.0, 200);
    // keygate's upload id is the credential of the bytes that follow: only its hash is stored.
    let upload_id = upload
        .split("upload_id=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    // The usage series' writer turns once a second.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let _ = watch.kill();
    let _ = watch.wait();
    let traffic = std::fs::read_to_string(monitor.path()).unwrap();
    assert!(traffic.contains("PUBLISH"), "nothing was told: {traffic}");
    let stored: Vec<String> = redis.dump().into_iter().map(|(n, v)| n + &v).collect();
    assert!(traffic.contains("EVALSHA"), "no limit was asked: {traffic}");
    assert!(
        traffic.contains("upload_id"),
        "no upload was shared: {traffic}"
    );
    let kinds = ["series:", "usage:t:", "usage:k:", "fair:"];
    for shared in kinds.map(|k| format!("keygate:{k}")) {
        assert!(
            stored.iter().any(|e| e.starts_with(&shared)),
            "no {shared} was shared: {stored:?}"
        );
    }
    assert!(!stored.iter().any(|e| e.contains("alice")), "{stored:?}");
    for secret in [
        "secret-key-1",
        "secret-key-2",
        "secret-key-3",
        "secret-token-alice",
        upload_id,
    ] {
        assert!(!traffic.contains(secret), "{secret} in redis traffic");
        assert!(
            !stored.iter().any(|e| e.contains(secret)),
            "{secret} in redis"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_with_other_pools_under_one_prefix_are_told() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let (_a, _) = instance(&mock, &[("k1", "p1")], &redis);
    let other = format!(
        "pools:\n  - name: other\n    upstream: \"{}\"\n    keys: [k1]\n{}",
        mock.url(),
        redis.yaml()
    );
    let (b, admin_b) = start_with_admin(&other);
    wait_shared(&admin_b);
    let logs = b.wait_for_log("serves the pools [main], this one [other]");
    assert!(
        logs.contains("give each fleet its own redis.key_prefix"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_served_request_makes_no_redis_round_trip() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let (kg, _) = instance(&mock, &[("k1", "p1"), ("k2", "p2")], &redis);
    // Nor does one of a tenant without limits.
    let (tenant_kg, admin) = start_with_admin(&format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]),
        redis.yaml(),
        tenants_of(&[("alice", None)])
    ));
    wait_shared(&admin);
    // The start's write-back and load are over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let monitor = tempfile::NamedTempFile::new().unwrap();
    let mut watch = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(monitor.reopen().unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    all_served(&kg, 30).await;
    for _ in 0..30 {
        let (status, _, body) = generate(&tenant_kg.url(), FLASH, Some("tok-alice")).await;
        assert_eq!(status, 200, "{body}");
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let seconds = started.elapsed().as_secs() + 2;
    let traffic = std::fs::read_to_string(monitor.path()).unwrap();
    // The usage series' writer sends each instance's counts once a second in the background
    // (one script call per busy key or tenant): not one call per request.
    // So do the usage counters' (one script call for all of an instance's counters).
    let background = ["keygate:series:", "keygate:usage:"];
    let (series, commands): (Vec<&str>, Vec<&str>) = traffic
        .lines()
        .filter(|l| l.contains('"') && !l.contains("\"PING\""))
        .partition(|l| background.iter().any(|b| l.contains(b)));
    assert!(commands.is_empty(), "{commands:?}");
    let calls = series.iter().filter(|l| l.contains("\"EVAL\"")).count() as u64;
    // Series: two keys on one instance, two keys and a tenant on the other; counters: one each.
    assert!(
        calls <= 7 * seconds,
        "{calls} series writes in {seconds} s: {series:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_enable_made_while_redis_is_down_is_not_undone_when_it_returns() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let keys = [("k1", "p1"), ("k2", "p2")];
    let (a, admin_a) = instance(&mock, &keys, &redis);
    let (b, _) = instance(&mock, &keys, &redis);
    let hex = keygate::secret::fingerprint(b"k1");
    let hex = hex.trim_start_matches("key#").to_string();
    let key_action = |action: &str| {
        let url = format!("{admin_a}/admin/pools/main/keys/{hex}/{action}");
        async move { admin("POST", &url, Some(ADMIN_TOKEN), None).await }
    };
    assert_eq!(key_action("disable").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Redis goes away (keeping its data, the disable's entry with it); A's operator enables the
    // key meanwhile, and Redis comes back.
    let enable = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(key_action("enable").await.0, 200);
    };
    let restart = tokio::task::spawn_blocking(move || {
        redis.restart_with_data(Duration::from_secs(3));
        redis
    });
    enable.await;
    let _redis = restart.await.unwrap();
    // A replays the enable before loading (the entry is gone), and B hears of it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let uses_k1 = |mock: &Mock, before: usize| asked(mock, "k1") > before;
    loop {
        let before = asked(&mock, "k1");
        all_served(&b, 4).await;
        if uses_k1(&mock, before) {
            break;
        }
        assert!(Instant::now() < deadline, "B never heard of the enable");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for kg in [&a, &b] {
        let before = asked(&mock, "k1");
        all_served(kg, 4).await;
        assert!(uses_k1(&mock, before), "the key was disabled again");
    }
}

/// A keygate sharing its state through `redis`, with the tenant alice (`tok-alice`) held to
/// `limits` (YAML lines of the tenant, e.g. `rpm: 4`).
fn limited(mock: &Mock, redis: &RedisServer, limits: &str) -> (Keygate, String) {
    let yaml = format!(
        "{}{}tenants:\n  - name: alice\n    token: \"tok-alice\"\n    {limits}\n",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        redis.yaml()
    );
    shared(&yaml)
}

/// Sends `n` requests of alice to `kg`, one after the other: the statuses, and the Retry-After
/// of each refusal.
async fn alice(kg: &Keygate, n: usize) -> (Vec<u16>, Vec<u64>) {
    let mut statuses = Vec::new();
    let mut waits = Vec::new();
    for _ in 0..n {
        let (status, headers, body) = generate(&kg.url(), FLASH, Some("tok-alice")).await;
        if status == 429 {
            assert!(body.contains("over its own limit"), "{body}");
            let wait = headers["retry-after"].to_str().unwrap().parse().unwrap();
            waits.push(wait);
        }
        statuses.push(status);
    }
    (statuses, waits)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_rpm_holds_across_instances() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let (a, _) = limited(&mock, &redis, "rpm: 4");
    let (b, _) = limited(&mock, &redis, "rpm: 4");
    let (on_a, _) = alice(&a, 3).await;
    let (on_b, waits) = alice(&b, 3).await;
    assert_eq!(on_a, [200, 200, 200]);
    assert_eq!(on_b, [200, 429, 429], "B did not count A's requests");
    // Four a minute: the next one is allowed 15 s after the first.
    assert!(waits.iter().all(|w| (1..=15).contains(w)), "{waits:?}");
    assert_eq!(mock.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_max_concurrent_holds_across_instances() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").delay(Duration::from_millis(1500));
    let (a, _) = limited(&mock, &redis, "max_concurrent: 2");
    let (b, _) = limited(&mock, &redis, "max_concurrent: 2");
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = a.url();
            tokio::spawn(async move { generate(&url, FLASH, Some("tok-alice")).await.0 })
        })
        .collect();
    // Both of A's requests hold their slots once Google has them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.connections() < 2 {
        assert!(
            Instant::now() < deadline,
            "A's requests never reached Google"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, _, body) = generate(&b.url(), FLASH, Some("tok-alice")).await;
    assert_eq!(status, 429, "B took a third slot: {body}");
    assert!(body.contains("requests in flight"), "{body}");
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    // Once A's requests ended, their slots are B's to take (A gives them back just after
    // answering: wait for that, bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = generate(&b.url(), FLASH, Some("tok-alice")).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("requests in flight"), "{body}");
        assert!(
            Instant::now() < deadline,
            "A's slots never came back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_down_each_instance_holds_a_tenant_to_its_own_limit() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let (a, _) = limited(&mock, &redis, "rpm: 4");
    let (b, _) = limited(&mock, &redis, "rpm: 4");
    assert_eq!(alice(&a, 2).await.0, [200, 200]);
    assert_eq!(alice(&b, 2).await.0, [200, 200]);
    redis.kill();
    // Each instance goes on alone from what it served itself: two more each, then refusals,
    // and no request waits on the dead Redis.
    for kg in [&a, &b] {
        let started = Instant::now();
        let (statuses, _) = alice(kg, 3).await;
        assert_eq!(statuses, [200, 200, 429]);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}

/// The cost of a tenant's limits across instances (BENCHMARKS.md): sequential requests of a
/// tenant without limits and of one with rpm and max_concurrent (set high enough never to
/// refuse), interleaved; the Redis commands each sent, and the latency percentiles.
/// `cargo test --test fleet -- --ignored --nocapture limits_cost`
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn limits_cost() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let yaml = format!(
        "{}{}tenants:\n  - name: free\n    token: \"tok-free\"\n  - name: alice\n    token: \"tok-alice\"\n    rpm: 1000000\n    max_concurrent: 1000\n",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        redis.yaml()
    );
    let (kg, _) = shared(&yaml);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let monitor = tempfile::NamedTempFile::new().unwrap();
    let mut watch = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "MONITOR"])
        .stdout(monitor.reopen().unwrap())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = client();
    let url = format!("{}/v1beta/models/{FLASH}:generateContent", kg.url());
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let rounds = 2000;
    for i in 0..rounds * 2 {
        let which = i % 2;
        let token = ["tok-free", "tok-alice"][which];
        let sent = Instant::now();
        let resp = c
            .post(&url)
            .header("x-goog-api-key", token)
            .body(prompt())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        times[which].push(sent.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = watch.kill();
    let _ = watch.wait();
    let traffic = std::fs::read_to_string(monitor.path()).unwrap();
    let commands: Vec<&str> = traffic
        .lines()
        .filter(|l| l.contains('"') && !l.contains("lua]") && !l.contains("\"PING\""))
        // The usage series' writer: once a second, not per request.
        .filter(|l| !l.contains("keygate:series:"))
        .collect();
    let evals = commands.iter().filter(|l| l.contains("\"EVAL")).count();
    let zrems = commands.iter().filter(|l| l.contains("\"ZREM\"")).count();
    println!(
        "{} commands for {rounds} limited requests: {evals} EVAL/EVALSHA, {zrems} ZREM",
        commands.len()
    );
    for (name, t) in ["no limits", "rpm + max_concurrent"].iter().zip(&mut times) {
        t.sort();
        let at = |q: f64| t[((t.len() as f64 * q) as usize).min(t.len() - 1)];
        println!(
            "{name}: p50 {:?} p90 {:?} p99 {:?}",
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_started_on_one_instance_finishes_on_the_other_and_its_file_is_known_to_both() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    let keys = [("k1", "p1"), ("k2", "p2"), ("k3", "p3")];
    for (k, p) in keys {
        mock.key(k, p);
    }
    let yaml = format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &keys),
        redis.yaml(),
        tenants_of(&[("alice", None), ("bob", None)])
    );
    let (a, _) = shared(&yaml);
    let (b, _) = shared(&yaml);
    let url = start_upload(&a, "tok-alice").await;
    let on_b = url.replace(&a.url(), &b.url());
    assert_ne!(on_b, url);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The load balancer sends the bytes to B, with no credential (as the SDKs do).
    let (status, body) = send_bytes(&on_b, Some("tok-bob")).await;
    assert_eq!(
        status, 403,
        "another tenant finished alice's upload: {body}"
    );
    let (status, body) = send_bytes(&on_b, None).await;
    assert_eq!(status, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    let name = file["file"]["name"].as_str().unwrap();
    let owner = mock.owner_of(name).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The file is used through A: on its own project at once, by its tenant only.
    let before = mock.seen().len();
    let uri = file["file"]["uri"].as_str().unwrap();
    let body = format!(
        r#"{{"contents":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{uri}","mimeType":"text/plain"}}}},{{"text":"summarize"}}]}}]}}"#
    );
    for token in ["tok-alice", "tok-alice", "tok-bob"] {
        let resp = client()
            .post(format!("{}/v1beta/models/{FLASH}:generateContent", a.url()))
            .header("x-goog-api-key", token)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if token == "tok-alice" {
            assert_eq!(status, 200, "{text}");
            assert!(text.contains(&format!("hello from {owner}")), "{text}");
        } else {
            assert_eq!(status, 403, "{text}");
        }
    }
    let seen = &mock.seen()[before..];
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|s| s.status == 200), "probing: {seen:?}");
    // The finished upload's entry (Google's URL, a bearer capability) is gone from Redis, and
    // no tenant's name is there.
    let stored: Vec<String> = redis.dump().into_iter().map(|(n, v)| n + &v).collect();
    assert!(
        !stored.iter().any(|e| e.contains("upload_id")),
        "{stored:?}"
    );
    assert!(!stored.iter().any(|e| e.contains("alice")), "{stored:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clear_made_during_an_outage_holds_after_redis_returns() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "50s");
    let pools = pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]);
    let (gate_a, gate_b) = (
        RedisGate::start(redis.port).await,
        RedisGate::start(redis.port).await,
    );
    let (a, admin_a) = start_with_admin(&format!("{pools}{}", gate_a.yaml()));
    let (b, admin_b) = start_with_admin(&format!("{pools}{}", gate_b.yaml()));
    wait_shared(&admin_a);
    wait_shared(&admin_b);
    // p1 cools on both.
    until_refused(&mock, &a, "k1").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    mock.per_minute_limit("p1", FLASH, 1000, "50s");
    // Both lose Redis; an operator clears p1 on A meanwhile.
    gate_a.cut();
    gate_b.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hex = keygate::secret::fingerprint(b"k1");
    let url = format!(
        "{admin_a}/admin/pools/main/keys/{}/clear-cooldown",
        hex.trim_start_matches("key#")
    );
    assert_eq!(admin("POST", &url, Some(ADMIN_TOKEN), None).await.0, 200);
    // A comes back first and tells the fleet; B, still away, misses it, then comes back with
    // its old cooldown of p1 and writes it back.
    gate_a.restore();
    wait_shared(&admin_a);
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate_b.restore();
    wait_shared(&admin_b);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The clear holds on both: each uses p1 again.
    for (name, kg) in [("A", &a), ("B", &b)] {
        let before = asked(&mock, "k1");
        all_served(kg, 6).await;
        assert!(asked(&mock, "k1") > before, "{name} still keeps off p1");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cap_is_probed_once_per_interval_by_the_whole_fleet() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .billing_account("p1", "acct-a")
        .billing_account("p2", "acct-b")
        .cap_account("acct-a", true);
    let yaml = format!(
        "pools:\n  - name: main\n    upstream: \"{}\"\n    cap_probe_seconds: 2\n    keys:\n      - {{key: k1, project: p1, billing_account: acct-a}}\n      - {{key: k2, project: p2, billing_account: acct-b}}\n{}",
        mock.url(),
        redis.yaml()
    );
    let (a, _) = shared(&yaml);
    let (b, _) = shared(&yaml);
    // A meets the cap; B learns it.
    until_refused(&mock, &a, "k1").await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // A probe is due on both: the fleet sends one.
    let before = asked(&mock, "k1");
    let (on_a, on_b) = tokio::join!(all_served(&a, 10), all_served(&b, 10));
    let ((), ()) = (on_a, on_b);
    assert_eq!(asked(&mock, "k1"), before + 1, "one probe for the fleet");
}

#[tokio::test(flavor = "multi_thread")]
async fn owners_bound_while_redis_was_away_are_written_back() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    let keys = [("k1", "p1"), ("k2", "p2")];
    for (k, p) in keys {
        mock.key(k, p);
    }
    let gate = RedisGate::start(redis.port).await;
    let pools = pool_yaml(&mock.url(), &keys);
    let tenants = tenants_of(&[("alice", None), ("bob", None)]);
    let (a, admin_a) = start_with_admin(&format!("{pools}{}{tenants}", gate.yaml()));
    let (b, admin_b) = start_with_admin(&format!("{pools}{}{tenants}", redis.yaml()));
    wait_shared(&admin_a);
    wait_shared(&admin_b);
    // A uploads a file while its link to Redis is cut.
    gate.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = start_upload(&a, "tok-alice").await;
    let (status, body) = send_bytes(&url, None).await;
    assert_eq!(status, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    let owner = mock
        .owner_of(file["file"]["name"].as_str().unwrap())
        .unwrap();
    gate.restore();
    wait_shared(&admin_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // B knows whose it is: another tenant may not take its name...
    let name = file["file"]["name"].as_str().unwrap();
    let resp = client()
        .post(format!("{}/upload/v1beta/files", b.url()))
        .header("x-goog-api-key", "tok-bob")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("content-type", "application/json")
        .body(format!(r#"{{"file":{{"name":"{name}"}}}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "{}", resp.text().await.unwrap());
    // ...and its tenant uses it through its own project.
    let uri = file["file"]["uri"].as_str().unwrap();
    let resp = client()
        .post(format!("{}/v1beta/models/{FLASH}:generateContent", b.url()))
        .header("x-goog-api-key", "tok-alice")
        .body(format!(
            r#"{{"contents":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{uri}","mimeType":"text/plain"}}}}]}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains(&format!("hello from {owner}")), "{text}");
}

/// A request longer than a lease (30 s) keeps its slot: the lease is renewed (36 s: the one
/// slow test here).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_request_keeps_its_slot_past_the_lease() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").delay(Duration::from_secs(36));
    let (a, _) = limited(&mock, &redis, "max_concurrent: 1");
    let (b, _) = limited(&mock, &redis, "max_concurrent: 1");
    let url = a.url();
    let long = tokio::spawn(async move { generate(&url, FLASH, Some("tok-alice")).await.0 });
    tokio::time::sleep(Duration::from_secs(33)).await;
    let (status, _, body) = generate(&b.url(), FLASH, Some("tok-alice")).await;
    assert_eq!(
        status, 429,
        "the slot was lost past its first lease: {body}"
    );
    assert_eq!(long.await.unwrap(), 200);
}

/// The sums of `/admin/usage` at `admin`: (shared, key requests, tenant alice's requests and
/// tokens).
async fn usage_sums(admin: &str) -> (Value, u64, u64, u64) {
    let (status, usage) = admin_call("GET", admin, "/admin/usage?minutes=60&step=60", None).await;
    assert_eq!(status, 200, "{usage}");
    let sum = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>()
    };
    let keys = usage["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| sum(&k["requests"]))
        .sum();
    let alice = usage["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "alice")
        .unwrap();
    (
        usage["shared"].clone(),
        keys,
        sum(&alice["requests"]),
        sum(&alice["tokens"]),
    )
}

/// Polls `read(admin)` until it answers `want` (at most 10 s).
async fn until_read<'a, T, F>(admin: &'a str, want: T, read: impl Fn(&'a str) -> F)
where
    T: PartialEq + std::fmt::Debug,
    F: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read(admin).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{admin}: {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/admin/usage` at `admin` until its sums are `want`.
async fn until_usage(admin: &str, want: (Value, u64, u64, u64)) {
    until_read(admin, want, usage_sums).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_usage_series_are_the_fleets() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let yaml = format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]),
        redis.yaml(),
        tenants_of(&[("alice", None)])
    );
    let (a, admin_a) = shared(&yaml);
    let (b, admin_b) = shared(&yaml);
    for (kg, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            let (status, _, body) = generate(&kg.url(), FLASH, Some("tok-alice")).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // Each answers the fleet's sums: 5 requests of 7 tokens, over the keys and for alice.
    until_usage(&admin_a, (Value::Bool(true), 5, 5, 35)).await;
    until_usage(&admin_b, (Value::Bool(true), 5, 5, 35)).await;
    // More through B: A sees them once B's writer has sent them.
    let (status, _, body) = generate(&b.url(), FLASH, Some("tok-alice")).await;
    assert_eq!(status, 200, "{body}");
    until_usage(&admin_a, (Value::Bool(true), 6, 6, 42)).await;
    // In Redis: one hash per key and per tenant, named by hashes, expiring within 25 hours.
    let names: Vec<String> = redis
        .cli(&["--scan", "--pattern", "keygate:series:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for name in &names {
        assert!(!name.contains("alice") && !name.contains("k1"), "{name}");
        let ttl: u64 = redis.cli(&["PTTL", name]).trim().parse().unwrap();
        assert!(
            ttl > 24 * 3600 * 1000 && ttl <= 25 * 3600 * 1000,
            "{name}: {ttl}"
        );
    }
    // Garbage under the names is skipped, never a failed answer.
    redis.cli(&["HSET", &names[0], "junk", "x", "1:r", "not a number"]);
    redis.cli(&["DEL", &names[1]]);
    redis.cli(&["SET", &names[1], "a string"]);
    let (status, usage) = admin_call("GET", &admin_a, "/admin/usage", None).await;
    assert_eq!(
        (status, &usage["shared"]),
        (200, &Value::Bool(true)),
        "{usage}"
    );
    // Redis wiped: the sums start again, never below what each instance served itself.
    redis.cli(&["FLUSHALL"]);
    until_usage(&admin_a, (Value::Bool(true), 3, 3, 21)).await;
    until_usage(&admin_b, (Value::Bool(true), 3, 3, 21)).await;
    // Redis gone: each answers its own counts and says so.
    redis.kill();
    until_usage(&admin_a, (Value::Bool(false), 3, 3, 21)).await;
    until_usage(&admin_b, (Value::Bool(false), 3, 3, 21)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_uploaded_through_one_instance_can_be_named_in_a_live_session_on_the_other() {
    use futures_util::{SinkExt, StreamExt};
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let yaml = format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        redis.yaml(),
        tenants_of(&[("alice", None), ("bob", None)])
    );
    let (a, _) = shared(&yaml);
    let (b, _) = shared(&yaml);
    let url = start_upload(&a, "tok-alice").await;
    let (status, body) = send_bytes(&url, None).await;
    assert_eq!(status, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    let uri = file["file"]["uri"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let turn = format!(
        r#"{{"clientContent":{{"turns":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{uri}"}}}}]}}],"turnComplete":true}}}}"#
    );
    let live = format!(
        "ws://{}/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent",
        b.addr
    );
    // Alice's session on B: her file, which only A saw being made, goes through.
    let mut ws = live_set_up(&live, &[("x-goog-api-key", "tok-alice")]).await;
    ws.send(Message::text(turn.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    assert!(echo.to_text().unwrap().contains(&uri), "{echo:?}");
    // Bob's session on B: not his, the session ends before the message reaches Google.
    let mut ws = live_set_up(&live, &[("x-goog-api-key", "tok-bob")]).await;
    ws.send(Message::text(turn)).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

// The response cache shared through Redis.

/// A keygate with a response cache, tenants alice and bob, and an admin listener, sharing
/// through `redis`.
fn cached_instance(mock: &Mock, redis: &RedisServer) -> (Keygate, String) {
    let yaml = format!(
        "cache:\n  ttl_seconds: 600\n{}{}{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")]),
        tenants_of(&[("alice", None), ("bob", None)]),
        redis.yaml()
    );
    shared(&yaml)
}

/// A generation asked through `kg` by the tenant of `token`: its status, `x-keygate-cache` and
/// body.
async fn cached_ask(kg: &Keygate, token: &str, text: &str) -> (u16, String, Vec<u8>) {
    let resp = client()
        .post(format!(
            "{}/v1beta/models/{FLASH}:generateContent",
            kg.url()
        ))
        .header("x-goog-api-key", token)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"contents":[{{"role":"user","parts":[{{"text":"{text}"}}]}}]}}"#
        ))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-keygate-cache")
        .map_or("(none)".into(), |v| v.to_str().unwrap().to_string());
    (status, cache, resp.bytes().await.unwrap().to_vec())
}

/// The names of the cache entries in `redis`.
fn cache_names(redis: &RedisServer) -> Vec<String> {
    let mut names: Vec<String> = redis
        .cli(&["--scan", "--pattern", "keygate:cache:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Waits until `redis` holds `n` cache entries (they are written in the background).
async fn until_cached(redis: &RedisServer, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let names = cache_names(redis);
        if names.len() == n {
            return names;
        }
        assert!(Instant::now() < deadline, "redis holds {names:?}, not {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the instance at `admin` holds `n` entries in memory.
async fn until_in_memory(admin: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, view) = admin_call("GET", admin, "/admin/cache", None).await;
        assert_eq!(status, 200, "{view}");
        if view["entries"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "{view}, not {n} entries");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_miss_on_one_instance_is_a_hit_on_the_other_through_redis() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let (a, _) = cached_instance(&mock, &redis);
    let (b, _) = cached_instance(&mock, &redis);

    let first = cached_ask(&a, "tok-alice", "shared").await;
    assert_eq!((first.0, first.1.as_str()), (200, "miss"));
    let names = until_cached(&redis, 1).await;
    let second = cached_ask(&b, "tok-alice", "shared").await;
    assert_eq!((second.0, second.1.as_str()), (200, "hit"), "through B");
    assert_eq!(first.2, second.2, "byte-identical");
    assert_eq!(mock.seen().len(), 1, "one upstream call for both instances");
    // Another tenant still has entries of its own.
    assert_eq!(cached_ask(&b, "tok-bob", "shared").await.1, "miss");
    assert_eq!(mock.seen().len(), 2);

    // A value under an entry's name that keygate did not write is a miss, not an error.
    assert_eq!(cached_ask(&a, "tok-alice", "garbled").await.1, "miss");
    let now = until_cached(&redis, 3).await;
    let garbled: Vec<&String> = now.iter().filter(|n| !names.contains(n)).collect();
    // Bob's entry and the new one: find the new one by its tenant part, alice's.
    let alice_part = names[0].split(':').nth(2).unwrap();
    let garbled = garbled
        .into_iter()
        .find(|n| n.split(':').nth(2) == Some(alice_part))
        .unwrap();
    assert_eq!(
        redis.cli(&["SET", garbled, "not a keygate entry"]).trim(),
        "OK"
    );
    let (status, cache, body) = cached_ask(&b, "tok-alice", "garbled").await;
    assert_eq!(
        (status, cache.as_str()),
        (200, "miss"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(mock.seen().len(), 4);
    b.wait_for_log("not a cache entry keygate wrote");

    // Redis holds the answers (in plain text) and no key or token, in names or values.
    let dump = redis.dump();
    assert!(
        dump.iter()
            .any(|(n, v)| n.starts_with("keygate:cache:") && v.contains("hello from p1")),
        "{dump:?}"
    );
    for (name, value) in dump {
        for secret in ["key-a", "tok-alice", "tok-bob", "alice", "bob"] {
            assert!(!name.contains(secret), "{name}");
            assert!(!value.contains(secret), "{name}: {value}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_on_one_instance_empties_redis_and_the_others_memory() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let (a, admin_a) = cached_instance(&mock, &redis);
    let (b, admin_b) = cached_instance(&mock, &redis);
    for token in ["tok-alice", "tok-bob"] {
        assert_eq!(cached_ask(&a, token, "hi").await.1, "miss");
    }
    until_cached(&redis, 2).await;
    for token in ["tok-alice", "tok-bob"] {
        assert_eq!(cached_ask(&b, token, "hi").await.1, "hit");
    }
    until_in_memory(&admin_b, 2).await;

    let (status, body) = admin_call("DELETE", &admin_a, "/admin/cache/tenants/alice", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["purged"], &body["purged_in_redis"]),
        (&Value::from(1), &Value::from(1)),
        "{body}"
    );
    assert_eq!(cache_names(&redis).len(), 1, "bob's entry stays");
    until_in_memory(&admin_b, 1).await;
    assert_eq!(
        cached_ask(&b, "tok-alice", "hi").await.1,
        "miss",
        "alice's entry is gone from B too"
    );
    assert_eq!(cached_ask(&b, "tok-bob", "hi").await.1, "hit");
    until_cached(&redis, 2).await;

    let (status, body) = admin_call("DELETE", &admin_a, "/admin/cache", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged_in_redis"], 2, "{body}");
    assert!(cache_names(&redis).is_empty());
    until_in_memory(&admin_b, 0).await;
    assert_eq!(cached_ask(&b, "tok-bob", "hi").await.1, "miss");
    assert_eq!(mock.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_redis_killed_the_cache_still_answers_and_a_miss_is_no_error() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let (a, _) = cached_instance(&mock, &redis);
    let (b, _) = cached_instance(&mock, &redis);
    assert_eq!(cached_ask(&a, "tok-alice", "before").await.1, "miss");
    until_cached(&redis, 1).await;
    assert_eq!(cached_ask(&b, "tok-alice", "before").await.1, "hit");

    redis.kill();
    let started = Instant::now();
    for (kg, text, expected) in [
        (&b, "before", "hit"),
        (&b, "after", "miss"),
        (&b, "after", "hit"),
        (&a, "after", "miss"),
        (&a, "before", "hit"),
    ] {
        let (status, cache, body) = cached_ask(kg, "tok-alice", text).await;
        assert_eq!(
            (status, cache.as_str()),
            (200, expected),
            "{text}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.seen().len(), 3);
    for kg in [&a, &b] {
        let logs = kg.logs();
        assert!(
            logs.matches("the response cache cannot use it").count() <= 1,
            "{logs}"
        );
        assert!(!logs.contains("panicked"), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lookup_waits_on_a_slow_redis_no_longer_than_timeout_ms() {
    let redis = RedisServer::start();
    // Every reply takes 300 ms, under timeout_ms (500): Redis is up, and slow.
    let link = RedisLink::start(redis.port, Duration::from_millis(300)).await;
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let yaml = format!(
        "cache:\n  ttl_seconds: 600\n{}{}{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")]),
        tenants_of(&[("alice", None)]),
        link.yaml(500)
    );
    let (kg, _) = shared(&yaml);
    // The first lookup also makes the cache's connection to Redis: the two together wait no
    // longer than timeout_ms.
    for text in ["first", "second"] {
        let started = Instant::now();
        let (status, cache, body) = cached_ask(&kg, "tok-alice", text).await;
        let took = started.elapsed();
        assert_eq!(
            (status, cache.as_str()),
            (200, "miss"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(took < Duration::from_millis(650), "{text}: {took:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purge_gets_past_a_name_in_redis_that_is_not_text() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let (a, admin) = cached_instance(&mock, &redis);
    assert_eq!(cached_ask(&a, "tok-alice", "hi").await.1, "miss");
    until_cached(&redis, 1).await;
    // Another program's value, under a name of keygate's prefix that is not UTF-8.
    let foreign = "redis.call('SET', 'keygate:cache:' .. string.char(255), 'x')";
    redis.cli(&["EVAL", foreign, "0"]);
    assert_eq!(cache_names(&redis).len(), 2);

    let (status, body) = admin_call("DELETE", &admin, "/admin/cache", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged_in_redis"], 2, "{body}");
    assert!(cache_names(&redis).is_empty());
}

/// `/admin/tenants` and `/admin/pools` at `admin`: whether each says its counts are the
/// fleet's, alice's requests and total tokens, and the requests of all keys.
async fn counters(admin: &str) -> (Value, u64, u64, Value, u64) {
    let (status, tenants) = admin_call("GET", admin, "/admin/tenants", None).await;
    assert_eq!(status, 200, "{tenants}");
    let alice = &tenants["tenants"][0];
    let (status, pools) = admin_call("GET", admin, "/admin/pools", None).await;
    assert_eq!(status, 200, "{pools}");
    let keys = pools["pools"][0]["keys"].as_array().unwrap();
    (
        tenants["shared"].clone(),
        alice["requests"].as_u64().unwrap(),
        alice["total_tokens"].as_u64().unwrap(),
        pools["shared"].clone(),
        keys.iter().map(|k| k["requests"].as_u64().unwrap()).sum(),
    )
}

/// Polls the counters at `admin` until they are `want`.
async fn until_counters(admin: &str, want: (Value, u64, u64, Value, u64)) {
    until_read(admin, want, counters).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_and_token_counters_are_the_fleets() {
    let mut redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let yaml = format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]),
        redis.yaml(),
        tenants_of(&[("alice", None)])
    );
    let (a, admin_a) = shared(&yaml);
    let (b, admin_b) = shared(&yaml);
    for (kg, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            let (status, _, body) = generate(&kg.url(), FLASH, Some("tok-alice")).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // Each answers the fleet's counts: 5 requests of 7 tokens, for alice and over the keys.
    let fleet = (Value::Bool(true), 5, 35, Value::Bool(true), 5);
    until_counters(&admin_a, fleet.clone()).await;
    until_counters(&admin_b, fleet).await;
    // Redis gone: each answers its own and says so.
    redis.kill();
    until_counters(&admin_a, (Value::Bool(false), 3, 21, Value::Bool(false), 3)).await;
    until_counters(&admin_b, (Value::Bool(false), 2, 14, Value::Bool(false), 2)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_use_on_one_instance_counts_for_fair_share_on_the_other() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2");
    let yaml = format!(
        "{}    fair_share: true\n{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]),
        redis.yaml(),
        tenants_of(&[("heavy", None), ("quiet", None)])
    );
    let (a, _) = shared(&yaml);
    let (b, _) = shared(&yaml);
    // The quiet tenant uses B a little; the heavy one floods A.
    for (kg, token, n) in [(&b, "tok-quiet", 3), (&a, "tok-heavy", 6)] {
        for _ in 0..n {
            let (status, _, body) = generate(&kg.url(), FLASH, Some(token)).await;
            assert_eq!(status, 200, "{body}");
        }
    }
    // Each instance tells its use once a second.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // On B, the heavy tenant has used the pool more than the quiet one (on A): B keeps the
    // last project for the quiet tenant, though it saw heavy send B nothing yet.
    let before = mock.keys_seen().len();
    for _ in 0..4 {
        let (status, _, body) = generate(&b.url(), FLASH, Some("tok-heavy")).await;
        assert_eq!(status, 200, "{body}");
    }
    let used = mock.keys_seen()[before..].to_vec();
    assert_eq!(
        used, ["k1"; 4],
        "B gave the heavy tenant the quiet one's project"
    );
    // And the quiet tenant still gets it.
    let before = mock.keys_seen().len();
    let (status, _, body) = generate(&b.url(), FLASH, Some("tok-quiet")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.keys_seen().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_started_while_redis_was_down_finishes_through_the_other_instance() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mock = Mock::start().await;
    let keys = [("k1", "p1"), ("k2", "p2"), ("k3", "p3")];
    for (k, p) in keys {
        mock.key(k, p);
    }
    let yaml = format!(
        "{}{}{}",
        pool_yaml(&mock.url(), &keys),
        redis.yaml(),
        tenants_of(&[("alice", None)])
    );
    let (a, admin_a) = shared(&yaml);
    let (b, admin_b) = shared(&yaml);
    redis.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&admin_a).await["redis"] != "down" {
        assert!(Instant::now() < deadline, "A never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Started on A while Redis is down; Redis comes back (empty), and the bytes go to B.
    let url = start_upload(&a, "tok-alice").await;
    let _redis = RedisServer::start_on(port);
    wait_shared(&admin_a);
    wait_shared(&admin_b);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = send_bytes(&url.replace(&a.url(), &b.url()), None).await;
    assert_eq!(status, 200, "B does not know the upload: {body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    assert!(mock
        .owner_of(file["file"]["name"].as_str().unwrap())
        .is_some());
}

/// Sends requests to `kg` until the mock has refused `key` `times` times in all.
async fn until_refused_times(mock: &Mock, kg: &Keygate, key: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = |mock: &Mock| {
        let seen = mock.seen();
        let of_key = seen.iter().filter(|s| s.key.as_deref() == Some(key));
        of_key.filter(|s| s.status == 429).count()
    };
    while refused(mock) < times {
        assert!(
            Instant::now() < deadline,
            "{key} never refused {times} times"
        );
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// The cooldown of project p1 in `/admin/pools` at `admin`: how many times it was doubled,
/// and its seconds left.
async fn p1_cooldown(admin: &str) -> Option<(u64, u64)> {
    let (_, pools) = admin_call("GET", admin, "/admin/pools", None).await;
    let keys = pools["pools"][0]["keys"].as_array()?;
    let k1 = keys.iter().find(|k| k["project"] == "p1")?;
    let c = k1["cooldowns"].as_array()?.first()?;
    Some((c["escalations"].as_u64()?, c["seconds_left"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_escalation_learnt_on_one_instance_goes_on_from_there_on_the_other() {
    let redis = RedisServer::start();
    let mock = Mock::start().await;
    // p1 refuses every request, each time saying it is back in a second.
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "1s");
    let keys = [("k1", "p1"), ("k2", "p2")];
    let (a, _) = instance(&mock, &keys, &redis);
    let (b, admin_b) = instance(&mock, &keys, &redis);
    // A is refused, then again soon after that cooldown ended: it doubles it (level 1).
    until_refused_times(&mock, &a, "k1", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    until_refused_times(&mock, &a, "k1", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let on_b = p1_cooldown(&admin_b).await;
    let Some((1, first)) = on_b else {
        panic!("B does not know A's level: {on_b:?}");
    };
    // Refused on B soon after that one ended, B doubles it again (level 2).
    until_refused_times(&mock, &b, "k1", 3).await;
    let on_b = p1_cooldown(&admin_b).await;
    assert!(
        on_b.is_some_and(|(level, left)| level == 2 && left + 1 >= 2 * first),
        "B did not go on from A's level ({first} s): {on_b:?}"
    );
}
