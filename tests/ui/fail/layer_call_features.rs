use attn::{Const, Context, TensorView, attention};

attention! {
    pub struct Layer {
        inputs_q: [B, T, E = 16],
        heads: 4,
        cache: dynamic,
    }
}

fn main() -> Result<(), attn::AttnError> {
    let layer = Layer::new(0)?;
    let x = vec![0.0f32; 2 * 3 * 8];
    // Inputs with 8 features for a layer declared with 16: a type error at the argument.
    let _ = layer.forward(TensorView::new(&x, (2, 3, Const::<8>))?, &mut Context::deterministic())?;
    let mut cache = LayerCache::new(4);
    // `decode` takes one token: `Const<1>` in the length.
    let _ = layer.decode(&mut cache, TensorView::new(&x, (2, 3, Const::<16>))?, &mut Context::deterministic())?;
    Ok(())
}
