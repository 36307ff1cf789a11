//! Browser clients (CORS): which web pages may call keygate, and the headers that tell the
//! browser so. Off unless configured.
//!
//! Preflight requests (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) are answered
//! by keygate itself: never forwarded, never authenticated, never counted against a limit or a
//! quota. Real answers to an allowed origin, keygate's own errors included, carry
//! `Access-Control-Allow-Origin` and expose the headers a page needs to read (`retry-after`,
//! the upload URL and status).

use crate::config::CorsConfig;
use pingora::http::RequestHeader;

/// Methods a page may use.
const METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";

/// Answer headers a page may read (besides the CORS-safelisted ones).
const EXPOSED: &str = "retry-after, x-goog-upload-url, x-goog-upload-status, \
    x-goog-upload-chunk-granularity, x-goog-upload-size-received, content-encoding";

/// The CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    headers: String,
    max_age: u64,
}

/// What to do with a request, as far as CORS is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a cross-origin request (no `Origin`), or CORS is off: nothing to add.
    None,
    /// A preflight from an allowed origin: answer it with these headers.
    Preflight(Vec<(&'static str, String)>),
    /// A preflight from an origin not on the list: refuse it.
    Refused,
    /// A real request from an allowed origin: add these headers to the answer.
    Allowed(Vec<(&'static str, String)>),
    /// A real request from another origin: answer without CORS headers (the browser hides it).
    Foreign,
}

impl Cors {
    /// The policy of a validated `cors` section.
    pub fn new(config: &CorsConfig) -> Cors {
        Cors {
            any_origin: config.allowed_origins.iter().any(|o| o == "*"),
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            headers: config.allowed_headers.join(", "),
            max_age: config.max_age_seconds,
        }
    }

    /// What CORS asks of `req`.
    pub fn verdict(&self, req: &RequestHeader) -> Verdict {
        let Some(origin) = req.headers.get("origin").and_then(|v| v.to_str().ok()) else {
            return Verdict::None;
        };
        let preflight = req.method == http::Method::OPTIONS
            && req.headers.contains_key("access-control-request-method");
        let allowed = self.any_origin || self.origins.contains(&origin.to_ascii_lowercase());
        match (preflight, allowed) {
            (true, false) => Verdict::Refused,
            (false, false) => Verdict::Foreign,
            (true, true) => {
                let mut headers = self.origin_headers(origin);
                headers.push(("access-control-allow-methods", METHODS.to_string()));
                headers.push(("access-control-allow-headers", self.headers.clone()));
                headers.push(("access-control-max-age", self.max_age.to_string()));
                Verdict::Preflight(headers)
            }
            (false, true) => {
                let mut headers = self.origin_headers(origin);
                headers.push(("access-control-expose-headers", EXPOSED.to_string()));
                Verdict::Allowed(headers)
            }
        }
    }

    /// The allowed origin is echoed (never `*`), so pages that send credentials work too;
    /// `Vary: Origin` keeps caches from mixing answers for different pages.
    fn origin_headers(&self, origin: &str) -> Vec<(&'static str, String)> {
        vec![
            ("access-control-allow-origin", origin.to_string()),
            ("vary", "Origin".to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CORS_HEADERS;

    fn cors(origins: &[&str]) -> Cors {
        Cors::new(&CorsConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allowed_headers: DEFAULT_CORS_HEADERS.iter().map(|s| s.to_string()).collect(),
            max_age_seconds: 600,
        })
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/v1beta/models", None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn preflights_are_answered_for_listed_origins_only() {
        let c = cors(&["https://app.example.com"]);
        let pre = [
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ];
        match c.verdict(&req("OPTIONS", &pre)) {
            Verdict::Preflight(h) => {
                assert!(h.contains(&(
                    "access-control-allow-origin",
                    "https://app.example.com".into()
                )));
                let allowed = &h
                    .iter()
                    .find(|(n, _)| *n == "access-control-allow-headers")
                    .unwrap()
                    .1;
                assert!(
                    allowed.contains("x-goog-api-key") && allowed.contains("x-goog-upload-command")
                );
            }
            other => panic!("{other:?}"),
        }
        let evil = [
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ];
        assert_eq!(c.verdict(&req("OPTIONS", &evil)), Verdict::Refused);
        assert_eq!(
            c.verdict(&req("POST", &[("origin", "https://evil.example")])),
            Verdict::Foreign
        );
        assert_eq!(c.verdict(&req("POST", &[])), Verdict::None);
    }

    #[test]
    fn real_answers_expose_retry_after_and_upload_headers() {
        let c = cors(&["*"]);
        match c.verdict(&req("POST", &[("origin", "http://localhost:5173")])) {
            Verdict::Allowed(h) => {
                assert!(h.contains(&(
                    "access-control-allow-origin",
                    "http://localhost:5173".into()
                )));
                let exposed = &h
                    .iter()
                    .find(|(n, _)| *n == "access-control-expose-headers")
                    .unwrap()
                    .1;
                assert!(exposed.contains("retry-after") && exposed.contains("x-goog-upload-url"));
            }
            other => panic!("{other:?}"),
        }
    }
}
