//! What a model takes and gives: its inputs' names, types, shapes and bounds, and its outputs.

use std::fmt;

use crate::tensor::{DType, HostTensor, ShapeSpec, TensorError, byte_len};

/// One named `forward` argument, in declaration order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    /// `None` marks a dynamic dimension (`-1` in the file).
    pub shape: Vec<Option<u32>>,
    /// A dynamic dimension that differs between requests of one batch: it is padded with
    /// `pad` to the longest in the batch.
    pub ragged: Option<Ragged>,
    /// The values the model can take (`min`/`max` in the file): anything else is refused before
    /// it is queued, so one caller's bad ids never reach a batch shared with others.
    pub range: Option<ValueRange>,
    /// Largest size of each dynamic dimension (`max_dims`, `-1` for no limit beyond the batch
    /// cap); fixed dimensions are checked exactly anyway. Same length as `shape`.
    pub max_dims: Vec<Option<u32>>,
}

impl InputSpec {
    /// An input with no value range and no dimension limits beyond its shape.
    pub fn new(name: &str, dtype: DType, shape: Vec<Option<u32>>, ragged: Option<Ragged>) -> InputSpec {
        let max_dims = vec![None; shape.len()];
        InputSpec {
            name: name.to_owned(),
            dtype,
            shape,
            ragged,
            range: None,
            max_dims,
        }
    }
}

/// Inclusive bounds on an input's values (either may be open).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

impl Eq for ValueRange {}

impl fmt::Display for ValueRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => write!(f, "{lo} ..= {hi}"),
            (Some(lo), None) => write!(f, ">= {lo}"),
            (None, Some(hi)) => write!(f, "<= {hi}"),
            (None, None) => f.write_str("any value"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ragged {
    pub dim: usize,
    pub pad: f64,
}

impl Eq for Ragged {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub name: String,
    /// The output dimension that follows the inputs' ragged dimension; it is cut back to each
    /// caller's own length.
    pub ragged_dim: Option<usize>,
}

/// The dtype and shape of one output, as seen at warm-up (batch dimension reported as dynamic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputMeta {
    pub name: String,
    pub dtype: DType,
    /// `None` where the dimension followed the batch (dimension 0).
    pub shape: Vec<Option<u32>>,
}

/// Zero-filled inputs with every dynamic dimension set to 1, for warm-up.
pub fn warmup_inputs(inputs: &[InputSpec]) -> Vec<HostTensor> {
    inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u32> = spec.shape.iter().map(|d| d.unwrap_or(1)).collect();
            let bytes = shape.iter().map(|&d| d as usize).product::<usize>() * spec.dtype.size();
            HostTensor {
                dtype: spec.dtype,
                shape,
                data: vec![0; bytes],
            }
        })
        .collect()
}

/// Output metadata from a warm-up result: dimension 0 is the batch and so dynamic.
pub fn output_meta(specs: &[OutputSpec], outputs: &[HostTensor]) -> Vec<OutputMeta> {
    specs
        .iter()
        .zip(outputs)
        .map(|(spec, t)| OutputMeta {
            name: spec.name.clone(),
            dtype: t.dtype,
            shape: t
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| (i != 0).then_some(d))
                .collect(),
        })
        .collect()
}

/// A tensor against an input's declaration: here, beside the declaration, so that the tensor
/// type knows nothing of signatures.
impl HostTensor {
    /// Checks dtype, rank and fixed dimensions against the model's declaration.
    pub fn check(&self, spec: &InputSpec) -> Result<(), TensorError> {
        let name = &spec.name;
        if self.dtype != spec.dtype {
            return Err(TensorError(format!(
                "input '{name}': expected dtype {}, got {}",
                spec.dtype, self.dtype
            )));
        }
        if self.shape.len() != spec.shape.len() {
            return Err(TensorError(format!(
                "input '{name}': expected rank {} (shape {}), got shape {:?}",
                spec.shape.len(),
                ShapeSpec(&spec.shape),
                self.shape
            )));
        }
        for (axis, (&got, want)) in self.shape.iter().zip(&spec.shape).enumerate() {
            match want {
                Some(w) if *w != got => {
                    return Err(TensorError(format!(
                        "input '{name}': dimension {axis} must be {w} (shape {}), got shape {:?}",
                        ShapeSpec(&spec.shape),
                        self.shape
                    )));
                }
                _ if got == 0 => {
                    return Err(TensorError(format!(
                        "input '{name}': dimension {axis} is 0; empty tensors are not accepted"
                    )));
                }
                _ => {}
            }
        }
        for (axis, (&got, limit)) in self.shape.iter().zip(&spec.max_dims).enumerate() {
            if let Some(limit) = limit.filter(|&limit| got > limit) {
                return Err(TensorError(format!(
                    "input '{name}': dimension {axis} is {got}, over the model's limit of {limit} (max_dims)"
                )));
            }
        }
        match byte_len(self.dtype, &self.shape) {
            Some(n) if n == self.data.len() => match spec.range {
                Some(range) => self.check_values(name, range),
                None => Ok(()),
            },
            Some(n) => Err(TensorError(format!(
                "input '{name}': {} tensor of shape {:?} needs {n} bytes, got {}",
                self.dtype,
                self.shape,
                self.data.len()
            ))),
            None => Err(TensorError(format!(
                "input '{name}': shape {:?} is too large",
                self.shape
            ))),
        }
    }

    /// The first element outside `range` (NaN is outside every range), named with its index.
    fn check_values(&self, name: &str, range: ValueRange) -> Result<(), TensorError> {
        let inside = |v: f64| range.min.is_none_or(|lo| v >= lo) && range.max.is_none_or(|hi| v <= hi) && !v.is_nan();
        match self.values().enumerate().find(|(_, v)| !inside(*v)) {
            None => Ok(()),
            Some((i, v)) => Err(TensorError(format!(
                "input '{name}': element {i} is {v}, outside the model's range {range} (min/max)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: DType, shape: &[i64]) -> InputSpec {
        let shape = shape.iter().map(|&d| (d >= 0).then_some(d as u32)).collect();
        InputSpec::new("x", dtype, shape, None)
    }

    #[test]
    fn check_names_the_input_and_what_differs() {
        let t = HostTensor::new("x", DType::F32, vec![2, 3], vec![0; 24]).expect("tensor");
        assert!(t.check(&spec(DType::F32, &[-1, 3])).is_ok());
        let e = t.check(&spec(DType::I64, &[-1, 3])).expect_err("dtype");
        assert_eq!(e.0, "input 'x': expected dtype INT64, got FP32");
        let e = t.check(&spec(DType::F32, &[-1, 3, 1])).expect_err("rank");
        assert_eq!(e.0, "input 'x': expected rank 3 (shape [-1, 3, 1]), got shape [2, 3]");
        let e = t.check(&spec(DType::F32, &[-1, 4])).expect_err("dim");
        assert_eq!(e.0, "input 'x': dimension 1 must be 4 (shape [-1, 4]), got shape [2, 3]");
        let empty = HostTensor::new("x", DType::F32, vec![0, 3], vec![]).expect("tensor");
        assert!(empty.check(&spec(DType::F32, &[-1, 3])).is_err());
        let short = HostTensor { dtype: DType::F32, shape: vec![2, 3], data: vec![0; 23] };
        let e = short.check(&spec(DType::F32, &[-1, 3])).expect_err("bytes");
        assert_eq!(e.0, "input 'x': FP32 tensor of shape [2, 3] needs 24 bytes, got 23");
    }

    fn i64s(shape: Vec<u32>, values: &[i64]) -> HostTensor {
        HostTensor { dtype: DType::I64, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    #[test]
    fn values_outside_the_declared_range_and_dimensions_over_their_limit_are_refused() {
        let mut ids = spec(DType::I64, &[-1, -1]);
        ids.range = Some(ValueRange { min: Some(0.0), max: Some(30521.0) });
        ids.max_dims = vec![None, Some(512)];
        assert!(i64s(vec![1, 3], &[101, 30521, 102]).check(&ids).is_ok());
        let e = i64s(vec![1, 3], &[101, 30522, 102]).check(&ids).expect_err("over max");
        assert_eq!(e.0, "input 'x': element 1 is 30522, outside the model's range 0 ..= 30521 (min/max)");
        let e = i64s(vec![2, 1], &[5, -1]).check(&ids).expect_err("under min");
        assert_eq!(e.0, "input 'x': element 1 is -1, outside the model's range 0 ..= 30521 (min/max)");
        assert!(i64s(vec![1, 512], &[0; 512]).check(&ids).is_ok());
        let e = i64s(vec![1, 600], &[0; 600]).check(&ids).expect_err("too long");
        assert_eq!(e.0, "input 'x': dimension 1 is 600, over the model's limit of 512 (max_dims)");
        let mut x = spec(DType::F32, &[-1, 2]);
        x.range = Some(ValueRange { min: None, max: Some(1.0) });
        let floats = |v: [f32; 2]| HostTensor { dtype: DType::F32, shape: vec![1, 2], data: v.iter().flat_map(|f| f.to_le_bytes()).collect() };
        assert!(floats([-5.0, 1.0]).check(&x).is_ok());
        assert!(floats([0.0, f32::NAN]).check(&x).is_err(), "NaN is outside every range");
        assert!(floats([0.0, 1.5]).check(&x).is_err());
    }
}
