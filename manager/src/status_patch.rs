//! A plugin's status patch (`patch_status`'s JSON object) as the host reads it: the object's
//! fields in the order they came, each key borrowed from the JSON text when it needs no
//! unescaping. A plugin patches the same few keys over and over, so reading a patch allocates
//! nothing for a patch of up to four fields whose keys the account already has (the status
//! board copies a key only when it is new to the account).

use std::borrow::Cow;

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
};
use serde_json::Value;
use smallvec::SmallVec;

/// How many fields a patch holds without an allocation of its own.
const INLINE: usize = 4;

/// A status patch's fields, in the order of its JSON object. A key given twice is applied twice,
/// in order, so the last value wins (as when the object is read into a map).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatusPatch<'a>(SmallVec<[(Cow<'a, str>, Value); INLINE]>);

impl<'a> StatusPatch<'a> {
    /// Reads a patch; the error says what a plugin did wrong (not JSON, or not an object).
    pub fn parse(json: &'a str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => "a status patch must be a JSON object".to_owned(),
            _ => format!("a status patch must be JSON: {e}"),
        })
    }

    /// The fields' keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(key, _)| key.as_ref())
    }

    /// The fields, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(key, value)| (key.as_ref(), value))
    }

    /// Whether the patch has no field.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The fields, in order, by value.
    pub fn into_fields(self) -> impl Iterator<Item = (Cow<'a, str>, Value)> {
        self.0.into_iter()
    }
}

impl<'a, K: Into<Cow<'a, str>>> FromIterator<(K, Value)> for StatusPatch<'a> {
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(fields: I) -> Self {
        Self(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl Serialize for StatusPatch<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for StatusPatch<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;

        impl<'de> Visitor<'de> for Fields {
            type Value = StatusPatch<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = SmallVec::new();
                while let Some(Key(key)) = map.next_key()? {
                    fields.push((key, map.next_value()?));
                }
                Ok(StatusPatch(fields))
            }
        }

        deserializer.deserialize_map(Fields)
    }
}

/// A field's key: borrowed from the JSON text unless it had to be unescaped.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyText;

        impl<'de> Visitor<'de> for KeyText {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }

            fn visit_string<E: serde::de::Error>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key)))
            }
        }

        deserializer.deserialize_str(KeyText)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_borrowed_unless_unescaped_and_fields_keep_their_order() {
        let text = r#"{"zeta": 1, "al\u0070ha": {"nested": [true]}, "zeta": 2}"#;
        let patch = StatusPatch::parse(text).unwrap();
        let fields: Vec<_> = patch.clone().into_fields().collect();
        assert_eq!(
            fields,
            [
                (Cow::Borrowed("zeta"), json!(1)),
                (Cow::Owned("alpha".to_owned()), json!({"nested": [true]})),
                (Cow::Borrowed("zeta"), json!(2)),
            ]
        );
        assert!(matches!(fields[0].0, Cow::Borrowed(_)));
        assert!(matches!(fields[1].0, Cow::Owned(_)));
        // Written back as a JSON object (the isolated child forwards it so).
        assert_eq!(
            serde_json::to_string(&patch).unwrap(),
            r#"{"zeta":1,"alpha":{"nested":[true]},"zeta":2}"#
        );
    }

    #[test]
    fn a_patch_that_is_not_an_object_or_not_json_says_so() {
        for text in ["5", "[1]", "\"x\"", "null"] {
            assert_eq!(
                StatusPatch::parse(text).unwrap_err(),
                "a status patch must be a JSON object",
                "{text}"
            );
        }
        let bad = StatusPatch::parse(r#"{"a": }"#).unwrap_err();
        assert!(bad.starts_with("a status patch must be JSON: "), "{bad}");
        assert!(StatusPatch::parse("{}").unwrap().is_empty());
    }
}
