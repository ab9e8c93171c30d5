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

use bytes::Bytes;

/// A message that could not be encoded or decoded as the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a {type_name} message: {reason}")]
pub struct CodecError {
    /// "encode" or "decode".
    pub action: &'static str,
    /// The expected type.
    pub type_name: &'static str,
    /// What went wrong.
    pub reason: String,
}

impl CodecError {
    fn decode<T>(reason: impl ToString) -> Self {
        Self {
            action: "decode",
            type_name: std::any::type_name::<T>(),
            reason: reason.to_string(),
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

impl Codec<Bytes> for BytesCodec {
    fn encode(&self, value: &Bytes) -> Result<Bytes, CodecError> {
        Ok(value.clone())
    }

    fn decode(&self, message: Bytes) -> Result<Bytes, CodecError> {
        Ok(message)
    }
}

/// Protobuf messages, with prost.
#[derive(Debug)]
pub struct ProstCodec<M>(PhantomData<fn() -> M>);

impl<M> Default for ProstCodec<M> {
    fn default() -> Self {
        Self(PhantomData)
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
#[derive(Debug)]
pub struct JsonCodec<T>(PhantomData<fn() -> T>);

#[cfg(feature = "json")]
impl<T> Default for JsonCodec<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

#[cfg(feature = "json")]
impl<T: serde::Serialize + serde::de::DeserializeOwned> Codec<T> for JsonCodec<T> {
    fn encode(&self, value: &T) -> Result<Bytes, CodecError> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| CodecError {
                action: "encode",
                type_name: std::any::type_name::<T>(),
                reason: e.to_string(),
            })
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
        assert_eq!(err.action, "decode");
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
