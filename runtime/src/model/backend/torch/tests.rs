//! The Torch backend on real TorchScript models (built by `scripts/setup.sh`): shared weights,
//! thread counts and reduced precision.

use super::*;
use crate::model::replica::load_and_warm_up;
use crate::model::signature::InputSpec;
use crate::model::test_models::*;

#[test]
fn cpu_replicas_share_one_copy_of_the_weights_and_run_it_from_two_threads_at_once() {
    let torch = Torch::default();
    let config = tokenwise(policy(8, 0), 2);
    let first = torch.load(&config, Device::Cpu).expect("first replica");
    let second = torch.load(&config, Device::Cpu).expect("second replica");
    assert!(first.shares_weights_with(&second), "a second CPU replica loaded the weights again");
    let mut rng = Rng(7);
    let requests: Vec<Vec<HostTensor>> = (0..8u32).map(|i| token_request(&mut rng, 1 + i % 3, 4 + i % 9)).collect();
    let alone: Vec<Vec<HostTensor>> = requests.iter().map(|r| first.forward(r).expect("forward")).collect();
    std::thread::scope(|scope| {
        for model in [&first, &second] {
            let (requests, alone) = (&requests, &alone);
            scope.spawn(move || {
                for _ in 0..2 {
                    for (request, want) in requests.iter().zip(alone) {
                        assert_close(&model.forward(request).expect("concurrent forward"), want, "shared module");
                    }
                }
            });
        }
    });
    // Another model file, or the last replica gone: loaded afresh.
    drop((first, second));
    let again = torch.load(&config, Device::Cpu).expect("reload");
    let other = torch.load(&one_input_model("normed.pt", InputSpec::new("x", DType::F32, vec![None, Some(4)], None), "y", Precision::Fp32), Device::Cpu).expect("other");
    assert!(!again.shares_weights_with(&other));
}

/// Replicas start loading at the same moment: the second waits for the first one's module.
#[test]
fn cpu_replicas_that_load_at_once_still_share_one_copy_of_the_weights() {
    let torch = Torch::default();
    let config = tokenwise(policy(8, 0), 4);
    let start = std::sync::Barrier::new(4);
    let models: Vec<TorchModel> = std::thread::scope(|scope| {
        let loads: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    torch.load(&config, Device::Cpu).expect("replica")
                })
            })
            .collect();
        loads.into_iter().map(|l| l.join().expect("load thread")).collect()
    });
    for model in &models[1..] {
        assert!(models[0].shares_weights_with(model), "replicas that loaded together loaded the weights twice");
    }
}

/// libtorch sizes a thread's pool at its first parallel region from the count any thread set
/// last: another model's replica setting its `threads` between this replica's load and its
/// first forward pass must not decide this replica's.
#[test]
fn a_replica_keeps_its_own_thread_count_when_another_model_sets_another_one() {
    let (loaded, load_done) = std::sync::mpsc::channel();
    let (go, may_run) = std::sync::mpsc::channel::<()>();
    let replica = std::thread::spawn(move || {
        let model = Torch::default().load(&digits(policy(1, 0)), Device::Cpu).expect("load");
        loaded.send(()).expect("main thread");
        may_run.recv().expect("main thread");
        let image = HostTensor { dtype: DType::F32, shape: vec![1, 1, 8, 8], data: vec![0; 256] };
        model.forward(&[image]).expect("forward");
        tch::get_num_threads()
    });
    load_done.recv().expect("replica thread");
    // Another model, configured with three threads, loading on its own thread.
    std::thread::spawn(|| tch::set_num_threads(3)).join().expect("other model's thread");
    go.send(()).expect("replica thread");
    assert_eq!(replica.join().expect("replica thread"), 1, "the replica's pool was resized by another model");
}

/// What libtorch's whole-module cast gets wrong, and what no cast can do.
#[test]
fn reduced_precision_keeps_integer_buffers_casts_batch_norm_and_refuses_frozen_modules() {
    let ids = InputSpec::new("ids", DType::I64, vec![None, None], None);
    // Position ids in an integer buffer stay integers: the lookup works and positions past
    // 256 (not representable in bf16) still get their own embedding.
    let config = one_input_model("positions.pt", ids.clone(), "hidden", Precision::Bf16);
    let (model, meta) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("positions in bf16");
    assert_eq!(meta[0].dtype, DType::F32);
    let long = i64_tensor(vec![1, 300], &[5; 300]);
    let out = f32_values(&model.forward(std::slice::from_ref(&long)).expect("300 positions")[0]);
    let row = |i: usize| &out[i * 16..(i + 1) * 16];
    assert_ne!(row(297), row(298), "positions 297 and 298 collapsed: the buffer was cast");
    let full = one_input_model("positions.pt", ids.clone(), "hidden", Precision::Fp32);
    let (reference, _) = load_and_warm_up(&Torch::default(), &full, Device::Cpu).expect("fp32");
    let want = f32_values(&reference.forward(std::slice::from_ref(&long)).expect("fp32 forward")[0]);
    let worst = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst > 0.0 && worst < 0.1, "bf16 differs from fp32 by {worst}");

    // Batch norm's running statistics are cast with the parameters.
    let x = InputSpec::new("x", DType::F32, vec![None, Some(4)], None);
    let config = one_input_model("normed.pt", x, "y", Precision::Bf16);
    let (model, _) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("batch norm in bf16");
    let input = HostTensor { dtype: DType::F32, shape: vec![2, 4], data: [0.5f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect() };
    assert_eq!(model.forward(&[input]).expect("forward")[0].dtype, DType::F32);

    // A frozen module has nothing to cast: refused, not silently served in FP32.
    let config = one_input_model("positions-frozen.pt", ids.clone(), "hidden", Precision::Bf16);
    let error = load_and_warm_up(&Torch::default(), &config, Device::Cpu).err().expect("frozen in bf16").to_string();
    assert!(error.contains("frozen") && error.contains("precision bf16"), "{error}");
    // Autocast casts nothing at load, so the frozen module takes it; embedding lookups and
    // layer norm are ops it keeps in FP32, so the answer is FP32's to the bit.
    let config = one_input_model("positions-frozen.pt", ids.clone(), "hidden", Precision::Bf16Autocast);
    let (model, meta) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("frozen under autocast");
    assert_eq!(meta[0].dtype, DType::F32);
    let got = f32_values(&model.forward(std::slice::from_ref(&long)).expect("autocast forward")[0]);
    let frozen = one_input_model("positions-frozen.pt", ids, "hidden", Precision::Fp32);
    let (reference, _) = load_and_warm_up(&Torch::default(), &frozen, Device::Cpu).expect("frozen fp32");
    let want = f32_values(&reference.forward(std::slice::from_ref(&long)).expect("fp32 forward")[0]);
    assert_eq!(got, want, "autocast changed ops it keeps in FP32");
}

/// `precision = "auto"` on real TorchScript: a model that bf16 and fp16 ruin stays FP32, and the
/// report says why; the digits model gets a choice this machine can justify.
#[test]
fn auto_precision_keeps_a_drifting_model_in_fp32_and_justifies_any_other_choice() {
    use crate::model::precision::search;
    use crate::model::spec::{AutoPrecision, Tolerance};
    let auto = AutoPrecision { tolerance: Tolerance::default(), output_tolerances: Vec::new(), calibration: Vec::new(), budget: std::time::Duration::from_secs(5) };
    let x = InputSpec::new("x", DType::F32, vec![None, Some(32)], None);
    let config = one_input_model("drift.pt", x, "y", Precision::Fp32);
    let decision = search(&Torch::default(), &config, &auto, Device::Cpu).expect("search");
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    assert_eq!(decision.report.candidates.len(), 3, "{:?}", decision.report);
    for line in &decision.report.candidates {
        assert!(line.contains(": drifts on y (cosine "), "{line}");
    }

    // Frozen, the same model cannot take bf16 or fp16 weights (its weights are constants) but
    // does run under autocast, whose bf16 matrix product ruins it as well.
    let x = InputSpec::new("x", DType::F32, vec![None, Some(32)], None);
    let decision = search(&Torch::default(), &one_input_model("drift-frozen.pt", x, "y", Precision::Fp32), &auto, Device::Cpu).expect("search");
    assert_eq!(decision.form.precision, Precision::Fp32, "{:?}", decision.report);
    let lines = &decision.report.candidates;
    assert!(lines[0].starts_with("bf16: fails (") && lines[0].contains("frozen"), "{lines:?}");
    assert!(lines[1].starts_with("fp16: fails (") && lines[1].contains("frozen"), "{lines:?}");
    assert!(lines[2].starts_with("bf16-autocast: drifts on y (cosine "), "{lines:?}");

    // Digits takes images, so channels-last forms are tried too, FP32 first.
    let decision = search(&Torch::default(), &digits(policy(16, 0)), &auto, Device::Cpu).expect("search");
    let report = &decision.report;
    let tried: Vec<&str> = report.candidates.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
    assert_eq!(tried, ["fp32 channels-last", "bf16", "bf16 channels-last", "fp16", "bf16-autocast"], "{report:?}");
    assert_eq!(report.precision, decision.form.to_string());
    if decision.form == crate::model::spec::Form::default() {
        assert_eq!((report.speedup, report.worst_cosine), (1.0, 1.0));
    } else {
        assert!(report.speedup >= 1.1 && report.worst_cosine >= 0.999, "{report:?}");
    }
    assert!(report.search_ms < 20_000, "{report:?}");
    eprintln!("digits on this machine: {}", report.summary());
}

/// Reduced precision on the CPU: the same inputs and output dtypes as FP32, values within the
/// type's rounding, and the same predicted digit.
#[test]
fn reduced_precision_casts_model_and_inputs_and_returns_fp32() {
    let mut rng = Rng(11);
    let images: Vec<f32> = (0..8 * 64).map(|_| (rng.next() % 1000) as f32 / 1000.0).collect();
    let input = HostTensor {
        dtype: DType::F32,
        shape: vec![8, 1, 8, 8],
        data: images.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let full = TorchModel::load(&digits(policy(1, 0)), Device::Cpu, Cast::Parameters).expect("fp32");
    let reference = f32_values(&full.forward(std::slice::from_ref(&input)).expect("fp32 forward")[0]);
    let argmax = |v: &[f32]| -> Vec<usize> {
        v.chunks(10)
            .map(|row| row.iter().enumerate().fold(0, |best, (i, x)| if *x > row[best] { i } else { best }))
            .collect()
    };
    for (precision, tolerance) in [(Precision::Bf16, 0.25f32), (Precision::Fp16, 0.05), (Precision::Bf16Autocast, 0.25)] {
        let mut config = digits(policy(1, 0));
        config.precision = precision;
        let loaded = load_and_warm_up(&Torch::default(), &config, Device::Cpu);
        match loaded.and_then(|(model, _)| model.forward(std::slice::from_ref(&input))) {
            Ok(outputs) => {
                let values = f32_values(&outputs[0]);
                assert_eq!(outputs[0].shape, vec![8, 10], "{precision}");
                let worst = values.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(worst < tolerance, "{precision}: logits differ by up to {worst}");
                let agree = argmax(&values).iter().zip(argmax(&reference)).filter(|(a, b)| **a == *b).count();
                assert!(agree >= 7, "{precision}: only {agree} of 8 predictions agree with fp32");
            }
            // FP16 kernels are optional on the CPU; where libtorch lacks one it must say so.
            Err(e) => {
                let e = e.to_string();
                assert_eq!(precision, Precision::Fp16, "bf16 must run on the CPU: {e}");
                assert!(e.contains("Half"), "an unsupported fp16 kernel must be named: {e}");
            }
        }
    }
    // Channels-last weights and images change the layout, not the values (beyond the order
    // of a sum's terms).
    let mut config = digits(policy(1, 0));
    config.channels_last = true;
    let (model, _) = load_and_warm_up(&Torch::default(), &config, Device::Cpu).expect("channels-last");
    let values = f32_values(&model.forward(std::slice::from_ref(&input)).expect("channels-last forward")[0]);
    let worst = values.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "channels-last logits differ by up to {worst}");
    assert_eq!(argmax(&values), argmax(&reference));
    let laid = model.module.named_parameters().expect("parameters");
    // (With one input channel the two layouts are the same bytes; a later convolution has more.)
    let (name, weight) = laid.iter().find(|(_, t)| t.dim() == 4 && t.size()[1] > 1).expect("a convolution's weight");
    let [_, c, h, w] = weight.size()[..] else { panic!("{name} is not 4-D") };
    assert_eq!(weight.stride(), [h * w * c, 1, w * c, c], "{name} is not channels-last");

    // Integer inputs stay integers: the token model runs in bf16 with INT64 ids.
    let mut config = tokenwise(policy(1, 0), 1);
    config.precision = Precision::Bf16;
    let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("tokenwise bf16");
    let outputs = model.forward(&token_request(&mut rng, 2, 5)).expect("tokenwise forward");
    assert_eq!(outputs[1].dtype, DType::F32);
    assert_eq!(outputs[1].shape, vec![2, 16]);
}
