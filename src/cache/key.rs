//! The entry key: who asked (unless the pool shares entries), and a digest of everything in a
//! request that changes Google's answer: the pool, the method, path and query (the model and
//! `alt=sse` with them), the request headers that choose the answer's form, whether the answer
//! streams, and the body in canonical form, so that JSON key order does not matter.
//!
//! Never in the key: a pool key or a tenant token (the query is the one forwarded, `key=`
//! removed, and only the headers named in [`ANSWER_HEADERS`] are read).

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// Request headers that change the answer Google gives: its format (`accept`; Google also
/// speaks protobuf) and how the body is read (`content-type`). `accept-encoding` is not one:
/// entries are kept decoded, so any client can be served them.
pub const ANSWER_HEADERS: [&str; 3] = ["accept", "accept-language", "content-type"];

/// Where an entry lives in the cache: its tenant (`None` on a pool whose entries all tenants
/// share, or without tenants) and the digest of the request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EntryKey {
    /// The tenant whose entry this is, if entries are kept per tenant.
    pub tenant: Option<Arc<str>>,
    /// SHA-256 of the request's answer-changing parts (see the module comment).
    pub digest: [u8; 32],
}

impl fmt::Debug for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EntryKey({}, {})",
            self.tenant.as_deref().unwrap_or("-"),
            hex::encode(&self.digest[..6])
        )
    }
}

/// The parts of a request an entry key is made of.
pub struct KeyParts<'a> {
    /// The tenant, when entries are per tenant.
    pub tenant: Option<Arc<str>>,
    /// The pool's name.
    pub pool: &'a str,
    /// The HTTP method.
    pub method: &'a str,
    /// The canonical path (the model is in it, or in the body for OpenAI-style calls).
    pub path: &'a str,
    /// The query as forwarded (credentials removed).
    pub query: Option<&'a str>,
    /// The model the request was routed by.
    pub model: &'a str,
    /// The client's request headers (only [`ANSWER_HEADERS`] are read).
    pub headers: &'a http::HeaderMap,
    /// The request body.
    pub body: &'a [u8],
}

/// Why a request cannot have an entry key.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyError {
    /// The body is not one JSON value, or names an object key twice (Google and keygate could
    /// read two such bodies differently while their canonical forms agree).
    NotCanonical,
}

/// A request's entry key, and whether its answer is a stream.
#[derive(Debug)]
pub struct Keyed {
    /// The entry key.
    pub key: EntryKey,
    /// The answer is a stream (see [`is_stream`]).
    pub stream: bool,
}

/// The entry key of a request, or why it has none.
pub fn entry_key(parts: &KeyParts<'_>) -> Result<Keyed, KeyError> {
    let body = if parts.body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let canon: Canon =
            serde_json::from_slice(parts.body).map_err(|_| KeyError::NotCanonical)?;
        Some(canon.0)
    };
    let mut h = Sha256::new();
    field(&mut h, b"keygate-cache-1");
    field(&mut h, parts.pool.as_bytes());
    field(&mut h, parts.method.as_bytes());
    field(&mut h, parts.path.as_bytes());
    match parts.query {
        Some(q) => field(&mut h, q.as_bytes()),
        None => h.update([0]),
    }
    field(&mut h, parts.model.as_bytes());
    // A stream request never shares an entry with a plain one, whatever else they share.
    let stream = is_stream(parts.path, parts.query, body.as_ref());
    h.update([u8::from(stream)]);
    for name in ANSWER_HEADERS {
        let values = parts.headers.get_all(name);
        h.update((values.iter().count() as u64).to_le_bytes());
        for v in values {
            field(&mut h, v.as_bytes());
        }
    }
    match &body {
        Some(value) => hash_value(&mut h, value),
        None => h.update(b"-"),
    }
    let key = EntryKey {
        tenant: parts.tenant.clone(),
        digest: h.finalize().into(),
    };
    Ok(Keyed { key, stream })
}

/// Whether the answer to this request is a stream: `streamGenerateContent`, or `"stream":
/// true` on the OpenAI-style paths.
pub fn is_stream(path: &str, query: Option<&str>, body: Option<&Value>) -> bool {
    path.ends_with(":streamGenerateContent")
        || query.is_some_and(|q| q.split(['&', ';']).any(|p| p == "alt=sse"))
        || body.is_some_and(|b| b.get("stream") == Some(&Value::Bool(true)))
}

/// Writes a length-prefixed field, so that two fields never run into each other.
fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// Hashes a JSON value in canonical form: object keys sorted, every value tagged with its type
/// and every string, array and object with its length.
fn hash_value(h: &mut Sha256, value: &Value) {
    match value {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            field(h, n.to_string().as_bytes());
        }
        Value::String(s) => {
            h.update(b"\"");
            field(h, s.as_bytes());
        }
        Value::Array(items) => {
            h.update(b"[");
            h.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(h, item);
            }
        }
        Value::Object(map) => {
            h.update(b"{");
            h.update((map.len() as u64).to_le_bytes());
            // Sorted here whatever order the map keeps (serde_json's `preserve_order` feature,
            // turned on by any crate in the build, would keep the client's).
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                field(h, k.as_bytes());
                hash_value(h, v);
            }
        }
    }
}

/// A JSON value read with serde_json's parser (its nesting limit included), refusing an object
/// that names a key twice: `serde_json::Value` would silently keep the last one.
struct Canon(Value);

impl<'de> Deserialize<'de> for Canon {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Canon, D::Error> {
        d.deserialize_any(CanonVisitor)
    }
}

struct CanonVisitor;

impl<'de> Visitor<'de> for CanonVisitor {
    type Value = Canon;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Canon, E> {
        Ok(Canon(Value::Null))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Canon, E> {
        Ok(Canon(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Canon, E> {
        Ok(Canon(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Canon, E> {
        Ok(Canon(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Canon, E> {
        Ok(Canon(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Canon, E> {
        Ok(Canon(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<Canon, E> {
        Ok(Canon(Value::String(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Canon, A::Error> {
        let mut items = Vec::new();
        while let Some(Canon(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Canon(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Canon, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Canon(v) = map.next_value()?;
            if out.insert(k, v).is_some() {
                return Err(serde::de::Error::custom("a key named twice"));
            }
        }
        Ok(Canon(Value::Object(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(body: &str, query: Option<&str>, headers: &http::HeaderMap) -> EntryKey {
        entry_key(&KeyParts {
            tenant: Some(Arc::from("alice")),
            pool: "main",
            method: "POST",
            path: "/v1beta/models/gemini-2.5-flash:generateContent",
            query,
            model: "gemini-2.5-flash",
            headers,
            body: body.as_bytes(),
        })
        .unwrap()
        .key
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter_values_do() {
        let h = http::HeaderMap::new();
        let a = key_of(r#"{"a":1,"b":{"x":[1,2],"y":"s"}}"#, None, &h);
        let b = key_of(r#"{ "b": {"y": "s", "x": [1, 2]}, "a": 1 }"#, None, &h);
        assert_eq!(a, b);
        assert_ne!(a, key_of(r#"{"a":1,"b":{"x":[2,1],"y":"s"}}"#, None, &h));
        assert_ne!(a, key_of(r#"{"a":"1","b":{"x":[1,2],"y":"s"}}"#, None, &h));
        // A string that would read like two fields run together is still one field.
        assert_ne!(
            key_of(r#"{"ab":""}"#, None, &h),
            key_of(r#"{"a":"b"}"#, None, &h)
        );
    }

    #[test]
    fn query_headers_tenant_and_stream_are_part_of_the_key() {
        let h = http::HeaderMap::new();
        let plain = key_of("{}", None, &h);
        assert_ne!(plain, key_of("{}", Some("alt=sse"), &h));
        let mut json = http::HeaderMap::new();
        json.insert("content-type", "application/json".parse().unwrap());
        assert_ne!(plain, key_of("{}", None, &json));
        // Headers that do not change the answer are not read.
        let mut other = http::HeaderMap::new();
        other.insert("x-goog-api-client", "genai-py/1.0".parse().unwrap());
        other.insert("x-goog-api-key", "a-token".parse().unwrap());
        assert_eq!(plain, key_of("{}", None, &other));
        assert_ne!(
            key_of(r#"{"model":"m","stream":true}"#, None, &h),
            key_of(r#"{"model":"m","stream":false}"#, None, &h)
        );
        let mut bob = plain.clone();
        bob.tenant = Some(Arc::from("bob"));
        assert_ne!(plain, bob);
    }

    #[test]
    fn a_body_that_is_not_one_json_value_or_names_a_key_twice_has_no_key() {
        let h = http::HeaderMap::new();
        for body in [r#"{"a":1,"a":2}"#, "{", "{} {}", "'a'"] {
            let parts = KeyParts {
                tenant: None,
                pool: "main",
                method: "POST",
                path: "/v1beta/models/m:generateContent",
                query: None,
                model: "m",
                headers: &h,
                body: body.as_bytes(),
            };
            assert_eq!(
                entry_key(&parts).err(),
                Some(KeyError::NotCanonical),
                "{body}"
            );
        }
        assert!(is_stream(
            "/v1beta/models/m:streamGenerateContent",
            None,
            None
        ));
        assert!(is_stream(
            "/v1beta/openai/chat/completions",
            None,
            Some(&serde_json::json!({"stream": true}))
        ));
        assert!(!is_stream(
            "/v1beta/openai/chat/completions",
            None,
            Some(&serde_json::json!({"stream": "true"}))
        ));
    }
}
