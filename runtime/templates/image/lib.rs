//! {{name}}: a Kiln handler. `POST /` with a PNG as the body; the image is turned to grey and
//! averaged down to the model's input size here in the guest, and the answer is the model's
//! best class and its raw scores, `{"class": 7, "scores": [...]}`.
//!
//! Made by `kiln new --template image` for the bundled `digits` model (8×8, grey, ink bright on
//! dark): change the constants below for another model.

use kiln_guest::{Error, Handler, Model, Request, Response, Router, Tensor};
use serde::Serialize;

/// The model, as the server's config names it, and its input and output names (declared with
/// `with_signature`, so the handler also runs on hosts that pass tensors by position).
const MODEL: &str = "digits";
const INPUT: &str = "image";
const OUTPUT: &str = "logits";
/// The model's input: one channel of `SIDE` × `SIDE` values in [0, 1].
const SIDE: usize = 8;
/// The largest image accepted, in pixels per side.
const MAX_SIDE: u32 = 4096;

#[derive(Debug, Serialize)]
struct Answer {
    class: usize,
    scores: Vec<f32>,
}

struct Images;

impl Handler for Images {
    fn handle(request: Request) -> Result<Response, Error> {
        // More routes go here: `.get("/info", info)`, `.post("/items/{id}", item)`, ...
        Router::new().post("/", classify).handle(request)
    }
}

fn classify(request: Request) -> Result<Response, Error> {
    let (width, grey) = decode_png(request.body())?;
    let grid = shrink(&grey, width, SIDE);
    let input = Tensor::from_f32(&[1, 1, SIDE as u32, SIDE as u32], &grid)?;
    let model = Model::load(MODEL)?.with_signature(&[INPUT], &[OUTPUT]);
    let scores = model.infer(&[(INPUT, input)])?.get(OUTPUT)?.to_f32()?;
    let class = (0..scores.len()).max_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let class = class.ok_or_else(|| Error::internal("the model returned no scores"))?;
    Response::json(200, &Answer { class, scores })
}

kiln_guest::export_handler!(Images);

/// A PNG's width and its pixels as grey values in [0, 1], row by row.
fn decode_png(bytes: &[u8]) -> Result<(usize, Vec<f32>), Error> {
    let bad = |e: png::DecodingError| Error::bad_request(format!("the body is not a PNG this handler can read: {e}"));
    let mut decoder = png::Decoder::new(bytes);
    // 8 bits per channel and no palette, whatever the file holds.
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(bad)?;
    let (width, height) = (reader.info().width, reader.info().height);
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(Error::bad_request(format!("a {width}×{height} image; up to {MAX_SIDE} pixels a side")));
    }
    let mut buffer = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buffer).map_err(bad)?;
    let channels = frame.color_type.samples();
    let grey = buffer[..frame.buffer_size()]
        .chunks_exact(channels)
        .map(|px| match channels {
            // Grey, or grey and alpha.
            1 | 2 => f32::from(px[0]) / 255.0,
            // Red, green, blue (and alpha): their luminance.
            _ => (0.299 * f32::from(px[0]) + 0.587 * f32::from(px[1]) + 0.114 * f32::from(px[2])) / 255.0,
        })
        .collect();
    Ok((frame.width as usize, grey))
}

/// Averages a `width`-wide grey image down to `side` × `side`, bright ink on a dark ground (an
/// image with a bright border is flipped).
fn shrink(grey: &[f32], width: usize, side: usize) -> Vec<f32> {
    let height = grey.len() / width;
    let mut sums = vec![0f32; side * side];
    let mut counts = vec![0u32; side * side];
    for (i, &v) in grey.iter().enumerate() {
        let (y, x) = (i / width, i % width);
        let cell = (y * side / height) * side + x * side / width;
        sums[cell] += v;
        counts[cell] += 1;
    }
    let mut grid: Vec<f32> = sums.iter().zip(&counts).map(|(s, &n)| if n == 0 { 0.0 } else { s / n as f32 }).collect();
    let edge: Vec<f32> = (0..side * side)
        .filter(|i| i / side == 0 || i % side == 0 || i / side == side - 1 || i % side == side - 1)
        .map(|i| grid[i])
        .collect();
    if edge.iter().sum::<f32>() / edge.len() as f32 > 0.5 {
        grid.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    grid
}

// The tests run on the host (`cargo test`), where kiln_guest::testing serves stand-in models.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn a_bright_page_with_dark_ink_is_flipped_and_averaged() {
        // 4×4, white with a dark 2×2 block in the top-left corner, down to 2×2.
        let mut grey = vec![1.0; 16];
        for i in [0, 1, 4, 5] {
            grey[i] = 0.0;
        }
        let grid = shrink(&grey, 4, 2);
        assert_eq!(grid, vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn what_is_not_a_png_is_refused() {
        let error = decode_png(b"GIF89a").expect_err("not a PNG");
        assert_eq!(error.status(), 400);
        assert!(error.message().contains("not a PNG"), "{error}");
    }

    /// The whole handler, in this process: a PNG in, the client's answer out, with a stand-in
    /// for the model that scores class 7 highest. Served by name as Kiln serves it, then by
    /// position as `wasmtime serve -S nn` does: the same answer.
    #[test]
    fn a_png_runs_through_the_handler_with_a_stand_in_model() {
        let model = |inputs: &[(&str, Tensor)]| {
            assert_eq!(inputs[0].1.shape(), &[1, 1, SIDE as u32, SIDE as u32]);
            let scores: Vec<f32> = (0..10).map(|i| if i == 7 { 1.0 } else { 0.0 }).collect();
            Ok(vec![(OUTPUT.to_owned(), Tensor::from_f32(&[1, 10], &scores)?)])
        };
        kiln_guest::testing::serve_model(MODEL, model);
        let by_name = kiln_guest::testing::call::<Images>(Request::new("POST", "/", grey_png()));
        kiln_guest::testing::serve_model_positionally(MODEL, model);
        let by_position = kiln_guest::testing::call::<Images>(Request::new("POST", "/", grey_png()));
        assert_eq!(by_name.status(), 200, "{}", String::from_utf8_lossy(by_name.body()));
        assert_eq!(by_name.body(), by_position.body());
        let answer: serde_json::Value = serde_json::from_slice(by_name.body()).expect("JSON");
        assert_eq!(answer["class"], 7);
    }

    /// A 16×16 grey PNG, made here.
    fn grey_png() -> Vec<u8> {
        let mut png_bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut png_bytes, 16, 16);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("header");
        writer.write_image_data(&[200; 256]).expect("pixels");
        writer.finish().expect("PNG");
        png_bytes
    }
}
