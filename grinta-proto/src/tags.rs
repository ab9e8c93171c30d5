//! Tags: small key/value labels a node gives itself (a zone, a role, a version).
//!
//! A node's tags ride in its membership metadata (`grinta.v1.NodeMeta` in `Alive.meta`), so they
//! spread with its alive, signed by it, and every node sees them on [`Member::tags`]. A change
//! takes the node's next incarnation. A dial can be restricted to the owners whose tags match a
//! [`TagFilter`].
//!
//! Limits: a key is 1..=[`MAX_TAG_KEY_LEN`] bytes of `[A-Za-z0-9._/-]`, a value at most
//! [`MAX_TAG_VALUE_LEN`] bytes, at most [`MAX_TAGS`] tags, and the encoded tags at most the
//! membership's `max_meta_size` (512 bytes by default).
//!
//! ```
//! use grinta_proto::tags::{TagFilter, Tags};
//!
//! let mut tags = Tags::new();
//! tags.insert("zone", "eu-west")?;
//! tags.insert("role", "billing")?;
//! assert!(TagFilter::new().eq("zone", "eu-west").has("role").matches(&tags));
//! assert!(!TagFilter::new().eq("zone", "us-east").matches(&tags));
//! assert_eq!(Tags::decode(&tags.encode()), tags);
//! # Ok::<(), grinta_proto::tags::TagError>(())
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;

use crate::membership::Member;
use crate::wire;

/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 256;
/// Most tags on one node.
pub const MAX_TAGS: usize = 32;

/// A tag that cannot be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TagError {
    /// The key is empty, too long, or holds a character outside `[A-Za-z0-9._/-]`.
    #[error(
        "invalid tag key {key:?}: a key is 1..=64 bytes of A-Z, a-z, 0-9, '.', '_', '/' or '-'"
    )]
    InvalidKey {
        /// The refused key (truncated if very long).
        key: String,
    },
    /// The value is longer than [`MAX_TAG_VALUE_LEN`].
    #[error("the value of tag {key:?} is {len} bytes; at most 256 are allowed")]
    ValueTooLong {
        /// The tag's key.
        key: String,
        /// The value's length.
        len: usize,
    },
    /// The node would have more than [`MAX_TAGS`] tags.
    #[error("a node has at most {limit} tags")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// The encoded tags exceed the membership's `max_meta_size`.
    #[error("the tags take {size} bytes encoded; max_meta_size allows {limit}")]
    TooLarge {
        /// Their encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// Checks one tag against the limits.
pub fn validate_tag(key: &str, value: &str) -> Result<(), TagError> {
    if key.is_empty()
        || key.len() > MAX_TAG_KEY_LEN
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
    {
        return Err(TagError::InvalidKey {
            key: key.chars().take(MAX_TAG_KEY_LEN + 8).collect(),
        });
    }
    if value.len() > MAX_TAG_VALUE_LEN {
        return Err(TagError::ValueTooLong {
            key: key.to_owned(),
            len: value.len(),
        });
    }
    Ok(())
}

/// A node's tags, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(BTreeMap<String, String>);

impl Tags {
    /// No tags.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of tag `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every tag, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of tags.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets tag `key` to `value`; returns the previous value.
    pub fn insert(&mut self, key: &str, value: &str) -> Result<Option<String>, TagError> {
        validate_tag(key, value)?;
        if !self.0.contains_key(key) && self.0.len() >= MAX_TAGS {
            return Err(TagError::TooMany { limit: MAX_TAGS });
        }
        Ok(self.0.insert(key.to_owned(), value.to_owned()))
    }

    /// Removes tag `key`; returns its value.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.0.remove(key)
    }

    /// The encoded form carried in membership metadata (`grinta.v1.NodeMeta`).
    pub fn encode(&self) -> Bytes {
        wire::NodeMeta {
            tags: self
                .0
                .iter()
                .map(|(key, value)| wire::Tag {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        }
        .encode_to_vec()
        .into()
    }

    /// Reads tags from membership metadata. Whatever does not decode, breaks a limit or repeats
    /// a key is skipped: a peer's metadata never makes this fail.
    pub fn decode(meta: &[u8]) -> Self {
        let Ok(decoded) = wire::NodeMeta::decode(meta) else {
            return Self::new();
        };
        let mut tags = Self::new();
        for tag in decoded.tags {
            if tags.get(&tag.key).is_none() {
                let _ = tags.insert(&tag.key, &tag.value);
            }
        }
        tags
    }
}

impl Member {
    /// The member's tags, from its metadata (see [`crate::tags`]).
    pub fn tags(&self) -> Tags {
        Tags::decode(&self.meta)
    }
}

/// Which tags a node must have: every rule must hold.
///
/// ```
/// use grinta_proto::tags::{TagFilter, Tags};
///
/// let filter = TagFilter::new().eq("zone", "eu-west");
/// assert!(!filter.matches(&Tags::new()));
/// assert!(TagFilter::new().matches(&Tags::new()), "an empty filter matches every node");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagFilter {
    rules: Vec<(String, Option<String>)>,
}

impl TagFilter {
    /// A filter every node matches.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also requires tag `key` to equal `value`.
    #[must_use]
    pub fn eq(mut self, key: &str, value: &str) -> Self {
        self.rules.push((key.to_owned(), Some(value.to_owned())));
        self
    }

    /// Also requires tag `key`, whatever its value.
    #[must_use]
    pub fn has(mut self, key: &str) -> Self {
        self.rules.push((key.to_owned(), None));
        self
    }

    /// Whether the filter has no rule (every node matches).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `tags` satisfy every rule.
    pub fn matches(&self, tags: &Tags) -> bool {
        self.rules.iter().all(|(key, value)| match value {
            Some(v) => tags.get(key) == Some(v.as_str()),
            None => tags.get(key).is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_typed_errors() {
        let mut tags = Tags::new();
        assert!(matches!(
            tags.insert("", "x"),
            Err(TagError::InvalidKey { .. })
        ));
        assert!(matches!(
            tags.insert("bad key", "x"),
            Err(TagError::InvalidKey { .. })
        ));
        assert!(matches!(
            tags.insert(&"k".repeat(65), "x"),
            Err(TagError::InvalidKey { .. })
        ));
        assert!(matches!(
            tags.insert("k", &"v".repeat(257)),
            Err(TagError::ValueTooLong { len: 257, .. })
        ));
        tags.insert(&"k".repeat(64), &"v".repeat(256)).unwrap();
        for i in 1..MAX_TAGS {
            tags.insert(&format!("t{i}"), "x").unwrap();
        }
        assert_eq!(tags.len(), MAX_TAGS);
        assert!(matches!(
            tags.insert("one-more", "x"),
            Err(TagError::TooMany { limit: MAX_TAGS })
        ));
        // Replacing an existing key is always fine.
        assert_eq!(tags.insert("t1", "y").unwrap(), Some("x".into()));
    }

    #[test]
    fn decoding_skips_what_breaks_the_limits() {
        let meta = wire::NodeMeta {
            tags: vec![
                wire::Tag {
                    key: "zone".into(),
                    value: "eu".into(),
                },
                wire::Tag {
                    key: "zone".into(),
                    value: "us".into(),
                },
                wire::Tag {
                    key: "bad key".into(),
                    value: "x".into(),
                },
                wire::Tag {
                    key: "big".into(),
                    value: "v".repeat(1000),
                },
            ],
        }
        .encode_to_vec();
        let tags = Tags::decode(&meta);
        assert_eq!(tags.iter().collect::<Vec<_>>(), vec![("zone", "eu")]);
        assert!(Tags::decode(b"\xff\xff garbage").is_empty());
        assert!(Tags::decode(b"").is_empty());
    }
}
