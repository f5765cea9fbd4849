//! The scheduler alone, on a scripted backend: batching, isolation, cancellation and the
//! replica set, in milliseconds and without a model file.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::model::error::*;
use crate::model::shared::*;
use crate::model::spec::ModelConfig;
use crate::model::tensor::HostTensor;
use crate::model::backend::fake::{Fake, Script, config, f32_tensor, f32_values};
use crate::model::handle::{InferOptions, ModelHandle};
use crate::model::spec::Replicas;
use crate::telemetry::EventLog;

fn script(forward_ms: u64) -> Fake {
    Fake(Arc::new(Script { forward_delay: Duration::from_millis(forward_ms), ..Script::default() }))
}

fn spawn(config: ModelConfig, fake: &Fake) -> ModelHandle {
    let placements = (0..config.replicas.min).map(|_| Placement::cpu()).collect();
    ModelHandle::spawn(config, placements, Arc::new(fake.clone()), Arc::new(EventLog::new(16))).expect("spawn")
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn ready(handle: &ModelHandle) {
    until("the model is ready", || matches!(handle.state(), ModelState::Ready(_))).await;
}

fn rows(values: &[f32]) -> HostTensor {
    f32_tensor(vec![values.len() as u32, 1], values)
}

fn ask(handle: &ModelHandle, values: &[f32]) -> tokio::task::JoinHandle<Result<Vec<f32>, InferError>> {
    let (handle, input) = (handle.clone(), rows(values));
    tokio::spawn(async move {
        let outputs = handle.infer(vec![input], InferOptions::default()).await?;
        Ok(f32_values(&outputs[0]))
    })
}

/// Starts a request that holds the only replica for the script's forward delay and returns
/// once its pass runs, so what is sent next queues.
async fn occupy(handle: &ModelHandle) -> tokio::task::JoinHandle<Result<Vec<f32>, InferError>> {
    let before = handle.counters().executions.load(Ordering::Relaxed);
    let blocker = ask(handle, &[1000.0]);
    until("the blocker runs", || handle.counters().executions.load(Ordering::Relaxed) > before).await;
    blocker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_batches_answer_each_caller_exactly_its_own_rows() {
    let fake = script(20);
    let handle = spawn(config(8, Replicas::fixed(1)), &fake);
    ready(&handle).await;
    let blocker = occupy(&handle).await;
    let mut callers = Vec::new();
    for i in 0..30u16 {
        let values: Vec<f32> = (0..1 + i % 3).map(|r| f32::from(i * 10 + r)).collect();
        callers.push((values.clone(), ask(&handle, &values)));
    }
    until("all 30 wait", || handle.counters().queued.load(Ordering::Relaxed) == 30).await;
    for (values, caller) in callers {
        let want: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        assert_eq!(caller.await.expect("task").expect("answer"), want);
    }
    blocker.await.expect("task").expect("blocker");
    let passes = fake.0.passes();
    // One warm-up, the blocker, then the 30 queued requests in merged passes of <= 8 rows.
    assert!(passes.len() < 2 + 30, "nothing was batched: {} passes", passes.len());
    assert!(passes.iter().all(|p| p.len() <= 8), "a pass over max_batch_size: {passes:?}");
    assert_eq!(handle.counters().inferences.load(Ordering::Relaxed), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_waits_for_guests_on_their_way_and_a_lone_request_never_waits() {
    // Every pass costs the same whatever its rows, so fuller batches pay.
    let fake = script(100);
    let mut config = config(8, Replicas::fixed(1));
    config.latency_objective = Duration::from_secs(1);
    let handle = spawn(config, &fake);
    ready(&handle).await;
    // A lone request: nothing on its way, so it runs at once (a hold would add 100 ms).
    let started = Instant::now();
    assert_eq!(ask(&handle, &[1.0]).await.expect("task").expect("answer"), vec![2.0]);
    assert!(started.elapsed() < Duration::from_millis(195), "a lone request waited: {:?}", started.elapsed());
    // The pass is timed after its callers are answered.
    until("the pass is on the curve", || !handle.forward_curve().is_empty()).await;
    assert_eq!(handle.forward_curve().first().map(|p| p.0), Some(1));

    // Three guests are running that may call the model; two do, one ends without calling.
    let mut guests: Vec<_> = (0..3).map(|_| handle.expect()).collect();
    assert_eq!(handle.expected(), 3);
    let first = ask(&handle, &[2.0]);
    until("the first waits", || handle.counters().queued.load(Ordering::Relaxed) == 1).await;
    let counters = handle.counters();
    let queued = |n: usize| move || counters.queued.load(Ordering::Relaxed) == n;
    guests[0].arrived(&handle);
    let second = ask(&handle, &[3.0]);
    until("the second waits too", queued(2)).await;
    guests[1].arrived(&handle);
    let third = ask(&handle, &[4.0]);
    until("the third waits too", queued(3)).await;
    // The last guest ends without calling: the held batch goes now.
    drop(guests);
    assert_eq!(handle.expected(), 0);
    for (caller, want) in [(first, 4.0), (second, 6.0), (third, 8.0)] {
        assert_eq!(caller.await.expect("task").expect("answer"), vec![want]);
    }
    let passes = fake.0.passes();
    assert!(passes.contains(&vec![2.0, 3.0, 4.0]), "the three did not share a pass: {passes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_the_backend_fails_alone_and_its_neighbours_get_their_answers() {
    let fake = script(30);
    let handle = spawn(config(16, Replicas::fixed(1)), &fake);
    ready(&handle).await;
    let blocker = occupy(&handle).await;
    let good: Vec<_> = (1..=7).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
    let bad = ask(&handle, &[-1.0]);
    let more: Vec<_> = (8..=11).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
    until("all 12 wait", || handle.counters().queued.load(Ordering::Relaxed) == 12).await;
    let error = bad.await.expect("task").expect_err("the bad request fails");
    assert!(matches!(&error, InferError::Runtime { message, .. } if message.contains("negative input")), "{error:?}");
    for (v, caller) in good.into_iter().chain(more) {
        assert_eq!(caller.await.expect("task").expect("a neighbour's answer"), vec![v * 2.0]);
    }
    blocker.await.expect("task").expect("blocker");
    assert!(handle.counters().isolated.load(Ordering::Relaxed) >= 1);
    // Bisection: a handful of extra passes, not one per request.
    let failed = fake.0.passes().iter().filter(|p| p.contains(&-1.0)).count();
    assert!((2..=5).contains(&failed), "the bad row ran in {failed} passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_is_never_run() {
    let fake = script(20);
    let handle = spawn(config(8, Replicas::fixed(1)), &fake);
    ready(&handle).await;
    let blocker = occupy(&handle).await;
    let gone = ask(&handle, &[77.0]);
    until("the request queues", || handle.counters().queued.load(Ordering::Relaxed) == 1).await;
    gone.abort();
    let _ = gone.await;
    blocker.await.expect("task").expect("blocker");
    assert_eq!(ask(&handle, &[5.0]).await.expect("task").expect("answer"), vec![10.0]);
    assert!(!fake.0.passes().iter().any(|p| p.contains(&77.0)), "a withdrawn request ran");
    assert_eq!(handle.counters().dropped.load(Ordering::Relaxed), 1);
    assert_eq!(handle.counters().queued.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_a_short_timeout_gives_up() {
    let fake = script(30);
    let mut c = config(1, Replicas::fixed(1));
    c.batching.max_queue_size = 2;
    let handle = spawn(c, &fake);
    ready(&handle).await;
    let blocker = occupy(&handle).await;
    let queued: Vec<_> = (0..2).map(|i| ask(&handle, &[i as f32])).collect();
    until("two wait", || handle.counters().queued.load(Ordering::Relaxed) == 2).await;
    let refused = ask(&handle, &[9.0]).await.expect("task");
    assert!(matches!(refused, Err(InferError::Overloaded(_))), "{refused:?}");
    for q in queued {
        q.await.expect("task").expect("queued requests run");
    }
    blocker.await.expect("task").expect("blocker");
    let blocker = occupy(&handle).await;
    let short = InferOptions { priority: 0, timeout: Some(Duration::from_millis(1)) };
    let timed_out = handle.infer(vec![rows(&[1.0])], short).await;
    assert!(matches!(timed_out, Err(InferError::Timeout { .. })), "{timed_out:?}");
    blocker.await.expect("task").expect("blocker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_come_and_go_by_command_and_the_last_one_stays() {
    let fake = script(5);
    let handle = spawn(config(4, Replicas { min: 1, max: 4 }), &fake);
    ready(&handle).await;
    assert_eq!(handle.load().target, 1);
    assert!(handle.add_replica(Placement::cpu()));
    assert!(handle.add_replica(Placement::cpu()));
    until("three replicas are ready", || handle.load().ready == 3).await;
    assert_eq!(handle.load().target, 3);
    // Work spreads while replicas are drained under it, and nothing is lost.
    let callers: Vec<_> = (0..60).map(|i| (i as f32, ask(&handle, &[i as f32]))).collect();
    until("work spreads", || handle.replicas().iter().filter(|r| r.batches > 0).count() >= 2).await;
    assert!(handle.remove_replica());
    assert!(handle.remove_replica());
    assert!(!handle.remove_replica(), "the last replica was drained");
    assert_eq!(handle.load().target, 1);
    for (v, caller) in callers {
        assert_eq!(caller.await.expect("task").expect("no request is lost"), vec![v * 2.0]);
    }
    until("drained replicas go", || handle.replicas().len() == 1).await;

    // A scale-up whose load fails leaves the target where it was, and the model serving.
    fake.0.fail_loads.store(1, Ordering::Release);
    assert!(handle.add_replica(Placement::cpu()));
    until("the failed replica is forgotten", || {
        fake.0.fail_loads.load(Ordering::Acquire) == 0 && handle.replicas().len() == 1 && handle.load().target == 1
    })
    .await;
    assert!(matches!(handle.state(), ModelState::Ready(_)));
    assert_eq!(ask(&handle, &[3.0]).await.expect("task").expect("still serving"), vec![6.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_first_load_fails_says_why_and_refuses_work() {
    let fake = script(0);
    fake.0.fail_loads.store(1, Ordering::Release);
    let handle = spawn(config(4, Replicas::fixed(1)), &fake);
    until("the load fails", || matches!(handle.state(), ModelState::Failed(_))).await;
    let ModelState::Failed(reason) = handle.state() else { panic!("{:?}", handle.state()) };
    assert!(reason.contains("scripted load failure"), "{reason}");
    let refused = ask(&handle, &[1.0]).await.expect("task");
    assert!(matches!(refused, Err(InferError::NotReady { .. })), "{refused:?}");
    assert!(handle.replicas().is_empty(), "a failed replica stays listed: {:?}", handle.replicas());
}
