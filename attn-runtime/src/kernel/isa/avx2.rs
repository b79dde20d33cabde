//! The AVX2 backend (x86-64 with AVX2 and FMA): no hand-written kernel, the portable code and
//! the generic kernel bodies ([`Body`]) compiled for 256-bit vectors with fused multiply-adds,
//! through a `#[target_feature]` trampoline. Its one `unsafe` block calls the trampoline after
//! checking [`Isa::detect`].

#[cfg(target_arch = "x86_64")]
use super::super::exp::Fused;
use super::shared::Body;
#[cfg(target_arch = "x86_64")]
use super::shared::Isa;

/// `K::run` compiled for AVX2 and FMA where [`Isa::detect`] found them; `input` handed back
/// otherwise (the caller then runs the portable build).
#[inline]
pub(super) fn run<K: Body>(input: K::Input) -> Result<K::Output, K::Input> {
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() != Isa::Portable {
        // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU (it reports `Avx512` or
        // `Avx512Bf16` only when those are present as well).
        return Ok(unsafe { run_avx2::<K>(input) });
    }
    Err(input)
}

/// `K::run` with fused multiply-adds, compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Body>(input: K::Input) -> K::Output {
    K::run::<Fused>(input)
}
