//! The AVX-512 backend (AVX-512F, with AVX2 and FMA): the generic kernel bodies ([`Body`])
//! compiled for 512-bit vectors through a `#[target_feature]` trampoline (this file), and
//! hand-written kernels behind safe, bounds-checked entry points that check [`Isa::detect`]
//! themselves, one concept per file:
//! - `product.rs`: [`product_avx512`], the `f32` micro-kernel of the tile products (6 rows × 64
//!   columns, 24 accumulators), whose micro-tile frame ([`for_each_tile`], [`RawTile`],
//!   [`start_tile`], [`store_tile`]) `avx512_bf16.rs` shares;
//! - `transpose.rs`: [`transpose_16x16_avx512`], [`transpose_16x16_bits_avx512`]: a 16 × 16
//!   block transposed in the registers;
//! - `dot.rs`: [`dot_avx512`], [`dot4_avx512`], [`axpy_avx512`]: the dot products and axpy of
//!   short queries, with the bits of the portable loops.
//!
//! Every `unsafe` block here carries a `// SAFETY:` comment; each `unsafe fn` states its
//! contract under `# Safety`. Where the CPU lacks AVX-512 the entry points compute with (or
//! return to) the portable code of `portable.rs`. The three files import `shared.rs` (and
//! `product.rs` `portable.rs`), never each other or this file, which re-exports them.

mod dot;
mod product;
mod transpose;

pub(crate) use dot::{axpy_avx512, dot_avx512, dot4_avx512};
pub(crate) use product::product_avx512;
#[cfg(target_arch = "x86_64")]
pub(super) use product::{
    RawTile, for_each_tile, instantiated_tile, start_tile, store_tile, tile_lanes,
};
pub(crate) use transpose::{transpose_16x16_avx512, transpose_16x16_bits_avx512};

#[cfg(target_arch = "x86_64")]
use super::super::exp::Fused;
use super::shared::Body;
#[cfg(target_arch = "x86_64")]
use super::shared::Isa;

/// `K::run` compiled for AVX-512F, AVX2 and FMA where [`Isa::detect`] found them; `input`
/// handed back otherwise (the caller then runs the portable build).
#[inline]
pub(super) fn run<K: Body>(input: K::Input) -> Result<K::Output, K::Input> {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect().has_avx512() {
        // SAFETY: `Isa::detect` found AVX-512F, AVX2 and FMA on this CPU, which are the
        // features `run_avx512` is compiled with.
        return Ok(unsafe { run_avx512::<K>(input) });
    }
    Err(input)
}

/// `K::run` with fused multiply-adds, compiled for AVX-512F, AVX2 and FMA.
///
/// # Safety
/// The CPU supports AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_avx512<K: Body>(input: K::Input) -> K::Output {
    K::run::<Fused>(input)
}
