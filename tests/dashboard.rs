//! The operators' dashboard in a real browser: Debian's `chromium` driven through
//! `chromedriver` (WebDriver, with the fantoccini client), against keygate and the mock Google.
//!
//! One run opens `/`, signs in, reads every key's state after the mock refused one key (a
//! per-minute 429) and found another invalid, clears the cooldown with the page's button, runs
//! every other action once, and checks what a careful operator would: no key or token in the
//! page, no request to another origin, no console error, markup from a model name shown as
//! text, a CSP without inline script, and a page that fits a phone.
//!
//! Without a browser the test says so loudly and passes, except under `CI=true`, where a
//! missing browser is a failure (`make test-deps` installs both packages).

// Tests and benches may unwrap: a panic is a failed test (clippy.toml covers #[test] fns only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";
const MODEL: &str = "gemini-2.5-flash";
/// A model name carrying markup: it reaches the recent quota events through a refused request.
const HOSTILE_MODEL: &str =
    r#"<img src=x onerror="document.title='pwned'"><script>document.title='pwned2'</script>"#;
const K_OK: &str = "made-up-dash-key-ok-0001";
const K_COOL: &str = "made-up-dash-key-cool-0002";
const K_DEAD: &str = "made-up-dash-key-dead-0003";
const K_ADDED: &str = "made-up-dash-key-added-0004";
const K_TIER: &str = "made-up-dash-key-tier-0005";
const K_CAP: &str = "made-up-dash-key-capped-0006";
const TENANT_TOKEN: &str = "tok-dash-alice-123456";
const NOTE: &str = "<b>from Bob's laptop</b>";

/// The browser and its driver, or `None` (with a loud message) when they are missing outside
/// CI. Under `CI=true` a missing browser fails the test.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium =
        std::env::var_os("KEYGATE_CHROMIUM").map_or(PathBuf::from(CHROMIUM), PathBuf::from);
    let driver = std::env::var_os("KEYGATE_CHROMEDRIVER")
        .map(PathBuf::from)
        .or_else(|| which("chromedriver"));
    match driver.filter(|d| d.exists() && chromium.exists()) {
        Some(d) => Some((chromium, d)),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
            "CI=true and the browser tests cannot run: install chromium and chromium-driver \
             (make test-deps does)"
        ),
        None => {
            eprintln!(
                "\n!!!!!!!! SKIPPED: the dashboard browser test needs Debian's chromium and \
                 chromium-driver (apt-get install chromium chromium-driver, or make test-deps) !!!!!!!!\n"
            );
            None
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| PathBuf::from(dir).join(name))
        .find(|p| p.exists())
}

/// A chromedriver process on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver(path: &PathBuf) -> Driver {
    let addr = free_addr();
    let child = Command::new(path)
        .arg(format!("--port={}", addr.port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    wait_port(addr);
    Driver {
        child,
        url: format!("http://{addr}"),
    }
}

async fn open_browser(driver: &Driver, chromium: &PathBuf, profile: &std::path::Path) -> Client {
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000",
                // Whatever the page did, no name but the test's own address resolves.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session through chromedriver")
}

/// A webhook receiver on a free port that takes every alert (204).
async fn webhook() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let mut answer =
                        hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                    *answer.status_mut() = hyper::StatusCode::NO_CONTENT;
                    Ok::<_, std::convert::Infallible>(answer)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Runs `script` in the page and returns its value.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

/// Waits (bounded) until `script` returns `true`; panics with `what` and the page's text.
async fn wait_js(c: &Client, script: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if js(c, script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let text = js(c, "return document.body.innerText").await;
            panic!(
                "timed out waiting for {what}; the page shows:\n{}",
                text.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A script giving `test` on `t`, the text of the table row of key `fp` (false without one).
fn row_where(fp: &str, test: &str) -> String {
    format!(
        "const row = [...document.querySelectorAll('#pools tr')].find(r => [...r.querySelectorAll('code')].some(c => c.textContent === {fp:?})); if (!row) return false; const t = row.innerText; return {test};"
    )
}

/// Clicks the button found by `xpath`, confirms in the page's dialog, and waits for the result
/// line to change and say `expect_in_result`.
async fn act(c: &Client, xpath: &str, expect_in_result: &str) {
    answer(c, xpath, "confirm-ok", expect_in_result).await;
}

/// Clicks the button found by `xpath`, answers the confirmation with the button `choice`, and
/// waits for the result line to change and say `expect_in_result`.
async fn answer(c: &Client, xpath: &str, choice: &str, expect_in_result: &str) {
    let before = js(c, "return document.getElementById('result').textContent").await;
    // The rows are redrawn every few seconds: a button found just before a redraw is stale.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.find(Locator::XPath(xpath)).await {
            Ok(b) if b.click().await.is_ok() => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) | Err(_) => panic!("no clickable {xpath}"),
        }
    }
    wait_js(
        c,
        "return document.getElementById('confirm').open",
        "the confirmation dialog",
    )
    .await;
    c.find(Locator::Id(choice))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let changed = format!(
        "const t = document.getElementById('result').textContent; return t !== {before} && t.includes({expect_in_result:?});"
    );
    wait_js(
        c,
        &changed,
        &format!("a result saying {expect_in_result:?}"),
    )
    .await;
}

fn key_button(fp: &str, label: &str) -> String {
    format!("//tr[.//code[text()='{fp}']]//button[text()='{label}']")
}

/// Sets up the mock and keygate, and drives the page through everything an operator does.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_a_real_browser() {
    let Some((chromium, driver_path)) = browser() else {
        return;
    };
    let started = Instant::now();
    let mock = Mock::start().await;
    mock.key(K_OK, "p-ok")
        .key(K_COOL, "p-cool")
        .key(K_ADDED, "p-new")
        .key(K_TIER, "p-tier")
        .key(K_CAP, "p-cap");
    mock.invalid_key(K_DEAD);
    // The model is not in p-tier's tier; p-cap's billing account is past its spending cap.
    mock.limit_zero("p-tier", MODEL);
    mock.billing_account("p-cap", "acct-2")
        .cap_account("acct-2", true);
    // Every request on the cooling key gets Google's per-minute 429 with a RetryInfo, its message
    // quoting the key (the dashboard must show the message scrubbed).
    let refusal = per_minute_429(MODEL, "300s").replace(
        "You exceeded your current quota",
        &format!("You exceeded your current quota with {K_COOL}"),
    );
    mock.respond_next(Some(K_COOL), 1000, 429, &refusal);
    let yaml = format!(
        "pools:\n  - name: main\n    upstream: \"{}\"\n    keys:\n      - key: \"{K_OK}\"\n        project: p-ok\n        note: \"{}\"\n      - key: \"{K_COOL}\"\n        project: p-cool\n        billing_account: acct-1\n      - key: \"{K_DEAD}\"\n        project: p-dead\n      - key: \"{K_TIER}\"\n        project: p-tier\n      - key: \"{K_CAP}\"\n        project: p-cap\n        billing_account: acct-2\ntenants:\n  - name: alice\n    token: \"{TENANT_TOKEN}\"\n    rpm: 600\n",
        mock.url(),
        NOTE.replace('"', "\\\"")
    );
    let hook = webhook().await;
    let yaml = format!("{yaml}alerts:\n  webhook_url: \"http://{hook}/hooks\"\n");
    let (kg, admin_url) = start_with_admin(&yaml);

    // Traffic until one key cools, one is found invalid, one's model is out of its tier and
    // one's billing account is capped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (fp_ok, fp_cool, fp_dead, fp_tier, fp_cap) = loop {
        let (status, _, body) = generate(&kg.url(), MODEL, Some(TENANT_TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        let (_, pools) = admin_call("GET", &admin_url, "/admin/pools", None).await;
        let keys = pools["pools"][0]["keys"].as_array().unwrap().clone();
        let fp = |project: &str| {
            let k = keys.iter().find(|k| k["project"] == project).unwrap();
            (
                k["key"].as_str().unwrap().to_string(),
                k["state"].as_str().unwrap().to_string(),
            )
        };
        let ((ok, _), (cool, cool_state), (dead, dead_state)) =
            (fp("p-ok"), fp("p-cool"), fp("p-dead"));
        let ((tier, tier_state), (cap, cap_state)) = (fp("p-tier"), fp("p-cap"));
        let states = [cool_state, dead_state, tier_state, cap_state];
        if states == ["cooling", "disabled", "cooling", "capped"] {
            break (ok, cool, dead, tier, cap);
        }
        assert!(
            Instant::now() < deadline,
            "the keys did not cool and go out: {keys:?}"
        );
    };
    // A request whose model name carries markup, refused with a quota 429 on the cooling key (the
    // keys that would serve it are out meanwhile, so the refusal lands there): a quota event.
    let path_of = |fp: &str| format!("/admin/pools/main/keys/{}", fp.trim_start_matches("key#"));
    for fp in [&fp_ok, &fp_tier] {
        admin_call(
            "POST",
            &admin_url,
            &format!("{}/disable", path_of(fp)),
            None,
        )
        .await;
    }
    let resp = client()
        .post(format!("{}/v1beta/openai/chat/completions", kg.url()))
        .bearer_auth(TENANT_TOKEN)
        .json(&json!({ "model": HOSTILE_MODEL, "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429, "{:?}", resp.text().await);
    for fp in [&fp_ok, &fp_tier] {
        admin_call("POST", &admin_url, &format!("{}/enable", path_of(fp)), None).await;
    }
    let (_, events) = admin_call("GET", &admin_url, "/admin/events", None).await;
    let text = events.to_string();
    assert!(
        !text.contains(K_COOL) && text.contains(&format!("current quota with {fp_cool}")),
        "{events}"
    );
    assert!(
        events["quota_events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["model"] == HOSTILE_MODEL),
        "{events}"
    );

    // Without the token: the page is the login form and holds no data; data stays 401.
    let page = client()
        .get(format!("{admin_url}/"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'")
            && !csp.contains("unsafe-inline")
            && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert!(
        !headers
            .keys()
            .any(|h| h.as_str().starts_with("access-control-")),
        "{headers:?}"
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"login-form\"") && !html.contains(&fp_ok) && !html.contains("p-ok"));
    for path in [
        "/admin/pools",
        "/admin/events",
        "/admin/usage",
        "/admin/tenants",
    ] {
        let (status, _) = admin("GET", &format!("{admin_url}{path}"), None, None).await;
        assert_eq!(status, 401, "{path} without the token");
    }
    let (_, data) = admin_call("GET", &admin_url, "/admin/pools", None).await;
    assert!(
        data.to_string().contains(NOTE),
        "the note is in /admin/pools: {data}"
    );
    // The series behind the charts: this minute's requests, per key and per tenant.
    let (_, usage) = admin_call("GET", &admin_url, "/admin/usage?minutes=60&step=1", None).await;
    let sum = |v: &Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>()
    };
    let ok_usage = usage["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == fp_ok.as_str())
        .unwrap();
    assert_eq!(ok_usage["requests"].as_array().unwrap().len(), 60);
    // Without Redis the counts are this instance's own.
    assert_eq!(usage["shared"], false, "{usage}");
    assert!(
        sum(&ok_usage["requests"]) >= 1 && sum(&ok_usage["tokens"]) >= 1,
        "{usage}"
    );
    assert!(sum(&usage["tenants"][0]["requests"]) >= 2, "{usage}");
    let (_, day) = admin_call("GET", &admin_url, "/admin/usage?minutes=1440&step=15", None).await;
    assert_eq!(
        day["keys"][0]["tokens"].as_array().unwrap().len(),
        96,
        "{day}"
    );
    // A key that served nothing has empty lists; a series is at most 240 points.
    let idle = usage["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == fp_dead.as_str())
        .unwrap();
    assert_eq!(idle["requests"], serde_json::json!([]), "{usage}");
    for bad in ["minutes=0", "step=x", "bogus=1", "minutes=1440&step=1"] {
        let (status, answer) =
            admin_call("GET", &admin_url, &format!("/admin/usage?{bad}"), None).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }

    // The browser.
    let profile = tempfile::tempdir().unwrap();
    let driver = start_driver(&driver_path);
    let c = open_browser(&driver, &chromium, profile.path()).await;
    let session = c.session_id().await.unwrap().unwrap();
    c.goto(&format!("{admin_url}/")).await.unwrap();
    wait_js(
        &c,
        "return !document.getElementById('login').hidden && document.getElementById('app').hidden",
        "the login form",
    )
    .await;
    assert_eq!(
        js(
            &c,
            "return document.getElementById('pools').childElementCount"
        )
        .await,
        json!(0)
    );
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(ADMIN_TOKEN)
        .await
        .unwrap();
    c.find(Locator::Id("signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // Every key with its state, the note beside its key, the countdown running.
    wait_js(
        &c,
        &row_where(&fp_cool, "t.includes('cooling')"),
        "the cooling key",
    )
    .await;
    let cool = js(&c, &row_where(&fp_cool, "t"))
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cool.contains("cooling")
            && cool.contains(MODEL)
            && cool.contains("left")
            && cool.contains("billing: acct-1"),
        "{cool}"
    );
    let dead = js(&c, &row_where(&fp_dead, "t"))
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        dead.contains("disabled") && dead.contains("key invalid"),
        "{dead}"
    );
    let tier = js(&c, &row_where(&fp_tier, "t")).await;
    let tier = tier.as_str().unwrap();
    assert!(
        tier.contains("unavailable") && tier.contains(&format!("{MODEL} (not in tier)")),
        "{tier}"
    );
    let cap = js(&c, &row_where(&fp_cap, "t")).await;
    let cap = cap.as_str().unwrap();
    assert!(
        cap.contains("capped") && cap.contains("why: monthly spending cap"),
        "{cap}"
    );
    let ok = js(&c, &row_where(&fp_ok, "t"))
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        ok.contains("ok") && ok.contains(NOTE) && !ok.contains("cooling"),
        "{ok}"
    );
    // The cooling key's countdown (about 5 minutes, shown to the second) runs between refreshes.
    let countdown = row_where(&fp_cool, "row.querySelector('.countdown').textContent");
    let first = js(&c, &countdown).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let later = js(&c, &countdown).await;
    assert!(first.as_str().unwrap().ends_with(" s"), "{first}");
    assert_ne!(later, first, "the countdown is live");

    // The next recovery per model above the pool; the tenant with its limits and usage.
    let recovery = js(
        &c,
        "const r = document.querySelector('.recovery'); return r ? r.innerText : ''",
    )
    .await;
    let recovery = recovery.as_str().unwrap();
    assert!(
        recovery.contains(&format!("{MODEL}: first key back at")),
        "{recovery}"
    );
    let tenants = js(&c, "return document.getElementById('tenants').innerText").await;
    let tenants = tenants.as_str().unwrap();
    assert!(
        tenants.contains("alice")
            && tenants.contains("rpm: 600")
            && tenants.contains("requests, hour: "),
        "{tenants}"
    );

    // The alerts sent: the invalid key's, delivered.
    wait_js(
        &c,
        "const t = document.getElementById('alerts').innerText; return t.includes('key disabled') && t.includes('delivered');",
        "the alerts sent",
    )
    .await;

    // Markup from a model name and from a note is text, and nothing ran.
    wait_js(
        &c,
        "return document.getElementById('events').textContent.length > 0",
        "the quota events",
    )
    .await;
    let shown = js(
        &c,
        "return [...document.querySelectorAll('#events .model')].map(m => m.textContent)",
    )
    .await;
    assert!(
        shown.as_array().unwrap().iter().any(|m| m == HOSTILE_MODEL),
        "{shown}"
    );
    assert_eq!(
        js(
            &c,
            "return document.querySelectorAll('#events img, #events script, #pools b').length"
        )
        .await,
        json!(0)
    );
    assert_eq!(
        js(&c, "return document.title").await,
        json!("keygate dashboard")
    );

    // The README's picture: keys in every state, the quota events, the tenant.
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    c.set_window_size(1000, 1500).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        out.join("dashboard-readme.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    c.set_window_size(1280, 1000).await.unwrap();

    // Clear the cooldown with the page's button: the state changes.
    act(
        &c,
        &key_button(&fp_cool, "Clear cooldown"),
        "cooldown(s) cleared",
    )
    .await;
    wait_js(
        &c,
        &row_where(&fp_cool, "!t.includes('cooling') && t.includes('ok')"),
        "the cleared key to be ok",
    )
    .await;

    // Every other action once, each with its result.
    // A cancelled confirmation changes nothing, and says so.
    answer(
        &c,
        &key_button(&fp_ok, "Disable"),
        "confirm-cancel",
        "Cancelled: nothing was changed",
    )
    .await;
    let (_, pools) = admin_call("GET", &admin_url, "/admin/pools", None).await;
    assert!(
        pools["pools"][0]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key"] == fp_ok.as_str() && k["state"] == "ok"),
        "{pools}"
    );
    act(
        &c,
        &key_button(&fp_ok, "Disable"),
        &format!("{fp_ok} disabled"),
    )
    .await;
    wait_js(
        &c,
        &row_where(&fp_ok, "t.includes('disabled by operator')"),
        "the disabled key",
    )
    .await;
    act(
        &c,
        &key_button(&fp_ok, "Enable"),
        &format!("{fp_ok} enabled"),
    )
    .await;
    act(&c, &key_button(&fp_ok, "Check"), &format!("{fp_ok}: ok")).await;
    act(
        &c,
        "//button[text()='Check all keys']",
        &format!("{fp_dead}: key_invalid"),
    )
    .await;
    c.find(Locator::Css("#add-key-box summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Id("add-secret"))
        .await
        .unwrap()
        .send_keys(K_ADDED)
        .await
        .unwrap();
    c.find(Locator::Id("add-project"))
        .await
        .unwrap()
        .send_keys("p-new")
        .await
        .unwrap();
    act(&c, "//button[@id='add-submit']", "runtime change only").await;
    let added = js(&c, "return document.getElementById('result').textContent").await;
    let fp_added = added
        .as_str()
        .unwrap()
        .split_whitespace()
        .find(|w| w.starts_with("key#"))
        .unwrap()
        .to_string();
    wait_js(
        &c,
        &format!("return document.getElementById('pools').textContent.includes({fp_added:?})"),
        "the added key's row",
    )
    .await;
    act(&c, "//button[@id='reload']", "configuration reloaded").await;

    // No key and no token anywhere in the page, nor in storage a page or another port reads.
    let source = c.source().await.unwrap();
    for secret in [
        K_OK,
        K_COOL,
        K_DEAD,
        K_TIER,
        K_CAP,
        K_ADDED,
        ADMIN_TOKEN,
        TENANT_TOKEN,
    ] {
        assert!(!source.contains(secret), "{secret} is in the page source");
    }
    let stored = js(&c, "return [localStorage.length, document.cookie, location.href, sessionStorage.getItem('keygate-admin-token')]").await;
    assert_eq!(stored, json!([0, "", format!("{admin_url}/"), ADMIN_TOKEN]));

    // Nothing was asked of another origin.
    let asked = js(
        &c,
        "return performance.getEntriesByType('resource').map(e => e.name)",
    )
    .await;
    let asked: Vec<String> = asked
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(
        asked.iter().any(|u| u.ends_with("/dashboard.js")),
        "{asked:?}"
    );
    for url in &asked {
        assert!(
            url.starts_with(&format!("{admin_url}/")),
            "a request to another origin: {url}"
        );
    }

    // No error in the browser's console (CSP violations and failed loads are errors there).
    let logs: Value = client()
        .post(format!("{}/session/{session}/se/log", driver.url))
        .json(&json!({ "type": "browser" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let errors: Vec<&Value> = logs["value"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // A phone: the page fits its width.
    c.set_window_size(390, 844).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        js(
            &c,
            "return document.documentElement.scrollWidth <= window.innerWidth"
        )
        .await,
        json!(true)
    );
    let shot = c.screenshot().await.unwrap();
    assert!(shot.starts_with(b"\x89PNG") && shot.len() > 1000);
    std::fs::write(out.join("dashboard-phone.png"), &shot).unwrap();
    c.set_window_size(1280, 1000).await.unwrap();
    std::fs::write(
        out.join("dashboard-laptop.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();
    c.close().await.unwrap();
    // The key added through the page is in no log line either (the config's keys are checked
    // when keygate stops).
    kg.assert_logs_clean(&[K_ADDED, ADMIN_TOKEN]);
    eprintln!(
        "dashboard browser test: {:?}; screenshots in {}",
        started.elapsed(),
        out.display()
    );
}

/// With `admin.tls` the admin listener (dashboard and API) speaks TLS with the given
/// certificate, as the client listener does; no SSH tunnel needed.
#[tokio::test(flavor = "multi_thread")]
async fn admin_tls_serves_the_dashboard_over_https() {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = localhost_cert(dir.path());
    let mock = Mock::start().await;
    mock.key(K_OK, "p-ok");
    let addr = free_addr();
    let yaml = format!(
        "{}admin:\n  listen: \"{addr}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n",
        pool_yaml(&mock.url(), &[(K_OK, "p-ok")]),
        cert.display(),
        key.display()
    );
    let _kg = Keygate::start_with_env(&yaml, &[("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)]);
    wait_port(addr);
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_file(&ca).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let get = |path: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.expect("a TLS handshake");
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            tls.write_all(request.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            String::from_utf8_lossy(&answer).into_owned()
        }
    };
    let page = get("/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    assert!(page.contains("id=\"login-form\""), "{page}");
    let data = get("/admin/pools").await;
    assert!(data.starts_with("HTTP/1.1 401"), "{data}");
    // Plain HTTP on the TLS port gets no page.
    let (status, _) = raw_http(addr, &raw_get("/", &[]));
    assert_ne!(status, 200);
}
