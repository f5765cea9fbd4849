//! The scheduler against real TorchScript models (built by `scripts/setup.sh`).

use super::*;
use crate::model::error::*;
use crate::model::replica::*;
use crate::model::shared::*;
use crate::model::batch;
use crate::model::spec::{ModelConfig, Precision};
use crate::model::test_models::*;
use crate::model::tensor::HostTensor;
use futures::FutureExt as _;
use tokio::sync::oneshot;
use crate::fleet::placement::{Placer, Purpose};
use crate::model::backend::torch::{Cast, Torch, TorchModel};
use crate::model::handle::{InferOptions, ModelHandle};
use crate::model::signature::{InputSpec, OutputSpec, Ragged};
use crate::model::spec::{BatchPolicy, DeviceChoice, Replicas};
use crate::model::tensor::DType;
use crate::telemetry::EventLog;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

async fn ready(config: ModelConfig) -> ModelHandle {
    let placements = (0..config.replicas.min).map(|_| Placement::cpu()).collect();
    let handle = ModelHandle::spawn(config, placements, Arc::new(Torch::default()), Arc::new(EventLog::new(16))).expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match handle.state() {
            ModelState::Ready(_) => return handle,
            ModelState::Failed(e) => panic!("model failed to load: {e}"),
            ModelState::Loading => {
                assert!(Instant::now() < deadline, "model not ready in time");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Starts a request that keeps the single instance busy for well over 100 ms, and returns
/// once it is running.
async fn occupy(handle: &ModelHandle, rng: &mut Rng) -> tokio::task::JoinHandle<Result<(), InferError>> {
    let before = handle.counters().executions.load(Ordering::Relaxed);
    let (h, inputs) = (handle.clone(), token_request(rng, 512, 2048));
    let task = tokio::spawn(async move { h.infer(inputs, InferOptions::default()).await.map(|_| ()) });
    while handle.counters().executions.load(Ordering::Relaxed) == before {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    task
}

async fn until_queued(handle: &ModelHandle, n: usize) {
    while handle.counters().queued.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
}

/// Plans batches over a queue without any model: rows per request in arrival order.
fn planned_rows(policy: BatchPolicy, queued: &[(u32, u8, u32)]) -> Vec<u32> {
    let mut scheduler = Scheduler::new(test_shared(tokenwise(policy, 1)), Arc::new(Torch::default()), mpsc::channel().0, 1);
    let mut keep = Vec::new();
    for &(rows, priority, width) in queued {
        let (reply, answer) = oneshot::channel();
        keep.push(answer);
        scheduler.queues[priority as usize].push_back(Pending {
            inputs: Vec::new(),
            rows,
            ragged_len: None,
            key: vec![vec![width]],
            priority,
            enqueued: Instant::now(),
            reply,
            trace: None,
        });
    }
    let plan = scheduler.plan(scheduler.shared.tuning().max_batch_size).expect("a plan");
    plan.iter().map(|&(l, i)| scheduler.queues[l][i].rows).collect()
}

#[test]
fn plans_fill_to_max_trim_to_preferred_sizes_and_keep_shapes_apart() {
    let mut p = policy(8, 0);
    // Greedy fill up to max_batch_size, skipping what does not fit.
    assert_eq!(planned_rows(p.clone(), &[(3, 0, 1), (4, 0, 1), (2, 0, 1), (1, 0, 1)]), vec![3, 4, 1]);
    // Incompatible shapes never share a batch.
    assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (1, 0, 2), (1, 0, 1)]), vec![1, 1]);
    // The highest priority seeds the batch.
    assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (2, 5, 2), (1, 0, 2)]), vec![2, 1]);
    // A request larger than max_batch_size runs alone.
    assert_eq!(planned_rows(p.clone(), &[(20, 0, 1), (1, 0, 1)]), vec![20]);
    // Trimmed to the largest preferred size that fits: 7 rows -> 4.
    p.preferred_batch_sizes = vec![2, 4];
    assert_eq!(planned_rows(p.clone(), &[(1, 0, 1), (2, 0, 1), (1, 0, 1), (3, 0, 1)]), vec![1, 2, 1]);
    // Batching off: one request per forward pass.
    assert_eq!(planned_rows(policy(1, 0), &[(1, 0, 1), (1, 0, 1)]), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_equal_unbatched_ones_for_random_arrivals() {
    let batched = ready(tokenwise(policy(16, 300), 2)).await;
    let single = ready(tokenwise(policy(1, 0), 1)).await;
    let digits_batched = ready(digits(policy(16, 300))).await;
    let digits_single = ready(digits(policy(1, 0))).await;
    for seed in 1..=4u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut tasks = Vec::new();
        for _ in 0..48 {
            let rows = 1 + rng.below(3) as u32;
            let len = 1 + rng.below(12) as u32;
            let delay = Duration::from_micros(rng.below(3000));
            let inputs = token_request(&mut rng, rows, len);
            let pixels: Vec<f32> = (0..rows * 64).map(|_| rng.below(1000) as f32 / 1000.0).collect();
            let image = HostTensor {
                dtype: DType::F32,
                shape: vec![rows, 1, 8, 8],
                data: pixels.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let (b, d) = (batched.clone(), digits_batched.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let tokens = b.infer(inputs.clone(), InferOptions::default()).await;
                let digits = d.infer(vec![image.clone()], InferOptions::default()).await;
                (inputs, tokens, image, digits)
            }));
        }
        for task in tasks {
            let (inputs, tokens, image, digits) = task.await.expect("task");
            let tokens = tokens.expect("batched tokenwise");
            let alone = single.infer(inputs, InferOptions::default()).await.expect("single");
            assert_close(&tokens, &alone, "tokenwise");
            let digits = digits.expect("batched digits");
            let alone = digits_single.infer(vec![image], InferOptions::default()).await.expect("single");
            assert_close(&digits, &alone, "digits");
        }
    }
    let c = batched.counters();
    let (inferences, executions) = (c.inferences.load(Ordering::Relaxed), c.executions.load(Ordering::Relaxed));
    assert_eq!(inferences, 4 * 48);
    assert!(executions < inferences, "no batch formed: {executions} executions for {inferences} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_lost_or_misdelivered_under_stress_with_cancellations() {
    let batched = ready(tokenwise(policy(32, 200), 2)).await;
    let single = ready(tokenwise(policy(1, 0), 1)).await;
    let mut rng = Rng(42);
    let mut tasks = Vec::new();
    let mut expected = Vec::new();
    for i in 0..1000u32 {
        let len = 1 + rng.below(16) as u32;
        let inputs = token_request(&mut rng, 1, len);
        expected.push(inputs.clone());
        // One request in ten is given up: half of them while surely still queued (dropped
        // after the poll that submits them), half after a random wait that may catch them
        // anywhere, in a batch being formed or run. Late timers under load only make the
        // second half finish instead, so the first half always exercises cancellation.
        let cancel = match i % 20 {
            3 => Some(Duration::ZERO),
            13 => Some(Duration::from_micros(1 + rng.below(2000))),
            _ => None,
        };
        let handle = batched.clone();
        tasks.push(tokio::spawn(async move {
            let call = handle.infer(inputs, InferOptions::default());
            match cancel {
                Some(Duration::ZERO) => call.now_or_never(),
                Some(after) => tokio::time::timeout(after, call).await.ok(),
                None => Some(call.await),
            }
        }));
    }
    let mut answered = 0;
    let mut cancelled = 0;
    for (task, inputs) in tasks.into_iter().zip(expected) {
        match task.await.expect("task") {
            Some(result) => {
                let got = result.expect("inference");
                let want = single.infer(inputs, InferOptions::default()).await.expect("single");
                assert_close(&got, &want, "stress");
                answered += 1;
            }
            None => cancelled += 1,
        }
    }
    assert!(answered >= 900, "every request that was not cancelled is answered: {answered}");
    let c = batched.counters();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let settled = c.inferences.load(Ordering::Relaxed) + c.dropped.load(Ordering::Relaxed);
        if c.queued.load(Ordering::Relaxed) == 0 && settled == 1000 {
            break;
        }
        assert!(Instant::now() < deadline, "queue did not drain: {settled} settled, {} queued", c.queued.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!((40..=100).contains(&cancelled), "about 50 given up while queued, up to 50 more: {cancelled}");
}

type Answer = oneshot::Receiver<Result<(Vec<HostTensor>, crate::model::command::Batched), InferError>>;

fn queued(config: &ModelConfig, inputs: Vec<HostTensor>) -> (Pending, Answer) {
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        rows: inputs[0].rows(),
        ragged_len: batch::ragged_len(&config.inputs, &inputs),
        key: batch::compat_key(&config.inputs, &inputs),
        inputs,
        priority: 0,
        enqueued: Instant::now(),
        reply,
        trace: None,
    };
    (pending, answer)
}

fn minilm() -> ModelConfig {
    let ragged = Some(Ragged { dim: 1, pad: 0.0 });
    let mut config = tokenwise(policy(16, 0), 1);
    config.name = "minilm".into();
    config.path = model_path("minilm.pt");
    config.inputs = vec![
        InputSpec::new("input_ids", DType::I64, vec![None, None], ragged),
        InputSpec::new("attention_mask", DType::I64, vec![None, None], ragged),
    ];
    config.outputs = vec![OutputSpec { name: "last_hidden_state".into(), ragged_dim: Some(1) }];
    config
}

/// MiniLM masks padding: a sentence padded to a longer neighbour's length, beside a shorter
/// one, gets the hidden states it gets alone.
#[test]
fn a_minilm_row_padded_beside_longer_and_shorter_neighbours_matches_it_alone() {
    let config = minilm();
    let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
    let reference = model_path("../reference/embeddings.json");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference).expect("reference")).expect("json");
    let mut sentences: Vec<Vec<i64>> = reference["input_ids"]
        .as_array()
        .expect("input_ids")
        .iter()
        .map(|ids| ids.as_array().expect("ids").iter().map(|v| v.as_i64().expect("id")).collect())
        .collect();
    sentences.sort_by_key(Vec::len);
    let (short, long) = (sentences[0].clone(), sentences[sentences.len() - 1].clone());
    let middle = sentences[sentences.len() / 2].clone();
    assert!(short.len() < middle.len() && middle.len() < long.len(), "three lengths");
    let request = |ids: &[i64]| {
        let shape = vec![1, ids.len() as u32];
        vec![i64_tensor(shape.clone(), ids), i64_tensor(shape, &vec![1; ids.len()])]
    };
    let alone = model.forward(&request(&middle)).expect("alone");
    assert!(padding_changes_outputs(&model, &config, config.precision).is_none(), "the load-time probe agrees");
    let batch = [request(&short), request(&middle), request(&long)];
    let parts: Vec<&[HostTensor]> = batch.iter().map(Vec::as_slice).collect();
    let merged = batch::merge(&config.inputs, &parts);
    let lens: Vec<Option<u32>> = batch.iter().map(|r| batch::ragged_len(&config.inputs, r)).collect();
    let outputs = model.forward(&merged).expect("batched");
    let split = batch::split(outputs, &config.outputs, &[1, 1, 1], &lens).expect("split");
    assert_eq!(split[1][0].shape, alone[0].shape);
    let worst = f32s(&split[1][0])
        .iter()
        .zip(f32s(&alone[0]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "padded row differs from the row alone by {worst}");
    // The sentence embedding (mean over positions, L2-normalised, as the guest computes it).
    let embed = |hidden: &HostTensor| -> Vec<f32> {
        let values = f32s(hidden);
        let dim = hidden.shape[2] as usize;
        let positions = values.len() / dim;
        let mut mean: Vec<f32> = (0..dim).map(|d| (0..positions).map(|p| values[p * dim + d]).sum::<f32>() / positions as f32).collect();
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt();
        mean.iter_mut().for_each(|v| *v /= norm);
        mean
    };
    let embedding_difference = embed(&split[1][0])
        .iter()
        .zip(embed(&alone[0]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(embedding_difference <= 1e-6, "embeddings differ by {embedding_difference}");

    eprintln!("MiniLM padded vs alone: hidden states within {worst:e}, embedding within {embedding_difference:e}");
}

/// A model that averages over padding is found out at load, and then never gets requests
/// of different lengths in one batch: every answer equals the request's answer alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_mask_padding_never_batches_different_lengths() {
    let masked = ready(tokenwise(policy(8, 0), 1)).await;
    assert!(masked.ragged_batching(), "tokenwise masks padding");
    let mut config = tokenwise(policy(32, 2_000), 1);
    config.name = "unmasked".into();
    config.path = model_path("unmasked.pt");
    config.inputs = vec![InputSpec::new("ids", DType::I64, vec![None, None], Some(Ragged { dim: 1, pad: 0.0 }))];
    config.outputs = vec![OutputSpec { name: "pooled".into(), ragged_dim: None }];
    let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
    let difference = padding_changes_outputs(&model, &config, config.precision).expect("padding changes its outputs");
    assert!(difference > 1e-3, "{difference}");
    // In reduced precision the noise is larger; the probe still tells the two apart.
    for (mut reduced, masks) in [(tokenwise(policy(8, 0), 1), true), (config.clone(), false)] {
        reduced.precision = Precision::Bf16;
        let (model, _) = load_and_warm_up(&Torch::default(), &reduced, Device::Cpu).expect("bf16 load");
        assert_eq!(padding_changes_outputs(&model, &reduced, reduced.precision).is_none(), masks, "{} in bf16", reduced.name);
    }
    let handle = ready(config).await;
    assert!(!handle.ragged_batching());
    let mut rng = Rng(21);
    let requests: Vec<Vec<HostTensor>> = (0..24)
        .map(|i| {
            let len = 2 + (i % 5);
            let ids: Vec<i64> = (0..len).map(|_| 1 + rng.below(999) as i64).collect();
            vec![i64_tensor(vec![1, len], &ids)]
        })
        .collect();
    let alone: Vec<Vec<HostTensor>> = requests.iter().map(|r| model.forward(r).expect("alone")).collect();
    // Everything queues behind one long pass, so the scheduler has all 24 to batch at once.
    let (h, big) = (handle.clone(), vec![i64_tensor(vec![512, 4096], &vec![1; 512 * 4096])]);
    let busy = tokio::spawn(async move { h.infer(big, InferOptions::default()).await });
    while handle.counters().executions.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    let calls: Vec<_> = requests
        .into_iter()
        .map(|r| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.infer(r, InferOptions::default()).await })
        })
        .collect();
    until_queued(&handle, 24).await;
    busy.await.expect("task").expect("long pass");
    for (i, (answer, want)) in futures::future::join_all(calls).await.into_iter().zip(alone).enumerate() {
        let got = answer.expect("task").expect("answer");
        assert_close(&got, &want, &format!("request {i}"));
    }
    let passes = handle.counters().executions.load(Ordering::Relaxed) - 1;
    assert!(passes <= 10, "equal lengths were still batched together ({passes} passes for 24 requests)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_the_model_fails_alone_and_its_neighbours_get_their_own_results() {
    let config = tokenwise(policy(8, 0), 1);
    let model = TorchModel::load(&config, Device::Cpu, Cast::Parameters).expect("load");
    let counters = ModelCounters::default();
    let mut rng = Rng(7);
    let mut pending = Vec::new();
    let mut answers = Vec::new();
    // Two bad requests among six, one of them also the longest (every neighbour padded to it).
    for (i, bad) in [false, true, false, false, true, false].into_iter().enumerate() {
        let mut inputs = token_request(&mut rng, 1 + (i as u32 % 2), 3 + i as u32);
        if bad {
            let len = inputs[0].shape[1] as usize;
            let mut ids = vec![1i64; inputs[0].rows() as usize * len];
            ids[len - 1] = 5000;
            inputs[0] = i64_tensor(inputs[0].shape.clone(), &ids);
        }
        let alone = (!bad).then(|| model.forward(&inputs).expect("alone"));
        let (p, answer) = queued(&config, inputs);
        pending.push(p);
        answers.push((answer, alone));
    }
    run_batch(&model, &config, &counters, pending);
    for (i, (answer, alone)) in answers.into_iter().enumerate() {
        match (answer.await.expect("answered"), alone) {
            (Ok((got, batched)), Some(want)) => {
                assert_close(&got, &want, &format!("request {i}"));
                // Answered by a pass of its own or with the other good ones, never the whole batch.
                assert!(batched.requests < 6, "request {i} was answered by a pass of {}", batched.requests);
            }
            (Err(InferError::Runtime { message, .. }), None) => {
                assert!(message.contains("index out of range"), "{message}");
            }
            (other, alone) => panic!("request {i} (bad: {}): unexpected {other:?}", alone.is_none()),
        }
    }
    assert!(counters.isolated.load(Ordering::Relaxed) >= 2, "the failed batch was split");
    assert_eq!(counters.executions.load(Ordering::Relaxed), 1, "one batch, counted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first_and_a_lone_request_never_waits() {
    let mut rng = Rng(9);
    // An idle model answers a lone request without waiting for its 500 ms batching window
    // (the bound is loose because other tests load the same two cores).
    let eager = ready(tokenwise(policy(16, 500_000), 2)).await;
    for _ in 0..3 {
        let started = Instant::now();
        eager.infer(token_request(&mut rng, 1, 4), InferOptions::default()).await.expect("lone");
        assert!(started.elapsed() < Duration::from_millis(250), "lone request waited {:?}", started.elapsed());
    }

    let handle = ready(tokenwise(policy(1, 0), 1)).await;

    let blocker = occupy(&handle, &mut rng).await;
    let mut tasks = Vec::new();
    for (label, priority) in [("low-1", 0), ("low-2", 0), ("low-3", 0), ("high", 9)] {
        // Each runs for tens of milliseconds: a task's wake-up, late by a few milliseconds on
        // two loaded cores, cannot reorder the completions (at about a millisecond each, it
        // did once in a CI run beside a build).
        let (h, inputs) = (handle.clone(), token_request(&mut rng, 128, 2048));
        tasks.push(tokio::spawn(async move {
            h.infer(inputs, InferOptions { priority, timeout: None }).await.expect("infer");
            (Instant::now(), label)
        }));
    }
    until_queued(&handle, 4).await;
    blocker.await.expect("task").expect("blocker");
    let mut order = Vec::new();
    for t in tasks {
        order.push(t.await.expect("task"));
    }
    order.sort();
    let order: Vec<&str> = order.into_iter().map(|(_, label)| label).collect();
    assert_eq!(order[0], "high", "completion order {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_quickly_and_a_short_timeout_is_honoured() {
    let mut config = tokenwise(policy(1, 0), 1);
    config.batching.max_queue_size = 2;
    let handle = ready(config).await;
    let mut rng = Rng(10);
    let blocker = occupy(&handle, &mut rng).await;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (h, inputs) = (handle.clone(), token_request(&mut rng, 1, 4));
        waiting.push(tokio::spawn(async move { h.infer(inputs, InferOptions::default()).await.map(|_| ()) }));
    }
    until_queued(&handle, 2).await;
    let started = Instant::now();
    let refused = handle.infer(token_request(&mut rng, 1, 4), InferOptions::default()).await;
    assert!(matches!(refused, Err(InferError::Overloaded(_))), "{refused:?}");
    // Refused at once, not after the 170 ms+ forward pass ahead of it.
    assert!(started.elapsed() < Duration::from_millis(100), "{:?}", started.elapsed());
    blocker.await.expect("task").expect("blocker");
    for w in waiting {
        w.await.expect("task").expect("queued requests still run");
    }
    // A request may shorten the model's 60 s timeout.
    let blocker = occupy(&handle, &mut rng).await;
    let short = InferOptions { priority: 0, timeout: Some(Duration::from_millis(1)) };
    let timed_out = handle.infer(token_request(&mut rng, 1, 4), short).await;
    assert!(matches!(timed_out, Err(InferError::Timeout { .. })), "{timed_out:?}");
    blocker.await.expect("task").expect("blocker");
}

pub(crate) fn test_shared(config: ModelConfig) -> Arc<Shared> {
    Shared::for_tests(config)
}

#[test]
fn the_next_batch_goes_to_the_device_with_the_least_outstanding_work() {
    let mut scheduler = Scheduler::new(test_shared(tokenwise(policy(8, 0), 3)), Arc::new(Torch::default()), mpsc::channel().0, 3);
    for (id, device, busy) in [(0, Device::Cuda(0), true), (1, Device::Cuda(0), false), (2, Device::Cuda(1), false)] {
        scheduler.replicas.push(Replica { slot: ReplicaSlot::new(id, device), work: None, ready: true, busy, draining: false });
    }
    // cuda:0 already runs a batch, cuda:1 nothing: replica 2.
    assert_eq!(scheduler.idle_replica(), Some(2));
    scheduler.replicas[2].busy = true;
    assert_eq!(scheduler.idle_replica(), Some(1));
    // Loading and draining replicas take no work.
    scheduler.replicas[1].ready = false;
    assert_eq!(scheduler.idle_replica(), None);
    scheduler.replicas[1].ready = true;
    scheduler.replicas[1].draining = true;
    assert_eq!(scheduler.idle_replica(), None);
}

/// A scale-up that fails to load while the scaler removes a replica: both lower the target,
/// but the last replica stays and the target says one.
#[test]
fn a_failed_scale_up_racing_a_removal_never_drains_the_last_replica() {
    let shared = test_shared(tokenwise(policy(8, 0), 1));
    let mut scheduler = Scheduler::new(Arc::clone(&shared), Arc::new(Torch::default()), mpsc::channel().0, 1);
    for (id, ready) in [(0, true), (1, false)] {
        let slot = ReplicaSlot::new(id, Device::Cpu);
        shared.slots().push(Arc::clone(&slot));
        scheduler.replicas.push(Replica { slot, work: None, ready, busy: false, draining: false });
    }
    scheduler.set_target(2);
    // The scale-up fails to load just before the scaler's removal arrives.
    scheduler.loaded(1, Err(BackendError::Load("out of memory".into())));
    let (reply, removed) = mpsc::sync_channel(1);
    scheduler.handle(Command::RemoveReplica(reply));
    assert!(!removed.recv().expect("an answer"), "the last replica was reported drained");
    assert_eq!(scheduler.replicas.len(), 1);
    assert!(!scheduler.replicas[0].draining, "the last replica was drained");
    assert_eq!(shared.target.load(Ordering::Acquire), 1);
    assert_eq!(shared.slots().len(), 1);
}

/// Replicas placed on simulated GPUs, added and drained while four clients keep sending:
/// every request is answered correctly, the work spreads over the replicas, and removed
/// replicas give their GPU memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_added_and_drained_under_load_lose_nothing() {
    let gpus = crate::fleet::placement::tests::simulated(&[(4096, 0, 0), (4096, 0, 0)]);
    let mut config = tokenwise(policy(4, 0), 1);
    config.replicas = Replicas { min: 1, max: 3 };
    config.device = DeviceChoice::Auto;
    config.memory_headroom_bytes = 256 << 20;
    let placer = Placer::new(Arc::clone(&gpus), 95);
    let handle = crate::fleet::start_model(&config, &placer, Arc::new(EventLog::new(16)), std::time::Duration::from_secs(60)).expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(handle.state(), ModelState::Ready(_)) {
        assert!(Instant::now() < deadline, "not ready: {:?}", handle.state());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handle.replicas()[0].device, "cuda:0");
    // cuda:1 has more free memory now that cuda:0 holds a replica.
    let weights = handle.load().weights;
    let second = placer.place(handle.config(), weights, Purpose::ScaleUp).expect("second");
    assert_eq!(second.device, Device::Cuda(1));
    assert!(handle.add_replica(second));
    assert!(handle.add_replica(placer.place(handle.config(), weights, Purpose::ScaleUp).expect("third")));
    while handle.load().target < 3 {
        assert!(Instant::now() < deadline, "target stays at {}", handle.load().target);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while handle.replicas().iter().filter(|r| r.state == ReplicaState::Ready).count() < 3 {
        assert!(Instant::now() < deadline, "replicas not ready: {:?}", handle.replicas());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let booked = gpus.ledger.loaded(0) + gpus.ledger.loaded(1);
    assert!(booked >= 3 * (256 << 20), "{booked}");

    let single = ready(tokenwise(policy(1, 0), 1)).await;
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 0..4u64 {
        let (h, single, sent) = (handle.clone(), single.clone(), Arc::clone(&sent));
        clients.push(tokio::spawn(async move {
            let mut rng = Rng(client + 100);
            for _ in 0..150 {
                let len = 1 + rng.below(24) as u32;
                let rows = 1 + rng.below(2) as u32;
                let inputs = token_request(&mut rng, rows, len);
                sent.fetch_add(1, Ordering::Relaxed);
                let got = h.infer(inputs.clone(), InferOptions::default()).await.expect("no request fails");
                let want = single.infer(inputs, InferOptions::default()).await.expect("reference");
                assert_close(&got, &want, "scaled");
            }
        }));
    }
    while sent.load(Ordering::Relaxed) < 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let worked = handle.replicas().iter().filter(|r| r.batches > 0).count();
    assert!(worked >= 2, "work did not spread: {:?}", handle.replicas());
    assert!(handle.remove_replica());
    assert!(handle.remove_replica());
    // The last replica always stays.
    assert!(!handle.remove_replica());
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(handle.counters().inferences.load(Ordering::Relaxed), 600);
    while handle.replicas().len() > 1 {
        assert!(Instant::now() < deadline, "drained replicas linger: {:?}", handle.replicas());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give the stopped threads a moment to drop their bookings.
    let mut left = u64::MAX;
    while Instant::now() < deadline {
        left = gpus.ledger.loaded(0) + gpus.ledger.loaded(1);
        if left < 2 * (256 << 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!((256 << 20..2 * (256 << 20)).contains(&left), "one replica's memory stays booked: {left}");
}
