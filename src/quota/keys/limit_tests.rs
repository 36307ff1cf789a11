//! The limits above the (project, model) and the escalating cooldowns, through the door.

use super::tests::{picked, pool, pool_with_accounts};
use super::*;
use crate::quota::classify::{Cap, Cooling, Penalty};
use chrono::{DateTime, TimeZone, Utc};

const HOUR: Millis = 3_600_000;
const MONTH: Millis = 30 * 24 * HOUR;

fn at(ms: Millis) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms as i64).unwrap()
}

/// Refuses `key` with `penalty` at `now`, and says what changed.
fn refuse(pool: &KeyPool, key: u32, penalty: &Penalty, now: Millis) -> Changed {
    let refused = Transition::penalise(penalty, "m", "generateContent");
    pool.change(KeyId(key), refused, now)
}

/// A short-window quota refusal Google says lasts `secs`, at `now`.
fn quota(pool: &KeyPool, key: u32, secs: Millis, now: Millis) -> Changed {
    let penalty = Penalty::CoolProjectModel {
        until: at(now + secs * 1000),
        why: Cooling::Quota {
            ceiling: at(now + 24 * HOUR),
        },
    };
    refuse(pool, key, &penalty, now)
}

/// Which keys serve `model` over `n` picks at `now`, sorted and deduplicated.
fn serving(pool: &KeyPool, model: &str, n: usize, now: Millis) -> Vec<u32> {
    let mut seen: Vec<u32> = (0..n)
        .filter_map(|_| picked(pool, model, &[], now))
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

#[test]
fn a_billing_account_cap_stops_every_project_on_it_for_every_model() {
    let p = pool_with_accounts(&[
        ("a", "p1", Some("acct-1")),
        ("b", "p2", Some("acct-1")),
        ("c", "p3", Some("acct-2")),
        ("d", "p4", None),
    ]);
    let cap = Penalty::CapBillingAccount { until: at(MONTH) };
    let first = refuse(&p, 0, &cap, 1000);
    assert_eq!(first.capped, Some(CapKind::AccountSpendCap));
    assert_eq!(refuse(&p, 1, &cap, 1000).capped, None, "said once");
    for model in ["m", "other-model"] {
        assert_eq!(serving(&p, model, 8, 2000), vec![2, 3], "{model}");
    }
    assert_eq!(p.cap_of(0, 2000), Some(CapKind::AccountSpendCap));
    assert_eq!(p.cap_of(2, 2000), None);
    let caps = p.caps(2000);
    assert_eq!(caps.len(), 1);
    assert_eq!(caps[0].name, "acct-1");
    assert_eq!(caps[0].kind.scope(), Scope::BillingAccount);
    // The month turns: the account serves again.
    assert_eq!(serving(&p, "m", 8, MONTH), vec![0, 1, 2, 3]);
}

#[test]
fn one_probe_per_interval_and_its_success_lifts_the_cap() {
    let p = pool_with_accounts(&[
        ("a", "p1", Some("acct-1")),
        ("b", "p2", Some("acct-1")),
        ("c", "p3", None),
    ]);
    refuse(&p, 0, &Penalty::CapBillingAccount { until: at(MONTH) }, 0);
    assert_eq!(serving(&p, "m", 8, HOUR - 1), vec![2]);
    // The probe is due: exactly one pick of the capped account's keys, then none.
    let picks: Vec<u32> = (0..8).filter_map(|_| picked(&p, "m", &[], HOUR)).collect();
    let probes: Vec<u32> = picks.iter().copied().filter(|&k| k != 2).collect();
    assert_eq!(probes.len(), 1, "{picks:?}");
    assert_eq!(serving(&p, "m", 8, HOUR + 1000), vec![2]);
    // The probe was served: the cap is lifted, and said so once.
    let served = Transition::Served {
        model: "m",
        sent: HOUR,
    };
    let lifted = p.change(KeyId(probes[0]), served, HOUR + 2000);
    assert_eq!(lifted.caps_lifted, vec![CapKind::AccountSpendCap]);
    assert!(!p.served_is_news(KeyId(0), "m", HOUR + 2000));
    assert_eq!(serving(&p, "m", 8, HOUR + 2000), vec![0, 1, 2]);
}

#[test]
fn a_refused_probe_waits_a_whole_interval_again() {
    let p = pool_with_accounts(&[("a", "p1", Some("acct-1")), ("c", "p3", None)]);
    let cap = Penalty::CapBillingAccount { until: at(MONTH) };
    refuse(&p, 0, &cap, 0);
    assert_eq!(picked(&p, "m", &[1], HOUR), Some(0), "the probe");
    refuse(&p, 0, &cap, HOUR + 100);
    assert_eq!(serving(&p, "m", 8, 2 * HOUR - 1), vec![1]);
    assert_eq!(
        picked(&p, "m", &[1], 2 * HOUR + 100),
        Some(0),
        "the next probe"
    );
}

#[test]
fn a_project_spend_cap_stops_only_its_project() {
    let p = pool_with_accounts(&[("a", "p1", Some("acct-1")), ("b", "p2", Some("acct-1"))]);
    let cap = Penalty::CapProject {
        until: at(MONTH),
        why: Cap::SpendCap,
    };
    assert_eq!(
        refuse(&p, 0, &cap, 0).capped,
        Some(CapKind::ProjectSpendCap)
    );
    assert_eq!(serving(&p, "m", 8, 1000), vec![1]);
    assert_eq!(serving(&p, "other-model", 8, 1000), vec![1]);
    // An operator clears the project's cooldowns: the cap ends too.
    let clear = Transition::ClearCooldowns { model: None };
    assert_eq!(
        p.change(KeyId(0), clear, 2000).caps_lifted,
        vec![CapKind::ProjectSpendCap]
    );
    assert_eq!(serving(&p, "m", 8, 2000), vec![0, 1]);
}

#[test]
fn a_spend_rate_limit_holds_its_window_without_probes() {
    let p = pool(&[("a", "p1"), ("b", "p2")]);
    let limit = Penalty::CapProject {
        until: at(600_000),
        why: Cap::SpendRate,
    };
    assert_eq!(refuse(&p, 0, &limit, 0).capped, Some(CapKind::SpendRate));
    assert_eq!(serving(&p, "m", 8, 599_999), vec![1]);
    assert_eq!(serving(&p, "m", 8, 600_000), vec![0, 1]);
}

#[test]
fn a_refusal_soon_after_a_cooldown_doubles_it_and_a_success_resets_it() {
    let p = pool(&[("a", "p1"), ("b", "p2")]);
    let s = 1000;
    assert_eq!(quota(&p, 0, 39, 0).escalated, None);
    assert_eq!(picked(&p, "m", &[1], 38 * s), None);
    // Back after 39 s and refused again at once: 78 s, not a day.
    assert_eq!(quota(&p, 0, 39, 40 * s).escalated, Some(78 * s));
    assert_eq!(picked(&p, "m", &[1], 117 * s), None);
    assert_eq!(picked(&p, "m", &[1], 118 * s), Some(0));
    assert_eq!(quota(&p, 0, 39, 119 * s).escalated, Some(156 * s));
    let report = &p.report(119 * s)[0].cooldowns[0];
    assert_eq!((report.why, report.escalations), (CoolingKind::Quota, 2));
    // A success starts it over.
    assert!(p.served_is_news(KeyId(0), "m", 300 * s));
    // A straggler sent before the last refusal does not; a request sent after it does.
    let straggler = Transition::Served {
        model: "m",
        sent: 100 * s,
    };
    p.change(KeyId(0), straggler, 300 * s);
    assert!(p.served_is_news(KeyId(0), "m", 300 * s));
    let served = Transition::Served {
        model: "m",
        sent: 300 * s,
    };
    p.change(KeyId(0), served, 300 * s);
    assert_eq!(quota(&p, 0, 39, 301 * s).escalated, None);
    assert_eq!(picked(&p, "m", &[1], 340 * s), Some(0));
}

#[test]
fn a_refusal_long_after_a_cooldown_is_not_escalated() {
    let p = pool(&[("a", "p1")]);
    let s = 1000;
    quota(&p, 0, 10, 0);
    // "Soon" is the last cooldown's length or a minute, whichever is longer.
    assert_eq!(quota(&p, 0, 10, 70 * s).escalated, Some(20 * s));
    assert_eq!(quota(&p, 0, 10, 90 * s + 61 * s).escalated, None);
}

#[test]
fn escalation_stops_at_the_ceiling_but_never_shortens_googles_delay() {
    let p = pool(&[("a", "p1")]);
    let s = 1000;
    let refuse_until = |secs: Millis, now: Millis, ceiling: Millis| {
        let penalty = Penalty::CoolProjectModel {
            until: at(now + secs * s),
            why: Cooling::Quota {
                ceiling: at(ceiling),
            },
        };
        refuse(&p, 0, &penalty, now)
    };
    refuse_until(3000, 0, 24 * HOUR);
    // Doubling would give 6,000 s; midnight is 4,000 s away.
    let second = refuse_until(3000, 3001 * s, 3001 * s + 4000 * s);
    assert_eq!(second.escalated, Some(4000 * s));
    // That was midnight: the next day starts over.
    assert_eq!(
        refuse_until(30, 7002 * s, 7002 * s + 24 * HOUR).escalated,
        None
    );
    // Google's own delay beyond the ceiling stands.
    let late = refuse_until(9000, 7033 * s, 7033 * s + 10 * s);
    assert_eq!(late.escalated, Some(9000 * s));
}

#[test]
fn refusals_while_still_cooling_do_not_escalate() {
    let p = pool(&[("a", "p1")]);
    quota(&p, 0, 30, 0);
    assert_eq!(
        quota(&p, 0, 30, 5000).escalated,
        None,
        "sent before it began"
    );
}

#[test]
fn a_model_not_in_the_tier_is_said_once_and_shown_as_unavailable() {
    let p = pool(&[("a", "p1"), ("b", "p2")]);
    let tier = Penalty::CoolProjectModel {
        until: at(24 * HOUR),
        why: Cooling::Tier,
    };
    assert!(refuse(&p, 0, &tier, 0).unavailable);
    assert!(!refuse(&p, 0, &tier, 1000).unavailable);
    assert_eq!(serving(&p, "m", 8, 12 * HOUR), vec![1]);
    assert_eq!(serving(&p, "other-model", 8, 12 * HOUR), vec![0, 1]);
    let report = &p.report(1000)[0].cooldowns[0];
    assert_eq!(report.why, CoolingKind::Unavailable);
    assert_eq!(report.why.as_str(), "unavailable");
}

#[test]
fn a_rebuilt_pool_keeps_caps_by_account_and_project_name() {
    let p = pool_with_accounts(&[
        ("a", "p1", Some("acct-1")),
        ("b", "p2", None),
        ("c", "p3", None),
    ]);
    refuse(&p, 0, &Penalty::CapBillingAccount { until: at(MONTH) }, 0);
    let cap = Penalty::CapProject {
        until: at(MONTH),
        why: Cap::SpendCap,
    };
    refuse(&p, 1, &cap, 0);
    let mut configs = p.key_configs();
    configs.reverse();
    let q = p.rebuilt(&configs);
    let id = |k: &str| {
        q.find(&crate::secret::Secret::new(k).fingerprint())
            .unwrap()
    };
    assert_eq!(
        q.cap_of(q.key(id("a")).project, 1000),
        Some(CapKind::AccountSpendCap)
    );
    assert_eq!(
        q.cap_of(q.key(id("b")).project, 1000),
        Some(CapKind::ProjectSpendCap)
    );
    assert_eq!(q.cap_of(q.key(id("c")).project, 1000), None);
}

#[test]
fn a_success_of_a_request_sent_before_the_cap_does_not_lift_it() {
    let p = pool_with_accounts(&[("a", "p1", Some("acct-1")), ("b", "p2", None)]);
    refuse(
        &p,
        0,
        &Penalty::CapBillingAccount { until: at(MONTH) },
        5000,
    );
    // A long request sent at 1 s, before the refusal, is served at 9 s.
    let straggler = Transition::Served {
        model: "m",
        sent: 1000,
    };
    assert!(p.change(KeyId(0), straggler, 9000).caps_lifted.is_empty());
    assert_eq!(p.cap_of(0, 9000), Some(CapKind::AccountSpendCap));
    // A spend-based rate limit is not lifted by any success: it runs its window.
    let window = Penalty::CapProject {
        until: at(600_000),
        why: Cap::SpendRate,
    };
    refuse(&p, 1, &window, 10_000);
    let served = Transition::Served {
        model: "m",
        sent: 20_000,
    };
    assert!(p.change(KeyId(1), served, 30_000).caps_lifted.is_empty());
    assert_eq!(p.cap_of(1, 30_000), Some(CapKind::SpendRate));
}

#[test]
fn many_requests_at_the_probe_instant_send_one_probe_and_no_503() {
    let p = std::sync::Arc::new(pool_with_accounts(&[
        ("a", "p1", Some("acct-1")),
        ("b", "p2", Some("acct-1")),
        ("c", "p3", Some("acct-1")),
    ]));
    refuse(&p, 0, &Penalty::CapBillingAccount { until: at(MONTH) }, 0);
    let picks: Vec<Pick> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let p = p.clone();
                scope.spawn(move || p.pick("m", "generateContent", &[], HOUR))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let probes = picks.iter().filter(|x| matches!(x, Pick::Key(_))).count();
    assert_eq!(probes, 1, "{picks:?}");
    assert!(
        picks
            .iter()
            .all(|x| matches!(x, Pick::Key(_) | Pick::Exhausted(_))),
        "{picks:?}"
    );
}

#[test]
fn a_probe_taken_behind_the_snapshot_s_back_is_an_exhaustion_not_a_tried_project() {
    let p = pool_with_accounts(&[("a", "p1", Some("acct-1")), ("b", "p2", Some("acct-1"))]);
    refuse(&p, 0, &Penalty::CapBillingAccount { until: at(MONTH) }, 0);
    // The snapshot at the probe instant offers both keys.
    let health = p.health("m");
    assert_eq!(p.snapshot(&health, HOUR).keys.len(), 2);
    // Another request takes the account's probe and has not said so yet.
    assert!(p.account_caps[0].take_probe(HOUR, p.probe_every).is_some());
    match p.pick("m", "generateContent", &[], HOUR) {
        Pick::Exhausted(ex) => assert_eq!(ex.retry_at, Some(HOUR + p.probe_every)),
        other => panic!("{other:?}"),
    }
}
