//! The arithmetic of the tiled output path ([`TileReal`]: `f32` or `f64`) and, per type, the
//! backend each operation goes to: `f32` tile products on the AVX-512 (or AVX512-BF16)
//! micro-kernels where the task runs with them, kernel bodies compiled for the detected
//! instruction set; `f64` on the portable code everywhere. The portable products themselves
//! and [`TileScalar`] live in the `isa` module, which this file imports and which imports
//! nothing of the output path.

use std::ops::{Add, Mul, Sub};

use super::super::dot::Dot;
use super::super::exp::{MulAdd, Unfused, exp_f32};
use super::super::isa::{self, Body, Isa, Product, TileScalar};
use super::mask::BiasRows;
use super::scratch::ThreadScratch;
use crate::element::Element;

/// The arithmetic of the tiled path (`f32` or `f64`): [`TileScalar`] (what the portable
/// products need), [`ThreadScratch`] (a scratch cell per thread), and what the driver and the
/// block kernels need besides.
pub(super) trait TileReal:
    TileScalar
    + ThreadScratch
    + Default
    + Dot
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + 'static
{
    /// 1.
    const ONE: Self;
    /// −∞.
    const NEG_INFINITY: Self;
    /// `self` converted (rounded) to `O`.
    fn to<O: Element>(self) -> O;
    /// The larger of the two; a NaN `other` is ignored (NaN still reaches the result through
    /// `exp(NaN - m)`). A comparison select, not `f32::max`: it compiles to one vector max
    /// instruction where `f32::max`, which also ignores a NaN `self`, takes three.
    fn max(self, other: Self) -> Self;
    /// `1 / self`.
    fn recip(self) -> Self;
    /// `eˣ`.
    fn exp<M: MulAdd>(self) -> Self;
    /// The slice itself when its elements already have this type.
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]>;
    /// The slice itself when its elements already have this type.
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]>;
    /// The slice itself when this type is `f32`.
    fn as_f32_mut(values: &mut [Self]) -> Option<&mut [f32]>;
    /// `c (=|+=) a · b` (see [`Product`]).
    fn product(isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize);
    /// `c (=|+=) a · b` over `bf16` pairs (see [`isa::product_bf16_pairs`]).
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize);
    /// `out[n · stride] += bias[b, h, i, j0 + n]` for `n < count`.
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    );
    /// Runs `K` compiled for `isa` (`f32`) or portably (`f64`, which has no SIMD kernels).
    fn dispatch<K: Body>(isa: Isa, input: K::Input) -> K::Output;
}

impl TileReal for f32 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    #[inline(always)]
    fn to<O: Element>(self) -> O {
        O::from_f32(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn exp<M: MulAdd>(self) -> Self {
        exp_f32::<M>(self)
    }
    #[inline(always)]
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]> {
        E::as_f32_slice(values)
    }
    #[inline(always)]
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]> {
        E::as_f32_slice_mut(values)
    }
    #[inline(always)]
    fn as_f32_mut(values: &mut [f32]) -> Option<&mut [f32]> {
        Some(values)
    }
    #[inline(always)]
    fn product(isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize) {
        if isa.has_avx512() {
            isa::product_avx512(p, c, ldc);
        } else {
            isa::product_portable(p, c, ldc);
        }
    }
    #[inline(always)]
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize) {
        isa::product_bf16_pairs(p, c, ldc);
    }
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    ) {
        bias.add_f32(at, j0, count, out, stride);
    }
    fn dispatch<K: Body>(isa: Isa, input: K::Input) -> K::Output {
        isa::with_features::<K>(isa, input)
    }
}

impl TileReal for f64 {
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    #[inline(always)]
    fn to<O: Element>(self) -> O {
        O::from_f64(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn exp<M: MulAdd>(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn direct<E: Element>(values: &[E]) -> Option<&[Self]> {
        E::as_f64_slice(values)
    }
    #[inline(always)]
    fn direct_mut<E: Element>(values: &mut [E]) -> Option<&mut [Self]> {
        E::as_f64_slice_mut(values)
    }
    #[inline(always)]
    fn as_f32_mut(_values: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn product(_isa: Isa, p: &Product<'_, Self>, c: &mut [Self], ldc: usize) {
        isa::product_portable(p, c, ldc);
    }
    fn product_bf16_pairs(p: &Product<'_, u32>, c: &mut [Self], ldc: usize) {
        isa::product_bf16_pairs_portable(p, c, ldc);
    }
    fn add_bias(
        bias: &dyn BiasRows,
        at: (usize, usize, usize),
        j0: usize,
        count: usize,
        out: &mut [Self],
        stride: usize,
    ) {
        bias.add_f64(at, j0, count, out, stride);
    }
    fn dispatch<K: Body>(_isa: Isa, input: K::Input) -> K::Output {
        K::run::<Unfused>(input)
    }
}
