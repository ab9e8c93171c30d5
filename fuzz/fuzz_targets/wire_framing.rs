//! Feeds arbitrary bytes, in arbitrary pieces, to the stream framing decoder and decodes every frame as
//! a membership packet: nothing may panic and every frame must respect the limit.
#![no_main]

use grinta_proto::wire::{self, framing::FrameDecoder};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let max = 4096;
    let mut decoder = FrameDecoder::new(max);
    for piece in rest.chunks(usize::from(split).max(1)) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= max);
                    let _ = wire::Packet::decode(frame);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
