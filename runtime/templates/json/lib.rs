//! {{name}}: a Kiln handler. `POST /` with rows of numbers as JSON, `{"rows": [[...], ...]}`;
//! each row goes through the model in one batched call and comes back as its scores and the
//! best class, `[{"class": 3, "scores": [...]}, ...]`.
//!
//! Made by `kiln new --template json` for the bundled `digits` model (an 8×8 image, 64 values per
//! row): change the constants below for another model.

use kiln_guest::{Error, Handler, Model, Request, Response, Router, Tensor};
use serde::{Deserialize, Serialize};

/// The model, as the server's config names it (`[[model]] name`).
const MODEL: &str = "digits";
/// Its input and output names (`inputs` and `outputs` in the config), declared with
/// `with_signature` so the handler also runs on hosts that pass tensors by position
/// (`wasmtime serve -S nn`).
const INPUT: &str = "image";
const OUTPUT: &str = "logits";
/// One row's shape, after the batch dimension.
const ROW_SHAPE: [u32; 3] = [1, 8, 8];
/// Rows per request; more should be split across requests.
const MAX_ROWS: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    rows: Vec<Vec<f32>>,
}

#[derive(Debug, PartialEq, Serialize)]
struct Prediction {
    class: usize,
    scores: Vec<f32>,
}

struct Rows;

impl Handler for Rows {
    fn handle(request: Request) -> Result<Response, Error> {
        // More routes go here: `.get("/info", info)`, `.post("/items/{id}", item)`, ...
        Router::new().post("/", predict).handle(request)
    }
}

fn predict(request: Request) -> Result<Response, Error> {
    let input: Input = request.json()?;
    let values = flatten(&input.rows)?;
    let mut shape = vec![input.rows.len() as u32];
    shape.extend(ROW_SHAPE);
    let model = Model::load(MODEL)?.with_signature(&[INPUT], &[OUTPUT]);
    let outputs = model.infer(&[(INPUT, Tensor::from_f32(&shape, &values)?)])?;
    let scores = outputs.get(OUTPUT)?.to_f32()?;
    Response::json(200, &predictions(&scores, input.rows.len())?)
}

kiln_guest::export_handler!(Rows);

/// Values per row.
fn row_len() -> usize {
    ROW_SHAPE.iter().map(|&d| d as usize).product()
}

/// The rows as one row-major batch, after checking there are 1 to `MAX_ROWS` of them, each of
/// the model's size, every value finite.
fn flatten(rows: &[Vec<f32>]) -> Result<Vec<f32>, Error> {
    if rows.is_empty() || rows.len() > MAX_ROWS {
        return Err(Error::bad_request(format!("send 1 to {MAX_ROWS} rows, got {}", rows.len())));
    }
    let width = row_len();
    let mut values = Vec::with_capacity(rows.len() * width);
    for (i, row) in rows.iter().enumerate() {
        if row.len() != width {
            return Err(Error::bad_request(format!("row {i} has {} values; the model takes {width}", row.len())));
        }
        if let Some(v) = row.iter().find(|v| !v.is_finite()) {
            return Err(Error::bad_request(format!("row {i} has {v}, which is not a finite number")));
        }
        values.extend_from_slice(row);
    }
    Ok(values)
}

/// Each row's scores as probabilities, and the most likely class.
fn predictions(scores: &[f32], rows: usize) -> Result<Vec<Prediction>, Error> {
    if rows == 0 || scores.is_empty() || !scores.len().is_multiple_of(rows) {
        return Err(Error::internal(format!("{} scores cannot be split into {rows} rows", scores.len())));
    }
    Ok(scores
        .chunks(scores.len() / rows)
        .map(|row| {
            let scores = softmax(row);
            let class = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
            Prediction { class, scores }
        })
        .collect())
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

// The tests run on the host (`cargo test`), where kiln_guest::testing serves stand-in models.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn rows_of_the_wrong_size_or_number_are_refused_naming_the_row() {
        let good = vec![0.5; row_len()];
        assert_eq!(flatten(&[good.clone(), good.clone()]).expect("two rows").len(), 2 * row_len());
        let error = flatten(&[good.clone(), vec![1.0; 3]]).expect_err("short row");
        assert!(error.message().contains("row 1 has 3 values"), "{error}");
        assert!(flatten(&[]).is_err());
        let mut bad = good;
        bad[5] = f32::NAN;
        assert!(flatten(&[bad]).expect_err("NaN").message().contains("not a finite number"));
    }

    #[test]
    fn each_row_gets_its_probabilities_and_its_best_class() {
        let got = predictions(&[0.0, 3.0, 1.0, 2.0, 0.0, 0.0], 2).expect("two rows of three");
        assert_eq!(got[0].class, 1);
        assert_eq!(got[1].class, 0);
        for p in &got {
            assert!((p.scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        assert!(predictions(&[1.0, 2.0, 3.0], 2).is_err());
    }

    /// The whole handler, in this process: a request in, the client's answer out, with a
    /// stand-in for the model that scores class 3 highest for every row. Served by name as
    /// Kiln serves it, then by position as `wasmtime serve -S nn` does: the same answer.
    #[test]
    fn a_request_runs_through_the_handler_with_a_stand_in_model() {
        let mut answers = Vec::new();
        for positional in [false, true] {
            let model = move |inputs: &[(&str, Tensor)]| {
                let (name, rows) = (inputs[0].0, inputs[0].1.shape()[0]);
                assert_eq!(name, if positional { "0" } else { INPUT });
                let logits: Vec<f32> = (0..rows * 10).map(|i| if i % 10 == 3 { 5.0 } else { 0.0 }).collect();
                Ok(vec![(OUTPUT.to_owned(), Tensor::from_f32(&[rows, 10], &logits)?)])
            };
            if positional {
                kiln_guest::testing::serve_model_positionally(MODEL, model);
            } else {
                kiln_guest::testing::serve_model(MODEL, model);
            }
            let body = serde_json::json!({ "rows": [vec![0.5; row_len()], vec![0.0; row_len()]] }).to_string();
            let response = kiln_guest::testing::call::<Rows>(Request::new("POST", "/", body.into_bytes()));
            assert_eq!(response.status(), 200, "{}", String::from_utf8_lossy(response.body()));
            let answer: Vec<serde_json::Value> = serde_json::from_slice(response.body()).expect("JSON");
            assert_eq!((answer.len(), &answer[1]["class"]), (2, &serde_json::json!(3)));
            answers.push(answer);
        }
        assert_eq!(answers[0], answers[1]);
        let wrong = kiln_guest::testing::call::<Rows>(Request::new("GET", "/", Vec::new()));
        assert_eq!(wrong.status(), 405);
    }
}
