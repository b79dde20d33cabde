use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [T, H = 4, D],
        key: [S, H, D],
        mask: [H, T, S],
    }
}

fn main() {
    let data = vec![0.0f32; 3 * 4 * 8];
    let query = TensorView::new(&data, (3usize, Const::<4>, 8usize)).unwrap();
    let key = TensorView::new(&data, (3usize, Const::<4>, 8usize)).unwrap();
    let keep = vec![true; 2 * 3 * 3];
    // The mask has 2 heads; the declaration says `H = 4`.
    let mask = TensorView::new(&keep, (Const::<2>, 3usize, 3usize)).unwrap();
    let _ = Layer.weights(query, key, mask, &mut Context::deterministic());
}
