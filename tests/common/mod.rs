//! Test support: a mock Gemini API written in Rust (started per test on 127.0.0.1, port 0)
//! and a launcher for the real `keygate` binary.
//!
//! The mock models what the gateway must understand: keys that belong to projects, per-project
//! per-model quotas answered with Google's real 429 bodies (per minute and per day), invalid and
//! suspended keys, client errors, slow SSE streams, and the OpenAI-compatible endpoints. Files
//! (resumable upload) and cached contents belong to the project whose key created them, and
//! other projects get Google's 403 for them; interactions (the Interactions API) belong to theirs
//! too, and another project's key gets a 404 for one. The Live API's WebSocket is an echo session of the
//! key's project. It records every request it receives, so tests can assert what reached
//! "Google".
//!
//! `net` adds a local HTTP CONNECT proxy, a SOCKS5 server and a WebSocket client helper;
//! `redis` a real Redis server.

#![allow(dead_code)]

mod net;
pub use net::*;
mod redis;
#[allow(unused_imports)] // only the fleet tests start a Redis
pub use redis::*;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type Body = BoxBody<Bytes, std::io::Error>;

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The path as Google reads it (under a relay's base path, what follows it).
    pub path: String,
    /// The path as it arrived, a relay's base path included.
    pub full_path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The API key the request carried (`x-goog-api-key` or `Authorization: Bearer`; for a
    /// Live API upgrade, `x-goog-api-key` or `?key=`, never the bearer token).
    pub key: Option<String>,
    pub status: u16,
    /// Which TCP connection it came on (0, 1, ...).
    pub connection: usize,
    pub version: http::Version,
}

#[derive(Clone, Debug)]
enum KeyState {
    Valid { project: String },
    Invalid,
    Suspended,
}

#[derive(Clone, Debug, Default)]
struct Quota {
    per_minute: Option<(u32, String)>,
    per_day: Option<u32>,
    used: u32,
    window: Option<Window>,
    /// The model is not in the project's tier: every request gets a "limit: 0" 429.
    limit_zero: bool,
    /// Every request gets the detail-less "You exceeded your current quota" 429.
    detail_less: bool,
}

/// A fixed window of `length` that opens at the first request it counts.
#[derive(Clone, Debug)]
struct Window {
    allowed: u32,
    length: Duration,
    start: Option<Instant>,
    count: u32,
}

/// A resumable upload between `start` and `finalize`.
struct Upload {
    project: String,
    display_name: Option<String>,
    mime_type: String,
    declared: Option<usize>,
    data: Vec<u8>,
}

struct Canned {
    key: Option<String>,
    remaining: usize,
    status: u16,
    body: String,
    headers: Vec<(String, String)>,
}

struct State {
    keys: HashMap<String, KeyState>,
    quotas: HashMap<(String, String), Quota>,
    canned: Vec<Canned>,
    seen: Vec<Seen>,
    connections: usize,
    sse_events: usize,
    sse_gap: Duration,
    /// After this many SSE events the connection is cut mid-stream.
    sse_abort_after: Option<usize>,
    /// Non-streaming answers wait this long before their header.
    delay: Duration,
    /// Keys whose requests are answered only after this long.
    slow_keys: HashMap<String, Duration>,
    /// This mock's own URL, for upload URLs and file URIs.
    base: String,
    uploads: HashMap<String, Upload>,
    uploads_started: usize,
    /// `files/...` and `cachedContents/...` by name: owning project and the resource's JSON.
    resources: HashMap<String, (String, serde_json::Value)>,
    files_made: usize,
    caches_made: usize,
    interactions_made: usize,
    /// Live API upgrades answered with 101.
    ws_sessions: usize,
    /// Requests whose header arrived (counted before any answer is decided, so a request whose
    /// sender went away before the answer still counts).
    arrivals: usize,
    /// Per-project token buckets (every model together), like Google's rate limits.
    buckets: HashMap<String, Bucket>,
    /// Injected failures, if any.
    faults: Option<Faults>,
    /// Each project's billing account, for the ones given one.
    billing: HashMap<String, String>,
    /// Billing accounts over their monthly spending cap.
    capped_accounts: HashSet<String>,
    /// The path this mock serves under, like a relay in front of Google (Cloudflare's AI
    /// Gateway: `/v1/ACCOUNT/GATEWAY/google-ai-studio`); empty for Google itself.
    base_path: String,
    /// The header (name, value) the relay wants on every request; without it, the relay's own
    /// 401 (Cloudflare's body, not Google's).
    relay_auth: Option<(String, String)>,
    /// Answer every request with the relay's own 429 (its rate limit, not Google's).
    relay_limited: bool,
    /// Extra bytes of text in every generateContent answer (to make answers large).
    padding: usize,
    /// Successful answers are gzipped too (errors always are) for clients that accept gzip.
    gzip_success: bool,
}

/// A token bucket: `rate` tokens a second, at most `burst` held.
#[derive(Clone, Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

/// Failures injected into generation requests, drawn from a seeded generator.
#[derive(Clone, Debug)]
struct Faults {
    state: u64,
    p503: f64,
    p500: f64,
    reset: f64,
    /// Failures injected so far: 5xx answers, cut connections.
    statuses: usize,
    resets: usize,
}

impl Faults {
    /// The next number in [0, 1) of a xorshift64* sequence.
    fn next(&mut self) -> f64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a fault roll says to do with a request.
enum Fault {
    None,
    Status(u16),
    Reset,
}

/// The mock Gemini API.
pub struct Mock {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn accept_loop(
    listener: tokio::net::TcpListener,
    st: Arc<Mutex<State>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                // A connection is counted (and numbered) by its first request: keygate's TCP
                // health checks connect and close without sending one.
                let number = Arc::new(std::sync::OnceLock::new());
                let service = hyper::service::service_fn(move |req| {
                    let connection = *number.get_or_init(|| {
                        let mut s = st.lock().unwrap();
                        s.connections += 1;
                        s.connections - 1
                    });
                    handle(st.clone(), connection, req)
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                    None => {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    })
}

pub const PER_MINUTE_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"MODEL"},"quotaValue":"5"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"DELAY"}]}}"#;

pub const PER_DAY_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"MODEL"},"quotaValue":"100"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#;

/// The billing account's monthly spending cap, as captured (shared notes): no details.
pub const ACCOUNT_CAP_BODY: &str = r#"{"error":{"code":429,"message":"Your billing account has exceeded its monthly spending cap. Please go to AI Studio at https://aistudio.google.com to manage your billing. Learn more at https://ai.google.dev/gemini-api/docs/billing.","status":"RESOURCE_EXHAUSTED"}}"#;

/// A model not in the project's tier: a quota 429 of "limit: 0" with a short RetryInfo.
pub const LIMIT_ZERO_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, model: MODEL\nPlease retry in 11.767792953s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"MODEL"}}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"11s"}]}}"#;

/// A quota refusal with no details, as seen for days on one (project, model).
pub const DETAIL_LESS_QUOTA_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits. To monitor your current usage, head to: https://ai.dev/usage?tab=rate-limit. ","status":"RESOURCE_EXHAUSTED"}}"#;

pub const INVALID_KEY_BODY: &str = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;

pub const UNREGISTERED_BODY: &str = r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.","status":"PERMISSION_DENIED"}}"#;

/// Google's refusal of a suspended key, which names the key three times (public captures):
/// in `message`, in the ErrorInfo's `metadata.containerInfo` and in a LocalizedMessage.
pub fn suspended_body(key: &str) -> String {
    r#"{"error":{"code":403,"message":"Permission denied: Consumer 'api_key:KEY' has been suspended.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED","domain":"googleapis.com","metadata":{"consumer":"projects/123456789","containerInfo":"api_key:KEY","service":"generativelanguage.googleapis.com"}},{"@type":"type.googleapis.com/google.rpc.LocalizedMessage","locale":"en-US","message":"Permission denied: Consumer 'api_key:KEY' has been suspended."}]}}"#.replace("KEY", key)
}

pub const BAD_REQUEST_BODY: &str = r#"{"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \"bogus\": Cannot find field.","status":"INVALID_ARGUMENT"}}"#;

pub const SHARED_CAPACITY_BODY: &str = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;

pub const FILE_DENIED_BODY: &str = r#"{"error":{"code":403,"message":"You do not have permission to access the File ID or it may not exist.","status":"PERMISSION_DENIED"}}"#;

pub const CACHE_DENIED_BODY: &str = r#"{"error":{"code":403,"message":"CachedContent not found (or permission denied)","status":"PERMISSION_DENIED"}}"#;

pub const MODELS_BODY: &str = r#"{"models":[{"name":"models/gemini-2.5-flash","version":"001","displayName":"Gemini 2.5 Flash","supportedGenerationMethods":["generateContent","countTokens","createCachedContent"]},{"name":"models/gemini-2.5-pro","version":"2.5","displayName":"Gemini 2.5 Pro","supportedGenerationMethods":["generateContent","countTokens","createCachedContent"]}]}"#;

/// Cloudflare AI Gateway's own refusal of a request without its token: not Google's shape.
pub const RELAY_UNAUTHORIZED_BODY: &str = r#"{"success":false,"result":[],"messages":[],"error":[{"code":2009,"message":"Unauthorized"}]}"#;

/// Cloudflare AI Gateway's own rate limit.
pub const RELAY_LIMITED_BODY: &str = r#"{"success":false,"result":[],"messages":[],"error":[{"code":2003,"message":"Rate limited"}]}"#;

/// Google's OpenAI-compatible model listing.
pub const OPENAI_MODELS_BODY: &str = r#"{"object":"list","data":[{"id":"models/gemini-2.5-flash","object":"model","owned_by":"google"},{"id":"models/gemini-2.5-pro","object":"model","owned_by":"google"}]}"#;

pub const OVERLOADED_BODY: &str = r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#;

impl Mock {
    /// Starts a mock on 127.0.0.1, port 0, speaking HTTP/1.1 and HTTP/2 (prior knowledge).
    pub async fn start() -> Mock {
        Mock::start_with(None).await
    }

    /// Starts a mock that speaks TLS (ALPN h2, http/1.1) with a certificate for `localhost`
    /// signed by a fresh test CA; returns the CA's PEM to trust it with.
    pub async fn start_tls() -> (Mock, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        (Mock::start_with(Some(acceptor)).await, ca.pem())
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> Mock {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let state = Arc::new(Mutex::new(State {
            keys: HashMap::new(),
            quotas: HashMap::new(),
            canned: Vec::new(),
            seen: Vec::new(),
            connections: 0,
            sse_events: 4,
            sse_gap: Duration::from_millis(0),
            sse_abort_after: None,
            delay: Duration::ZERO,
            slow_keys: HashMap::new(),
            base,
            uploads: HashMap::new(),
            uploads_started: 0,
            resources: HashMap::new(),
            files_made: 0,
            caches_made: 0,
            interactions_made: 0,
            ws_sessions: 0,
            arrivals: 0,
            buckets: HashMap::new(),
            billing: HashMap::new(),
            capped_accounts: HashSet::new(),
            padding: 0,
            gzip_success: false,
            faults: None,
            base_path: String::new(),
            relay_auth: None,
            relay_limited: false,
        }));
        let mut tasks = vec![accept_loop(listener, state.clone(), tls.clone())];
        // Where `localhost` also means ::1, answer there too (best effort).
        if let Ok(v6) = tokio::net::TcpListener::bind(("::1", addr.port())).await {
            tasks.push(accept_loop(v6, state.clone(), tls));
        }
        Mock { addr, state, tasks }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves only under `base_path`, like a relay in front of Google: requests elsewhere get
    /// the relay's 404, and upload URLs are handed out under the base path.
    pub fn serve_under(&self, base_path: &str) -> &Self {
        self.state.lock().unwrap().base_path = base_path.trim_end_matches('/').to_string();
        self
    }

    /// The relay wants header `name: value` on every request; without it, its own 401.
    pub fn relay_auth(&self, name: &str, value: &str) -> &Self {
        self.state.lock().unwrap().relay_auth = Some((name.into(), value.into()));
        self
    }

    /// The relay answers every request with its own 429 (`on`), or stops doing so.
    pub fn relay_limited(&self, on: bool) -> &Self {
        self.state.lock().unwrap().relay_limited = on;
        self
    }

    /// A valid key of `project`.
    pub fn key(&self, key: &str, project: &str) -> &Self {
        self.state.lock().unwrap().keys.insert(
            key.into(),
            KeyState::Valid {
                project: project.into(),
            },
        );
        self
    }

    pub fn invalid_key(&self, key: &str) -> &Self {
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(key.into(), KeyState::Invalid);
        self
    }

    pub fn suspended_key(&self, key: &str) -> &Self {
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(key.into(), KeyState::Suspended);
        self
    }

    /// `project` may serve `allowed` more requests for `model`; then a per-minute 429 whose
    /// `RetryInfo.retryDelay` is `delay` (e.g. "53s").
    pub fn per_minute_limit(&self, project: &str, model: &str, allowed: u32, delay: &str) -> &Self {
        let mut s = self.state.lock().unwrap();
        let q = s.quotas.entry((project.into(), model.into())).or_default();
        q.per_minute = Some((allowed, delay.into()));
        q.used = 0;
        self
    }

    /// `project` is on billing `account`.
    pub fn billing_account(&self, project: &str, account: &str) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.billing.insert(project.into(), account.into());
        self
    }

    /// Trips (or, with `capped` false, raises) `account`'s monthly spending cap: every project
    /// on it answers 429 for every model meanwhile.
    pub fn cap_account(&self, account: &str, capped: bool) -> &Self {
        let mut s = self.state.lock().unwrap();
        if capped {
            s.capped_accounts.insert(account.into());
        } else {
            s.capped_accounts.remove(account);
        }
        self
    }

    /// `model` is not in `project`'s tier: a "limit: 0" 429 every time.
    pub fn limit_zero(&self, project: &str, model: &str) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.quotas
            .entry((project.into(), model.into()))
            .or_default()
            .limit_zero = true;
        self
    }

    /// `project` answers every request for `model` with the detail-less quota 429, or (with
    /// `on` false) stops doing so.
    pub fn detail_less_quota(&self, project: &str, model: &str, on: bool) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.quotas
            .entry((project.into(), model.into()))
            .or_default()
            .detail_less = on;
        self
    }

    /// `project` may serve `allowed` more requests for `model`; then a per-day 429.
    pub fn per_day_limit(&self, project: &str, model: &str, allowed: u32) -> &Self {
        let mut s = self.state.lock().unwrap();
        let q = s.quotas.entry((project.into(), model.into())).or_default();
        q.per_day = Some(allowed);
        q.used = 0;
        self
    }

    /// A rolling per-minute quota: at most `allowed` requests of `project` for `model` per
    /// `window`, which opens at the first request counted; beyond that a per-minute 429 whose
    /// `retryDelay` is the time left in the window (e.g. "1.234s").
    pub fn per_minute_window(
        &self,
        project: &str,
        model: &str,
        allowed: u32,
        window: Duration,
    ) -> &Self {
        let mut s = self.state.lock().unwrap();
        let q = s.quotas.entry((project.into(), model.into())).or_default();
        q.window = Some(Window {
            allowed,
            length: window,
            start: None,
            count: 0,
        });
        self
    }

    /// The next `times` requests (carrying `key`, or any key when `None`) get this answer.
    pub fn respond_next(&self, key: Option<&str>, times: usize, status: u16, body: &str) -> &Self {
        self.respond_next_with(key, times, status, body, &[])
    }

    /// Like [`Mock::respond_next`], with extra response headers.
    pub fn respond_next_with(
        &self,
        key: Option<&str>,
        times: usize,
        status: u16,
        body: &str,
        headers: &[(&str, &str)],
    ) -> &Self {
        self.state.lock().unwrap().canned.push(Canned {
            key: key.map(str::to_string),
            remaining: times,
            status,
            body: body.into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        self
    }

    /// `project` holds a token bucket of `per_second` tokens a second, at most `burst`, shared by
    /// all its models: a request without a token gets a per-minute 429 whose `retryDelay` says
    /// when the next token comes.
    pub fn token_bucket(&self, project: &str, per_second: f64, burst: f64) -> &Self {
        self.state.lock().unwrap().buckets.insert(
            project.into(),
            Bucket {
                rate: per_second,
                burst,
                tokens: burst,
                at: Instant::now(),
            },
        );
        self
    }

    /// Generation requests fail at random (seeded): 503 with probability `p503`, 500 with
    /// `p500`, and the connection is cut before any header with `reset`.
    pub fn faults(&self, seed: u64, p503: f64, p500: f64, reset: f64) -> &Self {
        self.state.lock().unwrap().faults = Some(Faults {
            state: seed.max(1),
            p503,
            p500,
            reset,
            statuses: 0,
            resets: 0,
        });
        self
    }

    /// Failures injected so far: (5xx answers, connections cut).
    pub fn injected(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        s.faults.as_ref().map_or((0, 0), |f| (f.statuses, f.resets))
    }

    /// How many requests arrived (whether or not they were answered).
    pub fn arrivals(&self) -> usize {
        self.state.lock().unwrap().arrivals
    }

    /// A file that already exists in `project` (made outside keygate); its name.
    pub fn make_file(&self, project: &str) -> String {
        let mut s = self.state.lock().unwrap();
        s.files_made += 1;
        let name = format!("files/premade{}", s.files_made);
        let file = serde_json::json!({
            "name": name,
            "mimeType": "text/plain",
            "uri": format!("{}/v1beta/{name}", s.base),
            "state": "ACTIVE",
        });
        s.resources.insert(name.clone(), (project.into(), file));
        name
    }

    /// An interaction that already exists in `project` (made outside keygate); its id.
    pub fn make_interaction(&self, project: &str) -> String {
        let mut s = self.state.lock().unwrap();
        s.interactions_made += 1;
        let id = format!("v1_premade{}", s.interactions_made);
        let interaction = serde_json::json!({"id": id, "status": "completed"});
        s.resources
            .insert(format!("interactions/{id}"), (project.into(), interaction));
        id
    }

    /// SSE answers send `events` events, `gap` apart.
    pub fn sse(&self, events: usize, gap: Duration) -> &Self {
        let mut s = self.state.lock().unwrap();
        s.sse_events = events;
        s.sse_gap = gap;
        self
    }

    /// SSE answers stop after `events` events by cutting the connection.
    pub fn sse_abort_after(&self, events: usize) -> &Self {
        self.state.lock().unwrap().sse_abort_after = Some(events);
        self
    }

    /// generateContent answers carry `bytes` more bytes of text.
    pub fn answer_padding(&self, bytes: usize) -> &Self {
        self.state.lock().unwrap().padding = bytes;
        self
    }

    /// Successful answers are gzipped for clients that accept gzip, like errors are.
    pub fn gzip_success(&self, on: bool) -> &Self {
        self.state.lock().unwrap().gzip_success = on;
        self
    }

    /// Non-streaming answers wait `delay` before their header.
    /// Answers requests made with `key` only after `delay` (a slow or hung upstream path).
    pub fn slow_key(&self, key: &str, delay: Duration) -> &Self {
        self.state
            .lock()
            .unwrap()
            .slow_keys
            .insert(key.to_string(), delay);
        self
    }

    pub fn delay(&self, delay: Duration) -> &Self {
        self.state.lock().unwrap().delay = delay;
        self
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Keys of the requests received, in order.
    pub fn keys_seen(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|s| s.key.unwrap_or_default())
            .collect()
    }

    /// Connections that carried at least one request (a bare TCP connect is not counted).
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// The project owning `files/...` or `cachedContents/...`, if it exists.
    pub fn owner_of(&self, name: &str) -> Option<String> {
        let s = self.state.lock().unwrap();
        s.resources.get(name).map(|(project, _)| project.clone())
    }

    /// How many resumable uploads were started.
    pub fn uploads_started(&self) -> usize {
        self.state.lock().unwrap().uploads_started
    }

    /// How many Live API WebSocket upgrades were accepted (answered 101).
    pub fn ws_sessions(&self) -> usize {
        self.state.lock().unwrap().ws_sessions
    }
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(
            Full::new(body.into())
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}

fn json(status: u16, body: String, openai: bool) -> Response<Body> {
    let body = if openai && status >= 400 {
        format!("[{body}]")
    } else {
        body
    };
    full(status, "application/json; charset=UTF-8", body)
}

fn sse(chunks: Vec<String>, gap: Duration, abort_after: Option<usize>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        for (i, chunk) in chunks.into_iter().enumerate() {
            if abort_after == Some(i) {
                let cut = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "mock cut");
                let _ = tx.send(Err(cut)).await;
                return;
            }
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(Frame::data), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

async fn handle(
    state: Arc<Mutex<State>>,
    connection: usize,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let fault = {
        let mut s = state.lock().unwrap();
        s.arrivals += 1;
        let generation = req.uri().path().contains("enerateContent");
        match s.faults.as_mut().filter(|_| generation) {
            None => Fault::None,
            Some(f) => {
                let roll = f.next();
                if roll < f.reset {
                    f.resets += 1;
                    Fault::Reset
                } else if roll < f.reset + f.p503 {
                    f.statuses += 1;
                    Fault::Status(503)
                } else if roll < f.reset + f.p503 + f.p500 {
                    f.statuses += 1;
                    Fault::Status(500)
                } else {
                    Fault::None
                }
            }
        }
    };
    match fault {
        // hyper closes the connection without a byte of answer.
        Fault::Reset => return Err(std::io::Error::other("injected reset")),
        Fault::Status(503) => return Ok(json(503, OVERLOADED_BODY.into(), false)),
        Fault::Status(_) => {
            return Ok(json(
                500,
                r#"{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}"#.into(),
                false,
            ))
        }
        Fault::None => {}
    }
    // A relay in front of Google: its base path comes off (or it knows no such route), and it
    // may refuse the request itself before Google sees it.
    let full_path = req.uri().path().to_string();
    let (relayed, refusal) = relay(&state.lock().unwrap(), &full_path, req.headers());
    let upgrade = (refusal.is_none() && is_live_upgrade(&req, &relayed))
        .then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let header = |name| header_str(&parts.headers, name).map(str::to_string);
    // The Live API takes the key as a header or `?key=` (JS SDK); the rest as a header or a
    // bearer token (the OpenAI-compatible endpoints).
    let key = header("x-goog-api-key").or_else(|| match upgrade {
        Some(_) => {
            let query = parts.uri.query()?;
            let key = query.split('&').find_map(|p| p.strip_prefix("key="))?;
            Some(key.to_string())
        }
        None => header("authorization")?
            .strip_prefix("Bearer ")
            .map(str::to_string),
    });
    // Google reads the path decoded: %-escapes and dot segments resolved.
    let path = google_path(&relayed);
    let query = parts.uri.query().map(str::to_string);
    let slow = key
        .as_deref()
        .and_then(|k| state.lock().unwrap().slow_keys.get(k).copied());
    if let Some(slow) = slow {
        tokio::time::sleep(slow).await;
    }
    let delay = state.lock().unwrap().delay;
    if !delay.is_zero() && !path.contains("streamGenerateContent") {
        tokio::time::sleep(delay).await;
    }
    let response = match (refusal, upgrade) {
        (Some(refusal), _) => refusal,
        (None, Some(on)) => live(&state, &parts, key.as_deref(), on),
        (None, None) => decide(&state, &parts, &path, key.as_deref(), &body),
    };
    // Like Google, compress error answers for clients that accept gzip.
    let accepts_gzip = parts
        .headers
        .get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("gzip"));
    let gzip_success = state.lock().unwrap().gzip_success;
    let response = if accepts_gzip && (response.status().as_u16() >= 400 || gzip_success) {
        gzipped(response).await
    } else {
        response
    };
    state.lock().unwrap().seen.push(Seen {
        method: parts.method.to_string(),
        path,
        full_path,
        query,
        headers: parts.headers,
        body,
        key,
        status: response.status().as_u16(),
        connection,
        version: parts.version,
    });
    Ok(response)
}

/// What a relay in front of Google (if the mock is one) makes of a request to `path`: the path
/// Google sees, and the relay's own refusal (no route outside its base path, a missing or wrong
/// token of its own, its rate limit), if any.
fn relay(s: &State, path: &str, headers: &http::HeaderMap) -> (String, Option<Response<Body>>) {
    let inner = match path.strip_prefix(s.base_path.as_str()) {
        _ if s.base_path.is_empty() => path,
        Some(rest) if rest.starts_with('/') => rest,
        _ => {
            let refusal = full(404, "text/plain", "relay: no route for this path");
            return (path.to_string(), Some(refusal));
        }
    };
    let authorised = s
        .relay_auth
        .as_ref()
        .is_none_or(|(name, value)| header_str(headers, name) == Some(value.as_str()));
    let refusal = if !authorised {
        Some(full(401, "application/json", RELAY_UNAUTHORIZED_BODY))
    } else if s.relay_limited {
        Some(full(429, "application/json", RELAY_LIMITED_BODY))
    } else {
        None
    };
    (inner.to_string(), refusal)
}

async fn gzipped(response: Response<Body>) -> Response<Body> {
    use std::io::Write;
    let (mut parts, body) = response.into_parts();
    let plain = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).unwrap();
    let zipped = enc.finish().unwrap();
    parts
        .headers
        .insert("content-encoding", "gzip".parse().unwrap());
    parts.headers.remove("content-length");
    Response::from_parts(
        parts,
        Full::new(Bytes::from(zipped))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    )
}

fn decide(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let query = parts.uri.query();
    let openai = path.contains("/openai/");
    let mut s = state.lock().unwrap();

    if let Some(answer) = canned(&mut s, key, openai) {
        return answer;
    }
    // Upload continuations need no key: the upload id authorises them.
    if let Some(id) = query
        .unwrap_or("")
        .split('&')
        .find_map(|p| p.strip_prefix("upload_id="))
    {
        let id = id.to_string();
        return upload_chunk(&mut s, path, &id, &parts.headers, body);
    }
    let project = match project_of(&s, key) {
        Ok(project) => project,
        Err((status, body)) => return json(status, body, openai),
    };
    if let Some(answer) = resource(&mut s, parts, path, &project, body) {
        return answer;
    }
    if let Some(denied) = foreign_mention(&s, &project, body) {
        return json(403, denied, openai);
    }
    if parts.method == http::Method::GET && !openai && path.ends_with("/models") {
        return json(200, MODELS_BODY.into(), false);
    }

    let request: serde_json::Value =
        serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let model = if openai {
        request["model"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("models/")
            .to_string()
    } else {
        path.split("/models/")
            .nth(1)
            .map(|rest| rest.split(':').next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    if model == "no-such-model" {
        return json(404, r#"{"error":{"code":404,"message":"models/no-such-model is not found for API version v1beta, or is not supported for generateContent.","status":"NOT_FOUND"}}"#.into(), openai);
    }
    if body.windows(15).any(|w| w == b"INVALID_PAYLOAD") {
        return json(400, BAD_REQUEST_BODY.into(), openai);
    }
    // Reading (listing models, say) spends no quota.
    if parts.method != http::Method::GET {
        if let Some(refusal) = spend(&mut s, &project, &model, openai) {
            return refusal;
        }
    }

    let text = format!("hello from {project}{}", "x".repeat(s.padding));
    let (events, gap, abort) = (s.sse_events, s.sse_gap, s.sse_abort_after);
    drop(s);
    if openai {
        if path.ends_with("/chat/completions") {
            if request["stream"].as_bool() == Some(true) {
                let mut chunks: Vec<String> = (0..events)
                    .map(|i| {
                        let finish = if i + 1 == events { r#""stop""# } else { "null" };
                        format!(
                            "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"chunk {i} \"}},\"finish_reason\":{finish}}}]}}\n\n"
                        )
                    })
                    .collect();
                chunks.push("data: [DONE]\n\n".into());
                return sse(chunks, gap, abort);
            }
            return json(
                200,
                format!(
                    r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{text}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}}}"#
                ),
                false,
            );
        }
        if parts.method == http::Method::GET && path.ends_with("/openai/models") {
            return json(200, OPENAI_MODELS_BODY.into(), false);
        }
        return json(200, r#"{"object":"list","data":[]}"#.into(), false);
    }
    if path.ends_with(":streamGenerateContent") {
        let chunks: Vec<String> = (0..events)
            .map(|i| {
                let tail = if i + 1 == events {
                    r#","finishReason":"STOP"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}"#.to_string()
                } else {
                    "}]".to_string()
                };
                let event = format!(
                    r#"{{"candidates":[{{"content":{{"parts":[{{"text":"chunk {i} "}}],"role":"model"}},"index":0{tail},"modelVersion":"{model}"}}"#
                );
                if query.is_some_and(|q| q.contains("alt=sse")) {
                    format!("data: {event}\r\n\r\n")
                } else {
                    let sep = if i == 0 { "[" } else { "," };
                    let end = if i + 1 == events { "]" } else { "" };
                    format!("{sep}{event}{end}")
                }
            })
            .collect();
        return sse(chunks, gap, abort);
    }
    if path.ends_with(":generateContent") {
        return json(
            200,
            format!(
                r#"{{"candidates":[{{"content":{{"parts":[{{"text":"{text}"}}],"role":"model"}},"finishReason":"STOP","index":0}}],"usageMetadata":{{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}},"modelVersion":"{model}"}}"#
            ),
            false,
        );
    }
    json(200, r#"{"models":[]}"#.into(), false)
}

/// The next canned answer for `key`, if any is left.
fn canned(s: &mut State, key: Option<&str>, openai: bool) -> Option<Response<Body>> {
    let c = s
        .canned
        .iter_mut()
        .find(|c| c.remaining > 0 && (c.key.is_none() || c.key.as_deref() == key))?;
    c.remaining -= 1;
    let mut answer = json(c.status, c.body.clone(), openai);
    for (name, value) in &c.headers {
        answer.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    Some(answer)
}

/// The project of `key`, or Google's status and body for a missing, invalid or suspended key.
fn project_of(s: &State, key: Option<&str>) -> Result<String, (u16, String)> {
    match (key, key.map(|key| s.keys.get(key))) {
        (_, None) => Err((403, UNREGISTERED_BODY.into())),
        (_, Some(Some(KeyState::Valid { project }))) => Ok(project.clone()),
        (Some(key), Some(Some(KeyState::Suspended))) => Err((403, suspended_body(key))),
        _ => Err((400, INVALID_KEY_BODY.into())),
    }
}

/// Counts one request of `project` for `model` against its quota, or answers its 429.
fn spend(s: &mut State, project: &str, model: &str, openai: bool) -> Option<Response<Body>> {
    if s.billing
        .get(project)
        .is_some_and(|account| s.capped_accounts.contains(account))
    {
        return Some(json(429, ACCOUNT_CAP_BODY.into(), openai));
    }
    if let Some(q) = s.quotas.get(&(project.into(), model.into())) {
        if q.limit_zero {
            return Some(json(429, LIMIT_ZERO_BODY.replace("MODEL", model), openai));
        }
        if q.detail_less {
            return Some(json(429, DETAIL_LESS_QUOTA_BODY.into(), openai));
        }
    }
    if let Some(b) = s.buckets.get_mut(project) {
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * b.rate).min(b.burst);
        b.at = now;
        if b.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - b.tokens) / b.rate);
            let body = PER_MINUTE_BODY
                .replace("MODEL", model)
                .replace("DELAY", &google_duration(wait));
            return Some(json(429, body, openai));
        }
        b.tokens -= 1.0;
    }
    let q = s.quotas.get_mut(&(project.into(), model.into()))?;
    if let Some(day) = q.per_day {
        if q.used >= day {
            return Some(json(429, PER_DAY_BODY.replace("MODEL", model), openai));
        }
    }
    if let Some((minute, delay)) = &q.per_minute {
        if q.used >= *minute {
            let body = PER_MINUTE_BODY
                .replace("MODEL", model)
                .replace("DELAY", delay);
            return Some(json(429, body, openai));
        }
    }
    if let Some(w) = &mut q.window {
        let now = Instant::now();
        if w.start.is_some_and(|t| now >= t + w.length) {
            (w.start, w.count) = (None, 0);
        }
        if w.count >= w.allowed {
            let left = w
                .start
                .map_or(w.length, |t| (t + w.length).saturating_duration_since(now));
            let body = PER_MINUTE_BODY
                .replace("MODEL", model)
                .replace("DELAY", &google_duration(left));
            return Some(json(429, body, openai));
        }
        w.start.get_or_insert(now);
        w.count += 1;
    }
    q.used += 1;
    None
}

/// `GET /ws/google.ai.generativelanguage.{v1,v1beta,v1alpha}.GenerativeService.BidiGenerateContent`
/// with `Upgrade: websocket` (google-genai 3.4.0 uses `v1`).
fn is_live_upgrade(req: &Request<Incoming>, path: &str) -> bool {
    let live = ["v1", "v1beta", "v1alpha"].map(|v| {
        format!("/ws/google.ai.generativelanguage.{v}.GenerativeService.BidiGenerateContent")
    });
    req.method() == http::Method::GET
        && live.iter().any(|l| l == path)
        && header_str(req.headers(), "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A Live API upgrade: Google's HTTP answer to a bad key or an exhausted `live` quota before any
/// switch; otherwise 101 and an echo session of the key's project.
fn live(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    key: Option<&str>,
    on: hyper::upgrade::OnUpgrade,
) -> Response<Body> {
    let mut s = state.lock().unwrap();
    if let Some(answer) = canned(&mut s, key, false) {
        return answer;
    }
    let project = match project_of(&s, key) {
        Ok(project) => project,
        Err((status, body)) => return json(status, body, false),
    };
    let Some(ws_key) = parts.headers.get("sec-websocket-key") else {
        return json(400, r#"{"error":{"code":400,"message":"Missing Sec-WebSocket-Key.","status":"INVALID_ARGUMENT"}}"#.into(), false);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    if let Some(refusal) = spend(&mut s, &project, "live", false) {
        return refusal;
    }
    s.ws_sessions += 1;
    tokio::spawn(live_session(on, project));
    Response::builder()
        .status(101)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(
            Full::new(Bytes::new())
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .unwrap()
}

/// After the switch, Google's Live protocol in miniature: the client's first text message (its
/// `setup`) gets `{"setupComplete":{}}`; every later text message comes back as a model turn
/// `echo from <project>: <message>`; binary messages come back as they came. tungstenite itself
/// answers Ping and Close.
async fn live_session(on: hyper::upgrade::OnUpgrade, project: String) {
    use futures_util::{SinkExt, StreamExt};
    let Ok(upgraded) = on.await else {
        return;
    };
    let role = tokio_tungstenite::tungstenite::protocol::Role::Server;
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), role, None)
            .await;
    let mut set_up = false;
    // A Close is answered by tungstenite; the next read then ends the stream.
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Text(_) if !set_up => {
                set_up = true;
                Message::text(r#"{"setupComplete":{}}"#)
            }
            Message::Text(text) => {
                let echo =
                    serde_json::to_string(&format!("echo from {project}: {}", text.as_str()))
                        .unwrap();
                Message::text(format!(
                    r#"{{"serverContent":{{"modelTurn":{{"role":"model","parts":[{{"text":{echo}}}]}},"turnComplete":true}}}}"#
                ))
            }
            Message::Binary(data) => Message::Binary(data),
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// `d` as Google writes a duration: "53s", "1.234s" (rounded up to the millisecond).
pub fn google_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    match ms % 1000 {
        0 => format!("{}s", ms / 1000),
        frac => format!("{}.{frac:03}s", ms / 1000),
    }
}

fn now_plus(d: Duration) -> String {
    (chrono::Utc::now() + d).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Standard padded base64 (Google's `sha256Hash` is the hex digest in base64).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(match i <= c.len() {
                true => ABC[(n >> (18 - 6 * i)) as usize & 63] as char,
                false => '=',
            });
        }
    }
    out
}

/// The ids that `text` names after `prefix` (`files/` gives `abc` for `.../v1/files/abc"`).
fn named<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> {
    text.match_indices(prefix).filter_map(move |(i, _)| {
        if text[..i].ends_with(|c: char| c.is_ascii_alphanumeric()) {
            return None; // e.g. "profiles/"
        }
        let rest = &text[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(rest.len());
        Some(&rest[..end]).filter(|id| !id.is_empty())
    })
}

/// Google's 403 for the first file or cached content that `body` names and `project` does not
/// own. Like Google, the mock reads JSON strings decoded (`files\u002fabc` is `files/abc`) and
/// URIs with their %-escapes and dot segments resolved; a body that is not JSON is scanned as
/// text.
fn foreign_mention(s: &State, project: &str, body: &[u8]) -> Option<String> {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => {
            let mut strings = Vec::new();
            json_strings(&value, &mut strings);
            strings
                .iter()
                .map(|v| format!("\"{}\"", google_path(v.trim())))
                .collect::<Vec<_>>()
                .join(",")
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let owned = |name: String| s.resources.get(&name).is_some_and(|(p, _)| p == project);
    if let Some(id) = named(&text, "files/").find(|id| !owned(format!("files/{id}"))) {
        return Some(FILE_DENIED_BODY.replace("ID", id));
    }
    let foreign_cache =
        named(&text, "cachedContents/").any(|id| !owned(format!("cachedContents/{id}")));
    foreign_cache.then(|| CACHE_DENIED_BODY.to_string())
}

/// The string values Google reads as references: those of `fileUri`, `cachedContent` and
/// `fileName` (either spelling), outside function-call arguments and results.
fn json_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    const FIELDS: [&str; 6] = [
        "fileUri",
        "file_uri",
        "cachedContent",
        "cached_content",
        "fileName",
        "file_name",
    ];
    match value {
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if FIELDS.contains(&k.as_str()) => {
                        out.push(s.clone())
                    }
                    _ if k == "args" || k == "response" => {}
                    v => json_strings(v, out),
                }
            }
        }
        _ => {}
    }
}

/// A path (or a URI, or a bare resource name) as Google reads it: %-escapes decoded, empty and
/// `.` segments dropped, `..` segments resolved.
pub fn google_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                decoded.push(b);
                i += 3;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let (head, rest) = match text.find("://") {
        Some(i) => {
            let after = &text[i + 3..];
            let cut = after.find('/').map_or(text.len(), |j| i + 3 + j);
            (text[..cut].to_string(), text[cut..].to_string())
        }
        None => (String::new(), text),
    };
    let mut segments: Vec<&str> = Vec::new();
    for segment in rest.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let lead = if rest.starts_with('/') || !head.is_empty() {
        "/"
    } else {
        ""
    };
    format!("{head}{lead}{}", segments.join("/"))
}

/// The lower-cased commands of `x-goog-upload-command` ("upload, finalize" gives both).
fn upload_commands(headers: &http::HeaderMap) -> Vec<String> {
    let value = headers
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    value
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect()
}

fn header_str<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// An answer of the upload protocol, with `x-goog-upload-status: {upload_status}`.
fn upload_reply(status: u16, body: String, upload_status: &str) -> Response<Body> {
    let mut r = json(status, body, false);
    r.headers_mut()
        .insert("x-goog-upload-status", upload_status.parse().unwrap());
    r
}

/// An upload continuation (`upload`, `upload, finalize`) to `/upload/{ver}/files?upload_id=`.
/// Errors carry `x-goog-upload-status: final` so that the SDK fails at once.
fn upload_chunk(
    s: &mut State,
    path: &str,
    id: &str,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Response<Body> {
    let error = |code: u16, status: &str, message: String| {
        let body =
            format!(r#"{{"error":{{"code":{code},"message":"{message}","status":"{status}"}}}}"#);
        upload_reply(code, body, "final")
    };
    let commands = upload_commands(headers);
    let Some(upload) = s.uploads.get_mut(id) else {
        return error(404, "NOT_FOUND", format!("Upload {id} not found."));
    };
    if !commands.iter().any(|c| c == "upload" || c == "finalize") {
        let got = commands.join(", ");
        return error(
            400,
            "INVALID_ARGUMENT",
            format!("Unsupported upload command: {got}."),
        );
    }
    let offset = header_str(headers, "x-goog-upload-offset").and_then(|v| v.parse().ok());
    if commands.iter().any(|c| c == "upload") {
        if offset != Some(upload.data.len()) {
            let have = upload.data.len();
            s.uploads.remove(id);
            return error(
                400,
                "INVALID_ARGUMENT",
                format!("Upload offset {offset:?} does not match the {have} bytes received."),
            );
        }
        upload.data.extend_from_slice(body);
    }
    if !commands.iter().any(|c| c == "finalize") {
        return upload_reply(200, String::new(), "active");
    }
    let upload = s.uploads.remove(id).unwrap();
    if upload.declared.is_some_and(|n| n != upload.data.len()) {
        let (declared, got) = (upload.declared.unwrap(), upload.data.len());
        return error(
            400,
            "INVALID_ARGUMENT",
            format!("Declared {declared} bytes, received {got}."),
        );
    }
    use sha2::Digest;
    s.files_made += 1;
    let name = format!("files/mockfile{}", s.files_made);
    let ver = path.split('/').nth(2).unwrap_or("v1beta");
    let now = now_plus(Duration::ZERO);
    let mut file = serde_json::json!({
        "name": name,
        "mimeType": upload.mime_type,
        "sizeBytes": upload.data.len().to_string(),
        "createTime": now,
        "updateTime": now,
        "expirationTime": now_plus(Duration::from_secs(48 * 3600)),
        "sha256Hash": base64(format!("{:x}", sha2::Sha256::digest(&upload.data)).as_bytes()),
        "uri": format!("{}/{ver}/{name}", s.base),
        "state": "ACTIVE",
        "source": "UPLOADED",
    });
    if let Some(display) = upload.display_name {
        file["displayName"] = display.into();
    }
    let body = serde_json::json!({ "file": file }).to_string();
    s.resources.insert(name, (upload.project, file));
    upload_reply(200, body, "final")
}

/// Upload starts, files and cached contents (`/{ver}/files/{id}`, `/{ver}/cachedContents[/{id}]`)
/// for a request of `project`; `None` for any other path.
fn resource(
    s: &mut State,
    parts: &http::request::Parts,
    path: &str,
    project: &str,
    body: &[u8],
) -> Option<Response<Body>> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = &parts.method;
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    match segments[..] {
        ["upload", ver, "files"] if ver.starts_with("v1") && method == http::Method::POST => {
            if !upload_commands(&parts.headers).iter().any(|c| c == "start") {
                return Some(json(400, r#"{"error":{"code":400,"message":"Missing x-goog-upload-command: start.","status":"INVALID_ARGUMENT"}}"#.into(), false));
            }
            let headers = &parts.headers;
            // Google takes either spelling; google-genai sends `mime_type`.
            let field = |camel: &str, snake: &str| {
                let file = &request["file"];
                file[camel]
                    .as_str()
                    .or(file[snake].as_str())
                    .map(str::to_string)
            };
            let mime_type = field("mimeType", "mime_type")
                .or(header_str(headers, "x-goog-upload-header-content-type").map(str::to_string))
                .unwrap_or("application/octet-stream".into());
            s.uploads_started += 1;
            let id = format!("mock-upload-{}", s.uploads_started);
            s.uploads.insert(
                id.clone(),
                Upload {
                    project: project.into(),
                    display_name: field("displayName", "display_name"),
                    mime_type,
                    declared: header_str(headers, "x-goog-upload-header-content-length")
                        .and_then(|v| v.trim().parse().ok()),
                    data: Vec::new(),
                },
            );
            // Under a relay, the upload URL is the relay's (as one that rewrites it would).
            let url = format!(
                "{}{}/upload/{ver}/files?upload_id={id}&upload_protocol=resumable",
                s.base, s.base_path
            );
            let mut r = upload_reply(200, String::new(), "active");
            r.headers_mut()
                .insert("x-goog-upload-url", url.parse().unwrap());
            Some(r)
        }
        // Video generation: an operation that is done at once, its video a new file of the
        // project; reading the operation names the file, which downloads as bytes.
        [ver, "models", model]
            if ver.starts_with("v1") && model.ends_with(":predictLongRunning") =>
        {
            s.files_made += 1;
            let n = s.files_made;
            let model = model.trim_end_matches(":predictLongRunning");
            let op_name = format!("models/{model}/operations/op{n}");
            let file = format!("files/video{n}");
            let operation = serde_json::json!({
                "name": op_name,
                "done": true,
                "response": {"generateVideoResponse": {"generatedSamples": [
                    {"video": {"uri": format!("{}/{ver}/{file}:download?alt=media", s.base)}}
                ]}},
            });
            s.resources.insert(
                file.clone(),
                (project.into(), serde_json::json!({"name": file})),
            );
            s.resources
                .insert(format!("operations/op{n}"), (project.into(), operation));
            Some(json(
                200,
                serde_json::json!({ "name": op_name }).to_string(),
                false,
            ))
        }
        [ver, "models", _, "operations", op]
            if ver.starts_with("v1") && method == http::Method::GET =>
        {
            let name = format!("operations/{op}");
            Some(match s.resources.get(&name).filter(|(p, _)| p == project) {
                Some((_, operation)) => json(200, operation.to_string(), false),
                None => json(404, r#"{"error":{"code":404,"message":"Operation not found.","status":"NOT_FOUND"}}"#.into(), false),
            })
        }
        [ver, "files", id] if ver.starts_with("v1") && id.ends_with(":download") => {
            let name = format!("files/{}", id.trim_end_matches(":download"));
            Some(match s.resources.get(&name).filter(|(p, _)| p == project) {
                Some(_) => full(200, "video/mp4", "mock video bytes"),
                None => json(403, FILE_DENIED_BODY.replace("ID", &name), false),
            })
        }
        [ver, "cachedContents"] if ver.starts_with("v1") && method == http::Method::POST => {
            if let Some(denied) = foreign_mention(s, project, body) {
                return Some(json(403, denied, false));
            }
            s.caches_made += 1;
            let name = format!("cachedContents/mockcache{}", s.caches_made);
            let ttl = request["ttl"]
                .as_str()
                .and_then(|t| t.trim_end_matches('s').parse::<f64>().ok())
                .unwrap_or(3600.0);
            let now = now_plus(Duration::ZERO);
            let mut cache = serde_json::json!({
                "name": name,
                "model": request["model"],
                "createTime": now,
                "updateTime": now,
                "expireTime": now_plus(Duration::from_secs_f64(ttl)),
                "usageMetadata": {"totalTokenCount": 10},
            });
            if let Some(display) = request["displayName"].as_str() {
                cache["displayName"] = display.into();
            }
            let answer = cache.to_string();
            s.resources.insert(name, (project.into(), cache));
            Some(json(200, answer, false))
        }
        [ver, "interactions"] if ver.starts_with("v1") && method == http::Method::POST => {
            Some(new_interaction(s, project, &request))
        }
        [ver, "interactions", id]
            if ver.starts_with("v1")
                && (method == http::Method::GET || method == http::Method::DELETE) =>
        {
            let name = format!("interactions/{id}");
            Some(match s.resources.get(&name).filter(|(p, _)| p == project) {
                None => json(404, interaction_not_found(id), false),
                Some((_, interaction)) if method == http::Method::GET => {
                    json(200, interaction.to_string(), false)
                }
                Some(_) => {
                    s.resources.remove(&name);
                    json(200, "{}".into(), false)
                }
            })
        }
        [ver, kind @ ("files" | "cachedContents")]
            if ver.starts_with("v1") && method == http::Method::GET =>
        {
            let mut items: Vec<(&String, &serde_json::Value)> = s
                .resources
                .iter()
                .filter(|(name, (p, _))| name.starts_with(kind) && p == project)
                .map(|(name, (_, value))| (name, value))
                .collect();
            items.sort_by_key(|(name, _)| name.to_string());
            let list: Vec<&serde_json::Value> = items.into_iter().map(|(_, v)| v).collect();
            Some(json(
                200,
                serde_json::json!({ kind: list }).to_string(),
                false,
            ))
        }
        [ver, kind @ ("files" | "cachedContents"), id]
            if ver.starts_with("v1")
                && (method == http::Method::GET || method == http::Method::DELETE) =>
        {
            let name = format!("{kind}/{id}");
            let owned = s.resources.get(&name).filter(|(p, _)| p == project);
            let answer = match owned {
                None if kind == "files" => json(403, FILE_DENIED_BODY.replace("ID", id), false),
                None => json(403, CACHE_DENIED_BODY.into(), false),
                Some((_, resource)) if method == http::Method::GET => {
                    json(200, resource.to_string(), false)
                }
                Some(_) => {
                    s.resources.remove(&name);
                    json(200, "{}".into(), false)
                }
            };
            Some(answer)
        }
        _ => None,
    }
}

/// Google's answer for an interaction the key's project does not hold.
fn interaction_not_found(id: &str) -> String {
    format!(
        r#"{{"error":{{"code":404,"message":"Interaction {id} not found.","status":"NOT_FOUND"}}}}"#
    )
}

/// `POST /{ver}/interactions`: a new interaction of `project`, answering "hello from
/// {project}"; a follow-up whose `previous_interaction_id` the project does not hold gets 404.
/// With `"stream": true` the answer is server-sent events, the first naming the interaction.
fn new_interaction(s: &mut State, project: &str, request: &serde_json::Value) -> Response<Body> {
    let previous = request["previous_interaction_id"].as_str();
    if let Some(prev) = previous {
        let name = format!("interactions/{prev}");
        if s.resources.get(&name).is_none_or(|(p, _)| p != project) {
            return json(404, interaction_not_found(prev), false);
        }
    }
    s.interactions_made += 1;
    let id = format!("v1_mockint{}", s.interactions_made);
    let text = format!("hello from {project}{}", "x".repeat(s.padding));
    let interaction = serde_json::json!({
        "id": id,
        "status": "completed",
        "model": request["model"],
        "previous_interaction_id": previous,
        "outputs": [{"type": "text", "text": text}],
        "usage": {"total_input_tokens": 3, "total_output_tokens": 4, "total_tokens": 7},
    });
    s.resources.insert(
        format!("interactions/{id}"),
        (project.into(), interaction.clone()),
    );
    if request["stream"].as_bool() != Some(true) {
        return json(200, interaction.to_string(), false);
    }
    let event = |kind: &str, data: serde_json::Value| format!("event: {kind}\ndata: {data}\n\n");
    let chunks = vec![
        event(
            "interaction.created",
            serde_json::json!({"event_type": "interaction.created", "interaction": {"id": id, "status": "in_progress"}}),
        ),
        event(
            "step.delta",
            serde_json::json!({"event_type": "step.delta", "index": 0, "delta": {"type": "text", "text": text}}),
        ),
        event(
            "interaction.completed",
            serde_json::json!({"event_type": "interaction.completed", "interaction": interaction}),
        ),
    ];
    sse(chunks, s.sse_gap, s.sse_abort_after)
}

// ---------------------------------------------------------------------------------------------
// keygate process
// ---------------------------------------------------------------------------------------------

/// A running `keygate` binary with its own config file and captured log.
pub struct Keygate {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    config: PathBuf,
    /// Every key and token the test gave this keygate: none may ever show in its log.
    secrets: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Keygate {
    fn drop(&mut self) {
        // Access lines written while keygate is busy wait up to 5 ms for their batch: give them
        // time to land, so that the check below sees every line.
        std::thread::sleep(Duration::from_millis(20));
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Suite-wide: whatever a test checked, keygate's log holds none of the secrets it was
        // given (keys and tokens in the config and its environment).
        if !std::thread::panicking() {
            self.assert_logs_clean(&self.secrets.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

/// The keys and tokens in a test's config and environment, as far as a test's naming shows
/// them: values of `key:`/`token:` fields, of bare list entries under `keys:`, of `keys: [...]`
/// flow lists, and environment values. Short values (fewer than 6 characters, like `k1`) are
/// left out: they would match unrelated text.
pub fn secrets_of(yaml: &str, env: &[(&str, &str)]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let clean = |v: &str| {
        v.trim()
            .trim_matches(|c| c == '"' || c == '\'' || c == '{' || c == '}')
            .to_string()
    };
    for line in yaml.lines() {
        let line = line.trim().trim_start_matches("- ");
        for field in ["key:", "token:"] {
            for part in line.split(',') {
                let part = part.trim().trim_start_matches('{').trim();
                if let Some(v) = part.strip_prefix(field) {
                    out.push(clean(v));
                }
            }
        }
        if let Some(list) = line.strip_prefix("keys:").map(str::trim) {
            if list.starts_with('[') && !list.contains("key:") {
                out.extend(list.trim_matches(['[', ']']).split(',').map(clean));
            }
        }
    }
    for (name, value) in env {
        if name.contains("KEY") || name.contains("TOKEN") || name.contains("AUTH") {
            out.extend(value.split([',', ':']).map(clean));
        }
    }
    out.retain(|s| s.len() >= 6);
    out.sort();
    out.dedup();
    out
}

/// Whether process `pid` holds the socket listening on `addr` (an IPv4 address): one of its
/// open files is the socket `/proc/net/tcp` lists as listening there.
fn holds_listener(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(v4.ip().octets()),
        v4.port()
    );
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // Columns: sl, local_address, rem_address, st (0A: listening), ..., inode (the tenth).
    let inodes: HashSet<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == "0A")
        .map(|f| f[9])
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| {
            target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
                .is_some_and(|inode| inodes.contains(inode))
        })
}

impl Keygate {
    /// Starts keygate with `yaml` (everything but `listen`, which is added).
    pub fn start(yaml: &str) -> Keygate {
        Keygate::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Keygate {
        Keygate::start_with_nofile(yaml, env, None)
    }

    /// Like [`Keygate::start_with_env`]; with `nofile`, the process may hold at most that many
    /// open files (`RLIMIT_NOFILE`, soft and hard), as on a small VPS.
    pub fn start_with_nofile(yaml: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Keygate {
        let dir = tempfile::tempdir().unwrap();
        for attempt in 0..5 {
            let port = StdListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let config = dir.path().join("keygate.yaml");
            // Two workers unless the test chooses: closer to production than one.
            let threads = if yaml.contains("threads:") {
                ""
            } else {
                "threads: 2\n"
            };
            std::fs::write(&config, format!("listen: \"{addr}\"\n{threads}{yaml}")).unwrap();
            let log = dir.path().join(format!("keygate-{attempt}.log"));
            let log_file = std::fs::File::create(&log).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_keygate"));
            cmd.arg("--config")
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file);
            for (k, v) in env {
                cmd.env(k, v);
            }
            if let Some(n) = nofile {
                use std::os::unix::process::CommandExt;
                // SAFETY: setrlimit is async-signal-safe and touches only the child.
                #[allow(unsafe_code)]
                unsafe {
                    cmd.pre_exec(move || {
                        let limit = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let mut child = cmd.spawn().expect("spawn keygate");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("cannot listen") && attempt < 4 {
                        break; // the port was taken meanwhile: try another
                    }
                    panic!("keygate exited with {status}:\n{text}");
                }
                // Another test's keygate may have taken the port first and answer there while
                // this one has yet to find out: only this process's own listener counts.
                if TcpStream::connect(addr).is_ok() && holds_listener(child.id(), addr) {
                    return Keygate {
                        child,
                        addr,
                        log,
                        config,
                        secrets: secrets_of(yaml, env),
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("keygate did not start listening on {addr}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not find a free port for keygate");
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The keygate process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the keygate process, in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// The config file keygate was started with.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }

    /// Replaces the config file (keeping `listen` and `threads`) for a reload.
    pub fn rewrite_config(&self, yaml: &str) {
        let old = std::fs::read_to_string(&self.config).unwrap();
        let head: String = old
            .lines()
            .filter(|l| l.starts_with("listen:") || l.starts_with("threads:"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&self.config, format!("{head}{yaml}")).unwrap();
    }

    /// Sends a signal to the keygate process.
    pub fn signal(&self, signal: i32) {
        #[allow(unsafe_code)]
        // SAFETY: kill(2) with a pid we spawned and a signal number; no memory is touched.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Waits (bounded) for the process to exit; its exit code, or `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log holds `needle`; the access line is written just after the
    /// response, so a test may look a moment before it lands.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let logs = self.logs();
            if logs.contains(needle) || Instant::now() > deadline {
                return logs;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics if any of `secrets` appears in keygate's log.
    pub fn assert_logs_clean(&self, secrets: &[&str]) {
        let logs = self.logs();
        for s in secrets {
            assert!(
                !logs.contains(s),
                "secret {s:?} found in keygate's log:\n{logs}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Admin listener
// ---------------------------------------------------------------------------------------------

/// The admin token the tests configure (through `KEYGATE_ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// A free port on 127.0.0.1 (free when asked).
pub fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Waits (bounded) until something listens on `addr`.
pub fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start listening");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts keygate with `yaml` plus an admin listener on a free port; returns it and the admin
/// base URL (`http://127.0.0.1:PORT`).
pub fn start_with_admin(yaml: &str) -> (Keygate, String) {
    let addr = free_addr();
    let kg = Keygate::start_with_env(
        &format!("{yaml}admin:\n  listen: \"{addr}\"\n  token_env: KEYGATE_ADMIN_TOKEN\n"),
        &[("KEYGATE_ADMIN_TOKEN", ADMIN_TOKEN)],
    );
    wait_port(addr);
    (kg, format!("http://{addr}"))
}

/// A certificate for `localhost` signed by a fresh test CA, written to `dir` as PEM files:
/// (certificate, private key, CA certificate to trust it with).
pub fn localhost_cert(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (Python) takes a leaf named like its issuer for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keygate test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&paths.0, leaf.pem()).unwrap();
    std::fs::write(&paths.1, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&paths.2, ca.pem()).unwrap();
    paths
}

/// A pool section for `upstream` with `(key, project)` pairs.
pub fn pool_yaml(upstream: &str, keys: &[(&str, &str)]) -> String {
    let mut y = format!("pools:\n  - name: main\n    upstream: \"{upstream}\"\n    keys:\n");
    for (k, p) in keys {
        y.push_str(&format!("      - key: \"{k}\"\n        project: \"{p}\"\n"));
    }
    y
}

/// `yaml` plus one tenant.
pub fn with_tenant(yaml: &str, name: &str, token: &str) -> String {
    format!("{yaml}tenants:\n  - name: {name}\n    token: \"{token}\"\n")
}

/// Google's per-minute 429 body for `model` with `RetryInfo.retryDelay` = `delay`.
pub fn per_minute_429(model: &str, delay: &str) -> String {
    PER_MINUTE_BODY
        .replace("MODEL", model)
        .replace("DELAY", delay)
}

/// An HTTP client that never uses an environment proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Like [`client`], giving up on a request after `timeout`.
pub fn client_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A small generateContent body.
pub fn prompt() -> String {
    r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#.to_string()
}

/// POSTs a `streamGenerateContent?alt=sse` for `model` (no token) and returns the response
/// whose body is still streaming.
pub async fn stream_sse(base: &str, model: &str) -> reqwest::Response {
    client()
        .post(format!(
            "{base}/v1beta/models/{model}:streamGenerateContent?alt=sse"
        ))
        .body(prompt())
        .send()
        .await
        .unwrap()
}

/// Sends generateContent requests for `model` to `base` in batches of `concurrency` for
/// `duration`; the task's result is every status seen, in order.
pub fn steady_load(
    base: String,
    duration: Duration,
    concurrency: usize,
) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut statuses = Vec::new();
        while started.elapsed() < duration {
            let batch: Vec<_> = (0..concurrency)
                .map(|_| {
                    let base = base.clone();
                    tokio::spawn(async move { generate(&base, "gemini-2.5-flash", None).await.0 })
                })
                .collect();
            for b in batch {
                statuses.push(b.await.unwrap());
            }
        }
        statuses
    })
}

/// POSTs a generateContent for `model` and returns status, headers and body.
pub async fn generate(
    base: &str,
    model: &str,
    token: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client()
        .post(format!("{base}/v1beta/models/{model}:generateContent"))
        .header("content-type", "application/json")
        .body(prompt());
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

/// Starts a resumable upload through keygate; returns the upload URL keygate handed out.
pub async fn start_upload(kg: &Keygate, token: &str) -> String {
    start_upload_with(kg, Some(token), &[]).await
}

/// Like [`start_upload`], with an optional token and extra request headers.
pub async fn start_upload_with(
    kg: &Keygate,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> String {
    let mut req = client().post(format!("{}/upload/v1beta/files", kg.url()));
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", "start")
        .header("x-goog-upload-header-content-length", "11")
        .header("x-goog-upload-header-content-type", "text/plain")
        .header("content-type", "application/json")
        .body(r#"{"file":{"display_name":"notes"}}"#)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let url = resp
        .headers()
        .get("x-goog-upload-url")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    url.expect("an upload URL")
}

pub async fn send_bytes(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client()
        .post(url)
        .header("x-goog-upload-command", "upload, finalize")
        .header("x-goog-upload-offset", "0")
        .body("hello world");
    if let Some(t) = token {
        req = req.header("x-goog-api-key", t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// Sends raw HTTP/1.1 bytes to `addr` (so a test can send what no client library would: dot
/// segments, duplicate fields, broken headers) and reads until the server closes or 10 s pass.
/// Returns the status (0 when nothing came back) and the whole answer.
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// A raw request with `Connection: close` and a body (JSON unless `headers` say otherwise).
pub fn raw_post(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        r.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

/// A raw GET with `Connection: close`.
pub fn raw_get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: keygate\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// `tenants:` with one `name: tok-name` tenant per entry, each limited to `pools` when given.
pub fn tenants_of(tenants: &[(&str, Option<&str>)]) -> String {
    let mut y = String::from("tenants:\n");
    for (name, pools) in tenants {
        y.push_str(&format!("  - name: {name}\n    token: \"tok-{name}\"\n"));
        if let Some(p) = pools {
            y.push_str(&format!("    pools: [{p}]\n"));
        }
    }
    y
}

/// One admin API call with `token` as the bearer token; the status and the JSON answer (or the
/// text, when it is not JSON).
pub async fn admin(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = client().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// One admin API call to `base` + `path` with the tests' admin token.
pub async fn admin_call(
    method: &str,
    base: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    admin(method, &format!("{base}{path}"), Some(ADMIN_TOKEN), body).await
}
