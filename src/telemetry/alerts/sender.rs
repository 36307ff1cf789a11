//! The sender: one background task that posts queued alerts to the webhook, with retries and
//! backoff, and flushes what is left (within a budget) when keygate shuts down.

use super::{lock, Event, Inner, Queued, DNS_REFRESH, FLUSH_BUDGET, IDLE, MAX_BACKOFF, MAX_DRAIN};
use crate::upstream::exchange::{
    connect, read_final_header, read_up_to, release, write_request, AnswerBody, ConnectError,
    Connection,
};
use async_trait::async_trait;
use bytes::Bytes;
use chrono::SecondsFormat;
use http::header;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The background service that POSTs queued events to the webhook, one at a time.
pub struct AlertSender {
    pub(super) inner: Arc<Inner>,
}

/// The sender's state across events.
pub(super) struct Run {
    /// Set when shutdown starts: the end of the flush.
    deadline: Option<Instant>,
    /// When the webhook host was last resolved.
    resolved_at: Option<Instant>,
}

impl Run {
    fn begin_flush(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + FLUSH_BUDGET);
        }
    }

    /// `wait`, cut to what is left of the flush.
    fn cap(&self, wait: Duration) -> Duration {
        match self.deadline {
            None => wait,
            Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        }
    }

    fn out_of_time(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

#[async_trait]
impl BackgroundService for AlertSender {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = lock(&self.inner.rx).take() else {
            log::warn!("the alert sender is already running; not starting it twice");
            return;
        };
        let mut run = Run {
            deadline: None,
            resolved_at: None,
        };
        loop {
            let next = if run.deadline.is_none() {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        run.begin_flush();
                        continue;
                    }
                    next = rx.recv() => next,
                }
            } else {
                rx.try_recv().ok()
            };
            let Some(queued) = next else { break };
            self.deliver(queued, &mut shutdown, &mut run).await;
            if run.out_of_time() {
                break;
            }
        }
        rx.close();
        let mut left = 0;
        while rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            self.inner.failed.fetch_add(left, Relaxed);
            log::warn!("alerts: {left} event(s) not sent: shutting down");
        }
    }
}

impl AlertSender {
    /// Sends one event, retrying with backoff; counts the outcome.
    async fn deliver(&self, queued: Queued, shutdown: &mut ShutdownWatch, run: &mut Run) {
        let inner = &*self.inner;
        let body = Bytes::from(payload(&queued));
        let what = format!("{} for pool {}", queued.event.kind(), queued.event.pool());
        let attempts = inner.retries + 1;
        let mut backoff = inner.first_backoff;
        let mut last_error = String::new();
        let mut tried = 0;
        for attempt in 1..=attempts {
            let limit = run.cap(inner.timeout);
            if limit.is_zero() {
                break;
            }
            tried = attempt;
            let outcome = match tokio::time::timeout(limit, self.post(&body, run)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {limit:?}")),
            };
            match outcome {
                Ok(status) if (200..300).contains(&status) => {
                    // Listed before counted: whoever sees the count finds it listed.
                    inner.history.push(sent(&queued, "delivered".into()));
                    inner.delivered.fetch_add(1, Relaxed);
                    log::debug!("alerts: {what} delivered (HTTP {status}, try {attempt})");
                    return;
                }
                Ok(status) if status >= 500 || status == 408 || status == 429 => {
                    last_error = format!("HTTP {status}");
                }
                Ok(status) => {
                    inner
                        .history
                        .push(sent(&queued, format!("refused: HTTP {status}")));
                    inner.failed.fetch_add(1, Relaxed);
                    log::warn!(
                        "alerts: the webhook at {} refused {what} with HTTP {status}; not retrying",
                        inner.upstream.authority()
                    );
                    return;
                }
                Err(e) => last_error = e,
            }
            if attempt == attempts {
                break;
            }
            let wait = run.cap(backoff);
            if run.deadline.is_none() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // Shutting down: retry at once, within the flush budget.
                    _ = shutdown.changed() => run.begin_flush(),
                }
            } else {
                tokio::time::sleep(wait).await;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let why = if last_error.is_empty() {
            "shutting down"
        } else {
            &last_error
        };
        inner.history.push(sent(&queued, format!("failed: {why}")));
        inner.failed.fetch_add(1, Relaxed);
        log::warn!(
            "alerts: {what} not delivered to {} after {tried} tr{}: {}",
            inner.upstream.authority(),
            if tried == 1 { "y" } else { "ies" },
            if last_error.is_empty() {
                "shutting down"
            } else {
                &last_error
            }
        );
    }

    /// One POST; the answer's status, or what went wrong.
    async fn post(&self, body: &Bytes, run: &mut Run) -> Result<u16, String> {
        let inner = &*self.inner;
        let upstream = &inner.upstream;
        let stale = run.resolved_at.is_none_or(|t| t.elapsed() >= DNS_REFRESH);
        if upstream.needs_dns() && stale {
            // `lookup_host` runs on tokio's blocking pool: this waits, it does not block.
            match upstream.resolve().await {
                Ok(_) => run.resolved_at = Some(Instant::now()),
                Err(e) if !upstream.is_resolved() => return Err(format!("cannot resolve: {e}")),
                Err(e) => log::debug!("alerts: cannot re-resolve, keeping old addresses: {e}"),
            }
        }
        let Connection { mut http, peer, .. } = connect(upstream, Duration::ZERO, false)
            .await
            .map_err(|e| match e {
                ConnectError::Unresolved(_) => "host not resolved".to_string(),
                ConnectError::Connect(e) => format!("cannot connect: {e}"),
            })?;
        let h2 = matches!(http, ClientSession::H2(_));
        let req = self
            .request(body.len(), h2)
            .map_err(|e| format!("cannot build the request: {e}"))?;
        http.set_read_timeout(Some(inner.timeout));
        http.set_write_timeout(Some(inner.timeout));
        let io = |e: Box<pingora::Error>| format!("exchange failed: {e}");
        write_request(&mut http, req, body).await.map_err(io)?;
        read_final_header(&mut http).await.map_err(io)?;
        let status = http
            .response_header()
            .map(|h| h.status.as_u16())
            .ok_or("no answer header")?;
        // Read the (small) answer so that the connection can carry the next alert.
        let mut answer = AnswerBody {
            http: Some(http),
            peer: Some(peer),
            read: Vec::new(),
            complete: false,
        };
        read_up_to(&mut answer, MAX_DRAIN).await;
        if let (true, Some(http), Some(peer)) = (answer.complete, answer.http, answer.peer) {
            release(upstream, http, &peer, IDLE).await;
        }
        Ok(status)
    }

    fn request(&self, len: usize, h2: bool) -> pingora::Result<RequestHeader> {
        let inner = &*self.inner;
        let mut req = RequestHeader::build("POST", inner.path.as_bytes(), Some(4))?;
        req.insert_header(header::CONTENT_TYPE, "application/json")?;
        req.insert_header(header::CONTENT_LENGTH, len)?;
        req.insert_header(
            header::USER_AGENT,
            concat!("keygate/", env!("CARGO_PKG_VERSION")),
        )?;
        if h2 {
            req.set_version(http::Version::HTTP_2);
            req.set_uri(inner.uri.clone());
        } else {
            req.set_version(http::Version::HTTP_11);
            req.insert_header(header::HOST, inner.upstream.authority())?;
        }
        Ok(req)
    }
}

/// The JSON body: fields that do not apply are left out.
#[derive(Serialize)]
pub(super) struct Payload<'a> {
    source: &'static str,
    event: &'static str,
    pool: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
    time: String,
    text: String,
}

pub(super) fn payload(queued: &Queued) -> Vec<u8> {
    let e = &queued.event;
    let (key, model, reason, retry_after_seconds) = match e {
        Event::PoolExhausted {
            model,
            retry_after_seconds,
            ..
        } => (None, Some(model.as_str()), None, *retry_after_seconds),
        Event::KeyDisabled { key, reason, .. } => {
            (Some(key.as_str()), None, Some(reason.as_str()), None)
        }
        Event::KeyRecovered { key, .. } => (Some(key.as_str()), None, None, None),
    };
    let body = Payload {
        source: "keygate",
        event: e.kind(),
        pool: e.pool(),
        key,
        model,
        reason,
        retry_after_seconds,
        time: queued.at.to_rfc3339_opts(SecondsFormat::Secs, true),
        text: e.text(),
    };
    // Serializing strings and numbers cannot fail; an empty body would be refused, not sent.
    serde_json::to_vec(&body).unwrap_or_default()
}

/// What the dashboard lists of an alert the sender is done with.
fn sent(queued: &Queued, result: String) -> super::SentAlert {
    super::SentAlert {
        at: queued.at,
        kind: queued.event.kind(),
        text: queued.event.text(),
        result,
    }
}
