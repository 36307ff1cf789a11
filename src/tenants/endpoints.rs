//! What a tenant's request may be: the endpoints keygate forwards for tenants (only those it can
//! keep tenants apart on), and the query, headers, body and Live sessions it reads the way
//! Google will. Pure functions, each answering "refused, and why?".
//!
//! Google's API grows (File Search stores, generated files, managed agents...), and each new
//! kind of resource is one keygate would have to recognise, bind and filter to keep one tenant out
//! of another's. So with tenants the rule is deny by default: the endpoints below, whose models and
//! resources keygate reads, go through; anything else gets 403 until keygate learns it. Without
//! tenants (one user), every path under the API's prefixes is forwarded.

use crate::logging::printable;
use crate::wire::error::GatewayError;
use crate::wire::request;
use http::{header, Method};
use pingora::http::RequestHeader;

/// Methods a tenant may call on `models/{model}`: generation, counting, embedding, prediction.
const MODEL_METHODS: [&str; 9] = [
    "generateContent",
    "streamGenerateContent",
    "countTokens",
    "embedContent",
    "batchEmbedContents",
    "predict",
    "predictLongRunning",
    "batchGenerateContent",
    "asyncBatchEmbedContent",
];

/// Whether a tenant may call `method` on the canonical `path` (after any OpenAI-style alias).
fn tenant_may_call(method: &Method, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (upload, rest) = match segments.as_slice() {
        ["upload", version, rest @ ..] if version.starts_with("v1") => (true, rest),
        [version, rest @ ..] if version.starts_with("v1") => (false, rest),
        _ => return false,
    };
    let read = *method == Method::GET || *method == Method::HEAD;
    let post = *method == Method::POST;
    let delete = *method == Method::DELETE;
    let patch = *method == Method::PATCH;
    // `name:method` split.
    let call = |segment: &str| segment.split_once(':').map(|(_, m)| m.to_string());
    let plain = |segment: &str| !segment.contains(':');
    if upload {
        // Media uploads create files; continuations carry keygate's own upload id.
        return matches!(rest, ["files"]) && (post || *method == Method::PUT);
    }
    match rest {
        ["openai", endpoint @ ..] => match endpoint {
            ["chat", "completions"] | ["completions"] | ["embeddings"] => post,
            ["images", "generations"] => post,
            ["models"] => read,
            ["models", m] => read && plain(m),
            // Ids as Google's OpenAI-style model list spells them (`models/gemini-2.5-flash`).
            ["models", "models", m] => read && plain(m),
            _ => false,
        },
        ["models"] => read,
        ["models", m] if plain(m) => read,
        ["models", m] => post && call(m).is_some_and(|c| MODEL_METHODS.contains(&c.as_str())),
        ["models", _, "operations"] => read,
        ["models", _, "operations", op] => operation(method, op),
        ["tunedModels"] => read || post,
        ["tunedModels", t] if plain(t) => read || patch || delete,
        ["tunedModels", t] => post && call(t).is_some_and(|c| MODEL_METHODS.contains(&c.as_str())),
        ["tunedModels", _, "operations"] => read,
        ["tunedModels", _, "operations", op] => operation(method, op),
        ["files"] => read || post,
        ["files", f] if plain(f) => read || delete,
        ["files", f] => read && call(f).as_deref() == Some("download"),
        ["cachedContents"] => read || post,
        ["cachedContents", c] => plain(c) && (read || patch || delete),
        ["batches"] => read,
        ["batches", b] if plain(b) => read || delete || patch,
        ["batches", b] => post && call(b).as_deref() == Some("cancel"),
        ["operations"] => read,
        ["operations", op] => operation(method, op),
        // A new interaction or a follow-up; one interaction read, deleted or cancelled.
        ["interactions"] => post,
        ["interactions", i] if plain(i) => read || delete,
        ["interactions", i] => post && call(i).as_deref() == Some("cancel"),
        ["interactions", _, "cancel"] => post,
        _ => false,
    }
}

/// Why keygate refuses a tenant's request before reading its body, if it does: an endpoint it
/// cannot keep tenants apart on, a query parameter it does not know, an upload by another
/// protocol than the resumable one, or a body Google would read otherwise than keygate.
/// `continues_upload`: the request carries the bytes of an upload keygate handed out.
pub fn refusal_before_body(
    req: &RequestHeader,
    path: &str,
    query: Option<&str>,
    continues_upload: bool,
) -> Option<GatewayError> {
    if !tenant_may_call(&req.method, path) {
        return Some(GatewayError::new(
            403,
            "PERMISSION_DENIED",
            format!(
                "keygate: {} {} is not forwarded for tenants: keygate cannot keep tenants apart on this endpoint (README, Security model)",
                req.method,
                printable(path)
            ),
        ));
    }
    if let Some(why) = tenant_query_refusal(query) {
        return Some(GatewayError::new(
            400,
            "INVALID_ARGUMENT",
            format!("keygate: {why}"),
        ));
    }
    // A media or multipart upload carries its metadata where keygate does not read it.
    if path.starts_with("/upload/") && !continues_upload && !request::is_upload_start(req) {
        return Some(GatewayError::new(
            400,
            "INVALID_ARGUMENT",
            "keygate: tenants upload with the resumable protocol (X-Goog-Upload-Protocol: resumable, as the SDKs do)",
        ));
    }
    unreadable_body(req, path).map(|why| GatewayError::new(415, "INVALID_ARGUMENT", why))
}

/// Why keygate refuses a tenant's request `body` (not an upload's bytes), if it does: not
/// strict JSON, or a change (PATCH) to a field tenants may not change.
pub fn refusal_of_body(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Option<GatewayError> {
    if let Some(why) = (*method == Method::POST)
        .then(|| interaction_refusal(path, body))
        .flatten()
    {
        return Some(GatewayError::new(
            403,
            "PERMISSION_DENIED",
            format!("keygate: {why}"),
        ));
    }
    let why = request::strict_json(body).err().or_else(|| {
        (*method == Method::PATCH)
            .then(|| tenant_update_refusal(path, query, body))
            .flatten()
    })?;
    Some(GatewayError::new(
        400,
        "INVALID_ARGUMENT",
        format!("keygate: {why}"),
    ))
}

/// Why keygate refuses a tenant's Live session on the canonical `path`, if it does.
pub fn live_refusal(path: &str, query: Option<&str>) -> Option<GatewayError> {
    let why = if !tenant_may_open_live(path) {
        format!(
            "keygate: {} is not forwarded for tenants: of the WebSocket services, only the Live API's BidiGenerateContent is",
            printable(path)
        )
    } else {
        format!("keygate: {}", tenant_query_refusal(query)?)
    };
    Some(GatewayError::new(403, "PERMISSION_DENIED", why))
}

/// Why a tenant's request body would not read to Google as it reads to keygate, if it would
/// not: keygate reads bodies as JSON, unencoded. A body Google would read as protobuf or form
/// fields, or one compressed, could name resources keygate never sees. Uploads carry media.
fn unreadable_body(req: &RequestHeader, path: &str) -> Option<&'static str> {
    if path.starts_with("/upload/") {
        return None;
    }
    // Two values could be read as a list (`identity` then `gzip`): one of each at most.
    let several = |name| req.headers.get_all(name).iter().nth(1).is_some();
    if several(header::CONTENT_ENCODING) || several(header::CONTENT_TYPE) {
        return Some("keygate: send at most one Content-Type and one Content-Encoding header");
    }
    let header = |name| {
        req.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
    };
    if header(header::CONTENT_ENCODING).is_some_and(|e| e.trim() != "identity") {
        return Some("keygate: request bodies must not be compressed (Content-Encoding)");
    }
    let json = |t: &str| {
        let t = t.split(';').next().unwrap_or("").trim();
        t.is_empty() || t == "application/json" || t.ends_with("+json") || t == "text/plain"
    };
    if header(header::CONTENT_TYPE).is_some_and(|t| !json(&t)) {
        return Some(
            "keygate: request bodies are read as JSON: send Content-Type: application/json",
        );
    }
    None
}

/// Whether a tenant may open a Live API session on the canonical `path`: the Gemini Live
/// service only (other WebSocket services carry other protocols, which keygate does not read).
fn tenant_may_open_live(path: &str) -> bool {
    ["v1", "v1beta", "v1alpha"].iter().any(|v| {
        path == format!(
            "/ws/google.ai.generativelanguage.{v}.GenerativeService.BidiGenerateContent"
        )
    })
}

/// Fields of a new interaction that name what keygate does not track (compared without case
/// and `_`): an agent to run (managed agents belong to a project) and an environment (a
/// sandbox, or the id of one a project keeps). A tenant's interaction names its model, which
/// routes it like any generation.
const UNTRACKED_INTERACTION_FIELDS: [&str; 2] = ["agent", "environment"];

/// Why a tenant's new interaction (a POST to the canonical `path` `.../interactions`) is
/// refused, if it is: it names an agent or an environment ([`UNTRACKED_INTERACTION_FIELDS`]).
fn interaction_refusal(path: &str, body: &[u8]) -> Option<String> {
    if !path.trim_end_matches('/').ends_with("/interactions") {
        return None;
    }
    let top: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    let untracked = |field: &str| {
        let norm: String = field
            .chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        UNTRACKED_INTERACTION_FIELDS.contains(&norm.as_str())
    };
    let field = top.keys().find(|k| untracked(k))?;
    Some(format!(
        "interactions with '{}' are not forwarded for tenants: keygate does not track agents or environments; name a model",
        printable(field)
    ))
}

/// The fields a tenant may change in a resource with PATCH, by collection (compared without
/// case and `_`). Others could move the resource to another model (`model`) or feed it what
/// keygate does not read (`inputConfig`).
const UPDATABLE: [(&str, &[&str]); 3] = [
    ("cachedContents", &["ttl", "expiretime"]),
    ("batches", &["displayname", "priority"]),
    ("tunedModels", &["displayname", "description"]),
];

/// Why a tenant's PATCH of the resource at canonical `path` is refused, if it is: a body field,
/// or a field of the `updateMask` parameter, that the collection does not let tenants change.
/// `body` is strict JSON already.
fn tenant_update_refusal(path: &str, query: Option<&str>, body: &[u8]) -> Option<String> {
    let collection = path.split('/').rev().nth(1).unwrap_or_default();
    let Some((_, fields)) = UPDATABLE.iter().find(|(c, _)| *c == collection) else {
        return Some(format!("{} cannot be changed by tenants", printable(path)));
    };
    let allowed = |field: &str| {
        let norm: String = field
            .chars()
            .filter(|c| *c != '_')
            .map(|c| c.to_ascii_lowercase())
            .collect();
        norm == "name" || fields.contains(&norm.as_str())
    };
    let refusal = |field: &str| {
        Some(format!(
            "tenants may not change '{}' of {collection}",
            printable(field)
        ))
    };
    let top: serde_json::Map<String, serde_json::Value> = match serde_json::from_slice(body) {
        Ok(map) => map,
        Err(_) if body.is_empty() => serde_json::Map::new(),
        Err(_) => return Some("the body must be a JSON object".to_string()),
    };
    if let Some(field) = top.keys().find(|k| !allowed(k)) {
        return refusal(field);
    }
    let masks = query
        .unwrap_or_default()
        .split(['&', ';'])
        .filter_map(|p| p.strip_prefix("updateMask="));
    for mask in masks {
        let mask = percent_encoding::percent_decode_str(mask).decode_utf8_lossy();
        if let Some(field) = mask.split(',').map(str::trim).find(|f| !allowed(f)) {
            return refusal(field);
        }
    }
    None
}

/// The query parameters a tenant's request may carry (the key parameter is taken out before),
/// each with the values it may have (`None`: any). Others could change what Google reads
/// (`cachedContent=...` is a request field), or the shape of the answer keygate reads
/// (`alt=proto`, `fields`, `$.xgafv`, `callback`).
const QUERY_PARAMETERS: [(&str, Option<&[&str]>); 11] = [
    ("alt", Some(&["sse", "json", "media"])),
    ("pageSize", None),
    ("pageToken", None),
    ("filter", None),
    ("updateMask", None),
    ("tunedModelId", None),
    ("upload_id", None),
    ("upload_protocol", Some(&["resumable"])),
    // Reading an interaction: as a stream, resumed after an event, with its input.
    ("stream", Some(&["true", "false"])),
    ("last_event_id", None),
    ("include_input", Some(&["true", "false"])),
];

/// Why a tenant's query (as forwarded) is refused, if it is: a parameter not in
/// [`QUERY_PARAMETERS`] (spelt exactly: a %-escaped name is another name), one given twice, or a
/// value not allowed.
fn tenant_query_refusal(query: Option<&str>) -> Option<String> {
    let mut seen: Vec<&str> = Vec::new();
    for pair in query?.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let shown = printable(name);
        let Some((_, values)) = QUERY_PARAMETERS.iter().find(|(n, _)| *n == name) else {
            return Some(format!(
                "query parameter '{shown}' is not forwarded for tenants"
            ));
        };
        if seen.contains(&name) {
            return Some(format!("query parameter '{shown}' is given more than once"));
        }
        seen.push(name);
        let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        if values.is_some_and(|allowed| !allowed.contains(&&*value)) {
            return Some(format!(
                "query parameter '{shown}' may not be '{}' for tenants",
                printable(&value)
            ));
        }
    }
    None
}

/// A long-running operation: read, deleted, or cancelled.
fn operation(method: &Method, segment: &str) -> bool {
    match segment.split_once(':') {
        None => *method == Method::GET || *method == Method::HEAD || *method == Method::DELETE,
        Some((_, call)) => *method == Method::POST && call == "cancel",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_tenant_may_call() {
        let allowed = [
            ("GET", "/v1beta/models"),
            ("GET", "/v1/models/gemini-2.5-flash"),
            ("POST", "/v1beta/models/gemini-2.5-flash:generateContent"),
            (
                "POST",
                "/v1alpha/models/gemini-2.5-flash:streamGenerateContent",
            ),
            (
                "POST",
                "/v1beta/models/text-embedding-004:batchEmbedContents",
            ),
            ("POST", "/v1beta/models/veo-3.0:predictLongRunning"),
            ("GET", "/v1beta/models/veo-3.0/operations/op1"),
            ("POST", "/v1beta/tunedModels/t1:generateContent"),
            ("GET", "/v1beta/files"),
            ("GET", "/v1beta/files/abc"),
            ("DELETE", "/v1beta/files/abc"),
            ("GET", "/v1beta/files/abc:download"),
            ("POST", "/upload/v1beta/files"),
            ("POST", "/v1beta/cachedContents"),
            ("PATCH", "/v1beta/cachedContents/c1"),
            ("GET", "/v1beta/batches/b1"),
            ("POST", "/v1beta/batches/b1:cancel"),
            ("GET", "/v1beta/operations/op1"),
            ("POST", "/v1beta/operations/op1:cancel"),
            ("POST", "/v1beta/openai/chat/completions"),
            ("POST", "/v1beta/openai/embeddings"),
            ("GET", "/v1beta/openai/models"),
            ("GET", "/v1beta/openai/models/models/gemini-2.5-flash"),
            ("POST", "/v1beta/interactions"),
            ("GET", "/v1beta/interactions/abc"),
            ("DELETE", "/v1beta/interactions/abc"),
            ("POST", "/v1beta/interactions/abc/cancel"),
            ("POST", "/v1beta/interactions/abc:cancel"),
        ];
        for (method, path) in allowed {
            assert!(
                tenant_may_call(&method.parse().unwrap(), path),
                "{method} {path}"
            );
        }
        let refused = [
            ("GET", "/v1beta/interactions"),
            ("PATCH", "/v1beta/interactions/abc"),
            ("POST", "/v1beta/interactions/abc"),
            ("GET", "/v1beta/fileSearchStores"),
            ("POST", "/v1beta/fileSearchStores/s1:importFile"),
            ("GET", "/v1beta/generatedFiles"),
            ("GET", "/v1beta/corpora"),
            ("POST", "/v1beta/models/gemini-2.5-flash:generateAnswer"),
            ("POST", "/v1beta/tunedModels/t1:transferOwnership"),
            ("POST", "/v1beta/tunedModels/t1/permissions"),
            ("POST", "/v1beta/files/abc"),
            ("POST", "/v1beta/openai/files"),
            ("POST", "/v1beta/openai/batches"),
            ("PUT", "/v1beta/models/x:generateContent"),
            ("GET", "/v2/models"),
            (
                "POST",
                "/upload/v1beta/fileSearchStores/s1:uploadToFileSearchStore",
            ),
        ];
        for (method, path) in refused {
            assert!(
                !tenant_may_call(&method.parse().unwrap(), path),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn what_a_tenant_may_ask_in_a_query() {
        for ok in [
            None,
            Some("alt=sse"),
            Some("pageSize=10&pageToken=abc%3D"),
            Some("upload_id=u1&upload_protocol=resumable"),
            Some("alt=media"),
            Some("updateMask=ttl"),
            Some("stream=true&last_event_id=ev-7&include_input=false"),
        ] {
            assert_eq!(tenant_query_refusal(ok), None, "{ok:?}");
        }
        for (bad, why) in [
            (
                "cachedContent=cachedContents/x",
                "'cachedContent' is not forwarded",
            ),
            ("generateContentRequest.cachedContent=x", "not forwarded"),
            ("alt=proto", "may not be 'proto'"),
            ("alt=sse&alt=json", "more than once"),
            ("%74unedModelId=t1", "'%74unedModelId' is not forwarded"),
            ("tuned_model_id=t1", "not forwarded"),
            ("fields=name", "not forwarded"),
            ("$.xgafv=1", "not forwarded"),
            ("callback=f", "not forwarded"),
            ("stream=yes", "may not be 'yes'"),
            ("previous_interaction_id=x", "not forwarded"),
        ] {
            let got = tenant_query_refusal(Some(bad)).unwrap_or_default();
            assert!(got.contains(why), "{bad}: {got}");
        }
    }

    #[test]
    fn what_a_tenant_may_change() {
        let cache = "/v1beta/cachedContents/c1";
        assert_eq!(
            tenant_update_refusal(cache, None, br#"{"ttl":"60s"}"#),
            None
        );
        assert_eq!(
            tenant_update_refusal(
                cache,
                Some("updateMask=expire_time"),
                br#"{"expireTime":"2026-12-01T00:00:00Z"}"#
            ),
            None
        );
        for (path, query, body, why) in [
            (
                cache,
                None,
                &br#"{"model":"models/gemini-2.5-pro"}"#[..],
                "'model'",
            ),
            (
                cache,
                Some("updateMask=model"),
                br#"{"ttl":"60s"}"#,
                "'model'",
            ),
            (cache, Some("updateMask=ttl,contents"), b"", "'contents'"),
            (
                "/v1beta/batches/b1",
                None,
                br#"{"inputConfig":{"fileName":"files/x"}}"#,
                "'inputConfig'",
            ),
            (
                "/v1beta/tunedModels/t1",
                None,
                br#"{"baseModel":"models/x"}"#,
                "'baseModel'",
            ),
            ("/v1beta/files/f1", None, b"{}", "cannot be changed"),
        ] {
            let got = tenant_update_refusal(path, query, body).unwrap_or_default();
            assert!(got.contains(why), "{path} {query:?}: {got}");
        }
        assert_eq!(
            tenant_update_refusal(
                "/v1beta/batches/b1",
                None,
                br#"{"displayName":"x","priority":2}"#
            ),
            None
        );
    }

    #[test]
    fn a_tenants_interaction_names_a_model_not_an_agent() {
        let post = Method::POST;
        let path = "/v1beta/interactions";
        let refusal = |body: &str| refusal_of_body(&post, path, None, body.as_bytes());
        assert!(refusal(r#"{"model":"gemini-2.5-flash","input":"hi"}"#).is_none());
        let follow_up =
            r#"{"model":"gemini-2.5-flash","input":"and?","previous_interaction_id":"v1_abc"}"#;
        assert!(refusal(follow_up).is_none());
        for body in [
            r#"{"agent":"deep-research-pro-preview-12-2025","input":"hi"}"#,
            r#"{"model":"gemini-2.5-flash","environment":"env-1","input":"hi"}"#,
            r#"{"model":"gemini-2.5-flash","Environment":{"sources":[]}}"#,
        ] {
            let e = refusal(body).unwrap();
            assert_eq!(e.code, 403, "{body}");
            assert!(
                e.message.contains("not forwarded for tenants"),
                "{body}: {}",
                e.message
            );
        }
        // Only a new interaction is read so: elsewhere `agent` is no field keygate refuses.
        let cancel = "/v1beta/interactions/abc/cancel";
        assert!(refusal_of_body(&post, cancel, None, br#"{"agent":"x"}"#).is_none());
        // Not strict JSON is refused as for any request.
        assert_eq!(refusal("{'model': 'x'}").map(|e| e.code), Some(400));
    }

    #[test]
    fn only_the_gemini_live_service_is_open_to_tenants() {
        assert!(tenant_may_open_live(
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
        ));
        assert!(tenant_may_open_live(
            "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContent"
        ));
        assert!(!tenant_may_open_live(
            "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic"
        ));
        assert!(!tenant_may_open_live(
            "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContentX"
        ));
    }

    #[test]
    fn a_request_google_would_read_otherwise_is_refused_before_its_body() {
        let req = |method: &str, path: &str, headers: &[(&str, &str)]| {
            let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
            for (k, v) in headers {
                r.append_header(k.to_string(), *v).unwrap();
            }
            r
        };
        let generate = "/v1beta/models/gemini-2.5-flash:generateContent";
        let code = |r: &RequestHeader, path: &str, query: Option<&str>, continues: bool| {
            refusal_before_body(r, path, query, continues).map(|e| e.code)
        };
        let json = [("content-type", "application/json")];
        assert_eq!(
            code(
                &req("POST", generate, &json),
                generate,
                Some("alt=sse"),
                false
            ),
            None
        );
        assert_eq!(
            code(
                &req("POST", "/v1beta/interactions", &json),
                "/v1beta/interactions",
                None,
                false
            ),
            None
        );
        assert_eq!(
            code(
                &req("POST", generate, &json),
                generate,
                Some("fields=x"),
                false
            ),
            Some(400)
        );
        for headers in [
            &[("content-type", "application/x-protobuf")][..],
            &[("content-encoding", "gzip")],
            &[
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ],
            &[
                ("content-type", "application/json"),
                ("content-type", "text/plain"),
            ],
        ] {
            assert_eq!(
                code(&req("POST", generate, headers), generate, None, false),
                Some(415),
                "{headers:?}"
            );
        }
        // Uploads: resumable only (its start, or the bytes of one keygate handed out).
        let upload = "/upload/v1beta/files";
        let start = [
            ("x-goog-upload-command", "start"),
            ("x-goog-upload-protocol", "resumable"),
        ];
        assert_eq!(
            code(&req("POST", upload, &start), upload, None, false),
            None
        );
        let bytes = [("content-type", "application/octet-stream")];
        assert_eq!(
            code(
                &req("POST", upload, &bytes),
                upload,
                Some("upload_id=u1"),
                true
            ),
            None
        );
        let multipart = [("content-type", "multipart/related; boundary=b")];
        assert_eq!(
            code(&req("POST", upload, &multipart), upload, None, false),
            Some(400)
        );
    }
}
