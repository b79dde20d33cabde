use attn::{Const, Context, TensorView, attention};

attention! {
    struct Layer {
        query: [T, H = 8, D = 4],
        key: [S, H, D],
        value: [S, H, D],
    }
}

fn main() -> Result<(), attn::AttnError> {
    let data = vec![0.5f32; 3 * 8 * 4];
    let x = TensorView::new(&data, (3usize, Const::<8>, Const::<4>))?;
    let mut ctx = Context::deterministic();
    let (output, residuals) = Layer.forward_with_residuals(x, x, x, &mut ctx)?;
    // The cotangent of the output must have the output's shape `[T, H = 8, D = 4]`; this one
    // has 4 heads.
    let small = vec![1.0f32; 3 * 4 * 4];
    let d_output = TensorView::new(&small, (3usize, Const::<4>, Const::<4>))?;
    let _ = Layer.backward(x, x, x, output.view(), &residuals, d_output, &mut ctx)?;
    Ok(())
}
