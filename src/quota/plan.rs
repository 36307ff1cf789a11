//! The attempt plan: which key a request tries next, and what each attempt's result means for
//! the rest of the request.
//!
//! Pure: the health table and the time are handed in, waits are returned rather than slept,
//! and penalties are returned for the caller to record through the health door. The gateway's
//! one attempt loop (plain requests and Live sessions alike) carries a plan out.

use crate::config::RetryPolicy;
use crate::quota::classify::{Outcome, Penalty, Verdict};
use crate::quota::keys::{Exhaustion, KeyId, KeyPool, Millis, Pick};
use std::time::Duration;

/// The longest wait between two transient retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One request's attempts so far, and what it may still try.
#[derive(Debug)]
pub struct Plan {
    policy: RetryPolicy,
    /// Only keys of this project may serve (a resource Google bound to it).
    bound: Option<u32>,
    /// Projects the request may not use: left to tenants lighter than this one.
    reserved: Vec<u32>,
    /// Whether a resource of unknown owner may be looked for in other projects (no tenants).
    search_owner: bool,
    /// Projects that refused the request (quota, billing): never again for it.
    avoid: Vec<u32>,
    /// Projects that just failed transiently, or whose key is at fault: used again only when
    /// no other project is left.
    prefer_not: Vec<u32>,
    transient_left: u32,
    backoff: Duration,
    /// A pooled connection found stale is retried once at once, without counting as transient.
    stale_retry_left: bool,
    attempts: u32,
    /// Whether some attempt got an answer from Google (one the client could be given).
    answered: bool,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the request with this key.
    Try(KeyId),
    /// No key can serve the model now: answer so, with when one will.
    Exhausted {
        /// Why, and when the first key is back.
        exhaustion: Exhaustion,
        /// Seconds until then, at least 1 (the answer's `Retry-After`); `None` when every key
        /// waits for an operator.
        retry_after: Option<u64>,
        /// The whole pool is out (an operator should hear of it), not just a bound project.
        whole_pool: bool,
    },
    /// The only projects left are kept for tenants that used the pool less.
    FairShare,
    /// Nothing more to try: give the client the last answer, or the last failure.
    GiveLast,
}

/// What an attempt's result means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// A success: relay it.
    Relay,
    /// Google's answer is the client's to read (its own mistake, or nothing better will come):
    /// relay it as it is.
    Answer,
    /// The key or its project is at fault: record this penalty, then ask for the next key.
    Penalise(Penalty),
    /// Nobody's fault: wait this long, then ask for the next key.
    Wait(Duration),
    /// Ask for the next key at once.
    Again,
    /// The attempt got no answer and no retry is left: answer with that failure.
    Fail,
    /// The relay in front of Google refused the request itself: answer so (502), trying no
    /// other key.
    NotGoogle,
}

impl Plan {
    /// A plan under `policy`. `bound`: the only project that may serve; `reserved`: projects
    /// left to lighter tenants; `search_owner`: a resource of another project may be looked
    /// for elsewhere (only without tenants, where unknown resources are refused earlier).
    pub fn new(
        policy: RetryPolicy,
        bound: Option<u32>,
        reserved: Vec<u32>,
        search_owner: bool,
    ) -> Plan {
        Plan {
            policy,
            bound,
            avoid: reserved.clone(),
            reserved,
            search_owner,
            prefer_not: Vec::new(),
            transient_left: policy.transient_retries,
            backoff: policy.backoff,
            stale_retry_left: true,
            attempts: 0,
            answered: false,
        }
    }

    /// The key [`Plan::next`] just gave is not tried after all (its cap's probe went to another
    /// instance): the attempt does not count, and its project is left out of this request.
    pub fn skip(&mut self, project: u32) {
        self.attempts = self.attempts.saturating_sub(1);
        if !self.avoid.contains(&project) {
            self.avoid.push(project);
        }
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The next step for a request on `model` / `method` at `now`.
    pub fn next(&mut self, keys: &KeyPool, model: &str, method: &str, now: Millis) -> Next {
        if self.attempts >= self.policy.max_attempts {
            return Next::GiveLast;
        }
        let pick = match self.bound {
            Some(project) => keys.pick_in_project(model, method, project, now),
            None => {
                let both: Vec<u32> = self.avoid.iter().chain(&self.prefer_not).copied().collect();
                match keys.pick(model, method, &both, now) {
                    Pick::OnlyTriedProjects if !self.prefer_not.is_empty() => {
                        self.prefer_not.clear();
                        keys.pick(model, method, &self.avoid, now)
                    }
                    pick => pick,
                }
            }
        };
        match pick {
            Pick::Key(key) => {
                self.attempts += 1;
                Next::Try(key)
            }
            // The bound project refused already and waits for an operator: give the client
            // Google's answer rather than keygate's.
            Pick::Exhausted(ex)
                if self.bound.is_some() && self.answered && ex.retry_at.is_none() =>
            {
                Next::GiveLast
            }
            Pick::Exhausted(exhaustion) => Next::Exhausted {
                retry_after: exhaustion
                    .retry_at
                    .map(|at| at.saturating_sub(now).div_ceil(1000).max(1)),
                exhaustion,
                whole_pool: self.bound.is_none(),
            },
            Pick::OnlyTriedProjects if !self.reserved.is_empty() && self.attempts == 0 => {
                Next::FairShare
            }
            Pick::OnlyTriedProjects => Next::GiveLast,
        }
    }

    /// What Google's answer from a key of `project` means. `complete`: the whole body was read
    /// (an answer cut short cannot be replaced by another).
    pub fn answered(
        &mut self,
        project: u32,
        outcome: &Outcome,
        verdict: Verdict,
        complete: bool,
    ) -> Then {
        match verdict {
            // A resource keygate has no owner for (made before keygate knew, or elsewhere):
            // look for the project that can see it, without blaming anyone.
            Verdict::PassThrough
                if *outcome == Outcome::ResourceOfOtherProject
                    && self.bound.is_none()
                    && self.search_owner
                    && complete =>
            {
                self.answered = true;
                self.avoid.push(project);
                Then::Again
            }
            Verdict::PassThrough if *outcome == Outcome::Success => Then::Relay,
            Verdict::PassThrough => Then::Answer,
            Verdict::OtherKey(penalty) => {
                self.answered = true;
                match penalty {
                    Penalty::CoolProjectModel { .. }
                    | Penalty::DisableProject
                    | Penalty::CapProject { .. }
                    | Penalty::CapBillingAccount { .. } => self.avoid.push(project),
                    // The key, not its project, is at fault: other projects first, but the
                    // project's other keys remain a fallback.
                    Penalty::DisableKey(_) | Penalty::BlockMethod => self.prefer_not.push(project),
                }
                Then::Penalise(penalty)
            }
            Verdict::NotGoogle => Then::NotGoogle,
            Verdict::Transient if self.transient_left == 0 || !complete => Then::Answer,
            Verdict::Transient => {
                self.answered = true;
                self.transient_left -= 1;
                self.prefer_not.push(project);
                Then::Wait(self.take_backoff())
            }
        }
    }

    /// An attempt on a key of `project` got no answer. `stale`: it failed on a pooled
    /// connection the upstream had closed meanwhile.
    pub fn failed(&mut self, project: u32, stale: bool) -> Then {
        if stale && self.stale_retry_left {
            self.stale_retry_left = false;
            Then::Again
        } else if self.transient_left > 0 {
            self.transient_left -= 1;
            self.prefer_not.push(project);
            Then::Wait(self.take_backoff())
        } else {
            Then::Fail
        }
    }

    /// The wait before the next transient retry; each one doubles, up to [`MAX_BACKOFF`].
    fn take_backoff(&mut self) -> Duration {
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::classify::DeadReason;
    use crate::quota::keys::tests::pool;
    use chrono::{TimeZone, Utc};

    const MODEL: &str = "gemini-2.5-flash";
    const METHOD: &str = "generateContent";
    /// The injected clock: 2026-06-01 12:00:00 UTC.
    const NOW: Millis = 1_780_315_200_000;

    fn policy(transient_retries: u32, max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            transient_retries,
            backoff: Duration::from_millis(100),
            max_attempts,
        }
    }

    fn plan(p: RetryPolicy) -> Plan {
        Plan::new(p, None, Vec::new(), true)
    }

    fn tried(next: Next) -> KeyId {
        match next {
            Next::Try(key) => key,
            other => panic!("expected a key, got {other:?}"),
        }
    }

    /// What the attempt loop does with an answer: asks the plan, records the penalty.
    fn answer(plan: &mut Plan, keys: &KeyPool, key: KeyId, outcome: Outcome, now: Millis) -> Then {
        let at = Utc.timestamp_millis_opt(now as i64).unwrap();
        let project = keys.key(key).project;
        let then = plan.answered(project, &outcome, outcome.verdict(at), true);
        if let Then::Penalise(penalty) = &then {
            keys.change(
                key,
                crate::quota::keys::Transition::penalise(penalty, MODEL, METHOD),
                now,
            );
        }
        then
    }

    fn quota(seconds: u64) -> Outcome {
        Outcome::QuotaShort {
            cooldown: Duration::from_secs(seconds),
        }
    }

    #[test]
    fn a_skipped_key_costs_no_attempt_and_leaves_its_project_out() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(1, 5));
        let first = tried(plan.next(&keys, MODEL, METHOD, NOW));
        plan.skip(keys.key(first).project);
        assert_eq!(plan.attempts(), 0);
        let second = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_ne!(keys.key(first).project, keys.key(second).project);
        assert_eq!(plan.attempts(), 1);
    }

    #[test]
    fn success_on_the_first_key_is_relayed() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(2, 5));
        let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_eq!(
            answer(&mut plan, &keys, key, Outcome::Success, NOW),
            Then::Relay
        );
        assert_eq!(plan.attempts(), 1);
    }

    #[test]
    fn a_quota_refusal_moves_to_another_project_and_cools_the_first() {
        let keys = pool(&[("a", "p1"), ("b", "p1"), ("c", "p2")]);
        let mut plan = plan(policy(2, 5));
        let first = tried(plan.next(&keys, MODEL, METHOD, NOW));
        let then = answer(&mut plan, &keys, first, quota(30), NOW);
        assert!(matches!(
            then,
            Then::Penalise(Penalty::CoolProjectModel { .. })
        ));
        let second = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_ne!(keys.key(second).project, keys.key(first).project);
        // The cooldown is the project's for this model: another request avoids it too.
        let mut other = Plan::new(policy(2, 5), None, Vec::new(), true);
        let key = tried(other.next(&keys, MODEL, METHOD, NOW + 1_000));
        assert_ne!(keys.key(key).project, keys.key(first).project);
    }

    #[test]
    fn a_relay_s_own_refusal_ends_the_attempts_blaming_no_key() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(2, 5));
        let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_eq!(
            answer(&mut plan, &keys, key, Outcome::RelayRefused, NOW),
            Then::NotGoogle
        );
        assert_eq!(keys.availability(MODEL, NOW).usable_projects, 2);
    }

    #[test]
    fn a_dead_key_leaves_its_projects_other_keys_as_a_fallback() {
        let keys = pool(&[("a", "p1"), ("b", "p1")]);
        let mut plan = plan(policy(2, 5));
        let first = tried(plan.next(&keys, MODEL, METHOD, NOW));
        let dead = Outcome::KeyDead(DeadReason::Invalid);
        assert_eq!(
            answer(&mut plan, &keys, first, dead, NOW),
            Then::Penalise(Penalty::DisableKey(DeadReason::Invalid))
        );
        let second = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_ne!(second, first);
    }

    #[test]
    fn a_transient_failure_backs_off_doubling_until_its_budget_runs_out() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(3, 10));
        let mut waits = Vec::new();
        let last = loop {
            let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
            match answer(&mut plan, &keys, key, Outcome::ServerError, NOW) {
                Then::Wait(wait) => waits.push(wait),
                then => break then,
            }
        };
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits, vec![ms(100), ms(200), ms(400)]);
        // The budget is spent: the client gets Google's 503 as it is.
        assert_eq!(last, Then::Answer);
        assert_eq!(plan.attempts(), 4);
        // Nobody was blamed: both projects still serve.
        assert!(matches!(keys.pick(MODEL, METHOD, &[0], NOW), Pick::Key(_)));
        assert!(matches!(keys.pick(MODEL, METHOD, &[1], NOW), Pick::Key(_)));
    }

    #[test]
    fn the_backoff_stops_growing_at_five_seconds() {
        let keys = pool(&[("a", "p1")]);
        let mut plan = Plan::new(
            RetryPolicy {
                transient_retries: 4,
                backoff: Duration::from_secs(2),
                max_attempts: 10,
            },
            None,
            Vec::new(),
            true,
        );
        let waits: Vec<Then> = (0..3)
            .map(|_| {
                tried(plan.next(&keys, MODEL, METHOD, NOW));
                plan.failed(0, false)
            })
            .collect();
        let s = |n| Then::Wait(Duration::from_secs(n));
        assert_eq!(waits, vec![s(2), s(4), s(5)]);
    }

    #[test]
    fn a_transient_failure_prefers_another_project_but_comes_back_when_none_is_left() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(3, 10));
        let first = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert!(matches!(
            plan.failed(keys.key(first).project, false),
            Then::Wait(_)
        ));
        let second = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_ne!(keys.key(second).project, keys.key(first).project);
        assert!(matches!(
            plan.failed(keys.key(second).project, false),
            Then::Wait(_)
        ));
        // Both failed transiently: they are tried again rather than giving up.
        assert!(matches!(plan.next(&keys, MODEL, METHOD, NOW), Next::Try(_)));
    }

    #[test]
    fn a_stale_pooled_connection_is_retried_once_without_spending_the_budget() {
        let keys = pool(&[("a", "p1")]);
        let mut plan = plan(policy(0, 5));
        tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_eq!(plan.failed(0, true), Then::Again);
        tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_eq!(plan.failed(0, true), Then::Fail);
    }

    #[test]
    fn an_answer_cut_short_is_relayed_not_retried() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(3, 5));
        tried(plan.next(&keys, MODEL, METHOD, NOW));
        let verdict = Outcome::ServerError.verdict(Utc::now());
        assert_eq!(
            plan.answered(0, &Outcome::ServerError, verdict, false),
            Then::Answer
        );
    }

    #[test]
    fn when_every_project_refused_the_last_answer_is_given() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(2, 10));
        for _ in 0..2 {
            let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
            // A 403 on a resource of another project: each project is asked once.
            let then = answer(&mut plan, &keys, key, Outcome::ResourceOfOtherProject, NOW);
            assert_eq!(then, Then::Again);
        }
        assert_eq!(plan.next(&keys, MODEL, METHOD, NOW), Next::GiveLast);
    }

    #[test]
    fn with_tenants_a_resource_of_another_project_is_not_searched_for() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = Plan::new(policy(2, 10), None, Vec::new(), false);
        let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
        let then = answer(&mut plan, &keys, key, Outcome::ResourceOfOtherProject, NOW);
        assert_eq!(then, Then::Answer);
    }

    #[test]
    fn the_exhausted_pool_answers_with_the_first_keys_return() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = plan(policy(2, 10));
        let first = tried(plan.next(&keys, MODEL, METHOD, NOW));
        answer(&mut plan, &keys, first, quota(90), NOW);
        let second = tried(plan.next(&keys, MODEL, METHOD, NOW));
        answer(&mut plan, &keys, second, quota(30), NOW);
        // The first project is back 30 s after NOW; asked 500 ms later, 29.5 s rounds up.
        match plan.next(&keys, MODEL, METHOD, NOW + 500) {
            Next::Exhausted {
                exhaustion,
                retry_after,
                whole_pool,
            } => {
                assert_eq!(retry_after, Some(30));
                assert_eq!(exhaustion.cooling, 2);
                assert!(whole_pool);
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
    }

    #[test]
    fn a_pool_of_disabled_keys_names_no_retry_time() {
        let keys = pool(&[("a", "p1")]);
        keys.change(KeyId(0), crate::quota::keys::Transition::Disable, NOW);
        let mut plan = plan(policy(2, 10));
        assert!(matches!(
            plan.next(&keys, MODEL, METHOD, NOW),
            Next::Exhausted {
                retry_after: None,
                ..
            }
        ));
    }

    #[test]
    fn a_request_bound_to_a_project_uses_only_its_keys() {
        let keys = pool(&[("a", "p1"), ("b", "p2"), ("c", "p2")]);
        let mut plan = Plan::new(policy(2, 10), Some(1), Vec::new(), true);
        for _ in 0..3 {
            let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
            assert_eq!(keys.key(key).project, 1);
            assert!(matches!(plan.failed(1, false), Then::Wait(_) | Then::Fail));
        }
        // Its project cools: the answer is about that project, and no alert-worthy news.
        let key = tried(
            Plan::new(policy(2, 10), Some(1), Vec::new(), true).next(&keys, MODEL, METHOD, NOW),
        );
        let mut bound = Plan::new(policy(2, 10), Some(1), Vec::new(), true);
        answer(&mut bound, &keys, key, quota(10), NOW);
        assert!(matches!(
            bound.next(&keys, MODEL, METHOD, NOW),
            Next::Exhausted {
                whole_pool: false,
                retry_after: Some(10),
                ..
            }
        ));
    }

    #[test]
    fn a_bound_project_refused_for_good_gives_googles_answer() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = Plan::new(policy(2, 10), Some(0), Vec::new(), true);
        let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
        answer(&mut plan, &keys, key, Outcome::BillingExhausted, NOW);
        assert_eq!(plan.next(&keys, MODEL, METHOD, NOW), Next::GiveLast);
    }

    #[test]
    fn the_attempt_cap_ends_the_attempts() {
        let keys = pool(&[("a", "p1"), ("b", "p2"), ("c", "p3"), ("d", "p4")]);
        let mut plan = plan(policy(2, 2));
        for _ in 0..2 {
            let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
            answer(&mut plan, &keys, key, quota(30), NOW);
        }
        assert_eq!(plan.next(&keys, MODEL, METHOD, NOW), Next::GiveLast);
        assert_eq!(plan.attempts(), 2);
    }

    #[test]
    fn a_heavy_tenant_is_refused_the_projects_kept_for_others() {
        let keys = pool(&[("a", "p1"), ("b", "p2")]);
        let mut plan = Plan::new(policy(2, 10), None, vec![1], false);
        let key = tried(plan.next(&keys, MODEL, METHOD, NOW));
        assert_eq!(keys.key(key).project, 0);
        answer(&mut plan, &keys, key, quota(30), NOW);
        // p1 cooled; p2 is kept for lighter tenants, but this request did try a key: the
        // client gets Google's answer, not a fair-share refusal.
        assert_eq!(plan.next(&keys, MODEL, METHOD, NOW), Next::GiveLast);
        // A fresh request of the same tenant is refused outright.
        let mut fresh = Plan::new(policy(2, 10), None, vec![1], false);
        assert_eq!(fresh.next(&keys, MODEL, METHOD, NOW), Next::FairShare);
    }
}
