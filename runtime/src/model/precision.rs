//! `precision = "auto"`: the fastest precision that keeps a model's answers, chosen by measuring
//! at load.
//!
//! Peers leave the precision to whoever exports the model, who rarely knows the machine it will
//! serve on: bf16 weights run a transformer three times faster on a CPU with AMX and slower on
//! one with only AVX2. Kiln loads every model itself, so it can measure instead of guessing.
//! Before a model's first replica loads, [`search`] loads it in FP32 and in each candidate
//! precision the device may run faster, runs them on the same inputs (drawn from the declared
//! signature, plus the model's calibration files), drops every candidate whose outputs stray
//! past the [`Tolerance`], times the rest against FP32 at the batch sizes the scheduler forms,
//! and picks the fastest that beats FP32 by a clear margin; else FP32. The search runs once per
//! model and kind of device, within a time budget; every replica then loads what it chose.
//!
//! Backend-generic, like the scheduler: it loads through [`Backend::load`], so a tenant's model
//! is searched in its confined worker processes, and the logic is tested on a scripted backend.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_wire::PrecisionChoice;

use crate::model::backend::{Backend, BackendError, LoadedModel, forward_guarded};
use crate::model::batch::scalar_bytes;
use crate::model::device::Device;
use crate::model::signature::{InputSpec, arrange_inputs};
use crate::model::spec::{AutoPrecision, Form, ModelConfig, Precision, Tolerance};
use crate::model::tensor::HostTensor;

/// A candidate must be this much faster than FP32 to be served instead: a smaller gain is
/// within the noise of a few timed passes, and not worth any drift.
pub const MIN_SPEEDUP: f64 = 1.1;
/// A candidate this much slower than FP32 on one row is not timed on a full batch: reduced
/// precision that pays anywhere pays on one row too (bf16 on a CPU without native bf16 runs a
/// transformer 3-9× slower).
const GIVE_UP: f64 = 0.5;
/// Rounds of timing per batch size, after the comparison's untimed passes; each side's
/// quickest counts.
const TIMED_RUNS: usize = 3;
/// The least one timing lasts: shorter passes are timed several at a time.
const MIN_TIMED: Duration = Duration::from_millis(2);
/// The most passes in one timing.
const MAX_GROUP: u32 = 1000;
/// Length given to a dynamic dimension other than the batch (a sentence's tokens, an image's
/// side) in the inputs drawn from the signature, unless its `max_dims` is smaller.
const DYNAMIC_LEN: u32 = 16;
/// The larger batch size timed, unless the model's `max_batch_size` is smaller.
const LARGE_BATCH: u32 = 16;

/// What the search chose, and the report of it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub form: Form,
    pub report: PrecisionChoice,
    /// Where it was measured: the CPU or a GPU.
    pub device: Device,
}

impl Decision {
    pub fn on_gpu(&self) -> bool {
        self.device.is_gpu()
    }
}

/// The forms worth trying for `config` on `device`, most promising first.
pub fn candidates(config: &ModelConfig, device: Device) -> Vec<Form> {
    use Precision::*;
    let precisions = match device {
        // bf16 has FP32's range (no overflow to guard) and runs natively with AVX-512 BF16 or
        // AMX; fp16 matmuls are native only with AVX-512 FP16, but measuring costs little.
        // Autocast comes last: it casts the weights again on every pass, so it wins only where
        // bf16 weights drift past the tolerance and keeping the weights no matrix product uses
        // (embeddings, norms' scales) in FP32 brings them back.
        Device::Cpu => [Bf16, Fp16, Bf16Autocast],
        // Tensor cores take both; fp16 is the more widely fast.
        Device::Cuda(_) => [Fp16, Bf16, Bf16Autocast],
    };
    let mut forms: Vec<Form> = precisions.into_iter().map(Form::new).collect();
    if config.takes_images() {
        // Convolutions run faster on channels-last weights and images (oneDNN, cuDNN); FP32 so
        // laid out changes no value, so it goes first, then with the precision most likely to
        // pay.
        forms.insert(0, Form::channels_last(Fp32));
        forms.insert(2, Form::channels_last(precisions[0]));
    }
    forms
}

/// How one candidate fared.
enum Outcome {
    /// Within tolerance: its speed over FP32 and its worst agreement.
    Kept { speedup: f64, worst: Agreement },
    /// An output strayed past its tolerance.
    Drifted { output: String, worst: Agreement, allowed: Tolerance, allowed_abs: f64 },
    /// It did not load or run (an op without a kernel in that precision, say).
    Failed(String),
    /// The budget was spent before it could be tried.
    NotTried,
}

/// How closely one set of outputs follows FP32's: the lowest cosine similarity of any row and
/// the largest difference of any value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Agreement {
    pub cosine: f64,
    pub max_abs: f64,
}

impl Agreement {
    const EXACT: Agreement = Agreement { cosine: 1.0, max_abs: 0.0 };

    fn worse(self, other: Agreement) -> Agreement {
        Agreement { cosine: self.cosine.min(other.cosine), max_abs: self.max_abs.max(other.max_abs) }
    }
}

/// Chooses `config`'s precision on `device` with `backend`, as `auto` says. Fails only when the
/// model cannot load in FP32 (what a plain load would have reported) or refuses a calibration
/// file.
pub fn search<B: Backend>(backend: &B, config: &ModelConfig, auto: &AutoPrecision, device: Device) -> Result<Decision, BackendError> {
    let started = Instant::now();
    let sets = input_sets(config, auto)?;
    let deadline = started + auto.budget;
    let fp32 = backend.load(&config.with_form(Form::default()), device)?;
    // Inputs drawn from a signature can miss what a model needs (a dynamic dimension that must
    // be 3, say): then there is nothing to compare on, and the model is served in FP32 as it
    // would be without `auto`. A calibration file the model refuses is the operator's mistake.
    // FP32 failing later, while timed, ends the search the same way.
    let skipped = |why: String| Decision {
        form: Form::default(),
        report: PrecisionChoice {
            model: config.name.clone(),
            device: device.to_string(),
            precision: Precision::Fp32.to_string(),
            speedup: 1.0,
            worst_cosine: 1.0,
            worst_abs: 0.0,
            search_ms: started.elapsed().as_millis() as u64,
            candidates: vec![why],
        },
        device,
    };
    let unusable = |e: BackendError| {
        format!("none tried: FP32 fails on inputs drawn from the signature ({e}); declare the inputs' ranges and max_dims, or calibration files")
    };
    let mut outputs = Vec::with_capacity(sets.len());
    for set in &sets {
        match (forward_guarded(&fp32, &set.inputs), &set.file) {
            (Ok(out), _) => outputs.push(out),
            (Err(e), None) => return Ok(skipped(unusable(e))),
            (Err(e), Some(file)) => {
                return Err(BackendError::Load(format!("calibration file {}: the FP32 forward pass failed: {e}", file.display())));
            }
        }
    }
    // On the CPU, FP32 stays loaded and is timed in turns with each candidate (`paired_speedup`):
    // load from outside comes and goes there, and the memory is the host's. On a GPU, where
    // placement reserved room for one copy of the weights, FP32 is timed first, alone, and
    // unloaded before any candidate loads.
    let reference = if device.is_gpu() {
        let mut times = Vec::new();
        for set in sets.iter().filter(|s| s.timed) {
            match quickest_alone(&fp32, &set.inputs, deadline) {
                Ok(took) => times.push(took),
                Err(e) => return Ok(skipped(unusable(e))),
            }
        }
        drop(fp32);
        Reference::Before(times)
    } else {
        Reference::Beside(&fp32)
    };
    let tolerances = config.outputs.iter().map(|o| auto.tolerance_of(&o.name)).collect();
    let baseline = Baseline { config, reference, tolerances, sets, outputs, deadline };

    let mut trials = Vec::new();
    for form in candidates(config, device) {
        if Instant::now() >= deadline {
            trials.push((form, Outcome::NotTried));
            continue;
        }
        let outcome = match backend.load(&config.with_form(form), device).map(|model| baseline.try_candidate(&model)) {
            Err(e) => Outcome::Failed(e.to_string()),
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => return Ok(skipped(format!("stopped at {form}: FP32 failed while timed beside it ({e}); served in FP32"))),
        };
        trials.push((form, outcome));
    }

    let best = trials
        .iter()
        .filter_map(|(p, o)| match o {
            Outcome::Kept { speedup, worst } if *speedup >= MIN_SPEEDUP => Some((*p, *speedup, *worst)),
            _ => None,
        })
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let (form, speedup, worst) = best.unwrap_or((Form::default(), 1.0, Agreement::EXACT));
    let report = PrecisionChoice {
        model: config.name.clone(),
        device: device.to_string(),
        precision: form.to_string(),
        speedup,
        worst_cosine: worst.cosine,
        worst_abs: worst.max_abs,
        search_ms: started.elapsed().as_millis() as u64,
        candidates: trials.iter().map(|(p, o)| describe(*p, o, auto.budget)).collect(),
    };
    Ok(Decision { form, report, device })
}

/// What a candidate's time is held to.
enum Reference<'a, F> {
    /// FP32 itself, timed in turns with each candidate (on the CPU).
    Beside(&'a F),
    /// FP32's quickest time on each timed set, in order, taken before any candidate loaded (on a
    /// GPU).
    Before(Vec<Duration>),
}

/// FP32, and its answers on the search's inputs: what every candidate is held to.
struct Baseline<'a, F> {
    config: &'a ModelConfig,
    reference: Reference<'a, F>,
    /// Each output's bounds, in the config's order.
    tolerances: Vec<Tolerance>,
    sets: Vec<InputSet>,
    /// FP32's outputs on each set.
    outputs: Vec<Vec<HostTensor>>,
    /// When the budget is spent.
    deadline: Instant,
}

impl<F: LoadedModel> Baseline<'_, F> {
    /// Runs `model` (a candidate precision) on every set and compares with FP32; times it on
    /// the timed sets when it stays within the tolerance. An error is FP32's, failing while
    /// timed beside it: the search cannot go on.
    fn try_candidate<M: LoadedModel>(&self, model: &M) -> Result<Outcome, BackendError> {
        let mut worst = Agreement::EXACT;
        for (set, want) in self.sets.iter().zip(&self.outputs) {
            let got = match forward_guarded(model, &set.inputs) {
                Ok(got) => got,
                Err(e) => return Ok(Outcome::Failed(e.to_string())),
            };
            for (((spec, allowed), want), got) in self.config.outputs.iter().zip(&self.tolerances).zip(want).zip(&got) {
                let agreement = compare(want, got);
                let allowed_abs = allowed.max_abs.unwrap_or_else(|| default_max_abs(want));
                worst = worst.worse(agreement);
                if !(agreement.cosine >= allowed.cosine && agreement.max_abs <= allowed_abs) {
                    return Ok(Outcome::Drifted { output: spec.name.clone(), worst: agreement, allowed: *allowed, allowed_abs });
                }
            }
        }
        // The geometric mean over batch sizes (a lone request and a full batch count alike),
        // smallest first: a candidate already far slower there is not timed on a full batch.
        let (mut log_sum, mut timed) = (0.0, 0);
        for (i, set) in self.sets.iter().filter(|s| s.timed).enumerate() {
            let speedup = match &self.reference {
                Reference::Beside(fp32) => match paired_speedup(*fp32, model, &set.inputs, self.deadline) {
                    Ok(speedup) => speedup,
                    Err(Failed::Fp32(e)) => return Err(e),
                    Err(Failed::Candidate(e)) => return Ok(Outcome::Failed(e.to_string())),
                },
                Reference::Before(times) => match quickest_alone(model, &set.inputs, self.deadline) {
                    Ok(took) => times[i].as_secs_f64() / took.as_secs_f64().max(1e-9),
                    Err(e) => return Ok(Outcome::Failed(e.to_string())),
                },
            };
            log_sum += speedup.ln();
            timed += 1;
            if (log_sum / f64::from(timed)).exp() < GIVE_UP {
                break;
            }
        }
        let speedup = (log_sum / f64::from(timed.max(1))).exp();
        Ok(Outcome::Kept { speedup, worst })
    }
}

/// The default bound on any value's error: for a floating output, a tenth of its largest finite
/// FP32 magnitude, so a candidate that keeps the direction of every row but not its scale still
/// fails; for an integer one (class or token ids), none: it must match exactly.
fn default_max_abs(reference: &HostTensor) -> f64 {
    if !reference.dtype.is_float() {
        return 0.0;
    }
    reference.values().filter(|v| v.is_finite()).fold(0.0f64, |m, v| m.max(v.abs())) * 0.1
}

/// How closely `got` follows `want`: per row (dimension 0), the cosine similarity of the row's
/// finite values; over all, the largest absolute difference. A different shape, a value that is
/// not finite where FP32's is, or one that differs where FP32's is not finite (a masked `-inf`
/// must stay `-inf`), agrees not at all.
pub fn compare(want: &HostTensor, got: &HostTensor) -> Agreement {
    const NONE: Agreement = Agreement { cosine: f64::NEG_INFINITY, max_abs: f64::INFINITY };
    if want.shape != got.shape {
        return NONE;
    }
    let rows = want.shape.first().map_or(1, |&r| r.max(1) as usize);
    let (want, got): (Vec<f64>, Vec<f64>) = (want.values().collect(), got.values().collect());
    let per_row = want.len() / rows;
    let mut agreement = Agreement::EXACT;
    for row in 0..rows {
        let (a, b) = (&want[row * per_row..(row + 1) * per_row], &got[row * per_row..(row + 1) * per_row]);
        let (mut dot, mut aa, mut bb) = (0.0, 0.0, 0.0);
        for (&x, &y) in a.iter().zip(b) {
            if !x.is_finite() {
                if x == y || (x.is_nan() && y.is_nan()) {
                    continue;
                }
                return NONE;
            }
            if !y.is_finite() {
                return NONE;
            }
            dot += x * y;
            aa += x * x;
            bb += y * y;
            agreement.max_abs = agreement.max_abs.max((x - y).abs());
        }
        let cosine = if aa == 0.0 && bb == 0.0 {
            1.0
        } else if aa == 0.0 || bb == 0.0 {
            0.0
        } else {
            dot / (aa.sqrt() * bb.sqrt())
        };
        agreement.cosine = agreement.cosine.min(cosine);
    }
    agreement
}

/// Which side of a comparison failed.
enum Failed {
    Fp32(BackendError),
    Candidate(BackendError),
}

/// How many times faster `candidate` runs `inputs` than `fp32`: each side's quickest timing over
/// [`TIMED_RUNS`] rounds, or fewer once `deadline` has passed (then the first untimed pass of
/// each counts, so that a candidate far slower than FP32 need not be timed to the end). Load from
/// outside the server (a build, a neighbour's burst, the scheduler's time slices) only ever adds
/// time, so the quickest timing is the least disturbed one; and since each round times both back
/// to back, in turn first, with the same number of passes, both sides get the same quiet moments.
/// (Timing FP32 once and each candidate later had let a quiet moment decide which won.)
fn paired_speedup<F: LoadedModel, M: LoadedModel>(fp32: &F, candidate: &M, inputs: &[HostTensor], deadline: Instant) -> Result<f64, Failed> {
    let fp32_pass = time_group(fp32, inputs, 1).map_err(Failed::Fp32)?;
    let candidate_pass = time_group(candidate, inputs, 1).map_err(Failed::Candidate)?;
    let ratio = |base: Duration, took: Duration| base.as_secs_f64() / took.as_secs_f64().max(1e-9);
    if Instant::now() >= deadline {
        return Ok(ratio(fp32_pass, candidate_pass));
    }
    let group = group_for(fp32_pass.min(candidate_pass));
    let (mut base, mut took) = (Duration::MAX, Duration::MAX);
    for round in 0..TIMED_RUNS {
        if round > 0 && Instant::now() >= deadline {
            break;
        }
        if round % 2 == 0 {
            base = base.min(time_group(fp32, inputs, group).map_err(Failed::Fp32)?);
            took = took.min(time_group(candidate, inputs, group).map_err(Failed::Candidate)?);
        } else {
            took = took.min(time_group(candidate, inputs, group).map_err(Failed::Candidate)?);
            base = base.min(time_group(fp32, inputs, group).map_err(Failed::Fp32)?);
        }
    }
    Ok(ratio(base, took))
}

/// `model`'s quickest timing on `inputs` over [`TIMED_RUNS`] rounds, or fewer once `deadline` has
/// passed (then its first untimed pass counts): how a GPU search times FP32 before the
/// candidates, and each candidate after it.
fn quickest_alone<M: LoadedModel>(model: &M, inputs: &[HostTensor], deadline: Instant) -> Result<Duration, BackendError> {
    let pass = time_group(model, inputs, 1)?;
    if Instant::now() >= deadline {
        return Ok(pass);
    }
    let group = group_for(pass);
    let mut quickest = Duration::MAX;
    for round in 0..TIMED_RUNS {
        if round > 0 && Instant::now() >= deadline {
            break;
        }
        quickest = quickest.min(time_group(model, inputs, group)?);
    }
    Ok(quickest)
}

/// How many passes one timing takes to last [`MIN_TIMED`] when one pass takes `pass`: for a
/// model of microseconds, the clock's resolution must not decide between two forms.
fn group_for(pass: Duration) -> u32 {
    u32::try_from(MIN_TIMED.as_nanos() / pass.as_nanos().max(1)).unwrap_or(u32::MAX).clamp(1, MAX_GROUP)
}

/// The time of one pass of `model` on `inputs`, averaged over `group` passes in a row.
fn time_group<M: LoadedModel>(model: &M, inputs: &[HostTensor], group: u32) -> Result<Duration, BackendError> {
    let started = Instant::now();
    for _ in 0..group {
        forward_guarded(model, inputs)?;
    }
    Ok(started.elapsed() / group)
}

/// Inputs the candidates run on.
struct InputSet {
    inputs: Vec<HostTensor>,
    /// Drawn at a batch size the scheduler forms, and timed.
    timed: bool,
    /// The calibration file they come from, if not drawn.
    file: Option<std::path::PathBuf>,
}

/// Inputs drawn from the signature at one row and at a full batch (timed), then each
/// calibration file's.
fn input_sets(config: &ModelConfig, auto: &AutoPrecision) -> Result<Vec<InputSet>, BackendError> {
    let large = config.batching.max_batch_size.clamp(1, LARGE_BATCH);
    let mut sets: Vec<InputSet> = [1, large]
        .into_iter()
        .enumerate()
        .filter(|&(i, rows)| i == 0 || rows > 1)
        .map(|(i, rows)| InputSet { inputs: drawn(&config.inputs, rows, i as u64 + 1), timed: true, file: None })
        .collect();
    for file in &auto.calibration {
        let failed = |why: String| BackendError::Load(format!("calibration file {}: {why}", file.display()));
        let body = std::fs::read(file).map_err(|e| failed(e.to_string()))?;
        let (_, named) = kiln_codec::oip::decode(None, Bytes::from(body)).map_err(|e| failed(e.0))?;
        let inputs = arrange_inputs(&config.name, &config.inputs, config.batching.max_rows, named).map_err(|e| failed(e.to_string()))?;
        sets.push(InputSet { inputs, timed: false, file: Some(file.clone()) });
    }
    Ok(sets)
}

/// Inputs of `rows` rows fitting `specs`, with values from a fixed seed: floating ones spread
/// over the declared range (or -1 ..= 1), integer ones over theirs (or 0 when none is declared,
/// as the warm-up's zeros); an integer input of two values or fewer (a mask, a flag) is set to
/// its largest, so every position counts.
pub fn drawn(specs: &[InputSpec], rows: u32, seed: u64) -> Vec<HostTensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64*: plenty for test inputs, and the same on every machine.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<u32> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Some(d) => *d,
                    None if axis == 0 => rows,
                    None => spec.max_dims.get(axis).copied().flatten().map_or(DYNAMIC_LEN, |m| m.min(DYNAMIC_LEN)).max(1),
                })
                .collect();
            let count = shape.iter().map(|&d| d as usize).product::<usize>();
            let (lo, hi) = spec.range.map_or((None, None), |r| (r.min, r.max));
            let floating = spec.dtype.is_float();
            let mut data = Vec::with_capacity(count * spec.dtype.size());
            for _ in 0..count {
                let value = if floating {
                    // -1 ..= 1, or a span of 2 from the one bound declared, or the range.
                    let (lo, hi) = (lo.or(hi.map(|h| h - 2.0)).unwrap_or(-1.0), hi.or(lo.map(|l| l + 2.0)).unwrap_or(1.0));
                    lo + (hi - lo) * next()
                } else {
                    match (lo, hi) {
                        (Some(lo), Some(hi)) if hi - lo <= 1.0 => hi,
                        (Some(lo), Some(hi)) => (lo + ((hi - lo + 1.0) * next()).floor()).min(hi),
                        (Some(lo), None) => lo,
                        (None, Some(hi)) => hi.min(0.0),
                        (None, None) => 0.0,
                    }
                };
                data.extend_from_slice(&scalar_bytes(spec.dtype, value));
            }
            HostTensor { dtype: spec.dtype, shape, data }
        })
        .collect()
}

/// One line for a candidate in the report.
fn describe(precision: Form, outcome: &Outcome, budget: Duration) -> String {
    match outcome {
        Outcome::Kept { speedup, worst } if *speedup >= MIN_SPEEDUP => {
            format!("{precision}: {speedup:.2}× fp32, worst cosine {:.4}", worst.cosine)
        }
        Outcome::Kept { speedup, worst } => format!(
            "{precision}: {speedup:.2}× fp32, not {MIN_SPEEDUP}× or more (worst cosine {:.4})",
            worst.cosine
        ),
        Outcome::Drifted { output, worst, allowed, allowed_abs } => {
            if worst.cosine < allowed.cosine {
                format!("{precision}: drifts on {output} (cosine {:.4}, under {})", worst.cosine, allowed.cosine)
            } else {
                format!("{precision}: drifts on {output} (off by {:.3}, over {allowed_abs:.3})", worst.max_abs)
            }
        }
        Outcome::Failed(why) => format!("{precision}: fails ({why})"),
        Outcome::NotTried => format!("{precision}: not tried, the {} ms budget was spent", budget.as_millis()),
    }
}

#[cfg(test)]
mod tests;
