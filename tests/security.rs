//! The adversarial pass: a hostile tenant and a hostile network against keygate. Each test is
//! one finding of the security issue and failed before its fix.
//!
//! The mock reads requests the way Google does (JSON strings decoded, %-escapes and dot
//! segments resolved), so a spelling that keygate misreads reaches "Google" as what it means.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A mock knowing `keys`, and the config of one pool of them with `tenants` (each with token
/// `tok-NAME`).
async fn team(keys: &[(&str, &str)], tenants: &[&str]) -> (Mock, String) {
    let mock = Mock::start().await;
    for (k, p) in keys {
        mock.key(k, p);
    }
    let list: Vec<(&str, Option<&str>)> = tenants.iter().map(|t| (*t, None)).collect();
    let yaml = format!("{}{}", pool_yaml(&mock.url(), keys), tenants_of(&list));
    (mock, yaml)
}

/// A three-project pool (one key each) with tenants alice and bob, and an admin listener.
async fn team_with_admin() -> (Mock, Keygate, String) {
    let keys = [
        ("secret-k1", "p1"),
        ("secret-k2", "p2"),
        ("secret-k3", "p3"),
    ];
    let (mock, yaml) = team(&keys, &["alice", "bob"]).await;
    let (kg, admin) = start_with_admin(&yaml);
    (mock, kg, admin)
}

/// Uploads "hello world" through keygate as `token`'s tenant; the file's JSON.
async fn upload_file(kg: &Keygate, token: &str) -> Value {
    let url = start_upload(kg, token).await;
    let (status, body) = send_bytes(&url, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["file"].clone()
}

/// Like [`upload_file`]: the file's name.
async fn upload_name(kg: &Keygate, token: &str) -> String {
    let file = upload_file(kg, token).await;
    file["name"].as_str().unwrap().to_string()
}

/// A generateContent body whose one file part says `file_uri` exactly as given (raw JSON text).
fn body_with_file(file_uri_json: &str) -> String {
    format!(
        r#"{{"contents":[{{"role":"user","parts":[{{"fileData":{{"mimeType":"text/plain","fileUri":"{file_uri_json}"}}}},{{"text":"summarize"}}]}}]}}"#
    )
}

async fn post_as(kg: &Keygate, path: &str, token: &str, body: String) -> (u16, String) {
    let resp = client()
        .post(format!("{}{path}", kg.url()))
        .header("x-goog-api-key", token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn get_as(kg: &Keygate, path: &str, token: &str) -> (u16, String) {
    let resp = client()
        .get(format!("{}{path}", kg.url()))
        .header("x-goog-api-key", token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

const GENERATE: &str = "/v1beta/models/gemini-2.5-flash:generateContent";

/// POSTs a small generateContent to keygate, with `query` (after `?`, may be empty) and
/// `headers`.
async fn post_prompt(kg: &Keygate, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let sep = if query.is_empty() { "" } else { "?" };
    let mut req = client().post(format!("{}{GENERATE}{sep}{query}", kg.url()));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(prompt()).send().await.unwrap()
}

/// A mock with one key (`secret-k1` of project p1) behind a keygate whose config is the pool
/// plus `extra`.
async fn one_key(extra: &str) -> (Mock, Keygate) {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let kg = Keygate::start(&format!(
        "{}{extra}",
        pool_yaml(&mock.url(), &[("secret-k1", "p1")])
    ));
    (mock, kg)
}

// ---------------------------------------------------------------------------------------------
// Finding 1: one tenant can use another tenant's files
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_file_stays_with_its_tenant_however_its_name_is_spelt() {
    let (mock, kg, _admin) = team_with_admin().await;
    let name = upload_name(&kg, "tok-alice").await; // files/mockfileN
    let id = name.trim_start_matches("files/").to_string();
    let owner = mock.owner_of(&name).unwrap();
    let before = mock.seen().len();

    // Spellings Google decodes to the same name: JSON escapes in the body.
    for spelt in [
        format!(r"files\u002f{id}"),
        format!(r"\u0066iles/{id}"),
        format!(r"files\/{id}"),
        format!(
            r"http://h/v1beta/files/%{:02x}{}",
            id.as_bytes()[0],
            &id[1..]
        ),
        format!("http://h/v1beta/x/../files/{id}"),
    ] {
        let (status, body) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&spelt)).await;
        assert_eq!(status, 403, "bob used alice's file spelt {spelt}: {body}");
        assert!(body.contains("another tenant"), "{spelt}: {body}");
    }
    // ...and %-escapes in the path, for the file's metadata.
    let escaped = format!("/v1beta/files/%{:02x}{}", id.as_bytes()[0], &id[1..]);
    let (status, body) = get_as(&kg, &escaped, "tok-bob").await;
    assert_eq!(status, 403, "bob read alice's metadata: {body}");
    assert!(!body.contains("hello"), "{body}");
    // Nothing went upstream for bob: no project was searched for the file.
    assert_eq!(mock.seen().len(), before, "{:?}", &mock.seen()[before..]);

    // Alice's own escaped spellings go straight to the owner.
    let (status, body) = post_as(
        &kg,
        GENERATE,
        "tok-alice",
        body_with_file(&format!(r"files\u002f{id}")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&format!("hello from {owner}")), "{body}");
    assert!(mock.seen()[before..].iter().all(|s| s.status == 200));
}

#[tokio::test(flavor = "multi_thread")]
async fn with_tenants_an_unknown_resource_is_refused_until_an_operator_binds_it() {
    let (mock, kg, admin) = team_with_admin().await;
    let name = mock.make_file("p2"); // made outside keygate: keygate does not know its owner
    let before = mock.seen().len();
    for token in ["tok-bob", "tok-alice"] {
        let (status, body) = post_as(&kg, GENERATE, token, body_with_file(&name)).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains(&name), "{body}");
    }
    let (status, _) = get_as(&kg, &format!("/v1beta/{name}"), "tok-bob").await;
    assert_eq!(status, 403);
    assert_eq!(mock.seen().len(), before, "keygate searched the projects");

    // The operator binds it to bob; then bob's requests go to p2 only, alice's are refused.
    let bind = format!(r#"{{"name": "{name}", "project": "p2", "tenant": "bob"}}"#);
    let (status, answer) = admin_call("POST", &admin, "/admin/resources", Some(&bind)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["name"], name.as_str(), "{answer}");
    assert_eq!(answer["project"], "p2", "{answer}");
    assert_eq!(answer["pool"], "main", "{answer}");
    for _ in 0..3 {
        let (status, body) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&name)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("hello from p2"), "{body}");
    }
    assert!(mock.seen()[before..].iter().all(|s| s.status == 200));
    let (status, body) = post_as(&kg, GENERATE, "tok-alice", body_with_file(&name)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("another tenant"), "{body}");
    let (_, list) = admin_call("GET", &admin, "/admin/resources", None).await;
    let listed = list["resources"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|r| r["name"] == name.as_str() && r["tenant"] == "bob"),
        "{list}"
    );

    // Bad bindings are refused with a reason.
    for (bad, why) in [
        (
            r#"{"name": "files/x", "project": "nope", "tenant": "bob"}"#,
            "nope",
        ),
        (
            r#"{"name": "files/x", "project": "p1", "tenant": "carol"}"#,
            "carol",
        ),
        (
            r#"{"name": "models/x", "project": "p1", "tenant": "bob"}"#,
            "models/x",
        ),
    ] {
        let (status, answer) = admin_call("POST", &admin, "/admin/resources", Some(bad)).await;
        assert!(status == 400 || status == 404, "{status} {answer}");
        assert!(answer.to_string().contains(why), "{answer}");
    }
    // Unbinding puts it back to unknown.
    let (status, _) = admin_call("DELETE", &admin, &format!("/admin/resources/{name}"), None).await;
    assert_eq!(status, 200);
    let (status, _) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&name)).await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_shows_a_tenant_only_its_own_resources() {
    let (mock, yaml) = team(&[("secret-k1", "p1")], &["alice", "bob"]).await;
    let kg = Keygate::start(&yaml);
    let alices = upload_file(&kg, "tok-alice").await["name"].clone();
    let bobs = upload_file(&kg, "tok-bob").await["name"].clone();
    let premade = mock.make_file("p1");
    for (token, mine, theirs) in [("tok-bob", &bobs, &alices), ("tok-alice", &alices, &bobs)] {
        let (status, body) = get_as(&kg, "/v1beta/files", token).await;
        assert_eq!(status, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&Value> = list["files"]
            .as_array()
            .map(|a| a.iter().map(|f| &f["name"]).collect())
            .unwrap_or_default();
        assert!(names.contains(&mine), "{token}: {body}");
        assert!(
            !names.contains(&theirs),
            "{token} sees another tenant's file: {body}"
        );
        assert!(
            !body.contains(&premade),
            "{token} sees an unbound file: {body}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Finding 2: the pool's keys reach clients
// ---------------------------------------------------------------------------------------------

fn assert_no_key(text: &str, keys: &[&str]) {
    for k in keys {
        assert!(
            !text.contains(k),
            "pool key {k} reached the client:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_key_bound_to_a_resource_is_not_relayed() {
    let (mock, kg, _admin) = team_with_admin().await;
    let resp = client()
        .post(format!("{}/v1beta/cachedContents", kg.url()))
        .header("x-goog-api-key", "tok-alice")
        .body(r#"{"model":"models/gemini-2.5-flash","contents":[{"role":"user","parts":[{"text":"a long document"}]}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cache = resp.json::<Value>().await.unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let owner = mock.owner_of(&cache).unwrap();
    let owner_key = format!("secret-k{}", owner.trim_start_matches('p'));
    mock.suspended_key(&owner_key);
    let body = format!(
        r#"{{"cachedContent":"{cache}","contents":[{{"role":"user","parts":[{{"text":"summarize"}}]}}]}}"#
    );
    let (status, text) = post_as(&kg, GENERATE, "tok-alice", body).await;
    assert_eq!(status, 403, "{text}");
    assert_no_key(&text, &["secret-k1", "secret-k2", "secret-k3"]);
    let fingerprint = keygate::secret::fingerprint(owner_key.as_bytes());
    assert!(text.contains(&fingerprint), "{text}");
    assert!(text.contains("suspended"), "{text}");
    let parsed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["error"]["code"], 403, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_suspended_key_met_by_a_heavy_tenant_is_not_relayed() {
    let keys = [("secret-ka", "p1"), ("secret-kb", "p2")];
    let (mock, yaml) = team(&keys, &["heavy", "light"]).await;
    // Fair share keeps the heavy tenant off a project, so it meets the suspended key.
    let yaml = yaml.replace("    keys:\n", "    fair_share: true\n    keys:\n");
    let kg = Keygate::start(&yaml);
    for token in ["tok-heavy", "tok-heavy", "tok-heavy", "tok-light"] {
        let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some(token)).await;
        assert_eq!(status, 200);
    }
    // The heavy tenant is now kept off the last project (p2); p1's key gets suspended.
    mock.suspended_key("secret-ka");
    let mut seen_refusal = false;
    for _ in 0..4 {
        let (status, _, text) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-heavy")).await;
        assert_no_key(&text, &["secret-ka", "secret-kb"]);
        seen_refusal |= status != 200;
    }
    assert!(seen_refusal, "the scenario never reached the suspended key");
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_keys_are_scrubbed_from_relayed_errors_in_every_spelling() {
    let mock = Mock::start().await;
    let key = "secret-key-alpha";
    mock.key(key, "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[(key, "p1")]));
    let escaped = r"secret-key-\u0061lpha";
    let plain = format!(
        r#"{{"error":{{"code":400,"message":"Bad value for api_key:{key} in request","status":"INVALID_ARGUMENT"}}}}"#
    );
    let json_escaped = plain.replace(key, escaped);
    for (label, body, headers) in [
        ("plain", plain.clone(), vec![]),
        ("json-escaped", json_escaped, vec![]),
        (
            "in a header",
            r#"{"error":{"code":404,"message":"no","status":"NOT_FOUND"}}"#.to_string(),
            vec![("x-debug-key", key)],
        ),
    ] {
        mock.respond_next_with(None, 1, 400, &body, &headers);
        let resp = post_prompt(&kg, "", &[]).await;
        assert_eq!(resp.status(), 400, "{label}");
        let head = format!("{:?}", resp.headers());
        let text = resp.text().await.unwrap();
        assert_no_key(&format!("{head}\n{text}"), &[key, escaped]);
        assert!(text.contains("error"), "{label}: {text}");
    }
    // gzip-encoded (Google compresses errors for clients that accept it).
    mock.respond_next(None, 1, 400, &plain);
    let resp = post_prompt(&kg, "", &[("accept-encoding", "gzip")]).await;
    let gzip = resp
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let raw = resp.bytes().await.unwrap();
    let text = if gzip {
        let mut out = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut out)
            .unwrap();
        out
    } else {
        String::from_utf8_lossy(&raw).into_owned()
    };
    assert_no_key(&text, &[key]);
    assert!(text.contains("api_key:key#"), "{text}");
    // An error body over 64 KiB is replaced, not relayed.
    let huge = format!(
        r#"{{"error":{{"code":400,"message":"{}{key}","status":"INVALID_ARGUMENT"}}}}"#,
        "x".repeat(100 * 1024)
    );
    mock.respond_next(None, 1, 400, &huge);
    let resp = post_prompt(&kg, "", &[]).await;
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.unwrap();
    assert!(text.len() < 4096, "{} bytes relayed", text.len());
    assert!(text.contains("keygate"), "{text}");
    assert_no_key(&text, &[key]);
}

// ---------------------------------------------------------------------------------------------
// Finding 3: a tenant escapes its pool restriction
// ---------------------------------------------------------------------------------------------

/// Pools `pro` and `flash`; bob may use flash only.
async fn split_pools() -> (Mock, Keygate) {
    let mock = Mock::start().await;
    mock.key("secret-pro", "pp").key("secret-flash", "pf");
    let yaml = format!(
        "pools:\n  - name: pro\n    upstream: \"{u}\"\n    models: [\"gemini-2.5-pro*\"]\n    keys: [{{key: secret-pro, project: pp}}]\n  - name: flash\n    upstream: \"{u}\"\n    models: [\"gemini-*flash*\"]\n    keys: [{{key: secret-flash, project: pf}}]\n{}",
        tenants_of(&[("bob", Some("flash"))]),
        u = mock.url()
    );
    let kg = Keygate::start(&yaml);
    (mock, kg)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_cannot_reach_a_model_outside_its_pools() {
    let (mock, kg) = split_pools().await;
    let auth = [("x-goog-api-key", "tok-bob")];
    // Two "model" fields (Google takes the last one), one of them escaped, or not a string.
    for body in [
        r#"{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"hi"}],"model":"gemini-2.5-pro"}"#,
        r#"{"model":"gemini-2.5-flash","messages":[],"\u006dodel":"gemini-2.5-pro"}"#,
        r#"{"model":["gemini-2.5-pro"],"messages":[]}"#,
    ] {
        let bearer = [("Authorization", "Bearer tok-bob")];
        let (status, text) = raw_http(kg.addr, &raw_post("/v1/chat/completions", &bearer, body));
        assert_eq!(status, 400, "{body}: {text}");
    }
    // Dot segments, plain or %-encoded, and encoded slashes.
    for path in [
        "/v1beta/models/gemini-2.5-flash/../gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-flash/%2e%2e/gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-flash/%2E./gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-flash/./../gemini-2.5-pro:generateContent",
        "/v1beta/models/gemini-2.5-flash%2f..%2fgemini-2.5-pro:generateContent",
    ] {
        let (status, text) = raw_http(kg.addr, &raw_post(path, &auth, &prompt()));
        assert_eq!(status, 400, "{path}: {text}");
    }
    // No path outside the forwarded prefixes goes upstream, whatever its spelling.
    for path in ["/v1/../anything", "/v1beta/%2e%2e/admin", "/upload/../x"] {
        let (status, text) = raw_http(kg.addr, &raw_get(path, &auth));
        assert!(status == 400 || status == 404, "{path}: {text}");
    }
    assert!(
        mock.seen().is_empty(),
        "reached upstream: {:?}",
        mock.seen()
            .iter()
            .map(|s| (&s.path, &s.key))
            .collect::<Vec<_>>()
    );
    // Repeated slashes (a base URL ending in `/`) are fine.
    let (status, text) = raw_http(
        kg.addr,
        &raw_post(
            "//v1beta//models/gemini-2.5-flash:generateContent",
            &auth,
            &prompt(),
        ),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        mock.seen()[0].path,
        "/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(mock.seen()[0].key.as_deref(), Some("secret-flash"));
}

// ---------------------------------------------------------------------------------------------
// Finding 4: slowloris
// ---------------------------------------------------------------------------------------------

/// Writes `bytes` one at a time, `gap` apart, until the server closes the connection; how long
/// the connection lived and how many bytes went out.
fn crawl(mut stream: TcpStream, bytes: &[u8], gap: Duration) -> (Duration, usize) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    for (sent, b) in bytes.iter().enumerate() {
        if stream.write_all(&[*b]).is_err() {
            return (started.elapsed(), sent);
        }
        std::thread::sleep(gap);
        let mut buf = [0u8; 512];
        match stream.read(&mut buf) {
            Ok(0) => return (started.elapsed(), sent + 1),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (started.elapsed(), sent + 1),
        }
    }
    (started.elapsed(), bytes.len())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_sent_byte_by_byte_is_cut_at_the_header_deadline() {
    let (_mock, kg) = one_key("client_limits:\n  header_timeout_seconds: 2\n").await;
    let header =
        "POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: k\r\nX-Padding: "
            .to_string()
            + &"a".repeat(200);
    let addr = kg.addr;
    let crawling = header.clone();
    let (lived, sent) = tokio::task::spawn_blocking(move || {
        let stream = TcpStream::connect(addr).unwrap();
        crawl(stream, crawling.as_bytes(), Duration::from_millis(100))
    })
    .await
    .unwrap();
    assert!(
        lived < Duration::from_millis(3500),
        "a crawling header held its connection for {lived:?} ({sent} bytes)"
    );
    assert!(lived >= Duration::from_millis(1900), "{lived:?}");
    // On a kept-alive connection, the next request's header gets the same deadline.
    let (lived, _) = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /nowhere HTTP/1.1\r\nHost: k\r\n\r\n")
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
        crawl(stream, header.as_bytes(), Duration::from_millis(100))
    })
    .await
    .unwrap();
    assert!(lived < Duration::from_millis(3500), "{lived:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_flood_is_capped_and_the_admin_listener_keeps_answering() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let admin = free_addr();
    let yaml = format!(
        "{}admin:\n  listen: \"{admin}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n",
        pool_yaml(&mock.url(), &[("secret-k1", "p1")])
    );
    // A small VPS: 256 open files in all. Default limits apply.
    let kg = Keygate::start_with_nofile(&yaml, &[("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)], Some(256));
    wait_port(admin);
    // 300 connections that send half a header and wait.
    let mut held = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(kg.addr) {
            Ok(mut s) => {
                let _ = s.write_all(b"GET /v1beta/models HTTP/1.1\r\nHost: x\r\n");
                held.push(s);
            }
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The admin listener still answers, at once.
    let started = Instant::now();
    let resp = client_timeout(Duration::from_secs(3))
        .get(format!("http://{admin}/healthz"))
        .send()
        .await;
    assert!(
        resp.as_ref().is_ok_and(|r| r.status() == 200),
        "admin /healthz under a flood: {resp:?} after {:?}\n{}",
        started.elapsed(),
        kg.logs()
    );
    // Connections past the cap were closed straight away.
    let mut closed = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 64];
        let gone = match s.read(&mut buf) {
            Ok(n) => n == 0 || buf.starts_with(b"HTTP/1.1 503"),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        closed += usize::from(gone);
    }
    assert!(
        closed >= 100,
        "only {closed} of 300 connections were refused"
    );
    // The ones held are cut at the header deadline (10 s by default); then clients are served.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 200, "{body}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_or_crawling_body_gets_408() {
    let (mock, kg) = one_key(
        "client_limits:\n  body_timeout_seconds: 1\n  body_min_rate_bytes_per_second: 1000\n",
    )
    .await;
    let addr = kg.addr;
    // Stalled: 10 bytes of a 100-byte body, then nothing.
    let stalled = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        s.write_all(b"POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: k\r\nContent-Length: 100\r\n\r\n{\"contents\"")
            .unwrap();
        let mut answer = String::new();
        let end = s.read_to_string(&mut answer).err();
        (started.elapsed(), answer, end)
    });
    // Crawling: 100 bytes a second where 1000 are needed.
    let crawling = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let started = Instant::now();
        s.write_all(b"POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: k\r\nContent-Length: 100000\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        while started.elapsed() < Duration::from_secs(8) {
            if s.write_all(&[b' '; 10]).is_err() {
                break;
            }
            let mut buf = [0u8; 1024];
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(90));
        }
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        answer.extend_from_slice(&rest);
        (
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        )
    });
    let (took, answer, end) = stalled.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "stalled body: {answer:?} ({end:?}) after {took:?}\n{}",
        kg.logs()
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    let (took, answer) = crawling.await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "crawling body: {answer:?} after {took:?}\n{}",
        kg.logs()
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(mock.seen().is_empty());
    assert!(!kg.logs().contains("ERROR"), "{}", kg.logs());
}

// ---------------------------------------------------------------------------------------------
// Finding 5: abandoned requests go on
// ---------------------------------------------------------------------------------------------

/// Sends alice's generateContent and hangs up after `patience`, before any answer.
async fn hang_up_after(kg: &Keygate, patience: Duration) {
    let gone = client_timeout(patience)
        .post(format!("{}{GENERATE}", kg.url()))
        .header("x-goog-api-key", "tok-alice")
        .body(prompt())
        .send()
        .await;
    assert!(gone.is_err(), "answered within {patience:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_hangs_up_frees_its_slot_and_stops_the_attempts() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1").key("secret-k2", "p2");
    let yaml = format!(
        "{}tenants:\n  - name: alice\n    token: \"tok-alice\"\n    max_concurrent: 1\n",
        pool_yaml(&mock.url(), &[("secret-k1", "p1"), ("secret-k2", "p2")])
    );
    let kg = Keygate::start(&yaml);
    mock.delay(Duration::from_secs(2));
    hang_up_after(&kg, Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The slot is free at once: the next request is not refused by max_concurrent.
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-alice")).await;
    assert_eq!(status, 200, "{body}");

    // Google's side keeps failing: once the client is gone, no further attempt is made.
    mock.delay(Duration::from_millis(800));
    mock.respond_next(None, 10, 503, OVERLOADED_BODY);
    let before = mock.arrivals();
    hang_up_after(&kg, Duration::from_millis(300)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        mock.arrivals() - before,
        1,
        "attempts went on after the hang-up"
    );
    let logs = kg.wait_for_log("status=499");
    assert!(logs.contains("status=499"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_held_to_one_request_may_send_the_next_as_soon_as_it_reads_an_answer() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let yaml = format!(
        "{}tenants:\n  - name: alice\n    token: \"tok-alice\"\n    max_concurrent: 1\n",
        pool_yaml(&mock.url(), &[("secret-k1", "p1")])
    );
    let kg = Keygate::start(&yaml);
    // Never two at once: each request goes out once the previous answer is read whole.
    for i in 0..300 {
        let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-alice")).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Finding 6: trust in Google's numbers has no ceiling
// ---------------------------------------------------------------------------------------------

fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_per_minute_cooldown_is_capped_and_duration_syntax_is_strict() {
    let (mock, kg) = one_key("").await;
    mock.per_minute_limit("p1", "gemini-2.5-flash", 0, "604800s");
    let (status, headers, body) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 429, "{body}");
    let secs = retry_after(&headers);
    assert!(
        (3500..=3601).contains(&secs),
        "a week-long retryDelay cooled for {secs} s"
    );
    mock.per_minute_limit("p1", "gemini-2.5-pro", 0, "1e5s");
    let (status, headers, body) = generate(&kg.url(), "gemini-2.5-pro", None).await;
    assert_eq!(status, 429, "{body}");
    let secs = retry_after(&headers);
    assert!(secs <= 61, "\"1e5s\" was read as a duration: {secs} s");
}

#[tokio::test(flavor = "multi_thread")]
async fn cooldowns_from_an_old_state_file_are_clamped() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let week = now_ms + 7 * 24 * 3600 * 1000;
    std::fs::write(
        &state,
        format!(
            r#"{{"version":1,"written_at":{now_ms},"pools":{{"main":{{"keys":[],"projects":[{{"project":"p1","cooldowns":[["gemini-2.5-flash",{week}]]}}]}}}},"affinity":[]}}"#
        ),
    )
    .unwrap();
    let (_kg, admin) = start_with_admin(&format!(
        "{}state_file: \"{}\"\n",
        pool_yaml(&mock.url(), &[("secret-k1", "p1")]),
        state.display()
    ));
    let (_, pools) = admin_call("GET", &admin, "/admin/pools", None).await;
    let cooldown = &pools["pools"][0]["keys"][0]["cooldowns"][0];
    let left = cooldown["seconds_left"].as_u64().unwrap_or(0);
    assert!(left > 0, "{pools}");
    assert!(
        left <= 25 * 3600,
        "a saved week-long cooldown was kept: {left} s\n{pools}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 7: a dead upstream name costs every client 30 s
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_name_that_does_not_resolve_is_a_502_at_once() {
    let (kg, admin) = start_with_admin(&pool_yaml(
        "http://keygate-test-host.invalid:9",
        &[("secret-k1", "p1")],
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let resp = client_timeout(Duration::from_secs(10))
        .post(format!("{}{GENERATE}", kg.url()))
        .body(prompt())
        .send()
        .await
        .expect("an answer within 10 s");
    let took = started.elapsed();
    assert_eq!(resp.status(), 502);
    let text = resp.text().await.unwrap();
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(text.contains("does not resolve"), "{text}");
    let logs = kg.wait_for_log("status=502");
    assert!(logs.contains("attempts=[]"), "{logs}");
    let (status, ready) = admin_call("GET", &admin, "/readyz", None).await;
    assert_eq!(status, 503);
    assert!(ready.to_string().contains("does not resolve"), "{ready}");
}

// ---------------------------------------------------------------------------------------------
// Finding 8: secrets in logs at debug and trace
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn at_trace_level_the_log_holds_no_key_or_token() {
    let mock = Mock::start().await;
    mock.key("secret-trace-key", "p1");
    let yaml = with_tenant(
        &pool_yaml(&mock.url(), &[("secret-trace-key", "p1")]),
        "alice",
        "tok-trace-alice",
    );
    let kg = Keygate::start_with_env(&yaml, &[("RUST_LOG", "trace")]);
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", Some("tok-trace-alice")).await;
    assert_eq!(status, 200);
    let resp = stream_sse_as(&kg.url(), "tok-trace-alice").await;
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    // A malformed request (a header line without a colon) carrying the token.
    let (status, _) = raw_http(
        kg.addr,
        b"POST /v1beta/models/x:generateContent HTTP/1.1\r\nx-goog-api-key: tok-trace-alice\r\nbroken header line\r\n\r\n",
    );
    assert_eq!(status, 400);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = kg.logs();
    assert!(logs.contains("keygate::access"), "{logs}");
    kg.assert_logs_clean(&["secret-trace-key", "tok-trace-alice"]);
}

async fn stream_sse_as(base: &str, token: &str) -> reqwest::Response {
    client()
        .post(format!(
            "{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        ))
        .header("x-goog-api-key", token)
        .body(prompt())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newline_in_a_model_cannot_forge_a_log_line() {
    let (_mock, kg) = one_key("").await;
    let body = r#"{"model":"gemini-2.5-flash\nINFO keygate::access] forged","messages":[]}"#;
    let resp = client()
        .post(format!("{}/v1beta/openai/chat/completions", kg.url()))
        .body(body)
        .send()
        .await
        .unwrap();
    resp.text().await.unwrap();
    let logs = kg.wait_for_log("chat/completions");
    assert!(
        !logs
            .lines()
            .any(|l| l.starts_with("INFO keygate::access] forged")),
        "{logs}"
    );
    assert!(logs.contains(r"\n"), "{logs}");
}

// ---------------------------------------------------------------------------------------------
// Finding 9: smaller holes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn every_spelling_of_the_key_parameter_is_stripped() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let kg = Keygate::start(&with_tenant(
        &pool_yaml(&mock.url(), &[("secret-k1", "p1")]),
        "alice",
        "tok-param-alice",
    ));
    for query in [
        "alt=json&KEY=tok-param-alice",
        "alt=json&%6Bey=tok-param-alice",
        "alt=json;key=tok-param-alice",
        "Key=tok-param-alice&alt=json",
        "k%65y=tok-param-alice",
    ] {
        let resp = post_prompt(&kg, query, &[("x-goog-api-key", "tok-param-alice")]).await;
        assert_eq!(resp.status(), 200, "{query}");
    }
    // The query alone authenticates too, in any spelling Google would read.
    let resp = client()
        .post(format!("{}{GENERATE}?%6Bey=tok-param-alice", kg.url()))
        .body(prompt())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for seen in mock.seen() {
        let query = seen.query.unwrap_or_default();
        assert!(!query.contains("tok-param-alice"), "forwarded: {query}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    kg.assert_logs_clean(&["tok-param-alice"]);
}

async fn upload_url_with(kg: &Keygate, forwarded_host: &str) -> String {
    let forwarded = [
        ("x-forwarded-host", forwarded_host),
        ("x-forwarded-proto", "https"),
    ];
    start_upload_with(kg, None, &forwarded).await
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_urls_trust_forwarded_headers_only_from_configured_proxies() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let pool = pool_yaml(&mock.url(), &[("secret-k1", "p1")]);
    let kg = Keygate::start(&pool);
    let url = upload_url_with(&kg, "evil.example").await;
    assert!(url.starts_with(&format!("{}/upload/", kg.url())), "{url}");
    let kg = Keygate::start(&format!("{pool}trusted_proxies: [\"127.0.0.1/32\"]\n"));
    let url = upload_url_with(&kg, "gw.internal").await;
    assert!(url.starts_with("https://gw.internal/upload/"), "{url}");
    let kg = Keygate::start(&format!(
        "{pool}public_url: \"https://ai.example.com/gemini\"\n"
    ));
    let url = upload_url_with(&kg, "evil.example").await;
    assert!(
        url.starts_with("https://ai.example.com/gemini/upload/v1beta/files?upload_id="),
        "{url}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn buffered_bodies_share_one_budget() {
    let (mock, kg) = one_key("client_limits:\n  max_buffered_body_bytes: 1000000\n").await;
    mock.delay(Duration::from_millis(1500));
    let big = format!(
        r#"{{"contents":[{{"parts":[{{"text":"{}"}}]}}]}}"#,
        "x".repeat(700_000)
    );
    let first = {
        let (url, big) = (kg.url(), big.clone());
        tokio::spawn(async move {
            client()
                .post(format!("{url}{GENERATE}"))
                .body(big)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = client()
        .post(format!("{}{GENERATE}", kg.url()))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(first.await.unwrap(), 200);
    // Once the first is done, the budget is back.
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_models_google_served_become_metric_labels() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let (kg, admin) = start_with_admin(&pool_yaml(&mock.url(), &[("secret-k1", "p1")]));
    let not_found =
        r#"{"error":{"code":404,"message":"models/x is not found.","status":"NOT_FOUND"}}"#;
    mock.respond_next(None, 20, 404, not_found);
    for i in 0..20 {
        let (status, _, _) = generate(&kg.url(), &format!("junk-model-{i}"), None).await;
        assert_eq!(status, 404);
    }
    let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 200);
    // A request is counted just after its answer is sent: wait (bounded) for the last one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let resp = client()
            .get(format!("{admin}/metrics"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        if text.contains("model=\"gemini-2.5-flash\"") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!text.contains("junk-model"), "{text}");
    assert!(text.contains("model=\"gemini-2.5-flash\""), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_too_large_to_read_whole_is_classified_on_its_prefix() {
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1").key("secret-k2", "p2");
    let kg = Keygate::start(&pool_yaml(
        &mock.url(),
        &[("secret-k1", "p1"), ("secret-k2", "p2")],
    ));
    let padding = "y".repeat(100 * 1024);
    let huge = per_minute_429("gemini-2.5-flash", "30s").replace(
        r#""links":[{"description":"Learn more about Gemini API quotas""#,
        &format!(r#""links":[{{"description":"{padding}""#),
    );
    assert!(huge.len() > 100 * 1024);
    mock.respond_next(None, 1, 429, &huge);
    // The key that gets the huge 429 is not the last word: the request is served by the other
    // project, and the refusing project cools (the next requests go to the other one only).
    let (status, _, body) = generate(&kg.url(), "gemini-2.5-flash", None).await;
    assert_eq!(status, 200, "{body}");
    let keys = mock.keys_seen();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let refused = keys[0].clone();
    for _ in 0..3 {
        let (status, _, _) = generate(&kg.url(), "gemini-2.5-flash", None).await;
        assert_eq!(status, 200);
    }
    assert!(mock.keys_seen()[2..].iter().all(|k| *k != refused));
}

// ---------------------------------------------------------------------------------------------
// Found by an adversarial review of the fixes above (each reproduced against them first)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn with_tenants_only_endpoints_keygate_can_police_are_forwarded() {
    let (mock, kg) = split_pools().await;
    let bob = [("x-goog-api-key", "tok-bob")];
    // An interaction is routed by the model in its body, which bob's pools do not serve, and
    // one keygate never saw is refused; File Search stores, generated files and the like are
    // resources keygate does not track: none may reach Google for a tenant.
    for (method, path, body) in [
        (
            "POST",
            "/v1beta/interactions",
            r#"{"model":"gemini-2.5-pro","input":"hi"}"#,
        ),
        ("GET", "/v1beta/interactions/abc", ""),
        ("GET", "/v1beta/fileSearchStores", ""),
        ("GET", "/v1beta/fileSearchStores/alice-store/documents", ""),
        ("GET", "/v1beta/generatedFiles", ""),
        (
            "POST",
            "/v1beta/models/gemini-2.5-flash:generateAnswer",
            "{}",
        ),
        ("POST", "/v1beta/openai/files", "{}"),
    ] {
        let request = if method == "GET" {
            raw_get(path, &bob)
        } else {
            raw_post(path, &bob, body)
        };
        let (status, text) = raw_http(kg.addr, &request);
        assert_eq!(status, 403, "{method} {path}: {text}");
    }
    // A File Search store named in a generateContent is a resource keygate does not know.
    let tools = r#"{"contents":[{"parts":[{"text":"hi"}]}],"tools":[{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/alice-store"]}}]}"#;
    let (status, text) = raw_http(
        kg.addr,
        &raw_post(
            "/v1beta/models/gemini-2.5-flash:generateContent",
            &bob,
            tools,
        ),
    );
    assert_eq!(status, 403, "{text}");
    // A body Google would read otherwise than keygate: protobuf, or compressed.
    for header in [
        ("Content-Type", "application/x-protobuf"),
        ("Content-Encoding", "gzip"),
    ] {
        let headers = [bob[0], header];
        let (status, text) = raw_http(kg.addr, &raw_post(GENERATE, &headers, &prompt()));
        assert_eq!(status, 415, "{header:?}: {text}");
    }
    // A Live session names its model inside the session: bob, held to the flash pool (which
    // lists its models), may not open one.
    let (status, text) = raw_http(
        kg.addr,
        b"GET /ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent HTTP/1.1\r\nHost: k\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nx-goog-api-key: tok-bob\r\n\r\n",
    );
    assert_eq!(status, 403, "{text}");
    assert!(
        mock.seen().is_empty(),
        "{:?}",
        mock.seen().iter().map(|s| &s.path).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn overrides_and_system_parameters_do_not_reach_google() {
    let (mock, yaml) = team(&[("secret-k1", "p1")], &["alice", "bob"]).await;
    let kg = Keygate::start(&yaml);
    upload_file(&kg, "tok-alice").await;
    // POST with a method override would make Google list the project's files unfiltered.
    let resp = client()
        .post(format!("{}/v1beta/files", kg.url()))
        .header("x-goog-api-key", "tok-bob")
        .header("x-http-method-override", "GET")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(!text.contains("notes"), "{text}");
    // Case does not hide a listing.
    let (status, text) = get_as(&kg, "/v1beta/FILES", "tok-bob").await;
    assert!(!text.contains("mockfile"), "{status}: {text}");
    // `$key`, `$httpMethod`, `$ct`, access tokens: never forwarded (or logged).
    let resp = post_prompt(
        &kg,
        "%24key=tok-bob&$httpMethod=GET&%24ct=application%2Fx-protobuf&access_token=ya29.made-up",
        &[],
    )
    .await;
    assert_eq!(resp.status(), 200, "$key authenticates too");
    for seen in mock.seen() {
        let query = seen.query.clone().unwrap_or_default();
        for gone in ["key", "httpMethod", "ct=", "access_token"] {
            assert!(!query.contains(gone), "forwarded {query}");
        }
        assert!(!seen.headers.contains_key("x-http-method-override"));
        let encoding = seen
            .headers
            .get("accept-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        assert!(
            matches!(encoding.as_deref(), Some("gzip" | "identity")),
            "{encoding:?}: {seen:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    kg.assert_logs_clean(&["tok-bob", "ya29.made-up"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_in_an_encoding_keygate_cannot_read_is_withheld() {
    let (mock, kg) = one_key("").await;
    // Whatever the client accepts, keygate asks Google for gzip or nothing; an answer in
    // another encoding (which it cannot check for keys) is not relayed.
    let quoting = r#"{"error":{"code":400,"message":"Bad value for api_key:secret-k1","status":"INVALID_ARGUMENT"}}"#;
    mock.respond_next_with(None, 1, 400, quoting, &[("content-encoding", "br")]);
    let resp = post_prompt(&kg, "", &[("accept-encoding", "br, deflate")]).await;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 400, "{text}");
    assert_eq!(
        mock.seen()[0].headers["accept-encoding"],
        "identity",
        "keygate asks for gzip or nothing"
    );
    assert_no_key(&text, &["secret-k1"]);
    assert!(text.contains("keygate"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chosen_name_cannot_take_over_another_tenants_resource() {
    let (mock, kg, _admin) = team_with_admin().await;
    let name = upload_name(&kg, "tok-alice").await;
    let before = mock.uploads_started();
    let resp = client()
        .post(format!("{}/upload/v1beta/files", kg.url()))
        .header("x-goog-api-key", "tok-bob")
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"file":{{"name":"{name}","display_name":"mine now"}}}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "{}", resp.text().await.unwrap());
    assert_eq!(mock.uploads_started(), before);
    let (status, body) = post_as(&kg, GENERATE, "tok-alice", body_with_file(&name)).await;
    assert_eq!(status, 200, "alice lost her file: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn coding_tool_traffic_mentioning_files_goes_through() {
    let (_mock, kg, _admin) = team_with_admin().await;
    let body = r#"{"contents":[
        {"role":"user","parts":[{"text":"See https://github.com/org/repo/blob/v1.2.0/files/setup.py and https://api.openai.com/v1/batches/batch_abc"}]},
        {"role":"model","parts":[{"functionCall":{"name":"read_file","args":{"fileName":"files/logo.png","file_name":"C:\\proj\\files\\data.csv"}}}]},
        {"role":"user","parts":[{"functionResponse":{"name":"read_file","response":{"fileUri":"files/x","content":"..."}}}]}],
        "tools":[{"functionDeclarations":[{"name":"read_file","parameters":{"type":"object","properties":{"fileName":{"type":"string"},"model":{"type":"string"}}}}]}]}"#;
    let (status, text) = post_as(&kg, GENERATE, "tok-bob", body.to_string()).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_video_can_be_downloaded_by_its_tenant_only() {
    let (mock, kg, _admin) = team_with_admin().await;
    let (status, op) = post_as(
        &kg,
        "/v1beta/models/veo-3.0-generate-preview:predictLongRunning",
        "tok-alice",
        r#"{"instances":[{"prompt":"a fox"}]}"#.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{op}");
    let op: Value = serde_json::from_str(&op).unwrap();
    let op_path = format!("/v1beta/{}", op["name"].as_str().unwrap());
    let (status, done) = get_as(&kg, &op_path, "tok-alice").await;
    assert_eq!(status, 200, "{done}");
    let done: Value = serde_json::from_str(&done).unwrap();
    let uri = done["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]
        .as_str()
        .unwrap()
        .to_string();
    let path = uri
        .split_once("/v1beta/")
        .map(|(_, p)| format!("/v1beta/{p}"))
        .unwrap();
    let (status, bytes) = get_as(&kg, &path, "tok-alice").await;
    assert_eq!(status, 200, "{bytes}");
    assert_eq!(bytes, "mock video bytes");
    let (status, _) = get_as(&kg, &path, "tok-bob").await;
    assert_eq!(status, 403);
    let (status, _) = get_as(&kg, &op_path, "tok-bob").await;
    assert_eq!(status, 403);
    assert!(mock.seen().iter().all(|s| s.status == 200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_from_an_input_file_is_refused_for_tenants() {
    let (mock, kg, _admin) = team_with_admin().await;
    let file = upload_file(&kg, "tok-alice").await;
    let before = mock.seen().len();
    let body = format!(
        r#"{{"batch":{{"display_name":"b","input_config":{{"file_name":"{}"}}}}}}"#,
        file["name"].as_str().unwrap()
    );
    let (status, text) = post_as(
        &kg,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        "tok-alice",
        body,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("inline"), "{text}");
    assert_eq!(mock.seen().len(), before);
}

// ---------------------------------------------------------------------------------------------
// Found by a second adversarial review (each reproduced against the fixes above first)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_body_must_be_strict_json() {
    let (mock, kg, _admin) = team_with_admin().await;
    let name = upload_name(&kg, "tok-alice").await;
    let id = name.trim_start_matches("files/").to_string();
    let before = mock.seen().len();
    // Forms Google's lenient parser may take, each hiding alice's file from a strict reading;
    // and a body nested deeper than any request needs (reading it cost seconds of CPU).
    let nested = format!(r#"{}"x"{}"#, r#"{"contents":"#.repeat(200), "}".repeat(200));
    for body in [
        format!(r#"{{contents:[{{parts:[{{fileData:{{fileUri:"{name}"}}}}]}}]}}"#),
        format!(r#"{{'contents':[{{'parts':[{{'fileData':{{'fileUri':'{name}'}}}}]}}]}}"#),
        body_with_file(&format!(r"\U0066iles/{id}")),
        format!(r#"{{"contents":[{{"parts":[{{"fileData":{{"fileUri":"{name}"}}}}]}}],}}"#),
        nested,
    ] {
        let (status, text) = post_as(&kg, GENERATE, "tok-bob", body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains("strict JSON"), "{text}");
    }
    // A cache whose model a lenient parser would read, a strict one not.
    let (status, text) = post_as(
        &kg,
        "/v1beta/cachedContents",
        "tok-bob",
        r#"{'model':'models/gemini-2.5-pro','contents':[]}"#.to_string(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(mock.seen().len(), before, "reached upstream");
    // Strict JSON goes through as before.
    let (status, text) = post_as(&kg, GENERATE, "tok-alice", body_with_file(&name)).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_does_not_lift_a_tenants_model_restriction() {
    let (mock, kg) = split_pools().await;
    let name = upload_name(&kg, "tok-bob").await;
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    let flash = "/v1beta/models/gemini-2.5-flash:generateContent";
    let (status, text) = post_as(&kg, flash, "tok-bob", body_with_file(&name)).await;
    assert_eq!(status, 200, "{text}");
    let before = mock.seen().len();
    let (status, text) = post_as(&kg, pro, "tok-bob", body_with_file(&name)).await;
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("does not serve model 'gemini-2.5-pro'"),
        "{text}"
    );
    // A tuned model names its model as baseModel.
    let (status, text) = post_as(
        &kg,
        "/v1beta/tunedModels",
        "tok-bob",
        r#"{"baseModel":"models/gemini-2.5-pro","tuningTask":{}}"#.to_string(),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert_eq!(mock.seen().len(), before, "reached upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_content_encoding_or_type_header_is_refused() {
    use std::io::Write as _;
    let (mock, kg, _admin) = team_with_admin().await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(prompt().as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    for headers in [
        "Content-Type: application/json\r\nContent-Encoding: identity\r\nContent-Encoding: gzip\r\n",
        "Content-Type: application/json\r\nContent-Type: application/x-protobuf\r\n",
    ] {
        let mut req = format!(
            "POST {GENERATE} HTTP/1.1\r\nHost: k\r\nConnection: close\r\nx-goog-api-key: tok-bob\r\nContent-Length: {}\r\n{headers}\r\n",
            gz.len()
        )
        .into_bytes();
        req.extend_from_slice(&gz);
        let (status, text) = raw_http(kg.addr, &req);
        assert_eq!(status, 415, "{headers}: {text}");
    }
    assert!(mock.seen().is_empty(), "reached upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_session_cannot_name_another_tenants_file() {
    use futures_util::{SinkExt, StreamExt};
    let mock = Mock::start().await;
    mock.key("secret-k1", "p1");
    let yaml = format!(
        "{}{}",
        pool_yaml(&mock.url(), &[("secret-k1", "p1")]),
        tenants_of(&[("alice", None), ("bob", None)])
    );
    let kg = Keygate::start(&yaml);
    let alices = upload_name(&kg, "tok-alice").await;
    let bobs = upload_name(&kg, "tok-bob").await;
    let mut ws = live_session(&kg, "tok-bob").await;
    let turn = |file: &str| {
        format!(
            r#"{{"clientContent":{{"turns":[{{"role":"user","parts":[{{"fileData":{{"fileUri":"{file}"}}}}]}}],"turnComplete":true}}}}"#
        )
    };
    // Bob's own file goes through, in a text or a binary frame.
    ws.send(Message::text(turn(&bobs))).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert!(echo.to_text().unwrap().contains(&bobs), "{echo:?}");
    ws.send(Message::binary(turn(&bobs).into_bytes()))
        .await
        .unwrap();
    assert!(ws.next().await.unwrap().unwrap().is_binary());
    // Alice's ends the session before it reaches Google.
    ws.send(Message::text(turn(&alices))).await.unwrap();
    let (code, reason) = closed_with(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
    assert!(reason.contains(&alices), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reading_a_batch_does_not_bind_names_its_requests_smuggled_in() {
    let (mock, kg, admin) = team_with_admin().await;
    mock.respond_next_with(
        None,
        1,
        200,
        r#"{"name":"batches/bobbatch1","metadata":{}}"#,
        &[],
    );
    let create = r#"{"batch":{"displayName":"b","inputConfig":{"requests":{"requests":[{"request":{"contents":[{"parts":[{"text":"hi"}]}]},"metadata":{"uri":"files/premade1"}}]}}}}"#;
    let (status, text) = post_as(
        &kg,
        "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
        "tok-bob",
        create.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (_, list) = admin_call("GET", &admin, "/admin/resources", None).await;
    let project = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "batches/bobbatch1")
        .map(|r| r["project"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{list}"));
    // A file of that project keygate does not know (made before keygate, or forgotten).
    let victim = mock.make_file(&project);
    assert_eq!(victim, "files/premade1");
    // Google's answer echoes the inline request's metadata, and the model's text.
    mock.respond_next_with(
        None,
        1,
        200,
        r#"{"name":"batches/bobbatch1","done":true,"metadata":{"output":{"inlinedResponses":{"inlinedResponses":[{"response":{"candidates":[{"content":{"parts":[{"text":"https://generativelanguage.googleapis.com/v1beta/files/premade1"}]}}]},"metadata":{"uri":"files/premade1"}}]}}}}"#,
        &[],
    );
    let (status, text) = get_as(&kg, "/v1beta/batches/bobbatch1", "tok-bob").await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&victim)).await;
    assert_eq!(status, 403, "{text}");
    let (_, list) = admin_call("GET", &admin, "/admin/resources", None).await;
    assert!(!list.to_string().contains("premade1"), "{list}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_anywhere_in_a_reference_field_is_read() {
    let (mock, kg, _admin) = team_with_admin().await;
    let name = upload_name(&kg, "tok-alice").await;
    let before = mock.seen().len();
    for spelt in [
        format!("generativelanguage.googleapis.com/v1beta/{name}"),
        format!("//generativelanguage.googleapis.com/v1beta/{name}"),
        format!("projects/p/{name}"),
        format!("x/{name}"),
    ] {
        let (status, text) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&spelt)).await;
        assert_eq!(status, 403, "{spelt}: {text}");
    }
    assert_eq!(mock.seen().len(), before, "reached upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_gives_back_its_body_memory_and_is_dropped() {
    let (mock, kg) =
        one_key("client_limits:\n  max_buffered_body_bytes: 1000000\n  send_timeout_seconds: 2\n")
            .await;
    let answer_len = 16 << 20;
    let big_answer = format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{}"}}]}}}}]}}"#,
        "x".repeat(answer_len)
    );
    mock.respond_next_with(None, 1, 200, &big_answer, &[]);
    let body = format!(
        r#"{{"contents":[{{"parts":[{{"text":"{}"}}]}}]}}"#,
        "y".repeat(700_000)
    );
    // A client that sends its request and then reads nothing.
    let mut stalled = TcpStream::connect(kg.addr).unwrap();
    let req = raw_post(GENERATE, &[], &body);
    stalled.write_all(&req).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Its 700 KB body no longer counts against the 1 MB budget.
    let (status, text) = post_as(&kg, GENERATE, "", body.clone()).await;
    assert_eq!(status, 200, "{text}");
    // And after send_timeout_seconds of not reading, keygate gave up on it: what it can still
    // read ends before the answer does.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    let read = stalled.read_to_end(&mut got);
    assert!(read.is_ok(), "no end of connection: {read:?}");
    assert!(got.len() < answer_len, "read {} bytes", got.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_query_carries_only_parameters_keygate_knows() {
    let (mock, kg, _admin) = team_with_admin().await;
    for query in [
        "cachedContent=cachedContents/someone",
        "generateContentRequest.cachedContent=cachedContents/x",
        "alt=proto",
        "%61lt=sse",
        "fields=candidates",
        "callback=f",
        "alt=sse&alt=json",
    ] {
        let (status, text) =
            post_as(&kg, &format!("{GENERATE}?{query}"), "tok-bob", prompt()).await;
        assert_eq!(status, 400, "{query}: {text}");
    }
    // A tuned model's id chosen in another spelling is not checked by name: refused.
    let (status, text) = post_as(
        &kg,
        "/v1beta/tunedModels?tuned_model_id=t1",
        "tok-bob",
        r#"{"baseModel":"models/gemini-2.5-flash"}"#.to_string(),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // Uploads go by the resumable protocol, whose metadata keygate reads.
    let resp = client()
        .post(format!("{}/upload/v1beta/files", kg.url()))
        .header("x-goog-api-key", "tok-bob")
        .header("x-goog-upload-protocol", "multipart")
        .header("content-type", "multipart/related; boundary=b")
        .body("--b\r\nContent-Type: application/json\r\n\r\n{\"file\":{\"name\":\"files/x\"}}\r\n--b--\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(mock.seen().is_empty(), "reached upstream");
    // What the SDKs send goes through.
    let (status, text) = post_as(
        &kg,
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        "tok-bob",
        prompt(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = get_as(&kg, "/v1beta/files?pageSize=10", "tok-bob").await;
    assert_eq!(status, 200, "{text}");
}

// ---------------------------------------------------------------------------------------------
// Found by a third adversarial review (each reproduced against the fixes above first)
// ---------------------------------------------------------------------------------------------

const LIVE_PATH: &str =
    "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

/// A tenant's Live session on `kg`, set up (its first message answered).
async fn live_session(kg: &Keygate, token: &str) -> WsStream {
    let url = format!("ws://{}{LIVE_PATH}", kg.addr);
    live_set_up(&url, &[("x-goog-api-key", token)]).await
}

/// The close code and reason keygate ends `ws` with, within `patience`.
async fn closed_with(ws: &mut WsStream, patience: Duration) -> (u16, String) {
    use futures_util::StreamExt;
    match tokio::time::timeout(patience, ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => {
            (u16::from(frame.code), frame.reason.to_string())
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// The first fragment of a text message, never finished.
fn unfinished_message(len: usize) -> Message {
    use tokio_tungstenite::tungstenite::protocol::frame::{coding, Frame};
    let data = format!(
        r#"{{"clientContent":{{"turns":[{{"parts":[{{"text":"{}"#,
        "x".repeat(len)
    );
    Message::Frame(Frame::message(
        data.into_bytes(),
        coding::OpCode::Data(coding::Data::Text),
        false,
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_message_in_progress_counts_against_the_body_budget_and_has_a_deadline() {
    use futures_util::SinkExt;
    let (_mock, kg) = one_key(
        "client_limits:\n  max_buffered_body_bytes: 1000000\n  body_timeout_seconds: 1\ntenants:\n  - name: app\n    token: tok-app\n",
    )
    .await;
    let mut first = live_session(&kg, "tok-app").await;
    first.send(unfinished_message(800_000)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A second message that would pass the budget ends its session ("try again later").
    let mut second = live_session(&kg, "tok-app").await;
    second.send(unfinished_message(800_000)).await.unwrap();
    assert_eq!(
        closed_with(&mut second, Duration::from_secs(5)).await.0,
        1013
    );
    // And a message that never completes is cut like a stalled request body.
    let (code, reason) = closed_with(&mut first, Duration::from_secs(5)).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("too slowly"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_opens_only_the_live_service_with_known_parameters() {
    let (mock, kg, _admin) = team_with_admin().await;
    for path in [
        "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic".to_string(),
        format!("{LIVE_PATH}?alt=proto"),
        format!("{LIVE_PATH}?cachedContent=cachedContents/x"),
    ] {
        let url = format!("ws://{}{path}", kg.addr);
        let refused = ws_connect(&url, &[("x-goog-api-key", "tok-bob")]).await;
        let why = refused.err().unwrap_or_default();
        assert!(why.starts_with("403"), "{path}: {why}");
    }
    assert!(mock.seen().is_empty(), "reached upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_cannot_patch_a_resource_onto_another_model() {
    let (mock, kg) = split_pools().await;
    let (status, cache) = post_as(
        &kg,
        "/v1beta/cachedContents",
        "tok-bob",
        r#"{"model":"models/gemini-2.5-flash","contents":[{"role":"user","parts":[{"text":"x"}]}]}"#
            .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{cache}");
    let name = serde_json::from_str::<Value>(&cache).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let before = mock.seen().len();
    let patch = |query: &str, body: &str| {
        let url = format!("{}/v1beta/{name}{query}", kg.url());
        let body = body.to_string();
        async move {
            let resp = client()
                .patch(url)
                .header("x-goog-api-key", "tok-bob")
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    for (query, body) in [
        ("?updateMask=model", r#"{"model":"models/gemini-2.5-pro"}"#),
        ("", r#"{"model":"models/gemini-2.5-pro","ttl":"60s"}"#),
        ("?updateMask=ttl,contents", r#"{"ttl":"60s"}"#),
    ] {
        let (status, text) = patch(query, body).await;
        assert_eq!(status, 400, "{query} {body}: {text}");
    }
    assert_eq!(mock.seen().len(), before, "reached upstream");
    // Its expiry is the tenant's to change.
    let (status, text) = patch("?updateMask=ttl", r#"{"ttl":"60s"}"#).await;
    assert_ne!(status, 400, "{text}");
    assert_eq!(mock.seen().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn header_forms_of_answer_shaping_parameters_do_not_reach_google() {
    let (mock, kg) = one_key("").await;
    let resp = post_prompt(
        &kg,
        "",
        &[
            ("X-Goog-FieldMask", "candidates"),
            ("X-Goog-Api-Format-Version", "2"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = &mock.seen()[0];
    assert!(!seen.headers.contains_key("x-goog-fieldmask"), "{seen:?}");
    assert!(
        !seen.headers.contains_key("x-goog-api-format-version"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_behind_a_dot_segment_or_in_openai_file_parts_are_read() {
    let (mock, kg, _admin) = team_with_admin().await;
    let alices = upload_name(&kg, "tok-alice").await;
    let bobs = upload_name(&kg, "tok-bob").await;
    let before = mock.seen().len();
    let hidden = format!("{alices}/../{}", bobs.trim_start_matches("files/"));
    let (status, text) = post_as(&kg, GENERATE, "tok-bob", body_with_file(&hidden)).await;
    assert_eq!(status, 403, "{hidden}: {text}");
    for part in [
        format!(r#"{{"type":"file","file":{{"file_id":"{alices}"}}}}"#),
        format!(r#"{{"type":"image_url","image_url":{{"url":"{alices}"}}}}"#),
    ] {
        let body = format!(
            r#"{{"model":"gemini-2.5-flash","messages":[{{"role":"user","content":[{part}]}}]}}"#
        );
        let (status, text) = post_as(&kg, "/v1beta/openai/chat/completions", "tok-bob", body).await;
        assert_eq!(status, 403, "{part}: {text}");
    }
    assert_eq!(mock.seen().len(), before, "reached upstream");
}
