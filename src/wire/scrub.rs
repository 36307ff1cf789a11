//! No pool key leaves keygate in an answer, whatever Google wrote.
//!
//! Google's refusal of a suspended key names the key three times, and any other error body
//! could quote one. keygate never relays a key-level refusal (it writes its own answer), and
//! every other error answer it relays goes through a [`Scrubber`] first: each pool key in the
//! body or a header, written plainly, inside a JSON string with escapes (`\u0041Iza...`) or
//! %-encoded, is replaced by the key's fingerprint. Error bodies are small (keygate reads at most
//! 64 KiB of them, and withholds larger ones), so this costs nothing on the success path, whose
//! bodies stream through untouched: Google puts the caller's key only in refusals.

use crate::wire::json_strings;
use aho_corasick::AhoCorasick;
use std::borrow::Cow;

/// Finds a pool's keys in text and replaces them with their fingerprints.
#[derive(Debug)]
pub struct Scrubber {
    keys: Option<AhoCorasick>,
    fingerprints: Vec<String>,
    /// The shortest key's length, %-encoded or not: shorter text cannot hold one.
    shortest: usize,
}

impl Scrubber {
    /// A scrubber for `keys`: (key, fingerprint) pairs.
    pub fn new<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> Scrubber {
        let (secrets, fingerprints): (Vec<&str>, Vec<String>) = keys
            .into_iter()
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, fp)| (k, fp.to_string()))
            .unzip();
        // Longest first among keys that overlap, so a key is never replaced only in part.
        // A contiguous NFA: compact (about 1 MiB for 10,000 keys of Google's 39 characters)
        // and built without trying a DFA first, which would take far more memory on the way.
        let keys = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .kind(Some(aho_corasick::AhoCorasickKind::ContiguousNFA))
            .build(&secrets)
            .ok()
            .filter(|_| !secrets.is_empty());
        let shortest = secrets.iter().map(|k| k.len()).min().unwrap_or(0);
        Scrubber {
            keys,
            fingerprints,
            shortest,
        }
    }

    /// Whether `text` holds a key as written.
    pub fn contains_key(&self, text: &[u8]) -> bool {
        self.keys.as_ref().is_some_and(|ac| ac.is_match(text))
    }

    /// `text` with every key written plainly replaced by its fingerprint.
    fn plain<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        match &self.keys {
            Some(ac) if ac.is_match(text) => {
                Cow::Owned(ac.replace_all_bytes(text, &self.fingerprints))
            }
            _ => Cow::Borrowed(text),
        }
    }

    /// A body with every key replaced: plainly written, inside JSON strings whatever their
    /// escapes, and %-encoded within a JSON string. Borrowed when there was none.
    pub fn body<'t>(&self, text: &'t [u8]) -> Cow<'t, [u8]> {
        if self.keys.is_none() {
            return Cow::Borrowed(text);
        }
        // Strings whose decoded value holds a key are written back decoded and scrubbed.
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        for s in json_strings::strings(text) {
            if !s.raw.contains(&b'\\') && !s.raw.contains(&b'%') {
                continue; // a plain key in it is caught below
            }
            let decoded = s.decoded();
            let percent: Vec<u8> = percent_encoding::percent_decode(&decoded).collect();
            let clean = if self.contains_key(&decoded) {
                self.plain(&decoded).into_owned()
            } else if self.contains_key(&percent) {
                self.plain(&percent).into_owned()
            } else {
                continue;
            };
            let buf = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            buf.extend_from_slice(&text[copied..s.span.start]);
            buf.extend_from_slice(&json_strings::quote(&clean));
            copied = s.span.end;
        }
        let text: Cow<'t, [u8]> = match out {
            Some(mut buf) => {
                buf.extend_from_slice(&text[copied..]);
                Cow::Owned(buf)
            }
            None => Cow::Borrowed(text),
        };
        match self.plain(&text) {
            Cow::Borrowed(_) => text,
            Cow::Owned(clean) => Cow::Owned(clean),
        }
    }

    /// A header value with every key replaced, or `None` when it holds none.
    pub fn header(&self, value: &[u8]) -> Option<Vec<u8>> {
        if value.len() < self.shortest {
            return None;
        }
        if self.contains_key(value) {
            return Some(self.plain(value).into_owned());
        }
        if !value.contains(&b'%') {
            return None;
        }
        let decoded: Vec<u8> = percent_encoding::percent_decode(value).collect();
        self.contains_key(&decoded)
            .then(|| self.plain(&decoded).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber() -> Scrubber {
        Scrubber::new([
            ("made-up-key-alpha", "key#aaaa"),
            ("made-up-key-alphabet", "key#bbbb"),
        ])
    }

    fn body(text: &str) -> String {
        String::from_utf8(scrubber().body(text.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn every_spelling_is_replaced() {
        assert_eq!(body("api_key:made-up-key-alpha."), "api_key:key#aaaa.");
        assert_eq!(body("made-up-key-alphabet"), "key#bbbb");
        assert_eq!(
            body(r#"{"message":"Consumer 'api_key:made-up-key-\u0061lpha' suspended"}"#),
            r#"{"message":"Consumer 'api_key:key#aaaa' suspended"}"#
        );
        assert_eq!(
            body(r#"{"u":"https://x/?k=made-up-key%2Dalpha"}"#),
            r#"{"u":"https://x/?k=key#aaaa"}"#
        );
        assert_eq!(
            body(r#"{"a":"made\u002dup-key-alpha","b":"made-up-key-alpha"}"#),
            r#"{"a":"key#aaaa","b":"key#aaaa"}"#
        );
    }

    #[test]
    fn clean_text_is_borrowed() {
        let s = scrubber();
        assert!(matches!(
            s.body(br#"{"error":{"message":"fine \u0041"}}"#),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            Scrubber::new([]).body(b"made-up-key-alpha"),
            Cow::Borrowed(_)
        ));
        assert_eq!(s.header(b"text/plain"), None);
        assert_eq!(
            s.header(b"k=made-up-key-alpha").as_deref(),
            Some(&b"k=key#aaaa"[..])
        );
        assert_eq!(
            s.header(b"made%2Dup-key-alpha").as_deref(),
            Some(&b"key#aaaa"[..])
        );
    }
}
