//! The response cache, end to end against the Rust mock Gemini: what is kept and for whom,
//! how clients opt out, streams replayed, accounting, purge and the memory bound.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const FLASH: &str = "gemini-2.5-flash";
const PRO: &str = "gemini-2.5-pro";

/// What a test sees of one answer.
struct Seen {
    status: u16,
    cache: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
    took: Duration,
}

impl Seen {
    fn cache(&self) -> &str {
        self.cache.as_deref().unwrap_or("(none)")
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// POSTs `body` to `path` with `token` (as the native SDKs send it) and `headers`.
async fn post(
    kg: &Keygate,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Seen {
    let started = Instant::now();
    let mut req = client()
        .post(format!("{}{path}", kg.url()))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap().to_vec();
    Seen {
        status,
        cache: headers
            .get("x-keygate-cache")
            .map(|v| v.to_str().unwrap().to_string()),
        headers,
        body,
        took: started.elapsed(),
    }
}

fn generate_path(model: &str) -> String {
    format!("/v1beta/models/{model}:generateContent")
}

async fn ask(kg: &Keygate, token: Option<&str>, body: &str) -> Seen {
    post(kg, &generate_path(FLASH), token, &[], body).await
}

fn prompt_of(text: &str) -> String {
    format!(r#"{{"contents":[{{"role":"user","parts":[{{"text":"{text}"}}]}}]}}"#)
}

/// A config with `cache:` (`cache_extra` under it), one pool on `mock` and `tenants`.
fn config(mock: &Mock, cache_extra: &str, tenants: &str) -> String {
    format!(
        "cache:\n  ttl_seconds: 600\n{cache_extra}{}{tenants}",
        pool_yaml(&mock.url(), &[("key-a", "p1")])
    )
}

async fn admin_get(base: &str, path: &str) -> Value {
    let (status, body) = admin_call("GET", base, path, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The admin API's `/admin/tenants` entry of `name`.
async fn tenant_view(admin: &str, name: &str) -> Value {
    let tenants = admin_get(admin, "/admin/tenants").await;
    tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeat_is_a_byte_identical_hit_with_one_upstream_call_and_no_rpm() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    // rpm 1: the hit must not count, a second miss must.
    let tenants = "tenants:\n  - name: alice\n    token: \"tok-alice\"\n    rpm: 1\n";
    let (kg, admin) = start_with_admin(&config(&mock, "", tenants));

    let first = ask(&kg, Some("tok-alice"), &prompt()).await;
    assert_eq!(
        (first.status, first.cache()),
        (200, "miss"),
        "{}",
        first.text()
    );
    let second = ask(&kg, Some("tok-alice"), &prompt()).await;
    assert_eq!(
        (second.status, second.cache()),
        (200, "hit"),
        "{}",
        second.text()
    );
    assert_eq!(first.body, second.body, "byte-identical");
    assert_eq!(mock.seen().len(), 1, "one upstream call");
    assert_eq!(
        second.headers["content-type"], first.headers["content-type"],
        "the answer's own header fields are replayed"
    );
    assert!(second.headers.contains_key("age"));
    let third = ask(&kg, Some("tok-alice"), &prompt_of("something else")).await;
    assert_eq!(
        third.status,
        429,
        "a miss counts against rpm: {}",
        third.text()
    );
    assert!(third.text().contains("rpm"), "{}", third.text());
    assert_eq!(mock.seen().len(), 1);

    // Counted apart: hits, misses, bytes served and the tokens the hit saved.
    let alice = tenant_view(&admin, "alice").await;
    assert_eq!(alice["cache"]["hits"], 1, "{alice}");
    assert_eq!(alice["cache"]["misses"], 2, "{alice}");
    assert_eq!(alice["cache"]["hit_bytes"], second.body.len(), "{alice}");
    assert_eq!(alice["cache"]["saved_tokens"], 7, "{alice}");
    assert_eq!(
        alice["total_tokens"], 7,
        "only the miss spent tokens: {alice}"
    );
    let (_, metrics) = admin_call("GET", &admin, "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(
            "keygate_cache_requests_total{pool=\"main\",result=\"hit\",tenant=\"alice\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("keygate_cache_saved_tokens_total{tenant=\"alice\"} 7"),
        "{metrics}"
    );
    let logs = kg.wait_for_log("attempts=[] cache=hit");
    assert!(logs.contains("attempts=[] cache=hit"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_cache_section_nothing_is_cached() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("key-a", "p1")]));
    for _ in 0..2 {
        let seen = ask(&kg, None, &prompt()).await;
        assert_eq!((seen.status, seen.cache.as_deref()), (200, None));
    }
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_tenant_misses() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&config(
        &mock,
        "",
        &tenants_of(&[("alice", None), ("bob", None)]),
    ));
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "miss");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "miss");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "hit");
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "hit");
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_cache_skips_the_lookup_but_stores_and_no_store_skips_both() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&config(&mock, "", ""));
    let path = generate_path(FLASH);
    let no_store = [("cache-control", "no-store")];
    let no_cache = [("cache-control", "no-cache")];

    let seen = post(&kg, &path, None, &no_store, &prompt()).await;
    assert_eq!((seen.status, seen.cache()), (200, "bypass"));
    assert_eq!(
        ask(&kg, None, &prompt()).await.cache(),
        "miss",
        "no-store kept nothing"
    );
    assert_eq!(mock.seen().len(), 2);
    // An entry exists now: no-store does not read it, no-cache does not either...
    assert_eq!(
        post(&kg, &path, None, &no_store, &prompt()).await.cache(),
        "bypass"
    );
    assert_eq!(
        post(&kg, &path, None, &no_cache, &prompt()).await.cache(),
        "miss"
    );
    assert_eq!(mock.seen().len(), 4);
    // ...but no-cache stores the fresh answer.
    let fresh = prompt_of("fresh");
    assert_eq!(
        post(&kg, &path, None, &no_cache, &fresh).await.cache(),
        "miss"
    );
    assert_eq!(ask(&kg, None, &fresh).await.cache(), "hit");
    assert_eq!(mock.seen().len(), 5);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_different_body_misses_and_reordered_keys_hit() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&config(&mock, "", ""));
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"generationConfig":{"temperature":0.2,"topK":3}}"#;
    let reordered = r#"{ "generationConfig": {"topK": 3, "temperature": 0.2},
        "contents": [{"parts": [{"text": "hi"}], "role": "user"}] }"#;
    let other = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"generationConfig":{"temperature":0.3,"topK":3}}"#;
    assert_eq!(ask(&kg, None, body).await.cache(), "miss");
    assert_eq!(ask(&kg, None, reordered).await.cache(), "hit");
    assert_eq!(ask(&kg, None, other).await.cache(), "miss");
    // Another model is another request.
    assert_eq!(
        post(&kg, &generate_path(PRO), None, &[], body)
            .await
            .cache(),
        "miss"
    );
    assert_eq!(mock.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_completed_stream_is_replayed_at_once_as_the_same_events() {
    let mock = Mock::start().await;
    // The upstream's pace: 300 ms between events. A hit must come sooner than one of them.
    let gap = Duration::from_millis(300);
    mock.key("key-a", "p1").sse(5, gap);
    let kg = Keygate::start(&config(&mock, "", ""));
    let path = format!("/v1beta/models/{FLASH}:streamGenerateContent?alt=sse");

    let first = post(&kg, &path, None, &[], &prompt()).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    assert!(first.took >= gap * 4, "{:?}", first.took);
    assert_eq!(
        first.text().matches("data: ").count(),
        5,
        "{}",
        first.text()
    );
    let second = post(&kg, &path, None, &[], &prompt()).await;
    assert_eq!((second.status, second.cache()), (200, "hit"));
    assert_eq!(second.body, first.body, "the same events, byte for byte");
    assert!(
        second.took < gap,
        "at once, not at the upstream's pace: {:?}",
        second.took
    );
    assert_eq!(second.headers["content-type"], "text/event-stream");
    assert_eq!(mock.seen().len(), 1);

    // A stream and a plain answer never share an entry: the same prompt without alt=sse (a
    // streamed JSON array), and as a plain generateContent, both miss.
    let array = format!("/v1beta/models/{FLASH}:streamGenerateContent");
    let seen = post(&kg, &array, None, &[], &prompt()).await;
    assert_eq!((seen.cache(), seen.body.first()), ("miss", Some(&b'[')));
    assert_eq!(ask(&kg, None, &prompt()).await.cache(), "miss");
    assert_eq!(mock.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_stream_is_not_stored() {
    use futures_util::StreamExt;
    let mock = Mock::start().await;
    mock.key("key-a", "p1")
        .sse(5, Duration::from_millis(20))
        .sse_abort_after(2);
    let kg = Keygate::start(&config(&mock, "", ""));
    let url = format!(
        "{}/v1beta/models/{FLASH}:streamGenerateContent?alt=sse",
        kg.url()
    );
    for round in 0..2 {
        let resp = client().post(&url).body(prompt()).send().await.unwrap();
        assert_eq!(resp.headers()["x-keygate-cache"], "miss", "round {round}");
        let mut stream = resp.bytes_stream();
        let mut broken = false;
        while let Some(item) = stream.next().await {
            broken |= item.is_err();
        }
        assert!(broken, "the client sees the cut");
    }
    assert_eq!(mock.seen().len(), 2, "nothing was kept from the cut stream");
}

#[tokio::test(flavor = "multi_thread")]
async fn error_answers_are_never_stored() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&config(&mock, "", "retry:\n  transient_retries: 0\n"));
    mock.respond_next(None, 1, 400, BAD_REQUEST_BODY);
    let seen = ask(&kg, None, &prompt()).await;
    assert_eq!((seen.status, seen.cache()), (400, "miss"));
    mock.respond_next(None, 1, 503, OVERLOADED_BODY);
    let seen = ask(&kg, None, &prompt()).await;
    assert_eq!(
        (seen.status, seen.cache()),
        (503, "miss"),
        "{}",
        seen.text()
    );
    // An answer that is not 200 is not kept either (201 here stands for any other success).
    mock.respond_next(None, 1, 201, r#"{"candidates":[]}"#);
    assert_eq!(ask(&kg, None, &prompt()).await.status, 201);
    let ok = ask(&kg, None, &prompt()).await;
    assert_eq!((ok.status, ok.cache()), (200, "miss"), "{}", ok.text());
    assert_eq!(ask(&kg, None, &prompt()).await.cache(), "hit");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_bounds_how_old_a_hit_may_be() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let kg = Keygate::start(&config(&mock, "", ""));
    let path = generate_path(FLASH);
    assert_eq!(ask(&kg, None, &prompt()).await.cache(), "miss");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let young = [("cache-control", "max-age=1")];
    let old_enough = [("cache-control", "max-age=60")];
    let seen = post(&kg, &path, None, &old_enough, &prompt()).await;
    assert_eq!(seen.cache(), "hit");
    let age: u64 = seen.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((2..10).contains(&age), "age {age}");
    assert_eq!(
        post(&kg, &path, None, &young, &prompt()).await.cache(),
        "miss"
    );
    assert_eq!(mock.seen().len(), 2);
    // The miss stored a fresh answer, young enough now.
    assert_eq!(
        post(&kg, &path, None, &young, &prompt()).await.cache(),
        "hit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_naming_a_project_bound_resource_is_never_cached() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let file = mock.make_file("p1");
    let kg = Keygate::start(&config(&mock, "", ""));
    let body = format!(
        r#"{{"contents":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{file}","mimeType":"text/plain"}}}},{{"text":"sum it up"}}]}}]}}"#
    );
    for _ in 0..2 {
        let seen = ask(&kg, None, &body).await;
        assert_eq!(
            (seen.status, seen.cache()),
            (200, "bypass"),
            "{}",
            seen.text()
        );
    }
    assert_eq!(mock.seen().len(), 2);
    // Nor is anything but generation, embedding and token counts: a model listing.
    let resp = client()
        .get(format!("{}/v1beta/models", kg.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-keygate-cache"], "bypass");
    // Embeddings and token counts are.
    for method in ["embedContent", "countTokens"] {
        let path = format!("/v1beta/models/{FLASH}:{method}");
        assert_eq!(post(&kg, &path, None, &[], &prompt()).await.cache(), "miss");
        assert_eq!(post(&kg, &path, None, &[], &prompt()).await.cache(), "hit");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn purge_everything_or_one_tenant() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let (kg, admin) = start_with_admin(&config(
        &mock,
        "",
        &tenants_of(&[("alice", None), ("bob", None)]),
    ));
    for token in ["tok-alice", "tok-bob"] {
        assert_eq!(ask(&kg, Some(token), &prompt()).await.cache(), "miss");
        assert_eq!(ask(&kg, Some(token), &prompt()).await.cache(), "hit");
    }
    let view = admin_get(&admin, "/admin/cache").await;
    assert_eq!(view["entries"], 2, "{view}");
    assert!(view["bytes_used"].as_u64().unwrap() > 0, "{view}");

    let (status, body) = admin_call("DELETE", &admin, "/admin/cache/tenants/alice", None).await;
    assert_eq!((status, &body["purged"]), (200, &Value::from(1)), "{body}");
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "miss");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "hit");
    let (status, body) = admin_call("DELETE", &admin, "/admin/cache/tenants/nobody", None).await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = admin_call("DELETE", &admin, "/admin/cache", None).await;
    assert_eq!((status, &body["purged"]), (200, &Value::from(2)), "{body}");
    assert_eq!(body["bytes_used"], 0, "{body}");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "miss");
    assert_eq!(mock.seen().len(), 4);
    // The admin token is needed.
    let (status, _) = common::admin("DELETE", &format!("{admin}/admin/cache"), None, None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_pool_shares_entries_between_tenants_within_itself_only() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1")
        .key("key-b", "p2")
        .key("key-c", "p3");
    let pool = |name: &str, key: &str, project: &str, extra: &str| {
        format!(
            "  - name: {name}\n    upstream: \"{}\"\n    keys: [{{key: {key}, project: {project}}}]\n{extra}",
            mock.url()
        )
    };
    let shared = "    cache_shared_across_tenants: true\n";
    let yaml = format!(
        "cache: {{}}\npools:\n{}{}{}{}",
        pool(
            "team",
            "key-a",
            "p1",
            &format!("{shared}    models: [\"gemini-2.5-flash*\"]\n")
        ),
        pool("other-team", "key-b", "p2", shared),
        pool("own", "key-c", "p3", ""),
        tenants_of(&[
            ("alice", Some("team, other-team, own")),
            ("bob", Some("team, own")),
            ("carol", Some("other-team")),
        ]),
    );
    let kg = Keygate::start(&yaml);
    // Flash goes to pool `team` for alice and bob, to `other-team` for carol.
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "miss");
    let bob = ask(&kg, Some("tok-bob"), &prompt()).await;
    assert_eq!(bob.cache(), "hit", "shared within the pool");
    assert!(bob.text().contains("hello from p1"), "{}", bob.text());
    let carol = ask(&kg, Some("tok-carol"), &prompt()).await;
    assert_eq!(carol.cache(), "miss", "another pool, even a shared one");
    assert!(carol.text().contains("hello from p2"), "{}", carol.text());
    // Pro goes to `other-team` for alice (shared with carol) and to `own` for bob (not shared).
    let pro = generate_path(PRO);
    assert_eq!(
        post(&kg, &pro, Some("tok-alice"), &[], &prompt())
            .await
            .cache(),
        "miss"
    );
    assert_eq!(
        post(&kg, &pro, Some("tok-carol"), &[], &prompt())
            .await
            .cache(),
        "hit"
    );
    assert_eq!(
        post(&kg, &pro, Some("tok-bob"), &[], &prompt())
            .await
            .cache(),
        "miss"
    );
    assert_eq!(mock.seen().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_style_hits_plain_and_streamed() {
    let mock = Mock::start().await;
    let gap = Duration::from_millis(250);
    mock.key("key-a", "p1").sse(3, gap);
    let kg = Keygate::start(&config(&mock, "", &tenants_of(&[("dev", None)])));
    let chat = |stream: bool| {
        format!(
            r#"{{"model":"{FLASH}","messages":[{{"role":"user","content":"hi"}}]{}}}"#,
            if stream { r#","stream":true"# } else { "" }
        )
    };
    let send = |body: String| {
        let url = format!("{}/v1/chat/completions", kg.url());
        async move {
            let started = Instant::now();
            let resp = client()
                .post(url)
                .header("authorization", "Bearer tok-dev")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let cache = resp.headers()["x-keygate-cache"]
                .to_str()
                .unwrap()
                .to_string();
            let text = resp.text().await.unwrap();
            (cache, text, started.elapsed())
        }
    };
    let (c1, plain, _) = send(chat(false)).await;
    let (c2, again, _) = send(chat(false)).await;
    assert_eq!((c1.as_str(), c2.as_str()), ("miss", "hit"));
    assert_eq!(plain, again);
    assert!(plain.contains("chat.completion"), "{plain}");

    let (c3, stream, took) = send(chat(true)).await;
    assert_eq!(c3, "miss", "a stream never shares the plain answer's entry");
    assert!(took >= gap * 3, "{took:?}");
    assert!(stream.trim_end().ends_with("data: [DONE]"), "{stream}");
    let (c4, replay, took) = send(chat(true)).await;
    assert_eq!(c4, "hit");
    assert_eq!(replay, stream);
    assert!(took < gap, "{took:?}");
    assert_eq!(mock.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_are_kept_decoded_for_any_client() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1").gzip_success(true);
    let kg = Keygate::start(&config(&mock, "", ""));
    let zipped = post(
        &kg,
        &generate_path(FLASH),
        None,
        &[("accept-encoding", "gzip")],
        &prompt(),
    )
    .await;
    assert_eq!(zipped.cache(), "miss");
    assert_eq!(
        zipped.headers["content-encoding"], "gzip",
        "relayed as Google sent it"
    );
    let plain = ask(&kg, None, &prompt()).await;
    assert_eq!(plain.cache(), "hit");
    assert!(!plain.headers.contains_key("content-encoding"));
    let mut decoded = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(&zipped.body[..]),
        &mut decoded,
    )
    .unwrap();
    assert_eq!(plain.body, decoded);
    assert_eq!(mock.seen().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_bound_holds_in_bytes_the_cache_counts() {
    let mock = Mock::start().await;
    // Answers of about 20 KiB; the budget is 1 MiB, so one entry may be 64 KiB at most.
    mock.key("key-a", "p1").answer_padding(20 * 1024);
    let (kg, admin) = start_with_admin(&config(&mock, "  max_megabytes: 1\n", ""));
    let capacity = 1024 * 1024;
    for n in 0..120 {
        assert_eq!(
            ask(&kg, None, &prompt_of(&format!("q{n}"))).await.cache(),
            "miss"
        );
        if n % 20 == 19 {
            let view = admin_get(&admin, "/admin/cache").await;
            assert_eq!(view["capacity_bytes"], capacity, "{view}");
            assert!(view["bytes_used"].as_u64().unwrap() <= capacity, "{view}");
        }
    }
    let view = admin_get(&admin, "/admin/cache").await;
    let used = view["bytes_used"].as_u64().unwrap();
    let entries = view["entries"].as_u64().unwrap();
    assert!(used > capacity / 2, "the budget is used: {view}");
    assert!((20..120).contains(&entries), "{view}");
    assert_eq!(view["recording_bytes"], 0, "{view}");
    // Prometheus says the same.
    let (_, metrics) = admin_call("GET", &admin, "/metrics", None).await;
    let metrics = metrics.as_str().unwrap().to_string();
    assert!(
        metrics.contains(&format!(
            "keygate_cache_memory_bytes{{state=\"capacity\"}} {capacity}"
        )),
        "{metrics}"
    );
    // One answer over a sixteenth of the budget is relayed but not kept.
    mock.answer_padding(80 * 1024);
    let big = prompt_of("big");
    let first = ask(&kg, None, &big).await;
    assert_eq!((first.status, first.cache()), (200, "miss"));
    assert!(first.body.len() > 80 * 1024);
    assert_eq!(ask(&kg, None, &big).await.cache(), "miss");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_purge_keeps_a_shared_pools_entries_and_says_so() {
    let mock = Mock::start().await;
    mock.key("key-a", "p1");
    let yaml = format!(
        "cache: {{}}\n{}    cache_shared_across_tenants: true\n{}",
        pool_yaml(&mock.url(), &[("key-a", "p1")]),
        tenants_of(&[("alice", None), ("bob", None)])
    );
    let (kg, admin) = start_with_admin(&yaml);
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "miss");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "hit");
    // The entry is the pool's, read by every tenant of it: alice's purge leaves it, and the
    // answer says where it stays and how to remove it.
    let (status, body) = admin_call("DELETE", &admin, "/admin/cache/tenants/alice", None).await;
    assert_eq!((status, &body["purged"]), (200, &Value::from(0)), "{body}");
    assert_eq!(
        body["shared_pools_kept"],
        serde_json::json!(["main"]),
        "{body}"
    );
    assert!(
        body["note"]
            .as_str()
            .unwrap()
            .contains("DELETE /admin/cache"),
        "{body}"
    );
    assert_eq!(ask(&kg, Some("tok-alice"), &prompt()).await.cache(), "hit");
    let (status, body) = admin_call("DELETE", &admin, "/admin/cache", None).await;
    assert_eq!((status, &body["purged"]), (200, &Value::from(1)), "{body}");
    assert!(body.get("note").is_none(), "{body}");
    assert_eq!(ask(&kg, Some("tok-bob"), &prompt()).await.cache(), "miss");
    assert_eq!(mock.seen().len(), 2);
}
