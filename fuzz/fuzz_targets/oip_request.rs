//! An OIP request body (and its binary-extension header length): decoded or refused with a
//! message, never a panic; a decoded input's bytes always match its dtype and shape.
#![no_main]

use bytes::Bytes;
use kiln_codec::oip;
use kiln_codec::tensor::byte_len;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Option<u16>, &[u8])| {
    let (header_length, body) = input;
    let header_length = header_length.map(|n| n.to_string());
    if let Ok((_, named)) = oip::decode(header_length.as_deref(), Bytes::copy_from_slice(body)) {
        for (name, tensor) in named {
            assert_eq!(Some(tensor.data.len()), byte_len(tensor.dtype, &tensor.shape), "input '{name}'");
        }
    }
});
