//! The instruction sets the kernels run with: one backend per instruction set, chosen once per
//! process at run time ([`Isa::detect`]; the shipped build must not rely on
//! `-C target-cpu=native`), behind safe entry points. Callers outside this module import only
//! what this file re-exports; no backend is named outside it.
//!
//! - `shared.rs`: [`Isa`], [`Body`], [`Product`], [`TileScalar`]: the types every backend and
//!   every caller shares (no instruction-set code, no `unsafe`);
//! - `portable.rs`: the baseline loops and every backend's fallback;
//! - `avx2.rs`: the portable code compiled for AVX2 and FMA (a trampoline, no kernel of its own);
//! - `avx512/`: the AVX-512 backend, one concept per file: `mod.rs` (the trampoline and the
//!   re-exports), `product.rs` (the `f32` micro-kernel of the tile products and its micro-tile
//!   frame), `transpose.rs` (the 16 × 16 register transposes), `dot.rs` (the dot products and
//!   axpy of short queries);
//! - `avx512_bf16.rs`: the `bf16`-pair micro-kernel (`vdpbf16ps`), on `avx512/product.rs`'s
//!   micro-tile frame;
//! - this file: [`with_features`], which runs a generic, `#[inline(always)]` kernel [`Body`]
//!   compiled for the detected instruction set, so that its loops (row maxima, `exp`, sums,
//!   rescaling) auto-vectorize at that width.
//!
//! All `unsafe` code of the instruction sets lives in the backend files (`portable.rs`,
//! `avx2.rs`, the files of `avx512/`, `avx512_bf16.rs`), each block with its `// SAFETY:`
//! comment; each safe entry point checks the CPU's features itself, so that no caller can reach
//! an instruction the CPU lacks. The imports form a DAG: this file → `avx512_bf16.rs` →
//! `avx512/mod.rs` → `avx512/{product,transpose,dot}.rs` → `portable.rs` → `shared.rs` (only
//! `product.rs` imports `portable.rs`; `avx2.rs` → `shared.rs`); no backend imports this file,
//! no file of `avx512/` imports `avx512/mod.rs`, and nothing here imports the drivers that use
//! it.

mod avx2;
mod avx512;
mod avx512_bf16;
mod portable;
mod shared;

pub(crate) use avx512::{
    axpy_avx512, dot_avx512, dot4_avx512, product_avx512, transpose_16x16_avx512,
    transpose_16x16_bits_avx512,
};
pub(crate) use avx512_bf16::product_bf16_pairs;
pub(crate) use portable::{
    as_u32_pairs, axpy_portable, dot_portable, prefetch, product_bf16_pairs_portable,
    product_portable,
};
pub use shared::Isa;
pub(crate) use shared::{Body, Product, TileScalar};

use super::exp::Unfused;

/// Runs `K::run` compiled for `isa`. An `isa` the CPU lacks falls back to the portable build
/// (never undefined behaviour): each backend checks [`Isa::detect`] itself and hands the input
/// back when the CPU lacks its features.
#[inline]
pub(crate) fn with_features<K: Body>(isa: Isa, input: K::Input) -> K::Output {
    let input = match isa {
        Isa::Avx512 | Isa::Avx512Bf16 => match avx512::run::<K>(input) {
            Ok(output) => return output,
            Err(input) => input,
        },
        Isa::Avx2 => match avx2::run::<K>(input) {
            Ok(output) => return output,
            Err(input) => input,
        },
        Isa::Portable => input,
    };
    K::run::<Unfused>(input)
}
