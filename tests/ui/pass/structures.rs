//! Every structure of a mask declared at once, with static grouped-query heads, and run-time
//! heads whose mismatch is an `AttnError` at entry.
use attn::{AttnError, Const, Context, TensorView, attention};

attention! {
    /// Grouped-query attention over a KV cache: 4 query heads, 2 key/value heads.
    pub struct Everything {
        query: [B, T, H = 4, D = 8],
        key: [B, S, G = 2, D],
        value: [B, S, G, D],
        bias: [B, H, T, S],
        mask: causal(offset = 2) + window(2, 1, offset = 2) + query_lengths + kv_lengths
            + segment_ids + [B, 1, T, S],
    }

    /// Multi-query attention with heads chosen at run time.
    pub struct RunTimeHeads {
        query: [T, H, D],
        key: [S, K, D],
    }
}

fn main() {
    let (batch, q_len, kv_len) = (2usize, 3usize, 5usize);
    let q: Vec<f32> = (0..batch * q_len * 4 * 8).map(|i| (i % 7) as f32 / 7.0).collect();
    let kv: Vec<f32> = (0..batch * kv_len * 2 * 8).map(|i| (i % 5) as f32 / 5.0).collect();
    let bias = vec![0.0f32; batch * 4 * q_len * kv_len];
    let dense = vec![true; batch * q_len * kv_len];
    let query = TensorView::new(&q, (batch, q_len, Const::<4>, Const::<8>)).unwrap();
    let key = TensorView::new(&kv, (batch, kv_len, Const::<2>, Const::<8>)).unwrap();
    let bias = TensorView::new(&bias, (batch, Const::<4>, q_len, kv_len)).unwrap();
    let dense = TensorView::new(&dense, (batch, Const::<1>, q_len, kv_len)).unwrap();
    let (q_lengths, kv_lengths) = ([3, 2], [5, 4]);
    let q_lengths = TensorView::new(&q_lengths, (batch,)).unwrap();
    let kv_lengths = TensorView::new(&kv_lengths, (batch,)).unwrap();
    let q_ids = [0, 0, 1, 0, 0, 0];
    let kv_ids = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0];
    let q_ids = TensorView::new(&q_ids, (batch, q_len)).unwrap();
    let kv_ids = TensorView::new(&kv_ids, (batch, kv_len)).unwrap();
    let ctx = &mut Context::deterministic();
    let output = Everything
        .forward(query, key, key, bias, dense, q_lengths, kv_lengths, q_ids, kv_ids, ctx)
        .unwrap();
    assert_eq!(output.shape(), (batch, q_len, Const::<4>, Const::<8>));
    let weights = Everything
        .weights(query, key, bias, dense, q_lengths, kv_lengths, q_ids, kv_ids, ctx)
        .unwrap();
    assert_eq!(weights.shape(), (batch, Const::<4>, q_len, kv_len));

    // Lengths of the wrong batch size: an error naming the argument, no panic.
    let three = TensorView::new(&[1, 1, 1], (3usize,)).unwrap();
    let error = Everything
        .weights(query, key, bias, dense, three, kv_lengths, q_ids, kv_ids, ctx)
        .unwrap_err();
    assert!(matches!(error, AttnError::DimMismatch { dim: "B", .. }), "{error}");

    // One key/value head (multi-query attention), then 3, which does not divide 4.
    let q2: Vec<f32> = vec![0.5; q_len * 4 * 8];
    let k1: Vec<f32> = vec![0.25; kv_len * 8];
    let k3: Vec<f32> = vec![0.25; kv_len * 3 * 8];
    let query = TensorView::new(&q2, (q_len, 4usize, 8usize)).unwrap();
    let one = TensorView::new(&k1, (kv_len, 1usize, 8usize)).unwrap();
    let three = TensorView::new(&k3, (kv_len, 3usize, 8usize)).unwrap();
    assert!(RunTimeHeads.weights(query, one, ctx).is_ok());
    let error = RunTimeHeads.weights(query, three, ctx).unwrap_err();
    assert_eq!(
        error.to_string(),
        "`key` axis heads `K` (axis -2): expected a divisor of the 4 heads of `query` (`H`), \
         for grouped-query attention, found 3"
    );
}
