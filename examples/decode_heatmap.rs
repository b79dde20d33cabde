//! Loads a Flax `MultiHeadDotProductAttention` checkpoint of the `mha/` conformance set,
//! prefills a prompt, decodes new tokens one at a time with the KV cache, prints the latency
//! per token, and draws the sown attention weights of every head as a PNG heatmap.
//!
//! ```text
//! cargo run --release --example decode_heatmap -- [CHECKPOINT] [NEW_TOKENS] [OUT.png]
//! ```
//!
//! `CHECKPOINT` is a `.msgpack` (`flax.serialization.to_bytes`) or `.safetensors` file of a
//! decode case; the case's `.json` beside it gives the layer's configuration and the prompt
//! (the case's step tokens, batch element 0). Defaults: `../shared/conformance/mha/
//! dec_f32_prefill.msgpack`, 24 new tokens, `decode_heatmap.png`. The layer has no vocabulary,
//! so each new token's input is the layer's previous output (when the output features equal
//! the input features; otherwise the prompt tokens again, in turn).
//!
//! The PNG has one panel per head, left to right: row `t` is the query at position `t`, column
//! `j` the cache slot `j`; brighter is more attention (square-root scale, so that small weights
//! stay visible). Row `t` is zero right of column `t` (causal over the cache).

// The verdict of a case set, shared by the runners below.
#[path = "../tests/support/mha.rs"]
mod mha;
#[path = "../tests/support/tally.rs"]
mod tally;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use attn::layer::{KvCache, MultiHeadDotProductAttention};
use attn::{Array, Context, Intermediates};

/// What [`run`] did.
pub struct Run {
    /// The PNG written.
    pub png: PathBuf,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
    /// Attention heads (panels).
    pub heads: usize,
    /// Prompt tokens.
    pub prompt: usize,
    /// Decoded tokens.
    pub decoded: usize,
    /// The latency of each decode step.
    pub latencies: Vec<Duration>,
}

/// Pixels per heatmap cell, and between two heads' panels.
const CELL: usize = 12;
const GAP: usize = 12;

/// The default checkpoint: a decode case of the conformance set.
pub fn default_checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance/mha/dec_f32_prefill.msgpack")
}

/// Loads `checkpoint`, prefills the prompt, decodes `new_tokens` tokens and writes the heatmap
/// of the sown weights to `out`.
pub fn run(checkpoint: &Path, new_tokens: usize, out: &Path) -> Result<Run, String> {
    let case = mha::load(&checkpoint.with_extension("json"))?;
    if !case.decodes() {
        return Err(format!("{} is not a decode case", case.name()));
    }
    let bytes = std::fs::read(checkpoint).map_err(|e| format!("{}: {e}", checkpoint.display()))?;
    let (config, features) = (mha::config(&case)?, case.features()?);
    let layer = if checkpoint.extension().is_some_and(|x| x == "safetensors") {
        MultiHeadDotProductAttention::from_safetensors(config, features, &bytes, "params")
    } else {
        MultiHeadDotProductAttention::from_msgpack(config, features, &bytes, "params")
    }
    .map_err(|e| e.to_string())?;
    let dims = *layer.dims();

    // The prompt: the case's step tokens [S, batch.., 1, E], batch element 0, as [1, S, E].
    let steps = case.input("step_inputs")?.ok_or("no step_inputs")?;
    let s = steps.shape()[0];
    let e = features.q;
    let per_step = steps.len() / s;
    let vals = steps.to_f64_vec();
    let prompt_vals: Vec<f64> = (0..s)
        .flat_map(|t| vals[t * per_step..t * per_step + e].to_vec())
        .collect();
    let prompt =
        Array::from_f64(steps.dtype(), &prompt_vals, [1, s, e]).map_err(|e| e.to_string())?;

    let capacity = s + new_tokens;
    let mut cache = KvCache::new(capacity);
    let mut sink = Intermediates::new();
    let start = Instant::now();
    let y = layer
        .prefill(
            &mut cache,
            &prompt,
            None,
            &mut Context::deterministic().sow(&mut sink),
        )
        .map_err(|e| e.to_string())?;
    let prefill = start.elapsed();
    println!(
        "{}: {} heads of depth {}, {} features; prefilled {s} tokens in {:.3} ms ({:.1} µs/token)",
        case.name(),
        dims.heads,
        dims.head_dim,
        e,
        prefill.as_secs_f64() * 1e3,
        prefill.as_secs_f64() * 1e6 / s as f64,
    );
    // The prompt's outputs against Flax's (its one-token decode steps, batch element 0).
    if let Some(want) = case.expected("step_outputs")? {
        let (w, f) = (want.to_f64_vec(), dims.out_features);
        let per = want.len() / want.shape()[0];
        let got = y.to_f64_vec();
        let worst = (0..s)
            .flat_map(|t| (0..f).map(move |i| (t, i)))
            .map(|(t, i)| (got[t * f + i] - w[t * per + i]).abs())
            .fold(0.0, f64::max);
        println!("prompt outputs vs Flax's decode steps: max |difference| = {worst:.2e}");
    }

    let f = dims.out_features;
    let last_row = |a: &Array| -> Result<Array, String> {
        let v = a.to_f64_vec();
        let n = a.shape()[1];
        Array::from_f64(a.dtype(), &v[(n - 1) * f..n * f], [1, 1, f]).map_err(|e| e.to_string())
    };
    let mut next = last_row(&y)?;
    let mut latencies = Vec::with_capacity(new_tokens);
    for t in 0..new_tokens {
        let x = if f == e {
            next.clone()
        } else {
            let i = t % s;
            Array::from_f64(prompt.dtype(), &prompt_vals[i * e..(i + 1) * e], [1, 1, e])
                .map_err(|e| e.to_string())?
        };
        let start = Instant::now();
        let y = layer
            .decode(
                &mut cache,
                &x,
                None,
                &mut Context::deterministic().sow(&mut sink),
            )
            .map_err(|e| e.to_string())?;
        latencies.push(start.elapsed());
        next = last_row(&y)?;
    }
    for (t, d) in latencies.iter().enumerate() {
        println!(
            "token {:>3} (position {:>3}): {:>8.1} µs",
            t + 1,
            s + t,
            d.as_secs_f64() * 1e6
        );
    }
    if !latencies.is_empty() {
        let mut sorted = latencies.clone();
        sorted.sort();
        let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
        println!(
            "decode: {} tokens, mean {:.1} µs/token, median {:.1} µs/token (with sowing)",
            latencies.len(),
            mean.as_secs_f64() * 1e6,
            sorted[sorted.len() / 2].as_secs_f64() * 1e6
        );
    }

    // The sown weights: [1, H, S, cap] from the prefill, then [1, H, 1, cap] per token.
    let h = dims.heads;
    let rows = s + new_tokens;
    let mut grid = vec![0.0f64; h * rows * capacity]; // [head, row, slot]
    let mut row0 = 0;
    for w in sink.attention_weights() {
        let (n, cap) = (w.shape()[2], w.shape()[3]);
        let v = w.to_f64_vec();
        for head in 0..h {
            for i in 0..n {
                let src = &v[(head * n + i) * cap..(head * n + i + 1) * cap];
                let dst = (head * rows + row0 + i) * capacity;
                grid[dst..dst + cap].copy_from_slice(src);
            }
        }
        row0 += n;
    }
    let (width, height) = (h * capacity * CELL + (h - 1) * GAP, rows * CELL);
    let mut pixels = vec![255u8; width * height * 3];
    for head in 0..h {
        for r in 0..rows {
            for j in 0..capacity {
                let rgb = color(grid[(head * rows + r) * capacity + j]);
                for y in r * CELL..(r + 1) * CELL {
                    let x0 = head * (capacity * CELL + GAP) + j * CELL;
                    for x in x0..x0 + CELL {
                        pixels[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&rgb);
                    }
                }
            }
        }
    }
    let (width, height) = (width as u32, height as u32);
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer
        .write_image_data(&pixels)
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(Run {
        png: out.to_owned(),
        width,
        height,
        heads: h,
        prompt: s,
        decoded: new_tokens,
        latencies,
    })
}

/// A dark-blue → orange → yellow ramp of `sqrt(w)`, `w` in `[0, 1]`.
fn color(w: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 4] = [
        [13.0, 8.0, 48.0],
        [120.0, 28.0, 109.0],
        [237.0, 105.0, 37.0],
        [252.0, 255.0, 164.0],
    ];
    let x = w.clamp(0.0, 1.0).sqrt() * 3.0;
    let i = (x.floor() as usize).min(2);
    let t = x - i as f64;
    let mix = |k: usize| (STOPS[i][k] + (STOPS[i + 1][k] - STOPS[i][k]) * t).round() as u8;
    [mix(0), mix(1), mix(2)]
}

#[allow(dead_code)]
fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let checkpoint = args.next().map_or_else(default_checkpoint, PathBuf::from);
    let n = match args.next().map(|a| a.to_string_lossy().parse::<usize>()) {
        None => 24,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("NEW_TOKENS: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let out = args
        .next()
        .map_or_else(|| PathBuf::from("decode_heatmap.png"), PathBuf::from);
    match run(&checkpoint, n, &out) {
        Ok(r) => {
            println!(
                "wrote {} ({}x{} pixels: {} heads, {} prompt + {} decoded tokens)",
                r.png.display(),
                r.width,
                r.height,
                r.heads,
                r.prompt,
                r.decoded
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
