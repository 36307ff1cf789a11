//! Pure helpers over the client's request: which API it calls, which model, the credential it
//! presents, and the upstream request built from it (credentials and hop-by-hop headers gone).

use http::header::{self, HeaderName, HeaderValue};
use memchr::memmem::Finder;
use pingora::http::RequestHeader;
use std::sync::LazyLock;

/// Path prefixes keygate forwards.
const FORWARDED_PREFIXES: [&str; 5] = ["/v1/", "/v1beta/", "/v1alpha/", "/upload/", LIVE_PREFIX];

/// Path prefix of the Live API's WebSocket endpoints
/// (`/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent`, v1alpha...).
pub const LIVE_PREFIX: &str = "/ws/google.ai.generativelanguage.";

/// Whether a path is a Live API WebSocket endpoint.
pub fn is_live_api(path: &str) -> bool {
    path.starts_with(LIVE_PREFIX)
}

/// Whether a client's header named `name` (lowercase) stays out of the upstream request. One
/// `match` rather than lists to search: it runs for every header of every request.
fn not_forwarded(name: &str) -> bool {
    matches!(
        name,
        // A client credential.
        "x-goog-api-key" | "authorization" | "x-access-token"
        // Hop-by-hop (RFC 9110 §7.6.1), and the ones keygate sets itself.
        | "connection" | "keep-alive" | "proxy-connection" | "proxy-authorization"
        | "proxy-authenticate" | "te" | "trailer" | "transfer-encoding" | "upgrade" | "expect"
        | "host" | "content-length"
        // Added by a browser: with them Google would answer with its own CORS headers and
        // decide on its own which pages may read keygate's answers.
        | "origin" | "referer"
        // They would make Google read the request otherwise than keygate did (another method),
        // bill another project, or answer in a shape keygate does not read; keygate sets
        // `accept-encoding` itself.
        | "x-http-method-override" | "x-http-method" | "x-method-override"
        | "x-goog-user-project" | "accept-encoding"
        // The header forms of `fields` and `$.xgafv`: they change the shape of the answer
        // keygate reads (a field mask can drop `usageMetadata`, or a created resource's `name`).
        | "x-goog-fieldmask" | "x-goog-api-format-version"
    )
}

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
/// endpoint does the translating. `path` is the canonical path ([`crate::wire::path::canonical`]).
///
/// `/v1/models` and `/v1/models/{id}` are also the native Gemini model listing (the google-genai
/// SDK calls `/v1/...`): they are taken as OpenAI-style only when the client authenticates the
/// way the openai SDKs do, with `Authorization: Bearer` and no `x-goog-api-key` or `key`
/// query parameter (`query_key`).
pub fn openai_alias(path: &str, req: &RequestHeader, query_key: bool) -> Option<String> {
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
        let goog_key = headers.contains_key("x-goog-api-key") || query_key;
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
        if let Some(i) = crate::wire::path::find(path, marker) {
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
    if let Some(i) = crate::wire::path::find(path, "/openai/") {
        return &path[i + "/openai/".len()..];
    }
    match path.rsplit_once(':') {
        Some((_, m)) if !m.contains('/') => m,
        _ => path,
    }
}

/// Why a request's model cannot be trusted: keygate would route by one model while Google
/// serves another (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// An OpenAI-style call that routes by model, without a JSON object body.
    #[error("the body must be a JSON object with one string \"model\"")]
    NotJson,
    /// No `model` where one is needed.
    #[error("the body must name its model in one string \"model\" field")]
    Missing,
    /// `model` given more than once (Google reads the last one, a parser may read the first).
    #[error("the body names \"model\" more than once")]
    Several,
    /// `model` is not a string.
    #[error("the body's \"model\" must be a string")]
    NotString,
    /// The body's `model` is not the path's.
    #[error("the body's model '{body}' differs from the path's '{path}'")]
    Mismatch {
        /// The model the path names.
        path: String,
        /// The model the body names.
        body: String,
    },
}

/// OpenAI-style endpoints that say in their body which model serves them.
const OPENAI_MODEL_ENDPOINTS: [&str; 6] = [
    "chat/completions",
    "completions",
    "embeddings",
    "images/generations",
    "audio/speech",
    "responses",
];

/// The model a request is for, read the way Google reads it, and refused when keygate and
/// Google could read it differently. `path` is canonical; `creates` says the call may create a
/// cache or a batch (whose body names the model).
/// - OpenAI-style calls name it in the body: exactly one string `model` for the endpoints that
///   need one; elsewhere at most one.
/// - Native calls name it in the path; a `model` in the body must then say the same.
pub fn model_of(api: Api, path: &str, creates: bool, body: &[u8]) -> Result<String, ModelError> {
    let strip = |m: &str| m.strip_prefix("models/").unwrap_or(m).to_string();
    let one = |models: Vec<Option<String>>| -> Result<Option<String>, ModelError> {
        match models.as_slice() {
            [] => Ok(None),
            [Some(m)] => Ok(Some(strip(m))),
            [None] => Err(ModelError::NotString),
            _ => Err(ModelError::Several),
        }
    };
    match api {
        Api::OpenAi => {
            let needed = OPENAI_MODEL_ENDPOINTS.contains(&method_of(path));
            if body.is_empty() && !needed {
                return Ok(String::new());
            }
            match (body_models(body, "model"), needed) {
                (Ok(models), _) => match one(models)? {
                    Some(m) => Ok(m),
                    None if needed => Err(ModelError::Missing),
                    None => Ok(String::new()),
                },
                (Err(()), true) => Err(ModelError::NotJson),
                (Err(()), false) => Ok(String::new()),
            }
        }
        Api::Gemini => match model_from_path(path) {
            Some(in_path) => {
                if let Ok(models) = body_models(body, "model") {
                    if let Some(in_body) = one(models)? {
                        if in_body != in_path {
                            return Err(ModelError::Mismatch {
                                path: in_path.to_string(),
                                body: in_body,
                            });
                        }
                    }
                }
                Ok(in_path.to_string())
            }
            // A tuned model names the model it starts from as `baseModel`.
            None if creates => Ok(body_models(body, creation_field(path))
                .ok()
                .map(one)
                .transpose()?
                .flatten()
                .unwrap_or_default()),
            None => Ok(String::new()),
        },
    }
}

/// The body field that names the model of a resource created at `path`.
fn creation_field(path: &str) -> &'static str {
    if path.trim_end_matches('/').ends_with("/tunedModels") {
        "baseModel"
    } else {
        "model"
    }
}

/// Refuses a body a strict JSON parser would not read: Google's parser also takes some
/// non-standard forms (single quotes, bare keys, `\U` escapes, trailing commas), which could
/// hide a field from keygate's reading of the body. An empty body passes. Nesting deeper than
/// 128 levels is refused too (Google's own limit is lower).
pub fn strict_json(body: &[u8]) -> Result<(), String> {
    if body.is_empty() {
        return Ok(());
    }
    if std::str::from_utf8(body).is_err() {
        return Err("the request body is not UTF-8".to_string());
    }
    serde_json::from_slice::<AnyJson>(body)
        .map(|_| ())
        .map_err(|e| format!("the request body is not strict JSON ({e})"))
}

/// Any JSON value, read and dropped. Unlike `IgnoredAny`, it goes through the parser's nesting
/// limit (128 levels).
struct AnyJson;

impl<'de> serde::Deserialize<'de> for AnyJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AnyJson, D::Error> {
        d.deserialize_any(AnyJson)
    }
}

impl<'de> serde::de::Visitor<'de> for AnyJson {
    type Value = AnyJson;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_f64<E>(self, _: f64) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_str<E>(self, _: &str) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_unit<E>(self) -> Result<AnyJson, E> {
        Ok(AnyJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<AnyJson, A::Error> {
        while seq.next_element::<AnyJson>()?.is_some() {}
        Ok(AnyJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnyJson, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, AnyJson>()?
            .is_some()
        {}
        Ok(AnyJson)
    }
}

/// The top-level `field` fields (`model`) of a JSON object body, in order (keys read with their
/// escapes decoded, so `"\u006dodel"` counts): each the string it holds, or `None` for another
/// type. `Err` when the body is not a JSON object.
fn body_models(body: &[u8], field: &'static str) -> Result<Vec<Option<String>>, ()> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    // A body that spells no such field (plainly, or as an escape) names none: no parse needed.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') && !has(body, field) && ESCAPE.find(body).is_none() {
        return Ok(Vec::new());
    }
    struct Models(&'static str);
    impl<'de> Visitor<'de> for Models {
        type Value = Vec<Option<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = Vec::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if key == self.0 {
                    let value: serde_json::Value = map.next_value()?;
                    found.push(value.as_str().map(str::to_string));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let found = de.deserialize_map(Models(field)).map_err(|_| ())?;
    de.end().map_err(|_| ())?;
    Ok(found)
}

/// Whether `body` spells `field`. The searcher for `model`, asked of nearly every body, is built
/// once: building one costs about what searching a short body does.
fn has(body: &[u8], field: &str) -> bool {
    static MODEL: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("model"));
    if field == "model" {
        MODEL.find(body).is_some()
    } else {
        memchr::memmem::find(body, field.as_bytes()).is_some()
    }
}

/// A JSON escape (`\u006d`), with which a key can spell `model` without its letters.
static ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("\\u"));

/// Whether a request starts a resumable upload.
pub fn is_upload_start(req: &RequestHeader) -> bool {
    req.headers
        .get("x-goog-upload-command")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|c| c.trim().eq_ignore_ascii_case("start")))
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
}

/// The credential the client presents, in any of the four forms the SDKs use: the
/// `x-goog-api-key`, `Authorization: Bearer` and `X-Access-Token` headers, or the `key` query
/// parameter (`query_key`, from [`crate::wire::path::split_query`]).
pub fn client_token(req: &RequestHeader, query_key: Option<&[u8]>) -> Option<Vec<u8>> {
    let headers = &req.headers;
    if let Some(v) = headers.get(&GOOG_API_KEY) {
        return Some(v.as_bytes().to_vec());
    }
    if let Some(token) = bearer_token(headers) {
        return Some(token.to_vec());
    }
    if let Some(v) = headers.get(&ACCESS_TOKEN) {
        return Some(v.as_bytes().to_vec());
    }
    query_key.map(<[u8]>::to_vec)
}

/// `path?query`, the query being the one forwarded (no `key` parameter).
pub fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

/// `path_and_query` without the upstream's base path when it starts with it (an upload URL a
/// relay hands out under its own path): keygate adds the base path to every request it sends.
pub fn without_base<'a>(path_and_query: &'a str, base_path: &str) -> &'a str {
    match path_and_query.strip_prefix(base_path) {
        Some(rest) if !base_path.is_empty() && rest.starts_with('/') => rest,
        _ => path_and_query,
    }
}

/// What is forwarded, the same for every attempt.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// Which API: decides how the key is sent.
    pub api: Api,
    /// The canonical path and the query without `key` ([`with_query`]).
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
    /// The path the upstream lives under (a relay's), without a trailing slash; empty for
    /// Google itself. The forwarded path is appended to it.
    pub base_path: &'a str,
    /// Headers of the upstream's own (`upstream_headers`): set on every request, in place of
    /// any the client sent under the same name.
    pub headers: &'a [(HeaderName, http::HeaderValue)],
}

/// What every attempt of a request sends from the client's request: its method and the
/// headers that may go upstream (credentials, hop-by-hop headers, browser-only headers and
/// overrides removed), chosen once per request. The attempts can then be built while the client
/// connection is watched for a hang-up.
#[derive(Debug, Clone)]
pub struct Outgoing {
    method: http::Method,
    /// The client's path and query as parsed, reused when an attempt sends them unchanged.
    path_and_query: Option<http::uri::PathAndQuery>,
    headers: Vec<(HeaderName, http::HeaderValue)>,
    /// The client takes gzip: keygate asks Google for gzip, else for a plain answer (the two
    /// encodings keygate reads).
    gzip: bool,
}

impl Outgoing {
    /// The parts of `client` that go upstream.
    pub fn from_client(client: &RequestHeader) -> Outgoing {
        let listed = connection_listed(&client.headers);
        let headers = client
            .headers
            .iter()
            .filter(|(name, _)| !(not_forwarded(name.as_str()) || listed.contains(name)))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let gzip = client
            .headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .any(|v| {
                v.as_bytes()
                    .windows(4)
                    .any(|w| w.eq_ignore_ascii_case(b"gzip"))
            });
        Outgoing {
            method: client.method.clone(),
            path_and_query: client.uri.path_and_query().cloned(),
            headers,
            gzip,
        }
    }
}

/// The header that carries a pool key to Google's native API.
static GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");

/// The header some clients send their token in.
static ACCESS_TOKEN: HeaderName = HeaderName::from_static("x-access-token");

/// Header name prefixes that steer a relay in front of Google: Cloudflare's AI Gateway
/// (`cf-aig-`), Portkey (`x-portkey-`), Helicone (`helicone-`).
const RELAY_CONTROLS: [&str; 3] = ["cf-aig-", "x-portkey-", "helicone-"];

/// Whether the header named `name` (lowercase) steers a relay.
fn is_relay_control(name: &str) -> bool {
    RELAY_CONTROLS.iter().any(|p| name.starts_with(p))
}

/// One attempt's upstream request: the client's method and headers ([`Outgoing`]), the
/// forwarded path (under the target's base path), the pool key (as `x-goog-api-key`, or
/// `Authorization: Bearer` for the OpenAI-compatible API), the upstream's own headers and the
/// target for HTTP/1.1 (`Host`) or HTTP/2 (absolute URI, no `Host`). Built afresh per attempt:
/// cheaper than building once and cloning, since most requests need a single attempt.
pub fn upstream_request(
    out: &Outgoing,
    fwd: &Forward<'_>,
    key: &str,
    target: &Target<'_>,
) -> pingora::Result<RequestHeader> {
    let based;
    let path_and_query = if target.base_path.is_empty() {
        fwd.path_and_query
    } else {
        based = format!("{}{}", target.base_path, fwd.path_and_query);
        &based
    };
    // Pingora parses and checks the target; the headers then go straight into the header map.
    // Pingora's own insert turns each name into its title case and parses it back (BENCHMARKS.md).
    // Header case is not kept: names go upstream in lowercase, which HTTP/1.1 and HTTP/2 both
    // allow. An origin-form target (`/...`, every one keygate sends) round-trips through the
    // parts unchanged.
    if !path_and_query.starts_with('/') {
        return Err(invalid("upstream target"));
    }
    let mut parts = match &out.path_and_query {
        // Sent as the client wrote it: already parsed and checked, no second parse.
        Some(client) if client.as_str() == path_and_query => {
            let (mut parts, ()) = http::Request::new(()).into_parts();
            parts.method = out.method.clone();
            parts.uri = http::Uri::from(client.clone());
            parts
        }
        _ => http::request::Parts::from(RequestHeader::build_no_case(
            out.method.clone(),
            path_and_query.as_bytes(),
            None,
        )?),
    };
    let headers = &mut parts.headers;
    headers.reserve(out.headers.len() + target.headers.len() + 4);
    let relay = !target.base_path.is_empty() || !target.headers.is_empty();
    for (name, value) in &out.headers {
        // A relay's own controls (logging, caching, routing) are the pool's to set, not a
        // client's: a tenant could hide its traffic, share another's cached answers, or send
        // the pool key elsewhere.
        if relay && is_relay_control(name.as_str()) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    for (name, value) in target.headers {
        headers.insert(name.clone(), value.clone());
    }
    let method_has_body = !matches!(out.method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if fwd.body_len > 0 || method_has_body {
        headers.insert(header::CONTENT_LENGTH, fwd.body_len.into());
    }
    let encoding = if out.gzip { "gzip" } else { "identity" };
    headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(encoding));
    // The error says which header, never what it held.
    let (name, value) = match fwd.api {
        Api::Gemini => (GOOG_API_KEY.clone(), HeaderValue::from_str(key)),
        Api::OpenAi => (
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {key}")),
        ),
    };
    let mut value = value.map_err(|_| invalid("pool key"))?;
    value.set_sensitive(true);
    headers.insert(name, value);
    if target.h2 {
        parts.version = http::Version::HTTP_2;
        parts.uri = http::Uri::builder()
            .scheme(if target.tls { "https" } else { "http" })
            .authority(target.authority)
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "upstream uri", e)
            })?;
    } else {
        parts.version = http::Version::HTTP_11;
        let host = HeaderValue::from_str(target.authority).map_err(|_| invalid("host"))?;
        headers.insert(header::HOST, host);
    }
    Ok(RequestHeader::from(parts))
}

/// The error for a request header keygate could not build; `what` names the part.
fn invalid(what: &'static str) -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, what)
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

#[cfg(test)]
mod tests;
