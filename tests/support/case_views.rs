//! Typed views of conformance arrays for `attention!` layers: a case array as a `TensorView`
//! of the layer's element type and shape type (run-time dims as `usize`, the static ones as
//! `Const<N>`, checked), and a layer's result back as an `Array`.
#![allow(dead_code)]

use attn::{Array, Const, Scalar, Shape, Tensor, TensorView};

/// A view of a case array; the case's dtype must be the layer's.
pub fn view<'a, T: Scalar, S: Shape>(
    array: &'a Array,
    shape: S,
) -> Result<TensorView<'a, T, S>, String> {
    let data = array.as_slice::<T>().ok_or_else(|| {
        format!(
            "a {} array where the layer takes {}",
            array.dtype(),
            T::DTYPE
        )
    })?;
    TensorView::new(data, shape).map_err(|e| e.to_string())
}

pub fn dims<const N: usize>(array: &Array) -> Result<[usize; N], String> {
    array
        .shape()
        .try_into()
        .map_err(|_| format!("expected rank {N}, found shape {:?}", array.shape()))
}

pub fn d3(a: &Array) -> Result<(usize, usize, usize), String> {
    let [x, y, z] = dims(a)?;
    Ok((x, y, z))
}

pub fn d4(a: &Array) -> Result<(usize, usize, usize, usize), String> {
    let [w, x, y, z] = dims(a)?;
    Ok((w, x, y, z))
}

pub fn d5(a: &Array) -> Result<(usize, usize, usize, usize, usize), String> {
    let [v, w, x, y, z] = dims(a)?;
    Ok((v, w, x, y, z))
}

/// `[B, 1, T, S]`-shaped operands.
pub fn b1ts(a: &Array) -> Result<(usize, Const<1>, usize, usize), String> {
    let [b, one, t, s] = dims(a)?;
    if one != 1 {
        return Err(format!("expected [B, 1, T, S], found {:?}", a.shape()));
    }
    Ok((b, Const, t, s))
}

/// `[B, 1, 1, S]`-shaped operands.
pub fn b11s(a: &Array) -> Result<(usize, Const<1>, Const<1>, usize), String> {
    let [b, one, other, s] = dims(a)?;
    if (one, other) != (1, 1) {
        return Err(format!("expected [B, 1, 1, S], found {:?}", a.shape()));
    }
    Ok((b, Const, Const, s))
}

/// `[B, T, 8, 64]`-shaped operands (static heads and depth).
pub fn bt_8_64(a: &Array) -> Result<(usize, usize, Const<8>, Const<64>), String> {
    let [b, t, h, d] = dims(a)?;
    if (h, d) != (8, 64) {
        return Err(format!("expected [B, T, 8, 64], found {:?}", a.shape()));
    }
    Ok((b, t, Const, Const))
}

/// `[1, H, T, S]`-shaped operands.
pub fn one_hts(a: &Array) -> Result<(Const<1>, usize, usize, usize), String> {
    let [one, h, t, s] = dims(a)?;
    if one != 1 {
        return Err(format!("expected [1, H, T, S], found {:?}", a.shape()));
    }
    Ok((Const, h, t, s))
}

pub fn array<T: Scalar, S: Shape>(tensor: Tensor<T, S>) -> Array {
    let shape = tensor.shape().dims();
    Array::new(tensor.into_vec(), shape).expect("a tensor's data fits its shape")
}
