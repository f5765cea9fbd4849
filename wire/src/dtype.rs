//! Tensor element types, shared by the runtime, the guest SDK and clients: one definition, one
//! set of names.

use std::fmt;

/// Element types Kiln carries. Wire names follow the Open Inference Protocol; wasi:nn's
/// `tensor-type` maps one to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// bfloat16.
    BF16,
    /// Unsigned byte.
    U8,
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F16,
        DType::F32,
        DType::F64,
        DType::BF16,
        DType::U8,
        DType::I32,
        DType::I64,
    ];

    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// A floating-point type (cast to a model's precision on the way in).
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::F32 | DType::F64 | DType::BF16)
    }

    /// The Open Inference Protocol name (`FP32`, `INT64`, ...).
    pub const fn wire_name(self) -> &'static str {
        match self {
            DType::F16 => "FP16",
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::BF16 => "BF16",
            DType::U8 => "UINT8",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
        }
    }

    /// Accepts the OIP names and wasi:nn's shorter ones (`I64`, `U8`).
    pub fn from_wire_name(name: &str) -> Option<DType> {
        Some(match name {
            "FP16" => DType::F16,
            "FP32" => DType::F32,
            "FP64" => DType::F64,
            "BF16" => DType::BF16,
            "UINT8" | "U8" => DType::U8,
            "INT32" | "I32" => DType::I32,
            "INT64" | "I64" => DType::I64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// Elements in a tensor of this shape, or `None` on overflow: the one count the server and the
/// guest SDK both check tensors against.
pub fn element_count(shape: &[u32]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize))
}

/// Bytes a tensor of this dtype and shape must have, or `None` on overflow.
pub fn byte_len(dtype: DType, shape: &[u32]) -> Option<usize> {
    element_count(shape)?.checked_mul(dtype.size())
}
