//! A handler as someone writing for `wasmtime serve -S nn` (its PyTorch backend) would: no Kiln
//! SDK, only the `wasi` crate and wasi:nn bindings. It sends its one input under the name
//! `input` (that host passes inputs by position and ignores names) and reads the output called
//! `output` (the name that host gives its single output). `POST /` with a JSON array of 64
//! pixel values in [0, 1] answers `{"logits": [...]}` from the model loaded as `mnist8`.
//!
//! On Kiln it runs unchanged once the model's config names its input and output that way
//! (`docs/PORTABILITY.md`).

#[allow(missing_docs, clippy::all, unreachable_pub)]
mod nn {
    wit_bindgen::generate!({
        path: "../../../wit",
        world: "wasi:nn/ml",
        generate_all,
    });
}

use nn::wasi::nn::graph;
use nn::wasi::nn::tensor::{Tensor, TensorType};
use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Foreign;

impl wasi::exports::http::incoming_handler::Guest for Foreign {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let (status, body) = match read_body(&request).and_then(|body| classify(&body)) {
            Ok(logits) => (200, serde_json::json!({ "logits": logits })),
            Err(error) => (400, serde_json::json!({ "error": error })),
        };
        respond(out, status, body.to_string().as_bytes());
    }
}

wasi::http::proxy::export!(Foreign);

fn classify(body: &[u8]) -> Result<Vec<f32>, String> {
    let pixels: Vec<f32> = serde_json::from_slice(body).map_err(|e| format!("send a JSON array of 64 numbers: {e}"))?;
    if pixels.len() != 64 {
        return Err(format!("send 64 pixel values, not {}", pixels.len()));
    }
    let bytes: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
    let graph = graph::load_by_name("mnist8").map_err(|e| format!("load: {}", e.data()))?;
    let context = graph.init_execution_context().map_err(|e| format!("context: {}", e.data()))?;
    let input = Tensor::new(&[1, 1, 8, 8], TensorType::Fp32, &bytes);
    let outputs = context.compute(vec![("input".to_owned(), input)]).map_err(|e| format!("compute: {}", e.data()))?;
    let (_, output) = outputs
        .into_iter()
        .find(|(name, _)| name == "output")
        .ok_or_else(|| "the host returned no tensor named 'output'".to_owned())?;
    Ok(output.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn read_body(request: &IncomingRequest) -> Result<Vec<u8>, String> {
    let body = request.consume().map_err(|()| "no body".to_owned())?;
    let stream = body.stream().map_err(|()| "no body stream".to_owned())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(wasi::io::streams::StreamError::Closed) => break,
            Err(e) => return Err(format!("reading the body: {e:?}")),
        }
        if bytes.len() > 1 << 20 {
            return Err("the body is over 1 MiB".to_owned());
        }
    }
    Ok(bytes)
}

fn respond(out: ResponseOutparam, status: u16, bytes: &[u8]) {
    let headers = Fields::new();
    // A fixed, valid header: this cannot fail.
    let _ = headers.set("content-type", &[b"application/json".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = body.write() {
        for chunk in bytes.chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                break;
            }
        }
    }
    let _ = OutgoingBody::finish(body, None);
}
