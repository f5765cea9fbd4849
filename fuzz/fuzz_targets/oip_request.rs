//! An OIP request body (and its binary-extension header length), as the server takes it: decoded
//! or refused with a message, never a panic; a decoded input's bytes always match its dtype and
//! shape; then arranged against a model's inputs, or refused naming one of them.
#![no_main]

use bytes::Bytes;
use kiln_codec::oip;
use kiln_codec::signature::{InputSpec, Ragged, arrange_inputs};
use kiln_codec::tensor::{DType, byte_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Option<u16>, &[u8])| {
    let (header_length, body) = input;
    let header_length = header_length.map(|n| n.to_string());
    let Ok((_, named)) = oip::decode(header_length.as_deref(), Bytes::copy_from_slice(body)) else {
        return;
    };
    for (name, tensor) in &named {
        assert_eq!(Some(tensor.data.len()), byte_len(tensor.dtype, &tensor.shape), "input '{name}'");
    }
    let ragged = Some(Ragged { dim: 1, pad: 0.0 });
    let specs = [
        InputSpec::new("ids", DType::I64, vec![None, None], ragged),
        InputSpec::new("mask", DType::I64, vec![None, None], ragged),
    ];
    let sent: Vec<String> = named.iter().map(|(name, _)| name.clone()).collect();
    match arrange_inputs("m", &specs, 64, named) {
        Ok(arranged) => {
            assert_eq!(arranged.len(), specs.len());
            for (tensor, spec) in arranged.iter().zip(&specs) {
                assert!(tensor.check(spec).is_ok(), "arranged input '{}' does not fit it", spec.name);
                assert_eq!(tensor.rows(), arranged[0].rows());
                assert!(tensor.rows() <= 64);
            }
        }
        Err(e) => assert!(
            specs.iter().any(|s| s.name == e.input()) || sent.iter().any(|n| n == e.input()),
            "'{e}' names neither a declared input nor one sent"
        ),
    }
});
