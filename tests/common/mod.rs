//! Test support: a mock Gemini API written in Rust (started per test on 127.0.0.1, port 0)
//! and a launcher for the real `keygate` binary.
//!
//! The mock models what the gateway must understand: keys that belong to projects, per-project
//! per-model quotas answered with Google's real 429 bodies (per minute and per day), invalid and
//! suspended keys, client errors, slow SSE streams, and the OpenAI-compatible endpoints. It
//! records every request it receives, so tests can assert what reached "Google".

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
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
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// The API key the request carried (`x-goog-api-key` or `Authorization: Bearer`).
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
}

struct Canned {
    key: Option<String>,
    remaining: usize,
    status: u16,
    body: String,
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
            let connection = {
                let mut s = st.lock().unwrap();
                s.connections += 1;
                s.connections - 1
            };
            let st = st.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| handle(st.clone(), connection, req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        let Ok(stream) = acceptor.accept(stream).await else {
                            return;
                        };
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                    None => {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    })
}

pub const PER_MINUTE_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"MODEL"},"quotaValue":"5"}]},{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"DELAY"}]}}"#;

pub const PER_DAY_BODY: &str = r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","quotaDimensions":{"location":"global","model":"MODEL"},"quotaValue":"100"}]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"22s"}]}}"#;

pub const INVALID_KEY_BODY: &str = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;

pub const SUSPENDED_BODY: &str = r#"{"error":{"code":403,"message":"Permission denied: Consumer 'api_key:x' has been suspended.","status":"PERMISSION_DENIED","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CONSUMER_SUSPENDED","domain":"googleapis.com","metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#;

pub const BAD_REQUEST_BODY: &str = r#"{"error":{"code":400,"message":"Invalid JSON payload received. Unknown name \"bogus\": Cannot find field.","status":"INVALID_ARGUMENT"}}"#;

pub const SHARED_CAPACITY_BODY: &str = r#"{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).","status":"RESOURCE_EXHAUSTED"}}"#;

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

    /// `project` may serve `allowed` more requests for `model`; then a per-day 429.
    pub fn per_day_limit(&self, project: &str, model: &str, allowed: u32) -> &Self {
        let mut s = self.state.lock().unwrap();
        let q = s.quotas.entry((project.into(), model.into())).or_default();
        q.per_day = Some(allowed);
        q.used = 0;
        self
    }

    /// The next `times` requests (carrying `key`, or any key when `None`) get this answer.
    pub fn respond_next(&self, key: Option<&str>, times: usize, status: u16, body: &str) -> &Self {
        self.state.lock().unwrap().canned.push(Canned {
            key: key.map(str::to_string),
            remaining: times,
            status,
            body: body.into(),
        });
        self
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

    /// Non-streaming answers wait `delay` before their header.
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

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
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
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let key = parts
        .headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        });
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let delay = state.lock().unwrap().delay;
    if !delay.is_zero() && !path.contains("streamGenerateContent") {
        tokio::time::sleep(delay).await;
    }
    let response = decide(&state, &path, query.as_deref(), key.as_deref(), &body);
    // Like Google, compress error answers for clients that accept gzip.
    let accepts_gzip = parts
        .headers
        .get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("gzip"));
    let response = if accepts_gzip && response.status().as_u16() >= 400 {
        gzipped(response).await
    } else {
        response
    };
    state.lock().unwrap().seen.push(Seen {
        method: parts.method.to_string(),
        path,
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
    path: &str,
    query: Option<&str>,
    key: Option<&str>,
    body: &[u8],
) -> Response<Body> {
    let openai = path.contains("/openai/");
    let mut s = state.lock().unwrap();

    if let Some(c) = s
        .canned
        .iter_mut()
        .find(|c| c.remaining > 0 && (c.key.is_none() || c.key.as_deref() == key))
    {
        c.remaining -= 1;
        return json(c.status, c.body.clone(), openai);
    }
    let Some(key) = key else {
        return json(403, r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.","status":"PERMISSION_DENIED"}}"#.into(), openai);
    };
    let project = match s.keys.get(key) {
        Some(KeyState::Valid { project }) => project.clone(),
        Some(KeyState::Suspended) => return json(403, SUSPENDED_BODY.into(), openai),
        Some(KeyState::Invalid) | None => return json(400, INVALID_KEY_BODY.into(), openai),
    };

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
    if let Some(q) = s.quotas.get_mut(&(project.clone(), model.clone())) {
        if let Some(day) = q.per_day {
            if q.used >= day {
                return json(429, PER_DAY_BODY.replace("MODEL", &model), openai);
            }
        }
        if let Some((minute, delay)) = &q.per_minute {
            if q.used >= *minute {
                return json(
                    429,
                    PER_MINUTE_BODY
                        .replace("MODEL", &model)
                        .replace("DELAY", delay),
                    openai,
                );
            }
        }
        q.used += 1;
    }

    let text = format!("hello from {project}");
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

// ---------------------------------------------------------------------------------------------
// keygate process
// ---------------------------------------------------------------------------------------------

/// A running `keygate` binary with its own config file and captured log.
pub struct Keygate {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Keygate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Keygate {
    /// Starts keygate with `yaml` (everything but `listen`, which is added).
    pub fn start(yaml: &str) -> Keygate {
        Keygate::start_with_env(yaml, &[])
    }

    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Keygate {
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
                if TcpStream::connect(addr).is_ok() {
                    return Keygate {
                        child,
                        addr,
                        log,
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

/// A small generateContent body.
pub fn prompt() -> String {
    r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#.to_string()
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
