use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [T, H = 2, D = 8],
        key: [S, H, D],
        value: [S, H, Dv = 4],
    }
}

fn main() {
    let data = vec![0.0f32; 5 * 2 * 8];
    let query = TensorView::new(&data, (5usize, Const::<2>, Const::<8>)).unwrap();
    let key = TensorView::new(&data, (5usize, Const::<2>, Const::<8>)).unwrap();
    // The value depth is declared as `Dv = 4`.
    let value = TensorView::new(&data, (5usize, Const::<2>, Const::<8>)).unwrap();
    let _ = Layer.forward(query, key, value, &mut Context::deterministic());
}
