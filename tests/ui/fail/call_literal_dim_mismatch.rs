use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [T, 2, 8],
        key: [S, 2, 8],
    }
}

fn main() {
    let data = vec![0.0f32; 3 * 2 * 4];
    // Unnamed static dims are plain `Const<N>` types: a mismatch is a type mismatch.
    let query = TensorView::new(&data, (3usize, Const::<2>, Const::<4>)).unwrap();
    let key = TensorView::new(&data, (3usize, Const::<2>, Const::<4>)).unwrap();
    let _ = Layer.weights(query, key, &mut Context::deterministic());
}
