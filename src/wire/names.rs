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
    /// `interactions/{id}`: a turn of the Interactions API, whose conversation state Google
    /// keeps for follow-ups (`previous_interaction_id`).
    Interaction,
}

/// Collection words and their kinds.
const COLLECTIONS: [(&str, Kind); 7] = [
    ("files", Kind::File),
    ("cachedContents", Kind::CachedContent),
    ("tunedModels", Kind::TunedModel),
    ("batches", Kind::Batch),
    ("operations", Kind::Operation),
    ("fileSearchStores", Kind::FileSearchStore),
    ("interactions", Kind::Interaction),
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
            // A stored interaction stays until deleted or until Google's retention ends, which
            // gemini-api.md does not give; a conversation is picked up again after days or
            // weeks, so 60 days, each follow-up being an interaction of its own.
            Kind::Interaction => 60 * DAY,
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
    push_names_in(segments.iter().map(AsRef::as_ref), out);
}

/// Adds every collection word followed by an id among `segments`.
fn push_names_in<'a>(mut segments: impl Iterator<Item = &'a str>, out: &mut Found) {
    let Some(mut word) = segments.next() else {
        return;
    };
    for id in segments {
        if out.full() {
            return;
        }
        if let Some(collection) = collection(word) {
            push_name(collection, id, out);
        }
        word = id;
    }
}

/// Adds `collection/id` for the id at the start of segment `id` (up to a `:method`).
fn push_name(collection: &str, id: &str, out: &mut Found) {
    let id = id.split(':').next().unwrap_or_default();
    let len = id.bytes().take_while(|b| is_id_byte(*b)).count();
    // An overlong id is kept one byte too long: it can match nothing bound, so it is refused
    // (with tenants) rather than cut into some other resource's name.
    let id = &id[..len.min(MAX_ID_LEN + 1)];
    if !id.is_empty() {
        out.push(format!("{collection}/{id}"));
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

/// Adds the interaction a `previous_interaction_id` names. Google's ids are bare (`v1_Ch...`);
/// a value that holds a `/` is read as a reference field is (`interactions/abc`, a URL), any
/// other is cut like an id in a path: at the first byte an id cannot hold, one byte past the
/// longest id (so an overlong one matches nothing bound and is refused with tenants).
fn push_interaction_id(value: &str, out: &mut Found) {
    for reading in readings(value) {
        let id = reading.trim();
        if id.contains('/') {
            push_reference(id, out);
            continue;
        }
        let len = id.bytes().take_while(|b| is_id_byte(*b)).count();
        let id = &id[..len.min(MAX_ID_LEN + 1)];
        if !id.is_empty() {
            out.push(format!("interactions/{id}"));
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
    let path = memchr::memchr2(b'?', b'#', path.as_bytes()).map_or(path, |end| &path[..end]);
    let mut out = Found::default();
    push_names_in(path.split('/').filter(|s| !s.is_empty()), &mut out);
    out.list
}

/// Resource names a request body refers to: the values of reference fields (`fileUri`,
/// `cachedContent`, `model`, `fileName`, ... in any case, with or without `_`; an interaction's
/// media `uri` under its `input`) outside opaque fields (function arguments and results, schemas), the interaction a follow-up
/// continues (`previous_interaction_id`: `abc` → `interactions/abc`), and any string that is a
/// URL of the Gemini API (`https://generativelanguage.googleapis.com/v1beta/files/abc`). At most
/// [`MAX_NAMES`] + 1 distinct names (one more than the limit says there were too many).
pub fn names_in_body(body: &[u8]) -> Vec<String> {
    let mut out = Found::default();
    json_strings::walk_marking(body, opaque, |v| {
        if v.marked {
            return true;
        }
        let text = v.string.decoded();
        if matches!(v.path, [.., key] if is_field(key, &["previousinteractionid"])) {
            push_interaction_id(&String::from_utf8_lossy(&text), &mut out);
            return !out.full();
        }
        // An OpenAI-style image part's `image_url.url` may hold a file's name too.
        let reference = match v.path {
            [.., parent, key] if is_field(parent, &["imageurl"]) && is_field(key, &["url"]) => true,
            // The Interactions API's media parts: `"input": [{"type": "image", "uri": ...}]`.
            // Only there: elsewhere a `uri` may be anything (a batch request's own metadata).
            [first, .., key] if is_field(key, &["uri"]) => is_field(first, &["input"]),
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

/// The interaction an answer to `POST .../interactions` creates: a JSON answer's top-level
/// `id`, or in a stream (server-sent events, `stream`) the `interaction.id` of its lifecycle
/// events (`{"event_type": "interaction.created", "interaction": {"id": ...}}`). Only there:
/// steps and outputs carry ids of their own (a function call's), and the request's own words
/// may come back under `input`. An id cut off by the end of `answer` is no id.
pub fn created_interaction(answer: &[u8], stream: bool) -> Option<String> {
    let want: &[&[u8]] = if stream {
        &[b"interaction", b"id"]
    } else {
        &[b"id"]
    };
    let mut found = None;
    json_strings::walk(answer, |v| {
        let at = v.path.len() == want.len() && want.iter().zip(v.path).all(|(w, k)| k == w);
        let closed = v.string.span.len() >= v.string.raw.len() + 2;
        if at && closed {
            let id = String::from_utf8_lossy(&v.string.decoded()).into_owned();
            if valid_id(&id) {
                found = Some(format!("interactions/{id}"));
            }
        }
        found.is_none()
    });
    found
}

/// Reads a growing answer for the interaction it creates ([`created_interaction`]) and says
/// its name once. A stream is read event by event as each completes: its first event names
/// the interaction, and a client may name it (to resume the stream, or follow up in the
/// background) long before the stream ends. A JSON answer is read once it is whole.
#[derive(Debug)]
pub struct InteractionWatch {
    stream: bool,
    /// Bytes of the answer already read (whole events).
    read: usize,
    done: bool,
}

impl InteractionWatch {
    /// A watch over an answer that is a stream of server-sent events (`stream`) or one JSON
    /// text.
    pub fn new(stream: bool) -> InteractionWatch {
        InteractionWatch {
            stream,
            read: 0,
            done: false,
        }
    }

    /// The interaction's name, the first time `prefix` shows it. `prefix` is the answer's
    /// first bytes as far as they are kept, growing from call to call; `complete`: the answer
    /// has ended (what is left is read, then the watch is over). Each byte is read once.
    pub fn read(&mut self, prefix: &[u8], complete: bool) -> Option<String> {
        if self.done || self.read > prefix.len() {
            return None;
        }
        let rest = &prefix[self.read..];
        let end = if complete {
            rest.len()
        } else if self.stream {
            // Up to the blank line that ends the last whole event.
            let lf = memchr::memmem::rfind(rest, b"\n\n").map(|i| i + 2);
            let crlf = memchr::memmem::rfind(rest, b"\n\r\n").map(|i| i + 3);
            lf.max(crlf)?
        } else {
            return None;
        };
        let found = created_interaction(&rest[..end], self.stream);
        self.read += end;
        self.done = complete || found.is_some();
        found
    }
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
mod tests;
