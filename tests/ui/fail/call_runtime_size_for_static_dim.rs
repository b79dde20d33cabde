use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [B, T, H = 12, D = 64],
        key: [B, T, H, D],
    }
}

fn main() {
    let data = vec![0.0f32; 2 * 3 * 12 * 64];
    // `H` is a run-time `usize` here, but the declaration fixes it to 12 at compile time.
    let shape = (2usize, 3usize, 12usize, Const::<64>);
    let query = TensorView::new(&data, shape).unwrap();
    let key = TensorView::new(&data, shape).unwrap();
    let _ = Layer.weights(query, key, &mut Context::deterministic());
}
