//! Key selection cost: keygate's snapshot + atomic round-robin against a naive baseline
//! (a `Mutex` around the table and a linear scan for a key that is not cooling), with
//! 10, 1,000 and 10,000 keys, none or 99% of them cooling.
//!
//! Run: `cargo bench --bench keys`. Figures are written down in BENCHMARKS.md.

use chrono::{TimeZone, Utc};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use keygate::classify::Penalty;
use keygate::config::{KeyConfig, PoolConfig, UpstreamConfig};
use keygate::keys::{KeyId, KeyPool, Pick};
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
        },
        keys: (0..n)
            .map(|i| KeyConfig {
                secret: Secret::new(format!("made-up-key-{i}")),
                project: format!("project-{i}"),
            })
            .collect(),
        tls_ca_file: None,
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
                p.penalise(
                    KeyId(k as u32),
                    "gemini-2.5-pro",
                    "generateContent",
                    &Penalty::CoolProjectModel { until },
                );
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
    let per_minute = br#"{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"gemini-2.5-pro"},"quotaValue":"5"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"53s"}]}}"#;
    c.bench_function("classify/429_per_minute", |b| {
        b.iter(|| keygate::classify::classify(429, black_box(per_minute)))
    });
    c.bench_function("classify/200", |b| {
        b.iter(|| keygate::classify::classify(black_box(200), b""))
    });
}

criterion_group!(benches, selection, classification);
criterion_main!(benches);
