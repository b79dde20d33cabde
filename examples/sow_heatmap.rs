//! Sows the attention weights of a causal layer with a relative-position bias and draws them
//! as a heatmap in the terminal.
//!
//! Run: `cargo run --release --example sow_heatmap`.

use attn::{AttnError, Const, Context, Intermediates, TensorView, attention};

attention! {
    /// One head over a sequence, with an additive `[T, T]` bias and a causal mask; the weights
    /// are sown into the context's sink.
    struct Heatmap {
        query: [T, H = 1, D = 8],
        key:   [T, H, D],
        value: [T, H, D],
        bias:  [T, T],
        mask: causal,
        sow: attention_weights,
    }
}

fn main() -> Result<(), AttnError> {
    let tokens = 16;
    // Queries and keys that favour nearby tokens, plus a bias that favours every 4th token.
    let embed = |t: usize| -> Vec<f32> {
        (0..8)
            .map(|d| ((t as f32) * 0.35 + d as f32).sin())
            .collect()
    };
    let q: Vec<f32> = (0..tokens).flat_map(embed).collect();
    let k = q.clone();
    let v = q.clone();
    let bias: Vec<f32> = (0..tokens * tokens)
        .map(|i| if (i % tokens) % 4 == 0 { 1.5 } else { 0.0 })
        .collect();
    let shape = (tokens, Const::<1>, Const::<8>);

    let mut sink = Intermediates::new();
    Heatmap.forward(
        TensorView::new(&q, shape)?,
        TensorView::new(&k, shape)?,
        TensorView::new(&v, shape)?,
        TensorView::new(&bias, (tokens, tokens))?,
        &mut Context::deterministic().sow(&mut sink),
    )?;
    let sown = &sink.attention_weights()[0];
    let weights = sown.to_f64_vec();
    println!(
        "sown {:?} under (\"intermediates\", \"attention_weights\")",
        sown.shape()
    );
    println!("query ↓  key →   (darker = more attention)");
    let shades = [' ', '░', '▒', '▓', '█'];
    for i in 0..tokens {
        let row = &weights[i * tokens..(i + 1) * tokens];
        let max = row.iter().copied().fold(0.0, f64::max);
        let cells: String = row
            .iter()
            .map(|w| {
                let level = if max > 0.0 {
                    (w / max * 4.0).round() as usize
                } else {
                    0
                };
                let c = shades[level.min(4)];
                format!("{c}{c}")
            })
            .collect();
        println!("{i:>3} |{cells}|  max {max:.2}");
    }
    Ok(())
}
