use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [T, H = 2, D = 8],
        key: [S, H, D],
    }
}

fn main() {
    let data = vec![0.0f32; 3 * 2 * 8];
    let query = TensorView::new(&data, (3usize, Const::<2>, Const::<8>)).unwrap();
    // `key` has depth 4 where `query` (and the declaration) has `D = 8`.
    let key = TensorView::new(&data[..24], (3usize, Const::<2>, Const::<4>)).unwrap();
    let _ = Layer.weights(query, key, &mut Context::deterministic());
}
