use super::*;
use crate::config::{KeyConfig, UpstreamConfig};
use crate::quota::classify::{Cooling, DeadReason, Penalty};
use chrono::{TimeZone, Utc};

/// A pool of `(key, project)` pairs in front of a placeholder upstream.
pub(crate) fn pool(keys: &[(&str, &str)]) -> KeyPool {
    let keys: Vec<(&str, &str, Option<&str>)> = keys.iter().map(|(k, p)| (*k, *p, None)).collect();
    pool_with_accounts(&keys)
}

/// A pool of `(key, project, billing account)` triples in front of a placeholder upstream.
pub(crate) fn pool_with_accounts(keys: &[(&str, &str, Option<&str>)]) -> KeyPool {
    KeyPool::new(&PoolConfig {
        name: "main".into(),
        upstream: UpstreamConfig {
            tls: false,
            host: "127.0.0.1".into(),
            port: 1,
            addresses: Vec::new(),
            base_path: String::new(),
            headers: Vec::new(),
        },
        keys: keys
            .iter()
            .map(|(k, p, b)| KeyConfig {
                secret: Secret::new(*k),
                project: p.to_string(),
                billing_account: b.map(str::to_string),
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

/// Records `penalty` through the door.
pub(crate) fn penalise(pool: &KeyPool, key: KeyId, model: &str, method: &str, penalty: &Penalty) {
    let transition = Transition::Penalise {
        penalty,
        model,
        method,
    };
    pool.change(key, transition, 0);
}

/// The (model, deadline) of each cooldown of key `k`'s project, as the admin API lists them.
pub(crate) fn cooldowns(pool: &KeyPool, k: usize) -> Vec<(String, Millis)> {
    pool.report(1000)[k]
        .cooldowns
        .iter()
        .map(|c| (c.model.clone(), c.until))
        .collect()
}

pub(crate) fn picked(pool: &KeyPool, model: &str, tried: &[u32], now: Millis) -> Option<u32> {
    match pool.pick(model, "generateContent", tried, now) {
        Pick::Key(k) => Some(k.0),
        _ => None,
    }
}

pub(crate) fn cool(pool: &KeyPool, key: u32, model: &str, until_ms: i64) {
    let until = Utc.timestamp_millis_opt(until_ms).unwrap();
    penalise(
        pool,
        KeyId(key),
        model,
        "generateContent",
        &Penalty::CoolProjectModel {
            until,
            why: Cooling::Day,
        },
    );
}

#[test]
fn round_robin_visits_every_key() {
    let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3")]);
    let mut seen: Vec<u32> = (0..6).filter_map(|_| picked(&p, "m", &[], 1000)).collect();
    assert_eq!(seen.len(), 6);
    seen.sort();
    assert_eq!(seen, vec![0, 0, 1, 1, 2, 2]);
}

#[test]
fn cooldown_is_per_project_and_model() {
    let p = pool(&[("a", "p1"), ("b", "p1"), ("c", "p2")]);
    cool(&p, 0, "pro", 60_000);
    // Both keys of p1 are out for "pro", only key c serves it.
    for _ in 0..4 {
        assert_eq!(picked(&p, "pro", &[], 1000), Some(2));
    }
    // "flash" is untouched: all three keys serve it.
    let mut flash: Vec<u32> = (0..3)
        .filter_map(|_| picked(&p, "flash", &[], 1000))
        .collect();
    flash.sort();
    assert_eq!(flash, vec![0, 1, 2]);
    // After the deadline, p1 is back for "pro".
    let back: Vec<u32> = (0..3)
        .filter_map(|_| picked(&p, "pro", &[], 60_000))
        .collect();
    assert!(back.contains(&0) && back.contains(&1), "{back:?}");
}

#[test]
fn exhausted_pool_says_when_the_first_key_returns() {
    let p = pool(&[("a", "p1"), ("b", "p2")]);
    cool(&p, 0, "pro", 90_000);
    cool(&p, 1, "pro", 30_000);
    assert_eq!(
        p.pick("pro", "generateContent", &[], 1000),
        Pick::Exhausted(Exhaustion {
            retry_at: Some(30_000),
            cooling: 2,
            disabled: 0
        })
    );
    assert_eq!(picked(&p, "pro", &[], 30_000), Some(1));
}

#[test]
fn tried_projects_are_skipped() {
    let p = pool(&[("a", "p1"), ("b", "p2")]);
    for _ in 0..4 {
        assert_eq!(picked(&p, "m", &[0], 1000), Some(1));
    }
    assert_eq!(
        p.pick("m", "generateContent", &[0, 1], 1000),
        Pick::OnlyTriedProjects
    );
}

#[test]
fn cooling_keys_do_not_slow_selection_of_the_rest() {
    // 10,000 keys, 9,900 cooling: every pick still lands on a free key at once.
    let keys: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("k{i}"), format!("p{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = keys.iter().map(|(k, p)| (k.as_str(), p.as_str())).collect();
    let p = pool(&refs);
    for i in 0..9_900 {
        cool(&p, i, "pro", 60_000);
    }
    for _ in 0..200 {
        let k = picked(&p, "pro", &[], 1000).unwrap();
        assert!(k >= 9_900);
    }
}

#[test]
fn a_bound_project_serves_alone_and_says_when_it_is_back() {
    let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p2")]);
    for _ in 0..4 {
        match p.pick_in_project("m", "generateContent", 1, 1000) {
            Pick::Key(k) => assert!(k.0 == 1 || k.0 == 2),
            other => panic!("{other:?}"),
        }
    }
    cool(&p, 1, "m", 50_000);
    // p1 is free, but the request must go to p2: the answer says when p2 is back.
    assert_eq!(
        p.pick_in_project("m", "generateContent", 1, 1000),
        Pick::Exhausted(Exhaustion {
            retry_at: Some(50_000),
            cooling: 2,
            disabled: 0
        })
    );
    // With every key out, the answer is still p2's, not the whole pool's.
    cool(&p, 0, "m", 30_000);
    assert_eq!(
        p.pick_in_project("m", "generateContent", 1, 1000),
        Pick::Exhausted(Exhaustion {
            retry_at: Some(50_000),
            cooling: 2,
            disabled: 0
        })
    );
}

#[test]
fn a_rebuilt_pool_keeps_health_and_usage_of_the_keys_it_keeps() {
    let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3")]);
    cool(&p, 0, "m", 90_000);
    penalise(
        &p,
        KeyId(1),
        "m",
        "generateContent",
        &Penalty::DisableKey(DeadReason::Suspended),
    );
    penalise(&p, KeyId(2), "m", "embedContent", &Penalty::BlockMethod);
    p.key(KeyId(0)).usage.requests.fetch_add(5, Relaxed);
    // Key c removed, key d (a new project) added, order changed.
    let mut configs = p.key_configs();
    configs.remove(2);
    configs.reverse();
    configs.push(KeyConfig {
        secret: Secret::new("d"),
        project: "p4".into(),
        billing_account: None,
        note: None,
    });
    let q = p.rebuilt(&configs);
    let a = q.find(&Secret::new("a").fingerprint()).unwrap();
    let b = q.find(&Secret::new("b").fingerprint()).unwrap();
    assert_eq!(q.key(a).usage.requests.load(Relaxed), 5);
    assert_eq!(q.disabled(b), Some(Disabled::Dead(DeadReason::Suspended)));
    assert_eq!(cooldowns(&q, a.0 as usize), vec![("m".to_string(), 90_000)]);
    // Only d serves "m" now: a cools, b is dead.
    for _ in 0..3 {
        assert_eq!(
            picked(&q, "m", &[], 1000).map(|k| q.key(KeyId(k)).fingerprint.clone()),
            Some(Secret::new("d").fingerprint())
        );
    }
    assert!(q.report(1000).iter().all(|k| k.blocked_methods.is_empty()));
}

#[test]
fn reserved_projects_are_the_last_usable_ones() {
    let p = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3"), ("d", "p4")]);
    assert_eq!(p.reserved_projects("m", 1, 1000), vec![3]);
    // No pressure: one usable project stays outside the reserve.
    assert_eq!(p.reserved_projects("m", 9, 1000), vec![1, 2, 3]);
    let single = pool(&[("a", "p1")]);
    assert!(single.reserved_projects("m", 1, 1000).is_empty());
    // Under pressure (a key cooling), the last ones are all kept.
    cool(&p, 3, "m", 90_000);
    assert_eq!(p.reserved_projects("m", 2, 1000), vec![1, 2]);
    assert_eq!(p.reserved_projects("m", 9, 1000), vec![0, 1, 2]);
    assert_eq!(p.availability("m", 1000).usable_projects, 3);
}

#[test]
fn upstream_header_values_are_scrubbed_like_keys_and_survive_a_rebuild() {
    let text = "pools:\n  - name: relay\n    upstream: https://relay.test/base\n    keys: [made-up-pool-key-1]\n    upstream_headers: {cf-aig-authorization: {env: T}}\n";
    let env = |name: &str| (name == "T").then(|| "Bearer made-up-relay-token".to_string());
    let config = crate::config::Config::parse(text, std::path::Path::new("."), &env).unwrap();
    let pool = KeyPool::new(&config.pools[0]);
    let echo = br#"{"error":{"message":"bad token made-up-relay-token for made-up-pool-key-1"}}"#;
    let clean =
        |pool: &KeyPool| String::from_utf8(pool.scrubber().body(echo).into_owned()).unwrap();
    let text = clean(&pool);
    assert!(!text.contains("made-up"), "{text}");
    assert!(
        text.contains("[upstream header cf-aig-authorization]"),
        "{text}"
    );
    assert_eq!(
        pool.scrubber()
            .header(b"Bearer made-up-relay-token")
            .as_deref(),
        Some(&b"[upstream header cf-aig-authorization]"[..])
    );
    let rebuilt = pool.rebuilt(&pool.key_configs());
    assert!(!clean(&rebuilt).contains("made-up"));
}
