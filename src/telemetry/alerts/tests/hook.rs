//! A webhook receiver for the alert tests, and the events and settings they send.

use super::*;
use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use pingora::services::background::BackgroundService;
use std::collections::VecDeque;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One request the test webhook received.
#[derive(Debug)]
pub(super) struct Received {
    pub(super) version: http::Version,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) host: String,
    pub(super) content_type: String,
    pub(super) json: serde_json::Value,
    pub(super) raw: String,
}

#[derive(Default)]
pub(super) struct HookState {
    pub(super) got: Vec<Received>,
    /// Statuses to answer with, in order; 200 once they run out.
    pub(super) script: VecDeque<u16>,
}

/// A local webhook (hyper, HTTP/1.1) on 127.0.0.1.
pub(super) struct Hook {
    pub(super) addr: SocketAddr,
    pub(super) state: Arc<Mutex<HookState>>,
}

impl Hook {
    pub(super) async fn start(script: &[u16]) -> Hook {
        Hook::start_with(script, None).await
    }

    /// A webhook speaking TLS (ALPN h2, http/1.1) for `localhost`, and its CA's PEM.
    pub(super) async fn start_tls() -> (Hook, String) {
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
        (Hook::start_with(&[], Some(acceptor)).await, ca.pem())
    }

    pub(super) async fn start_with(script: &[u16], tls: Option<tokio_rustls::TlsAcceptor>) -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(HookState {
            got: Vec::new(),
            script: script.iter().copied().collect(),
        }));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(st, req).await) }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match tls {
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                return;
                            };
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Hook { addr, state }
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/hooks/T0/SECRET?x=1", self.addr)
    }

    pub(super) fn count(&self) -> usize {
        self.state.lock().unwrap().got.len()
    }

    /// Waits until `n` requests arrived (or `within` passed), then a little more so that
    /// any extra request shows up too.
    pub(super) async fn received(&self, n: usize, within: Duration) -> Vec<Received> {
        let end = Instant::now() + within;
        while self.count() < n && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::mem::take(&mut self.state.lock().unwrap().got)
    }
}

pub(super) async fn answer(
    st: Arc<Mutex<HookState>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let raw = String::from_utf8(bytes.to_vec()).unwrap();
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let status = {
        let mut s = st.lock().unwrap();
        s.got.push(Received {
            version: parts.version,
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            host: match parts.uri.authority() {
                Some(a) => a.to_string(),
                None => header(header::HOST),
            },
            content_type: header(header::CONTENT_TYPE),
            json: serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null),
            raw,
        });
        s.script.pop_front().unwrap_or(200)
    };
    hyper::Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(b"ok")))
        .unwrap()
}

pub(super) fn config(url: &str, min_interval: Duration, retries: u32) -> AlertConfig {
    AlertConfig {
        url: url.to_string(),
        min_interval,
        retries,
        timeout: Duration::from_millis(500),
    }
}

/// Alerts with a 20 ms first backoff, so retry tests stay short.
pub(super) fn alerts(config: AlertConfig) -> Alerts {
    Alerts::build(config, Duration::from_millis(20), None).unwrap()
}

/// Starts the sender; keep the returned watch sender alive (dropping it means shutdown).
pub(super) fn start(alerts: &Alerts) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let sender = alerts.service();
    let task = tokio::spawn(async move { sender.start(rx).await });
    (tx, task)
}

pub(super) async fn wait_until(within: Duration, what: impl Fn() -> bool) {
    let end = Instant::now() + within;
    while !what() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn exhausted(pool: &str, model: &str) -> Event {
    Event::PoolExhausted {
        pool: pool.into(),
        model: model.into(),
        retry_after_seconds: Some(42),
    }
}

pub(super) fn disabled(pool: &str, key: &str) -> Event {
    Event::KeyDisabled {
        pool: pool.into(),
        key: key.into(),
        reason: Disabled::Dead(DeadReason::Invalid),
    }
}

pub(super) fn recovered(pool: &str, key: &str) -> Event {
    Event::KeyRecovered {
        pool: pool.into(),
        key: key.into(),
    }
}

pub(super) fn object_keys(v: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}
