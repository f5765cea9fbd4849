//! A guest that misbehaves on purpose, one route per misdeed, for the sandbox and hostile-guest
//! tests. It imports nothing a handler may not (see the `forbidden` guest for that).
//!
//! Routes that probe `wasi:nn` answer 200 with `{"code": ..., "message": ...}` describing what
//! the host said, so the test can check the exact error.

use kiln_guest::__private::wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};
use kiln_guest::__private::wasi::http::outgoing_handler;
use kiln_guest::raw::{graph, inference, tensor};
use kiln_guest::{Error, Handler, Request, Response};
use serde_json::json;

struct Misbehave;

/// Streams `/big-response` itself; every other route goes through the SDK.
struct Export;

impl kiln_guest::__private::IncomingHandler for Export {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query();
        if path.as_deref() == Some("/big-response") {
            stream_a_gibibyte(out);
        } else if path.as_deref() == Some("/answer-then-spin") {
            answer_then_spin(out);
        } else {
            kiln_guest::__private::serve::<Misbehave>(request, out);
        }
    }
}

kiln_guest::__private::wasi::http::proxy::export!(Export with_types_in kiln_guest::__private::wasi);

/// Writes 1 GiB of response body, 4 KiB at a time, stopping only when the host refuses more.
fn stream_a_gibibyte(out: ResponseOutparam) {
    let response = OutgoingResponse::new(Fields::new());
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    let Ok(stream) = body.write() else { return };
    let chunk = vec![b'x'; 4096];
    let mut written: u64 = 0;
    while written < 1 << 30 {
        if stream.blocking_write_and_flush(&chunk).is_err() {
            eprintln!("big-response: the host stopped the body after {written} bytes");
            return;
        }
        written += chunk.len() as u64;
    }
    drop(stream);
    let _ = OutgoingBody::finish(body, None);
}

/// Answers at once and finishes the body, then keeps computing until the deadline stops it:
/// the client is done, the sandbox is not.
fn answer_then_spin(out: ResponseOutparam) {
    let response = OutgoingResponse::new(Fields::new());
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = body.write() {
        let _ = stream.blocking_write_and_flush(b"answered");
    }
    let _ = OutgoingBody::finish(body, None);
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Bytes of the marker `/plant` leaves at the start of every page it touches.
const MARKER_LEN: usize = 64;
const PAGE: usize = 4096;

/// The marker's bytes, computed and never stored whole, so a scan finds only planted copies.
fn marker(i: usize) -> u8 {
    ((i as u32).wrapping_mul(131).wrapping_add(71) ^ 0xC3) as u8
}

/// Leaves the marker at the start of every page of 3 MiB of heap (past the first pages a slot
/// reset always clears), as a tenant's secret would be left; returns how many copies.
fn plant() -> usize {
    let mut heap = vec![0u8; 3 << 20];
    let base = heap.as_ptr() as usize;
    let mut at = base.next_multiple_of(PAGE) - base;
    let mut planted = 0;
    while at + MARKER_LEN <= heap.len() {
        for i in 0..MARKER_LEN {
            heap[at + i] = marker(i);
        }
        at += PAGE;
        planted += 1;
    }
    std::hint::black_box(&heap);
    planted
}

/// Grows linear memory by 8 MiB and looks for the marker at the start of every page of all
/// of it: what an attacker's guest would do to read what the sandbox's previous tenant left.
fn scan() -> serde_json::Value {
    let grown = core::arch::wasm32::memory_grow(0, 128) != usize::MAX;
    let size = core::arch::wasm32::memory_size(0) * 65536;
    let mut found = 0;
    let mut addr = PAGE;
    while addr + MARKER_LEN <= size {
        // SAFETY: every address below memory_size is readable linear memory.
        let matches = (0..MARKER_LEN).all(|i| unsafe { core::ptr::read_volatile((addr + i) as *const u8) } == marker(i));
        found += usize::from(matches);
        addr += PAGE;
    }
    json!({ "found": found, "scanned_bytes": size, "grown": grown })
}

/// The count in a `?N` query.
fn count(query: &str) -> Result<usize, Error> {
    query.parse().map_err(|_| Error::bad_request("?COUNT"))
}

impl Handler for Misbehave {
    fn handle(request: Request) -> Result<Response, Error> {
        let path = request.path().to_owned();
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        match route {
            "/echo" => Ok(Response::bytes(200, "application/octet-stream", request.body())),
            // A different answer every time it runs (the clock, and what was sent): a cached one
            // shows as the same answer twice.
            "/cacheable" | "/uncacheable" | "/private" => {
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let answer = Response::text(200, format!("{nanos} {}", String::from_utf8_lossy(request.body())));
                Ok(match route {
                    "/cacheable" => answer.with_header("cache-control", "public, max-age=60"),
                    "/private" => answer.with_header("cache-control", "private, max-age=60"),
                    _ => answer,
                })
            }
            "/loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "/memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "/recurse" => Ok(Response::text(200, recurse(1).to_string())),
            "/plant" => Ok(Response::text(200, plant().to_string())),
            "/scan" => Ok(Response::json(200, &scan())?),
            "/panic" => panic!("this guest panics on purpose"),
            "/print" => {
                println!("hello from the guest's stdout");
                eprintln!("hello from the guest's stderr");
                Ok(Response::text(200, "printed"))
            }
            // Binary junk on both streams: escape sequences, a carriage return, NULs, bytes that
            // are not UTF-8, a forged log line after a newline, and a line far over the limit.
            "/print-junk" => {
                use std::io::Write as _;
                let junk: &[u8] = b"junk \x1b[31mred\x1b[0m \r\0 \xff\xfe \"quoted\" \\ end\n{\"level\":\"ERROR\",\"forged\":true}\n";
                let _ = std::io::stdout().write_all(junk);
                let _ = std::io::stderr().write_all(&[b'x'; 10_000]);
                let _ = std::io::stderr().write_all(b"\n\x07\x08tail without a newline");
                Ok(Response::text(200, "junk printed"))
            }
            "/env" => Ok(Response::json(200, &std::env::vars().collect::<Vec<_>>())?),
            // Tries to pass its own id off as the server's.
            "/request-id" => Ok(Response::text(200, "mine").with_header("kiln-request-id", "chosen-by-the-guest")),
            "/headers" => {
                let seen: Vec<(String, String)> = request
                    .headers()
                    .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
                    .collect();
                Ok(Response::json(200, &seen)?)
            }
            "/print-flood" => loop {
                println!();
            },
            // Each keeps everything it makes alive, as a guest hoarding host memory would.
            "/nn/long-names" => {
                let name = "n".repeat(1 << 20);
                let kept: Vec<_> = (0..count(query)?).map(|_| graph::load_by_name(&name)).collect();
                Ok(Response::text(200, format!("{} loads", kept.len())))
            }
            "/nn/many-dims" => {
                let dims = vec![1u32; 1 << 20];
                let kept: Vec<_> = (0..count(query)?)
                    .map(|_| tensor::Tensor::new(&dims, tensor::TensorType::Fp32, &[0; 4]))
                    .collect();
                Ok(Response::text(200, format!("{} tensors", kept.len())))
            }
            "/nn/contexts" => {
                let graph = graph::load_by_name("digits").map_err(|e| Error::bad_request(e.data()))?;
                let kept: Vec<_> = (0..count(query)?).map(|_| graph.init_execution_context()).collect();
                let made = kept.iter().filter(|c| c.is_ok()).count();
                Ok(Response::text(200, format!("{made} contexts")))
            }
            "/nn/outputs" => {
                let graph = graph::load_by_name("digits").map_err(|e| Error::bad_request(e.data()))?;
                let ctx = graph.init_execution_context().map_err(|e| Error::bad_request(e.data()))?;
                let mut kept = Vec::new();
                let mut last = String::new();
                for _ in 0..count(query)? {
                    let input = tensor::Tensor::new(&[1, 1, 8, 8], tensor::TensorType::Fp32, &[0; 256]);
                    match ctx.compute(vec![("image".to_owned(), input)]) {
                        Ok(outputs) => kept.push(outputs),
                        Err(e) => {
                            last = e.data();
                            break;
                        }
                    }
                }
                Ok(Response::json(200, &json!({ "kept": kept.len(), "error": last }))?)
            }
            "/outgoing" => Ok(Response::text(200, outgoing_request())),
            "/sleep" => {
                // Idle, not busy: holds a request slot without using the CPU.
                let ms: u64 = query.parse().map_err(|_| Error::bad_request("?MILLISECONDS"))?;
                kiln_guest::__private::wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
                Ok(Response::text(200, "slept"))
            }
            "/compute-flood" => {
                // Ignores every error, as a careless or hostile guest would.
                let mut ok = 0u32;
                for _ in 0..10_000 {
                    if compute_case("ok").is_ok() {
                        ok += 1;
                    }
                }
                Ok(Response::text(200, format!("{ok} computes succeeded")))
            }
            "/nn/big-tensor" => {
                let bytes: usize = query.parse().map_err(|_| Error::bad_request("?BYTES"))?;
                Ok(report(compute_raw(&[1, 1, 8, 8], vec![0u8; bytes])))
            }
            "/nn/huge-dims" => Ok(report(compute_raw(&[65536, 65536, 8, 8], vec![0u8; 256]))),
            "/nn/load-bytes" => Ok(report(
                graph::load(
                    &[vec![0u8; 16]],
                    graph::GraphEncoding::Pytorch,
                    graph::ExecutionTarget::Cpu,
                )
                .map(|_| ()),
            )),
            "/nn/load" => Ok(report(graph::load_by_name(query).map(|_| ()))),
            "/nn/compute" => Ok(report(compute_case(query))),
            _ if route.starts_with("/path") => Ok(Response::text(200, path.clone())),
            _ => Err(Error::with_status(404, format!("no route {route}"))),
        }
    }
}

/// Tries `GET http://example.com/` and says what happened.
fn outgoing_request() -> String {
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some("example.com"));
    let _ = request.set_path_with_query(Some("/"));
    match outgoing_handler::handle(request, None) {
        Err(e) => format!("denied: {e:?}"),
        Ok(future) => {
            future.subscribe().block();
            match future.get() {
                Some(Ok(Ok(response))) => format!("allowed: status {}", response.status()),
                Some(Ok(Err(e))) => format!("denied: {e:?}"),
                other => format!("denied: {other:?}"),
            }
        }
    }
}

/// One compute on digits with an image tensor of these dimensions and bytes.
fn compute_raw(dims: &[u32], data: Vec<u8>) -> Result<(), kiln_guest::raw::errors::Error> {
    let graph = graph::load_by_name("digits")?;
    let ctx = graph.init_execution_context()?;
    let input = tensor::Tensor::new(dims, tensor::TensorType::Fp32, &data);
    drop(data);
    ctx.compute(vec![("image".to_owned(), input)]).map(drop)
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    // black_box keeps the frame from being turned into a loop.
    std::hint::black_box(depth) + recurse(depth + 1)
}

fn report(result: Result<(), kiln_guest::raw::errors::Error>) -> Response {
    let body = match result {
        Ok(()) => json!({ "code": "ok", "message": "" }),
        Err(e) => {
            let code = format!("{:?}", e.code());
            let code = code.trim_start_matches("ErrorCode::");
            json!({ "code": code, "message": e.data() })
        }
    };
    Response::json(200, &body).unwrap_or_else(|e| Response::text(500, e.to_string()))
}

/// Calls the digits model ([-1, 1, 8, 8] FP32 "image") with one deliberate mistake.
fn compute_case(case: &str) -> Result<(), kiln_guest::raw::errors::Error> {
    let good = vec![0u8; 64 * 4];
    let (name, dims, ty, data) = match case {
        "ok" => ("image", vec![1, 1, 8, 8], tensor::TensorType::Fp32, good),
        "name" => ("pixels", vec![1, 1, 8, 8], tensor::TensorType::Fp32, good),
        "dtype" => ("image", vec![1, 1, 8, 8], tensor::TensorType::I64, vec![0u8; 64 * 8]),
        "rank" => ("image", vec![1, 64], tensor::TensorType::Fp32, good),
        "shape" => ("image", vec![1, 1, 8, 9], tensor::TensorType::Fp32, vec![0u8; 72 * 4]),
        "bytes" => ("image", vec![1, 1, 8, 8], tensor::TensorType::Fp32, vec![0u8; 7]),
        _ => ("image", vec![0], tensor::TensorType::Fp32, vec![]),
    };
    let graph = graph::load_by_name("digits")?;
    let ctx = graph.init_execution_context()?;
    let input = tensor::Tensor::new(&dims, ty, &data);
    let outputs: Vec<inference::NamedTensor> = ctx.compute(vec![(name.to_owned(), input)])?;
    drop(outputs);
    Ok(())
}
