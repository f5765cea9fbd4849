//! Open Inference Protocol (KServe v2) requests: the JSON body and the binary-data extension
//! (`Inference-Header-Content-Length`), decoded into named host tensors. Every way a request
//! can be wrong is an error naming the input and what is wrong, never a panic.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::tensor::{self, DType, HostTensor};

/// The header that splits a body into its JSON part and the binary tensor data after it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Why a request could not be decoded: a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl From<tensor::TensorError> for DecodeError {
    fn from(e: tensor::TensorError) -> DecodeError {
        DecodeError(e.to_string())
    }
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// Decodes a request body; `header_length` is the `Inference-Header-Content-Length` header's
/// value when the client sent one. Returns the request (its outputs and parameters) and its
/// inputs by name, in the order sent; every binary byte must belong to an input.
pub fn decode(header_length: Option<&str>, body: Bytes) -> Result<(InferRequest, Vec<(String, HostTensor)>), DecodeError> {
    let (header, mut binary) = split_binary(header_length, body)?;
    let mut request: InferRequest = serde_json::from_slice(&header)
        .map_err(|e| DecodeError(format!("invalid inference request: {e}")))?;
    let inputs = std::mem::take(&mut request.inputs);
    let mut named = Vec::with_capacity(inputs.len());
    for input in inputs {
        let tensor = decode_input(&input, &mut binary)?;
        named.push((input.name, tensor));
    }
    if !binary.is_empty() {
        return Err(DecodeError(format!(
            "{} bytes of binary tensor data were not claimed by any input",
            binary.len()
        )));
    }
    Ok((request, named))
}

/// Splits the body at `Inference-Header-Content-Length`, if the client sent one.
fn split_binary(header_length: Option<&str>, body: Bytes) -> Result<(Bytes, Bytes), DecodeError> {
    let Some(value) = header_length else {
        return Ok((body, Bytes::new()));
    };
    let len = value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= body.len())
        .ok_or_else(|| {
            DecodeError(format!(
                "{HEADER_LENGTH} must be a byte count no larger than the body ({} bytes)",
                body.len()
            ))
        })?;
    let mut header = body;
    let binary = header.split_off(len);
    Ok((header, binary))
}

fn decode_input(input: &RequestInput, binary: &mut Bytes) -> Result<HostTensor, DecodeError> {
    let name = &input.name;
    let dtype = DType::from_wire_name(&input.datatype).ok_or_else(|| {
        DecodeError(format!(
            "input '{name}': unsupported datatype '{}'",
            input.datatype
        ))
    })?;
    let shape = input
        .shape
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| {
            DecodeError(format!(
                "input '{name}': shape {:?} has a negative or oversized dimension",
                input.shape
            ))
        })?;
    let data = match (input.parameters.get("binary_data_size"), &input.data) {
        (Some(size), _) => {
            let size = size
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= binary.len())
                .ok_or_else(|| {
                    DecodeError(format!(
                        "input '{name}': binary_data_size {size} exceeds the {} binary bytes left",
                        binary.len()
                    ))
                })?;
            binary.split_to(size).to_vec()
        }
        (None, Some(data)) => {
            let mut flat = Vec::new();
            flatten(data, &mut flat);
            let expected = tensor::element_count(&shape).unwrap_or(usize::MAX);
            if flat.len() != expected {
                return Err(DecodeError(format!(
                    "input '{name}': shape {:?} needs {expected} values, got {}",
                    shape,
                    flat.len()
                )));
            }
            tensor::json::encode(name, dtype, &flat)?
        }
        (None, None) => {
            return Err(DecodeError(format!(
                "input '{name}' has neither data nor binary_data_size"
            )));
        }
    };
    Ok(HostTensor::new(name, dtype, shape, data)?)
}

/// Row-major flattening of nested JSON arrays.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::ShapeSpec;
    use serde_json::json;

    #[test]
    fn flatten_is_row_major() {
        let v = json!([[1, 2], [3, [4, 5]]]);
        let mut out = Vec::new();
        flatten(&v, &mut out);
        let got: Vec<i64> = out.iter().filter_map(|v| v.as_i64()).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn binary_split_respects_the_header_length() {
        let (json, bin) = split_binary(Some("3"), Bytes::from_static(b"abcdef")).expect("split");
        assert_eq!(&json[..], b"abc");
        assert_eq!(&bin[..], b"def");
        assert!(split_binary(Some("7"), Bytes::from_static(b"abcdef")).is_err());
        assert!(split_binary(Some("x"), Bytes::from_static(b"abcdef")).is_err());
    }

    #[test]
    fn a_request_decodes_json_and_binary_inputs_and_claims_every_byte() {
        let header = br#"{"inputs": [{"name": "a", "shape": [2], "datatype": "INT32", "data": [1, 2]},
            {"name": "b", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&1.5f32.to_le_bytes());
        let length = header.len().to_string();
        let (_, named) = decode(Some(&length), Bytes::from(body.clone())).expect("decodes");
        assert_eq!(named[0].1.data, [1i32.to_le_bytes(), 2i32.to_le_bytes()].concat());
        assert_eq!(named[1].1.data, 1.5f32.to_le_bytes());
        body.push(0);
        let error = decode(Some(&length), Bytes::from(body)).expect_err("a stray byte");
        assert!(error.0.contains("not claimed"), "{error:?}");
    }

    #[test]
    fn shape_display_matches_config_syntax() {
        assert_eq!(ShapeSpec(&[None, Some(3)]).to_string(), "[-1, 3]");
    }
}
