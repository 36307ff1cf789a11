//! keygate as a team gateway: tenants with hashed tokens, pools chosen by model and tenant,
//! per-tenant limits and fair shares, resources bound to a project (files, caches, uploads),
//! the admin API and usage accounting. All against the Rust mock Gemini.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn admin_get(base: &str, path: &str) -> Value {
    let (status, body) = admin("GET", &format!("{base}{path}"), Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn admin_post(base: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    admin("POST", &format!("{base}{path}"), Some(ADMIN_TOKEN), body).await
}

/// `key#xxxxxxxx` of a key, as keygate names it.
fn fingerprint(key: &str) -> String {
    keygate::secret::fingerprint(key.as_bytes())
}

/// The admin API's view of one key.
fn key_view<'a>(pools: &'a Value, key: &str) -> &'a Value {
    let fp = fingerprint(key);
    pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["keys"].as_array().unwrap())
        .find(|k| k["key"] == fp.as_str())
        .unwrap_or_else(|| panic!("{fp} not listed in {pools}"))
}

fn tenants_yaml(tenants: &[(&str, &str)]) -> String {
    let mut y = "tenants:\n".to_string();
    for (name, extra) in tenants {
        y.push_str(&format!(
            "  - name: {name}\n    token: \"tok-{name}\"\n{extra}"
        ));
    }
    y
}

#[tokio::test(flavor = "multi_thread")]
async fn hashed_tokens_authenticate_and_only_the_hash_is_in_the_config() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let digest: String = keygate::secret::sha256(b"ci-secret-token")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let yaml = format!(
        "{}tenants:\n  - name: ci\n    token_sha256: \"{digest}\"\n",
        pool_yaml(&mock.url(), &[("k1", "p1")])
    );
    let kg = Keygate::start(&yaml);
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", Some("ci-secret-token")).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some(&digest)).await;
    assert_eq!(status, 401, "the digest itself is not a token");
    assert_eq!(mock.seen().len(), 1);
    assert!(kg
        .wait_for_log("tenant=ci")
        .contains("tenant=ci \"POST /v1beta/models/gemini-2.5-flash:generateContent\""));
    kg.assert_logs_clean(&["ci-secret-token", "k1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_are_chosen_by_model_and_tenant() {
    let pro_mock = Mock::start().await;
    pro_mock.key("pro-key", "p-pro");
    let flash_mock = Mock::start().await;
    flash_mock.key("flash-key", "p-flash");
    let yaml = format!(
        "pools:\n  - name: pro\n    upstream: \"{}\"\n    models: [\"gemini-2.5-pro*\"]\n    keys: [{{key: pro-key, project: p-pro}}]\n  - name: flash\n    upstream: \"{}\"\n    models: [\"gemini-*-flash*\"]\n    keys: [{{key: flash-key, project: p-flash}}]\n{}",
        pro_mock.url(),
        flash_mock.url(),
        tenants_yaml(&[("lead", ""), ("intern", "    pools: [flash]\n")])
    );
    let kg = Keygate::start(&yaml);

    let (status, _, body) = generate(&kg.url(), "gemini-2.5-pro", Some("tok-lead")).await;
    assert_eq!(
        (status, body.contains("hello from p-pro")),
        (200, true),
        "{body}"
    );
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash-lite", Some("tok-lead")).await;
    assert_eq!(
        (status, body.contains("hello from p-flash")),
        (200, true),
        "{body}"
    );
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-intern")).await;
    assert_eq!(
        (status, body.contains("hello from p-flash")),
        (200, true),
        "{body}"
    );

    // The intern may not use the pro pool, and no pool serves an unknown model: 403 naming the
    // model (not the pools), nothing upstream.
    let before = (pro_mock.seen().len(), flash_mock.seen().len());
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-pro", Some("tok-intern")).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("model 'gemini-2.5-pro' is not available"),
        "{body}"
    );
    assert!(!body.contains("pool"), "{body}");
    let (status, _, body) = generate(&kg.url(), "imagen-4", Some("tok-lead")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("'imagen-4'"), "{body}");
    assert_eq!((pro_mock.seen().len(), flash_mock.seen().len()), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_rpm_is_its_own_429_and_spends_nothing_upstream() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let yaml = format!(
        "{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        tenants_yaml(&[("slow", "    rpm: 2\n"), ("free", "")])
    );
    let kg = Keygate::start(&yaml);
    for _ in 0..2 {
        let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-slow")).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-slow")).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    // Two a minute: the next is allowed about 30 s after the first.
    assert!((28..=30).contains(&retry_after), "{retry_after}");
    assert!(
        body.contains("tenant 'slow' is over its own limit of 2 requests per minute"),
        "{body}"
    );
    assert!(body.contains("not exhausted"), "{body}");
    assert_eq!(mock.seen().len(), 2, "the refused request went nowhere");
    // Another tenant is not affected.
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-free")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_max_concurrent_refuses_the_extra_request() {
    let mock = Mock::start().await;
    mock.key("k1", "p1").delay(Duration::from_millis(600));
    let yaml = format!(
        "{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        tenants_yaml(&[("one", "    max_concurrent: 1\n")])
    );
    let kg = Keygate::start(&yaml);
    let url = kg.url();
    let first =
        tokio::spawn(async move { generate(&url, "gemini-2.5-flash", Some("tok-one")).await });
    // Wait until the first request has reached the mock (which holds it 600 ms), then send a
    // second one while the first is in flight.
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.connections() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, headers, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-one")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("already has 1 requests in flight"), "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(first.await.unwrap().0, 200);
    // The slot is free again.
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-one")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_refuses_a_missing_or_wrong_token() {
    let mock = Mock::start().await;
    mock.key("secret-key-1", "p1");
    let (kg, base) = start_with_admin(&pool_yaml(&mock.url(), &[("secret-key-1", "p1")]));
    for token in [None, Some("wrong-token"), Some("")] {
        let (status, body) = admin("GET", &format!("{base}/admin/pools"), token, None).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        let (status, _) = admin(
            "POST",
            &format!("{base}/admin/pools/main/keys"),
            token,
            Some(r#"{"key":"sneaky-key"}"#),
        )
        .await;
        assert_eq!(status, 401);
    }
    let pools = admin_get(&base, "/admin/pools").await;
    assert_eq!(key_view(&pools, "secret-key-1")["project"], "p1");
    assert!(!pools.to_string().contains("secret-key-1"), "{pools}");
    let listed = pools["pools"][0]["keys"].as_array().unwrap().len();
    assert_eq!(listed, 1, "the refused POST added nothing");
    kg.assert_logs_clean(&["secret-key-1", ADMIN_TOKEN]);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_changes_take_effect_on_the_next_request() {
    let mock = Mock::start().await;
    mock.key("key-one", "p1").key("key-two", "p2");
    let (kg, base) = start_with_admin(&pool_yaml(&mock.url(), &[("key-one", "p1")]));
    let model = "gemini-2.5-flash";

    // Add a key: the next requests use it.
    let (status, added) = admin_post(
        &base,
        "/admin/pools/main/keys",
        Some(r#"{"key":"key-two","project":"p2"}"#),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["added"], fingerprint("key-two").as_str());
    assert_eq!(added["survives_restart"], false);
    for _ in 0..4 {
        assert_eq!(generate(&kg.url(), model, None).await.0, 200);
    }
    let seen = mock.keys_seen();
    assert!(seen.contains(&"key-two".to_string()), "{seen:?}");
    let (status, _) = admin_post(
        &base,
        "/admin/pools/main/keys",
        Some(r#"{"key":"key-two","project":"p2"}"#),
    )
    .await;
    assert_eq!(status, 409, "a key is not added twice");

    // Disable key-one: only key-two serves. Enable it again and disable key-two.
    let one = fingerprint("key-one");
    let two = fingerprint("key-two").replace("key#", "");
    let (status, body) = admin_post(
        &base,
        &format!("/admin/pools/main/keys/{}/disable", one.replace('#', "%23")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let pools = admin_get(&base, "/admin/pools").await;
    assert_eq!(
        key_view(&pools, "key-one")["reason"],
        "disabled_by_operator"
    );
    let before = mock.seen().len();
    for _ in 0..4 {
        assert_eq!(generate(&kg.url(), model, None).await.0, 200);
    }
    assert!(mock.keys_seen()[before..].iter().all(|k| k == "key-two"));
    admin_post(
        &base,
        &format!("/admin/pools/main/keys/{two}/disable"),
        None,
    )
    .await;
    let (status, _) = admin_post(
        &base,
        &format!("/admin/pools/main/keys/{}/enable", &one[4..]),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let before = mock.seen().len();
    for _ in 0..3 {
        assert_eq!(generate(&kg.url(), model, None).await.0, 200);
    }
    assert!(mock.keys_seen()[before..].iter().all(|k| k == "key-one"));

    // A key check leaves an operator's disable alone.
    let (status, body) = admin_post(&base, "/admin/pools/main/check", None).await;
    assert_eq!(status, 200, "{body}");
    let two_check = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == fingerprint("key-two").as_str())
        .unwrap();
    assert_eq!(
        two_check["result"], "inconclusive: disabled_by_operator",
        "{body}"
    );
    assert_eq!(two_check["state"], "disabled_by_operator");

    // Remove key-two: it is gone from the listing.
    let (status, body) = admin(
        "DELETE",
        &format!("{base}/admin/pools/main/keys/{two}"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (status, body["keys_left"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    let pools = admin_get(&base, "/admin/pools").await;
    assert_eq!(pools["pools"][0]["keys"].as_array().unwrap().len(), 1);

    // A cooldown shows in the listing, and clearing it brings the project back at once.
    mock.per_minute_limit("p1", model, 0, "50s");
    let (status, _, _) = generate(&kg.url(), model, None).await;
    assert_eq!(status, 429);
    let pools = admin_get(&base, "/admin/pools").await;
    let view = key_view(&pools, "key-one");
    assert_eq!(view["state"], "cooling", "{view}");
    let left = view["cooldowns"][0]["seconds_left"].as_u64().unwrap();
    assert!((49..=51).contains(&left), "{view}");
    mock.per_minute_limit("p1", model, 10, "50s");
    let (status, body) = admin_post(
        &base,
        &format!("/admin/pools/main/keys/{}/clear-cooldown", &one[4..]),
        Some(&format!(r#"{{"model":"{model}"}}"#)),
    )
    .await;
    assert_eq!((status, body["cleared"].as_u64()), (200, Some(1)), "{body}");
    let (status, _, body) = generate(&kg.url(), model, None).await;
    assert_eq!(status, 200, "{body}");
    kg.assert_logs_clean(&["key-one", "key-two"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn key_check_flags_dead_keys_and_brings_recovered_ones_back() {
    let mock = Mock::start().await;
    mock.key("good-key", "p1").invalid_key("bad-key");
    let (kg, base) = start_with_admin(&pool_yaml(
        &mock.url(),
        &[("good-key", "p1"), ("bad-key", "p2")],
    ));
    let (status, body) = admin_post(&base, "/admin/pools/main/check", None).await;
    assert_eq!(status, 200, "{body}");
    let results: Vec<(String, String)> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["key"].as_str().unwrap().to_string(),
                c["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        results,
        vec![
            (fingerprint("good-key"), "ok".to_string()),
            (fingerprint("bad-key"), "key_invalid".to_string())
        ]
    );
    // The check spent no generation quota: model listings only.
    assert!(mock
        .seen()
        .iter()
        .all(|s| s.path == "/v1beta/models" && s.method == "GET"));
    let pools = admin_get(&base, "/admin/pools").await;
    assert_eq!(key_view(&pools, "bad-key")["reason"], "key_invalid");
    // Requests avoid the dead key without trying it.
    let before = mock.seen().len();
    for _ in 0..4 {
        assert_eq!(generate(&kg.url(), "gemini-2.5-flash", None).await.0, 200);
    }
    assert!(mock.keys_seen()[before..].iter().all(|k| k == "good-key"));

    // Google takes the key back: the next check returns it to service.
    mock.key("bad-key", "p2");
    let fp = fingerprint("bad-key");
    let (status, body) = admin_post(
        &base,
        &format!("/admin/pools/main/keys/{}/check", &fp[4..]),
        None,
    )
    .await;
    assert_eq!(
        (status, body["checks"][0]["result"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    let pools = admin_get(&base, "/admin/pools").await;
    assert_eq!(key_view(&pools, "bad-key")["state"], "ok");
    assert!(kg
        .wait_for_log("works again")
        .contains(&format!("{fp} works again")));
}

#[tokio::test(flavor = "multi_thread")]
async fn scheduled_key_check_finds_a_dead_key_without_traffic() {
    let mock = Mock::start().await;
    mock.key("good-key", "p1").suspended_key("gone-key");
    let addr = free_addr();
    let yaml = format!(
        "{}admin:\n  listen: \"{addr}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n  key_check_interval_seconds: 1\n",
        pool_yaml(&mock.url(), &[("good-key", "p1"), ("gone-key", "p2")])
    );
    let kg = Keygate::start_with_env(&yaml, &[("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let logs = kg.wait_for_log("key check: disabling");
    assert!(
        logs.contains(&format!(
            "key check: disabling {}: key_suspended",
            fingerprint("gone-key")
        )),
        "{logs}"
    );
    assert!(mock.seen().iter().all(|s| s.path == "/v1beta/models"));
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_counted_per_tenant_and_key() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let yaml = format!(
        "{}{}",
        pool_yaml(&mock.url(), &[("k1", "p1")]),
        tenants_yaml(&[("alice", ""), ("bob", "")])
    );
    let (kg, base) = start_with_admin(&yaml);
    // A plain answer, an SSE stream (usage in its last event) and an OpenAI-style completion:
    // 3 prompt + 4 output = 7 tokens each, as the mock reports.
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-alice")).await;
    assert_eq!(status, 200);
    let stream = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            kg.url()
        ))
        .header("x-goog-api-key", "tok-alice")
        .header("accept-encoding", "gzip")
        .body(prompt())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stream.text().await.unwrap();
    let openai = client()
        .post(format!("{}/v1beta/openai/chat/completions", kg.url()))
        .bearer_auth("tok-alice")
        .body(r#"{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status(), 200);
    openai.text().await.unwrap();
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-bob")).await;
    assert_eq!(status, 200);

    // The access line is written after the answer: wait for all four.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tenants = admin_get(&base, "/admin/tenants").await;
        let alice = &tenants["tenants"][0];
        let done = alice["requests"] == 3 && tenants["tenants"][1]["requests"] == 1;
        if done || Instant::now() > deadline {
            assert_eq!(alice["name"], "alice");
            assert_eq!(alice["requests"], 3, "{tenants}");
            assert_eq!(
                (
                    &alice["prompt_tokens"],
                    &alice["output_tokens"],
                    &alice["total_tokens"]
                ),
                (&Value::from(9), &Value::from(12), &Value::from(21)),
                "{tenants}"
            );
            assert_eq!(tenants["tenants"][1]["total_tokens"], 7, "{tenants}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pools = admin_get(&base, "/admin/pools").await;
    let k1 = key_view(&pools, "k1");
    assert_eq!(
        (&k1["requests"], &k1["total_tokens"]),
        (&Value::from(4), &Value::from(28)),
        "{k1}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_tenant_does_not_starve_a_quiet_one() {
    // Four projects, each allowed 3 requests per 2 s window: 6 requests a second in all. The
    // loud tenant asks for 25 a second, the quiet one for 1.25 (20x less): alone, the quiet
    // tenant fits in one project's quota.
    let mock = Mock::start().await;
    let model = "gemini-2.5-flash";
    let keys = [("k1", "p1"), ("k2", "p2"), ("k3", "p3"), ("k4", "p4")];
    for (k, p) in keys {
        mock.key(k, p)
            .per_minute_window(p, model, 3, Duration::from_secs(2));
    }
    let yaml = format!(
        "{}    fair_share: true\n{}",
        pool_yaml(&mock.url(), &keys),
        tenants_yaml(&[("loud", ""), ("quiet", "")])
    );
    let (kg, admin_url) = start_with_admin(&yaml);
    let run_for = Duration::from_secs(8);

    let spawn_paced = |token: &'static str, every: Duration| {
        let url = kg.url();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut ticks = tokio::time::interval(every);
            let mut sent = Vec::new();
            while started.elapsed() < run_for {
                ticks.tick().await;
                let url = url.clone();
                sent.push(tokio::spawn(async move {
                    generate(&url, "gemini-2.5-flash", Some(token)).await.0
                }));
            }
            let mut statuses = Vec::new();
            for s in sent {
                statuses.push(s.await.unwrap());
            }
            statuses
        })
    };
    let loud = spawn_paced("tok-loud", Duration::from_millis(40));
    let quiet = spawn_paced("tok-quiet", Duration::from_millis(800));
    let (loud, quiet) = (loud.await.unwrap(), quiet.await.unwrap());
    let ok = |s: &[u16]| s.iter().filter(|&&c| c == 200).count();
    eprintln!(
        "loud: {} sent, {} served; quiet: {} sent, {} served",
        loud.len(),
        ok(&loud),
        quiet.len(),
        ok(&quiet)
    );
    assert!(loud.len() >= 15 * quiet.len(), "the loud tenant did flood");
    // The quiet tenant gets (nearly) everything it asked for; the loud one takes the rest.
    assert!(
        ok(&quiet) * 10 >= quiet.len() * 8,
        "quiet tenant starved: {} of {} served",
        ok(&quiet),
        quiet.len()
    );
    assert!(ok(&loud) > 0);
    let tenants = admin_get(&admin_url, "/admin/tenants").await;
    assert!(
        tenants["tenants"][0]["refused"]["fair_share"]
            .as_u64()
            .unwrap()
            > 0,
        "{tenants}"
    );
    assert_eq!(
        tenants["tenants"][1]["refused"]["fair_share"], 0,
        "{tenants}"
    );
}

/// Three projects, each allowed `QUOTA_PER_PROJECT` requests of flash before a 429 that cools it
/// for a minute (longer than any of these tests), shared by a `heavy` and a `quiet` tenant.
const QUOTA_PER_PROJECT: usize = 4;
const QUOTA_KEYS: [(&str, &str); 3] = [("k1", "p1"), ("k2", "p2"), ("k3", "p3")];
const QUOTA_UNITS: usize = QUOTA_PER_PROJECT * QUOTA_KEYS.len();

async fn two_tenants_on_a_quota(pool_extra: &str) -> (Mock, Keygate, String) {
    let mock = Mock::start().await;
    for (k, p) in QUOTA_KEYS {
        mock.key(k, p)
            .per_minute_limit(p, FLASH, QUOTA_PER_PROJECT as u32, "60s");
    }
    let yaml = format!(
        "{}{pool_extra}{}",
        pool_yaml(&mock.url(), &QUOTA_KEYS),
        tenants_yaml(&[("heavy", ""), ("quiet", "")])
    );
    let (kg, admin_url) = start_with_admin(&yaml);
    (mock, kg, admin_url)
}

const FLASH: &str = "gemini-2.5-flash";
const FAIR_SHARE_REFUSAL: &str = "kept for the other tenants";
const POOL_EXHAUSTED: &str = "every key of pool 'main' are out of quota";

/// Sends the heavy tenant's requests one by one until one is refused (at most `QUOTA_UNITS`
/// + 1); returns how many were served and the refusal's status and body.
async fn heavy_until_refused(kg: &Keygate) -> (usize, u16, String) {
    for served in 0..=QUOTA_UNITS {
        let (status, _, body) = generate(&kg.url(), FLASH, Some("tok-heavy")).await;
        if status != 200 {
            return (served, status, body);
        }
    }
    panic!("more requests served than the quota holds");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_tenants_and_fair_share_off_every_unit_of_quota_is_served() {
    let (_mock, kg, admin_url) = two_tenants_on_a_quota("").await;
    // The quiet tenant used the pool, less than the heavy one will: with fair share on, it
    // would keep a project from the heavy tenant.
    assert_eq!(generate(&kg.url(), FLASH, Some("tok-quiet")).await.0, 200);
    let (served, status, body) = heavy_until_refused(&kg).await;
    assert_eq!(
        served,
        QUOTA_UNITS - 1,
        "a 429 before the quota was spent: {body}"
    );
    assert_eq!(status, 429);
    assert!(body.contains(POOL_EXHAUSTED), "{body}");
    let tenants = admin_get(&admin_url, "/admin/tenants").await;
    for t in 0..2 {
        assert_eq!(
            tenants["tenants"][t]["refused"]["fair_share"], 0,
            "{tenants}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_fair_share_on_a_tenant_idle_past_its_window_leaves_every_unit_to_the_others() {
    // A tenant counts as active for 2 s after its last request here (60 s by default).
    let active = Duration::from_secs(2);
    let (_mock, kg, admin_url) =
        two_tenants_on_a_quota("    fair_share: true\n    fair_share_active_seconds: 2\n").await;
    let quiet_sent = Instant::now();
    assert_eq!(generate(&kg.url(), FLASH, Some("tok-quiet")).await.0, 200);

    // While the quiet tenant is active, the heavy one is held off the last project.
    let (mut served, mut status, mut body) = heavy_until_refused(&kg).await;
    if !body.contains(FAIR_SHARE_REFUSAL) {
        // The request that found the other projects spent gets Google's own 429; the next
        // one is refused outright.
        let (more, s, b) = heavy_until_refused(&kg).await;
        (served, status, body) = (served + more, s, b);
    }
    assert!(
        quiet_sent.elapsed() < active,
        "too slow to test the active window: {:?}",
        quiet_sent.elapsed()
    );
    assert_eq!(status, 429);
    assert!(body.contains(FAIR_SHARE_REFUSAL), "{body}");
    assert!(served < QUOTA_UNITS - 1, "nothing was held back");

    // Idle for longer than the window, the quiet tenant holds nothing back any more: the
    // heavy tenant gets every unit left, and a 429 only once the pool is spent.
    tokio::time::sleep((active + Duration::from_millis(500)).saturating_sub(quiet_sent.elapsed()))
        .await;
    let (more, status, body) = heavy_until_refused(&kg).await;
    assert_eq!(
        served + more,
        QUOTA_UNITS - 1,
        "a 429 before the quota was spent: {body}"
    );
    assert_eq!(status, 429);
    assert!(body.contains(POOL_EXHAUSTED), "{body}");
    let tenants = admin_get(&admin_url, "/admin/tenants").await;
    assert_eq!(
        tenants["tenants"][0]["refused"]["fair_share"], 1,
        "{tenants}"
    );
    assert_eq!(
        tenants["tenants"][1]["refused"]["fair_share"], 0,
        "{tenants}"
    );
}

/// Creates a cached content through keygate and returns its name.
async fn create_cache(kg: &Keygate, token: Option<&str>) -> String {
    let mut req = client()
        .post(format!("{}/v1beta/cachedContents", kg.url()))
        .body(r#"{"model":"models/gemini-2.5-flash","contents":[{"role":"user","parts":[{"text":"a long document"}]}]}"#);
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["name"].as_str().unwrap().to_string()
}

async fn generate_with_cache(
    kg: &Keygate,
    cache: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:generateContent",
            kg.url()
        ))
        .body(format!(
            r#"{{"cachedContent":"{cache}","contents":[{{"role":"user","parts":[{{"text":"summarize"}}]}}]}}"#
        ));
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

const THREE_PROJECTS: [(&str, &str); 3] = [
    ("secret-k1", "p1"),
    ("secret-k2", "p2"),
    ("secret-k3", "p3"),
];

/// The three-project mock behind a keygate with tenants alice and bob.
async fn three_project_team() -> (Mock, Keygate) {
    let mock = three_project_mock().await;
    let yaml = format!(
        "{}{}",
        pool_yaml(&mock.url(), &THREE_PROJECTS),
        tenants_yaml(&[("alice", ""), ("bob", "")])
    );
    let kg = Keygate::start(&yaml);
    (mock, kg)
}

async fn three_project_mock() -> Mock {
    let mock = Mock::start().await;
    for (k, p) in THREE_PROJECTS {
        mock.key(k, p);
    }
    mock
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cached_content_is_always_used_through_its_own_project() {
    let mock = three_project_mock().await;
    let kg = Keygate::start(&pool_yaml(&mock.url(), &THREE_PROJECTS));
    let cache = create_cache(&kg, None).await;
    let owner = mock.owner_of(&cache).unwrap();
    let before = mock.seen().len();
    for _ in 0..6 {
        let (status, _, body) = generate_with_cache(&kg, &cache, None).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(&format!("hello from {owner}")), "{body}");
    }
    // Every request went straight to the owner: Google never had to refuse one.
    let seen = &mock.seen()[before..];
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    // Other requests keep rotating over all projects.
    let before = mock.seen().len();
    for _ in 0..6 {
        generate(&kg.url(), "gemini-2.5-flash", None).await;
    }
    let mut keys: Vec<String> = mock.keys_seen()[before..].to_vec();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 3, "{keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cooling_owner_project_gives_429_with_retry_after_not_a_permission_error() {
    let mock = three_project_mock().await;
    let kg = Keygate::start(&pool_yaml(&mock.url(), &THREE_PROJECTS));
    let cache = create_cache(&kg, None).await;
    let owner = mock.owner_of(&cache).unwrap();
    mock.per_minute_limit(&owner, "gemini-2.5-flash", 0, "40s");
    let (status, headers, body) = generate_with_cache(&kg, &cache, None).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {body}\n{}", kg.logs()))
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((40..=41).contains(&retry_after), "{retry_after}");
    assert!(body.contains(&format!("project '{owner}'")), "{body}");
    // No other project was asked (it would only have said "permission denied").
    assert!(mock.seen().iter().all(|s| s.status != 403));
    // While it cools, nothing goes upstream at all.
    let before = mock.seen().len();
    let (status, _, _) = generate_with_cache(&kg, &cache, None).await;
    assert_eq!(status, 429);
    assert_eq!(mock.seen().len(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_belongs_to_the_tenant_that_made_it() {
    let (mock, kg) = three_project_team().await;
    let cache = create_cache(&kg, Some("tok-alice")).await;
    let before = mock.seen().len();
    let (status, _, body) = generate_with_cache(&kg, &cache, Some("tok-bob")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("belongs to another tenant"), "{body}");
    assert_eq!(mock.seen().len(), before);
    let (status, _, _) = generate_with_cache(&kg, &cache, Some("tok-alice")).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_ids_are_keygates_own_and_bound_to_the_tenant() {
    let (mock, kg) = three_project_team().await;
    let url = start_upload(&kg, "tok-alice").await;
    // The URL points at keygate, with an id that is not Google's.
    assert!(
        url.starts_with(&format!("{}/upload/v1beta/files?upload_id=", kg.url())),
        "{url}"
    );
    assert!(!url.contains("mock-upload"), "{url}");
    assert!(url.contains("upload_protocol=resumable"), "{url}");
    let before = mock.seen().len();

    // A forged id and another tenant's token are refused; nothing goes upstream.
    let forged = format!("{}/upload/v1beta/files?upload_id=0123456789abcdef0123456789abcdef&upload_protocol=resumable", kg.url());
    let (status, body) = send_bytes(&forged, None).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = send_bytes(&url, Some("tok-bob")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("another tenant"), "{body}");
    let (status, _) = send_bytes(&url, Some("tok-wrong")).await;
    assert_eq!(status, 401);
    assert_eq!(mock.seen().len(), before);

    // Without any credential (as the SDKs send it), the id is enough.
    let (status, body) = send_bytes(&url, None).await;
    assert_eq!(status, 200, "{body}");
    let file: Value = serde_json::from_str(&body).unwrap();
    let name = file["file"]["name"].as_str().unwrap();
    let owner = mock.owner_of(name).unwrap();
    // The finished upload's id is spent, and it never reached the log (it was a credential).
    let (status, _) = send_bytes(&url, None).await;
    assert_eq!(status, 404);
    let id = url
        .split("upload_id=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    kg.assert_logs_clean(&[id]);
    // The file is used through its project, by its tenant only.
    let uri = file["file"]["uri"].as_str().unwrap();
    let body = format!(
        r#"{{"contents":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{uri}","mimeType":"text/plain"}}}},{{"text":"summarize"}}]}}]}}"#
    );
    for token in ["tok-alice", "tok-alice", "tok-alice", "tok-bob"] {
        let resp = client()
            .post(format!(
                "{}/v1beta/models/gemini-2.5-flash:generateContent",
                kg.url()
            ))
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
    assert!(mock.seen().iter().all(|s| s.status != 403));
    kg.assert_logs_clean(&[
        "tok-alice",
        "tok-bob",
        "secret-k1",
        "secret-k2",
        "secret-k3",
    ]);
}

/// Sends `method` to `path` of keygate (as `token`'s tenant, if any) with a JSON `body` (none
/// when empty): the status and the answer's text.
async fn call(
    kg: &Keygate,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut req = client().request(method.parse().unwrap(), format!("{}{path}", kg.url()));
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    if !body.is_empty() {
        req = req
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The body of a new interaction; a follow-up of `previous` when given.
fn interaction_body(previous: Option<&str>, stream: bool) -> String {
    let mut body = serde_json::json!({"model": "gemini-2.5-flash", "input": "hi"});
    if let Some(p) = previous {
        body["previous_interaction_id"] = p.into();
    }
    if stream {
        body["stream"] = true.into();
    }
    body.to_string()
}

/// Starts an interaction through keygate as `token`'s tenant (if any): its id.
async fn start_interaction(kg: &Keygate, token: Option<&str>) -> String {
    let body = interaction_body(None, false);
    let (status, answer) = call(kg, "POST", "/v1beta/interactions", token, &body).await;
    assert_eq!(status, 200, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    answer["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn interaction_follow_ups_reach_the_project_that_holds_the_conversation() {
    let keys = [("secret-k1", "p1"), ("secret-k2", "p2")];
    let mock = Mock::start().await;
    for (k, p) in keys {
        mock.key(k, p);
    }
    let kg = Keygate::start(&pool_yaml(&mock.url(), &keys));
    let mut id = start_interaction(&kg, None).await;
    let owner = mock.owner_of(&format!("interactions/{id}")).unwrap();
    let hello = format!("hello from {owner}");
    let before = mock.seen().len();
    for turn in 0..6 {
        // Each follow-up is an interaction of its own, in the same project: the next one
        // continues it (streamed every other turn).
        let body = interaction_body(Some(&id), turn % 2 == 1);
        let (status, answer) = call(&kg, "POST", "/v1beta/interactions", None, &body).await;
        assert_eq!(status, 200, "turn {turn}: {answer}");
        assert!(answer.contains(&hello), "turn {turn}: {answer}");
        let (status, read) =
            call(&kg, "GET", &format!("/v1beta/interactions/{id}"), None, "").await;
        assert_eq!(status, 200, "turn {turn}: {read}");
        id = match answer.strip_prefix('{') {
            Some(_) => serde_json::from_str::<Value>(&answer).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
            None => answer
                .split("\"id\":\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap()
                .to_string(),
        };
        assert_eq!(
            mock.owner_of(&format!("interactions/{id}")),
            Some(owner.clone())
        );
    }
    // Every request went to the owner's key: Google never had to say "not found".
    let seen = &mock.seen()[before..];
    assert_eq!(seen.len(), 12);
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let owner_key = keys.iter().find(|(_, p)| *p == owner).unwrap().0;
    assert!(seen.iter().all(|s| s.key.as_deref() == Some(owner_key)));
    // Deleting it forgets it; other requests keep rotating over both projects.
    let path = format!("/v1beta/interactions/{id}");
    assert_eq!(call(&kg, "DELETE", &path, None, "").await.0, 200);
    let before = mock.seen().len();
    for _ in 0..4 {
        generate(&kg.url(), "gemini-2.5-flash", None).await;
    }
    let mut used: Vec<String> = mock.keys_seen()[before..].to_vec();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 2, "{used:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_interaction_is_forwarded_once_and_bound_where_it_answered() {
    let keys = [("secret-k1", "p1"), ("secret-k2", "p2")];
    let mock = Mock::start().await;
    for (k, p) in keys {
        mock.key(k, p);
    }
    let kg = Keygate::start(&pool_yaml(&mock.url(), &keys));
    // No project holds it: Google's 404 comes back after one try, no project is searched.
    let before = mock.seen().len();
    let body = interaction_body(Some("v1_nowhere"), false);
    let (status, answer) = call(&kg, "POST", "/v1beta/interactions", None, &body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(mock.seen().len(), before + 1);
    let (status, _) = call(&kg, "GET", "/v1beta/interactions/v1_nowhere", None, "").await;
    assert_eq!(status, 404);
    assert_eq!(mock.seen().len(), before + 2);
    // One made outside keygate, in p2: each request goes out once; once p2 has answered, it
    // is bound there and the rest go to p2 only.
    let premade = mock.make_interaction("p2");
    let path = format!("/v1beta/interactions/{premade}");
    let mut found = false;
    for _ in 0..6 {
        let before = mock.seen().len();
        let (status, answer) = call(&kg, "GET", &path, None, "").await;
        assert_eq!(mock.seen().len(), before + 1, "{answer}");
        assert!(
            status == 200 || (status == 404 && !found),
            "{status} {answer}"
        );
        found |= status == 200;
    }
    assert!(found);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interaction_belongs_to_the_tenant_that_started_it() {
    let (mock, kg) = three_project_team().await;
    let id = start_interaction(&kg, Some("tok-alice")).await;
    let owner = mock.owner_of(&format!("interactions/{id}")).unwrap();
    let path = format!("/v1beta/interactions/{id}");
    let before = mock.seen().len();
    // Bob can neither continue, read, cancel nor delete it; nothing reaches Google for him.
    let follow_up = interaction_body(Some(&id), false);
    for (method, path, body) in [
        ("POST", "/v1beta/interactions", follow_up.as_str()),
        ("GET", path.as_str(), ""),
        ("DELETE", path.as_str(), ""),
        ("POST", &format!("{path}/cancel"), ""),
    ] {
        let (status, answer) = call(&kg, method, path, Some("tok-bob"), body).await;
        assert_eq!(status, 403, "{method} {path}: {answer}");
        assert!(answer.contains("belongs to another tenant"), "{answer}");
    }
    assert_eq!(mock.seen().len(), before);
    // Alice's follow-ups go to her interaction's project, streamed or not.
    for stream in [false, true, false] {
        let body = interaction_body(Some(&id), stream);
        let (status, answer) = call(
            &kg,
            "POST",
            "/v1beta/interactions",
            Some("tok-alice"),
            &body,
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer.contains(&format!("hello from {owner}")), "{answer}");
    }
    let (status, _) = call(&kg, "GET", &path, Some("tok-alice"), "").await;
    assert_eq!(status, 200);
    assert!(mock.seen()[before..].iter().all(|s| s.status == 200));
    // One keygate never saw is refused for a tenant, never searched for across projects; so is
    // an interaction with an agent keygate does not track.
    let premade = mock.make_interaction("p2");
    let before = mock.seen().len();
    let body = interaction_body(Some(&premade), false);
    let (status, answer) = call(
        &kg,
        "POST",
        "/v1beta/interactions",
        Some("tok-alice"),
        &body,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("not known to keygate"), "{answer}");
    let agent = r#"{"agent":"deep-research-pro-preview-12-2025","input":"hi"}"#;
    let (status, answer) = call(
        &kg,
        "POST",
        "/v1beta/interactions",
        Some("tok-alice"),
        agent,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(mock.seen().len(), before);
}
