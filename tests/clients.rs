//! keygate for every client and network: browser pages (CORS), pools behind outbound proxies,
//! the Live API over WebSockets, OpenAI-style base URLs. All against the Rust mock Gemini and
//! proxies the tests start themselves.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

const PAGE: &str = "https://app.example.com";

fn cors_yaml(mock: &Mock) -> String {
    format!(
        "{}cors:\n  allowed_origins: [\"{PAGE}\"]\n",
        with_tenant(&pool_yaml(&mock.url(), &[("k1", "p1")]), "web", "web-token")
    )
}

async fn preflight(kg: &Keygate, origin: &str) -> reqwest::Response {
    client()
        .request(
            reqwest::Method::OPTIONS,
            format!(
                "{}/v1beta/models/gemini-2.5-flash:generateContent",
                kg.url()
            ),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "x-goog-api-key, content-type",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn preflights_are_answered_by_keygate_for_allowed_origins_only() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let kg = Keygate::start(&cors_yaml(&mock));

    // No token needed, nothing forwarded, nothing counted.
    let ok = preflight(&kg, PAGE).await;
    assert_eq!(ok.status(), 204);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], PAGE);
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "x-goog-api-key",
        "authorization",
        "content-type",
        "x-goog-upload-command",
    ] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));

    let refused = preflight(&kg, "https://evil.example").await;
    assert_eq!(refused.status(), 403);
    assert!(!refused
        .headers()
        .contains_key("access-control-allow-origin"));
    assert!(mock.seen().is_empty(), "preflights never reach Google");
    assert!(kg
        .wait_for_log(
            "\"OPTIONS /v1beta/models/gemini-2.5-flash:generateContent\" model=- status=403"
        )
        .contains("status=204"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_can_read_retry_after_and_keygates_own_errors() {
    let mock = Mock::start().await;
    mock.key("k1", "p1")
        .per_minute_limit("p1", "gemini-2.5-pro", 0, "30s");
    let kg = Keygate::start(&cors_yaml(&mock));
    let page_request = |model: &str, token: &str| {
        client()
            .post(format!(
                "{}/v1beta/models/{model}:generateContent",
                kg.url()
            ))
            .header("origin", PAGE)
            .header("x-goog-api-key", token.to_string())
            .body(prompt())
            .send()
    };
    // The pool runs dry: 429 with a Retry-After the page is allowed to read.
    page_request("gemini-2.5-pro", "web-token").await.unwrap();
    let resp = page_request("gemini-2.5-pro", "web-token").await.unwrap();
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], PAGE);
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    assert!(
        exposed.contains("retry-after") && exposed.contains("x-goog-upload-url"),
        "{exposed}"
    );
    assert!(h.contains_key("retry-after"));
    // A relayed success and keygate's own 401 carry the headers too.
    let ok = page_request("gemini-2.5-flash", "web-token").await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["access-control-allow-origin"], PAGE);
    let denied = page_request("gemini-2.5-flash", "wrong-token")
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.headers()["access-control-allow-origin"], PAGE);
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_is_off_unless_configured() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let kg = Keygate::start(&with_tenant(
        &pool_yaml(&mock.url(), &[("k1", "p1")]),
        "web",
        "web-token",
    ));
    let resp = preflight(&kg, PAGE).await;
    assert_eq!(
        resp.status(),
        401,
        "a preflight is an ordinary request then"
    );
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    // A page's request is not forwarded with its Origin: Google must not grant it access to
    // keygate's answers with CORS headers of its own.
    let resp = client()
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:generateContent",
            kg.url()
        ))
        .header("origin", PAGE)
        .header("referer", format!("{PAGE}/chat"))
        .header("x-goog-api-key", "web-token")
        .body(prompt())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("access-control-allow-origin"));
    let seen = &mock.seen()[0];
    assert!(!seen.headers.contains_key("origin") && !seen.headers.contains_key("referer"));
}

/// A pool named `name` that reaches `mock` through `proxy` with credentials from `env_var`.
fn proxied_pool(name: &str, mock: &Mock, proxy: &str, env_var: &str, key: &str) -> String {
    format!(
        "  - name: {name}\n    upstream: \"{}\"\n    proxy: \"{proxy}\"\n    proxy_auth_env: {env_var}\n    models: [\"{name}-*\"]\n    keys: [{{key: {key}, project: p-{name}}}]\n",
        mock.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_reach_google_through_connect_and_socks5_proxies() {
    let mock = Mock::start().await;
    mock.key("corp-key", "p-corp").key("tor-key", "p-tor");
    let connect = start_connect_proxy(Some(("alice", "proxy-pass-1"))).await;
    let socks = start_socks5(Some(("bob", "proxy-pass-2"))).await;
    let yaml = format!(
        "pools:\n{}{}",
        proxied_pool(
            "corp",
            &mock,
            &connect.url("http"),
            "CORP_PROXY_AUTH",
            "corp-key"
        ),
        proxied_pool(
            "tor",
            &mock,
            &socks.url("socks5"),
            "TOR_PROXY_AUTH",
            "tor-key"
        ),
    );
    let kg = Keygate::start_with_env(
        &yaml,
        &[
            ("CORP_PROXY_AUTH", "alice:proxy-pass-1"),
            ("TOR_PROXY_AUTH", "bob:proxy-pass-2"),
        ],
    );
    for _ in 0..3 {
        let (status, _, body) = generate(&kg.url(), "corp-model", None).await;
        assert_eq!(
            (status, body.contains("hello from p-corp")),
            (200, true),
            "{body}"
        );
        let (status, _, body) = generate(&kg.url(), "tor-model", None).await;
        assert_eq!(
            (status, body.contains("hello from p-tor")),
            (200, true),
            "{body}"
        );
    }
    let target = mock.addr.to_string();
    assert!(
        connect.targets().iter().all(|t| *t == target),
        "{:?}",
        connect.targets()
    );
    assert!(
        socks.targets().iter().all(|t| *t == target),
        "{:?}",
        socks.targets()
    );
    // Connections through the tunnels are reused like any other.
    assert!(connect.connections() <= 2, "{}", connect.connections());
    assert!(socks.connections() <= 2, "{}", socks.connections());
    assert_eq!(connect.auth_failures() + socks.auth_failures(), 0);
    kg.assert_logs_clean(&["proxy-pass-1", "proxy-pass-2", "corp-key", "tor-key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_or_refusing_proxy_is_a_502_naming_the_pool_and_no_key_is_blamed() {
    let mock = Mock::start().await;
    mock.key("corp-key", "p-corp");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let refusing = start_connect_proxy(Some(("alice", "right-pass"))).await;
    let yaml = format!(
        "retry:\n  backoff_ms: 10\npools:\n{}{}",
        proxied_pool(
            "corp",
            &mock,
            &format!("http://{dead}"),
            "CORP_PROXY_AUTH",
            "corp-key"
        ),
        proxied_pool(
            "lab",
            &mock,
            &refusing.url("http"),
            "LAB_PROXY_AUTH",
            "corp-key"
        ),
    );
    let kg = Keygate::start_with_env(
        &yaml,
        &[
            ("CORP_PROXY_AUTH", "alice:whatever"),
            ("LAB_PROXY_AUTH", "alice:wrong-pass"),
        ],
    );
    let (status, _, body) = generate(&kg.url(), "corp-model", None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains(&format!("the proxy of pool 'corp' (http://{dead}) failed")),
        "{body}"
    );
    let (status, _, body) = generate(&kg.url(), "lab-model", None).await;
    assert_eq!(status, 502, "{body}");
    assert!(
        body.contains("the proxy of pool 'lab'") && body.contains("407"),
        "{body}"
    );
    assert!(refusing.auth_failures() >= 1);
    assert!(mock.seen().is_empty());
    // A proxy failure is a connect error: no key is disabled for it.
    assert!(!kg.logs().contains("disabling"), "{}", kg.logs());
    kg.assert_logs_clean(&["wrong-pass", "whatever", "corp-key"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_style_paths_map_onto_googles_openai_endpoint() {
    let mock = Mock::start().await;
    mock.key("k1", "p1");
    let kg = Keygate::start(&pool_yaml(&mock.url(), &[("k1", "p1")]));
    for path in ["/v1/chat/completions", "/chat/completions"] {
        let resp = client()
            .post(format!("{}{path}", kg.url()))
            .bearer_auth("anything")
            .body(r#"{"model":"gemini-2.5-flash","messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("chat.completion"));
    }
    for path in ["/v1/embeddings", "/embeddings"] {
        let resp = client()
            .post(format!("{}{path}", kg.url()))
            .bearer_auth("anything")
            .body(r#"{"model":"text-embedding-004","input":"hi"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The native model listing keeps its meaning for Gemini SDKs (x-goog-api-key).
    let native = client()
        .get(format!("{}/v1/models", kg.url()))
        .header("x-goog-api-key", "anything")
        .send()
        .await
        .unwrap();
    assert_eq!(native.status(), 200);
    let paths: Vec<String> = mock.seen().iter().map(|s| s.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1beta/openai/chat/completions",
            "/v1beta/openai/chat/completions",
            "/v1beta/openai/embeddings",
            "/v1beta/openai/embeddings",
            "/v1/models",
        ]
    );
    // The body went through untouched, with the pool key as a bearer token.
    let first = &mock.seen()[0];
    assert_eq!(first.headers["authorization"], "Bearer k1");
    assert!(String::from_utf8_lossy(&first.body).contains("\"messages\""));
}

const LIVE: &str = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

fn ws_url(kg: &Keygate, path: &str) -> String {
    format!("ws://{}{path}", kg.addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_api_session_relays_frames_on_one_pool_key() {
    use futures_util::{SinkExt, StreamExt};
    let mock = Mock::start().await;
    mock.key("live-key-1", "p1").key("live-key-2", "p2");
    // p1 refuses the upgrade (out of quota): the session moves to p2 before the switch.
    mock.per_minute_limit("p1", "live", 0, "30s");
    let kg = Keygate::start(&with_tenant(
        &pool_yaml(&mock.url(), &[("live-key-1", "p1"), ("live-key-2", "p2")]),
        "app",
        "live-tenant-token",
    ));
    // The JS SDK sends the key as ?key=, the Python SDK as x-goog-api-key: both work.
    for (url, headers) in [
        (
            format!("{}?key=live-tenant-token", ws_url(&kg, LIVE)),
            vec![],
        ),
        (
            ws_url(&kg, &LIVE.replace("v1beta", "v1alpha")),
            vec![("x-goog-api-key", "live-tenant-token")],
        ),
    ] {
        let mut ws = live_set_up(&url, &headers).await;
        for i in 0..3 {
            let sent = format!(r#"{{"clientContent":{i}}}"#);
            ws.send(Message::text(sent.clone())).await.unwrap();
            let echo = ws.next().await.unwrap().unwrap();
            let reply: serde_json::Value = serde_json::from_str(echo.to_text().unwrap()).unwrap();
            let text = reply["serverContent"]["modelTurn"]["parts"][0]["text"]
                .as_str()
                .unwrap();
            assert_eq!(text, format!("echo from p2: {sent}"));
        }
        // A message may come as a binary frame too (it is JSON all the same).
        let binary = br#"{"realtimeInput":{"audio":{"data":"AAEC"}}}"#.to_vec();
        ws.send(Message::binary(binary.clone())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap().into_data().to_vec(),
            binary
        );
        ws.close(None).await.unwrap();
    }
    assert_eq!(mock.ws_sessions(), 2);
    // The tenant token never reached the mock; the pool keys did.
    for s in mock.seen() {
        assert!(
            !format!("{:?}{:?}", s.headers, s.query).contains("live-tenant-token"),
            "{s:?}"
        );
        assert!(
            s.key.as_deref().is_some_and(|k| k.starts_with("live-key-")),
            "{s:?}"
        );
    }
    let statuses: Vec<u16> = mock.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [429, 101, 101], "p1 refused once, then cooled");
    // A wrong token is refused before anything goes upstream.
    let refused = ws_connect(&format!("{}?key=wrong", ws_url(&kg, LIVE)), &[]).await;
    assert!(refused.unwrap_err().starts_with("401"));
    assert_eq!(mock.seen().len(), 3);
    kg.assert_logs_clean(&["live-tenant-token", "live-key-1", "live-key-2"]);
}
