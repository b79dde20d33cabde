//! The pass over rows of logits: bias, mask, softmax (and, separately, dropout), with the
//! rounding points of Flax (FLAX_SEMANTICS.md §1 steps 6–10).
//!
//! Interface: the caller fills rows with the scaled logits `q·kᵀ` (already rounded to the
//! computation dtype) and calls [`RowPass::softmax_rows`]; the rows then hold the weights,
//! rounded to the weights dtype. [`RowPass::dropout`] applies dropout to such a row in place.
//! Other kernels (e.g. a tiled online-softmax path) can reuse [`RowPass::logit`] for the
//! per-element part.
//!
//! The softmax of `f32` rows (every call whose steps are f32, bf16 or f16) runs in
//! [`normalize_f32`]: loops the compiler vectorizes, compiled for the CPU's vector width by
//! [`isa::with_features`], with the fast [`exp_f32`] and 16 running maxima and sums per row
//! (a fixed order, so bits do not depend on the thread count). 16-bit rounding points are
//! emulated in `f32` by [`Narrow`] bit operations; for f32 they are no-ops and compile away.

use std::marker::PhantomData;
use std::ops::Range;

use rand_core::RngCore;
use rand_pcg::Pcg32;

use super::broadcast::Row;
use super::exp::{MulAdd, exp_f32};
use super::isa::{self, Body, Isa};
use super::plan::{DTypePlan, DropoutPlan};
use super::real::Real;
use super::round::{KeepF32, Narrow, ToBf16, ToF16};
use crate::element::{DType, Element};

/// The mask of one row: the keys its structured terms may let it see, its segment ids, and an
/// explicit row of booleans.
#[derive(Clone, Debug)]
pub(crate) struct MaskRow<'a> {
    /// Keys outside are masked (causal: `0..i + 1`).
    pub visible: Range<usize>,
    /// The row's segment id and the keys' ids: keys of another segment are masked.
    pub segment: Option<(i32, &'a [i32])>,
    /// `false` entries are masked.
    pub explicit: Option<Row<'a, bool>>,
}

impl MaskRow<'_> {
    /// No mask on a row of `kv` keys.
    #[cfg(test)]
    pub(crate) fn none(kv: usize) -> MaskRow<'static> {
        MaskRow {
            visible: 0..kv,
            segment: None,
            explicit: None,
        }
    }

    /// Whether key `j` is kept.
    #[inline(always)]
    pub(crate) fn keeps(&self, j: usize) -> bool {
        self.visible.contains(&j)
            && self.segment.is_none_or(|(id, keys)| keys[j] == id)
            && self.explicit.is_none_or(|r| r.get(j))
    }

    /// Whether every key of `0..self.visible.end` is kept.
    fn keeps_prefix(&self) -> bool {
        self.visible.start == 0 && self.segment.is_none() && self.explicit.is_none()
    }
}

/// The constants of the row pass of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowPass<T> {
    logits: DType,
    softmax: DType,
    softmax_recip: DType,
    weights: DType,
    dropped: DType,
    big_neg: T,
}

impl<T: Real> RowPass<T> {
    /// The row pass for a dtype plan.
    pub(crate) fn new(plan: &DTypePlan) -> Self {
        RowPass {
            logits: plan.logits,
            softmax: plan.softmax,
            softmax_recip: DTypePlan::reciprocal_dtype(plan.softmax),
            weights: plan.weights,
            dropped: plan.dropped_weights,
            // `finfo(computation dtype).min`; every float dtype's min fits in f32 or f64.
            big_neg: T::from_f64(plan.compute.finfo_min().unwrap_or(f64::MIN)),
        }
    }

    /// The same pass with `big_neg` as the masked logit (jax.nn's, instead of Flax's
    /// `finfo(compute).min`).
    pub(crate) fn with_big_neg(mut self, big_neg: f64) -> Self {
        self.big_neg = T::from_f64(big_neg);
        self
    }

    /// One logit after bias and mask, in the softmax dtype: `x + bias` rounded to the logits
    /// dtype, replaced by `big_neg` where masked, then cast to the softmax dtype.
    #[inline(always)]
    pub(crate) fn logit<B: Element>(&self, x: T, bias: Option<B>, keep: bool) -> T {
        let x = match bias {
            Some(b) => (x + T::from_elem(b)).round_to(self.logits),
            None => x,
        };
        let x = if keep { x } else { self.big_neg };
        x.round_to(self.softmax)
    }

    /// Turns rows of logits (`rows.len() / kv` rows of `kv` values) into weights: bias and
    /// mask (`operands(r)` gives those of row `r`), then `jax.nn.softmax` with its rounding
    /// points (`x - max`, `exp`, the sum, `1/sum`, the product, each rounded to the softmax
    /// dtype; the sum of 16-bit values in f32), then the cast to the weights dtype.
    ///
    /// A row whose visible keys end at `e` (`visible.end`; causal: `i + 1`) needs only its
    /// logits `0..e`: the others are masked
    /// whatever their value, and are neither read nor computed (the caller may skip them).
    /// They are `big_neg` in Flax, so their weight is `exp(big_neg - max)` times the scale:
    /// exactly 0 unless the row's maximum is within `exp`'s range of `big_neg` (e.g. a fully
    /// masked row, uniform over all `kv` keys); then they are filled with `big_neg` and the
    /// whole row is normalized.
    ///
    /// A fully masked row becomes uniform (every entry is `big_neg`). NaN in a row makes the
    /// row NaN, as in Flax.
    ///
    /// Inlined so that its loops are compiled for the instruction set of the caller's kernel
    /// body.
    ///
    /// With `bf16_weights` (as long as `rows`), the weights go there, as bf16 bit patterns,
    /// instead of into `rows` (which are then left unnormalized): one pass fewer when the
    /// weights are bf16.
    #[inline(always)]
    pub(crate) fn softmax_rows<'o, B: Element>(
        &self,
        rows: &mut [T],
        kv: usize,
        operands: impl Fn(usize) -> (Option<Row<'o, B>>, MaskRow<'o>),
        bf16_weights: Option<&mut [u16]>,
    ) {
        if kv == 0 {
            return;
        }
        let mut prefixes = Vec::with_capacity(rows.len() / kv);
        for (r, row) in rows.chunks_mut(kv).enumerate() {
            let (bias, mask) = operands(r);
            let prefix = mask.visible.end.min(kv);
            prefixes.push(prefix);
            let row = &mut row[..prefix];
            match (bias, mask) {
                // The row holds values of the logits dtype: rounding them to the same
                // softmax dtype changes nothing.
                (None, mask) if mask.keeps_prefix() => {
                    if self.softmax != self.logits {
                        T::round_slice(row, self.softmax);
                    }
                }
                (bias, mask) => {
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = self.logit(*x, bias.as_ref().map(|b| b.get(j)), mask.keeps(j));
                    }
                }
            }
        }
        let big_neg = self.big_neg.round_to(self.softmax);
        // Rows of `f32` store the bf16 weights as they normalize them; others convert after.
        let (stored, converted) = match T::as_f32(rows) {
            Some(_) => (bf16_weights, None),
            None => (None, bf16_weights),
        };
        let rows_hold_weights = stored.is_none();
        match T::as_f32_mut(rows) {
            Some(rows) => normalize_f32(
                RowsInput {
                    rows,
                    kv,
                    prefixes: &prefixes,
                    big_neg: big_neg.to_elem::<f32>(),
                    recip: self.softmax_recip,
                    bf16_weights: stored,
                },
                self.softmax,
            ),
            None => {
                for (row, &prefix) in rows.chunks_mut(kv).zip(&prefixes) {
                    self.normalize(row, prefix, big_neg);
                }
            }
        }
        // (A bf16 store rounds to the weights dtype, bf16, by itself.)
        if self.weights != self.softmax && rows_hold_weights {
            T::round_slice(rows, self.weights);
        }
        if let Some(out) = converted {
            for (o, x) in out.iter_mut().zip(rows.iter()) {
                *o = x.to_elem::<half::bf16>().to_bits();
            }
        }
    }

    /// One row's softmax ([`RowPass::softmax_rows`] after bias and mask, the logits
    /// `prefix..` masked and not yet written), scalar code for any `Real` (the `f64`
    /// computations).
    fn normalize(&self, row: &mut [T], prefix: usize, big_neg: T) {
        let max_of = |row: &[T]| {
            let mut max = T::from_f64(f64::NEG_INFINITY);
            for &x in row {
                if x > max {
                    max = x;
                }
            }
            max
        };
        let unit = |x: T, max: T| {
            (x - max)
                .round_to(self.softmax)
                .exp()
                .round_to(self.softmax)
        };
        let mut prefix = prefix;
        let mut max = max_of(&row[..prefix]);
        if prefix < row.len() && unit(big_neg, max) != T::ZERO {
            // The masked logits have a nonzero weight: normalize the whole row.
            row[prefix..].fill(big_neg);
            prefix = row.len();
            max = max_of(row);
        }
        let (head, tail) = row.split_at_mut(prefix);
        let mut sum = T::ZERO;
        for x in head.iter_mut() {
            let u = unit(*x, max);
            *x = u;
            sum = sum + u;
        }
        let scale = sum
            .round_to(self.softmax)
            .recip()
            .round_to(self.softmax_recip);
        for x in head.iter_mut() {
            *x = (*x * scale).round_to(self.softmax);
        }
        // `exp(big_neg - max)` is 0: the masked weights are `0 · scale` (NaN if the row is).
        tail.fill((T::ZERO * scale).round_to(self.softmax));
    }

    /// Dropout on a row of weights: element `j` is multiplied by the multiplier when the `j`-th
    /// draw of `rng` is below the threshold, else by 0, and rounded to the dropped-weights dtype.
    /// A multiplication as in Flax (`weights * keep / keep_prob`): a dropped NaN or infinite
    /// weight stays NaN. `rng` must be positioned at the row's first logical index.
    pub(crate) fn dropout(&self, row: &mut [T], rng: &mut Pcg32, plan: &DropoutPlan) {
        let multiplier = T::from_f64(plan.multiplier);
        for x in row.iter_mut() {
            let draw = u64::from(rng.next_u32());
            let keep = if draw < plan.threshold {
                multiplier
            } else {
                T::ZERO
            };
            *x = (*x * keep).round_to(self.dropped);
        }
    }
}

/// Running maxima and sums per row: one vector of `f32` on AVX-512.
const LANES: usize = 16;

/// [`RowPass::normalize`] for `f32` rows, vectorized (see the module docs), each row rounded at
/// the points of softmax dtype `softmax` and its reciprocal at `input.recip`.
fn normalize_f32(input: RowsInput<'_>, softmax: DType) {
    fn with<N: Narrow>(input: RowsInput<'_>) {
        // `with_features` evaluates the fast `exp` with FMA wherever the SIMD builds run.
        isa::with_features::<NormalizeRows<N>>(Isa::detect(), input);
    }
    match softmax {
        DType::BF16 => with::<ToBf16>(input),
        DType::F16 => with::<ToF16>(input),
        _ => with::<KeepF32>(input),
    }
}

/// What [`NormalizeRows`] works on.
struct RowsInput<'r> {
    rows: &'r mut [f32],
    kv: usize,
    /// Per row: its logits `prefix..kv` are masked and not yet written.
    prefixes: &'r [usize],
    /// The masked logit, in the softmax dtype.
    big_neg: f32,
    recip: DType,
    /// Where the weights go as bf16 bits (else into `rows`).
    bf16_weights: Option<&'r mut [u16]>,
}

/// The body [`isa::with_features`] compiles per instruction set: [`normalize_row`] over rows.
struct NormalizeRows<'r, N>(PhantomData<(&'r mut [f32], N)>);

impl<'r, N: Narrow> Body for NormalizeRows<'r, N> {
    type Input = RowsInput<'r>;
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd>(input: RowsInput<'r>) {
        let kv = input.kv;
        let mut out_rows = input.bf16_weights.map(|out| out.chunks_mut(kv));
        for (row, &prefix) in input.rows.chunks_mut(kv).zip(input.prefixes) {
            let mut out = out_rows.as_mut().and_then(|rows| rows.next());
            let max = row_max(&row[..prefix]);
            if prefix == row.len() {
                normalize_row::<N, M>(row, out, max, input.recip);
            } else if N::round(exp_f32::<M>(N::round(input.big_neg - max))) != 0.0 {
                // The masked logits have a nonzero weight: normalize the whole row.
                row[prefix..].fill(input.big_neg);
                normalize_row::<N, M>(row, out, row_max(row), input.recip);
            } else {
                let (head, tail) = row.split_at_mut(prefix);
                let head_out = out.as_deref_mut().map(|o| &mut o[..prefix]);
                let scale = normalize_row::<N, M>(head, head_out, max, input.recip);
                // `exp(big_neg - max)` is 0: the masked weights are `0 · scale` (NaN if the
                // row is).
                match out {
                    Some(out) => out[prefix..].fill(N::bf16_bits_of_round(0.0 * scale)),
                    None => tail.fill(N::round(0.0 * scale)),
                }
            }
        }
    }
}

/// The maximum of a row, skipping NaN (16 running maxima).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    // A comparison select (not `f32::max`) skips NaN like a scalar `if x > max` and compiles to
    // one vector max instruction; NaN still reaches the sum and makes the row NaN.
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in maxima.iter_mut().zip(chunk) {
            *m = larger(*m, x);
        }
    }
    for (m, &x) in maxima.iter_mut().zip(chunks.remainder()) {
        *m = larger(*m, x);
    }
    reduce_lanes(maxima, larger)
}

/// `op` over the lanes as a tree (halves, quarters, eighths, the last pair): four dependent
/// steps, where a left fold waits on fifteen (one in ten samples of the row pass at `kv = 128`).
#[inline(always)]
fn reduce_lanes(lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let halves: [f32; 8] = std::array::from_fn(|i| op(lanes[i], lanes[i + 8]));
    let quarters: [f32; 4] = std::array::from_fn(|i| op(halves[i], halves[i + 4]));
    op(op(quarters[0], quarters[2]), op(quarters[1], quarters[3]))
}

/// One row's softmax given its maximum: `u = N(exp(N(x - max)))`, `sum`,
/// `scale = R(1 / N(sum))`, `N(u · scale)`, with `N` the softmax dtype's rounding and `R` the
/// reciprocal's. The weights go to `out` as bf16 bits if given, else into `row`. Returns
/// `scale`.
#[inline(always)]
fn normalize_row<N: Narrow, M: MulAdd>(
    row: &mut [f32],
    out: Option<&mut [u16]>,
    max: f32,
    recip: DType,
) -> f32 {
    let mut sums = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk.iter_mut()) {
            let u = N::round(exp_f32::<M>(N::round(*x - max)));
            *x = u;
            *s += u;
        }
    }
    for (s, x) in sums.iter_mut().zip(chunks.into_remainder()) {
        let u = N::round(exp_f32::<M>(N::round(*x - max)));
        *x = u;
        *s += u;
    }
    let sum = reduce_lanes(sums, |a, b| a + b);
    let scale = (1.0 / N::round(sum)).round_to(recip);
    match out {
        Some(out) => {
            for (o, &x) in out.iter_mut().zip(row.iter()) {
                *o = N::bf16_bits_of_round(x * scale);
            }
        }
        None => {
            for x in row.iter_mut() {
                *x = N::round(*x * scale);
            }
        }
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn softmax_rows_and_masks() {
        let plan = DTypePlan::new(DType::F64, None, false, false);
        let pass = RowPass::<f64>::new(&plan);
        let mut row = vec![1.0, 2.0, 3.0];
        pass.softmax_rows::<f64>(&mut row, 3, |_| (None, MaskRow::none(3)), None);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0]
            .iter()
            .map(|x| (x - 3.0f64).exp())
            .collect();
        let s: f64 = e.iter().sum();
        for (w, e) in row.iter().zip(&e) {
            assert!((w - e / s).abs() < 1e-15);
        }
        let mut row = vec![1.0, 2.0, 3.0];
        let mask = MaskRow {
            visible: 0..1,
            segment: None,
            explicit: None,
        };
        pass.softmax_rows::<f64>(&mut row, 3, |_| (None, mask.clone()), None);
        assert_eq!(row, vec![1.0, 0.0, 0.0]);
        let keep = [false, false, false];
        let mut row = vec![5.0, -1.0, 7.0];
        let mask = MaskRow {
            visible: 0..keep.len(),
            segment: None,
            explicit: Some(Row::Values(&keep)),
        };
        pass.softmax_rows::<f64>(&mut row, 3, |_| (None, mask.clone()), None);
        assert!(
            row.iter().all(|&w| (w - 1.0 / 3.0).abs() < 1e-16),
            "{row:?}"
        );
    }

    #[test]
    fn f16_fully_masked_row_rounds_to_f16() {
        let plan = DTypePlan::new(DType::F16, None, false, false);
        let pass = RowPass::<f32>::new(&plan);
        let keep = [false; 6];
        let mut row = vec![0.5f32; 6];
        let mask = MaskRow {
            visible: 0..keep.len(),
            segment: None,
            explicit: Some(Row::Values(&keep)),
        };
        pass.softmax_rows::<bf16>(&mut row, 6, |_| (None, mask.clone()), None);
        // FLAX_SEMANTICS.md §1 step 8: 0.16662598 for k = 6.
        assert!(row.iter().all(|&w| w == 0.16662598), "{row:?}");
    }
}
