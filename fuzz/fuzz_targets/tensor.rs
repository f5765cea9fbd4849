//! A tensor from its parts, checked against a declared input: accepted only when its bytes fit
//! its shape, and then every value reads back; JSON values encode to the bytes they came from.
#![no_main]

use kiln_codec::signature::{InputSpec, ValueRange};
use kiln_codec::tensor::{HostTensor, element_count, json};
use kiln_wire::DType;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Case {
    dtype: u8,
    shape: Vec<u16>,
    data: Vec<u8>,
    declared: Vec<Option<u16>>,
    max_dims: Vec<Option<u16>>,
    range: Option<(Option<i16>, Option<i16>)>,
}

fuzz_target!(|case: Case| {
    let dtype = DType::ALL[usize::from(case.dtype) % DType::ALL.len()];
    let shape: Vec<u32> = case.shape.iter().take(6).map(|&d| u32::from(d)).collect();
    let Ok(tensor) = HostTensor::new("x", dtype, shape.clone(), case.data) else { return };
    let count = element_count(&shape).expect("an accepted tensor has a countable shape");
    assert_eq!(tensor.data.len(), count * dtype.size());
    assert_eq!(tensor.values().count(), count);

    let declared: Vec<Option<u32>> = case.declared.iter().take(6).map(|d| d.map(u32::from)).collect();
    let mut spec = InputSpec::new("x", dtype, declared.clone(), None);
    spec.max_dims = case.max_dims.iter().map(|d| d.map(u32::from)).chain(std::iter::repeat(None)).take(declared.len()).collect();
    spec.range = case.range.map(|(min, max)| ValueRange { min: min.map(f64::from), max: max.map(f64::from) });
    if tensor.check(&spec).is_ok() {
        assert_eq!(tensor.shape.len(), declared.len());
        for (got, want) in tensor.shape.iter().zip(&declared) {
            assert!(want.is_none_or(|w| w == *got), "dimension {got} accepted for {want:?}");
        }
    }

    // Values as JSON and back: the same bytes, for every finite value.
    let values = json::decode(dtype, &tensor.data);
    if values.iter().all(|v| !v.is_null()) {
        let refs: Vec<&serde_json::Value> = values.iter().collect();
        let bytes = json::encode("x", dtype, &refs).expect("decoded values encode");
        assert_eq!(bytes, tensor.data, "{dtype} values changed through JSON");
    }
});
