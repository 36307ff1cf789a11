//! The real Python SDKs (google-genai, openai) talking to keygate, which talks to the mock.
//!
//! The SDKs live in the virtualenv that the README's test command (`make test`) creates; point
//! `KEYGATE_PYTHON` at another interpreter that has them, or set `KEYGATE_SKIP_SDK_TESTS=1` to
//! skip these tests knowingly.

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::path::PathBuf;

fn python() -> Option<PathBuf> {
    if std::env::var_os("KEYGATE_SKIP_SDK_TESTS").is_some() {
        eprintln!("KEYGATE_SKIP_SDK_TESTS is set: skipping the SDK tests");
        return None;
    }
    let path = std::env::var_os("KEYGATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python with the SDKs at {}: run `make test` (it creates .venv), set KEYGATE_PYTHON, \
         or set KEYGATE_SKIP_SDK_TESTS=1",
        path.display()
    );
    Some(path)
}

/// A mock where project p1 is out of per-minute quota for flash and p2 serves, behind keygate
/// with one tenant.
async fn setup() -> (Mock, Keygate) {
    setup_with("").await
}

/// [`setup`], with `extra` added to the configuration.
async fn setup_with(extra: &str) -> (Mock, Keygate) {
    let mock = Mock::start().await;
    mock.key("sdk-key-1", "p1").key("sdk-key-2", "p2");
    mock.per_minute_limit("p1", "gemini-2.5-flash", 0, "40s");
    let yaml = with_tenant(
        &pool_yaml(&mock.url(), &[("sdk-key-1", "p1"), ("sdk-key-2", "p2")]),
        "sdk",
        "sdk-tenant-token",
    );
    let kg = Keygate::start(&format!("{yaml}{extra}"));
    (mock, kg)
}

async fn run_script(python: &PathBuf, script: &str, kg: &Keygate) -> String {
    run_script_with(python, script, kg, &[]).await
}

async fn run_script_with(
    python: &PathBuf,
    script: &str,
    kg: &Keygate,
    env: &[(&str, &str)],
) -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .env("KEYGATE_URL", kg.url())
        .env("KEYGATE_TOKEN", "sdk-tenant-token")
        .env("EXPECT_TEXT", "hello from p2")
        .envs(env.iter().copied())
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        out.status.success(),
        "{} failed:\n{stdout}\n{stderr}\nkeygate log:\n{}",
        script.display(),
        kg.logs()
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn google_genai_sdk_generates_and_streams_through_keygate() {
    let Some(python) = python() else { return };
    let (mock, kg) = setup().await;
    let out = run_script(&python, "genai_e2e.py", &kg).await;
    assert!(out.contains("genai ok"), "{out}");
    let seen = mock.seen();
    // p1 refused once and was cooled; everything else went to p2.
    assert_eq!(
        seen.iter().filter(|s| s.status == 429).count(),
        1,
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .any(|s| s.path.ends_with(":streamGenerateContent")));
    for s in &seen {
        assert!(s.headers.get("x-goog-api-key").is_some());
        assert!(!format!("{:?}", s.headers).contains("sdk-tenant-token"));
    }
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_completes_and_streams_through_keygate() {
    let Some(python) = python() else { return };
    let (mock, kg) = setup().await;
    let out = run_script(&python, "openai_e2e.py", &kg).await;
    assert!(out.contains("openai ok"), "{out}");
    let seen = mock.seen();
    assert_eq!(
        seen.iter().filter(|s| s.status == 429).count(),
        1,
        "{seen:?}"
    );
    for s in &seen {
        assert!(
            s.path.starts_with("/v1beta/openai/chat/completions"),
            "{}",
            s.path
        );
        let auth = s.headers["authorization"].to_str().unwrap();
        assert!(
            auth == "Bearer sdk-key-1" || auth == "Bearer sdk-key-2",
            "{auth}"
        );
    }
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn both_sdks_read_answers_served_from_the_cache() {
    let Some(python) = python() else { return };
    let mock = Mock::start().await;
    mock.key("sdk-key-2", "p2");
    let yaml = with_tenant(
        &format!(
            "cache: {{}}\n{}",
            pool_yaml(&mock.url(), &[("sdk-key-2", "p2")])
        ),
        "sdk",
        "sdk-tenant-token",
    );
    let kg = Keygate::start(&yaml);
    let out = run_script(&python, "cache_hits.py", &kg).await;
    assert!(out.contains("cache ok"), "{out}");
    // Each call's first time went to the mock; its second was a hit.
    let seen = mock.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn google_genai_sdk_uploads_a_file_and_uses_it_across_a_multi_project_pool() {
    let Some(python) = python() else { return };
    // Three projects: a file is visible only to keys of the project that uploaded it, so the
    // request that uses it must go there whatever key rotation would pick next.
    let mock = Mock::start().await;
    let keys = [
        ("sdk-key-1", "p1"),
        ("sdk-key-2", "p2"),
        ("sdk-key-3", "p3"),
    ];
    for (k, p) in keys {
        mock.key(k, p);
    }
    let yaml = with_tenant(&pool_yaml(&mock.url(), &keys), "sdk", "sdk-tenant-token");
    let kg = Keygate::start(&yaml);
    let out = run_script(&python, "genai_files.py", &kg).await;
    let file = out
        .lines()
        .find_map(|l| l.strip_prefix("file "))
        .unwrap_or_else(|| panic!("{out}"));
    let owner = mock.owner_of(file).unwrap();
    assert!(out.contains(&format!("reply hello from {owner}")), "{out}");
    // The SDK sent its bytes to keygate (the upload URL keygate handed out), which passed them
    // on with Google's own upload id and a key of the right project (the SDK itself sends none:
    // bytes sent straight to the mock would arrive without a key). No request was refused.
    let seen = mock.seen();
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let continuations: Vec<_> = seen
        .iter()
        .filter(|s| {
            s.query
                .as_deref()
                .is_some_and(|q| q.contains("upload_id=mock-upload"))
        })
        .collect();
    assert!(!continuations.is_empty(), "{seen:?}");
    for c in continuations {
        let key = c.key.as_deref().unwrap_or_default();
        assert_eq!(
            keys.iter().find(|(k, _)| *k == key).map(|(_, p)| *p),
            Some(owner.as_str())
        );
    }
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2", "sdk-key-3"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_works_with_the_v1_base_url_that_openai_style_tools_use() {
    let Some(python) = python() else { return };
    let (mock, kg) = setup().await;
    let out = run_script_with(
        &python,
        "openai_e2e.py",
        &kg,
        &[("OPENAI_BASE_PATH", "/v1"), ("LIST_MODELS", "1")],
    )
    .await;
    assert!(out.contains("openai ok"), "{out}");
    let seen = mock.seen();
    // /v1/chat/completions and /v1/models became Google's OpenAI-compatible paths.
    assert!(seen
        .iter()
        .any(|s| s.path == "/v1beta/openai/chat/completions"));
    assert!(seen
        .iter()
        .any(|s| s.path == "/v1beta/openai/models" && s.method == "GET"));
    assert!(
        seen.iter().all(|s| s.path.starts_with("/v1beta/openai/")),
        "{seen:?}"
    );
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn google_genai_sdk_opens_a_live_session_through_keygate_over_tls() {
    let Some(python) = python() else { return };
    // The SDK always connects its Live session with wss://: keygate listens with TLS here.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = localhost_cert(dir.path());
    let mock = Mock::start().await;
    mock.key("sdk-key-1", "p1");
    let yaml = format!(
        "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n{}",
        cert.display(),
        key.display(),
        with_tenant(
            &pool_yaml(&mock.url(), &[("sdk-key-1", "p1")]),
            "sdk",
            "sdk-tenant-token"
        )
    );
    let kg = Keygate::start(&yaml);
    let url = format!("https://localhost:{}", kg.addr.port());
    let ca = ca.display().to_string();
    let out = run_script_with(
        &python,
        "genai_live.py",
        &kg,
        &[
            ("KEYGATE_URL", url.as_str()),
            ("SSL_CERT_FILE", ca.as_str()),
        ],
    )
    .await;
    assert!(out.contains("reply echo from p1: "), "{out}");
    assert_eq!(mock.ws_sessions(), 1);
    let seen = mock.seen();
    assert!(
        seen.iter().all(|s| s.key.as_deref() == Some("sdk-key-1")),
        "{seen:?}"
    );
    assert!(seen
        .iter()
        .all(|s| !format!("{:?}{:?}", s.headers, s.query).contains("sdk-tenant-token")));
}

#[tokio::test(flavor = "multi_thread")]
async fn google_genai_sdk_holds_an_interactions_conversation_across_a_multi_project_pool() {
    let Some(python) = python() else { return };
    // Two projects: an interaction's state is kept in the project that made it, so every
    // follow-up must go there whatever key rotation would pick next.
    let mock = Mock::start().await;
    let keys = [("sdk-key-1", "p1"), ("sdk-key-2", "p2")];
    for (k, p) in keys {
        mock.key(k, p);
    }
    let yaml = with_tenant(&pool_yaml(&mock.url(), &keys), "sdk", "sdk-tenant-token");
    let kg = Keygate::start(&yaml);
    // The first turn goes to whichever project rotation picks: any project's hello will do;
    // then every request must reach the same key.
    let out = run_script_with(
        &python,
        "genai_interactions.py",
        &kg,
        &[("EXPECT_TEXT", "hello from")],
    )
    .await;
    assert!(out.contains("interactions ok"), "{out}");
    let seen = mock.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let first_key = seen[0].key.clone();
    assert!(seen.iter().all(|s| s.key == first_key), "{seen:?}");
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn openai_sdk_asks_for_a_model_alias_that_google_sees_as_the_real_model() {
    let Some(python) = python() else { return };
    let (mock, kg) = setup_with("model_aliases:\n  gemini-flash-chat: gemini-2.5-flash\n").await;
    let out = run_script_with(
        &python,
        "openai_e2e.py",
        &kg,
        &[
            ("OPENAI_BASE_PATH", "/v1"),
            ("MODEL", "gemini-flash-chat"),
            ("LIST_MODELS", "1"),
            ("EXPECT_LISTED", "models/gemini-flash-chat"),
        ],
    )
    .await;
    assert!(out.contains("openai ok"), "{out}");
    let seen = mock.seen();
    // p1's 429 cooled gemini-2.5-flash, the real model: one refusal in all.
    assert_eq!(
        seen.iter().filter(|s| s.status == 429).count(),
        1,
        "{seen:?}"
    );
    let chats: Vec<_> = seen
        .iter()
        .filter(|s| s.path == "/v1beta/openai/chat/completions")
        .collect();
    assert_eq!(chats.len(), 3, "{seen:?}");
    for s in &seen {
        let text = format!("{} {}", s.path, String::from_utf8_lossy(&s.body));
        assert!(!text.contains("gemini-flash-chat"), "{text}");
    }
    for s in chats {
        let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(body["model"], "gemini-2.5-flash");
    }
    kg.assert_logs_clean(&["sdk-tenant-token", "sdk-key-1", "sdk-key-2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn google_genai_sdk_generates_streams_and_uploads_through_a_relay_with_a_base_path() {
    let Some(python) = python() else { return };
    // A relay in front of the mock, like Cloudflare's AI Gateway: a base path and a token of
    // its own on every request.
    let base = "/v1/acct/gw/google-ai-studio";
    let mock = Mock::start().await;
    mock.serve_under(base)
        .relay_auth("cf-aig-authorization", "Bearer sdk-relay-token");
    mock.key("sdk-key-1", "p1").key("sdk-key-2", "p2");
    let yaml = with_tenant(
        &format!(
            "{}    upstream_headers: {{cf-aig-authorization: {{env: CF_AIG_TOKEN}}}}\n",
            pool_yaml(
                &format!("{}{base}", mock.url()),
                &[("sdk-key-1", "p1"), ("sdk-key-2", "p2")]
            )
        ),
        "sdk",
        "sdk-tenant-token",
    );
    let kg = Keygate::start_with_env(&yaml, &[("CF_AIG_TOKEN", "Bearer sdk-relay-token")]);
    // The resumable upload, and a generation that uses the file on its own project.
    let out = run_script(&python, "genai_files.py", &kg).await;
    let file = out
        .lines()
        .find_map(|l| l.strip_prefix("file "))
        .unwrap_or_else(|| panic!("{out}"));
    let owner = mock.owner_of(file).unwrap();
    assert!(out.contains(&format!("reply hello from {owner}")), "{out}");
    // Generation and streaming, p1's quota refusal retried on p2 through the relay.
    mock.per_minute_limit("p1", "gemini-2.5-flash", 0, "40s");
    let out = run_script(&python, "genai_e2e.py", &kg).await;
    assert!(out.contains("genai ok"), "{out}");
    let seen = mock.seen();
    assert!(
        seen.iter()
            .any(|s| s.query.as_deref().is_some_and(|q| q.contains("upload_id="))),
        "{seen:?}"
    );
    for s in &seen {
        assert!(s.full_path.starts_with(&format!("{base}/")), "{s:?}");
        assert_eq!(s.headers["cf-aig-authorization"], "Bearer sdk-relay-token");
        assert!(s.status == 200 || s.status == 429, "{s:?}");
    }
    kg.assert_logs_clean(&[
        "sdk-tenant-token",
        "sdk-key-1",
        "sdk-key-2",
        "sdk-relay-token",
    ]);
}
