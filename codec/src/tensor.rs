//! Host-side tensors: element types, byte sizes, and checks against a model's declared inputs.
//!
//! A [`HostTensor`] is plain bytes plus a dtype and shape; it is what crosses between the sandbox,
//! the HTTP API and the backend. Nothing here depends on libtorch.

use std::fmt;


pub use kiln_wire::DType;

/// A dense, row-major tensor in host memory.
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    pub dtype: DType,
    pub shape: Vec<u32>,
    pub data: Vec<u8>,
}

impl fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("bytes", &self.data.len())
            .finish()
    }
}

/// Why a request's tensors do not fit the model they were sent to. Each names the input it is
/// about ([`TensorError::input`]) and says what is wrong, for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("input '{input}': expected dtype {expected}, got {got}")]
    DType { input: String, expected: DType, got: DType },
    #[error("input '{input}': expected rank {} (shape {declared}), got shape {got:?}", .declared.rank())]
    Rank { input: String, declared: Declared, got: Vec<u32> },
    #[error("input '{input}': dimension {axis} must be {want} (shape {declared}), got shape {got:?}")]
    Dimension { input: String, axis: usize, want: u32, declared: Declared, got: Vec<u32> },
    #[error("input '{input}': dimension {axis} is 0; empty tensors are not accepted")]
    Empty { input: String, axis: usize },
    #[error("input '{input}': dimension {axis} is {got}, over the model's limit of {limit} (max_dims)")]
    OverMaxDims { input: String, axis: usize, got: u32, limit: u32 },
    #[error("input '{input}': {dtype} tensor of shape {shape:?} needs {needs} bytes, got {got}")]
    Bytes { input: String, dtype: DType, shape: Vec<u32>, needs: usize, got: usize },
    #[error("input '{input}': shape {shape:?} is too large")]
    TooLarge { input: String, shape: Vec<u32> },
    /// An element the model's declared `min`/`max` does not allow (`range` as declared).
    #[error("input '{input}': element {index} is {value}, outside the model's range {range} (min/max)")]
    OutOfRange { input: String, index: usize, value: String, range: String },
    /// A JSON element that is not a number of the input's type.
    #[error("input '{input}': element {index} ({value}) is not a valid {dtype} value")]
    NotOfType { input: String, index: usize, value: String, dtype: DType },
    #[error("input '{input}' is not an input of model '{model}' (expected {expected:?})")]
    Unknown { input: String, model: String, expected: Vec<String> },
    #[error("input '{input}' is missing")]
    Missing { input: String },
    #[error("input '{input}' was given more than once")]
    Repeated { input: String },
    #[error("input '{input}': {rows} rows, over model '{model}''s limit of {limit} rows per request (max_rows)")]
    TooManyRows { input: String, rows: u32, model: String, limit: u32 },
    #[error("input '{input}': batch dimension is {rows} but input '{first}' has {first_rows}")]
    RowsDiffer { input: String, rows: u32, first: String, first_rows: u32 },
    #[error("input '{input}': ragged length {len} differs from input '{first}' ({first_len})")]
    RaggedDiffers { input: String, len: u32, first: String, first_len: u32 },
}

impl TensorError {
    /// The input the error is about.
    pub fn input(&self) -> &str {
        match self {
            TensorError::DType { input, .. }
            | TensorError::Rank { input, .. }
            | TensorError::Dimension { input, .. }
            | TensorError::Empty { input, .. }
            | TensorError::OverMaxDims { input, .. }
            | TensorError::Bytes { input, .. }
            | TensorError::TooLarge { input, .. }
            | TensorError::OutOfRange { input, .. }
            | TensorError::NotOfType { input, .. }
            | TensorError::Unknown { input, .. }
            | TensorError::Missing { input }
            | TensorError::Repeated { input }
            | TensorError::TooManyRows { input, .. }
            | TensorError::RowsDiffer { input, .. }
            | TensorError::RaggedDiffers { input, .. } => input,
        }
    }
}

/// A declared shape as an error shows it: `[-1, 3]`, with `-1` for a dimension that varies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared(pub Vec<Option<u32>>);

impl Declared {
    pub fn rank(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for Declared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        ShapeSpec(&self.0).fmt(f)
    }
}

pub use kiln_wire::dtype::{byte_len, element_count};

impl HostTensor {
    /// Builds a tensor after checking that `data` has exactly the bytes `shape` needs.
    pub fn new(
        name: &str,
        dtype: DType,
        shape: Vec<u32>,
        data: Vec<u8>,
    ) -> Result<HostTensor, TensorError> {
        let Some(needs) = byte_len(dtype, &shape) else {
            return Err(TensorError::TooLarge { input: name.to_owned(), shape });
        };
        if data.len() != needs {
            return Err(TensorError::Bytes { input: name.to_owned(), dtype, shape, needs, got: data.len() });
        }
        Ok(HostTensor { dtype, shape, data })
    }

    /// Rows along the batch (first) dimension.
    pub fn rows(&self) -> u32 {
        self.shape.first().copied().unwrap_or(1)
    }
}

impl HostTensor {
    /// Every element as an `f64` (exact for every integer a model can take as an index).
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        let size = self.dtype.size();
        self.data.chunks_exact(size).map(move |c| match self.dtype {
            DType::U8 => f64::from(c[0]),
            DType::I32 => f64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::I64 => i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64,
            DType::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::F64 => f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            DType::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f64(),
        })
    }
}

/// Formats a declared shape the way the config writes it: `[-1, 1, 8, 8]`.
pub struct ShapeSpec<'a>(pub &'a [Option<u32>]);

impl fmt::Display for ShapeSpec<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match d {
                Some(d) => write!(f, "{d}")?,
                None => f.write_str("-1")?,
            }
        }
        f.write_str("]")
    }
}

/// Little-endian encoding of JSON numbers into tensor bytes and back, for the OIP JSON API.
pub mod json {
    use super::{DType, TensorError};
    use half::{bf16, f16};
    use serde_json::Value;

    /// Appends `values` (flattened, row-major) as `dtype` bytes. Integers must be integral and in
    /// range; floats are rounded to the target precision.
    pub fn encode(name: &str, dtype: DType, values: &[&Value]) -> Result<Vec<u8>, TensorError> {
        let mut out = Vec::with_capacity(values.len() * dtype.size());
        for (i, v) in values.iter().enumerate() {
            let bad = || TensorError::NotOfType { input: name.to_owned(), index: i, value: v.to_string(), dtype };
            match dtype {
                DType::F32 => out.extend((v.as_f64().ok_or_else(bad)? as f32).to_le_bytes()),
                DType::F64 => out.extend(v.as_f64().ok_or_else(bad)?.to_le_bytes()),
                DType::F16 => out.extend(f16::from_f64(v.as_f64().ok_or_else(bad)?).to_le_bytes()),
                DType::BF16 => {
                    out.extend(bf16::from_f64(v.as_f64().ok_or_else(bad)?).to_le_bytes())
                }
                DType::U8 => {
                    let n = v.as_u64().filter(|n| *n <= u8::MAX as u64).ok_or_else(bad)?;
                    out.push(n as u8);
                }
                DType::I32 => {
                    let n = v.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(bad)?;
                    out.extend(n.to_le_bytes());
                }
                DType::I64 => out.extend(v.as_i64().ok_or_else(bad)?.to_le_bytes()),
            }
        }
        Ok(out)
    }

    /// Decodes little-endian tensor bytes into JSON numbers.
    pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<Value> {
        let chunks = bytes.chunks_exact(dtype.size());
        match dtype {
            DType::F32 => chunks
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .map(float)
                .collect(),
            DType::F64 => chunks
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .map(float)
                .collect(),
            DType::F16 => chunks
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .map(float)
                .collect(),
            DType::BF16 => chunks
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .map(float)
                .collect(),
            DType::U8 => bytes.iter().map(|&b| Value::from(b)).collect(),
            DType::I32 => chunks
                .map(|c| Value::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
            DType::I64 => chunks
                .map(|c| {
                    Value::from(i64::from_le_bytes([
                        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                    ]))
                })
                .collect(),
        }
    }

    /// JSON has no NaN or infinity; they become `null` rather than an invalid document.
    fn float(x: f64) -> Value {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_sizes_match_each_dtype() {
        let expected = [
            (DType::F16, 2),
            (DType::F32, 4),
            (DType::F64, 8),
            (DType::BF16, 2),
            (DType::U8, 1),
            (DType::I32, 4),
            (DType::I64, 8),
        ];
        for (dtype, size) in expected {
            assert_eq!(dtype.size(), size, "{dtype}");
            assert_eq!(byte_len(dtype, &[2, 3]), Some(6 * size), "{dtype}");
            assert!(HostTensor::new("x", dtype, vec![2, 3], vec![0; 6 * size]).is_ok());
            let err = HostTensor::new("x", dtype, vec![2, 3], vec![0; 6 * size - 1])
                .expect_err("one byte short must be refused");
            assert!(matches!(&err, TensorError::Bytes { input, needs, got, .. } if input == "x" && *needs == 6 * size && *got + 1 == *needs), "{err}");
        }
    }

    #[test]
    fn wire_names_round_trip_and_accept_wasi_nn_aliases() {
        for dtype in DType::ALL {
            assert_eq!(DType::from_wire_name(dtype.wire_name()), Some(dtype));
        }
        assert_eq!(DType::from_wire_name("I64"), Some(DType::I64));
        assert_eq!(DType::from_wire_name("U8"), Some(DType::U8));
        assert_eq!(DType::from_wire_name("float32"), None);
    }

    #[test]
    fn overflowing_shape_is_an_error_not_a_panic() {
        let err = HostTensor::new("x", DType::F64, vec![u32::MAX, u32::MAX, u32::MAX], vec![])
            .expect_err("overflow");
        assert!(matches!(&err, TensorError::TooLarge { input, .. } if input == "x"), "{err}");
        assert_eq!(err.to_string(), "input 'x': shape [4294967295, 4294967295, 4294967295] is too large");
    }

    #[test]
    fn json_round_trip_for_every_dtype() {
        let values = [json!(0), json!(1), json!(2), json!(100)];
        let values: Vec<&serde_json::Value> = values.iter().collect();
        for dtype in DType::ALL {
            let bytes = json::encode("x", dtype, &values).expect("encode");
            assert_eq!(bytes.len(), values.len() * dtype.size(), "{dtype}");
            let back = json::decode(dtype, &bytes);
            let back: Vec<f64> = back.iter().map(|v| v.as_f64().expect("number")).collect();
            assert_eq!(back, vec![0.0, 1.0, 2.0, 100.0], "{dtype}");
        }
    }

    #[test]
    fn json_encoding_is_little_endian_and_rounds_half_precision() {
        assert_eq!(
            json::encode("x", DType::F32, &[&json!(1.0)]).expect("f32"),
            1.0f32.to_le_bytes()
        );
        assert_eq!(
            json::encode("x", DType::I64, &[&json!(-2)]).expect("i64"),
            (-2i64).to_le_bytes()
        );
        // 0.1 is not exact in fp16; the nearest fp16 value comes back.
        let b = json::encode("x", DType::F16, &[&json!(0.1)]).expect("f16");
        let back = json::decode(DType::F16, &b)[0].as_f64().expect("number");
        assert!((back - 0.1).abs() < 1e-4, "{back}");
        let b = json::encode("x", DType::BF16, &[&json!(3.0)]).expect("bf16");
        assert_eq!(b, half::bf16::from_f32(3.0).to_le_bytes());
    }

    #[test]
    fn json_refuses_out_of_range_integers() {
        let err = json::encode("ids", DType::U8, &[&json!(256)]).expect_err("256 is not a u8");
        assert!(matches!(&err, TensorError::NotOfType { index: 0, dtype: DType::U8, .. }), "{err}");
        assert_eq!(err.to_string(), "input 'ids': element 0 (256) is not a valid UINT8 value");
        assert!(json::encode("ids", DType::I32, &[&json!(1.5)]).is_err());
        assert!(json::encode("ids", DType::F32, &[&json!("1")]).is_err());
    }
}
