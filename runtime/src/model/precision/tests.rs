//! The search's decisions on the scripted backend (where each precision's pass time and error
//! are set), and its comparison and drawn inputs on their own. The search on real TorchScript
//! models is in the Torch backend's tests.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_wire::EventKind;

use super::*;
use crate::model::backend::fake::{Fake, Script, config};
use crate::model::handle::ModelHandle;
use crate::model::shared::ModelState;
use crate::model::signature::{Ragged, ValueRange};
use crate::model::spec::{Replicas, Tolerance};
use crate::model::tensor::DType;
use crate::telemetry::EventLog;

fn auto(budget: Duration) -> AutoPrecision {
    AutoPrecision { tolerance: Tolerance::default(), output_tolerances: Vec::new(), calibration: Vec::new(), budget }
}

/// A fake whose FP32 pass takes `fp32_ms`, and each of `precisions` its own time and error.
fn fake(fp32_ms: u64, precisions: &[(Precision, u64, f32, bool)]) -> Fake {
    Fake(Arc::new(Script {
        forward_delay: Duration::from_millis(fp32_ms),
        precisions: precisions.iter().map(|&(p, ms, error, fails)| (p, Duration::from_millis(ms), error, fails)).collect(),
        ..Script::default()
    }))
}

/// The fake's model with `precision = "auto"`, on rows of 8 values in 0 ..= 1 (it refuses
/// negative ones).
fn auto_config(replicas: Replicas, auto: &AutoPrecision) -> ModelConfig {
    let mut config = config(16, replicas);
    config.inputs[0].shape = vec![None, Some(8)];
    config.inputs[0].range = Some(ValueRange { min: Some(0.0), max: Some(1.0) });
    config.auto_precision = Some(auto.clone());
    config
}

fn decide(fake: &Fake, budget: Duration) -> Decision {
    search(fake, &auto_config(Replicas::fixed(1), &auto(budget)), &auto(budget), Device::Cpu).expect("search")
}

#[test]
fn the_fastest_candidate_within_tolerance_is_chosen_and_every_one_is_reported() {
    let fake = fake(12, &[(Precision::Bf16, 2, 1e-4, false), (Precision::Fp16, 5, 1e-4, false)]);
    let decision = decide(&fake, Duration::from_secs(5));
    assert_eq!(decision.form.precision, Precision::Bf16, "{:?}", decision.report);
    let report = &decision.report;
    assert!(report.speedup > 3.0, "{report:?}");
    assert!(report.worst_cosine > 0.999 && report.worst_cosine < 1.0, "{report:?}");
    assert!(report.worst_abs > 0.0 && report.worst_abs < 1e-3, "{report:?}");
    assert_eq!((report.model.as_str(), report.device.as_str(), report.precision.as_str()), ("fake", "cpu", "bf16"));
    assert!(report.candidates[0].starts_with("bf16: ") && report.candidates[1].starts_with("fp16: "), "{report:?}");
    assert!(report.summary().starts_with("fake: bf16, "), "{}", report.summary());
    let autocast = &report.candidates[2];
    assert!(autocast.starts_with("bf16-autocast: ") && autocast.contains("not 1.1× or more"), "unscripted, as fast as FP32: {report:?}");
    // FP32 once, then each candidate once.
    assert_eq!(fake.0.loads(), [Precision::Fp32, Precision::Bf16, Precision::Fp16, Precision::Bf16Autocast]);
}

#[test]
fn a_candidate_whose_outputs_drift_is_never_chosen_however_fast() {
    // The fake's outputs are twice its inputs (0 ..= 2); ±0.5 on alternate values turns rows.
    let fake = fake(12, &[(Precision::Bf16, 1, 0.5, false), (Precision::Fp16, 1, 0.0, true)]);
    let decision = decide(&fake, Duration::from_secs(5));
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    let report = &decision.report;
    assert_eq!((report.speedup, report.worst_cosine, report.worst_abs), (1.0, 1.0, 0.0));
    assert!(report.candidates[0].starts_with("bf16: drifts on y ("), "{report:?}");
    assert!(report.candidates[1].contains("fp16: fails (scripted load failure)"), "{report:?}");
    assert!(report.summary().starts_with("fake: fp32 (bf16: drifts on y"), "{}", report.summary());
}

#[test]
fn a_declared_max_abs_holds_back_what_the_cosine_lets_through() {
    let fake = fake(12, &[(Precision::Bf16, 2, 0.01, false), (Precision::Fp16, 2, 0.01, false)]);
    let mut strict = auto(Duration::from_secs(5));
    strict.tolerance.max_abs = Some(0.001);
    let config = auto_config(Replicas::fixed(1), &strict);
    let decision = search(&fake, &config, &strict, Device::Cpu).expect("search");
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    assert!(decision.report.candidates[0].contains("off by 0.010, over 0.001"), "{:?}", decision.report);
}

#[test]
fn an_outputs_own_tolerance_overrides_the_model_wide_one() {
    let fake = fake(12, &[(Precision::Bf16, 2, 0.01, false), (Precision::Fp16, 12, 0.0, false)]);
    let mut own = auto(Duration::from_secs(5));
    own.tolerance.max_abs = Some(0.001);
    own.output_tolerances = vec![("y".into(), Tolerance { cosine: 0.99, max_abs: Some(0.05) })];
    let config = auto_config(Replicas::fixed(1), &own);
    let decision = search(&fake, &config, &own, Device::Cpu).expect("search");
    assert_eq!(decision.form.precision, Precision::Bf16, "y may be off by 0.05: {:?}", decision.report);
    // Its own cosine holds it too.
    own.output_tolerances[0].1 = Tolerance { cosine: 1.0, max_abs: Some(0.05) };
    let decision = search(&fake, &config, &own, Device::Cpu).expect("search");
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    assert!(decision.report.candidates[0].contains("drifts on y (cosine") && decision.report.candidates[0].contains("under 1)"), "{:?}", decision.report);
}

#[test]
fn a_candidate_no_faster_than_fp32_leaves_fp32() {
    let fake = fake(4, &[(Precision::Bf16, 4, 0.0, false), (Precision::Fp16, 12, 0.0, false)]);
    let decision = decide(&fake, Duration::from_secs(5));
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    assert!(decision.report.candidates.iter().all(|c| c.contains("not 1.1× or more")), "{:?}", decision.report);
}

#[test]
fn load_from_outside_that_ends_during_the_search_does_not_make_a_candidate_look_faster() {
    // bf16 is no faster than FP32, but every pass is three times slower for the first 150 ms:
    // all of FP32's timing when it was timed once before the candidates. Timed in turns beside
    // FP32, both sides have rounds after the load, and each side's quickest counts.
    let fake = fake(6, &[(Precision::Bf16, 6, 0.0, false), (Precision::Fp16, 60, 0.0, false)]);
    *fake.0.busy.lock().expect("busy") = Some((Instant::now() + Duration::from_millis(150), Duration::from_millis(12)));
    let decision = decide(&fake, Duration::from_secs(5));
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    assert!(decision.report.candidates[0].starts_with("bf16: ") && decision.report.candidates[0].contains("not 1.1× or more"), "{:?}", decision.report);
}

#[test]
fn on_the_cpu_fp32_stays_loaded_beside_each_candidate_and_on_a_gpu_it_goes_first() {
    let cpu = fake(2, &[(Precision::Bf16, 1, 0.0, false)]);
    decide(&cpu, Duration::from_secs(5));
    assert_eq!(cpu.0.most_alive.load(Ordering::Acquire), 2, "FP32 and one candidate at a time");
    let gpu = fake(2, &[(Precision::Fp16, 1, 0.0, false)]);
    let config = auto_config(Replicas::fixed(1), &auto(Duration::from_secs(5)));
    let decision = search(&gpu, &config, &auto(Duration::from_secs(5)), Device::Cuda(0)).expect("search");
    assert_eq!(gpu.0.most_alive.load(Ordering::Acquire), 1, "placement reserved one copy of the weights");
    assert_eq!(decision.form.precision, Precision::Fp16, "timed against FP32's time from before: {:?}", decision.report);
    assert_eq!(gpu.0.alive.load(Ordering::Acquire), 0, "the search keeps no model");
}

#[test]
fn fp32_failing_while_timed_ends_the_search_in_fp32_and_says_so() {
    // Its two comparison passes succeed; the first timed one fails, beside bf16.
    let fake = Fake(Arc::new(Script {
        forward_delay: Duration::from_millis(1),
        fail_after: Some((Precision::Fp32, 2)),
        ..Script::default()
    }));
    let decision = decide(&fake, Duration::from_secs(5));
    assert_eq!(decision.form.precision, Precision::Fp32);
    assert_eq!(decision.report.candidates.len(), 1, "{:?}", decision.report);
    let why = &decision.report.candidates[0];
    assert!(why.starts_with("stopped at bf16: FP32 failed while timed beside it (") && why.contains("scripted pass failure"), "{why}");
    assert_eq!(fake.0.loads(), [Precision::Fp32, Precision::Bf16], "no candidate loads after it");
}

#[test]
fn a_spent_budget_leaves_the_rest_untried() {
    let fake = fake(4, &[(Precision::Bf16, 1, 0.0, false)]);
    let decision = decide(&fake, Duration::ZERO);
    assert_eq!(decision.form.precision, Precision::Fp32);
    assert_eq!(
        decision.report.candidates,
        ["bf16: not tried, the 0 ms budget was spent", "fp16: not tried, the 0 ms budget was spent", "bf16-autocast: not tried, the 0 ms budget was spent"]
    );
    assert_eq!(fake.0.loads(), [Precision::Fp32]);
}

#[test]
fn a_model_failing_in_fp32_fails_the_search_as_its_load_would() {
    let fake = fake(1, &[(Precision::Fp32, 1, 0.0, true)]);
    let config = auto_config(Replicas::fixed(1), &auto(Duration::from_secs(5)));
    let error = search(&fake, &config, &auto(Duration::from_secs(5)), Device::Cpu).expect_err("fails");
    assert_eq!(error, BackendError::Load("scripted load failure".into()));
}

#[test]
fn a_model_refusing_the_drawn_inputs_is_served_in_fp32_without_a_search() {
    // The fake refuses negative values; undeclared, the drawn ones span -1 ..= 1.
    let fake = fake(1, &[(Precision::Bf16, 1, 0.0, false)]);
    let mut config = auto_config(Replicas::fixed(1), &auto(Duration::from_secs(5)));
    config.inputs[0].range = None;
    let decision = search(&fake, &config, &auto(Duration::from_secs(5)), Device::Cpu).expect("not a load failure");
    assert_eq!(decision.form.precision, Precision::Fp32);
    assert!(decision.report.candidates[0].starts_with("none tried: FP32 fails on inputs drawn from the signature (negative input)"), "{:?}", decision.report);
    assert_eq!(fake.0.loads(), [Precision::Fp32], "no candidate loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_loading_together_search_once_and_all_load_the_choice() {
    let fake = fake(12, &[(Precision::Bf16, 2, 1e-4, false), (Precision::Fp16, 12, 0.0, false)]);
    let config = auto_config(Replicas::fixed(3), &auto(Duration::from_secs(5)));
    let events = Arc::new(EventLog::new(64));
    let placements = (0..3).map(|_| crate::model::device::Placement::cpu()).collect();
    let handle = ModelHandle::spawn(config, placements, Arc::new(fake.clone()), Arc::clone(&events)).expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(handle.state(), ModelState::Ready(_)) || handle.replicas().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "not ready: {:?}", handle.state());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while fake.0.loads().len() < 7 {
        assert!(std::time::Instant::now() < deadline, "{:?}", fake.0.loads());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The search's four loads, then each replica's own in bf16.
    let loads = fake.0.loads();
    assert_eq!(
        loads,
        [Precision::Fp32, Precision::Bf16, Precision::Fp16, Precision::Bf16Autocast, Precision::Bf16, Precision::Bf16, Precision::Bf16]
    );
    let chosen: Vec<_> = events.follow().0.into_iter().filter_map(|e| match e.kind {
        EventKind::PrecisionChosen(choice) => Some(choice),
        _ => None,
    }).collect();
    assert_eq!(chosen.len(), 1, "{chosen:?}");
    assert_eq!(chosen[0].precision, "bf16");
    assert_eq!(handle.precision_search(), chosen);
    assert!(handle.precision().starts_with("bf16 ") && handle.precision().ends_with('×'), "{}", handle.precision());
}

fn tensor(shape: Vec<u32>, values: &[f32]) -> HostTensor {
    crate::model::backend::fake::f32_tensor(shape, values)
}

#[test]
fn agreement_is_per_row_cosine_and_the_largest_difference() {
    let want = tensor(vec![2, 2], &[1.0, 0.0, 3.0, 4.0]);
    assert_eq!(compare(&want, &want), Agreement { cosine: 1.0, max_abs: 0.0 });
    // The first row turned 90 degrees: cosine 0 there, whatever the other row does.
    let turned = tensor(vec![2, 2], &[0.0, 1.0, 3.0, 4.0]);
    assert_eq!(compare(&want, &turned), Agreement { cosine: 0.0, max_abs: 1.0 });
    // A row scaled keeps its cosine; the difference shows it.
    let scaled = tensor(vec![2, 2], &[1.0, 0.0, 6.0, 8.0]);
    let a = compare(&want, &scaled);
    assert!((a.cosine - 1.0).abs() < 1e-12 && a.max_abs == 4.0, "{a:?}");
    // Another shape, or a value gone to infinity, agrees not at all.
    assert_eq!(compare(&want, &tensor(vec![4, 1], &[1.0, 0.0, 3.0, 4.0])).cosine, f64::NEG_INFINITY);
    assert_eq!(compare(&want, &tensor(vec![2, 2], &[1.0, 0.0, f32::INFINITY, 4.0])).max_abs, f64::INFINITY);
    // All-zero rows on both sides agree.
    let zeros = tensor(vec![1, 2], &[0.0, 0.0]);
    assert_eq!(compare(&zeros, &zeros).cosine, 1.0);
    // A masked -inf must stay -inf, and does not blind the comparison of the rest.
    let masked = tensor(vec![1, 3], &[f32::NEG_INFINITY, 3.0, 4.0]);
    assert_eq!(compare(&masked, &masked), Agreement { cosine: 1.0, max_abs: 0.0 });
    assert_eq!(compare(&masked, &tensor(vec![1, 3], &[-1e30, 3.0, 4.0])).cosine, f64::NEG_INFINITY);
    let a = compare(&masked, &tensor(vec![1, 3], &[f32::NEG_INFINITY, 4.0, -3.0]));
    assert!(a.cosine.abs() < 1e-12 && a.max_abs == 7.0, "{a:?}");
    assert_eq!(default_max_abs(&masked), 0.4, "from the finite values");
    // Integer outputs (class ids) must match exactly unless max_abs says otherwise.
    let ids = HostTensor { dtype: DType::I64, shape: vec![2], data: [7i64, 30000].iter().flat_map(|v| v.to_le_bytes()).collect() };
    assert_eq!(default_max_abs(&ids), 0.0);
}

#[test]
fn drawn_inputs_fit_the_signature_its_ranges_and_its_dimension_limits() {
    let mut ids = InputSpec::new("ids", DType::I64, vec![None, None], Some(Ragged { dim: 1, pad: 0.0 }));
    ids.range = Some(ValueRange { min: Some(0.0), max: Some(30521.0) });
    let mut mask = InputSpec::new("mask", DType::I64, vec![None, None], Some(Ragged { dim: 1, pad: 0.0 }));
    mask.range = Some(ValueRange { min: Some(0.0), max: Some(1.0) });
    mask.max_dims = vec![None, Some(8)];
    let mut image = InputSpec::new("image", DType::F32, vec![None, Some(1), Some(8), Some(8)], None);
    image.range = Some(ValueRange { min: Some(0.0), max: Some(16.0) });
    let plain = InputSpec::new("x", DType::F32, vec![None, None], None);
    let mut above = InputSpec::new("above", DType::F32, vec![None], None);
    above.range = Some(ValueRange { min: Some(5.0), max: None });
    let specs = [ids, mask, image, plain, above];
    let drawn = drawn(&specs, 4, 1);
    assert_eq!(drawn[0].shape, [4, 16]);
    assert_eq!(drawn[1].shape, [4, 8], "max_dims caps a dynamic dimension");
    assert_eq!(drawn[2].shape, [4, 1, 8, 8]);
    let ids: Vec<f64> = drawn[0].values().collect();
    assert!(ids.iter().all(|v| (0.0..=30521.0).contains(v) && v.fract() == 0.0), "{ids:?}");
    assert!(ids.iter().any(|v| *v != ids[0]), "ids vary");
    assert!(drawn[1].values().all(|v| v == 1.0), "a mask is all set");
    assert!(drawn[2].values().all(|v| (0.0..=16.0).contains(&v)));
    assert!(drawn[3].values().all(|v| (-1.0..=1.0).contains(&v)));
    assert!(drawn[4].values().all(|v| (5.0..=7.0).contains(&v)), "a one-sided range is kept");
    // The same seed draws the same inputs, on every machine; another seed others.
    assert_eq!(super::drawn(&specs, 4, 1), drawn);
    assert_ne!(super::drawn(&specs, 4, 2)[2], drawn[2]);
}

#[test]
fn calibration_files_are_compared_on_and_a_bad_one_is_named() {
    let dir = std::env::temp_dir().join(format!("kiln-calibration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let good = dir.join("good.json");
    std::fs::write(&good, r#"{"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.5, 0.25, 1.0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0.5]}]}"#).expect("write");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"inputs": [{"name": "image", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}]}"#).expect("write");

    let fake = fake(1, &[(Precision::Bf16, 1, 0.0, false), (Precision::Fp16, 1, 0.0, false)]);
    let mut with = auto(Duration::from_secs(5));
    with.calibration = vec![good.clone()];
    let config = auto_config(Replicas::fixed(1), &with);
    search(&fake, &config, &with, Device::Cpu).expect("search");
    let calibration = [0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5];
    assert!(fake.0.passes().iter().any(|p| p == &calibration), "the calibration inputs ran");

    with.calibration = vec![good, bad.clone()];
    let error = search(&fake, &config, &with, Device::Cpu).expect_err("a bad file fails the load").to_string();
    assert!(error.contains(&format!("calibration file {}", bad.display())) && error.contains("image"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
}
