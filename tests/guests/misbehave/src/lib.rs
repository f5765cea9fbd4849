//! A guest that misbehaves on purpose, one route per misdeed, for the sandbox tests.
//!
//! Routes that probe `wasi:nn` answer 200 with `{"code": ..., "message": ...}` describing what
//! the host said, so the test can check the exact error.

use kiln_guest::raw::{graph, inference, tensor};
use kiln_guest::{Error, Handler, Request, Response};
use serde_json::json;

struct Misbehave;

impl Handler for Misbehave {
    fn handle(request: Request) -> Result<Response, Error> {
        let path = request.path().to_owned();
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        match route {
            "/echo" => Ok(Response::bytes(200, "application/octet-stream", request.body())),
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
            "/panic" => panic!("this guest panics on purpose"),
            "/print" => {
                println!("hello from the guest's stdout");
                eprintln!("hello from the guest's stderr");
                Ok(Response::text(200, "printed"))
            }
            "/env" => Ok(Response::json(200, &std::env::vars().collect::<Vec<_>>())?),
            "/file" => Ok(Response::text(
                200,
                match std::fs::read_to_string("/etc/passwd") {
                    Ok(_) => "read".to_owned(),
                    Err(e) => format!("denied: {e}"),
                },
            )),
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
            _ => Err(Error::with_status(404, format!("no route {route}"))),
        }
    }
}

kiln_guest::export_handler!(Misbehave);

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
