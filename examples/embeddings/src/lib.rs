//! Sentence embeddings with all-MiniLM-L6-v2.
//!
//! `POST /` with `{"sentences": ["...", ...]}` returns `{"embeddings": [[f32; 384], ...]}`:
//! tokenized here in the guest, one batched forward pass on the host, then mean pooling over the
//! attention mask and L2 normalization here again. `POST /tokenize` returns the token ids, so the
//! tokenizer can be checked against the reference one. `POST /v1/embeddings` speaks OpenAI's
//! embeddings API (see [`openai`]).

mod openai;
mod wordpiece;

use kiln_guest::{Error, Handler, Model, Request, Response, Router, Tensor};
use serde::{Deserialize, Serialize};

/// The model's position limit, [CLS] and [SEP] included.
pub(crate) const MAX_TOKENS: usize = 256;
/// Sentences per request; more should be split across requests.
const MAX_SENTENCES: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    sentences: Vec<String>,
}

#[derive(Serialize)]
struct Output {
    embeddings: Vec<Vec<f32>>,
}

#[derive(Serialize)]
struct Tokens {
    input_ids: Vec<Vec<u32>>,
}

struct Embeddings;

impl Handler for Embeddings {
    fn handle(request: Request) -> Result<Response, Error> {
        Router::new()
            .post("/", sentences)
            .post("/tokenize", tokenize)
            .post("/v1/embeddings", openai::embeddings)
            .get("/v1/models", openai::models)
            .handle(request)
    }
}

fn sentences(request: Request) -> Result<Response, Error> {
    let (ids, specials) = token_ids(&request)?;
    Response::json(200, &Output { embeddings: embed(&ids, specials.pad)? })
}

fn tokenize(request: Request) -> Result<Response, Error> {
    let (input_ids, _) = token_ids(&request)?;
    Response::json(200, &Tokens { input_ids })
}

/// The token ids of `{"sentences": [...]}`, each cut at the model's limit.
fn token_ids(request: &Request) -> Result<(Vec<Vec<u32>>, wordpiece::Specials), Error> {
    let input: Input = request.json()?;
    if input.sentences.is_empty() || input.sentences.len() > MAX_SENTENCES {
        return Err(Error::bad_request(format!(
            "send 1 to {MAX_SENTENCES} sentences, got {}",
            input.sentences.len()
        )));
    }
    let specials = wordpiece::Specials::get()
        .ok_or_else(|| Error::internal("the vocabulary lacks BERT's special tokens"))?;
    let ids = input.sentences.iter().map(|s| wordpiece::encode(s, &specials, MAX_TOKENS)).collect();
    Ok((ids, specials))
}

kiln_guest::export_handler!(Embeddings);

pub(crate) fn embed(ids: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f32>>, Error> {
    let rows = ids.len();
    let len = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows * len);
    let mut mask = Vec::with_capacity(rows * len);
    for row in ids {
        for i in 0..len {
            input_ids.push(i64::from(row.get(i).copied().unwrap_or(pad)));
            mask.push(i64::from(i < row.len()));
        }
    }
    let shape = [rows as u32, len as u32];
    // In the model's `forward` order, declared, so positional hosts get them right too.
    let model = Model::load("minilm")?.with_signature(&["input_ids", "attention_mask"], &["last_hidden_state"]);
    let outputs = model.infer(&[
        ("input_ids", Tensor::from_i64(&shape, &input_ids)?),
        ("attention_mask", Tensor::from_i64(&shape, &mask)?),
    ])?;
    let hidden = outputs.get("last_hidden_state")?;
    let dims = hidden.shape();
    if dims.len() != 3 || dims[0] as usize != rows || dims[1] as usize != len {
        return Err(Error::internal(format!(
            "unexpected hidden state shape {dims:?} for {rows}×{len} tokens"
        )));
    }
    let width = dims[2] as usize;
    let hidden = hidden.to_f32()?;
    Ok((0..rows)
        .map(|r| {
            let tokens = ids[r].len();
            let mut pooled = vec![0f32; width];
            for t in 0..tokens {
                let at = (r * len + t) * width;
                for (p, h) in pooled.iter_mut().zip(&hidden[at..at + width]) {
                    *p += h;
                }
            }
            let n = tokens.max(1) as f32;
            pooled.iter_mut().for_each(|p| *p /= n);
            let norm = pooled.iter().map(|p| p * p).sum::<f32>().sqrt().max(1e-12);
            pooled.iter_mut().for_each(|p| *p /= norm);
            pooled
        })
        .collect())
}
