//! An entry as a store shared between instances keeps it: a compact, versioned binary form.
//!
//! Written by hand, not with a codec crate: it is five length-prefixed fields (none in the
//! dependency tree writes binary), and every byte read back is checked, since the store is
//! not trusted. Layout, integers big-endian:
//!
//! `KGC1` · the entry key's digest (32 bytes) · stored_at (u64, ms) · tokens (u64) · the number
//! of header fields (u16), then each as name length (u16), name, value length (u16), value ·
//! the body's length (u64) and the body, ending the value.
//!
//! A value that is not exactly that (another version, another program's, truncated, another
//! request's digest, a header field keygate would not have kept) decodes as `None`: a miss.
//! The value holds what a hit replays and nothing else: Google's answer and the header fields
//! kept of it (credentials are scrubbed from those before recording), never a pool key or a
//! token, and the tenant only as the entry's name says (a hash).

use super::{Entry, EntryKey, NOT_KEPT};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};

/// The tag that starts every value, with the format's version.
const MAGIC: &[u8; 4] = b"KGC1";

/// Most header fields read back (an answer of Google's has about a dozen).
const MAX_FIELDS: usize = 256;

/// The bytes of a value storing `entry` under `key`.
pub fn encode(key: &EntryKey, entry: &Entry) -> Vec<u8> {
    let fields: usize = entry
        .headers
        .iter()
        .map(|(n, v)| 4 + n.as_str().len() + v.len())
        .sum();
    let mut out = Vec::with_capacity(4 + 32 + 8 + 8 + 2 + fields + 8 + entry.body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.digest);
    out.extend_from_slice(&entry.stored_at.to_be_bytes());
    out.extend_from_slice(&entry.tokens.to_be_bytes());
    // Fields that do not fit the format are left out (none of Google's come close).
    let kept: Vec<_> = entry
        .headers
        .iter()
        .filter(|(n, v)| {
            n.as_str().len() <= usize::from(u16::MAX) && v.len() <= usize::from(u16::MAX)
        })
        .take(MAX_FIELDS)
        .collect();
    out.extend_from_slice(&(kept.len() as u16).to_be_bytes());
    for (name, value) in kept {
        out.extend_from_slice(&(name.as_str().len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&(entry.body.len() as u64).to_be_bytes());
    out.extend_from_slice(&entry.body);
    out
}

/// The entry a value read back under `key` holds, when it is one keygate wrote for that key.
pub fn decode(key: &EntryKey, value: &[u8]) -> Option<Entry> {
    let mut r = Reader(value);
    if r.take(4)? != MAGIC || r.take(32)? != key.digest {
        return None;
    }
    let stored_at = r.u64()?;
    let tokens = r.u64()?;
    let count = usize::from(r.u16()?);
    if count > MAX_FIELDS {
        return None;
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let len = usize::from(r.u16()?);
        let name = HeaderName::from_bytes(r.take(len)?).ok()?;
        let len = usize::from(r.u16()?);
        let value = HeaderValue::from_bytes(r.take(len)?).ok()?;
        if NOT_KEPT.contains(&name.as_str()) {
            return None;
        }
        headers.push((name, value));
    }
    let len = usize::try_from(r.u64()?).ok()?;
    let body = r.take(len)?;
    if !r.0.is_empty() {
        return None;
    }
    Some(Entry::new(
        headers,
        Bytes::copy_from_slice(body),
        stored_at,
        tokens,
    ))
}

/// Reads a value front to back; every read is checked against what is left.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn key(byte: u8) -> EntryKey {
        EntryKey {
            tenant: Some(Arc::from("alice")),
            digest: [byte; 32],
        }
    }

    fn entry() -> Entry {
        Entry::new(
            vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json; charset=UTF-8"),
                ),
                (
                    HeaderName::from_static("x-goog-thing"),
                    HeaderValue::from_bytes(b"\xe9t\xe9").unwrap(),
                ),
            ],
            Bytes::from_static(b"data: {\"a\":1}\r\n\r\n\x00\xff"),
            1_764_000_000_123,
            42,
        )
    }

    #[test]
    fn an_entry_reads_back_as_written() {
        let e = entry();
        let value = encode(&key(7), &e);
        let back = decode(&key(7), &value).unwrap();
        assert_eq!(back.headers, e.headers);
        assert_eq!(back.body, e.body);
        assert_eq!((back.stored_at, back.tokens), (e.stored_at, e.tokens));
        assert_eq!(back.weight(), e.weight());
    }

    #[test]
    fn foreign_truncated_or_misplaced_values_are_misses() {
        let value = encode(&key(7), &entry());
        assert!(decode(&key(8), &value).is_none(), "another request's entry");
        for cut in 0..value.len() {
            assert!(decode(&key(7), &value[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = value.clone();
        longer.push(0);
        assert!(decode(&key(7), &longer).is_none(), "trailing bytes");
        let mut v2 = value.clone();
        v2[3] = b'2';
        assert!(decode(&key(7), &v2).is_none(), "another version");
        assert!(decode(&key(7), b"garbage").is_none());
        assert!(decode(&key(7), b"").is_none());
        // A header field keygate never keeps (set-cookie) is not replayed from the store.
        let mut e = entry();
        e.headers.push((
            HeaderName::from_static("set-cookie"),
            HeaderValue::from_static("a=b"),
        ));
        assert!(decode(&key(7), &encode(&key(7), &e)).is_none());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut value = b"KGC1".to_vec();
            value.extend_from_slice(&[7; 32]);
            value.extend_from_slice(&bytes);
            let _ = decode(&key(7), &value);
            let _ = decode(&key(7), &bytes);
        }
    }
}
