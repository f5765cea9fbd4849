//! Requests merged into one batch (ragged lengths padded) and the batch split back: each
//! request gets exactly its own rows, cut back to its own length. Split also refuses outputs
//! whose bytes do not fit their shape instead of reading past them.
#![no_main]

use kiln_codec::batch;
use kiln_codec::signature::{InputSpec, OutputSpec, Ragged};
use kiln_codec::tensor::HostTensor;
use kiln_wire::DType;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Request {
    rows: u8,
    len: u8,
    seed: u16,
}

#[derive(Debug, Arbitrary)]
struct Case {
    requests: Vec<Request>,
    /// An output as a backend might return it, possibly malformed.
    stray_shape: Vec<u8>,
    stray_bytes: Vec<u8>,
}

fn request(r: &Request) -> (Vec<HostTensor>, u32, u32) {
    let (rows, len) = (u32::from(r.rows % 3) + 1, u32::from(r.len % 8) + 1);
    let ids: Vec<u8> = (0..rows * len).flat_map(|i| (i64::from(r.seed) * 1000 + i64::from(i) + 1).to_le_bytes()).collect();
    let features: Vec<u8> = (0..rows * 2).flat_map(|i| (f32::from(r.seed) + i as f32).to_le_bytes()).collect();
    let inputs = vec![
        HostTensor { dtype: DType::I64, shape: vec![rows, len], data: ids },
        HostTensor { dtype: DType::F32, shape: vec![rows, 2], data: features },
    ];
    (inputs, rows, len)
}

fuzz_target!(|case: Case| {
    let ragged = Some(Ragged { dim: 1, pad: 0.0 });
    let specs = [
        InputSpec::new("ids", DType::I64, vec![None, None], ragged),
        InputSpec::new("features", DType::F32, vec![None, Some(2)], None),
    ];
    let outputs = [OutputSpec { name: "ids".into(), ragged_dim: Some(1) }, OutputSpec { name: "features".into(), ragged_dim: None }];
    let requests: Vec<_> = case.requests.iter().take(8).map(request).collect();
    if requests.is_empty() {
        return;
    }
    let parts: Vec<&[HostTensor]> = requests.iter().map(|(inputs, _, _)| inputs.as_slice()).collect();
    let merged = batch::merge(&specs, &parts);
    let rows: Vec<u32> = requests.iter().map(|(_, rows, _)| *rows).collect();
    let lens: Vec<Option<u32>> = requests.iter().map(|(inputs, _, _)| batch::ragged_len(&specs, inputs)).collect();
    assert_eq!(merged[0].shape[0], rows.iter().sum::<u32>());
    // An identity model: the outputs are the merged inputs.
    let split = batch::split(merged.clone(), &outputs, &rows, &lens).expect("a well-formed batch splits");
    for ((inputs, _, _), got) in requests.iter().zip(&split) {
        assert_eq!(got, inputs, "a request got rows that are not its own");
    }

    // A malformed output beside a good one is an error, never a panic.
    let shape: Vec<u32> = case.stray_shape.iter().take(4).map(|&d| u32::from(d)).collect();
    let stray = HostTensor { dtype: DType::I64, shape, data: case.stray_bytes };
    let _ = batch::split(vec![stray, merged[1].clone()], &outputs, &rows, &lens);
});
