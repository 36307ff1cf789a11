//! The limits above the (project, model) and the 429s that lie, against the Rust mock Gemini
//! answering as Google does in 2026: billing-account spending caps switched at run time, a
//! model missing from a project's tier ("limit: 0"), detail-less quota refusals and a
//! `retryDelay` that keeps being wrong.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const FLASH: &str = "gemini-2.5-flash";
const PRO: &str = "gemini-2.5-pro";

/// Requests the mock got with `key`.
fn asked(mock: &Mock, key: &str) -> usize {
    mock.keys_seen().iter().filter(|k| *k == key).count()
}

/// Requests the mock answered with `status` for `key`.
fn answered(mock: &Mock, key: &str, status: u16) -> usize {
    mock.seen()
        .iter()
        .filter(|s| s.key.as_deref() == Some(key) && s.status == status)
        .count()
}

async fn pools(admin: &str) -> Value {
    let (status, body) = common::admin(
        "GET",
        &format!("{admin}/admin/pools"),
        Some(ADMIN_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The admin API's view of one key.
fn key_view(pools: &Value, key: &str) -> Value {
    let fp = keygate::secret::fingerprint(key.as_bytes());
    pools["pools"][0]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == fp.as_str())
        .cloned()
        .unwrap()
}

async fn metrics(admin: &str) -> String {
    let resp = client()
        .get(format!("{admin}/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap()
}

/// Sends `n` generateContent requests for `model`; every one must be served.
async fn all_served(kg: &Keygate, model: &str, n: usize) {
    for i in 0..n {
        let (status, _, body) = generate(&kg.url(), model, None).await;
        assert_eq!(status, 200, "request {i} for {model}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capped_billing_account_is_asked_once_per_probe_while_others_serve() {
    let mock = Mock::start().await;
    for (k, p) in [("k1", "p1"), ("k2", "p2"), ("k3", "p3")] {
        mock.key(k, p);
    }
    mock.billing_account("p1", "acct-a")
        .billing_account("p2", "acct-a")
        .billing_account("p3", "acct-b")
        .cap_account("acct-a", true);
    let yaml = format!(
        "pools:\n  - name: main\n    upstream: \"{}\"\n    cap_probe_seconds: 3\n    keys:\n      - {{key: k1, project: p1, billing_account: acct-a}}\n      - {{key: k2, project: p2, billing_account: acct-a}}\n      - {{key: k3, project: p3, billing_account: acct-b}}\n",
        mock.url()
    );
    let (kg, admin) = start_with_admin(&yaml);

    // Every request is served by the other account, on every model; the capped account is
    // asked once in all (its first refusal stops both of its projects).
    all_served(&kg, FLASH, 12).await;
    all_served(&kg, PRO, 6).await;
    let capped = || asked(&mock, "k1") + asked(&mock, "k2");
    assert!(capped() <= 1, "capped account asked {} times", capped());
    assert_eq!(
        capped(),
        mock.seen().iter().filter(|s| s.status == 429).count()
    );
    let view = pools(&admin).await;
    let caps = view["pools"][0]["caps"].as_array().unwrap();
    assert_eq!(caps.len(), 1, "{view}");
    assert_eq!(caps[0]["scope"], "billing_account");
    assert_eq!(caps[0]["name"], "acct-a");
    assert_eq!(caps[0]["kind"], "monthly_spending_cap");
    assert_eq!(key_view(&view, "k2")["state"], "capped");
    assert_eq!(key_view(&view, "k3")["state"], "ok");

    // After a probe interval, one request (no more) tests the cap, and is still served.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let before = capped();
    all_served(&kg, FLASH, 10).await;
    assert_eq!(capped(), before + 1, "one probe");

    // The owner raises the cap: the next probe is served, and the account serves again.
    mock.cap_account("acct-a", false);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    all_served(&kg, FLASH, 12).await;
    assert!(asked(&mock, "k1") >= 2 && asked(&mock, "k2") >= 2, "lifted");
    let view = pools(&admin).await;
    assert_eq!(view["pools"][0]["caps"], serde_json::json!([]), "{view}");
    let text = metrics(&admin).await;
    assert!(
        text.contains(r#"keygate_quota_limits_total{kind="monthly_spending_cap",pool="main",scope="billing_account"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"keygate_caps_lifted_total{pool="main",scope="billing_account"} 1"#),
        "{text}"
    );
    assert!(kg
        .logs()
        .contains("billing account \"acct-a\" hit its monthly spending cap"));
    kg.assert_logs_clean(&["k1", "k2", "k3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_missing_from_a_tier_is_asked_once_a_day() {
    let mock = Mock::start().await;
    mock.key("k1", "p1").key("k2", "p2").limit_zero("p1", PRO);
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]));

    all_served(&kg, PRO, 10).await;
    let pro_on_k1 = mock
        .seen()
        .iter()
        .filter(|s| s.key.as_deref() == Some("k1") && s.path.contains(PRO))
        .count();
    // Round robin reaches k1 among the first two picks: asked once, then never again.
    assert_eq!(pro_on_k1, 1);
    // Its other models still serve.
    all_served(&kg, FLASH, 6).await;
    assert!(mock
        .seen()
        .iter()
        .any(|s| s.key.as_deref() == Some("k1") && s.path.contains(FLASH) && s.status == 200));
    let cooldown = key_view(&pools(&admin).await, "k1")["cooldowns"][0].clone();
    assert_eq!(cooldown["model"], PRO);
    assert_eq!(cooldown["kind"], "unavailable");
    // Until midnight in Los Angeles, not the 11 s Google said.
    let midnight = keygate::quota::classify::next_midnight_los_angeles(chrono::Utc::now());
    let until = chrono::DateTime::parse_from_rfc3339(cooldown["until"].as_str().unwrap()).unwrap();
    let off = (until.timestamp() - midnight.timestamp()).abs();
    assert!(off <= 60, "{cooldown} against {midnight}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detail_less_quota_refusal_cools_its_project_and_model() {
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .detail_less_quota("p1", FLASH, true);
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]));
    all_served(&kg, FLASH, 10).await;
    // Not retried on every request as shared capacity would be: once, then cooled.
    assert_eq!(asked(&mock, "k1"), 1);
    all_served(&kg, PRO, 4).await;
    assert!(mock
        .seen()
        .iter()
        .any(|s| s.key.as_deref() == Some("k1") && s.path.contains(PRO)));
    let cooldown = key_view(&pools(&admin).await, "k1")["cooldowns"][0].clone();
    assert_eq!(
        (cooldown["model"].as_str(), cooldown["kind"].as_str()),
        (Some(FLASH), Some("quota"))
    );
    let left = cooldown["seconds_left"].as_u64().unwrap();
    assert!((50..=60).contains(&left), "{cooldown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_retry_delay_backs_off_harder_each_time_and_a_success_resets_it() {
    let mock = Mock::start().await;
    // p1 keeps saying "retry in 0.2 s" and keeps refusing; p2 serves.
    mock.key("k1", "p1")
        .key("k2", "p2")
        .per_minute_limit("p1", FLASH, 0, "0.2s");
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]));

    // Asks every 50 ms for 6 s, noting when p1 was asked.
    let start = Instant::now();
    let mut times = Vec::new();
    while start.elapsed() < Duration::from_secs(6) {
        let before = asked(&mock, "k1");
        let (status, _, body) = generate(&kg.url(), FLASH, None).await;
        assert_eq!(status, 200, "{body}");
        if asked(&mock, "k1") > before {
            times.push(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Taken at its word, 1.2 s cooldowns would ask p1 five times or more in 6 s; doubling
    // (1.2, 2.4, 4.8 s) asks it at most four times, each gap longer than the last.
    assert!((2..=4).contains(&times.len()), "{times:?}");
    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] > 1.2 * pair[0], "gaps {gaps:?}");
    }
    // The admin API says so: every repeat doubled it.
    let view = pools(&admin).await;
    let cooldown = &key_view(&view, "k1")["cooldowns"][0];
    assert_eq!(cooldown["escalations"], times.len() as u64 - 1, "{view}");

    // p1 serves again: a success starts the escalation over.
    mock.per_minute_limit("p1", FLASH, 1000, "0.2s");
    let deadline = Instant::now() + Duration::from_secs(15);
    while answered(&mock, "k1", 200) == 0 {
        assert!(Instant::now() < deadline, "p1 never served again");
        generate(&kg.url(), FLASH, None).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mock.per_minute_limit("p1", FLASH, 0, "0.2s");
    let before = answered(&mock, "k1", 429);
    while answered(&mock, "k1", 429) == before {
        assert!(Instant::now() < deadline, "p1 never refused again");
        generate(&kg.url(), FLASH, None).await;
    }
    let view = pools(&admin).await;
    let cooldown = key_view(&view, "k1")["cooldowns"][0].clone();
    assert_eq!(cooldown["escalations"], 0, "{view}");
    assert!(
        cooldown["seconds_left"].as_u64().unwrap() <= 2,
        "{cooldown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detail_less_refusal_repeated_after_its_minute_cools_twice_as_long() {
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .key("k2", "p2")
        .detail_less_quota("p1", FLASH, true);
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("k1", "p1"), ("k2", "p2")]));
    all_served(&kg, FLASH, 2).await;
    assert_eq!(answered(&mock, "k1", 429), 1);
    let first = key_view(&pools(&admin).await, "k1")["cooldowns"][0].clone();
    assert_eq!(first["escalations"], 0, "{first}");
    // The minute passes; p1 is asked again, refuses again, and cools two minutes.
    tokio::time::sleep(Duration::from_secs(61)).await;
    all_served(&kg, FLASH, 4).await;
    assert_eq!(answered(&mock, "k1", 429), 2);
    let second = key_view(&pools(&admin).await, "k1")["cooldowns"][0].clone();
    assert_eq!(second["escalations"], 1, "{second}");
    let left = second["seconds_left"].as_u64().unwrap();
    assert!((110..=120).contains(&left), "{second}");
}
