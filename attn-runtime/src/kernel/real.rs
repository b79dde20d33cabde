//! The two internal arithmetic types of the kernels (`f32`, `f64`) and rounding to a dtype.

use core::ops::{Add, Mul, Sub};
use std::cell::RefCell;

use half::{bf16, f16};

use super::gemm::GemmScalar;
use super::round::{self, Narrow, ToBf16, ToF16};
use crate::element::{DType, Element};

/// Spare buffers each thread keeps per arithmetic type (see [`Real::take_spare`]).
pub(crate) const SPARE_SLOTS: usize = 3;

/// The largest spare buffer a thread keeps between calls (16 MiB): reusing memory saves the
/// allocation, page faults and zeroing a call would otherwise pay, but an idle thread should
/// not hold on to the buffers of a huge call.
pub(crate) const SPARE_MAX_BYTES: usize = 16 << 20;

thread_local! {
    static SPARE_F32: RefCell<[Vec<f32>; SPARE_SLOTS]> = const {
        RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
    static SPARE_F64: RefCell<[Vec<f64>; SPARE_SLOTS]> = const {
        RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// The type the kernels compute in: `f32` (for f32/bf16/f16 inputs) or `f64`.
pub(crate) trait Real:
    GemmScalar
    + Default
    + super::dot::Dot
    + PartialOrd
    + core::fmt::Debug
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
{
    /// 0
    const ZERO: Self;
    /// 1
    const ONE: Self;
    /// Converts from `f64` (rounds for `f32`).
    fn from_f64(x: f64) -> Self;
    /// Widens an element (exact: every element type fits the `Real` chosen for it).
    fn from_elem<E: Element>(e: E) -> Self;
    /// Narrows to an element, rounding to nearest.
    fn to_elem<E: Element>(self) -> E;
    /// `e^self`.
    fn exp(self) -> Self;
    /// `1 / self`.
    fn recip(self) -> Self;
    /// Rounds to the nearest value of `dtype` (a float dtype no wider than `Self`).
    fn round_to(self, dtype: DType) -> Self;
    /// Rounds every value of `values` to `dtype` ([`Real::round_to`]).
    fn round_slice(values: &mut [Self], dtype: DType) {
        for x in values {
            *x = x.round_to(dtype);
        }
    }
    /// The slice as `&mut [f32]` if `Self` is `f32` (for the `f32`-only fast row pass).
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
    /// The slice as `&[f32]` if `Self` is `f32` (for the `f32`-only SIMD products).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }
    /// Takes this thread's spare buffer `slot` (< [`SPARE_SLOTS`]), empty if there is none;
    /// give it back with [`Real::put_spare`] so the next call reuses its memory.
    fn take_spare(slot: usize) -> Vec<Self>;
    /// Keeps `buffer` as this thread's spare buffer `slot`, unless it is larger than
    /// [`SPARE_MAX_BYTES`] (then it is freed).
    fn put_spare(slot: usize, buffer: Vec<Self>);
    /// Views a slice of elements as a slice of `Self`, if the element type is `Self`.
    fn same_slice<E: Element>(s: &[E]) -> Option<&[Self]>;
    /// Views a mutable slice of elements as a slice of `Self`, if the element type is `Self`.
    fn same_slice_mut<E: Element>(s: &mut [E]) -> Option<&mut [Self]>;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    #[inline(always)]
    fn from_elem<E: Element>(e: E) -> f32 {
        e.to_f32()
    }
    #[inline(always)]
    fn to_elem<E: Element>(self) -> E {
        E::from_f32(self)
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    #[inline(always)]
    fn recip(self) -> f32 {
        1.0 / self
    }
    #[inline(always)]
    fn round_to(self, dtype: DType) -> f32 {
        match dtype {
            DType::BF16 => ToBf16::round(self),
            DType::F16 => ToF16::round(self),
            _ => self,
        }
    }
    #[inline(always)]
    fn round_slice(values: &mut [f32], dtype: DType) {
        round::round_slice(values, dtype);
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn take_spare(slot: usize) -> Vec<f32> {
        SPARE_F32.with(|spare| std::mem::take(&mut spare.borrow_mut()[slot]))
    }
    fn put_spare(slot: usize, buffer: Vec<f32>) {
        if buffer.capacity() * size_of::<f32>() <= SPARE_MAX_BYTES {
            SPARE_F32.with(|spare| spare.borrow_mut()[slot] = buffer);
        }
    }
    fn same_slice<E: Element>(s: &[E]) -> Option<&[f32]> {
        E::as_f32_slice(s)
    }
    fn same_slice_mut<E: Element>(s: &mut [E]) -> Option<&mut [f32]> {
        E::as_f32_slice_mut(s)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    #[inline(always)]
    fn from_elem<E: Element>(e: E) -> f64 {
        e.to_f64()
    }
    #[inline(always)]
    fn to_elem<E: Element>(self) -> E {
        E::from_f64(self)
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn recip(self) -> f64 {
        1.0 / self
    }
    #[inline(always)]
    fn round_to(self, dtype: DType) -> f64 {
        match dtype {
            DType::F32 => self as f32 as f64,
            DType::BF16 => bf16::from_f64(self).to_f64(),
            DType::F16 => f16::from_f64(self).to_f64(),
            _ => self,
        }
    }
    fn take_spare(slot: usize) -> Vec<f64> {
        SPARE_F64.with(|spare| std::mem::take(&mut spare.borrow_mut()[slot]))
    }
    fn put_spare(slot: usize, buffer: Vec<f64>) {
        if buffer.capacity() * size_of::<f64>() <= SPARE_MAX_BYTES {
            SPARE_F64.with(|spare| spare.borrow_mut()[slot] = buffer);
        }
    }
    fn same_slice<E: Element>(s: &[E]) -> Option<&[f64]> {
        E::as_f64_slice(s)
    }
    fn same_slice_mut<E: Element>(s: &mut [E]) -> Option<&mut [f64]> {
        E::as_f64_slice_mut(s)
    }
}
