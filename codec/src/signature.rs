//! What a model takes and gives: its inputs' names, types, shapes and bounds, and its outputs.

use std::fmt;

use crate::tensor::{DType, Declared, HostTensor, TensorError, byte_len};

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
        let input = || spec.name.clone();
        if self.dtype != spec.dtype {
            return Err(TensorError::DType { input: input(), expected: spec.dtype, got: self.dtype });
        }
        let declared = || Declared(spec.shape.clone());
        if self.shape.len() != spec.shape.len() {
            return Err(TensorError::Rank { input: input(), declared: declared(), got: self.shape.clone() });
        }
        for (axis, (want, &got)) in spec.shape.iter().zip(&self.shape).enumerate() {
            match want {
                Some(want) if *want != got => {
                    return Err(TensorError::Dimension {
                        input: input(),
                        axis,
                        want: *want,
                        declared: declared(),
                        got: self.shape.clone(),
                    });
                }
                _ if got == 0 => return Err(TensorError::Empty { input: input(), axis }),
                _ => {}
            }
        }
        for (axis, (&got, limit)) in self.shape.iter().zip(&spec.max_dims).enumerate() {
            if let Some(limit) = limit.filter(|&limit| got > limit) {
                return Err(TensorError::OverMaxDims { input: input(), axis, got, limit });
            }
        }
        match byte_len(self.dtype, &self.shape) {
            Some(n) if n == self.data.len() => match spec.range {
                Some(range) => self.check_values(&spec.name, range),
                None => Ok(()),
            },
            Some(needs) => Err(TensorError::Bytes {
                input: input(),
                dtype: self.dtype,
                shape: self.shape.clone(),
                needs,
                got: self.data.len(),
            }),
            None => Err(TensorError::TooLarge { input: input(), shape: self.shape.clone() }),
        }
    }

    /// The first element outside `range` (NaN is outside every range), named with its index.
    fn check_values(&self, name: &str, range: ValueRange) -> Result<(), TensorError> {
        let inside = |v: f64| range.min.is_none_or(|lo| v >= lo) && range.max.is_none_or(|hi| v <= hi) && !v.is_nan();
        match self.values().enumerate().find(|(_, v)| !inside(*v)) {
            None => Ok(()),
            Some((index, value)) => Err(TensorError::OutOfRange {
                input: name.to_owned(),
                index,
                value: value.to_string(),
                range: range.to_string(),
            }),
        }
    }
}

/// A request's inputs, sent by name, checked against the model's declared inputs and returned
/// in declaration order, as `forward`'s positional arguments: every declared input once and no
/// other, each fitting its declaration, all with the same rows (at most `max_rows`) and every
/// ragged one of the same length.
pub fn arrange_inputs(
    model: &str,
    specs: &[InputSpec],
    max_rows: u32,
    mut named: Vec<(String, HostTensor)>,
) -> Result<Vec<HostTensor>, TensorError> {
    if let Some((name, _)) = named.iter().find(|(name, _)| !specs.iter().any(|s| &s.name == name)) {
        return Err(TensorError::Unknown {
            input: name.clone(),
            model: model.to_owned(),
            expected: specs.iter().map(|s| s.name.clone()).collect(),
        });
    }
    let mut ordered = Vec::with_capacity(specs.len());
    for spec in specs {
        let Some(at) = named.iter().position(|(name, _)| name == &spec.name) else {
            return Err(TensorError::Missing { input: spec.name.clone() });
        };
        let (_, tensor) = named.swap_remove(at);
        tensor.check(spec)?;
        ordered.push(tensor);
    }
    if let Some((input, _)) = named.into_iter().next() {
        return Err(TensorError::Repeated { input });
    }
    let (Some(first), Some(first_tensor)) = (specs.first(), ordered.first()) else {
        return Ok(ordered);
    };
    let rows = first_tensor.rows();
    if rows > max_rows {
        return Err(TensorError::TooManyRows { input: first.name.clone(), rows, model: model.to_owned(), limit: max_rows });
    }
    if let Some((spec, t)) = specs.iter().zip(&ordered).find(|(_, t)| t.rows() != rows) {
        return Err(TensorError::RowsDiffer { input: spec.name.clone(), rows: t.rows(), first: first.name.clone(), first_rows: rows });
    }
    let lens: Vec<(&str, u32)> = specs
        .iter()
        .zip(&ordered)
        .filter_map(|(s, t)| s.ragged.map(|r| (s.name.as_str(), t.shape[r.dim])))
        .collect();
    if let Some(&(input, len)) = lens.iter().find(|(_, len)| *len != lens[0].1) {
        return Err(TensorError::RaggedDiffers {
            input: input.to_owned(),
            len,
            first: lens[0].0.to_owned(),
            first_len: lens[0].1,
        });
    }
    Ok(ordered)
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
        assert_eq!(e.to_string(), "input 'x': expected dtype INT64, got FP32");
        let e = t.check(&spec(DType::F32, &[-1, 3, 1])).expect_err("rank");
        assert_eq!(e.to_string(), "input 'x': expected rank 3 (shape [-1, 3, 1]), got shape [2, 3]");
        let e = t.check(&spec(DType::F32, &[-1, 4])).expect_err("dim");
        assert_eq!(e.to_string(), "input 'x': dimension 1 must be 4 (shape [-1, 4]), got shape [2, 3]");
        let empty = HostTensor::new("x", DType::F32, vec![0, 3], vec![]).expect("tensor");
        assert!(empty.check(&spec(DType::F32, &[-1, 3])).is_err());
        let short = HostTensor { dtype: DType::F32, shape: vec![2, 3], data: vec![0; 23] };
        let e = short.check(&spec(DType::F32, &[-1, 3])).expect_err("bytes");
        assert_eq!(e.to_string(), "input 'x': FP32 tensor of shape [2, 3] needs 24 bytes, got 23");
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
        assert_eq!(e.to_string(), "input 'x': element 1 is 30522, outside the model's range 0 ..= 30521 (min/max)");
        let e = i64s(vec![2, 1], &[5, -1]).check(&ids).expect_err("under min");
        assert_eq!(e.to_string(), "input 'x': element 1 is -1, outside the model's range 0 ..= 30521 (min/max)");
        assert!(i64s(vec![1, 512], &[0; 512]).check(&ids).is_ok());
        let e = i64s(vec![1, 600], &[0; 600]).check(&ids).expect_err("too long");
        assert_eq!(e.to_string(), "input 'x': dimension 1 is 600, over the model's limit of 512 (max_dims)");
        let mut x = spec(DType::F32, &[-1, 2]);
        x.range = Some(ValueRange { min: None, max: Some(1.0) });
        let floats = |v: [f32; 2]| HostTensor { dtype: DType::F32, shape: vec![1, 2], data: v.iter().flat_map(|f| f.to_le_bytes()).collect() };
        assert!(floats([-5.0, 1.0]).check(&x).is_ok());
        assert!(floats([0.0, f32::NAN]).check(&x).is_err(), "NaN is outside every range");
        assert!(floats([0.0, 1.5]).check(&x).is_err());
    }

    /// Each way a request's set of inputs can be wrong, with the input it names.
    #[test]
    fn inputs_are_arranged_in_declaration_order_and_every_mismatch_names_its_input() {
        let ragged = Some(Ragged { dim: 1, pad: 0.0 });
        let specs = [
            InputSpec::new("ids", DType::I64, vec![None, None], ragged),
            InputSpec::new("mask", DType::I64, vec![None, None], ragged),
        ];
        let arrange = |named: Vec<(&str, HostTensor)>| {
            let named = named.into_iter().map(|(n, t)| (n.to_owned(), t)).collect();
            arrange_inputs("m", &specs, 4, named)
        };
        let ids = i64s(vec![2, 3], &[1, 2, 3, 4, 5, 6]);
        let mask = i64s(vec![2, 3], &[1; 6]);
        let arranged = arrange(vec![("mask", mask.clone()), ("ids", ids.clone())]).expect("arranged");
        assert_eq!(arranged, vec![ids.clone(), mask.clone()], "declaration order, not the order sent");

        let e = arrange(vec![("ids", ids.clone()), ("mask", mask.clone()), ("extra", mask.clone())]).expect_err("unknown");
        assert_eq!(e.to_string(), r#"input 'extra' is not an input of model 'm' (expected ["ids", "mask"])"#);
        let e = arrange(vec![("ids", ids.clone())]).expect_err("missing");
        assert_eq!(e, TensorError::Missing { input: "mask".to_owned() });
        let e = arrange(vec![("ids", ids.clone()), ("mask", mask.clone()), ("ids", ids.clone())]).expect_err("twice");
        assert_eq!(e, TensorError::Repeated { input: "ids".to_owned() });
        let e = arrange(vec![("ids", i64s(vec![5, 1], &[0; 5])), ("mask", i64s(vec![5, 1], &[1; 5]))]).expect_err("rows");
        assert_eq!(e.to_string(), "input 'ids': 5 rows, over model 'm''s limit of 4 rows per request (max_rows)");
        let e = arrange(vec![("ids", ids.clone()), ("mask", i64s(vec![1, 3], &[1; 3]))]).expect_err("rows differ");
        assert_eq!(e.to_string(), "input 'mask': batch dimension is 1 but input 'ids' has 2");
        let e = arrange(vec![("ids", ids), ("mask", i64s(vec![2, 2], &[1; 4]))]).expect_err("lengths differ");
        assert_eq!(e.input(), "mask");
        assert_eq!(e.to_string(), "input 'mask': ragged length 2 differs from input 'ids' (3)");
        let e = arrange(vec![("ids", mask.clone()), ("mask", HostTensor { dtype: DType::F32, ..mask })]).expect_err("dtype");
        assert_eq!(e, TensorError::DType { input: "mask".to_owned(), expected: DType::I64, got: DType::F32 });
    }
}
