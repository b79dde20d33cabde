//! Static dims checked by the compiler, run-time dims compared once at entry.
use attn::{AttnError, Const, Context, TensorView, attention};

attention! {
    /// Self-attention with static heads and depth.
    pub struct SelfAttention {
        query: [B, T, H = 2, D = 4],
        key: [B, T, H, D],
        value: [B, T, H, D],
        mask: causal,
    }
}

fn main() {
    let shape = (1usize, 3usize, Const::<2>, Const::<4>);
    let data: Vec<f32> = (0..24).map(|i| i as f32 / 10.0).collect();
    let query = TensorView::new(&data, shape).unwrap();
    let key = TensorView::new(&data, shape).unwrap();
    let value = TensorView::new(&data, shape).unwrap();
    let output = SelfAttention
        .forward(query, key, value, &mut Context::deterministic())
        .unwrap();
    // With a causal mask the first query sees only the first key: its output is value row 0.
    assert_eq!(&output.as_slice()[..8], &data[..8]);

    // `T` is 3 in `query` but 2 in `key`: one comparison at entry reports it.
    let short = (1usize, 2usize, Const::<2>, Const::<4>);
    let query = TensorView::new(&data, shape).unwrap();
    let key = TensorView::new(&data[..16], short).unwrap();
    let value = TensorView::new(&data[..16], short).unwrap();
    let error = SelfAttention
        .forward(query, key, value, &mut Context::deterministic())
        .unwrap_err();
    assert_eq!(
        error,
        AttnError::DimMismatch { dim: "T", first: "query", first_size: 3, second: "key", second_size: 2 }
    );
    println!("{error}");
}
