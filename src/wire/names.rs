//! Names of the resources Google binds to a project (`files/abc`, `cachedContents/xyz`...): in
//! request paths, in request bodies, in the answers that create them, and in listings.
//!
//! Recognition errs on the side of finding a name. A name keygate misses is sent to whichever
//! project the rotation picks, where it may be another tenant's resource; a name keygate finds
//! but does not know is only refused (with tenants) or routed like any request. So names are
//! read the way Google reads them, whatever the spelling: JSON escapes decoded
//! ([`crate::wire::json_strings`]), %-escapes and dot segments resolved ([`crate::wire::path`]), collection
//! words in any letter case. In a body, Google reads a reference only from the fields that hold
//! one (`fileUri`, `cachedContent`, `model`, `fileName`...), and not inside function-call
//! arguments, function results or schemas; so only those values (any name anywhere in them), and
//! values that are URLs of the Gemini API, count: a prompt or a tool argument that mentions
//! `files/x` in passing is not a reference.

use crate::wire::json_strings;
use crate::wire::path::{lenient_segments, unresolved_segments};
use std::borrow::Cow;
use std::collections::HashSet;
use std::time::Duration;

/// Longest resource id accepted. Google's ids are a few dozen characters; the bound keeps what a
/// client can make us allocate (and store) small.
pub const MAX_ID_LEN: usize = 256;

/// Most names taken from one request. [`names_in_body`] returns one more when the body names
/// more: with tenants, such a request is refused rather than half-checked.
pub const MAX_NAMES: usize = 100;

/// The kinds of resources Google binds to a project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `files/{id}`: uploaded media.
    File,
    /// `cachedContents/{id}`: an explicit context cache.
    CachedContent,
    /// `tunedModels/{id}`: a fine-tuned model.
    TunedModel,
    /// `batches/{id}`: a batch job.
    Batch,
    /// `operations/{id}`: a long-running operation (video generation, tuning, ...).
    Operation,
    /// `fileSearchStores/{id}`: documents for the File Search tool.
    FileSearchStore,
}

/// Collection words and their kinds.
const COLLECTIONS: [(&str, Kind); 6] = [
    ("files", Kind::File),
    ("cachedContents", Kind::CachedContent),
    ("tunedModels", Kind::TunedModel),
    ("batches", Kind::Batch),
    ("operations", Kind::Operation),
    ("fileSearchStores", Kind::FileSearchStore),
];

/// Body fields whose values Google reads as resource references, compared without case and
/// without `_` (protobuf JSON takes both `fileUri` and `file_uri`).
const REFERENCE_FIELDS: [&str; 8] = [
    "fileuri",
    "cachedcontent",
    "model",
    "filename",
    "basemodel",
    "tunedmodel",
    "filesearchstorenames",
    // OpenAI-style content parts: `{"type": "file", "file": {"file_id": ...}}`.
    "fileid",
];

/// Fields whose contents Google passes along without reading references in them: function-call
/// arguments, function results, and schemas (whose `properties` may be called anything).
const OPAQUE_FIELDS: [&str; 6] = [
    "args",
    "response",
    "parameters",
    "parametersjsonschema",
    "responseschema",
    "properties",
];

/// Host of the Gemini API: a URL naming it is a reference wherever it is.
const API_HOST: &str = "generativelanguage.googleapis.com";

impl Kind {
    /// How long the gateway remembers a resource of this kind. Keeping an entry past the
    /// resource's death costs one small map entry; dropping it too early sends the next request
    /// to a project that cannot see the resource, so each ttl errs on the long side.
    pub fn ttl(self) -> Duration {
        const HOUR: u64 = 3600;
        const DAY: u64 = 24 * HOUR;
        Duration::from_secs(match self {
            // Google deletes uploaded files 48 hours after upload.
            Kind::File => 48 * HOUR,
            // A cache lives for the ttl its creator chose (1 hour by default, no documented
            // maximum) and can be extended with PATCH, which this table does not see. Storage is
            // billed per hour, so caches kept for more than a week are rare: 7 days covers
            // nearly all of them without keeping dead entries for long.
            Kind::CachedContent => 7 * DAY,
            // Batch jobs target 24 hours and expire if still unfinished after 48 hours; 7 days
            // leaves the client time to poll, fetch the results and delete the job.
            Kind::Batch => 7 * DAY,
            // Long-running operations (video generation, tuning) finish in minutes to hours and
            // their results are kept about 2 days; clients poll them for a while afterwards.
            Kind::Operation => 7 * DAY,
            // A tuned model or a File Search store lives until deleted. 30 days bounds the
            // memory one never used again can hold; past that, requests for it are routed like
            // any other.
            Kind::TunedModel | Kind::FileSearchStore => 30 * DAY,
        })
    }
}

/// The kind of a resource name `"<collection>/<id>"` (`files/abc` → `Some(Kind::File)`); None for
/// other collections, nested names, and ids that are empty, too long or not `[A-Za-z0-9_.-]+`.
pub fn kind_of(name: &str) -> Option<Kind> {
    let (collection, id) = name.split_once('/')?;
    let (_, kind) = COLLECTIONS.iter().find(|(w, _)| *w == collection)?;
    valid_id(id).then_some(*kind)
}

/// The collection word (its own spelling) that `word` names in any letter case.
fn collection(word: &str) -> Option<&'static str> {
    COLLECTIONS
        .iter()
        .find(|(w, _)| w.eq_ignore_ascii_case(word))
        .map(|(w, _)| *w)
}

/// The bytes a resource id may contain.
fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// Whether `id` is a well-formed, bounded resource id.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(is_id_byte)
}

/// Names found so far, in order, without repeats; full at one more than [`MAX_NAMES`].
#[derive(Debug, Default)]
struct Found {
    list: Vec<String>,
    seen: HashSet<String>,
}

impl Found {
    fn push(&mut self, name: String) {
        if !self.full() && self.seen.insert(name.clone()) {
            self.list.push(name);
        }
    }

    fn full(&self) -> bool {
        self.list.len() > MAX_NAMES
    }
}

/// Adds every name in `segments`: a collection word followed by an id. The id is cut at a
/// `:method` suffix and at the first byte an id cannot hold, so `files/abc%20x` is read as
/// `files/abc` (a reader that stops there finds the same file).
fn push_names_in_segments<S: AsRef<str>>(segments: &[S], out: &mut Found) {
    for pair in segments.windows(2) {
        if out.full() {
            return;
        }
        let (word, id) = (pair[0].as_ref(), pair[1].as_ref());
        let Some(word) = collection(word) else {
            continue;
        };
        let id = id.split(':').next().unwrap_or_default();
        let len = id.bytes().take_while(|b| is_id_byte(*b)).count();
        // An overlong id is kept one byte too long: it can match nothing bound, so it is
        // refused (with tenants) rather than cut into some other resource's name.
        let id = &id[..len.min(MAX_ID_LEN + 1)];
        if !id.is_empty() {
            out.push(format!("{word}/{id}"));
        }
    }
}

/// A value as written, and with its %-escapes decoded first when it has any: an escaped `/` or
/// `?` may hide where the host or the path ends from one reading but not the other.
fn readings(value: &str) -> Vec<Cow<'_, str>> {
    let mut out = vec![Cow::Borrowed(value)];
    if value.contains('%') {
        out.push(percent_encoding::percent_decode_str(value).decode_utf8_lossy());
    }
    out
}

/// Adds the names a reference field's value holds: every collection word followed by an id,
/// wherever it sits (`files/x`, `models/tunedModels/t`, `projects/p/files/x`, a URL of any host:
/// `fileUri` may point anywhere Google accepts). Google's reading of the odd forms is not
/// documented, so the field is read for any name it could hold; with tenants, a name found that
/// is not the tenant's is refused, never forwarded.
fn push_reference(value: &str, out: &mut Found) {
    for reading in readings(value) {
        push_names_in_segments(&lenient_segments(&reading), out);
        if reading.contains("..") {
            push_names_in_segments(&unresolved_segments(&reading), out);
        }
    }
}

/// Whether a value is a URL of the Gemini API itself.
fn is_api_url(value: &str) -> bool {
    readings(value).iter().any(|v| {
        let v = v.trim();
        let host = v
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?', '#', '\\']).next().unwrap_or(""))
            .map(|authority| authority.rsplit('@').next().unwrap_or(""))
            .map(|host| host.split(':').next().unwrap_or(""));
        looks_like_url(v.as_bytes()) && host.is_some_and(|h| h.eq_ignore_ascii_case(API_HOST))
    })
}

/// Resource names a canonical request path ([`crate::wire::path::canonical`]) refers to:
/// `/v1beta/files/abc`, `/v1/files/abc:download`, `/v1beta/tunedModels/t:generateContent`,
/// `/v1beta/models/veo-2.0/operations/op1` (→ `operations/op1`). A listing (`/v1beta/files`)
/// names nothing.
pub fn names_in_path(path: &str) -> Vec<String> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut out = Found::default();
    push_names_in_segments(&segments, &mut out);
    out.list
}

/// Resource names a request body refers to: the values of reference fields (`fileUri`,
/// `cachedContent`, `model`, `fileName`, ... in any case, with or without `_`) outside opaque
/// fields (function arguments and results, schemas), and any string that is a URL of the Gemini
/// API (`https://generativelanguage.googleapis.com/v1beta/files/abc`). At most [`MAX_NAMES`] + 1
/// distinct names (one more than the limit says there were too many).
pub fn names_in_body(body: &[u8]) -> Vec<String> {
    let mut out = Found::default();
    json_strings::walk_marking(body, opaque, |v| {
        if v.marked {
            return true;
        }
        let text = v.string.decoded();
        // An OpenAI-style image part's `image_url.url` may hold a file's name too.
        let reference = match v.path {
            [.., parent, key] if is_field(parent, &["imageurl"]) && is_field(key, &["url"]) => true,
            [.., key] => is_field(key, &REFERENCE_FIELDS),
            [] => false,
        };
        if reference || looks_like_url(text.trim_ascii_start()) {
            let value = String::from_utf8_lossy(&text);
            if reference {
                push_reference(&value, &mut out);
            } else if is_api_url(&value) {
                push_names_in_segments(&lenient_segments(&value), &mut out);
            }
        }
        !out.full()
    });
    out.list
}

/// The names a create request chooses for its new resources: `file.name` in an upload's
/// metadata (`{"file": {"name": "files/report"}}`).
pub fn chosen_names(body: &[u8]) -> Vec<String> {
    let mut out = Found::default();
    json_strings::walk(body, |v| {
        let chosen = matches!(v.path, [.., parent, key]
            if is_field(parent, &["file"]) && is_field(key, &["name"]));
        if chosen {
            push_reference(&String::from_utf8_lossy(&v.string.decoded()), &mut out);
        }
        !out.full()
    });
    out.list
}

/// Whether a batch request takes its requests from a file (`inputConfig.fileName`), whose
/// lines keygate does not read.
pub fn has_batch_input_file(body: &[u8]) -> bool {
    let mut found = false;
    let input = |k: &[u8]| is_field(k, &["inputconfig"]);
    json_strings::walk_marking(body, input, |v| {
        found = v.marked && v.path.last().is_some_and(|k| is_field(k, &["filename"]));
        !found
    });
    found
}

/// Where an answer names what Google made along the way, as key paths: a generated video's
/// `uri` (an operation of `predictLongRunning`), a batch's results file (the batch resource, or
/// the operation that wraps it). Only these: an answer also echoes what the request said (a
/// batch's inline requests and their metadata, prompts, display names, model text), and a
/// request must not be able to smuggle a name into its own answer and claim it.
const MADE_PATHS: [&[&str]; 5] = [
    &[
        "response",
        "generatevideoresponse",
        "generatedsamples",
        "video",
        "uri",
    ],
    &["response", "generatedvideos", "video", "uri"],
    &["output", "responsesfile"],
    &["metadata", "output", "responsesfile"],
    &["response", "responsesfile"],
];

/// Names an answer gives for what Google made along the way (an operation's video, a batch's
/// results file): the values at [`MADE_PATHS`]. For binding those to the owner of what was
/// asked about.
pub fn names_in_answer(answer: &[u8]) -> Vec<String> {
    let mut out = Found::default();
    json_strings::walk(answer, |v| {
        let made = MADE_PATHS.iter().any(|want| {
            want.len() == v.path.len() && want.iter().zip(v.path).all(|(w, k)| is_field(k, &[w]))
        });
        if made {
            push_reference(&String::from_utf8_lossy(&v.string.decoded()), &mut out);
        }
        !out.full()
    });
    out.list
}

/// Whether a key holds content Google passes along unread ([`OPAQUE_FIELDS`]).
fn opaque(key: &[u8]) -> bool {
    is_field(key, &OPAQUE_FIELDS)
}

/// Whether a (decoded) object key is one of `fields` (lower case, without `_` or `-`).
fn is_field(key: &[u8], fields: &[&str]) -> bool {
    if key.len() > 32 {
        return false;
    }
    let mut norm = [0u8; 32];
    let mut n = 0;
    for b in key.iter().filter(|b| !matches!(b, b'_' | b'-')) {
        norm[n] = b.to_ascii_lowercase();
        n += 1;
    }
    fields.iter().any(|f| f.as_bytes() == &norm[..n])
}

/// Whether a string value is an absolute URL (`http://`, `https://`, any case).
fn looks_like_url(text: &[u8]) -> bool {
    let head = |p: &[u8]| text.len() >= p.len() && text[..p.len()].eq_ignore_ascii_case(p);
    head(b"http://") || head(b"https://")
}

/// Names of resources an answer says were just created: the top-level `"name"` of the JSON
/// answer (cachedContents create, batches create, long-running operations
/// `models/x/operations/y` → `operations/y`, tunedModels create returns an operation whose
/// metadata has `"tunedModel": "tunedModels/..."`), and `file.name` of an upload finalize answer
/// `{"file":{"name":"files/abc",...}}`. The caller passes at most 256 KiB; malformed JSON gives
/// no names.
pub fn created_names(answer: &[u8]) -> Vec<String> {
    let mut out = Found::default();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(answer) else {
        return Vec::new();
    };
    let candidates = [
        value.get("name"),
        value.pointer("/metadata/tunedModel"),
        value.pointer("/file/name"),
    ];
    for name in candidates.into_iter().flatten().filter_map(|v| v.as_str()) {
        push_resource_names(name, &mut out);
    }
    out.list
}

/// Adds the names of a resource path such as `models/x/operations/y` (→ `operations/y`) or
/// `tunedModels/t/operations/o` (→ both). Resource paths alternate collection and id, so only
/// even segments are taken as collection words (Google's own answers are exact).
fn push_resource_names(resource: &str, out: &mut Found) {
    let mut segments = resource.split('/');
    while let (Some(word), Some(id)) = (segments.next(), segments.next()) {
        let Some((word, _)) = COLLECTIONS.iter().find(|(w, _)| *w == word) else {
            continue;
        };
        let id = id.split_once(':').map_or(id, |(id, _method)| id);
        if valid_id(id) {
            out.push(format!("{word}/{id}"));
        }
    }
}

/// Whether a canonical path lists a collection of project-bound resources (`/v1beta/files`,
/// `/v1beta/models/veo/operations`): its last segment is a collection word, in any case.
pub fn is_listing(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .is_some_and(|last| collection(last).is_some())
}

/// A listing answer with only the entries `keep` accepts: in every top-level array of objects,
/// an entry stays when its `name` holds resource names and `keep` accepts all of them. `None`
/// when the answer is not a JSON object (the caller withholds it).
pub fn filter_listing(answer: &[u8], keep: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let serde_json::Value::Object(mut top) = serde_json::from_slice(answer).ok()? else {
        return None;
    };
    for value in top.values_mut() {
        if let serde_json::Value::Array(items) = value {
            items.retain(|item| {
                let mut names = Found::default();
                if let Some(name) = item.get("name").and_then(|n| n.as_str()) {
                    push_resource_names(name, &mut names);
                }
                !names.list.is_empty() && names.list.iter().all(|n| keep(n))
            });
        }
    }
    serde_json::to_vec(&top).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kinds_and_ttls() {
        assert_eq!(kind_of("files/abc"), Some(Kind::File));
        assert_eq!(kind_of("cachedContents/x-1"), Some(Kind::CachedContent));
        assert_eq!(kind_of("tunedModels/t.1"), Some(Kind::TunedModel));
        assert_eq!(kind_of("batches/b_1"), Some(Kind::Batch));
        assert_eq!(kind_of("operations/op"), Some(Kind::Operation));
        assert_eq!(kind_of("fileSearchStores/s"), Some(Kind::FileSearchStore));
        assert_eq!(kind_of("models/gemini"), None);
        assert_eq!(kind_of("Files/abc"), None);
        assert_eq!(kind_of("files/"), None);
        assert_eq!(kind_of("files"), None);
        assert_eq!(kind_of("files/a/b"), None);
        assert_eq!(kind_of("files/a b"), None);
        assert_eq!(
            kind_of(&format!("files/{}", "a".repeat(MAX_ID_LEN + 1))),
            None
        );
        assert_eq!(Kind::File.ttl(), Duration::from_secs(48 * 3600));
        assert_eq!(Kind::TunedModel.ttl(), Duration::from_secs(30 * 24 * 3600));
        for kind in [Kind::CachedContent, Kind::Batch, Kind::Operation] {
            assert_eq!(kind.ttl(), Duration::from_secs(7 * 24 * 3600));
        }
    }

    #[test]
    fn path_forms() {
        let cases: [(&str, &[&str]); 16] = [
            ("/v1beta/files/abc", &["files/abc"]),
            ("/v1/files/abc:download", &["files/abc"]),
            ("/v1beta/cachedContents/xyz", &["cachedContents/xyz"]),
            (
                "/v1beta/tunedModels/my-model:generateContent",
                &["tunedModels/my-model"],
            ),
            ("/v1beta/batches/b1:cancel", &["batches/b1"]),
            ("/v1beta/operations/op1", &["operations/op1"]),
            ("/v1alpha/operations/op1?key=k", &["operations/op1"]),
            (
                "/v1beta/models/veo-2.0-generate-001/operations/op1",
                &["operations/op1"],
            ),
            (
                "/v1beta/tunedModels/t1/operations/o2",
                &["tunedModels/t1", "operations/o2"],
            ),
            ("/upload/v1beta/files/abc", &["files/abc"]),
            ("/v1beta/Files/abc", &["files/abc"]),
            ("/v1beta/files/abc%20x", &["files/abc"]),
            ("/v1beta/files", &[]),
            ("/upload/v1beta/files", &[]),
            ("/v1beta/models/gemini-2.0-flash:generateContent", &[]),
            ("/v1beta/files/:download", &[]),
        ];
        for (path, want) in cases {
            assert_eq!(names_in_path(path), names(want), "{path}");
        }
        assert!(names_in_path("").is_empty());
    }

    #[test]
    fn body_reference_fields_in_every_spelling() {
        let body = br#"{"contents":[{"parts":[
            {"fileData":{"mimeType":"image/png","fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc"}},
            {"file_data":{"file_uri":"http://127.0.0.1:8080/v1/files/def-2"}},
            {"fileData":{"fileUri":"files\u002fghi_3"}},
            {"fileData":{"fileUri":"\u0066iles/jkl"}},
            {"fileData":{"fileUri":"https://h/v1beta/x/../files/mno"}},
            {"fileData":{"fileUri":"https://h/v1beta/files/%70qr"}},
            {"fileData":{"f\u0069leUri":" FILES/stu "}}]}],
            "cachedContent":"cachedContents/xyz","model":"tunedModels/t1"}"#;
        assert_eq!(
            names_in_body(body),
            names(&[
                "files/abc",
                "files/def-2",
                "files/ghi_3",
                "files/jkl",
                "files/mno",
                "files/pqr",
                "files/stu",
                "cachedContents/xyz",
                "tunedModels/t1"
            ])
        );
        let batch = br#"{"batch":{"inputConfig":{"fileName":"files/in1"}}}"#;
        assert_eq!(names_in_body(batch), names(&["files/in1"]));
        let escaped =
            br#"{"fileUri":"https:\/\/generativelanguage.googleapis.com\/v1beta\/files\/esc1"}"#;
        assert_eq!(names_in_body(escaped), names(&["files/esc1"]));
        let lenient = br#"{'fileUri': 'files/single'}"#;
        assert_eq!(names_in_body(lenient), names(&["files/single"]));
    }

    #[test]
    fn mentions_outside_reference_fields_are_not_references() {
        for body in [
            &br#"{"functionCall":{"name":"read","args":{"fileName":"files/config.json"}}}"#[..],
            br#"{"functionResponse":{"name":"ls","response":{"fileUri":"files/x"}}}"#,
            br#"{"tools":[{"functionDeclarations":[{"parameters":{"properties":{"model":{"type":"string"}}}}]}]}"#,
            br#"{"text":"https://api.stripe.com/v1/files/file_123"}"#,
            br#"{"text":"https://github.com/org/repo/blob/v1.2.0/files/setup.py"}"#,
            br#"{"model":"models/gemini-2.5-flash"}"#,
            &br#"{"text":"see files/x and cachedContents/y"}"#[..],
            br#"{"functionCall":{"name":"read","args":{"path":"files/config.json"}}}"#,
            br#"{"text":"import x from \"./files/utils\""}"#,
            br#"{"text":"https://github.com/org/repo/tree/main/files/x"}"#,
            br#"{"profiles/x": "tiles/y"}"#,
            b"files/abc",
            b"",
        ] {
            assert!(
                names_in_body(body).is_empty(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Inside a reference field, a name counts wherever it sits in the value.
        for (body, want) in [
            (
                &br#"{"fileName":"static/files/logo.png"}"#[..],
                "files/logo.png",
            ),
            (br#"{"fileUri":"projects/p/files/pf1"}"#, "files/pf1"),
            (br#"{"fileUri":"x/files/xf1"}"#, "files/xf1"),
            (
                br#"{"fileUri":"//generativelanguage.googleapis.com/v1beta/files/h1"}"#,
                "files/h1",
            ),
            (
                br#"{"fileUri":"generativelanguage.googleapis.com/v1beta/files/h2"}"#,
                "files/h2",
            ),
            (br#"{"model":"models/tunedModels/tm1"}"#, "tunedModels/tm1"),
            (br#"{"file":{"file_id":"files/oa1"}}"#, "files/oa1"),
            (br#"{"image_url":{"url":"files/oa2"}}"#, "files/oa2"),
        ] {
            assert_eq!(
                names_in_body(body),
                names(&[want]),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // A name before a dot segment counts too: a reader may not resolve it.
        let dotted = br#"{"fileUri":"files/victim/../mine"}"#;
        assert_eq!(
            names_in_body(dotted),
            names(&["files/mine", "files/victim"])
        );
        // A Gemini API URL counts wherever it is.
        let url = br#"{"text":"https://generativelanguage.googleapis.com/v1beta/files/u1"}"#;
        assert_eq!(names_in_body(url), names(&["files/u1"]));
        // A function's result may carry media by reference: that is read.
        let parts =
            br#"{"functionResponse":{"name":"f","parts":[{"fileData":{"fileUri":"files/fr1"}}]}}"#;
        assert_eq!(names_in_body(parts), names(&["files/fr1"]));
        let stores =
            br#"{"tools":[{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/s1"]}}]}"#;
        assert_eq!(names_in_body(stores), names(&["fileSearchStores/s1"]));
    }

    #[test]
    fn names_chosen_at_creation_and_made_along_the_way() {
        let upload = br#"{"file":{"name":"files/report-2026","displayName":"r"}}"#;
        assert_eq!(chosen_names(upload), names(&["files/report-2026"]));
        assert!(chosen_names(br#"{"file":{"displayName":"files/x"}}"#).is_empty());
        let video = br#"{"name":"models/veo/operations/op1","done":true,"response":{"generatedVideos":[{"video":{"uri":"https://generativelanguage.googleapis.com/v1beta/files/viwx:download?alt=media"}}]}}"#;
        assert!(names_in_answer(video).contains(&"files/viwx".to_string()));
        assert!(has_batch_input_file(
            br#"{"batch":{"input_config":{"file_name":"files/in"}}}"#
        ));
        assert!(!has_batch_input_file(
            br#"{"batch":{"inputConfig":{"requests":{"requests":[]}}}}"#
        ));
        let batch = br#"{"name":"batches/b1","output":{"responsesFile":"files/batch-out"},"displayName":"files/echoed","metadata":{"prompt":"files/smuggled"}}"#;
        assert_eq!(names_in_answer(batch), names(&["files/batch-out"]));
        let veo = br#"{"done":true,"response":{"generateVideoResponse":{"generatedSamples":[{"video":{"uri":"https://generativelanguage.googleapis.com/v1beta/files/v2:download?alt=media"}}]}}}"#;
        assert_eq!(names_in_answer(veo), names(&["files/v2"]));
        let wrapped = br#"{"name":"batches/b2","metadata":{"output":{"responsesFile":"files/out2"}},"response":{"responsesFile":"files/out2"}}"#;
        assert_eq!(names_in_answer(wrapped), names(&["files/out2"]));
        // What a request wrote comes back in its answer: never read as something Google made.
        let echoed = br#"{"name":"batches/b3","metadata":{"output":{"inlinedResponses":{"inlinedResponses":[{"metadata":{"uri":"files/smuggled"},"response":{"candidates":[{"content":{"parts":[{"text":"https://generativelanguage.googleapis.com/v1beta/files/said"}]}}]}}]}}}}"#;
        assert!(names_in_answer(echoed).is_empty());
    }

    #[test]
    fn body_dedup_caps_and_long_ids() {
        let body: String = (0..150)
            .map(|i| format!(r#"{{"fileUri":"files/f{i}"}},{{"fileUri":"files/f{i}"}},"#))
            .collect();
        let found = names_in_body(body.as_bytes());
        assert_eq!(found.len(), MAX_NAMES + 1);
        assert_eq!(found[0], "files/f0");
        let long = format!(r#"{{"fileUri":"files/{}"}}"#, "a".repeat(1000));
        let found = names_in_body(long.as_bytes());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].len(), "files/".len() + MAX_ID_LEN + 1);
        assert_eq!(kind_of(&found[0]), None);
    }

    #[test]
    fn body_large_with_name_at_end() {
        let mut body = Vec::with_capacity(5 << 20);
        body.extend_from_slice(br#"{"inlineData":{"data":""#);
        let filler = b"QUJDs/ab+/files/+9Xfiles";
        while body.len() < (5 << 20) {
            body.extend_from_slice(filler);
        }
        body.extend_from_slice(br#""}},{"fileData":{"fileUri":"files/last1"}}"#);
        assert_eq!(names_in_body(&body), names(&["files/last1"]));
    }

    #[test]
    fn created_names_shapes() {
        let cache = br#"{"name":"cachedContents/abc123","model":"models/gemini-2.0-flash","expireTime":"x"}"#;
        assert_eq!(created_names(cache), names(&["cachedContents/abc123"]));
        let batch = br#"{"name":"batches/b42","metadata":{"@type":"type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"}}"#;
        assert_eq!(created_names(batch), names(&["batches/b42"]));
        let op = br#"{"name":"models/veo-2.0-generate-001/operations/op9"}"#;
        assert_eq!(created_names(op), names(&["operations/op9"]));
        let tuning = br#"{"name":"tunedModels/t7/operations/o1","metadata":{"totalSteps":10,"tunedModel":"tunedModels/t7"}}"#;
        assert_eq!(
            created_names(tuning),
            names(&["tunedModels/t7", "operations/o1"])
        );
        let upload = br#"{"file":{"name":"files/up1","mimeType":"video/mp4","sizeBytes":"12"}}"#;
        assert_eq!(created_names(upload), names(&["files/up1"]));
        assert!(created_names(b"not json").is_empty());
        assert!(created_names(br#"{"name":"files/x""#).is_empty());
        assert!(created_names(br#"{"name":"models/gemini-2.0-flash"}"#).is_empty());
        assert!(created_names(br#"{"name":42}"#).is_empty());
        assert!(created_names(br#"["files/x"]"#).is_empty());
        assert!(created_names(b"").is_empty());
        let deep = "[".repeat(100_000);
        assert!(created_names(deep.as_bytes()).is_empty());
    }

    #[test]
    fn listings_are_filtered() {
        assert!(is_listing("/v1beta/files"));
        assert!(is_listing("/v1beta/files/"));
        assert!(is_listing("/v1beta/models/veo/operations?pageSize=3"));
        assert!(!is_listing("/v1beta/files/abc"));
        assert!(!is_listing("/v1beta/models"));
        let answer = br#"{"files":[{"name":"files/a"},{"name":"files/b"},{"mimeType":"x"}],"nextPageToken":"t"}"#;
        let kept = filter_listing(answer, |n| n == "files/a").unwrap();
        let kept: serde_json::Value = serde_json::from_slice(&kept).unwrap();
        assert_eq!(kept["files"], serde_json::json!([{"name": "files/a"}]));
        assert_eq!(kept["nextPageToken"], "t");
        assert!(filter_listing(b"[1]", |_| true).is_none());
        assert!(filter_listing(b"not json", |_| true).is_none());
    }
}
