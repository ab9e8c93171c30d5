//! Varint length-prefixed framing over a byte stream.
//!
//! A frame is `varint(len) || bytes[len]`, where the varint is the protobuf base-128 encoding (1 to 10
//! bytes). Decoding is incremental: feed whatever the stream delivered, then pull complete frames. A
//! partial frame is never an error, only "need more". Every reader has a maximum frame size; a length
//! prefix above it is a [`FrameError::TooLarge`] that names both numbers, detected as soon as the prefix
//! is complete, before any payload is buffered.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;

/// Longest possible varint encoding of a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Why a byte stream could not be decoded into frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces a frame larger than this reader accepts.
    #[error("frame of {size} bytes exceeds the maximum message size of {limit} bytes")]
    TooLarge {
        /// Size announced by the length prefix.
        size: u64,
        /// The reader's configured maximum.
        limit: usize,
    },
    /// The length prefix is not a valid varint (longer than 10 bytes or overflowing 64 bits).
    #[error("malformed length prefix: not a valid varint")]
    MalformedLength,
    /// The frame was complete but its bytes are not a valid message of the expected type.
    #[error("frame is not a valid {message}: {source}")]
    InvalidMessage {
        /// Name of the expected message type.
        message: &'static str,
        /// What prost found wrong.
        source: prost::DecodeError,
    },
}

/// Where the next frame of a buffer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameHeader {
    /// The buffer holds too few bytes to know; read more from the stream.
    NeedMore {
        /// Lower bound of the bytes missing; at least 1.
        at_least: usize,
    },
    /// A complete frame: payload at `buf[header_len..header_len + len]`.
    Complete {
        /// Bytes taken by the length prefix.
        header_len: usize,
        /// Bytes of payload.
        len: usize,
    },
}

/// Reads the frame header at the start of `buf`, checking it against `max_len`.
///
/// Never panics; a partial prefix or a partial payload is [`FrameHeader::NeedMore`].
pub fn peek_frame(buf: &[u8], max_len: usize) -> Result<FrameHeader, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let bits = u64::from(byte & 0x7f);
        if i == MAX_VARINT_LEN - 1 && byte > 1 {
            return Err(FrameError::MalformedLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            let header_len = i + 1;
            if value > max_len as u64 {
                return Err(FrameError::TooLarge {
                    size: value,
                    limit: max_len,
                });
            }
            // `value <= max_len`, a usize, so the conversion is lossless.
            let len = value as usize;
            let available = buf.len() - header_len;
            return Ok(if available >= len {
                FrameHeader::Complete { header_len, len }
            } else {
                FrameHeader::NeedMore {
                    at_least: len - available,
                }
            });
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        return Err(FrameError::MalformedLength);
    }
    Ok(FrameHeader::NeedMore { at_least: 1 })
}

/// Appends one frame holding `payload` to `out`.
pub fn encode_frame(payload: &[u8], out: &mut impl bytes::BufMut) {
    prost::encoding::encode_varint(payload.len() as u64, out);
    out.put_slice(payload);
}

/// Appends one frame holding the protobuf encoding of `message` to `out`.
///
/// `out` must have room for [`framed_len`]`(message.encoded_len())` bytes; growable buffers such as
/// `Vec<u8>` and `BytesMut` always do.
pub fn encode_message(message: &impl Message, out: &mut impl bytes::BufMut) {
    let len = message.encoded_len();
    prost::encoding::encode_varint(len as u64, out);
    message.encode_raw(out);
}

/// Total bytes a frame of `payload_len` bytes takes, prefix included.
pub fn framed_len(payload_len: usize) -> usize {
    prost::encoding::encoded_len_varint(payload_len as u64) + payload_len
}

/// Complete frames taken at once from a [`FrameDecoder`] (see [`FrameDecoder::next_run`]).
///
/// ```
/// use grinta_proto::wire::framing::{self, FrameDecoder, FrameRun};
///
/// let mut wire = Vec::new();
/// framing::encode_frame(b"one", &mut wire);
/// framing::encode_frame(b"two", &mut wire);
/// let mut decoder = FrameDecoder::new(1024);
/// decoder.push(wire.into());
/// let Ok(Some(FrameRun::Frames { mut frames, count, body })) = decoder.next_run() else {
///     panic!("both frames in one run");
/// };
/// assert_eq!((count, body), (2, 6));
/// assert_eq!(FrameRun::split_next(&mut frames).as_deref(), Some(&b"one"[..]));
/// assert_eq!(FrameRun::split_next(&mut frames).as_deref(), Some(&b"two"[..]));
/// assert_eq!(FrameRun::split_next(&mut frames), None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameRun {
    /// One frame's payload (a frame that straddled chunks, copied together).
    One(Bytes),
    /// Complete frames cut from one chunk, length prefixes included.
    Frames {
        /// The frames' bytes.
        frames: Bytes,
        /// How many frames.
        count: usize,
        /// Their payload bytes, prefixes not counted.
        body: usize,
    },
}

impl FrameRun {
    /// Cuts the first frame's payload off `frames` (the bytes of a `Frames` run): `None` if
    /// `frames` does not start with a complete frame, which a run never lacks. The last frame
    /// takes the buffer itself (no new reference).
    pub fn split_next(frames: &mut Bytes) -> Option<Bytes> {
        match peek_frame(frames, usize::MAX) {
            Ok(FrameHeader::Complete { header_len, len }) => {
                frames.advance(header_len);
                Some(if len == frames.len() {
                    std::mem::take(frames)
                } else {
                    frames.split_to(len)
                })
            }
            _ => None,
        }
    }
}

/// Incremental frame decoder for one byte stream.
///
/// Feed bytes with [`extend`](Self::extend) as they arrive, then call [`next_frame`](Self::next_frame)
/// or [`next_message`](Self::next_message) until it returns `Ok(None)`. The decoder buffers at most one
/// frame of `max_frame_len` bytes plus its prefix beyond what the caller feeds at once. After an error
/// the stream is unusable: the caller resets it.
#[derive(Debug)]
pub struct FrameDecoder {
    /// The head of a frame split across chunks, copied together.
    buf: BytesMut,
    /// Pushed chunks not yet consumed. Frames that lie within one chunk are returned as slices of
    /// it, without a copy; only frames straddling chunks are copied (into `buf`).
    chunks: VecDeque<Bytes>,
    max_frame_len: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max_frame_len` bytes.
    pub fn new(max_frame_len: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            chunks: VecDeque::new(),
            max_frame_len,
        }
    }

    /// The maximum frame size this decoder accepts.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Changes the maximum frame size (for example after a small control frame, for the messages
    /// that follow it). Bytes already buffered are kept.
    pub fn set_max_frame_len(&mut self, max_frame_len: usize) {
        self.max_frame_len = max_frame_len;
    }

    /// Appends bytes received from the stream (copied; [`push`](Self::push) avoids the copy).
    pub fn extend(&mut self, data: &[u8]) {
        self.push(Bytes::copy_from_slice(data));
    }

    /// Appends a chunk received from the stream. Frames that lie within one chunk are later
    /// returned as slices of it, without a copy.
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.chunks.push_back(data);
        }
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    /// Takes the next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if self.buf.is_empty() {
                let Some(chunk) = self.chunks.front_mut() else {
                    return Ok(None);
                };
                match peek_frame(chunk, self.max_frame_len)? {
                    FrameHeader::Complete { header_len, len } => {
                        chunk.advance(header_len);
                        let frame = chunk.split_to(len);
                        if chunk.is_empty() {
                            self.chunks.pop_front();
                        }
                        return Ok(Some(frame));
                    }
                    // The frame continues in the next chunk: gather it in `buf`.
                    FrameHeader::NeedMore { .. } => {
                        self.buf.extend_from_slice(chunk);
                        self.chunks.pop_front();
                    }
                }
            } else {
                match peek_frame(&self.buf, self.max_frame_len)? {
                    FrameHeader::Complete { header_len, len } => {
                        self.buf.advance(header_len);
                        return Ok(Some(self.buf.split_to(len).freeze()));
                    }
                    FrameHeader::NeedMore { at_least } => {
                        // Copy only what completes the frame (or its prefix) from the next chunk.
                        let Some(chunk) = self.chunks.front_mut() else {
                            return Ok(None);
                        };
                        let take = at_least.min(chunk.len());
                        self.buf.extend_from_slice(&chunk[..take]);
                        chunk.advance(take);
                        if chunk.is_empty() {
                            self.chunks.pop_front();
                        }
                    }
                }
            }
        }
    }

    /// Takes the next complete frames: every complete frame at the front of the next chunk as
    /// one [`FrameRun::Frames`] (one slice of the chunk, however many frames it holds), or a
    /// frame that straddles chunks as [`FrameRun::One`]; `Ok(None)` if more bytes are needed.
    /// Each frame of a run is checked (complete, within the limit) but not cut out: a reader
    /// does that with [`FrameRun::split_next`], on its own thread. Errors as
    /// [`next_frame`](Self::next_frame), after the complete frames before the faulty one.
    pub fn next_run(&mut self) -> Result<Option<FrameRun>, FrameError> {
        if self.buf.is_empty() {
            let Some(chunk) = self.chunks.front() else {
                return Ok(None);
            };
            let (mut end, mut count, mut body) = (0usize, 0usize, 0usize);
            let mut error = None;
            while end < chunk.len() {
                match peek_frame(&chunk[end..], self.max_frame_len) {
                    Ok(FrameHeader::Complete { header_len, len }) => {
                        end += header_len + len;
                        count += 1;
                        body += len;
                    }
                    Ok(FrameHeader::NeedMore { .. }) => break,
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            if count > 0 {
                let frames = if end == chunk.len() {
                    // The whole chunk: moved, not sliced.
                    self.chunks.pop_front().unwrap_or_default()
                } else {
                    match self.chunks.front_mut() {
                        Some(chunk) => chunk.split_to(end),
                        None => Bytes::new(),
                    }
                };
                return Ok(Some(FrameRun::Frames {
                    frames,
                    count,
                    body,
                }));
            }
            if let Some(e) = error {
                return Err(e);
            }
        }
        Ok(self.next_frame()?.map(FrameRun::One))
    }

    /// Takes and decodes the next complete frame as a `M`, `Ok(None)` if more bytes are needed.
    pub fn next_message<M: Message + Default>(&mut self) -> Result<Option<M>, FrameError> {
        match self.next_frame()? {
            None => Ok(None),
            Some(frame) => {
                M::decode(frame)
                    .map(Some)
                    .map_err(|source| FrameError::InvalidMessage {
                        message: std::any::type_name::<M>(),
                        source,
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_needs_more() {
        assert_eq!(
            peek_frame(&[], 10),
            Ok(FrameHeader::NeedMore { at_least: 1 })
        );
    }

    #[test]
    fn partial_prefix_needs_more() {
        // 300 = 0xac 0x02; only the first byte has arrived.
        assert_eq!(
            peek_frame(&[0xac], 1000),
            Ok(FrameHeader::NeedMore { at_least: 1 })
        );
        assert_eq!(
            peek_frame(&[0xac, 0x02, 0, 0], 1000),
            Ok(FrameHeader::NeedMore { at_least: 298 })
        );
    }

    #[test]
    fn too_large_names_size_and_limit() {
        let mut buf = Vec::new();
        encode_frame(&[0u8; 20], &mut buf);
        let err = peek_frame(&buf, 19).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                size: 20,
                limit: 19
            }
        );
        assert_eq!(
            err.to_string(),
            "frame of 20 bytes exceeds the maximum message size of 19 bytes"
        );
    }

    #[test]
    fn too_large_is_detected_before_the_payload_arrives() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.extend(&[0x80, 0x80, 0x80, 0x80, 0x01]); // 2^28, prefix only
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::TooLarge {
                size: 268_435_456,
                limit: 1024
            })
        ));
    }

    #[test]
    fn overlong_varint_is_malformed() {
        assert_eq!(
            peek_frame(&[0xff; 10], usize::MAX),
            Err(FrameError::MalformedLength)
        );
        let mut tenth_too_big = [0xff; 10];
        tenth_too_big[9] = 0x02;
        assert_eq!(
            peek_frame(&tenth_too_big, usize::MAX),
            Err(FrameError::MalformedLength)
        );
    }

    #[test]
    fn empty_frame_round_trips() {
        let mut buf = Vec::new();
        encode_frame(&[], &mut buf);
        let mut decoder = FrameDecoder::new(0);
        decoder.extend(&buf);
        assert_eq!(decoder.next_frame(), Ok(Some(Bytes::new())));
        assert_eq!(decoder.next_frame(), Ok(None));
    }

    #[test]
    fn invalid_message_is_typed() {
        let mut decoder = FrameDecoder::new(64);
        decoder.extend(&[2, 0xff, 0xff]);
        let err = decoder.next_message::<crate::wire::FlowOpen>().unwrap_err();
        assert!(matches!(err, FrameError::InvalidMessage { .. }), "{err}");
    }

    #[test]
    fn framed_len_matches_encoding() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 1 << 20] {
            let mut buf = Vec::new();
            encode_frame(&vec![7u8; len], &mut buf);
            assert_eq!(buf.len(), framed_len(len));
        }
    }

    proptest::proptest! {
        /// Frames come out the same whatever the chunking, whether chunks are pushed (sliced
        /// without a copy while frames fit) or extended (copied), mixed in any order.
        #[test]
        fn chunked_input_yields_the_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..20),
            cuts in proptest::collection::vec((1usize..400, proptest::bool::ANY), 1..50),
        ) {
            let mut wire = Vec::new();
            for f in &frames {
                encode_frame(f, &mut wire);
            }
            let mut decoder = FrameDecoder::new(1024);
            let mut out = Vec::new();
            let mut rest = &wire[..];
            let mut cut = cuts.iter().cycle();
            while !rest.is_empty() {
                let &(len, copy) = cut.next().unwrap();
                let (piece, tail) = rest.split_at(len.min(rest.len()));
                rest = tail;
                if copy {
                    decoder.extend(piece);
                } else {
                    decoder.push(Bytes::copy_from_slice(piece));
                }
                while let Some(frame) = decoder.next_frame().unwrap() {
                    out.push(frame.to_vec());
                }
            }
            proptest::prop_assert_eq!(decoder.buffered(), 0);
            proptest::prop_assert_eq!(out, frames);
        }

        /// Runs of frames, cut into messages by their reader, give the frames `next_frame`
        /// gives, whatever the chunking and the frame sizes (up to over the limit): the same
        /// messages in the same order, then the same error at the same point.
        #[test]
        fn runs_yield_what_frames_yield(
            frames in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..40),
            cuts in proptest::collection::vec(1usize..2000, 1..50),
            limit in 0usize..400,
        ) {
            let mut wire = Vec::new();
            for f in &frames {
                encode_frame(f, &mut wire);
            }
            let decode = |runs: bool| {
                let mut decoder = FrameDecoder::new(limit);
                let mut out = Vec::new();
                let mut rest = &wire[..];
                let mut cut = cuts.iter().cycle();
                while !rest.is_empty() {
                    let &len = cut.next().unwrap();
                    let (piece, tail) = rest.split_at(len.min(rest.len()));
                    rest = tail;
                    decoder.push(Bytes::copy_from_slice(piece));
                    loop {
                        let next = if runs {
                            decoder.next_run()
                        } else {
                            decoder.next_frame().map(|f| f.map(FrameRun::One))
                        };
                        match next {
                            Ok(Some(FrameRun::One(m))) => out.push(Ok(m.to_vec())),
                            Ok(Some(FrameRun::Frames { mut frames, count, body })) => {
                                let mut got = 0;
                                let mut bytes = 0;
                                while let Some(m) = FrameRun::split_next(&mut frames) {
                                    got += 1;
                                    bytes += m.len();
                                    out.push(Ok(m.to_vec()));
                                }
                                assert!(frames.is_empty(), "a run holds whole frames only");
                                assert_eq!((got, bytes), (count, body));
                            }
                            Ok(None) => break,
                            Err(e) => {
                                out.push(Err(e));
                                return out;
                            }
                        }
                    }
                }
                out
            };
            proptest::prop_assert_eq!(decode(true), decode(false));
        }
    }
}
