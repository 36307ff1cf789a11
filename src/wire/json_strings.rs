//! The string literals of a JSON text, found the way a JSON parser would read them: escapes
//! (`\u0066`, `\/`, `\n`...) decoded, keys told apart from values. It never fails: a truncated
//! or malformed text (an error body cut at 64 KiB, a lenient client's single-quoted strings)
//! still yields every string it holds, so what keygate looks for in a body (resource names, pool
//! keys, quota facts) cannot hide behind a spelling that a stricter reader would reject.
//!
//! One pass, O(n), with `memchr` jumping between quotes: a 20 MB body of base64 is one string
//! scanned at memory speed, and nothing is copied unless a string holds an escape.

use memchr::{memchr, memchr2};
use std::borrow::Cow;
use std::ops::Range;

/// One string literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonString<'a> {
    /// Byte range of the literal in the text, quotes included (to the end of the text when it
    /// is cut short).
    pub span: Range<usize>,
    /// The bytes between the quotes, escapes as written.
    pub raw: &'a [u8],
    /// Whether an object key follows (the next thing after the literal is `:`).
    pub is_key: bool,
}

impl<'a> JsonString<'a> {
    /// The string as a JSON parser reads it: escapes decoded (an invalid escape is kept as the
    /// character after the backslash; a lone surrogate becomes U+FFFD). Borrowed when the literal
    /// holds no escape.
    pub fn decoded(&self) -> Cow<'a, [u8]> {
        if !self.raw.contains(&b'\\') {
            return Cow::Borrowed(self.raw);
        }
        Cow::Owned(unescape(self.raw))
    }
}

/// Every string literal in `text`, in order. Literals are delimited by `"` or, as lenient
/// parsers accept, `'`.
pub fn strings(text: &[u8]) -> Strings<'_> {
    Strings { text, at: 0 }
}

/// The iterator of [`strings`].
#[derive(Debug, Clone)]
pub struct Strings<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Strings<'a> {
    type Item = JsonString<'a>;

    fn next(&mut self) -> Option<JsonString<'a>> {
        let text = self.text;
        let open = self.at + memchr2(b'"', b'\'', text.get(self.at..)?)?;
        let quote = text[open];
        let mut i = open + 1;
        let close = loop {
            match memchr2(quote, b'\\', text.get(i..).unwrap_or_default()) {
                None => break None,
                Some(j) if text[i + j] == b'\\' => i += j + 2,
                Some(j) => break Some(i + j),
            }
        };
        let (end, raw_end) = match close {
            Some(c) => (c + 1, c),
            None => (text.len(), text.len()),
        };
        self.at = end;
        let after = text.get(end..).unwrap_or_default();
        let is_key = after
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b':');
        Some(JsonString {
            span: open..end,
            raw: text
                .get(open + 1..raw_end.max(open + 1))
                .unwrap_or_default(),
            is_key,
        })
    }
}

/// A string value of a JSON text with where it sits: the keys of the objects (and arrays) that
/// hold it, outermost first. A value in an array sits under the array's key.
#[derive(Debug, Clone)]
pub struct Value<'a, 'p> {
    /// The string literal.
    pub string: JsonString<'a>,
    /// The keys above it, decoded; empty at the top level.
    pub path: &'p [Vec<u8>],
    /// Whether a key of `path` is one the walk was asked to mark (see [`walk_marking`]).
    pub marked: bool,
}

/// Calls `visit` with every string value (not key) of `text`, with its path, as a JSON parser
/// would see the structure. Tolerant like [`strings`]: brackets outside strings open and close
/// levels; anything else between strings is skipped. `visit` returns false to stop.
pub fn walk(text: &[u8], visit: impl FnMut(Value<'_, '_>) -> bool) {
    walk_marking(text, |_| false, visit)
}

/// [`walk`], telling each value whether it sits under a key `mark` accepts (a function's
/// arguments, a batch's input...). Each key is judged once, when its level opens, so the walk
/// stays O(n) however deep the text nests.
pub fn walk_marking(
    text: &[u8],
    mark: impl Fn(&[u8]) -> bool,
    mut visit: impl FnMut(Value<'_, '_>) -> bool,
) {
    // The keys of the open containers (a container that is a bare array element or the top
    // level has none), whether each is marked, and the key waiting for its value.
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut path_marked: Vec<bool> = Vec::new();
    let mut marked_keys = 0usize;
    let mut opened_under: Vec<bool> = Vec::new();
    let mut pending: Option<Vec<u8>> = None;
    let mut at = 0;
    let push = |path: &mut Vec<Vec<u8>>, marks: &mut Vec<bool>, key: Vec<u8>| {
        let m = mark(&key);
        path.push(key);
        marks.push(m);
        m
    };
    for string in strings(text) {
        for &b in text.get(at..string.span.start).unwrap_or_default() {
            match b {
                b'{' | b'[' => {
                    let key = pending.take();
                    opened_under.push(key.is_some());
                    if let Some(key) = key {
                        marked_keys += usize::from(push(&mut path, &mut path_marked, key));
                    }
                }
                b'}' | b']' => {
                    if opened_under.pop() == Some(true) {
                        path.pop();
                        marked_keys -= usize::from(path_marked.pop() == Some(true));
                    }
                    pending = None;
                }
                b',' => pending = None,
                _ => {}
            }
        }
        at = string.span.end;
        if string.is_key {
            pending = Some(string.decoded().into_owned());
            continue;
        }
        // A value directly under a key belongs to it; the key is spent.
        let key = pending.take();
        let own_mark = key.map(|key| push(&mut path, &mut path_marked, key));
        let go_on = visit(Value {
            string,
            path: &path,
            marked: marked_keys > 0 || own_mark == Some(true),
        });
        if own_mark.is_some() {
            path.pop();
            path_marked.pop();
        }
        if !go_on {
            return;
        }
    }
}

/// Decodes JSON escapes.
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        // Copy the run up to the next backslash.
        let run = memchr(b'\\', &raw[i..]).map_or(raw.len(), |j| i + j);
        out.extend_from_slice(&raw[i..run]);
        i = run;
        if i >= raw.len() {
            break;
        }
        let Some(&c) = raw.get(i + 1) else {
            break; // a trailing lone backslash (a cut text)
        };
        i += 2;
        let simple = match c {
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'u' => None,
            other => Some(other), // `\"`, `\\`, `\/`, and any invalid escape as its character
        };
        if let Some(b) = simple {
            out.push(b);
            continue;
        }
        let Some(high) = hex4(raw.get(i..i + 4)) else {
            out.push(b'u');
            continue;
        };
        i += 4;
        let code = if (0xd800..0xdc00).contains(&high) {
            let low = (raw.get(i..i + 2) == Some(b"\\u"))
                .then(|| hex4(raw.get(i + 2..i + 6)))
                .flatten()
                .filter(|low| (0xdc00..0xe000).contains(low));
            match low {
                Some(low) => {
                    i += 6;
                    0x10000 + ((high - 0xd800) << 10) + (low - 0xdc00)
                }
                None => 0xfffd,
            }
        } else {
            high
        };
        let ch = char::from_u32(code).unwrap_or('\u{fffd}');
        let mut buf = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
    }
    out
}

fn hex4(bytes: Option<&[u8]>) -> Option<u32> {
    let text = std::str::from_utf8(bytes?).ok()?;
    u32::from_str_radix(text, 16)
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `text` as a JSON string literal (quotes included), for writing a changed string back.
pub fn quote(text: &[u8]) -> Vec<u8> {
    let lossy = String::from_utf8_lossy(text);
    serde_json::to_vec(&*lossy).unwrap_or_else(|_| b"\"\"".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<(String, bool)> {
        strings(text.as_bytes())
            .map(|s| (String::from_utf8_lossy(&s.decoded()).into_owned(), s.is_key))
            .collect()
    }

    #[test]
    fn keys_values_and_escapes() {
        let text =
            r#"{"fileUri" : "files\u002fabc", "a\/b": ["x\"y", 'single', "\u0066iles/z"], "n": 1}"#;
        assert_eq!(
            all(text),
            vec![
                ("fileUri".into(), true),
                ("files/abc".into(), false),
                ("a/b".into(), true),
                ("x\"y".into(), false),
                ("single".into(), false),
                ("files/z".into(), false),
                ("n".into(), true),
            ]
        );
    }

    #[test]
    fn escapes_of_every_kind() {
        let text = r#""\b\f\n\r\t\\\/\"\q\u00e9\ud83d\ude00\ud800x\u12""#;
        let decoded = all(text)[0].0.clone();
        assert_eq!(decoded, "\u{8}\u{c}\n\r\t\\/\"q\u{e9}\u{1f600}\u{fffd}xu12");
    }

    #[test]
    fn a_cut_text_still_yields_its_strings() {
        let text = r#"{"error":{"message":"quota","details":[{"quotaId":"PerDay"#;
        let got = all(text);
        assert_eq!(got.last().unwrap().0, "PerDay");
        assert_eq!(all(r#""trailing\"#)[0].0, "trailing");
        assert!(all("no strings here").is_empty());
        assert!(all("").is_empty());
    }

    #[test]
    fn spans_cover_the_literal() {
        let text = br#"{"k": "v\u0041"}"#;
        let found: Vec<JsonString> = strings(text).collect();
        assert_eq!(&text[found[1].span.clone()], br#""v\u0041""#);
        assert_eq!(quote(b"v\"A"), br#""v\"A""#.to_vec());
    }

    #[test]
    fn values_know_their_path() {
        let text =
            br#"{"a":"1","b":{"c":["2",{"d":"3"}],"e":"4"},"f":["5"],"g":{"h":"6"},'i':"7"}"#;
        let mut seen = Vec::new();
        walk(text, |v| {
            let path: Vec<String> = v
                .path
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            seen.push((
                path.join("."),
                String::from_utf8_lossy(&v.string.decoded()).into_owned(),
            ));
            true
        });
        let want = [
            ("a", "1"),
            ("b.c", "2"),
            ("b.c.d", "3"),
            ("b.e", "4"),
            ("f", "5"),
            ("g.h", "6"),
            ("i", "7"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(p, v)| (p.to_string(), v.to_string()))
            .collect();
        assert_eq!(seen, want);
        // A cut or broken text still walks; `false` stops it.
        let mut n = 0;
        walk(br#"}}]]{"x":["a","b","#, |_| {
            n += 1;
            n < 2
        });
        assert_eq!(n, 2);
    }

    #[test]
    fn marks_follow_the_levels() {
        let text = br#"{"args":{"x":["1",{"y":"2"}]},"z":"3","args":"4","w":{"v":"5"}}"#;
        let mut seen = Vec::new();
        walk_marking(
            text,
            |k| k == b"args",
            |v| {
                seen.push((
                    String::from_utf8_lossy(&v.string.decoded()).into_owned(),
                    v.marked,
                ));
                true
            },
        );
        let want = [
            ("1", true),
            ("2", true),
            ("3", false),
            ("4", true),
            ("5", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(s, m)| (s.to_string(), *m)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn deep_nesting_costs_linear_time() {
        // 20,000 levels over 20,000 values: quadratic work would be 400 million key checks.
        let depth = 20_000;
        let mut text = b"{\"a\":".repeat(depth);
        text.push(b'{');
        text.extend(b"\"a\":\"x\",".repeat(depth));
        text.extend_from_slice(b"\"b\":\"y\"}");
        text.extend(std::iter::repeat_n(b'}', depth));
        let checks = std::cell::Cell::new(0usize);
        let mut values = 0;
        walk_marking(
            &text,
            |_| {
                checks.set(checks.get() + 1);
                false
            },
            |_| {
                values += 1;
                true
            },
        );
        assert_eq!(values, depth + 1);
        assert!(checks.get() <= 2 * depth + 1, "{} key checks", checks.get());
    }

    #[test]
    fn large_strings_are_scanned_without_copies() {
        let mut body = br#"{"data":""#.to_vec();
        body.extend(std::iter::repeat_n(b'A', 5 << 20));
        body.extend_from_slice(br#"","uri":"files\/x"}"#);
        let found: Vec<JsonString> = strings(&body).collect();
        assert_eq!(found.len(), 4);
        assert!(matches!(found[1].decoded(), Cow::Borrowed(_)));
        assert_eq!(&*found[3].decoded(), b"files/x");
    }
}
