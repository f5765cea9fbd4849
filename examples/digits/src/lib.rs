//! Classifies a handwritten digit: PNG or JPEG in, `{"digit": d, "probabilities": [...]}` out.
//!
//! The image is decoded, turned to grey, averaged down to the model's 8×8 grid and scaled to
//! [0, 1] here in the guest; the host only runs the CNN.

use kiln_guest::{Error, Handler, Model, Request, Response, Tensor};

const SIDE: u32 = 8;

struct Digits;

#[derive(serde::Serialize)]
struct Prediction {
    digit: usize,
    probabilities: Vec<f32>,
}

impl Handler for Digits {
    fn handle(request: Request) -> Result<Response, Error> {
        let pixels = to_grid(&decode(request.body())?);
        let input = Tensor::from_f32(&[1, 1, SIDE, SIDE], &pixels)?;
        // The declared signature keeps this portable to hosts that pass tensors by position.
        let model = Model::load("digits")?.with_signature(&["image"], &["logits"]);
        let outputs = model.infer(&[("image", input)])?;
        let probabilities = softmax(&outputs.get("logits")?.to_f32()?);
        let digit = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(d, _)| d)
            .ok_or_else(|| Error::internal("the model returned no scores"))?;
        // The same image always gets the same answer: a handler with a response cache may keep it.
        Ok(Response::json(
            200,
            &Prediction {
                digit,
                probabilities,
            },
        )?
        .with_header("cache-control", "public, max-age=3600"))
    }
}

kiln_guest::export_handler!(Digits);

/// Decodes a PNG or JPEG, refusing images too large to be a digit before allocating them.
fn decode(bytes: &[u8]) -> Result<image::GrayImage, Error> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(4096);
    limits.max_image_height = Some(4096);
    limits.max_alloc = Some(64 << 20);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::bad_request(format!("cannot read the image: {e}")))?;
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| Error::bad_request(format!("the body is not a PNG or JPEG image: {e}")))?;
    Ok(image.to_luma8())
}

/// Averages the image down to 8×8 in [0, 1], ink bright on dark like the training data.
fn to_grid(image: &image::GrayImage) -> Vec<f32> {
    let (w, h) = image.dimensions();
    let mut sums = [0f32; (SIDE * SIDE) as usize];
    let mut counts = [0u32; (SIDE * SIDE) as usize];
    for (x, y, p) in image.enumerate_pixels() {
        let cell = ((y * SIDE / h) * SIDE + x * SIDE / w) as usize;
        sums[cell] += f32::from(p.0[0]) / 255.0;
        counts[cell] += 1;
    }
    let mut grid: Vec<f32> = sums
        .iter()
        .zip(counts)
        .map(|(s, n)| if n == 0 { 0.0 } else { s / n as f32 })
        .collect();
    // Dark ink on light paper: the border is bright, so flip to the training polarity.
    let border: Vec<f32> = (0..SIDE * SIDE)
        .filter(|i| {
            let (r, c) = (i / SIDE, i % SIDE);
            r == 0 || c == 0 || r == SIDE - 1 || c == SIDE - 1
        })
        .map(|i| grid[i as usize])
        .collect();
    if border.iter().sum::<f32>() / border.len() as f32 > 0.5 {
        grid.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    grid
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}
