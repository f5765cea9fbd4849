//! {{name}}: a Kiln handler. `POST /` with `{"texts": ["...", ...]}`; each text is tokenized here
//! in the guest (WordPiece over `vocab.txt`, compiled in), the model runs once on the batch, and
//! the answer is one L2-normalized, mean-pooled vector per text, `{"vectors": [[...], ...]}`.
//!
//! Made by `kiln new --template text` for the bundled `minilm` model (a BERT: `input_ids` and
//! `attention_mask` in, `last_hidden_state` out): change the constants below for another.
//!
//! The vocabulary's hash map is built by `warm` at build time: `kiln build` pre-initialises the
//! component (Wizer), so each request starts with it instead of hashing 30,000 tokens again.
//! Built by plain `cargo build`, the first use of `vocabulary()` builds it instead.

use kiln_guest::{Error, Handler, Model, Request, Response, Router, Tensor};
use serde::{Deserialize, Serialize};

/// The model, as the server's config names it, and its output.
const MODEL: &str = "minilm";
const OUTPUT: &str = "last_hidden_state";
/// Tokens per text, `[CLS]` and `[SEP]` included; longer texts are cut.
const MAX_TOKENS: usize = 128;
/// Texts per request.
const MAX_TEXTS: usize = 32;
/// The model's vocabulary, one token per line: a token's id is its line number.
const VOCAB: &str = include_str!("../vocab.txt");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    texts: Vec<String>,
}

#[derive(Serialize)]
struct Output {
    vectors: Vec<Vec<f32>>,
}

struct Texts;

impl Handler for Texts {
    fn handle(request: Request) -> Result<Response, Error> {
        // More routes go here: `.get("/info", info)`, `.post("/items/{id}", item)`, ...
        Router::new().post("/", vectors).handle(request)
    }
}

fn vectors(request: Request) -> Result<Response, Error> {
    let input: Input = request.json()?;
    if input.texts.is_empty() || input.texts.len() > MAX_TEXTS {
        return Err(Error::bad_request(format!("send 1 to {MAX_TEXTS} texts, got {}", input.texts.len())));
    }
    let vocab = vocabulary()?;
    let ids: Vec<Vec<i64>> = input.texts.iter().map(|t| vocab.encode(t, MAX_TOKENS)).collect();
    // One batch, padded to the longest text; the mask tells the model which tokens are real.
    let width = ids.iter().map(Vec::len).max().unwrap_or(0);
    let shape = [ids.len() as u32, width as u32];
    let padded: Vec<i64> = ids.iter().flat_map(|row| (0..width).map(|i| row.get(i).copied().unwrap_or(vocab.pad))).collect();
    let mask: Vec<i64> = ids.iter().flat_map(|row| (0..width).map(|i| i64::from(i < row.len()))).collect();
    // The model's inputs in its `forward` order, declared so hosts that pass tensors by
    // position (`wasmtime serve -S nn`) get them right too.
    let model = Model::load(MODEL)?.with_signature(&["input_ids", "attention_mask"], &[OUTPUT]);
    let outputs = model.infer(&[
        ("input_ids", Tensor::from_i64(&shape, &padded)?),
        ("attention_mask", Tensor::from_i64(&shape, &mask)?),
    ])?;
    let hidden = outputs.get(OUTPUT)?;
    let dims = hidden.shape().to_vec();
    if dims.len() != 3 || dims[0] as usize != ids.len() || dims[1] as usize != width {
        return Err(Error::internal(format!("the model answered with shape {dims:?}")));
    }
    let hidden = hidden.to_f32()?;
    let lengths: Vec<usize> = ids.iter().map(Vec::len).collect();
    Response::json(200, &Output { vectors: pool(&hidden, &lengths, width, dims[2] as usize) })
}

/// The vocabulary, built once per instance (or once at build time, see `warm`).
fn vocabulary() -> Result<&'static Vocab<'static>, Error> {
    static VOCABULARY: std::sync::OnceLock<Result<Vocab<'static>, Error>> = std::sync::OnceLock::new();
    VOCABULARY.get_or_init(|| Vocab::new(VOCAB)).as_ref().map_err(Clone::clone)
}

/// Run by `kiln build` once, before the component is shipped: what it builds is in every
/// request's fresh instance from the start. No models or HTTP here (there are none at build time).
fn warm() {
    // An error is kept and answered by every request, as it would be without pre-initialising.
    let _ = vocabulary();
}

kiln_guest::export_handler!(Texts, init = warm);

struct Vocab<'a> {
    ids: std::collections::HashMap<&'a str, i64>,
    pad: i64,
    unknown: i64,
    start: i64,
    end: i64,
}

impl<'a> Vocab<'a> {
    fn new(text: &'a str) -> Result<Vocab<'a>, Error> {
        let ids: std::collections::HashMap<&str, i64> = text.lines().zip(0..).collect();
        let id = |token: &str| ids.get(token).copied().ok_or_else(|| Error::internal(format!("the vocabulary has no {token}")));
        Ok(Vocab { pad: id("[PAD]")?, unknown: id("[UNK]")?, start: id("[CLS]")?, end: id("[SEP]")?, ids })
    }

    /// `[CLS]`, the text's word pieces (lower-cased, split at spaces and punctuation, each word
    /// the longest pieces of the vocabulary that cover it, else `[UNK]`), `[SEP]`; at most `max`.
    fn encode(&self, text: &str, max: usize) -> Vec<i64> {
        let lower = text.to_lowercase();
        let mut words: Vec<&str> = Vec::new();
        for chunk in lower.split_whitespace() {
            let mut from = 0;
            for (at, c) in chunk.char_indices() {
                if c.is_ascii_punctuation() {
                    words.extend([&chunk[from..at], &chunk[at..at + 1]].into_iter().filter(|w| !w.is_empty()));
                    from = at + 1;
                }
            }
            words.extend(Some(&chunk[from..]).filter(|w| !w.is_empty()));
        }
        let mut out = vec![self.start];
        for word in words {
            out.extend(self.pieces(word));
        }
        out.truncate(max.saturating_sub(1));
        out.push(self.end);
        out
    }

    fn pieces(&self, word: &str) -> Vec<i64> {
        let mut found = Vec::new();
        let mut rest = word;
        while !rest.is_empty() {
            let prefix = if found.is_empty() { "" } else { "##" };
            let piece = (1..=rest.len())
                .rev()
                .filter(|&end| rest.is_char_boundary(end))
                .find_map(|end| self.ids.get(format!("{prefix}{}", &rest[..end]).as_str()).map(|&id| (id, end)));
            match piece {
                Some((id, end)) => {
                    found.push(id);
                    rest = &rest[end..];
                }
                None => return vec![self.unknown],
            }
        }
        found
    }
}

/// The mean of each row's first `lengths[r]` token vectors, scaled to unit length.
fn pool(hidden: &[f32], lengths: &[usize], width: usize, dim: usize) -> Vec<Vec<f32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(r, &n)| {
            let mut sum = vec![0f32; dim];
            for t in 0..n {
                let at = (r * width + t) * dim;
                sum.iter_mut().zip(&hidden[at..at + dim]).for_each(|(s, h)| *s += h);
            }
            let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            sum.into_iter().map(|v| v / norm).collect()
        })
        .collect()
}

// The tests run on the host (`cargo test`), where kiln_guest::testing serves stand-in models.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    const SMALL: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\nworld\n!\nplay\n##ing";

    #[test]
    fn texts_become_word_pieces_between_cls_and_sep() {
        let vocab = Vocab::new(SMALL).expect("the special tokens are there");
        assert_eq!(vocab.encode("Hello, world!", 16), vec![2, 4, 1, 5, 6, 3]);
        assert_eq!(vocab.encode("playing", 16), vec![2, 7, 8, 3]);
        assert_eq!(vocab.encode("hello world hello", 3), vec![2, 4, 3]);
    }

    #[test]
    fn pooling_averages_real_tokens_only_and_normalizes() {
        // Two rows of width 2, vectors of 2: the second row's padding must not count.
        let hidden = [1.0, 0.0, 3.0, 0.0, 0.0, 2.0, 9.0, 9.0];
        let vectors = pool(&hidden, &[2, 1], 2, 2);
        assert_eq!(vectors, vec![vec![1.0, 0.0], vec![0.0, 1.0]]);
    }

    /// The whole handler, in this process: texts in, the client's answer out, with a stand-in
    /// for the model.
    #[test]
    fn texts_run_through_the_handler_with_a_stand_in_model() {
        // The stand-in's hidden states carry the attention mask in their first dimension, so
        // inputs in the wrong order would show in the answer.
        let model = |inputs: &[(&str, Tensor)]| {
            let shape = inputs[0].1.shape().to_vec();
            let mask = inputs[1].1.to_i64()?;
            let hidden: Vec<f32> = mask.iter().flat_map(|&m| [m as f32, 1.0, 1.0, 1.0]).collect();
            Ok(vec![(OUTPUT.to_owned(), Tensor::from_f32(&[shape[0], shape[1], 4], &hidden)?)])
        };
        // Served by name as Kiln serves it, then by position as `wasmtime serve -S nn` does.
        for positional in [false, true] {
            if positional {
                kiln_guest::testing::serve_model_positionally(MODEL, model);
            } else {
                kiln_guest::testing::serve_model(MODEL, model);
            }
            let body = serde_json::json!({ "texts": ["Hello, world!", "A longer text than the first one."] }).to_string();
            let response = kiln_guest::testing::call::<Texts>(Request::new("POST", "/", body.into_bytes()));
            assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(response.body()));
            let answer: serde_json::Value = serde_json::from_slice(response.body()).expect("JSON");
            assert_eq!(answer["vectors"][1], serde_json::json!([0.5, 0.5, 0.5, 0.5]), "positional: {positional}");
        }
    }
}
