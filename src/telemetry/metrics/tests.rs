use super::*;
use std::collections::BTreeSet;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// One parsed sample line: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the sample lines of a text exposition whose label values need no unescaping.
fn samples(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap(),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let labels = body
                    .split(',')
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        let v = v.strip_prefix('"').unwrap().strip_suffix('"').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the sample `name` with exactly `labels`, if rendered.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| v)
}

/// Every value the label `key` takes across the samples of `name`.
fn label_values(text: &str, name: &str, key: &str) -> BTreeSet<String> {
    samples(text)
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .filter_map(|(_, l, _)| l.get(key).cloned())
        .collect()
}

#[test]
fn values_move_as_calls_are_made() {
    let m = Metrics::new().unwrap();
    let main = m.pool("main");
    let text = m.render(&[], None);
    assert_eq!(value(&text, "keygate_requests_total", &[]), None);

    m.request("team-a", &main, "gemini-2.5-flash", true, 200, 1, 100, 2000);
    m.request("team-a", &main, "gemini-2.5-flash", true, 200, 3, 50, 500);
    m.request("-", &main, "gemini-2.5-pro", false, 429, 0, 10, 90);
    m.request("team-a", &main, "gemini-2.5-pro", false, 0, 2, 5, 0);
    m.request("team-a", &main, "gemini-2.5-pro", true, 101, 1, 0, 0);
    m.attempt(&main, "ok");
    m.attempt(&main, "ok");
    m.attempt(&main, "quota_minute");
    m.attempt(&main, "something new");
    m.upstream_latency(&main, 0.3);
    m.upstream_latency(&main, 42.0);
    m.time_to_first_byte(&main, 0.004);
    m.pool_exhausted("main", "gemini-2.5-pro");
    m.pool_exhausted("main", "gemini-2.5-pro");

    let t = m.render(&[], None);
    let req = |tenant, model, class| {
        value(
            &t,
            "keygate_requests_total",
            &[
                ("tenant", tenant),
                ("pool", "main"),
                ("model", model),
                ("status_class", class),
            ],
        )
    };
    assert_eq!(req("team-a", "gemini-2.5-flash", "2xx"), Some(2.0));
    // A model Google has not served yet is `other`; once served, it has its own value.
    assert_eq!(req("-", "other", "4xx"), Some(1.0));
    assert_eq!(req("team-a", "other", "none"), Some(1.0));
    assert_eq!(req("team-a", "gemini-2.5-pro", "1xx"), Some(1.0));
    assert_eq!(req("-", "gemini-2.5-pro", "4xx"), None);

    let att = |o| {
        value(
            &t,
            "keygate_upstream_attempts_total",
            &[("pool", "main"), ("outcome", o)],
        )
    };
    assert_eq!(att("ok"), Some(2.0));
    assert_eq!(att("quota_minute"), Some(1.0));
    assert_eq!(att("other"), Some(1.0));
    assert_eq!(att("something new"), None);

    let pool = [("pool", "main")];
    assert_eq!(value(&t, "keygate_request_bytes_total", &pool), Some(165.0));
    assert_eq!(
        value(&t, "keygate_response_bytes_total", &pool),
        Some(2590.0)
    );
    assert_eq!(
        value(&t, "keygate_request_attempts_count", &pool),
        Some(5.0)
    );
    assert_eq!(value(&t, "keygate_request_attempts_sum", &pool), Some(7.0));
    let bucket = |name, le| value(&t, name, &[("pool", "main"), ("le", le)]);
    assert_eq!(bucket("keygate_request_attempts_bucket", "0"), Some(1.0));
    assert_eq!(bucket("keygate_request_attempts_bucket", "1"), Some(3.0));
    assert_eq!(bucket("keygate_request_attempts_bucket", "3"), Some(5.0));
    assert_eq!(bucket("keygate_request_attempts_bucket", "+Inf"), Some(5.0));

    let lat = "keygate_upstream_latency_seconds";
    assert_eq!(value(&t, &format!("{lat}_count"), &pool), Some(2.0));
    assert_eq!(value(&t, &format!("{lat}_sum"), &pool), Some(42.3));
    assert_eq!(
        bucket("keygate_upstream_latency_seconds_bucket", "0.25"),
        Some(0.0)
    );
    assert_eq!(
        bucket("keygate_upstream_latency_seconds_bucket", "0.5"),
        Some(1.0)
    );
    assert_eq!(
        bucket("keygate_upstream_latency_seconds_bucket", "60"),
        Some(2.0)
    );
    assert_eq!(
        bucket("keygate_upstream_latency_seconds_bucket", "600"),
        Some(2.0)
    );
    assert_eq!(
        bucket("keygate_time_to_first_byte_seconds_bucket", "0.005"),
        Some(1.0)
    );

    assert_eq!(
        value(
            &t,
            "keygate_pool_exhausted_total",
            &[("pool", "main"), ("model", "gemini-2.5-pro")]
        ),
        Some(2.0)
    );

    // Counters only grow from one scrape to the next.
    m.request("team-a", &main, "gemini-2.5-flash", false, 503, 4, 1, 1);
    let t2 = m.render(&[], None);
    assert_eq!(
        value(&t2, "keygate_request_bytes_total", &[("pool", "main")]),
        Some(166.0)
    );
}

#[test]
fn bad_durations_are_dropped_or_clamped() {
    let m = Metrics::new().unwrap();
    let p = m.pool("p");
    m.upstream_latency(&p, f64::NAN);
    m.upstream_latency(&p, f64::INFINITY);
    m.upstream_latency(&p, -3.0);
    m.time_to_first_byte(&p, f64::NEG_INFINITY);
    let t = m.render(
        &[PoolGauge {
            pool: "p".into(),
            seconds_to_recovery: f64::NAN,
            ..PoolGauge::default()
        }],
        None,
    );
    let pool = [("pool", "p")];
    assert_eq!(
        value(&t, "keygate_upstream_latency_seconds_count", &pool),
        Some(1.0)
    );
    assert_eq!(
        value(&t, "keygate_upstream_latency_seconds_sum", &pool),
        Some(0.0)
    );
    // The pool's series exist from its first use; the dropped value is not in them.
    assert_eq!(
        value(&t, "keygate_time_to_first_byte_seconds_count", &pool),
        Some(0.0)
    );
    assert_eq!(
        value(&t, "keygate_pool_next_recovery_seconds", &pool),
        Some(0.0)
    );
    assert!(!t.contains("NaN"));
}

#[test]
fn model_flood_is_capped() {
    let m = Metrics::new().unwrap();
    let p = m.pool("p");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let model = format!("gemini-{x:016x}");
        m.request("t", &p, &model, true, 200, 1, 0, 0);
        if i % 3 == 0 {
            m.pool_exhausted("p", &format!("flood-{i}"));
        }
    }
    let t = m.render(&[], None);
    let mut models = label_values(&t, "keygate_requests_total", "model");
    models.extend(label_values(&t, "keygate_pool_exhausted_total", "model"));
    assert!(
        models.len() <= MAX_MODELS + 1,
        "{} model values",
        models.len()
    );
    assert!(models.contains("other"));
    // Models seen before the cap keep their own value afterwards.
    let first = models
        .iter()
        .find(|v| v.starts_with("gemini-"))
        .unwrap()
        .clone();
    // Both metrics share the one set of model values: exactly 64 of them, plus "other".
    assert_eq!(models.len(), MAX_MODELS + 1);
    m.request("t", &p, &first, true, 200, 1, 0, 0);
    let t = m.render(&[], None);
    let series = [
        ("tenant", "t"),
        ("pool", "p"),
        ("model", first.as_str()),
        ("status_class", "2xx"),
    ];
    assert_eq!(value(&t, "keygate_requests_total", &series), Some(2.0));
    let mut after = label_values(&t, "keygate_requests_total", "model");
    after.extend(label_values(&t, "keygate_pool_exhausted_total", "model"));
    assert_eq!(after, models);
    let total: f64 = samples(&t)
        .iter()
        .filter(|(n, _, _)| n == "keygate_requests_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(total, 10_001.0);
}

#[test]
fn bad_label_values_never_reach_the_output() {
    let m = Metrics::new().unwrap();
    let p = m.pool("p");
    let long = "a".repeat(1024);
    let exactly_64 = "b".repeat(64);
    let bad = [
        "evil\nkeygate_fake_total 1",
        "quo\"te",
        "back\\slash",
        "brace}",
        "comma,x=\"y\"",
        "spa ce",
        "ünïcødé",
        "模型",
        "nul\0byte",
        "tab\tbed",
        long.as_str(),
    ];
    for b in bad {
        m.request(b, &m.pool(b), b, true, 200, 1, 1, 1);
        m.attempt(&m.pool(b), b);
        m.upstream_latency(&m.pool(b), 1.0);
        m.time_to_first_byte(&m.pool(b), 1.0);
        m.pool_exhausted(b, b);
    }
    m.request("", &m.pool(""), "", true, 200, 1, 1, 1);
    m.request(&exactly_64, &p, "m", true, 200, 1, 1, 1);
    m.request(&format!("{exactly_64}c"), &p, "m", true, 200, 1, 1, 1);
    let t = m.render(
        &[PoolGauge {
            pool: "bad\npool".into(),
            keys_ok: 1,
            ..PoolGauge::default()
        }],
        None,
    );
    for b in bad {
        assert!(!t.contains(b), "{b:?} leaked");
    }
    assert!(t.is_ascii());
    assert!(!t.contains("keygate_fake_total"));
    for (name, labels, _) in samples(&t) {
        assert!(name.starts_with("keygate_"), "{name}");
        for (k, v) in labels {
            assert!(
                k == "le" || v == "other" || label(&v) == v.as_str(),
                "{k}={v:?}"
            );
            assert!(v.len() <= MAX_LABEL_LEN);
        }
    }
    let tenants = label_values(&t, "keygate_requests_total", "tenant");
    let expected: BTreeSet<String> = ["other", "-", exactly_64.as_str()]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(tenants, expected);
    assert_eq!(
        value(&t, "keygate_keys", &[("pool", "other"), ("state", "ok")]),
        Some(1.0)
    );
}

#[test]
fn gauges_render_per_pool_and_follow_the_pool_list() {
    let m = Metrics::new().unwrap();
    let pools = [
        PoolGauge {
            pool: "free".into(),
            keys_ok: 3,
            keys_cooling: 2,
            keys_disabled: 1,
            seconds_to_recovery: 17.5,
        },
        PoolGauge {
            pool: "paid".into(),
            keys_ok: 4,
            keys_cooling: 0,
            keys_disabled: 0,
            seconds_to_recovery: 0.0,
        },
    ];
    let t = m.render(&pools, None);
    let keys = |pool, state| value(&t, "keygate_keys", &[("pool", pool), ("state", state)]);
    assert_eq!(keys("free", "ok"), Some(3.0));
    assert_eq!(keys("free", "cooling"), Some(2.0));
    assert_eq!(keys("free", "disabled"), Some(1.0));
    assert_eq!(keys("paid", "ok"), Some(4.0));
    assert_eq!(keys("paid", "cooling"), Some(0.0));
    assert_eq!(keys("paid", "disabled"), Some(0.0));
    let rec = |t: &str, pool| value(t, "keygate_pool_next_recovery_seconds", &[("pool", pool)]);
    assert_eq!(rec(&t, "free"), Some(17.5));
    assert_eq!(rec(&t, "paid"), Some(0.0));

    // A later scrape reflects the new state; a pool no longer listed disappears.
    let t = m.render(
        &[PoolGauge {
            pool: "free".into(),
            keys_ok: 6,
            ..PoolGauge::default()
        }],
        None,
    );
    assert_eq!(
        value(&t, "keygate_keys", &[("pool", "free"), ("state", "ok")]),
        Some(6.0)
    );
    assert_eq!(rec(&t, "free"), Some(0.0));
    assert_eq!(label_values(&t, "keygate_keys", "pool").len(), 1);
    assert_eq!(rec(&t, "paid"), None);

    // Pools whose names collapse to "other" are summed; the soonest recovery wins.
    let t = m.render(
        &[
            PoolGauge {
                pool: "x y".into(),
                keys_cooling: 1,
                seconds_to_recovery: 30.0,
                ..PoolGauge::default()
            },
            PoolGauge {
                pool: "z\n".into(),
                keys_cooling: 2,
                seconds_to_recovery: 5.0,
                ..PoolGauge::default()
            },
            PoolGauge {
                pool: "w!".into(),
                keys_ok: 1,
                ..PoolGauge::default()
            },
        ],
        None,
    );
    assert_eq!(
        value(
            &t,
            "keygate_keys",
            &[("pool", "other"), ("state", "cooling")]
        ),
        Some(3.0)
    );
    assert_eq!(rec(&t, "other"), Some(5.0));
}

#[test]
fn labels_and_classes() {
    assert_eq!(label("gemini-2.5-flash"), "gemini-2.5-flash");
    assert_eq!(
        label("models/gemini-1.5-pro:002"),
        "models/gemini-1.5-pro:002"
    );
    assert_eq!(label("-"), "-");
    assert_eq!(label(""), "-");
    assert_eq!(label("a b"), "other");
    assert_eq!(label(&"x".repeat(65)), "other");
    assert_eq!(status_class(0), "none");
    assert_eq!(status_class(99), "none");
    assert_eq!(status_class(204), "2xx");
    assert_eq!(status_class(304), "3xx");
    assert_eq!(status_class(499), "4xx");
    assert_eq!(status_class(599), "5xx");
    assert_eq!(status_class(600), "none");
    assert_eq!(status_class(u16::MAX), "none");
}

#[test]
fn metrics_are_shared_across_threads() {
    let m = std::sync::Arc::new(Metrics::new().unwrap());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                for j in 0..500 {
                    m.request(
                        "t",
                        &m.pool("p"),
                        &format!("m{}", (i * 500 + j) % 100),
                        true,
                        200,
                        1,
                        1,
                        1,
                    );
                    if j % 50 == 0 {
                        m.render(&[], None);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = m.render(&[], None);
    assert_eq!(
        value(&t, "keygate_request_bytes_total", &[("pool", "p")]),
        Some(2000.0)
    );
    assert_eq!(
        label_values(&t, "keygate_requests_total", "model").len(),
        MAX_MODELS + 1
    );
}

/// Realistic data in every metric, rendered.
fn realistic() -> String {
    let m = Metrics::new().unwrap();
    let models = ["gemini-2.5-flash", "gemini-2.5-pro", "text-embedding-004"];
    for (i, model) in models.iter().cycle().take(60).enumerate() {
        let tenant = ["team-a", "team-b", "-"][i % 3];
        let pool = ["free", "paid"][i % 2];
        let status = [200, 200, 200, 429, 503, 400, 0][i % 7];
        let attempts = [1, 1, 2, 3, 0, 1, 5][i % 7];
        m.request(
            tenant,
            &m.pool(pool),
            model,
            status / 100 == 2,
            status,
            attempts,
            300 + i as u64,
            4000 * i as u64,
        );
        m.attempt(&m.pool(pool), OUTCOMES[i % OUTCOMES.len()]);
        m.upstream_latency(&m.pool(pool), 0.05 * i as f64);
        m.time_to_first_byte(&m.pool(pool), 0.02 * i as f64);
        if status == 429 || status == 503 {
            m.pool_exhausted(pool, model);
        }
        if status == 0 {
            m.key_disabled(pool, "key_invalid");
            m.key_recovered(pool);
        }
        let result = ["hit", "miss", "bypass"][i % 3];
        m.cache_request(tenant, pool, result);
        if result == "hit" {
            m.cache_hit(tenant, 1200, 7);
        }
    }
    m.attempt(&m.pool("free"), "bogus outcome");
    m.render(
        &[
            PoolGauge {
                pool: "free".into(),
                keys_ok: 5,
                keys_cooling: 3,
                keys_disabled: 1,
                seconds_to_recovery: 42.25,
            },
            PoolGauge {
                pool: "paid".into(),
                keys_ok: 2,
                keys_cooling: 0,
                keys_disabled: 0,
                seconds_to_recovery: 0.0,
            },
        ],
        Some(CacheGauge {
            bytes: 4096,
            recording_bytes: 1024,
            entries: 3,
            capacity: 1 << 20,
        }),
    )
}

#[test]
fn every_metric_is_rendered_with_help_and_type() {
    let t = realistic();
    for (name, kind) in [
        ("keygate_requests_total", "counter"),
        ("keygate_upstream_attempts_total", "counter"),
        ("keygate_request_attempts", "histogram"),
        ("keygate_request_bytes_total", "counter"),
        ("keygate_response_bytes_total", "counter"),
        ("keygate_upstream_latency_seconds", "histogram"),
        ("keygate_time_to_first_byte_seconds", "histogram"),
        ("keygate_pool_exhausted_total", "counter"),
        ("keygate_key_disabled_total", "counter"),
        ("keygate_key_recovered_total", "counter"),
        ("keygate_keys", "gauge"),
        ("keygate_pool_next_recovery_seconds", "gauge"),
        ("keygate_cache_requests_total", "counter"),
        ("keygate_cache_hit_bytes_total", "counter"),
        ("keygate_cache_saved_tokens_total", "counter"),
        ("keygate_cache_memory_bytes", "gauge"),
        ("keygate_cache_entries", "gauge"),
    ] {
        assert!(t.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        assert!(t.contains(&format!("# HELP {name} ")), "{name}");
    }
}

/// `promtool check metrics` (which also lints names, units and help) accepts the output.
/// Fails when promtool is missing, unless `KEYGATE_SKIP_PROMTOOL=1`.
#[test]
fn promtool_accepts_the_exposition() {
    let text = realistic();
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("KEYGATE_SKIP_PROMTOOL").as_deref() == Ok("1") {
                eprintln!("promtool not on PATH; skipped because KEYGATE_SKIP_PROMTOOL=1");
                return;
            }
            panic!(
                "promtool is not on PATH. Install it (Debian/Ubuntu: \
                 `apt-get install -y --no-install-recommends prometheus`, which ships \
                 /usr/bin/promtool), or set KEYGATE_SKIP_PROMTOOL=1 to skip this test"
            );
        }
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "promtool check metrics: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics: {}\n{stdout}{stderr}\n--- input ---\n{text}",
        out.status
    );
}
