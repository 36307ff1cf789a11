//! A fault soak, bounded to about a minute: keygate in front of a mock that holds Google-like
//! quotas (a token bucket per project, ten projects) and fails on purpose (seeded: 5% 503s,
//! 2% 500s, 3% connections cut before any header), under traffic paced at three quarters of
//! the pool's capacity, a third of it streamed. What a user would notice is asserted: every
//! request answered, every stream whole, hardly any 5xx or 429, no ERROR line for an operator
//! to chase, and memory back where it started.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::{Duration, Instant};

/// Tokens per second of each project's bucket (burst: as many): tiers differ, so round-robin
/// alone would keep running the small ones dry.
const RATES: [f64; 10] = [2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 7.0, 8.0, 9.0, 10.0];
/// Share of the pool's capacity the traffic asks for.
const LOAD: f64 = 0.75;
const REQUESTS: usize = 2100;

#[derive(Debug)]
enum Answer {
    Answered { status: u16, complete: bool },
    Failed(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_faults_and_quotas_every_request_is_answered() {
    let mock = Mock::start().await;
    let keys: Vec<(String, String)> = (0..RATES.len())
        .map(|i| (format!("soak-key-{i}"), format!("p{i}")))
        .collect();
    for ((k, p), rate) in keys.iter().zip(RATES) {
        mock.key(k, p).token_bucket(p, rate, rate);
    }
    mock.sse(4, Duration::from_millis(5));
    mock.faults(0x5eed_2026, 0.05, 0.02, 0.03);
    let pairs: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
    let kg = Keygate::start(&pool_yaml(&mock.url(), &pairs));

    // Warm up (connections, allocator), then note the memory.
    for _ in 0..20 {
        generate(&kg.url(), "gemini-2.5-flash", None).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = kg.rss_kib();

    let capacity: f64 = RATES.iter().sum();
    let gap = Duration::from_secs_f64(1.0 / (capacity * LOAD));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        tokio::time::sleep_until((started + gap * i as u32).into()).await;
        let base = kg.url();
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                stream(&base).await
            } else {
                unary(&base).await
            }
        }));
    }
    let mut results = Vec::with_capacity(REQUESTS);
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let took = started.elapsed();

    let count = |f: &dyn Fn(&Answer) -> bool| results.iter().filter(|r| f(r)).count();
    let failed: Vec<&str> = results
        .iter()
        .filter_map(|r| match r {
            Answer::Failed(why) => Some(why.as_str()),
            Answer::Answered { .. } => None,
        })
        .collect();
    let server_errors = count(&|r| matches!(r, Answer::Answered { status, .. } if *status >= 500));
    let refusals = count(&|r| matches!(r, Answer::Answered { status: 429, .. }));
    let broken = count(&|r| {
        matches!(
            r,
            Answer::Answered {
                status: 200,
                complete: false
            }
        )
    });
    let ok = count(&|r| {
        matches!(
            r,
            Answer::Answered {
                status: 200,
                complete: true
            }
        )
    });
    let (injected, resets) = mock.injected();
    let quota_429s = mock.seen().iter().filter(|s| s.status == 429).count();
    eprintln!(
        "soak: {REQUESTS} requests in {took:?}: {ok} ok, {server_errors} 5xx, {refusals} 429, {broken} broken streams, {} unanswered; upstream saw {} requests ({} arrivals), injected {injected} 5xx and {resets} resets, {quota_429s} quota 429s",
        failed.len(),
        mock.seen().len(),
        mock.arrivals(),
    );
    assert!(failed.is_empty(), "unanswered: {failed:?}");
    assert_eq!(broken, 0, "streams cut short");
    assert!(
        (server_errors as f64) < REQUESTS as f64 * 0.005,
        "{server_errors} 5xx of {REQUESTS}"
    );
    assert!(
        (refusals as f64) < REQUESTS as f64 * 0.01,
        "{refusals} 429 of {REQUESTS}"
    );
    // The faults and quotas really happened.
    assert!(injected > REQUESTS / 20, "{injected} injected 5xx");
    assert!(resets > REQUESTS / 50, "{resets} injected resets");
    assert!(quota_429s > 0, "no quota was ever hit");

    // Memory is back within 20 MiB of where it started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = kg.rss_kib();
    eprintln!("soak: RSS {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 20 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Nothing here needs an operator: no ERROR line.
    let logs = kg.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines:\n{}", errors.join("\n"));
}

async fn unary(base: &str) -> Answer {
    let url = format!("{base}/v1beta/models/gemini-2.5-flash:generateContent");
    send(&url, |body| body.contains("\"finishReason\":\"STOP\"")).await
}

async fn stream(base: &str) -> Answer {
    let url = format!("{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    // Four events, the last one finished.
    send(&url, |body| {
        body.matches("data: ").count() == 4 && body.contains("\"finishReason\":\"STOP\"")
    })
    .await
}

/// POSTs a prompt to `url`; a 200 counts as complete when `whole` accepts its body.
async fn send(url: &str, whole: impl Fn(&str) -> bool) -> Answer {
    let resp = match client_timeout(Duration::from_secs(30))
        .post(url)
        .body(prompt())
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return Answer::Failed(e.to_string()),
    };
    let status = resp.status().as_u16();
    match resp.text().await {
        Ok(body) => Answer::Answered {
            status,
            complete: status != 200 || whole(&body),
        },
        Err(e) => Answer::Failed(format!("{status}: {e}")),
    }
}
