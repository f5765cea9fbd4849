//! What a model takes and gives: its inputs' names, types, shapes and bounds, and its outputs.

use std::fmt;

use crate::tensor::{DType, HostTensor};

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
