//! Merging requests into one batch and splitting the results back: concatenation along the batch
//! dimension, padding of ragged dimensions, and slicing outputs back to each caller's rows and
//! length. Pure byte work, no libtorch, so it is tested exhaustively on its own.

use crate::signature::{InputSpec, OutputSpec};
use crate::tensor::{DType, HostTensor, byte_len};

/// What must match for two requests to share a batch: every input's dimensions except the
/// batch dimension and its ragged one.
pub fn compat_key(specs: &[InputSpec], inputs: &[HostTensor]) -> Vec<Vec<u32>> {
    specs
        .iter()
        .zip(inputs)
        .map(|(spec, t)| {
            t.shape
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(d, _)| spec.ragged.map(|r| r.dim) != Some(*d))
                .map(|(_, &n)| n)
                .collect()
        })
        .collect()
}

/// A request's length along the ragged dimension (taken from the first ragged input).
pub fn ragged_len(specs: &[InputSpec], inputs: &[HostTensor]) -> Option<u32> {
    specs
        .iter()
        .zip(inputs)
        .find_map(|(spec, t)| spec.ragged.map(|r| t.shape[r.dim]))
}

/// Little-endian bytes of one element of `dtype` with value `v`.
pub fn scalar_bytes(dtype: DType, v: f64) -> Vec<u8> {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => v.to_le_bytes().to_vec(),
        DType::U8 => vec![v as u8],
        DType::I32 => (v as i32).to_le_bytes().to_vec(),
        DType::I64 => (v as i64).to_le_bytes().to_vec(),
    }
}

/// `[rows, outer, len, inner]` view of a tensor around dimension `dim` (bytes for `inner`).
fn around(shape: &[u32], dim: usize, elem: usize) -> (usize, usize, usize, usize) {
    let rows = shape[0] as usize;
    let outer: usize = shape[1..dim].iter().map(|&d| d as usize).product();
    let len = shape[dim] as usize;
    let inner: usize = shape[dim + 1..].iter().map(|&d| d as usize).product::<usize>() * elem;
    (rows, outer, len, inner)
}

/// Concatenates each input of every request along dimension 0, padding ragged dimensions to the
/// longest in the batch. `requests[r][i]` is request r's input i, already checked against
/// `specs` and sharing one [`compat_key`].
pub fn merge(specs: &[InputSpec], requests: &[&[HostTensor]]) -> Vec<HostTensor> {
    specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let parts: Vec<&HostTensor> = requests.iter().map(|r| &r[i]).collect();
            let first = parts[0];
            let rows: u32 = parts.iter().map(|t| t.shape[0]).sum();
            let mut shape = first.shape.clone();
            shape[0] = rows;
            match spec.ragged {
                None => {
                    let mut data = Vec::with_capacity(parts.iter().map(|t| t.data.len()).sum());
                    for t in &parts {
                        data.extend_from_slice(&t.data);
                    }
                    HostTensor { dtype: first.dtype, shape, data }
                }
                Some(ragged) => {
                    let longest = parts.iter().map(|t| t.shape[ragged.dim]).max().unwrap_or(0);
                    shape[ragged.dim] = longest;
                    let elem = first.dtype.size();
                    let pad = scalar_bytes(first.dtype, ragged.pad);
                    let mut data = Vec::with_capacity(
                        crate::tensor::byte_len(first.dtype, &shape).unwrap_or(0),
                    );
                    for t in &parts {
                        let (rows, outer, len, inner) = around(&t.shape, ragged.dim, elem);
                        let missing = (longest as usize - len) * inner / elem;
                        for block in 0..rows * outer {
                            let at = block * len * inner;
                            data.extend_from_slice(&t.data[at..at + len * inner]);
                            for _ in 0..missing {
                                data.extend_from_slice(&pad);
                            }
                        }
                    }
                    HostTensor { dtype: first.dtype, shape, data }
                }
            }
        })
        .collect()
}

/// Splits batch outputs back to requests: `rows[r]` rows each, and outputs that carry the
/// ragged dimension cut to `lens[r]`. A malformed output (wrong row count) is an error message.
pub fn split(
    outputs: Vec<HostTensor>,
    specs: &[OutputSpec],
    rows: &[u32],
    lens: &[Option<u32>],
) -> Result<Vec<Vec<HostTensor>>, String> {
    let total: u32 = rows.iter().sum();
    let mut per_request: Vec<Vec<HostTensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for (spec, out) in specs.iter().zip(outputs) {
        // A backend's output is checked like a caller's input: bytes that do not fill the
        // shape would be read past.
        if byte_len(out.dtype, &out.shape) != Some(out.data.len()) {
            return Err(format!(
                "output '{}' has {} bytes, which is not a {} tensor of shape {:?}",
                spec.name,
                out.data.len(),
                out.dtype,
                out.shape
            ));
        }
        if out.shape.first().copied() != Some(total) {
            return Err(format!(
                "output '{}' has shape {:?}, but the batch has {total} rows",
                spec.name, out.shape
            ));
        }
        let elem = out.dtype.size();
        let row_bytes = out.data.len() / total.max(1) as usize;
        let mut start = 0usize;
        for (r, (&n, &len)) in rows.iter().zip(lens).enumerate() {
            let bytes = &out.data[start * row_bytes..(start + n as usize) * row_bytes];
            start += n as usize;
            let mut shape = out.shape.clone();
            shape[0] = n;
            let tensor = match (spec.ragged_dim, len) {
                (Some(dim), Some(len)) if dim < shape.len() && shape[dim] > len => {
                    let (rows_n, outer, full, inner) = around(&shape, dim, elem);
                    let keep = len as usize * inner;
                    let mut data = Vec::with_capacity(rows_n * outer * keep);
                    for block in 0..rows_n * outer {
                        let at = block * full * inner;
                        data.extend_from_slice(&bytes[at..at + keep]);
                    }
                    shape[dim] = len;
                    HostTensor { dtype: out.dtype, shape, data }
                }
                _ => HostTensor { dtype: out.dtype, shape, data: bytes.to_vec() },
            };
            per_request[r].push(tensor);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signature::Ragged;

    /// Found by `fuzz/fuzz_targets/batch.rs`: a ragged output whose bytes do not fill its
    /// shape made split read past them (a panic on the replica's thread).
    #[test]
    fn an_output_whose_bytes_do_not_fill_its_shape_is_an_error() {
        let specs = [OutputSpec { name: "hidden".into(), ragged_dim: Some(1) }];
        let short = HostTensor { dtype: DType::I64, shape: vec![1, 21], data: Vec::new() };
        let error = split(vec![short], &specs, &[1], &[Some(1)]).expect_err("no bytes for 21 values");
        assert!(error.contains("output 'hidden' has 0 bytes"), "{error}");
        let odd = HostTensor { dtype: DType::I64, shape: vec![2, 1], data: vec![0; 12] };
        assert!(split(vec![odd], &specs, &[1, 1], &[None, None]).is_err());
    }

    fn i64s(shape: &[u32], v: &[i64]) -> HostTensor {
        HostTensor {
            dtype: DType::I64,
            shape: shape.to_vec(),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn values(t: &HostTensor) -> Vec<i64> {
        t.data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    fn spec(ragged: Option<usize>) -> InputSpec {
        InputSpec::new("ids", DType::I64, vec![None, None, Some(2)], ragged.map(|dim| Ragged { dim, pad: -1.0 }))
    }

    #[test]
    fn plain_inputs_concatenate_along_rows() {
        let specs = [spec(None)];
        let a = [i64s(&[1, 1, 2], &[1, 2])];
        let b = [i64s(&[2, 1, 2], &[3, 4, 5, 6])];
        let merged = merge(&specs, &[&a, &b]);
        assert_eq!(merged[0].shape, vec![3, 1, 2]);
        assert_eq!(values(&merged[0]), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn ragged_inputs_pad_to_the_longest_and_outputs_cut_back() {
        let specs = [spec(Some(1))];
        let a = [i64s(&[1, 1, 2], &[1, 2])];
        let b = [i64s(&[1, 3, 2], &[3, 4, 5, 6, 7, 8])];
        let merged = merge(&specs, &[&a, &b]);
        assert_eq!(merged[0].shape, vec![2, 3, 2]);
        assert_eq!(values(&merged[0]), vec![1, 2, -1, -1, -1, -1, 3, 4, 5, 6, 7, 8]);
        assert_eq!(compat_key(&specs, &a), compat_key(&specs, &b));
        assert_eq!(ragged_len(&specs, &a), Some(1));

        // An output that follows the ragged dimension, and one that does not.
        let outs = [
            OutputSpec { name: "h".into(), ragged_dim: Some(1) },
            OutputSpec { name: "p".into(), ragged_dim: None },
        ];
        let split = split(
            vec![merged[0].clone(), i64s(&[2, 1], &[10, 20])],
            &outs,
            &[1, 1],
            &[Some(1), Some(3)],
        )
        .expect("split");
        assert_eq!(split[0][0].shape, vec![1, 1, 2]);
        assert_eq!(values(&split[0][0]), vec![1, 2]);
        assert_eq!(split[1][0].shape, vec![1, 3, 2]);
        assert_eq!(values(&split[1][0]), vec![3, 4, 5, 6, 7, 8]);
        assert_eq!(values(&split[0][1]), vec![10]);
        assert_eq!(values(&split[1][1]), vec![20]);
    }

    #[test]
    fn different_fixed_dims_are_not_compatible() {
        let specs = [spec(Some(1))];
        let a = [i64s(&[1, 1, 2], &[1, 2])];
        let b = [i64s(&[1, 1, 3], &[1, 2, 3])];
        assert_ne!(compat_key(&specs, &a), compat_key(&specs, &b));
    }

    #[test]
    fn a_wrong_row_count_is_an_error() {
        let outs = [OutputSpec { name: "y".into(), ragged_dim: None }];
        let err = split(vec![i64s(&[3], &[1, 2, 3])], &outs, &[1, 1], &[None, None]).expect_err("rows");
        assert!(err.contains("output 'y'"), "{err}");
    }

    #[test]
    fn pad_values_encode_in_every_dtype() {
        for dtype in DType::ALL {
            assert_eq!(scalar_bytes(dtype, 1.0).len(), dtype.size(), "{dtype}");
        }
        assert_eq!(scalar_bytes(DType::I64, -1.0), (-1i64).to_le_bytes());
    }
}
