//! A declaration with an error still defines its layer (a stub), so code that uses the layer
//! gets no follow-up errors: only the declaration's error is reported.
use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [B, T, H = 2, D = 4],
        key: [B, T, H, D],
        value: [B, T, H, D],
        dropout_rate: 2.0,
    }
}

fn main() -> Result<(), attn::AttnError> {
    let data = vec![0.0f32; 2 * 2 * 4];
    let view = || TensorView::new(&data, (1usize, 2usize, Const::<2>, Const::<4>));
    let output: attn::Tensor<f32, _> =
        Layer.forward(view()?, view()?, view()?, &mut Context::deterministic())?;
    println!("{:?}", output.as_slice());
    let weights = Layer.weights(view()?, view()?, &mut Context::deterministic())?;
    let _: &attn::Tensor<f32, (usize, Const<2>, usize, usize)> = &weights;
    Ok(())
}
