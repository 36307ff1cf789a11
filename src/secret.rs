//! Secrets (API keys, tenant tokens) and the short fingerprints that stand for them in logs.
//!
//! A [`Secret`] never prints its value: `Debug` and `Display` both show its fingerprint, so a
//! secret that slips into a log line or an error message is still safe.

use sha2::{Digest, Sha256};
use std::fmt;

/// A credential whose value must never appear in a log, a metric, an error or an HTTP answer.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself, for the one place that needs it: the upstream request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A short, stable, non-reversible name for this secret, e.g. `key#1a2b3c4d5e6f`.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.0.as_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.fingerprint())
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fingerprint())
    }
}

/// SHA-256 of a value; how tenant tokens are stored and compared.
pub fn sha256(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// `key#` followed by the first 12 hex digits (48 bits) of the value's SHA-256: enough to tell
/// keys apart (two of 10,000 keys share one with odds of about 1 in 5 million)
/// in a log, far too little to recover or guess the key.
pub fn fingerprint(value: &[u8]) -> String {
    let digest = sha256(value);
    format!("key#{}", hex::encode(&digest[..6]))
}

/// Parses 64 hex digits into a SHA-256 digest.
pub fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("made-up-secret-value");
        assert!(!format!("{s:?}").contains("made-up"));
        assert!(!format!("{s}").contains("made-up"));
        assert!(format!("{s}").starts_with("key#"));
        assert_eq!(format!("{s}").len(), 16);
    }

    #[test]
    fn fingerprints_differ_between_keys_and_are_stable() {
        assert_eq!(fingerprint(b"a"), fingerprint(b"a"));
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
    }

    #[test]
    fn parses_sha256_hex() {
        let digest = sha256(b"test");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_sha256_hex(&hex), Some(digest));
        assert_eq!(parse_sha256_hex(&hex.to_uppercase()), Some(digest));
        assert_eq!(parse_sha256_hex(&format!(" {hex}\n")), Some(digest));
        assert_eq!(parse_sha256_hex("abc"), None);
        assert_eq!(parse_sha256_hex(&"zz".repeat(32)), None);
        // `u8::from_str_radix` took a sign ("+a"); a digest has none.
        assert_eq!(parse_sha256_hex(&format!("+a{}", &hex[2..])), None);
        assert_eq!(parse_sha256_hex(&format!("{hex}00")), None);
    }
}
