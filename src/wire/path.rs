//! The request target as keygate and Google both read it.
//!
//! A path that two readers decode differently is how a client makes keygate route one thing
//! while Google serves another (a dot segment that Google resolves, an escape keygate did not
//! decode). So keygate decodes the path once, refuses what only one reader would resolve (dot
//! segments, encoded slashes), and forwards exactly the form it decided on. The query loses every
//! spelling Google would read as the `key` parameter: the client's credential is never forwarded
//! or logged.

use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::borrow::Cow;

/// Why a request path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path (`*`, `host:port`, empty).
    #[error("the request target is not an absolute path")]
    NotAbsolute,
    /// A `.` or `..` segment, plain or %-encoded.
    #[error("dot segments (`.`, `..`, also %-encoded) are not allowed in paths")]
    DotSegment,
    /// `%2F` or `%5C`, or a backslash: a separator that readers disagree on.
    #[error("encoded slashes (%2F, %5C) and backslashes are not allowed in paths")]
    EncodedSeparator,
    /// `%` not followed by two hex digits.
    #[error("a `%` in the path is not followed by two hex digits")]
    BadEscape,
    /// Control characters or bytes that are not UTF-8, once decoded.
    #[error("the path holds control characters or bytes that are not UTF-8")]
    NotText,
}

/// Bytes written as they are in a canonical path segment: RFC 3986 `pchar` minus `;` (which
/// some servers read as a parameter separator) and `%` (always an escape).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// Where `needle` first occurs in `text`, like `str::find`. A path is short: finding each
/// place its first byte occurs and comparing there costs less than `str::find`, which builds a
/// searcher on every call (BENCHMARKS.md).
pub fn find(text: &str, needle: &str) -> Option<usize> {
    let Some(&first) = needle.as_bytes().first() else {
        return Some(0);
    };
    // A match starts where `needle`'s first byte does, never inside a character.
    let text = text.as_bytes();
    (0..text.len()).find(|&i| text[i] == first && text[i..].starts_with(needle.as_bytes()))
}

/// The canonical form of a request path: %-escapes decoded, repeated slashes collapsed (clients
/// whose base URL ends in `/` send `//v1beta/...`), then re-encoded minimally. Dot segments and
/// encoded separators are refused.
pub fn canonical(raw: &str) -> Result<String, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(raw) {
        return Ok(raw.to_string());
    }
    let bytes = raw.as_bytes();
    if bytes.contains(&b'\\') {
        return Err(PathError::EncodedSeparator);
    }
    // Every escape must be well formed, and none may hide a separator.
    let mut i = 0;
    while let Some(j) = memchr::memchr(b'%', &bytes[i..]) {
        let at = i + j;
        let hex = bytes.get(at + 1..at + 3).ok_or(PathError::BadEscape)?;
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Err(PathError::BadEscape);
        }
        if matches!(hex, [b'2', b'f' | b'F'] | [b'5', b'c' | b'C']) {
            return Err(PathError::EncodedSeparator);
        }
        i = at + 3;
    }
    let trailing = raw.len() > 1 && raw.ends_with('/');
    let mut out = String::with_capacity(raw.len());
    for segment in raw.split('/').filter(|s| !s.is_empty()) {
        let decoded: Cow<[u8]> = percent_decode(segment.as_bytes()).into();
        let text = std::str::from_utf8(&decoded).map_err(|_| PathError::NotText)?;
        if text.chars().any(char::is_control) {
            return Err(PathError::NotText);
        }
        if text == "." || text == ".." {
            return Err(PathError::DotSegment);
        }
        out.push('/');
        out.extend(percent_encode(text.as_bytes(), SEGMENT));
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

/// Whether `raw` (absolute) is already canonical: nothing to decode, collapse or refuse. Most
/// paths are, and this single pass is all they cost.
fn is_canonical(raw: &str) -> bool {
    // The bytes a canonical path holds as they are: unreserved, sub-delims, `:`, `@` and `/`.
    const KEPT: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'/' | b'-'
                        | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b'='
                        | b':'
                        | b'@'
                );
            b += 1;
        }
        table
    };
    let bytes = raw.as_bytes();
    // Where the segment being read starts (after its `/`).
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !KEPT[usize::from(b)] {
            return false;
        }
        if b == b'/' {
            // `//` (an empty segment), `/./` or `/../`.
            if i > 0 && matches!(&bytes[start..i], b"" | b"." | b"..") {
                return false;
            }
            start = i + 1;
        }
    }
    !matches!(&bytes[start..], b"." | b"..")
}

/// The segments of a path, URI or bare resource name as a lenient reader takes them: a
/// `scheme://authority` prefix, the query and the fragment dropped; %-escapes decoded (bad ones
/// kept as they are); `/` and `\` both separators; empty and `.` segments dropped and `..`
/// resolved. For values in request bodies (`fileUri`), where keygate must find a name however
/// it is written.
pub fn lenient_segments(value: &str) -> Vec<String> {
    segments_of(value, true)
}

/// [`lenient_segments`] with `..` kept as a segment: what the value names before its dot
/// segments are resolved (`files/a/../b` holds `files/a` too, for a reader that resolves
/// nothing).
pub fn unresolved_segments(value: &str) -> Vec<String> {
    segments_of(value, false)
}

fn segments_of(value: &str, resolve: bool) -> Vec<String> {
    let value = value.trim();
    let rest = match value.find("://") {
        Some(i)
            if value[..i]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+') =>
        {
            let after = &value[i + 3..];
            &after[after.find(['/', '\\']).unwrap_or(after.len())..]
        }
        _ => value,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let decoded = percent_decode(rest.as_bytes()).decode_utf8_lossy();
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment.trim() {
            "" | "." => {}
            ".." if resolve => {
                segments.pop();
            }
            s => segments.push(s.to_string()),
        }
    }
    segments
}

/// A request's query, split into what is forwarded and the credential it carried.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Query {
    /// The query without any `key` parameter; `None` when nothing is left.
    pub forwarded: Option<String>,
    /// The value of the first `key` parameter, decoded.
    pub key: Option<Vec<u8>>,
}

/// Splits `query` into the parameters forwarded and the `key` credential. A parameter is the
/// key parameter under every spelling Google reads as one: `key` or the system parameter
/// `$key`, in any letter case (`KEY=`), its name %-encoded (`%6Bey=`, `%24key=`), separated by
/// `&` or `;`, with a stray space around the name. Other credentials (`access_token`,
/// `oauth_token`) and the system parameters that would make Google read the request differently
/// from keygate (`$httpMethod`, `$ct`: method and content-type overrides) are dropped too. The
/// rest keep their spelling and their separators.
pub fn split_query(query: Option<&str>) -> Query {
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Query::default();
    };
    let mut forwarded = String::with_capacity(query.len());
    let mut key = None;
    let mut start = 0;
    let bytes = query.as_bytes();
    while start <= bytes.len() {
        let end = bytes[start..]
            .iter()
            .position(|b| *b == b'&' || *b == b';')
            .map_or(bytes.len(), |i| start + i);
        let param = &query[start..end];
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        let dropped = is_dropped_name(name);
        if is_key_name(name) {
            if key.is_none() {
                key = Some(form_decode(value));
            }
        } else if !param.is_empty() && !dropped {
            if !forwarded.is_empty() {
                // The separator that came before this parameter in the client's query.
                forwarded.push(char::from(bytes[start - 1]));
            }
            forwarded.push_str(param);
        }
        start = end + 1;
    }
    Query {
        forwarded: (!forwarded.is_empty()).then_some(forwarded),
        key,
    }
}

/// Whether a query parameter name is read as `key` (or the system parameter `$key`).
fn is_key_name(name: &str) -> bool {
    let decoded = form_decode(name);
    let trimmed = decoded.trim_ascii();
    let trimmed = trimmed.strip_prefix(b"$").unwrap_or(trimmed);
    trimmed.eq_ignore_ascii_case(b"key")
}

/// Whether a query parameter is never forwarded: another credential, or a system parameter that
/// overrides the method or the content type.
fn is_dropped_name(name: &str) -> bool {
    let decoded = form_decode(name);
    let name = decoded.trim_ascii();
    ["access_token", "oauth_token", "$httpmethod", "$ct"]
        .iter()
        .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
}

/// A query component decoded as a form value: `+` is a space, then %-escapes.
fn form_decode(text: &str) -> Vec<u8> {
    let spaced: Cow<str> = if text.contains('+') {
        Cow::Owned(text.replace('+', " "))
    } else {
        Cow::Borrowed(text)
    };
    percent_decode(spaced.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_agrees_with_str_find() {
        let texts = [
            "",
            "/",
            "/v1beta/models/m:generateContent",
            "/a/openai//openai/x",
            "é/:é",
            "::",
        ];
        let needles = [
            "",
            "/",
            "/openai/",
            ":",
            "/models/",
            "é",
            "x",
            "/v1beta/models/m:generateContentX",
        ];
        for text in texts {
            for needle in needles {
                assert_eq!(find(text, needle), text.find(needle), "{text:?} {needle:?}");
            }
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_long_one() {
        for raw in [
            "/v1beta/models/gemini-2.5-flash:generateContent",
            "/v1beta/files/abc",
            "/",
            "/v1beta/models/",
            "/v1beta/a..b/...",
            "/v1beta/x/a%20b",
            "//v1beta/x",
            "/v1beta/./x",
        ] {
            if is_canonical(raw) {
                let long = raw
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_encode(s.as_bytes(), SEGMENT).to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                let long = format!(
                    "/{long}{}",
                    if raw.len() > 1 && raw.ends_with('/') {
                        "/"
                    } else {
                        ""
                    }
                );
                assert_eq!(raw, long, "{raw}");
            }
        }
        assert!(is_canonical(
            "/v1beta/models/gemini-2.5-flash:generateContent"
        ));
        assert!(!is_canonical("/v1beta/x/a%20b"));
        assert!(!is_canonical("//v1beta/x"));
        assert!(!is_canonical("/v1beta/./x"));
    }

    #[test]
    fn canonical_paths() {
        for (raw, want) in [
            (
                "/v1beta/models/gemini-2.5-flash:generateContent",
                "/v1beta/models/gemini-2.5-flash:generateContent",
            ),
            (
                "//v1beta//models/x:generateContent",
                "/v1beta/models/x:generateContent",
            ),
            ("/v1beta/files/%61bc", "/v1beta/files/abc"),
            ("/v1beta/files/a%20b", "/v1beta/files/a%20b"),
            ("/v1beta/models/x;key=1", "/v1beta/models/x%3Bkey=1"),
            ("/v1beta/models/", "/v1beta/models/"),
            ("/", "/"),
            ("//", "/"),
            ("/v1beta/models/caf%C3%A9", "/v1beta/models/caf%C3%A9"),
            ("/v1beta/a..b/...", "/v1beta/a..b/..."),
        ] {
            assert_eq!(canonical(raw).as_deref(), Ok(want), "{raw}");
        }
        for (raw, why) in [
            ("/v1beta/models/a/../b", PathError::DotSegment),
            ("/v1beta/./models", PathError::DotSegment),
            ("/v1beta/%2e%2e/x", PathError::DotSegment),
            ("/v1beta/%2E./x", PathError::DotSegment),
            ("/v1/..", PathError::DotSegment),
            ("/v1beta/a%2fb", PathError::EncodedSeparator),
            ("/v1beta/a%5Cb", PathError::EncodedSeparator),
            ("/v1beta/a\\b", PathError::EncodedSeparator),
            ("/v1beta/a%zz", PathError::BadEscape),
            ("/v1beta/a%4", PathError::BadEscape),
            ("/v1beta/a%00", PathError::NotText),
            ("/v1beta/a%0A", PathError::NotText),
            ("/v1beta/a%ff", PathError::NotText),
            ("*", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(canonical(raw), Err(why), "{raw}");
        }
    }

    #[test]
    fn lenient_segments_resolve_what_google_resolves() {
        let s = |v| lenient_segments(v).join("/");
        assert_eq!(
            s("https://generativelanguage.googleapis.com/v1beta/files/abc"),
            "v1beta/files/abc"
        );
        assert_eq!(
            s("HTTP://h/v1beta/x/../files/abc?alt=media#f"),
            "v1beta/files/abc"
        );
        assert_eq!(s("files%2Fabc"), "files/abc");
        assert_eq!(s(" files/./abc "), "files/abc");
        assert_eq!(s("files\\abc"), "files/abc");
        assert_eq!(s("%zzfiles/a"), "%zzfiles/a");
        assert_eq!(s(""), "");
    }

    #[test]
    fn every_spelling_of_the_key_parameter_is_split_off() {
        for (query, forwarded, key) in [
            ("alt=sse&key=abc", Some("alt=sse"), Some("abc")),
            ("key=abc", None, Some("abc")),
            ("KEY=abc&alt=sse", Some("alt=sse"), Some("abc")),
            ("alt=sse;key=abc", Some("alt=sse"), Some("abc")),
            ("%6Bey=abc", None, Some("abc")),
            ("k%65Y=a%2Bb+c", None, Some("a+b c")),
            ("+key+=abc", None, Some("abc")),
            (
                "keyword=1&key=x&pageSize=2",
                Some("keyword=1&pageSize=2"),
                Some("x"),
            ),
            ("a=1;b=2&key", Some("a=1;b=2"), Some("")),
            ("key=first&key=second", None, Some("first")),
            (
                "upload_id=u1&upload_protocol=resumable",
                Some("upload_id=u1&upload_protocol=resumable"),
                None,
            ),
            ("&&alt=sse&", Some("alt=sse"), None),
            ("$key=abc&alt=sse", Some("alt=sse"), Some("abc")),
            ("%24key=abc", None, Some("abc")),
            (
                "alt=sse&$httpMethod=GET&%24ct=application%2Fx-protobuf",
                Some("alt=sse"),
                None,
            ),
            (
                "access_token=ya29&oauth_token=x&pageSize=1",
                Some("pageSize=1"),
                None,
            ),
        ] {
            let q = split_query(Some(query));
            assert_eq!(q.forwarded.as_deref(), forwarded, "{query}");
            assert_eq!(q.key.as_deref(), key.map(str::as_bytes), "{query}");
        }
        assert_eq!(split_query(None), Query::default());
        assert_eq!(split_query(Some("")), Query::default());
    }
}
