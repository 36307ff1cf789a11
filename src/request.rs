//! Pure helpers over the client's request: which API it calls, which model, the credential it
//! presents, and the upstream request built from it (credentials and hop-by-hop headers gone).

use http::header::{self, HeaderName};
use pingora::http::RequestHeader;

/// Path prefixes keygate forwards.
const FORWARDED_PREFIXES: [&str; 5] = ["/v1/", "/v1beta/", "/v1alpha/", "/upload/", LIVE_PREFIX];

/// Path prefix of the Live API's WebSocket endpoints
/// (`/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent`, v1alpha...).
pub const LIVE_PREFIX: &str = "/ws/google.ai.generativelanguage.";

/// Whether a path is a Live API WebSocket endpoint.
pub fn is_live_api(path: &str) -> bool {
    path.starts_with(LIVE_PREFIX)
}

/// Headers that carry a client credential: never forwarded.
const CREDENTIAL_HEADERS: [&str; 3] = ["x-goog-api-key", "authorization", "x-access-token"];

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the ones keygate sets itself.
const HOP_BY_HOP: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "host",
];

/// Headers a browser adds that Google must not see: with them, Google would answer with its own
/// CORS headers and decide on its own which pages may read keygate's answers.
const BROWSER_ONLY: [&str; 2] = ["origin", "referer"];

/// What a request path is, for forwarding purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The native Gemini API (`x-goog-api-key`).
    Gemini,
    /// The OpenAI-compatible endpoints (`Authorization: Bearer`, errors wrapped in an array).
    OpenAi,
}

/// Which API a path belongs to, or `None` when keygate does not forward it.
pub fn api_of(path: &str) -> Option<Api> {
    if !FORWARDED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    if path.contains("/openai/") {
        Some(Api::OpenAi)
    } else {
        Some(Api::Gemini)
    }
}

/// Endpoints of Google's OpenAI-compatible API that tools reach with an "OpenAI base URL" of
/// `http://HOST/v1` (or `http://HOST`): the path they append, after that base.
const OPENAI_ALIASES: [&str; 4] = [
    "/chat/completions",
    "/embeddings",
    "/images/generations",
    "/models",
];

/// The Gemini path an OpenAI-style path stands for: `/v1/chat/completions` and
/// `/chat/completions` become `/v1beta/openai/chat/completions`, likewise `embeddings`,
/// `images/generations`, `models` and `models/{id}`. Bodies go through untouched: Google's own
/// endpoint does the translating.
///
/// `/v1/models` and `/v1/models/{id}` are also the native Gemini model listing (the google-genai
/// SDK calls `/v1/...`): they are taken as OpenAI-style only when the client authenticates the
/// way the openai SDKs do, with `Authorization: Bearer` and no `x-goog-api-key` or `?key=`.
pub fn openai_alias(req: &RequestHeader) -> Option<String> {
    let path = req.uri.path();
    let (versioned, rest) = match path.strip_prefix("/v1") {
        Some(rest) if rest.starts_with('/') => (true, rest),
        _ => (false, path),
    };
    let endpoint = OPENAI_ALIASES.iter().find(|a| {
        rest == **a || (**a == "/models" && rest.starts_with("/models/") && !rest.contains(':'))
    })?;
    if versioned && *endpoint == "/models" {
        let headers = &req.headers;
        let bearer = bearer_token(headers).is_some();
        let goog_key = headers.contains_key("x-goog-api-key")
            || req
                .uri
                .query()
                .is_some_and(|q| q.split('&').any(|p| p.starts_with("key=")));
        if !bearer || goog_key {
            return None;
        }
    }
    Some(format!("/v1beta/openai{rest}"))
}

/// The model a native path names: `/v1beta/models/gemini-2.5-pro:generateContent` gives
/// `gemini-2.5-pro`; tuned models keep their prefix (`tunedModels/x`).
pub fn model_from_path(path: &str) -> Option<&str> {
    for marker in ["/models/", "/tunedModels/"] {
        if let Some(i) = path.find(marker) {
            let start = if marker == "/tunedModels/" {
                i + 1
            } else {
                i + marker.len()
            };
            let rest = &path[start..];
            let end = if marker == "/tunedModels/" {
                let after = &rest["tunedModels/".len()..];
                "tunedModels/".len() + after.find([':', '/']).unwrap_or(after.len())
            } else {
                rest.find([':', '/']).unwrap_or(rest.len())
            };
            let model = &rest[..end];
            if !model.is_empty() {
                return Some(model);
            }
        }
    }
    None
}

/// The method a path calls: what follows `:` (`generateContent`), or for OpenAI-compatible
/// paths what follows `/openai/` (`chat/completions`); otherwise the path itself.
pub fn method_of(path: &str) -> &str {
    if let Some(i) = path.find("/openai/") {
        return &path[i + "/openai/".len()..];
    }
    match path.rsplit_once(':') {
        Some((_, m)) if !m.contains('/') => m,
        _ => path,
    }
}

/// The `model` field of a JSON request body (OpenAI-compatible calls; creating a cache or a
/// batch), without a `models/` prefix.
pub fn model_from_body(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Body {
        model: Option<String>,
    }
    let parsed: Body = serde_json::from_slice(body).ok()?;
    let model = parsed.model?;
    Some(model.strip_prefix("models/").unwrap_or(&model).to_string())
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
}

/// The credential the client presents, in any of the four forms the SDKs use.
pub fn client_token(req: &RequestHeader) -> Option<Vec<u8>> {
    let headers = &req.headers;
    if let Some(v) = headers.get("x-goog-api-key") {
        return Some(v.as_bytes().to_vec());
    }
    if let Some(token) = bearer_token(headers) {
        return Some(token.to_vec());
    }
    if let Some(v) = headers.get("x-access-token") {
        return Some(v.as_bytes().to_vec());
    }
    let query = req.uri.query()?;
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("key=")?;
        Some(percent_decode(value))
    })
}

/// The query without any `key=` parameter; `None` when nothing is left.
pub fn query_without_key(query: Option<&str>) -> Option<String> {
    let query = query?;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.is_empty() && *pair != "key" && !pair.starts_with("key="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// `path?query` with any `key=` parameter removed: what goes upstream and into logs.
pub fn clean_path_and_query(req: &RequestHeader) -> String {
    with_clean_query(req.uri.path(), req)
}

/// `path` with the request's query, any `key=` parameter removed.
pub fn with_clean_query(path: &str, req: &RequestHeader) -> String {
    match query_without_key(req.uri.query()) {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// What is forwarded, the same for every attempt.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// Which API: decides how the key is sent.
    pub api: Api,
    /// `path?query` without `key=` ([`clean_path_and_query`]).
    pub path_and_query: &'a str,
    /// Length of the buffered body.
    pub body_len: usize,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// `host[:port]` for `Host` / `:authority`.
    pub authority: &'a str,
    /// Whether the connection is TLS (the scheme of an HTTP/2 URI).
    pub tls: bool,
    /// Whether the connection speaks HTTP/2.
    pub h2: bool,
}

/// One attempt's upstream request, built from the client's: its method, path and headers with
/// credentials, hop-by-hop headers and `key=` removed, plus the pool key (as `x-goog-api-key`,
/// or `Authorization: Bearer` for the OpenAI-compatible API) and the target for HTTP/1.1
/// (`Host`) or HTTP/2 (absolute URI, no `Host`). Built afresh per attempt: cheaper than
/// building once and cloning, since most requests need a single attempt.
pub fn upstream_request(
    client: &RequestHeader,
    fwd: &Forward<'_>,
    key: &str,
    target: &Target<'_>,
) -> pingora::Result<RequestHeader> {
    let mut req = RequestHeader::build(
        client.method.clone(),
        fwd.path_and_query.as_bytes(),
        Some(client.headers.len() + 2),
    )?;
    let listed = connection_listed(&client.headers);
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        if CREDENTIAL_HEADERS.contains(&n)
            || HOP_BY_HOP.contains(&n)
            || BROWSER_ONLY.contains(&n)
            || n == "content-length"
            || listed.iter().any(|l| l == name)
        {
            continue;
        }
        req.append_header(name.clone(), value.clone())?;
    }
    let method_has_body = !matches!(
        client.method.as_str(),
        "GET" | "HEAD" | "DELETE" | "OPTIONS"
    );
    if fwd.body_len > 0 || method_has_body {
        req.insert_header(header::CONTENT_LENGTH, fwd.body_len)?;
    }
    match fwd.api {
        Api::Gemini => req.insert_header("x-goog-api-key", key)?,
        Api::OpenAi => req.insert_header(header::AUTHORIZATION, format!("Bearer {key}"))?,
    }
    if target.h2 {
        req.set_version(http::Version::HTTP_2);
        let uri = http::Uri::builder()
            .scheme(if target.tls { "https" } else { "http" })
            .authority(target.authority)
            .path_and_query(fwd.path_and_query)
            .build()
            .map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "upstream uri", e)
            })?;
        req.set_uri(uri);
    } else {
        req.set_version(http::Version::HTTP_11);
        req.insert_header(header::HOST, target.authority)?;
    }
    Ok(req)
}

/// Header names listed in a `Connection` header: hop-by-hop by declaration, in requests and
/// responses alike. No allocation when there are none.
pub fn connection_listed(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn openai_base_url_aliases() {
        let bearer = [("authorization", "Bearer tok")];
        for (uri, want) in [
            (
                "/v1/chat/completions",
                Some("/v1beta/openai/chat/completions"),
            ),
            ("/chat/completions", Some("/v1beta/openai/chat/completions")),
            ("/v1/embeddings", Some("/v1beta/openai/embeddings")),
            ("/embeddings", Some("/v1beta/openai/embeddings")),
            ("/models", Some("/v1beta/openai/models")),
            (
                "/models/gemini-2.5-flash",
                Some("/v1beta/openai/models/gemini-2.5-flash"),
            ),
            ("/v1/models", Some("/v1beta/openai/models")),
            (
                "/v1/models/gemini-2.5-flash",
                Some("/v1beta/openai/models/gemini-2.5-flash"),
            ),
            ("/v1/models/gemini-2.5-flash:generateContent", None),
            ("/v1beta/openai/chat/completions", None),
            ("/v1/chat/completions/extra", None),
            ("/v1x/chat/completions", None),
        ] {
            assert_eq!(
                openai_alias(&req("POST", uri, &bearer)).as_deref(),
                want,
                "{uri}"
            );
        }
        // The native model listing keeps its meaning for Gemini SDKs.
        let goog = [("x-goog-api-key", "tok")];
        assert_eq!(openai_alias(&req("GET", "/v1/models", &goog)), None);
        assert_eq!(
            openai_alias(&req("GET", "/v1/models?key=tok", &bearer)),
            None
        );
        assert_eq!(openai_alias(&req("GET", "/v1/models", &[])), None);
        assert_eq!(
            openai_alias(&req("GET", "/models", &goog)).as_deref(),
            Some("/v1beta/openai/models")
        );
    }

    #[test]
    fn routes() {
        assert_eq!(
            api_of("/v1beta/models/x:generateContent"),
            Some(Api::Gemini)
        );
        assert_eq!(api_of("/v1/models/x:generateContent"), Some(Api::Gemini));
        assert_eq!(api_of("/v1alpha/models"), Some(Api::Gemini));
        assert_eq!(api_of("/upload/v1beta/files"), Some(Api::Gemini));
        assert_eq!(api_of("/v1beta/openai/chat/completions"), Some(Api::OpenAi));
        assert_eq!(api_of("/"), None);
        assert_eq!(api_of("/v2/x"), None);
        assert_eq!(api_of("/v1beta"), None);
    }

    #[test]
    fn models_and_methods() {
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-pro:generateContent"),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            Some("gemini-2.5-flash")
        );
        assert_eq!(
            model_from_path("/v1beta/models/gemini-2.5-pro"),
            Some("gemini-2.5-pro")
        );
        assert_eq!(
            model_from_path("/v1beta/tunedModels/abc:generateContent"),
            Some("tunedModels/abc")
        );
        assert_eq!(model_from_path("/v1beta/models"), None);
        assert_eq!(model_from_path("/v1beta/files"), None);
        assert_eq!(
            method_of("/v1beta/models/m:streamGenerateContent"),
            "streamGenerateContent"
        );
        assert_eq!(
            method_of("/v1beta/openai/chat/completions"),
            "chat/completions"
        );
        assert_eq!(
            model_from_body(br#"{"model":"models/gemini-2.5-flash","messages":[]}"#),
            Some("gemini-2.5-flash".into())
        );
        assert_eq!(model_from_body(b"{}"), None);
        assert_eq!(model_from_body(b"not json"), None);
    }

    #[test]
    fn finds_the_token_in_each_form() {
        let h = |k, v| request("POST", "/v1beta/x", &[(k, v)]);
        assert_eq!(
            client_token(&h("x-goog-api-key", "t1")),
            Some(b"t1".to_vec())
        );
        assert_eq!(
            client_token(&h("Authorization", "Bearer t2")),
            Some(b"t2".to_vec())
        );
        assert_eq!(
            client_token(&h("authorization", "bearer t2")),
            Some(b"t2".to_vec())
        );
        assert_eq!(
            client_token(&h("X-Access-Token", "t3")),
            Some(b"t3".to_vec())
        );
        let q = request("GET", "/v1beta/models?alt=json&key=t%2B4", &[]);
        assert_eq!(client_token(&q), Some(b"t+4".to_vec()));
        assert_eq!(client_token(&request("GET", "/v1beta/models", &[])), None);
    }

    #[test]
    fn key_parameter_is_removed_from_the_query() {
        assert_eq!(
            query_without_key(Some("alt=sse&key=abc")),
            Some("alt=sse".into())
        );
        assert_eq!(query_without_key(Some("key=abc")), None);
        assert_eq!(
            query_without_key(Some("keyword=1&key=x&pageSize=2")),
            Some("keyword=1&pageSize=2".into())
        );
        assert_eq!(query_without_key(None), None);
    }

    #[test]
    fn upstream_request_carries_no_client_credential_or_hop_header() {
        let client = request(
            "POST",
            "/v1beta/openai/chat/completions?key=tok",
            &[
                ("x-goog-api-key", "tok"),
                ("authorization", "Bearer tok"),
                ("x-access-token", "tok"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("expect", "100-continue"),
                ("host", "gateway.local"),
                ("content-type", "application/json"),
                ("x-goog-api-client", "genai-py"),
            ],
        );
        let path = clean_path_and_query(&client);
        assert_eq!(path, "/v1beta/openai/chat/completions");
        let fwd = Forward {
            api: Api::OpenAi,
            path_and_query: &path,
            body_len: 10,
        };
        let h1 = Target {
            authority: "upstream.test",
            tls: true,
            h2: false,
        };
        let req = upstream_request(&client, &fwd, "POOLKEY", &h1).unwrap();
        let names: Vec<&str> = req.headers.keys().map(|k| k.as_str()).collect();
        for gone in [
            "x-goog-api-key",
            "x-access-token",
            "connection",
            "x-hop",
            "keep-alive",
            "transfer-encoding",
            "expect",
        ] {
            assert!(!names.contains(&gone), "{gone} in {names:?}");
        }
        assert_eq!(req.headers["authorization"], "Bearer POOLKEY");
        assert_eq!(req.headers["host"], "upstream.test");
        assert_eq!(req.headers["content-length"], "10");
        assert_eq!(req.headers["x-goog-api-client"], "genai-py");

        let native = Forward {
            api: Api::Gemini,
            ..fwd
        };
        let h2 = Target { h2: true, ..h1 };
        let req = upstream_request(&client, &native, "POOLKEY", &h2).unwrap();
        assert_eq!(req.headers["x-goog-api-key"], "POOLKEY");
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("host").is_none());
        assert_eq!(
            req.uri.to_string(),
            "https://upstream.test/v1beta/openai/chat/completions"
        );
    }
}
