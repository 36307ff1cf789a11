//! What users bring from the rotators they leave: model aliases (LiteLLM's deployment names),
//! an upstream under a base path with headers of its own (a Cloudflare AI Gateway relay, as the
//! Worker rotator uses), and numbered key variables (the Supabase setup).

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::Value;

const TENANT: &str = "migration-tenant-token";

/// Where the relay mock lives, like Cloudflare's AI Gateway.
const BASE: &str = "/v1/acct-123/gw-main/google-ai-studio";

/// The relay's own credential, sent as `cf-aig-authorization`.
const RELAY_TOKEN: &str = "Bearer relay-token-5c1b7e";

/// Starts keygate with `yaml`, an admin listener and `env`; keygate and the admin base URL.
fn start_admin_env(yaml: &str, env: &[(&str, &str)]) -> (Keygate, String) {
    let addr = free_addr();
    let mut env = env.to_vec();
    env.push(("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN));
    let kg = Keygate::start_with_env(
        &format!("{yaml}admin:\n  listen: \"{addr}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n"),
        &env,
    );
    wait_port(addr);
    (kg, format!("http://{addr}"))
}

async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut req = client().post(url).body(body.to_string());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = client().get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

const PROMPT: &str = r#"{"contents":[{"parts":[{"text":"say gemini-pro-chat"}]}]}"#;

// ---------------------------------------------------------------------------------------------
// Model aliases
// ---------------------------------------------------------------------------------------------

/// Two pools (pro, flash) on one mock, aliases for both, and two tenants: alice may use both
/// pools, ci only flash.
fn aliased(mock: &Mock) -> String {
    let url = mock.url();
    format!(
        "pools:\n  - name: pro\n    upstream: \"{url}\"\n    models: [\"gemini-2.5-pro*\"]\n    keys: [{{key: alias-key-pro, project: p1}}]\n  - name: flash\n    upstream: \"{url}\"\n    models: [\"gemini-*flash*\"]\n    keys: [{{key: alias-key-flash, project: p1}}]\nmodel_aliases:\n  gemini-pro-chat: gemini-2.5-pro\n  gemini-flash-fix: models/gemini-2.5-flash\ntenants:\n  - name: alice\n    token: \"{TENANT}\"\n  - name: ci\n    token: ci-tenant-token\n    pools: [flash]\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_alias_reaches_google_as_the_real_model_on_the_native_and_openai_paths() {
    let mock = Mock::start().await;
    mock.key("alias-key-pro", "p1").key("alias-key-flash", "p1");
    let kg = Keygate::start(&aliased(&mock));
    let base = kg.url();
    let auth = [
        ("x-goog-api-key", TENANT),
        ("content-type", "application/json"),
    ];

    let native = format!("{base}/v1beta/models/gemini-pro-chat:generateContent");
    let (status, body) = post(&native, &auth, PROMPT).await;
    assert_eq!(status, 200, "{body}");
    let stream = format!("{base}/v1beta/models/gemini-pro-chat:streamGenerateContent?alt=sse");
    let (status, body) = post(&stream, &auth, PROMPT).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chunk 3"), "{body}");

    // The OpenAI-style body: only the model's value changes, every other byte stays.
    let chat = r#"{"messages":[{"role":"user","content":"model gemini-flash-fix"}], "model" : "models/gemini-flash-fix","stream":false}"#;
    let bearer = format!("Bearer {TENANT}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, body) = post(&format!("{base}/v1/chat/completions"), &headers, chat).await;
    assert_eq!(status, 200, "{body}");

    let seen = mock.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1beta/models/gemini-2.5-pro:generateContent",
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
            "/v1beta/openai/chat/completions",
        ]
    );
    // Routed as the real models: pro's key for pro, flash's for flash.
    let keys: Vec<&str> = seen.iter().map(|s| s.key.as_deref().unwrap()).collect();
    assert_eq!(keys, ["alias-key-pro", "alias-key-pro", "alias-key-flash"]);
    assert_eq!(
        String::from_utf8_lossy(&seen[2].body),
        chat.replace("\"models/gemini-flash-fix\"", "\"models/gemini-2.5-flash\"")
    );
    assert_eq!(&seen[0].body[..], PROMPT.as_bytes());
    // The access line names the real model (the path as the client sent it).
    let logs = kg.wait_for_log("/v1/chat/completions");
    assert!(
        logs.contains("gemini-pro-chat:generateContent\" model=gemini-2.5-pro status=200"),
        "{logs}"
    );
    assert!(logs.contains("model=gemini-2.5-flash status=200"), "{logs}");

    // A tenant held to flash may not reach pro through an alias either.
    let ci = [("x-goog-api-key", "ci-tenant-token")];
    let (status, body) = post(&native, &ci, PROMPT).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("model 'gemini-2.5-pro' is not available"),
        "{body}"
    );
    assert_eq!(mock.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cooldown_learnt_through_an_alias_holds_for_the_real_name_and_back() {
    let mock = Mock::start().await;
    mock.key("alias-key-pro", "p1").key("alias-key-flash", "p1");
    // Each model has one request left on the only project, then a per-minute 429.
    mock.per_minute_limit("p1", "gemini-2.5-pro", 1, "40s");
    mock.per_minute_limit("p1", "gemini-2.5-flash", 1, "40s");
    let (kg, admin) = start_admin_env(&aliased(&mock), &[]);
    let base = kg.url();
    let auth = [("x-goog-api-key", TENANT)];
    let url = |model: &str| format!("{base}/v1beta/models/{model}:generateContent");

    // Through the alias: served, then refused by Google, which cools (p1, gemini-2.5-pro)...
    assert_eq!(post(&url("gemini-pro-chat"), &auth, PROMPT).await.0, 200);
    assert_eq!(post(&url("gemini-pro-chat"), &auth, PROMPT).await.0, 429);
    assert_eq!(mock.seen().len(), 2);
    // ...which the real name meets: keygate answers itself, nothing goes upstream.
    let (status, body) = post(&url("gemini-2.5-pro"), &auth, PROMPT).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(mock.seen().len(), 2);

    // And the other way round: learnt through the real name, held for the alias.
    assert_eq!(post(&url("gemini-2.5-flash"), &auth, PROMPT).await.0, 200);
    assert_eq!(post(&url("gemini-2.5-flash"), &auth, PROMPT).await.0, 429);
    assert_eq!(mock.seen().len(), 4);
    let (status, _) = post(&url("gemini-flash-fix"), &auth, PROMPT).await;
    assert_eq!(status, 429);
    assert_eq!(mock.seen().len(), 4);

    // The health table knows the real names only.
    let (_, pools) = admin_call("GET", &admin, "/admin/pools", None).await;
    let text = pools.to_string();
    assert!(text.contains("\"model\":\"gemini-2.5-pro\""), "{text}");
    assert!(text.contains("\"model\":\"gemini-2.5-flash\""), "{text}");
    assert!(
        !text.contains("gemini-pro-chat") && !text.contains("gemini-flash-fix"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn model_listings_show_the_aliases_a_tenant_may_use() {
    let mock = Mock::start().await;
    mock.key("alias-key-pro", "p1").key("alias-key-flash", "p1");
    let kg = Keygate::start(&aliased(&mock));
    let base = kg.url();

    let (status, body) = get(
        &format!("{base}/v1beta/models"),
        &[("x-goog-api-key", TENANT)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let listing: Value = serde_json::from_str(&body).unwrap();
    let models = listing["models"].as_array().unwrap();
    let entry = |name: &str| models.iter().find(|m| m["name"] == name).cloned();
    let pro = entry("models/gemini-pro-chat").unwrap();
    assert_eq!(pro["description"], "keygate alias of models/gemini-2.5-pro");
    assert_eq!(pro["baseModelId"], "gemini-2.5-pro");
    // Copied from the real model's entry: tools that filter by method offer it.
    assert_eq!(pro["supportedGenerationMethods"][0], "generateContent");
    assert!(entry("models/gemini-flash-fix").is_some());
    assert!(entry("models/gemini-2.5-pro").is_some());

    // The OpenAI-style listing, as the openai SDK asks for it.
    let bearer = format!("Bearer {TENANT}");
    let (status, body) = get(&format!("{base}/v1/models"), &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{body}");
    let listing: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"models/gemini-pro-chat"), "{ids:?}");
    let fix = listing["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "models/gemini-flash-fix")
        .unwrap();
    assert_eq!(fix["alias_of"], "models/gemini-2.5-flash");

    // A tenant held to flash is offered the flash alias only; later pages get none.
    let (_, body) = get(
        &format!("{base}/v1beta/models"),
        &[("x-goog-api-key", "ci-tenant-token")],
    )
    .await;
    assert!(body.contains("models/gemini-flash-fix"), "{body}");
    assert!(!body.contains("models/gemini-pro-chat"), "{body}");
    let (_, body) = get(
        &format!("{base}/v1beta/models?pageToken=next"),
        &[("x-goog-api-key", TENANT)],
    )
    .await;
    assert!(!body.contains("keygate alias"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// An upstream under a base path, with headers of its own
// ---------------------------------------------------------------------------------------------

/// A mock behind a relay at [`BASE`] that wants [`RELAY_TOKEN`], and keygate sending `token`.
async fn relayed(token: &str) -> (Mock, Keygate, String) {
    let mock = Mock::start().await;
    mock.serve_under(BASE)
        .relay_auth("cf-aig-authorization", RELAY_TOKEN);
    mock.key("relay-key-1", "p1").key("relay-key-2", "p2");
    let yaml = with_tenant(
        &format!(
            "{}    upstream_headers:\n      cf-aig-authorization: {{env: CF_AIG_TOKEN}}\n",
            pool_yaml(
                &format!("{}{BASE}/", mock.url()),
                &[("relay-key-1", "p1"), ("relay-key-2", "p2")]
            )
        ),
        "app",
        TENANT,
    );
    let (kg, admin) = start_admin_env(&yaml, &[("CF_AIG_TOKEN", token)]);
    (mock, kg, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_under_a_base_path_serves_generation_uploads_live_and_key_checks() {
    use futures_util::{SinkExt, StreamExt};
    let (mock, kg, admin) = relayed(RELAY_TOKEN).await;
    let base = kg.url();
    let auth = [("x-goog-api-key", TENANT)];

    let generate = format!("{base}/v1beta/models/gemini-2.5-flash:generateContent");
    assert_eq!(post(&generate, &auth, PROMPT).await.0, 200);
    let stream = format!("{base}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");
    let (status, body) = post(&stream, &auth, PROMPT).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chunk 3"), "{body}");

    // A resumable upload: the relay hands its upload URL out under its own path; keygate hands
    // out its own, and sends the bytes back under the base path (once, not twice).
    let resp = client()
        .post(format!("{base}/upload/v1beta/files"))
        .header("x-goog-api-key", TENANT)
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-length", "5")
        .header("content-type", "application/json")
        .body(r#"{"file":{"display_name":"notes"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let url = resp.headers()["x-goog-upload-url"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        url.starts_with(&format!("{base}/upload/v1beta/files?")),
        "{url}"
    );
    let resp = client()
        .post(&url)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    let name = file["file"]["name"].as_str().unwrap().to_string();
    let uploaded = mock.owner_of(&name).unwrap();

    // The Live API, through the relay too.
    let live = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
    let mut ws = live_set_up(&format!("ws://{}{live}", kg.addr), &auth).await;
    ws.send(Message::text(r#"{"clientContent":1}"#))
        .await
        .unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert!(echo.to_text().unwrap().contains("echo from p"), "{echo:?}");
    ws.close(None).await.unwrap();

    // Key checks list models under the base path.
    let (status, checks) = admin_call("POST", &admin, "/admin/pools/main/check", None).await;
    assert_eq!(status, 200, "{checks}");
    for check in checks["checks"].as_array().unwrap() {
        assert_eq!(check["result"], "ok", "{checks}");
    }

    // Everything arrived under the base path, with the relay's header and a pool key.
    let seen = mock.seen();
    let kinds = [
        ":generateContent",
        ":streamGenerateContent",
        "/upload/v1beta/files",
        "BidiGenerateContent",
        "/v1beta/models",
    ];
    for kind in kinds {
        assert!(
            seen.iter().any(|s| s.path.ends_with(kind)),
            "{kind}: {seen:?}"
        );
    }
    for s in &seen {
        assert!(s.full_path.starts_with(&format!("{BASE}/")), "{s:?}");
        assert!(!s.full_path[BASE.len()..].starts_with(BASE), "{s:?}");
        assert_eq!(s.headers["cf-aig-authorization"], RELAY_TOKEN, "{s:?}");
        assert!(s.status == 200 || s.status == 101, "{s:?}");
    }
    let continuation = seen
        .iter()
        .find(|s| {
            s.query
                .as_deref()
                .is_some_and(|q| q.contains("upload_id=mock-"))
        })
        .unwrap();
    assert_eq!(
        continuation.full_path,
        format!("{BASE}/upload/v1beta/files")
    );
    let key = continuation.key.as_deref().unwrap();
    assert_eq!(
        key,
        if uploaded == "p1" {
            "relay-key-1"
        } else {
            "relay-key-2"
        }
    );

    // A relayed error that quotes the relay's credential shows its name instead.
    mock.respond_next(
        None,
        1,
        400,
        r#"{"error":{"code":400,"message":"bad request with relay-token-5c1b7e","status":"INVALID_ARGUMENT"}}"#,
    );
    let (status, body) = post(&generate, &auth, PROMPT).await;
    assert_eq!(status, 400);
    assert!(
        body.contains("[upstream header cf-aig-authorization]") && !body.contains("5c1b7e"),
        "{body}"
    );
    kg.assert_logs_clean(&["relay-token-5c1b7e", TENANT, "relay-key-1", "relay-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_s_own_refusal_disables_no_key_and_names_the_upstream() {
    // keygate sends the wrong relay token: the relay's own 401, every time.
    let (mock, kg, admin) = relayed("Bearer wrong-relay-token-77").await;
    let generate = format!(
        "{}/v1beta/models/gemini-2.5-flash:generateContent",
        kg.url()
    );
    let auth = [("x-goog-api-key", TENANT)];
    let (status, body) = post(&generate, &auth, PROMPT).await;
    assert_eq!(status, 502, "{body}");
    let upstream = format!("{}/…", mock.url());
    assert!(
        body.contains("pool 'main'") && body.contains(&upstream) && body.contains("401"),
        "{body}"
    );
    assert!(
        !body.contains("acct-123"),
        "the base path stays out: {body}"
    );
    // One attempt: another key would meet the same relay.
    assert_eq!(mock.seen().len(), 1);
    assert_eq!(mock.seen()[0].status, 401);
    // A key check meets it too, and says it cannot tell.
    let (_, checks) = admin_call("POST", &admin, "/admin/pools/main/check", None).await;
    for check in checks["checks"].as_array().unwrap() {
        assert_eq!(check["result"], "inconclusive: relay_refused", "{checks}");
    }
    // The relay's rate limit (its own 429) cools nothing either.
    mock.relay_auth("cf-aig-authorization", "Bearer wrong-relay-token-77")
        .relay_limited(true);
    assert_eq!(post(&generate, &auth, PROMPT).await.0, 502);
    let (_, pools) = admin_call("GET", &admin, "/admin/pools", None).await;
    for key in pools["pools"][0]["keys"].as_array().unwrap() {
        assert_eq!(key["state"], "ok", "{pools}");
    }
    mock.relay_limited(false);
    assert_eq!(post(&generate, &auth, PROMPT).await.0, 200);
    let logs = kg.wait_for_log("status=200");
    assert!(logs.contains(":relay_refused]"), "{logs}");
    kg.assert_logs_clean(&["wrong-relay-token-77", TENANT]);
}

// ---------------------------------------------------------------------------------------------
// Numbered key variables
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn numbered_key_variables_load_with_gaps() {
    let mock = Mock::start().await;
    let env = [
        ("GOOGLE_AI_STUDIO_KEY_CHAT", "numbered-key-0:p0"),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_1", "numbered-key-1:p1"),
        // _2 is missing; _03 has a leading zero and two keys.
        (
            "GOOGLE_AI_STUDIO_KEY_CHAT_03",
            "numbered-key-3:p3,numbered-key-4:p4",
        ),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_10", "numbered-key-10:p10"),
        ("GOOGLE_AI_STUDIO_KEY_CHAT_BACKUP", "not-a-numbered-key:px"),
    ];
    let keys = [
        "numbered-key-0",
        "numbered-key-1",
        "numbered-key-3",
        "numbered-key-4",
        "numbered-key-10",
    ];
    for (i, key) in keys.iter().enumerate() {
        mock.key(key, &format!("p{i}"));
    }
    let yaml = format!(
        "pools:\n  - name: chat\n    upstream: \"{}\"\n    keys_env_prefix: GOOGLE_AI_STUDIO_KEY_CHAT\n",
        mock.url()
    );

    // --check counts what it found, and prints no value.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("5 keys in 5 projects")
            && text.contains("keys_env_prefix GOOGLE_AI_STUDIO_KEY_CHAT: 5 keys in 4 variables"),
        "{text}"
    );
    assert!(
        !text.contains("numbered-key") && !text.contains("not-a-numbered"),
        "{text}"
    );

    // Every key serves, in turn; the variable that is not numbered is not read.
    let kg = Keygate::start_with_env(&yaml, &env);
    for _ in 0..keys.len() {
        assert_eq!(
            generate(&kg.url(), "gemini-2.5-flash", None).await.0,
            200,
            "{}",
            kg.logs()
        );
    }
    let mut seen = mock.keys_seen();
    seen.sort();
    let mut want: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    kg.assert_logs_clean(&keys);
}
