//! Typed flows: codecs that turn values into flow messages and back.
//!
//! A [`Codec`] encodes one value into one message and decodes one message into one value. A
//! message that does not decode as the expected type is a [`CodecError`] naming the type, never a
//! panic. [`BytesCodec`] passes bytes through; [`ProstCodec`] carries any prost message (the wire
//! schema's types or the application's own); [`JsonCodec`] carries any serde type (feature `json`).
//!
//! ```
//! use grinta_proto::codec::{Codec, ProstCodec};
//! use grinta_proto::wire;
//!
//! let codec = ProstCodec::<wire::Ack>::default();
//! let bytes = codec.encode(&wire::Ack { seq_no: 7 })?;
//! assert_eq!(codec.decode(bytes)?, wire::Ack { seq_no: 7 });
//! # Ok::<(), grinta_proto::codec::CodecError>(())
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;

/// A message that could not be encoded or decoded as the expected type.
///
/// A codec of your own makes one with [`CodecError::encode`] or [`CodecError::decode`]:
///
/// ```
/// use bytes::Bytes;
/// use grinta_proto::codec::{Codec, CodecAction, CodecError};
///
/// struct Text;
///
/// impl Codec<String> for Text {
///     fn encode(&self, value: &String) -> Result<Bytes, CodecError> {
///         Ok(Bytes::from(value.clone()))
///     }
///
///     fn decode(&self, message: Bytes) -> Result<String, CodecError> {
///         String::from_utf8(message.to_vec()).map_err(CodecError::decode::<String>)
///     }
/// }
///
/// let err = Text.decode(Bytes::from_static(&[0xff])).unwrap_err();
/// assert_eq!(err.action, CodecAction::Decode);
/// assert_eq!(err.type_name, "alloc::string::String");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot {action} a message as {type_name}: {source}")]
#[non_exhaustive]
pub struct CodecError {
    /// Encoding or decoding.
    pub action: CodecAction,
    /// The expected type.
    pub type_name: &'static str,
    /// What went wrong.
    #[source]
    pub source: Arc<dyn std::error::Error + Send + Sync>,
}

/// What a [`CodecError`] failed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecAction {
    /// Turning a value into a message.
    Encode,
    /// Turning a message into a value.
    Decode,
}

impl std::fmt::Display for CodecAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Encode => "encode",
            Self::Decode => "decode",
        })
    }
}

impl CodecError {
    /// A value of `T` could not be encoded, because of `source` (an error or a message).
    pub fn encode<T: ?Sized>(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new::<T>(CodecAction::Encode, source.into())
    }

    /// A message is not a value of `T`, because of `source` (an error or a message).
    pub fn decode<T: ?Sized>(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::new::<T>(CodecAction::Decode, source.into())
    }

    fn new<T: ?Sized>(
        action: CodecAction,
        source: Box<dyn std::error::Error + Send + Sync>,
    ) -> Self {
        Self {
            action,
            type_name: std::any::type_name::<T>(),
            source: Arc::from(source),
        }
    }
}

/// Turns values of `T` into flow messages and back.
pub trait Codec<T>: Send + Sync {
    /// Encodes one value as one message.
    fn encode(&self, value: &T) -> Result<Bytes, CodecError>;
    /// Decodes one message as one value.
    fn decode(&self, message: Bytes) -> Result<T, CodecError>;
}

/// Raw bytes, unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl BytesCodec {
    /// The codec (a unit value: `BytesCodec` itself works too).
    pub const fn new() -> Self {
        Self
    }
}

impl Codec<Bytes> for BytesCodec {
    fn encode(&self, value: &Bytes) -> Result<Bytes, CodecError> {
        Ok(value.clone())
    }

    fn decode(&self, message: Bytes) -> Result<Bytes, CodecError> {
        Ok(message)
    }
}

/// Protobuf messages, with prost.
///
/// ```
/// use grinta_proto::codec::{Codec, ProstCodec};
/// use grinta_proto::wire::Ack;
///
/// let codec = ProstCodec::<Ack>::new();
/// let bytes = codec.encode(&Ack { seq_no: 7 })?;
/// assert_eq!(codec.decode(bytes)?, Ack { seq_no: 7 });
/// # Ok::<(), grinta_proto::codec::CodecError>(())
/// ```
pub struct ProstCodec<M>(PhantomData<fn() -> M>);

impl<M> ProstCodec<M> {
    /// The codec for messages of type `M`.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<M> Default for ProstCodec<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> Clone for ProstCodec<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for ProstCodec<M> {}

impl<M> std::fmt::Debug for ProstCodec<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProstCodec<{}>", std::any::type_name::<M>())
    }
}

impl<M: prost::Message + Default> Codec<M> for ProstCodec<M> {
    fn encode(&self, value: &M) -> Result<Bytes, CodecError> {
        Ok(Bytes::from(value.encode_to_vec()))
    }

    fn decode(&self, message: Bytes) -> Result<M, CodecError> {
        M::decode(message).map_err(CodecError::decode::<M>)
    }
}

/// JSON, with serde (feature `json`).
#[cfg(feature = "json")]
pub struct JsonCodec<T>(PhantomData<fn() -> T>);

#[cfg(feature = "json")]
impl<T> JsonCodec<T> {
    /// The codec for values of type `T`.
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

#[cfg(feature = "json")]
impl<T> Default for JsonCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "json")]
impl<T> Clone for JsonCodec<T> {
    fn clone(&self) -> Self {
        *self
    }
}

#[cfg(feature = "json")]
impl<T> Copy for JsonCodec<T> {}

#[cfg(feature = "json")]
impl<T> std::fmt::Debug for JsonCodec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JsonCodec<{}>", std::any::type_name::<T>())
    }
}

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for JsonCodec<T> {
    fn encode(&self, value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(CodecError::encode::<T>)
    }

    fn decode(&self, message: Bytes) -> Result<T, CodecError> {
        serde_json::from_slice(&message).map_err(CodecError::decode::<T>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[test]
    fn a_message_of_another_type_is_a_typed_error() {
        let codec = ProstCodec::<wire::FlowOpen>::default();
        let err = codec
            .decode(Bytes::from_static(&[0xff, 0xff, 0xff]))
            .unwrap_err();
        assert_eq!(err.action, CodecAction::Decode);
        assert!(err.type_name.ends_with("FlowOpen"), "{err}");
        assert!(err.to_string().starts_with("cannot decode a "));
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_round_trips_and_mismatches_are_errors() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Order {
            id: u32,
            item: String,
        }
        let codec = JsonCodec::<Order>::default();
        let order = Order {
            id: 7,
            item: "tea".into(),
        };
        assert_eq!(codec.decode(codec.encode(&order).unwrap()).unwrap(), order);
        let wrong = JsonCodec::<Vec<u8>>::default().encode(&vec![1, 2]).unwrap();
        assert!(codec.decode(wrong).is_err());
    }
}
