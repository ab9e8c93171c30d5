//! The `grinta.v1` wire schema and stream framing.
//!
//! Every message exchanged between nodes is defined once, in `proto/grinta/v1/*.proto`; the Rust types
//! below are generated from those files at build time by prost (with protox as the compiler, so no
//! system `protoc` is needed). Readers ignore unknown fields, so newer peers may add fields.
//!
//! Messages that travel on QUIC streams (push-pull state, flow open/accept/reject, flow payloads) are
//! framed by [`framing`]: a varint length prefix followed by the bytes, with a maximum size enforced by
//! the reader.
//!
//! ```
//! use grinta_proto::wire::{self, framing::FrameDecoder};
//! use prost::Message;
//!
//! let open = wire::FlowOpen {
//!     protocol_version: wire::PROTOCOL_VERSION,
//!     endpoint: "billing".into(),
//!     source_node: "node-a".into(),
//!     max_message_size: 1 << 20,
//! };
//! let mut bytes = Vec::new();
//! wire::framing::encode_message(&open, &mut bytes);
//!
//! let mut decoder = FrameDecoder::new(64 * 1024);
//! decoder.extend(&bytes);
//! let decoded: wire::FlowOpen = decoder.next_message().unwrap().unwrap();
//! assert_eq!(decoded, open);
//! ```

pub mod framing;

/// A field of an encoded message, read in place by [`fields_in_place`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldInPlace<'a> {
    /// A length-delimited field (bytes, string, message): its bytes, not copied.
    Bytes(&'a [u8]),
    /// A varint field.
    Varint(u64),
    /// A fixed-width or group field, skipped.
    Skipped,
}

/// Walks the fields of encoded message `body` without decoding it into a message (no allocation):
/// `on_field` gets each length-delimited or varint field with its tag, in order (a repeated field
/// once per occurrence; for a singular field the last occurrence is the one prost keeps);
/// fixed-width and group fields are skipped (and reported as such, so a reader can refuse a field
/// of the wrong type as prost does). `None` if `body` does not parse as a message.
///
/// ```
/// use grinta_proto::wire::{self, FieldInPlace};
/// use prost::Message;
///
/// let open = wire::FlowOpen { endpoint: "billing".into(), ..Default::default() };
/// let encoded = open.encode_to_vec();
/// let mut endpoint = None;
/// wire::fields_in_place(&encoded, |tag, field| {
///     if let (2, FieldInPlace::Bytes(bytes)) = (tag, field) {
///         endpoint = Some(bytes);
///     }
/// });
/// assert_eq!(endpoint, Some(&b"billing"[..]));
/// ```
pub fn fields_in_place<'a>(
    body: &'a [u8],
    mut on_field: impl FnMut(u32, FieldInPlace<'a>),
) -> Option<()> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut buf = body;
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).ok()?;
        match wire_type {
            WireType::LengthDelimited => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let bytes = buf.get(..len)?;
                buf = &buf[len..];
                on_field(tag, FieldInPlace::Bytes(bytes));
            }
            WireType::Varint => on_field(tag, FieldInPlace::Varint(decode_varint(&mut buf).ok()?)),
            _ => {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default()).ok()?;
                on_field(tag, FieldInPlace::Skipped);
            }
        }
    }
    Some(())
}

/// Appends a length-delimited field `tag` (`bytes`, `string` or an encoded message) holding
/// `bytes`, as prost writes one: key, length, bytes. Proto3 callers leave out empty `bytes` and
/// `string` fields themselves, as prost does.
pub(crate) fn put_delimited(tag: u32, bytes: &[u8], out: &mut impl bytes::BufMut) {
    use prost::encoding::{WireType, encode_key, encode_varint};
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.put_slice(bytes);
}

/// Bytes [`put_delimited`] writes for field `tag` holding `len` bytes.
pub(crate) fn delimited_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + prost::encoding::encoded_len_varint(len as u64) + len
}

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    rustdoc::broken_intra_doc_links
)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/grinta.v1.rs"));
}

pub use generated::*;

/// The wire protocol version this build speaks, carried in `PushPull` and `FlowOpen`.
///
/// It matches the ALPN `grinta/1`; a peer announcing another version is refused cleanly.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN protocol identifier negotiated on every QUIC connection between grinta nodes.
pub const ALPN: &[u8] = b"grinta/1";
