//! OpenAI's embeddings API, so the `openai` client works with `base_url` set to this handler's
//! mount plus `/v1`: `POST /v1/embeddings` and `GET /v1/models`.
//!
//! `input` is a string, a list of strings, a list of token ids or a list of such lists (ids of
//! this model's vocabulary, used as given: send `[CLS] … [SEP]` as the tokenizer makes them).
//! An input longer than the model's 256 tokens is refused, as OpenAI refuses one past its
//! context, rather than cut silently. `encoding_format` is `float` or `base64` (little-endian
//! f32, what the Python client asks for by default); `dimensions` may only be 384, the model's
//! own. Errors have OpenAI's shape.

use base64::Engine as _;
use kiln_guest::{Error, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{MAX_TOKENS, embed, wordpiece};

/// The names this model answers to.
const MODEL_NAMES: [&str; 3] = ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"];
/// Inputs per request, as OpenAI allows; embedded 64 at a time.
const MAX_INPUTS: usize = 2048;
const CHUNK: usize = 64;
const WIDTH: u32 = 384;
/// BERT's uncased vocabulary.
const VOCAB_SIZE: u64 = 30522;

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    // Other fields (`user`) are accepted and ignored, as OpenAI does.
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
fn openai_error(status: u16, message: &str, param: Option<&str>, code: Option<&str>) -> Response {
    let kind = match status {
        401 => "authentication_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body = json!({ "error": { "message": message, "type": kind, "param": param, "code": code } });
    Response::bytes(status, "application/json", body.to_string())
}

/// `POST /v1/embeddings`: every refusal in OpenAI's error shape.
pub(crate) fn embeddings(request: Request) -> Result<Response, Error> {
    Ok(create(&request).unwrap_or_else(|(status, message, param, code)| openai_error(status, &message, param, code)))
}

/// `GET /v1/models`.
pub(crate) fn models(_: Request) -> Result<Response, Error> {
    let list = json!({ "object": "list", "data": [{ "id": MODEL_NAMES[0], "object": "model", "created": 0, "owned_by": "kiln" }] });
    Ok(Response::bytes(200, "application/json", list.to_string()))
}

type Refusal = (u16, String, Option<&'static str>, Option<&'static str>);

fn invalid(message: impl Into<String>, param: &'static str) -> Refusal {
    (400, message.into(), Some(param), None)
}

fn create(request: &Request) -> Result<Response, Refusal> {
    let body: EmbeddingRequest =
        serde_json::from_slice(request.body()).map_err(|e| (400, format!("invalid request body: {e}"), None, None))?;
    if !MODEL_NAMES.contains(&body.model.as_str()) {
        return Err((
            404,
            format!("The model `{}` does not exist; this handler serves {}", body.model, MODEL_NAMES.join(", ")),
            Some("model"),
            Some("model_not_found"),
        ));
    }
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(invalid(format!("encoding_format '{other}' is not 'float' or 'base64'"), "encoding_format")),
    };
    if let Some(d) = body.dimensions
        && d != WIDTH
    {
        return Err(invalid(format!("this model's embeddings have {WIDTH} dimensions; it cannot give {d}"), "dimensions"));
    }
    let specials = wordpiece::Specials::get().ok_or_else(|| (500, "the vocabulary lacks BERT's special tokens".to_owned(), None, None))?;
    let ids = token_ids(&body.input, &specials)?;
    if let Some((i, row)) = ids.iter().enumerate().find(|(_, row)| row.len() > MAX_TOKENS) {
        return Err(invalid(
            format!(
                "This model's maximum context length is {MAX_TOKENS} tokens, however input {i} has {} tokens. \
                 Please reduce the length of the input.",
                row.len()
            ),
            "input",
        ));
    }
    let mut data = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(CHUNK) {
        let vectors = embed(chunk, specials.pad).map_err(|e: Error| (e.status(), e.message().to_owned(), None, None))?;
        for vector in vectors {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            data.push(json!({ "object": "embedding", "index": data.len(), "embedding": embedding }));
        }
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let usage = Usage { prompt_tokens: tokens, total_tokens: tokens };
    let answer = json!({ "object": "list", "data": data, "model": body.model, "usage": usage });
    Ok(Response::bytes(200, "application/json", answer.to_string()))
}

/// Every input as token ids: text through the tokenizer (whole, so a long one can be refused),
/// token ids as given (checked against the vocabulary).
fn token_ids(input: &Value, specials: &wordpiece::Specials) -> Result<Vec<Vec<u32>>, Refusal> {
    let text = |s: &str| {
        if s.is_empty() {
            return Err(invalid("an input string is empty", "input"));
        }
        Ok(wordpiece::encode(s, specials, usize::MAX))
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, Refusal> {
        if items.is_empty() {
            return Err(invalid("a token list is empty", "input"));
        }
        items
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if id < VOCAB_SIZE => Ok(id as u32),
                _ => Err(invalid(format!("{v} is not a token id of this model (0 to {})", VOCAB_SIZE - 1), "input")),
            })
            .collect()
    };
    let rows = match input {
        Value::String(s) => vec![text(s)?],
        Value::Array(items) if items.is_empty() => return Err(invalid("input is empty", "input")),
        Value::Array(items) if items.len() > MAX_INPUTS => {
            return Err(invalid(format!("{} inputs; at most {MAX_INPUTS} per request", items.len()), "input"));
        }
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.iter().map(|s| text(s.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Value::Array(items) if items.iter().all(Value::is_number) => vec![ids(items)?],
        Value::Array(items) if items.iter().all(Value::is_array) => {
            items.iter().map(|row| ids(row.as_array().map_or(&[][..], Vec::as_slice))).collect::<Result<_, _>>()?
        }
        _ => {
            return Err(invalid(
                "input must be a string, a list of strings, a list of token ids or a list of such lists",
                "input",
            ));
        }
    };
    Ok(rows)
}
