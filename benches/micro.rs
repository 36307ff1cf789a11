//! Hot-path micro benchmarks, each against the naive structure it replaces:
//! - key selection (snapshot + atomic round-robin vs a `Mutex` and a linear scan) with 10, 1,000
//!   and 10,000 keys, none or 99% of them cooling;
//! - classification of each error body in the Gemini API notes;
//! - tenant lookup among 10,000 tenants (digest map vs a linear scan of tokens);
//! - the request checks of the security pass, on a typical request: the canonical path, the key
//!   parameter split off the query, the model read from the body, resource names found in the
//!   body (a chat turn, and a 5 MB inline image);
//! - the response cache: a request's plan (entry key from the canonical body) on the same
//!   bodies, and a hit looked up among 10,000 entries in the `quick_cache` store vs a
//!   `Mutex<HashMap>`.
//!
//! Run: `cargo bench --bench micro`. Figures are written down in BENCHMARKS.md.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]
// criterion_group! makes an undocumented pub fn.
#![allow(missing_docs)]

use chrono::{TimeZone, Utc};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::config::{KeyConfig, PoolConfig, UpstreamConfig};
use keygate::quota::classify::{Cooling, Penalty};
use keygate::quota::keys::{KeyId, KeyPool, Pick, Transition};
use keygate::secret::Secret;
use std::collections::HashMap;
use std::sync::Mutex;

const NOW: u64 = 1_000_000;
const UNTIL: u64 = 2_000_000;

fn pool(n: usize) -> KeyPool {
    KeyPool::new(&PoolConfig {
        name: "bench".into(),
        upstream: UpstreamConfig {
            tls: false,
            host: "127.0.0.1".into(),
            port: 1,
            addresses: Vec::new(),
            base_path: String::new(),
            headers: Vec::new(),
        },
        keys: (0..n)
            .map(|i| KeyConfig {
                secret: Secret::new(format!("made-up-key-{i}")),
                project: format!("project-{i}"),
                billing_account: None,
                note: None,
            })
            .collect(),
        key_variables: None,
        tls_ca_file: None,
        models: Vec::new(),
        proxy: None,
        cap_probe: std::time::Duration::from_secs(3600),
        fair_share: None,
        cache_shared_across_tenants: false,
    })
}

/// The naive structure: every pick locks the table and scans for a usable key.
struct Naive {
    next: Mutex<usize>,
    cool_until: Mutex<HashMap<(usize, String), u64>>,
    keys: usize,
}

impl Naive {
    fn pick(&self, model: &str, now: u64) -> Option<usize> {
        let table = self.cool_until.lock().unwrap();
        let mut next = self.next.lock().unwrap();
        for i in 0..self.keys {
            let k = (*next + i) % self.keys;
            let cooling = table
                .get(&(k, model.to_string()))
                .is_some_and(|until| *until > now);
            if !cooling {
                *next = k + 1;
                return Some(k);
            }
        }
        None
    }
}

fn selection(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for &n in &[10usize, 1_000, 10_000] {
        for &cooling_pct in &[0usize, 99] {
            let cooling = n * cooling_pct / 100;
            let label = format!("{n}keys/{cooling_pct}%cooling");

            let p = pool(n);
            let until = Utc.timestamp_millis_opt(UNTIL as i64).unwrap();
            for k in 0..cooling {
                let penalty = Penalty::CoolProjectModel {
                    until,
                    why: Cooling::Day,
                };
                let cool = Transition::Penalise {
                    penalty: &penalty,
                    model: "gemini-2.5-pro",
                    method: "generateContent",
                };
                p.change(KeyId(k as u32), cool, NOW);
            }
            group.bench_with_input(BenchmarkId::new("keygate", &label), &p, |b, p| {
                b.iter(|| {
                    let pick = p.pick(black_box("gemini-2.5-pro"), "generateContent", &[], NOW);
                    assert!(matches!(pick, Pick::Key(_)));
                    pick
                })
            });

            let naive = Naive {
                next: Mutex::new(0),
                cool_until: Mutex::new(
                    (0..cooling)
                        .map(|k| ((k, "gemini-2.5-pro".to_string()), UNTIL))
                        .collect(),
                ),
                keys: n,
            };
            group.bench_with_input(BenchmarkId::new("naive", &label), &naive, |b, naive| {
                b.iter(|| naive.pick(black_box("gemini-2.5-pro"), NOW).unwrap())
            });
        }
    }
    group.finish();
}

fn classification(c: &mut Criterion) {
    let quota = |id: &str, delay: &str| {
        format!(
            r#"{{"error":{{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"{id}","quotaDimensions":{{"location":"global","model":"gemini-2.5-pro"}},"quotaValue":"5"}}]}},{{"@type":"type.googleapis.com/google.rpc.Help","links":[{{"description":"Learn more","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}}]}},{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
        )
    };
    let info = |code: u16, status: &str, message: &str, reason: &str| {
        format!(
            r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}","details":[{{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"{reason}","domain":"googleapis.com","metadata":{{"service":"generativelanguage.googleapis.com"}}}}]}}}}"#
        )
    };
    let plain = |code: u16, status: &str, message: &str| {
        format!(r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}"}}}}"#)
    };
    let cases: Vec<(&str, u16, String)> = vec![
        (
            "429_per_minute",
            429,
            quota(
                "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                "53s",
            ),
        ),
        (
            "429_per_day",
            429,
            quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "22s"),
        ),
        (
            "429_bare",
            429,
            plain(
                429,
                "RESOURCE_EXHAUSTED",
                "Resource has been exhausted (e.g. check quota).",
            ),
        ),
        (
            "402_billing",
            402,
            plain(
                402,
                "RESOURCE_EXHAUSTED",
                "Your prepayment credits are depleted.",
            ),
        ),
        (
            "400_key_invalid",
            400,
            info(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                "API_KEY_INVALID",
            ),
        ),
        (
            "403_suspended",
            403,
            info(
                403,
                "PERMISSION_DENIED",
                "Consumer has been suspended.",
                "CONSUMER_SUSPENDED",
            ),
        ),
        (
            "403_service_blocked",
            403,
            info(
                403,
                "PERMISSION_DENIED",
                "Requests to this API method are blocked.",
                "API_KEY_SERVICE_BLOCKED",
            ),
        ),
        (
            "400_location",
            400,
            plain(
                400,
                "FAILED_PRECONDITION",
                "User location is not supported for the API use.",
            ),
        ),
        (
            "403_file_permission",
            403,
            plain(
                403,
                "PERMISSION_DENIED",
                "You do not have permission to access the File x or it may not exist.",
            ),
        ),
        (
            "400_openai_array",
            400,
            format!(
                "[{}]",
                info(
                    400,
                    "INVALID_ARGUMENT",
                    "API key not valid.",
                    "API_KEY_INVALID"
                )
            ),
        ),
        (
            "503_overloaded",
            503,
            plain(503, "UNAVAILABLE", "The model is overloaded."),
        ),
        ("200_ok", 200, String::new()),
    ];
    let mut group = c.benchmark_group("classify");
    for (name, status, body) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| {
                keygate::quota::classify::classify(black_box(*status), black_box(body.as_bytes()))
            })
        });
    }
    group.finish();
}

fn tenant_lookup(c: &mut Criterion) {
    use keygate::config::TenantConfig;
    use keygate::secret::sha256;
    use keygate::tenants::{Auth, Tenants};
    let tokens: Vec<String> = (0..10_000)
        .map(|i| format!("made-up-token-{i:05}"))
        .collect();
    let configs: Vec<TenantConfig> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| TenantConfig {
            name: format!("tenant-{i}"),
            token_sha256: sha256(t.as_bytes()),
            pools: vec![0],
            rpm: None,
            max_concurrent: None,
        })
        .collect();
    let tenants = Tenants::new(&configs, None);
    // The naive baseline: compare the presented token with every stored one.
    let naive: Vec<(String, String)> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), format!("tenant-{i}")))
        .collect();
    let probe = tokens[7_777].clone();
    let mut group = c.benchmark_group("tenant_lookup_10000");
    group.bench_function("keygate", |b| {
        b.iter(|| {
            let auth = tenants.authenticate(Some(black_box(probe.as_bytes())));
            assert!(matches!(auth, Auth::Tenant(_)));
            auth
        })
    });
    group.bench_function("naive_linear_scan", |b| {
        b.iter(|| {
            naive
                .iter()
                .find(|(t, _)| t.as_bytes() == black_box(probe.as_bytes()))
                .map(|(_, n)| n.clone())
        })
    });
    group.finish();
}

fn request_checks(c: &mut Criterion) {
    use keygate::wire::names::names_in_body;
    use keygate::wire::path::{canonical, split_query};
    use keygate::wire::request::{model_of, Api};
    let mut group = c.benchmark_group("request_checks");
    let path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent";
    group.bench_function("canonical_path", |b| b.iter(|| canonical(black_box(path))));
    group.bench_function("split_query", |b| {
        b.iter(|| split_query(black_box(Some("alt=sse&key=made-up-token"))))
    });
    let chat = br#"{"contents":[{"role":"user","parts":[{"text":"Write a haiku about rotating API keys."}]},{"role":"model","parts":[{"text":"Keys turn like seasons"}]},{"role":"user","parts":[{"text":"Another one, about quotas."}]}],"generationConfig":{"temperature":0.7}}"#;
    group.bench_function("model_of_native_chat", |b| {
        b.iter(|| model_of(Api::Gemini, black_box(path), false, black_box(chat)))
    });
    let openai = br#"{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"Write a haiku about rotating API keys."}],"stream":true}"#;
    group.bench_function("model_of_openai_chat", |b| {
        b.iter(|| {
            model_of(
                Api::OpenAi,
                "/v1beta/openai/chat/completions",
                false,
                black_box(openai),
            )
        })
    });
    group.bench_function("names_in_body_chat", |b| {
        b.iter(|| names_in_body(black_box(chat)))
    });
    let mut image =
        br#"{"contents":[{"parts":[{"inlineData":{"mimeType":"image/png","data":""#.to_vec();
    image.extend(std::iter::repeat_n(b'Q', 5 << 20));
    image.extend_from_slice(br#""}},{"text":"describe"}]}]}"#);
    group.bench_function("names_in_body_5mb_image", |b| {
        b.iter(|| names_in_body(black_box(&image)))
    });
    // With tenants, every body is checked to be strict JSON first.
    group.bench_function("strict_json_chat", |b| {
        b.iter(|| keygate::wire::request::strict_json(black_box(chat)))
    });
    group.bench_function("strict_json_5mb_image", |b| {
        b.iter(|| keygate::wire::request::strict_json(black_box(&image)))
    });
    group.finish();
}

fn response_cache(c: &mut Criterion) {
    use futures_util::FutureExt;
    use keygate::cache::{plan, Ask, Entry, EntryKey, MemoryStore, Store};
    use std::sync::Arc;
    let mut group = c.benchmark_group("response_cache");
    let headers = http::HeaderMap::new();
    let path = "/v1beta/models/gemini-2.5-flash:generateContent";
    let ask = |body: &'static [u8]| Ask {
        tenant: None,
        pool: "main",
        shared: false,
        method: &http::Method::POST,
        path,
        query: None,
        model: "gemini-2.5-flash",
        headers: &headers,
        body,
    };
    let chat = br#"{"contents":[{"role":"user","parts":[{"text":"Write a haiku about rotating API keys."}]},{"role":"model","parts":[{"text":"Keys turn like seasons"}]},{"role":"user","parts":[{"text":"Another one, about quotas."}]}],"generationConfig":{"temperature":0.7}}"#;
    group.bench_function("plan_chat", |b| b.iter(|| plan(black_box(&ask(chat)))));
    let mut image =
        br#"{"contents":[{"parts":[{"inlineData":{"mimeType":"image/png","data":""#.to_vec();
    image.extend(std::iter::repeat_n(b'Q', 5 << 20));
    image.extend_from_slice(br#""}},{"text":"describe"}]}]}"#);
    let image: &'static [u8] = Box::leak(image.into_boxed_slice());
    group.bench_function("plan_5mb_image", |b| {
        b.iter(|| plan(black_box(&ask(image))))
    });

    let key = |i: u32| EntryKey {
        tenant: Some(Arc::from("alice")),
        digest: {
            let mut d = [0u8; 32];
            d[..4].copy_from_slice(&i.to_le_bytes());
            d
        },
    };
    let entry = Arc::new(Entry::new(
        Vec::new(),
        bytes::Bytes::from(vec![b'x'; 400]),
        1,
        50,
    ));
    let store = MemoryStore::new(256 << 20, std::time::Duration::from_secs(600));
    let naive: Mutex<HashMap<EntryKey, Arc<Entry>>> = Mutex::new(HashMap::new());
    for i in 0..10_000 {
        store.put(key(i), entry.clone()).now_or_never();
        naive.lock().unwrap().insert(key(i), entry.clone());
    }
    let wanted = key(4242);
    group.bench_function("get_hit_quick_cache", |b| {
        b.iter(|| store.get(black_box(&wanted), 2).now_or_never())
    });
    group.bench_function("get_hit_mutex_hashmap", |b| {
        b.iter(|| naive.lock().unwrap().get(black_box(&wanted)).cloned())
    });
    group.finish();
}

criterion_group!(
    benches,
    selection,
    classification,
    tenant_lookup,
    request_checks,
    response_cache
);
criterion_main!(benches);
