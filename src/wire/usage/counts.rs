//! The top-level counts of a usage object, read straight from its JSON text: no tree of
//! values is built, since only a handful of integers are wanted from each answer.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Most fields one read asks for.
pub(super) const MAX_FIELDS: usize = 5;

/// The value of each of `names` in the JSON object `object`: a count when it is an integer
/// from 0 to `u64::MAX`, `None` when it is absent or anything else (as `Value::as_u64` reads
/// it). A field given twice counts its last value. `None` for text that is not one object.
///
/// One difference from building a `Value`: the fields not asked for are skipped without
/// checking their strings (a lone surrogate escape, bytes that are not UTF-8) or their depth,
/// so such an object still gives its counts where `Value` refused the whole object.
pub(super) fn read(object: &[u8], names: &[&str]) -> Option<[Option<u64>; MAX_FIELDS]> {
    let mut de = serde_json::Deserializer::from_slice(object);
    let counts = Fields(names).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(counts)
}

/// Reads an object, keeping the counts of the named fields.
struct Fields<'a>(&'a [&'a str]);

impl<'de> DeserializeSeed<'de> for Fields<'_> {
    type Value = [Option<u64>; MAX_FIELDS];

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Fields<'_> {
    type Value = [Option<u64>; MAX_FIELDS];

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a usage object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut counts = [None; MAX_FIELDS];
        while let Some(field) = map.next_key_seed(Name(self.0))? {
            match field.filter(|&i| i < MAX_FIELDS) {
                Some(i) => counts[i] = map.next_value::<Count>()?.0,
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(counts)
    }
}

/// A key: its position in the wanted names, if it is one of them.
struct Name<'a>(&'a [&'a str]);

impl<'de> DeserializeSeed<'de> for Name<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name<'_> {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|n| *n == key))
    }
}

/// A field's value: `Some` for an integer that fits a `u64`, `None` for any other value.
struct Count(Option<u64>);

impl<'de> de::Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CountVisitor)
    }
}

struct CountVisitor;

impl<'de> Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
        Ok(Count(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
        Ok(Count(u64::try_from(v).ok()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
        Ok(Count(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Count(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const NAMES: [&str; 3] = ["a", "b", "c"];

    /// What the tree-building reader (`serde_json::Value`) says for the same text.
    fn by_value(text: &str) -> Option<[Option<u64>; MAX_FIELDS]> {
        let value: Value = serde_json::from_str(text).ok()?;
        let object = value.as_object()?;
        let mut out = [None; MAX_FIELDS];
        for (i, name) in NAMES.iter().enumerate() {
            out[i] = object.get(*name).and_then(Value::as_u64);
        }
        Some(out)
    }

    #[test]
    fn reads_like_a_json_tree() {
        for text in [
            r#"{"a": 1, "b": 2, "c": 3}"#,
            r#"{"c": 3}"#,
            r#"{}"#,
            r#"{"a": -1, "b": 2.5, "c": "3"}"#,
            r#"{"a": 18446744073709551615, "b": 18446744073709551616}"#,
            r#"{"a": null, "b": true, "c": [1, {"a": 2}]}"#,
            r#"{"a": {"a": 7}, "b": 1e3, "d": 9}"#,
            r#"{"a": 1, "a": 2}"#,
            r#"{"\u0061": 5, "b\"": 6}"#,
            r#"{"promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}], "b": 4}"#,
            r#"[1, 2]"#,
            r#"{"a": 1"#,
            r#"{"a": 1} x"#,
            r#"7"#,
        ] {
            assert_eq!(read(text.as_bytes(), &NAMES), by_value(text), "{text}");
        }
    }

    #[test]
    fn fields_not_asked_for_are_skipped_unchecked() {
        let deep = format!(r#"{{"a": 1, "x": {}{}}}"#, "[".repeat(200), "]".repeat(200));
        for text in [r#"{"a": 1, "x": "\ud800"}"#, deep.as_str()] {
            assert_eq!(by_value(text), None, "{text}");
            assert_eq!(
                read(text.as_bytes(), &NAMES).map(|c| c[0]),
                Some(Some(1)),
                "{text}"
            );
        }
        let bytes = b"{\"a\": 1, \"x\": \"\xff\"}";
        assert_eq!(read(bytes, &NAMES).map(|c| c[0]), Some(Some(1)));
    }
}
