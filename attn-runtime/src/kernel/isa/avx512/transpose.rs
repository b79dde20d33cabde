//! A 16 × 16 block transposed in the AVX-512 registers ([`transpose_16x16_avx512`], `f32`
//! values times a scale; [`transpose_16x16_bits_avx512`], 32-bit words moved bit for bit), for
//! the operand layouts of the tile products. Every `unsafe` block carries a `// SAFETY:`
//! comment; the `unsafe fn` states its contract under `# Safety`.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::super::shared::Isa;

/// `dst[d · ld + j] = src[j · src_row + d] · scale` for `j, d < 16`: a 16 × 16 block
/// transposed in the AVX-512 registers (16 loads, 64 shuffles, 16 stores, where a copy through
/// memory moves one value at a time). Returns `false`, writing nothing, where [`Isa::detect`]
/// found no AVX-512. Panics if a row of the block would fall outside `src` or `dst`.
#[inline]
pub(crate) fn transpose_16x16_avx512(
    src: &[f32],
    src_row: usize,
    scale: f32,
    dst: &mut [f32],
    ld: usize,
) -> bool {
    transpose_16x16_words(src, src_row, Some(scale), dst, ld)
}

/// [`transpose_16x16_avx512`] of 32-bit words moved as they are (no arithmetic touches them,
/// so the bits of `bf16` pairs come through unchanged).
#[inline]
pub(crate) fn transpose_16x16_bits_avx512(
    src: &[u32],
    src_row: usize,
    dst: &mut [u32],
    ld: usize,
) -> bool {
    transpose_16x16_words(src, src_row, None, dst, ld)
}

/// The 32-bit element types [`transpose_16x16_words`] moves.
trait Word32: Copy {}
impl Word32 for f32 {}
impl Word32 for u32 {}

/// The two transposes above: words times `scale` (only ever given for `f32`) or moved as
/// they are.
#[inline]
fn transpose_16x16_words<T: Word32>(
    src: &[T],
    src_row: usize,
    scale: Option<f32>,
    dst: &mut [T],
    ld: usize,
) -> bool {
    assert!(
        src.len() >= 15 * src_row + 16 && dst.len() >= 15 * ld + 16,
        "16 × 16 transpose out of bounds"
    );
    if !Isa::detect().has_avx512() {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F (checked above) and the assertion above keeps the 16
        // rows of 16 words read from `src` and written to `dst` inside the slices; `T` is
        // `f32` or `u32`, of the size and alignment of `f32`, and a `u32` block comes without
        // a scale, so that its words are only loaded, shuffled and stored.
        unsafe {
            transpose_16x16(
                src.as_ptr().cast::<f32>(),
                src_row,
                scale,
                dst.as_mut_ptr().cast::<f32>(),
                ld,
            )
        };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`transpose_16x16_avx512`]'s body (values times `scale` if given, else moved bit for bit).
///
/// # Safety
/// The CPU supports AVX-512F; `src + j · src_row` and `dst + d · ld` are valid for 16 `f32`
/// each for `j, d < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(
    src: *const f32,
    src_row: usize,
    scale: Option<f32>,
    dst: *mut f32,
    ld: usize,
) {
    let rows: [__m512; 16] = std::array::from_fn(|j| {
        // SAFETY: row j < 16 of the block, valid by the contract.
        let row = unsafe { _mm512_loadu_ps(src.add(j * src_row)) };
        match scale {
            Some(scale) => _mm512_mul_ps(row, _mm512_set1_ps(scale)),
            None => row,
        }
    });
    // In each 128-bit lane ℓ (values 4ℓ..4ℓ + 3 of a row): pairs of rows interleaved, then
    // `columns[4k + m]` holds value 4ℓ + m of rows 4k..4k + 3.
    let pairs: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (rows[i / 2 * 2], rows[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let columns: [__m512; 16] = std::array::from_fn(|i| {
        let (k, m) = (i / 4, i % 4);
        let (lo, hi) = (pairs[4 * k + m / 2], pairs[4 * k + 2 + m / 2]);
        if m % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(lo, hi)
        } else {
            _mm512_shuffle_ps::<0xEE>(lo, hi)
        }
    });
    // Row 4ℓ + m of the result is lane ℓ of columns m, 4 + m, 8 + m and 12 + m: a 4 × 4
    // transpose of 128-bit lanes.
    for m in 0..4 {
        let [a, b, c, d] = [columns[m], columns[4 + m], columns[8 + m], columns[12 + m]];
        let (ab_low, ab_high) = (
            _mm512_shuffle_f32x4::<0x44>(a, b),
            _mm512_shuffle_f32x4::<0xEE>(a, b),
        );
        let (cd_low, cd_high) = (
            _mm512_shuffle_f32x4::<0x44>(c, d),
            _mm512_shuffle_f32x4::<0xEE>(c, d),
        );
        let out = [
            _mm512_shuffle_f32x4::<0x88>(ab_low, cd_low),
            _mm512_shuffle_f32x4::<0xDD>(ab_low, cd_low),
            _mm512_shuffle_f32x4::<0x88>(ab_high, cd_high),
            _mm512_shuffle_f32x4::<0xDD>(ab_high, cd_high),
        ];
        for (lane, row) in out.into_iter().enumerate() {
            // SAFETY: row 4 · lane + m < 16 of the result, valid by the contract.
            unsafe { _mm512_storeu_ps(dst.add((4 * lane + m) * ld), row) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_16x16_moves_every_value_once_and_scales_it() {
        if !Isa::detect().has_avx512() {
            return;
        }
        let (src_row, ld) = (21, 19);
        let src: Vec<f32> = (0..15 * src_row + 16).map(|i| i as f32).collect();
        let mut dst = vec![-1.0f32; 15 * ld + 16 + 3];
        assert!(transpose_16x16_avx512(&src, src_row, 0.5, &mut dst, ld));
        for (i, &got) in dst.iter().enumerate() {
            let (d, j) = (i / ld, i % ld);
            let want = if d < 16 && j < 16 {
                src[j * src_row + d] * 0.5
            } else {
                -1.0
            };
            assert_eq!(got.to_bits(), want.to_bits(), "dst[{d}][{j}]");
        }
    }

    #[test]
    fn bits_transpose_moves_every_word_unchanged() {
        if !Isa::detect().has_avx512() {
            return;
        }
        let (src_row, ld) = (18, 23);
        // Words that arithmetic would change: signalling NaNs (quieted), subnormals (flushed
        // under DAZ), negative zero; and plain bf16 pairs.
        let special = [
            0x7f80_0001,
            0xff80_0001,
            0x0000_0001,
            0x8000_0000,
            0x3f80_bf80,
        ];
        let src: Vec<u32> = (0..15 * src_row + 16)
            .map(|i| special[i % 5] ^ ((i as u32) << 8))
            .collect();
        let mut dst = vec![7u32; 15 * ld + 16 + 2];
        assert!(transpose_16x16_bits_avx512(&src, src_row, &mut dst, ld));
        for (i, &got) in dst.iter().enumerate() {
            let (d, j) = (i / ld, i % ld);
            let want = if d < 16 && j < 16 {
                src[j * src_row + d]
            } else {
                7
            };
            assert_eq!(got, want, "dst[{d}][{j}]");
        }
    }
}
