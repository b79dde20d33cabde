//! The vocabulary every backend and every caller of the instruction sets shares, with no
//! instruction-set code and no `unsafe`: [`Isa`] (which instruction set the kernels run with,
//! detected once per process, capped by `ATTN_MAX_ISA`), [`Body`] (a kernel body that the backends compile once per
//! instruction set), [`Product`] (the description of one small matrix product of a tile) and
//! [`TileScalar`] (the arithmetic of the portable products). It imports no other part of the
//! kernels but `exp`'s [`MulAdd`]: every backend imports it, it imports no backend.

use std::ops::{Add, Mul};
use std::sync::OnceLock;

use super::super::exp::MulAdd;
use crate::element::Element;

/// The instruction set the kernels run with: one backend each, chosen once per process.
///
/// [`Isa::active`] is the best one the CPU has, or the one named by the environment variable
/// `ATTN_MAX_ISA` if that is lower (as oneDNN's `ONEDNN_MAX_CPU_ISA` caps its kernels): for
/// comparing backends on one machine, and for the tests, which run every backend the CPU has.
/// Every backend gives results within the same tolerances of Flax; backends differ in their
/// bits (the order of the additions inside a product), never in their semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Isa {
    /// Anything else: the portable code for the baseline target.
    Portable,
    /// x86-64 with AVX2 and FMA: the portable code compiled for 256-bit vectors.
    Avx2,
    /// x86-64 with AVX-512F (plus AVX2 and FMA): explicit 512-bit micro-kernels.
    Avx512,
    /// As [`Isa::Avx512`], and products of `bf16` operands by the AVX512-BF16 dot-product
    /// instruction (`vdpbf16ps`: two `bf16` products per `f32` lane, accumulated in `f32`).
    Avx512Bf16,
}

impl Isa {
    /// Every backend of this build, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16];

    /// The instruction set the kernels of this process run with: the best one the CPU has,
    /// capped by `ATTN_MAX_ISA` (one of [`Isa::name`]'s names; read once, at the first call).
    /// An `ATTN_MAX_ISA` that names no backend is reported once on standard error and ignored.
    pub fn active() -> Isa {
        Isa::detect()
    }

    /// [`Isa::active`], under the name the kernels use.
    pub(crate) fn detect() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Isa::best_of_cpu();
            match std::env::var("ATTN_MAX_ISA") {
                Ok(name) => match name.parse::<Isa>() {
                    Ok(cap) => best.min(cap),
                    Err(message) => {
                        eprintln!("attn: ignoring ATTN_MAX_ISA: {message}");
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// The best instruction set this CPU supports, whatever `ATTN_MAX_ISA` says.
    fn best_of_cpu() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if avx2 && std::arch::is_x86_feature_detected!("avx512f") {
                if std::arch::is_x86_feature_detected!("avx512bf16") {
                    return Isa::Avx512Bf16;
                }
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Whether this CPU can run the backend (whatever `ATTN_MAX_ISA` says).
    pub fn is_supported(self) -> bool {
        self <= Isa::best_of_cpu()
    }

    /// Every backend this process can run ([`Isa::active`] and those below it), best first.
    pub fn available() -> Vec<Isa> {
        let active = Isa::detect();
        Isa::ALL
            .into_iter()
            .rev()
            .filter(|&isa| isa <= active)
            .collect()
    }

    /// The backend's name, as `ATTN_MAX_ISA` takes it: `portable`, `avx2`, `avx512`,
    /// `avx512_bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512_bf16",
        }
    }

    /// The CPU features the backend needs, as `/proc/cpuinfo` names them.
    pub fn cpu_features(self) -> &'static str {
        match self {
            Isa::Portable => "none",
            Isa::Avx2 => "avx2, fma",
            Isa::Avx512 => "avx512f, avx2, fma",
            Isa::Avx512Bf16 => "avx512f, avx512_bf16, avx2, fma",
        }
    }

    /// Whether the 512-bit `f32` micro-kernels run with this instruction set.
    pub(crate) fn has_avx512(self) -> bool {
        matches!(self, Isa::Avx512 | Isa::Avx512Bf16)
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Isa {
    type Err = String;

    /// A backend by its [`Isa::name`] (ASCII case ignored; `avx512bf16` also accepted).
    fn from_str(name: &str) -> Result<Isa, String> {
        let wanted = name.trim().to_ascii_lowercase().replace('-', "_");
        let wanted = if wanted == "avx512bf16" {
            "avx512_bf16".to_string()
        } else {
            wanted
        };
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = Isa::ALL.iter().map(|isa| isa.name()).collect();
                format!(
                    "{name:?} names no instruction set; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// A kernel body that [`with_features`](super::with_features) compiles once per instruction set.
pub(crate) trait Body {
    /// What the body takes.
    type Input;
    /// What the body returns.
    type Output;
    /// The body, with multiply–adds evaluated as `M` says (fused where the FMA feature is
    /// enabled). Implementations mark it `#[inline(always)]` (and everything it calls that
    /// should be vectorized too), so that it is inlined into the `#[target_feature]`
    /// trampolines of the backends and its loops are vectorized for the instruction set.
    fn run<M: MulAdd>(input: Self::Input) -> Self::Output;
}

/// One small matrix product of the fused attention tile:
/// `c[r·ldc + col] (= or +=) Σₚ a[r·a_row + p·a_step] · b[p·b_step + col]`
/// for `r < rows`, `col < cols`, `p < depth`.
///
/// `a` is read by broadcasting single elements (any strides); `b` and `c` rows are contiguous.
pub(crate) struct Product<'s, T> {
    /// Left operand.
    pub a: &'s [T],
    /// Distance in `a` between consecutive output rows.
    pub a_row: usize,
    /// Distance in `a` between consecutive summation indices.
    pub a_step: usize,
    /// Right operand.
    pub b: &'s [T],
    /// Distance in `b` between consecutive summation indices (rows of `b`).
    pub b_step: usize,
    /// Output rows.
    pub rows: usize,
    /// Output columns.
    pub cols: usize,
    /// Length of the summation.
    pub depth: usize,
    /// Add to `c` (`true`) or overwrite it (`false`).
    pub accumulate: bool,
    /// Factor of the products: `c (=|+=) scale · (a · b)` (1: none).
    pub scale: f32,
}

impl<T> Product<'_, T> {
    /// Whether every index the product touches lies inside `a`, `b` and a `c` of `c_len`
    /// elements with row stride `ldc`.
    pub(crate) fn in_bounds(&self, c_len: usize, ldc: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last_a = (self.rows - 1) * self.a_row + self.depth.saturating_sub(1) * self.a_step;
        let last_b = self.depth.saturating_sub(1) * self.b_step + self.cols - 1;
        let last_c = (self.rows - 1) * ldc + self.cols - 1;
        (self.depth == 0 || (last_a < self.a.len() && last_b < self.b.len()))
            && last_c < c_len
            && ldc >= self.cols
    }
}

/// The arithmetic of the portable tile products, `f32` or `f64`: the part of the tiled output
/// path's arithmetic (`TileReal`, which extends this trait) that [`Product`]'s portable loops
/// need.
pub(crate) trait TileScalar: Copy + Add<Output = Self> + Mul<Output = Self> {
    /// 0.
    const ZERO: Self;
    /// `x` converted (rounded) to this type.
    fn of<E: Element>(x: E) -> Self;
    /// `x` rounded to this type.
    fn from_f64(x: f64) -> Self;
}

impl TileScalar for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn of<E: Element>(x: E) -> Self {
        x.to_f32()
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl TileScalar for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn of<E: Element>(x: E) -> Self {
        x.to_f64()
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}
