//! Element types: the dtypes of Flax that attn understands, and the float element trait.

use core::fmt;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::array::ArrayData;

/// A dtype, named as in JAX/Flax.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DType {
    /// `float32`
    F32,
    /// `float64`
    F64,
    /// `bfloat16`
    BF16,
    /// `float16`
    F16,
    /// `bool`
    Bool,
    /// `int32`
    I32,
}

impl DType {
    /// The JAX name (`"float32"`, `"bfloat16"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::Bool => "bool",
            DType::I32 => "int32",
        }
    }

    /// Parses a JAX name (`"float32"`, ...).
    pub fn from_name(name: &str) -> Option<DType> {
        Some(match name {
            "float32" => DType::F32,
            "float64" => DType::F64,
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            "bool" => DType::Bool,
            "int32" => DType::I32,
            _ => return None,
        })
    }

    /// Whether this is a floating-point dtype.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }

    /// JAX's `promote_types` for the dtypes attn knows (the x64 lattice: `bf16 + f16 -> f32`,
    /// anything float with `f64 -> f64`, bool/int with a float -> that float).
    pub fn promote(self, other: DType) -> DType {
        use DType::*;
        match (self, other) {
            (a, b) if a == b => a,
            (F64, _) | (_, F64) => F64,
            (F32, _) | (_, F32) => F32,
            (BF16, F16) | (F16, BF16) => F32,
            (BF16, _) | (_, BF16) => BF16,
            (F16, _) | (_, F16) => F16,
            (I32, Bool) | (Bool, I32) => I32,
            (a, _) => a,
        }
    }

    /// `finfo(self).min`: the most negative finite value (Flax's `big_neg`), `None` for bool/int.
    pub fn finfo_min(self) -> Option<f64> {
        match self {
            DType::F32 => Some(f32::MIN as f64),
            DType::F64 => Some(f64::MIN),
            DType::BF16 => Some(bf16::MIN.to_f64()),
            DType::F16 => Some(f16::MIN.to_f64()),
            DType::Bool | DType::I32 => None,
        }
    }

    /// Rounds an `f64` to the nearest value of this float dtype (round to nearest, ties to
    /// even), returned as `f64`. Bool and int32 are returned unchanged.
    pub fn round_f64(self, x: f64) -> f64 {
        match self {
            DType::F32 => x as f32 as f64,
            DType::F64 => x,
            DType::BF16 => bf16::from_f64(x).to_f64(),
            DType::F16 => f16::from_f64(x).to_f64(),
            DType::Bool | DType::I32 => x,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Any element an [`Array`](crate::Array) can hold: the four float types, `bool` and `i32`.
pub trait Scalar: Copy + Send + Sync + Default + fmt::Debug + 'static {
    /// The dtype of this element type.
    const DTYPE: DType;
    /// Wraps a vector of this type as dynamically typed array data.
    fn into_data(data: Vec<Self>) -> ArrayData;
    /// Borrows array data as a slice of this type, if it holds this type.
    fn slice_of(data: &ArrayData) -> Option<&[Self]>;
    /// The value as `f64` (bool: 0 or 1).
    fn to_f64(self) -> f64;
}

/// A float element type of attention inputs and results: `f32`, `f64`, `half::bf16`, `half::f16`.
pub trait Element: Scalar {
    /// Converts from `f64`, rounding to nearest.
    fn from_f64(x: f64) -> Self;
    /// The value as `f32` (rounds for `f64`).
    fn to_f32(self) -> f32;
    /// Converts from `f32`, rounding to nearest.
    fn from_f32(x: f32) -> Self;
    /// Converts `src` into `dst` element by element ([`Element::from_f32`]), in loops that
    /// vectorize (f16 through `half`'s slice conversion). The slices must have the same length.
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
    /// The bit patterns of the slice if `Self` is `bf16` (the `bf16` tile products read them
    /// directly).
    fn as_bf16_bits(s: &[Self]) -> Option<&[u16]> {
        let _ = s;
        None
    }
    /// The bit patterns of the slice, to write, if `Self` is `bf16` (the weights path stores
    /// bf16 weights as it normalizes them).
    fn as_bf16_bits_mut(s: &mut [Self]) -> Option<&mut [u16]> {
        let _ = s;
        None
    }
    /// The slice as `&[f32]` if `Self` is `f32` (lets the kernels skip widening copies).
    fn as_f32_slice(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// The slice as `&[f64]` if `Self` is `f64`.
    fn as_f64_slice(s: &[Self]) -> Option<&[f64]> {
        let _ = s;
        None
    }
    /// The slice as `&mut [f32]` if `Self` is `f32`.
    fn as_f32_slice_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
    /// The slice as `&mut [f64]` if `Self` is `f64`.
    fn as_f64_slice_mut(s: &mut [Self]) -> Option<&mut [f64]> {
        let _ = s;
        None
    }
}

macro_rules! scalar {
    ($t:ty, $dtype:ident, $variant:ident, |$x:ident| $to_f64:expr) => {
        impl Scalar for $t {
            const DTYPE: DType = DType::$dtype;
            fn into_data(data: Vec<Self>) -> ArrayData {
                ArrayData::$variant(data)
            }
            fn slice_of(data: &ArrayData) -> Option<&[Self]> {
                match data {
                    ArrayData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                let $x = self;
                $to_f64
            }
        }
    };
}

scalar!(f32, F32, F32, |x| x as f64);
scalar!(f64, F64, F64, |x| x);
scalar!(bf16, BF16, BF16, |x| x.to_f64());
scalar!(f16, F16, F16, |x| x.to_f64());
scalar!(bool, Bool, Bool, |x| if x { 1.0 } else { 0.0 });
scalar!(i32, I32, I32, |x| x as f64);

impl Element for f32 {
    fn as_f32_slice(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_slice_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Element for f64 {
    fn as_f64_slice(s: &[f64]) -> Option<&[f64]> {
        Some(s)
    }
    fn as_f64_slice_mut(s: &mut [f64]) -> Option<&mut [f64]> {
        Some(s)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    /// A loop the compiler vectorizes (`half` converts bf16 slices one value at a time).
    #[inline(always)]
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_bits(crate::kernel::round::bf16_bits(s));
        }
    }
    fn as_bf16_bits(s: &[Self]) -> Option<&[u16]> {
        Some(s.reinterpret_cast())
    }
    fn as_bf16_bits_mut(s: &mut [Self]) -> Option<&mut [u16]> {
        Some(s.reinterpret_cast_mut())
    }
}

impl Element for f16 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn from_f32_slice(dst: &mut [Self], src: &[f32]) {
        dst.convert_from_f32_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promotion_follows_jax() {
        use DType::*;
        assert_eq!(BF16.promote(F16), F32);
        assert_eq!(BF16.promote(F32), F32);
        assert_eq!(F32.promote(F64), F64);
        assert_eq!(BF16.promote(I32), BF16);
        assert_eq!(Bool.promote(F16), F16);
        assert_eq!(Bool.promote(I32), I32);
    }

    #[test]
    fn finfo_min_values() {
        assert_eq!(DType::BF16.finfo_min(), Some(-3.3895313892515355e38));
        assert_eq!(DType::F16.finfo_min(), Some(-65504.0));
        assert_eq!(DType::F32.finfo_min(), Some(-3.4028234663852886e38));
    }
}
