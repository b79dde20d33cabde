//! The benchmark grid (mirrored by `bench/grid.py`) and one call of each kernel path, shared
//! by `benches/attention.rs` (`cargo bench`), `benches/harness.rs` (the binary that
//! `bench/compare.sh` times against JAX and PyTorch) and `tests/bench_smoke.rs` (CI).

use attn::kernel::{attention, attention_weights};
use attn::{AttnError, Context, Geometry, Mask, Options};
use half::bf16;

/// Element type of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `f32` inputs, weights and output.
    F32,
    /// `bf16` inputs, weights and output (Flax's dtypes for bf16 inputs).
    Bf16,
}

/// One shape: query `[batch, q_len, heads, depth]`, key and value `[batch, kv_len, heads, depth]`.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Name shared with bench/grid.py.
    pub name: &'static str,
    /// Batch size.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Query length.
    pub q_len: usize,
    /// Key/value length.
    pub kv_len: usize,
    /// Depth of queries, keys and values.
    pub depth: usize,
    /// Causal mask (`j <= i`).
    pub causal: bool,
    /// Element type.
    pub dtype: Dtype,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const fn case(name: &'static str, b: usize, h: usize, lq: usize, lk: usize, d: usize) -> Case {
    Case {
        name,
        batch: b,
        heads: h,
        q_len: lq,
        kv_len: lk,
        depth: d,
        causal: false,
        dtype: Dtype::F32,
    }
}

const fn causal(c: Case) -> Case {
    Case { causal: true, ..c }
}

const fn bf16(c: Case) -> Case {
    Case {
        dtype: Dtype::Bf16,
        ..c
    }
}

/// The shapes of issue 4 (f32, self-attention unless noted) and the decode case; depths 80
/// and 96 and a length that is not a multiple of any block (2000 = 15·128 + 80); bf16
/// versions of the large shapes (issue 15).
pub const GRID: &[Case] = &[
    case("b1_h8_l128_d64", 1, 8, 128, 128, 64),
    case("b4_h8_l512_d64", 4, 8, 512, 512, 64),
    causal(case("b4_h8_l512_d64_causal", 4, 8, 512, 512, 64)),
    case("b1_h16_l2048_d64", 1, 16, 2048, 2048, 64),
    causal(case("b1_h16_l2048_d64_causal", 1, 16, 2048, 2048, 64)),
    case("b2_h12_l1024_d128", 2, 12, 1024, 1024, 128),
    case("decode_b8_h8_q1_kv4096_d128", 8, 8, 1, 4096, 128),
    case("b2_h16_l1024_d80", 2, 16, 1024, 1024, 80),
    case("b2_h12_l1024_d96", 2, 12, 1024, 1024, 96),
    case("b1_h16_l2000_d64", 1, 16, 2000, 2000, 64),
    causal(case("b1_h16_l2000_d64_causal", 1, 16, 2000, 2000, 64)),
    bf16(case("b4_h8_l512_d64_bf16", 4, 8, 512, 512, 64)),
    bf16(case("b1_h16_l2048_d64_bf16", 1, 16, 2048, 2048, 64)),
    bf16(causal(case(
        "b1_h16_l2048_d64_causal_bf16",
        1,
        16,
        2048,
        2048,
        64,
    ))),
    bf16(case("b2_h12_l1024_d128_bf16", 2, 12, 1024, 1024, 128)),
    bf16(case("decode_b8_h8_q1_kv4096_d128_bf16", 8, 8, 1, 4096, 128)),
];

/// The peak-memory shape of issue 4 (output path only).
pub const MEMORY_CASE: Case = case("b1_h16_l8192_d64", 1, 16, 8192, 8192, 64);

impl Case {
    /// `4·B·H·Lq·Lk·D` for the output, `2·…` for the weights alone; dense even for causal.
    pub fn flops(&self, weights_only: bool) -> f64 {
        let n = (self.batch * self.heads * self.q_len * self.kv_len * self.depth) as f64;
        if weights_only { 2.0 * n } else { 4.0 * n }
    }

    /// Bytes of K and V, which a decode step must read once.
    pub fn kv_bytes(&self) -> f64 {
        let size = match self.dtype {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        };
        (2 * self.batch * self.kv_len * self.heads * self.depth * size) as f64
    }

    /// The same kind of case with lengths divided by 64 and at most 2 batch elements and heads:
    /// every code path, in microseconds (for the CI smoke test).
    pub fn tiny(&self) -> Case {
        Case {
            batch: self.batch.min(2),
            heads: self.heads.min(2),
            q_len: self.q_len.div_ceil(64),
            kv_len: self.kv_len.div_ceil(64) + 3,
            ..*self
        }
    }
}

/// Inputs and result buffers of one case.
pub struct Buffers {
    case: Case,
    query: Vec<f32>,
    key: Vec<f32>,
    value: Vec<f32>,
    query_bf16: Vec<bf16>,
    key_bf16: Vec<bf16>,
    value_bf16: Vec<bf16>,
    /// The output `[batch, q_len, heads, depth]` of the last output call (f32 cases).
    pub output: Vec<f32>,
    output_bf16: Vec<bf16>,
    /// The weights `[batch, heads, q_len, kv_len]` of the last weights call (f32 cases).
    pub weights: Vec<f32>,
    weights_bf16: Vec<bf16>,
}

/// `n` deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

impl Buffers {
    /// Inputs of `case` and zeroed result buffers; the weights buffer only if `weights`.
    pub fn new(case: &Case, weights: bool) -> Buffers {
        let q = case.batch * case.q_len * case.heads * case.depth;
        let kv = case.batch * case.kv_len * case.heads * case.depth;
        let w = if weights {
            case.batch * case.heads * case.q_len * case.kv_len
        } else {
            0
        };
        let bf = case.dtype == Dtype::Bf16;
        let (query, key, value) = (values(q, 1), values(kv, 2), values(kv, 3));
        let to_bf16 = |v: &[f32]| -> Vec<bf16> {
            if bf {
                v.iter().map(|&x| bf16::from_f32(x)).collect()
            } else {
                Vec::new()
            }
        };
        let (query_bf16, key_bf16, value_bf16) = (to_bf16(&query), to_bf16(&key), to_bf16(&value));
        let keep_f32 = |v: Vec<f32>| if bf { Vec::new() } else { v };
        Buffers {
            case: *case,
            query: keep_f32(query),
            key: keep_f32(key),
            value: keep_f32(value),
            query_bf16,
            key_bf16,
            value_bf16,
            output: vec![0.0; if bf { 0 } else { q }],
            output_bf16: vec![bf16::ZERO; if bf { q } else { 0 }],
            weights: vec![0.0; if bf { 0 } else { w }],
            weights_bf16: vec![bf16::ZERO; if bf { w } else { 0 }],
        }
    }

    fn geometry(&self) -> Geometry<'static, usize, usize, usize, usize> {
        let c = &self.case;
        Geometry {
            batch_shape: match c.batch {
                1 => &[1],
                2 => &[2],
                4 => &[4],
                8 => &[8],
                _ => unreachable!("grid batch sizes are 1, 2, 4 and 8"),
            },
            q_len: c.q_len,
            kv_len: c.kv_len,
            heads: c.heads,
            kv_heads: c.heads,
            qk_depth: c.depth,
            v_depth: c.depth,
        }
    }

    fn mask(&self) -> Mask<'static> {
        if self.case.causal {
            Mask::causal()
        } else {
            Mask::none()
        }
    }

    /// `dot_product_attention` (the tiled output path) on `pool`.
    pub fn run_output(&mut self, pool: &rayon::ThreadPool) -> Result<(), AttnError> {
        let (geom, mask, opts) = (self.geometry(), self.mask(), Options::default());
        let mut ctx = Context::deterministic().pool(pool);
        match self.case.dtype {
            Dtype::F32 => attention(
                &geom,
                &self.query,
                &self.key,
                &self.value,
                None::<&attn::Broadcast<'_, f32>>,
                &mask,
                &opts,
                &mut ctx,
                &mut self.output,
            ),
            Dtype::Bf16 => attention(
                &geom,
                &self.query_bf16,
                &self.key_bf16,
                &self.value_bf16,
                None::<&attn::Broadcast<'_, bf16>>,
                &mask,
                &opts,
                &mut ctx,
                &mut self.output_bf16,
            ),
        }
    }

    /// `dot_product_attention_weights` (the materialized weights path) on `pool`.
    pub fn run_weights(&mut self, pool: &rayon::ThreadPool) -> Result<(), AttnError> {
        let (geom, mask, opts) = (self.geometry(), self.mask(), Options::default());
        let mut ctx = Context::deterministic().pool(pool);
        match self.case.dtype {
            Dtype::F32 => attention_weights(
                &geom,
                &self.query,
                &self.key,
                None::<&attn::Broadcast<'_, f32>>,
                &mask,
                &opts,
                &mut ctx,
                &mut self.weights,
            ),
            Dtype::Bf16 => attention_weights(
                &geom,
                &self.query_bf16,
                &self.key_bf16,
                None::<&attn::Broadcast<'_, bf16>>,
                &mask,
                &opts,
                &mut ctx,
                &mut self.weights_bf16,
            ),
        }
    }

    /// Every output and weight value (widened to f32), to check that a run produced numbers.
    pub fn results(&self) -> Vec<f32> {
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        [
            self.output.clone(),
            widen(&self.output_bf16),
            self.weights.clone(),
            widen(&self.weights_bf16),
        ]
        .concat()
    }
}

/// A rayon pool of `threads` threads.
pub fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon thread pool")
}

/// The visibility of a structured case (issue 13). Every structure but `None` is causal,
/// top-left aligned (`q_len == kv_len` in these cases, so bottom-right is the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Structure {
    /// Every key visible (the decode cases: one query at the end sees every cached key, which
    /// is bottom-right causal for one query).
    None,
    /// Declared causal (`Mask::causal()`).
    Causal,
    /// Causal and a sliding window `(left, 0)`: query `i` sees keys `i - left ..= i`
    /// (`left + 1` keys, itself included).
    Window(usize),
    /// Packed sequences of these lengths (summing to `q_len`) with segment ids, causal within
    /// each segment.
    Segments(&'static [usize]),
    /// The same sequences run one by one (one causal call each); attn only.
    OneByOne(&'static [usize]),
    /// Causal handed over as a bool tensor `[1, 1, L, L]` (Flax's `make_causal_mask`).
    CausalTensor,
}

/// One case of the structured suite: batch 1, query `[1, q_len, heads, depth]`, key and value
/// `[1, kv_len, kv_heads, depth]`.
#[derive(Clone, Copy, Debug)]
pub struct StructuredCase {
    /// Name shared with bench/grid.py.
    pub name: &'static str,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (dividing `heads`).
    pub kv_heads: usize,
    /// Query length.
    pub q_len: usize,
    /// Key/value length.
    pub kv_len: usize,
    /// Depth of queries, keys and values.
    pub depth: usize,
    /// Element type.
    pub dtype: Dtype,
    /// Which keys each query sees.
    pub structure: Structure,
}

impl std::fmt::Display for StructuredCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Lengths of the 8 packed sequences (256–1024 tokens, summing to 4096).
pub const PACKED8: &[usize] = &[256, 1024, 384, 768, 512, 320, 448, 384];
/// The same lengths twice (16 sequences, 8192 tokens): the peak-memory case.
pub const PACKED16: &[usize] = &[
    256, 1024, 384, 768, 512, 320, 448, 384, 256, 1024, 384, 768, 512, 320, 448, 384,
];

const fn structured(
    name: &'static str,
    h: usize,
    k: usize,
    lq: usize,
    lk: usize,
    d: usize,
    structure: Structure,
) -> StructuredCase {
    StructuredCase {
        name,
        heads: h,
        kv_heads: k,
        q_len: lq,
        kv_len: lk,
        depth: d,
        dtype: Dtype::F32,
        structure,
    }
}

/// The cases of issue 13's performance item (bench/grid.py `STRUCTURED` mirrors them).
pub const STRUCTURED: &[StructuredCase] = &[
    structured(
        "gqa_decode_h32_k8_kv8192_d128",
        32,
        8,
        1,
        8192,
        128,
        Structure::None,
    ),
    StructuredCase {
        dtype: Dtype::Bf16,
        ..structured(
            "gqa_decode_h32_k8_kv8192_d128_bf16",
            32,
            8,
            1,
            8192,
            128,
            Structure::None,
        )
    },
    structured(
        "gqa_prefill_h32_k8_l2048_d128_causal",
        32,
        8,
        2048,
        2048,
        128,
        Structure::Causal,
    ),
    structured(
        "window512_h8_l8192_d64",
        8,
        8,
        8192,
        8192,
        64,
        Structure::Window(511),
    ),
    structured(
        "causal_h8_l8192_d64",
        8,
        8,
        8192,
        8192,
        64,
        Structure::Causal,
    ),
    structured(
        "packed8_h8_l4096_d64",
        8,
        8,
        4096,
        4096,
        64,
        Structure::Segments(PACKED8),
    ),
    structured(
        "one_by_one8_h8_l4096_d64",
        8,
        8,
        4096,
        4096,
        64,
        Structure::OneByOne(PACKED8),
    ),
    structured(
        "causal_tensor_h8_l4095_d64",
        8,
        8,
        4095,
        4095,
        64,
        Structure::CausalTensor,
    ),
    structured(
        "causal_h8_l4095_d64",
        8,
        8,
        4095,
        4095,
        64,
        Structure::Causal,
    ),
];

/// Cases only run for the structured suite's peak-memory report (output path, L=8192).
pub const STRUCTURED_MEMORY: &[StructuredCase] = &[structured(
    "packed16_h8_l8192_d64",
    8,
    8,
    8192,
    8192,
    64,
    Structure::Segments(PACKED16),
)];

impl StructuredCase {
    /// Bytes of K and V (read once per key/value head).
    pub fn kv_bytes(&self) -> f64 {
        (2 * self.kv_len * self.kv_heads * self.depth * self.dtype.size()) as f64
    }

    /// Bytes of q, k, v and the output.
    pub fn qkvo_bytes(&self) -> f64 {
        (2 * self.q_len * self.heads * self.depth * self.dtype.size()) as f64 + self.kv_bytes()
    }

    /// The same kind of case with lengths divided by 64 (packed sequences: [`TINY_PACKED`])
    /// and at most 4 query heads, GQA kept (for the CI smoke test).
    pub fn tiny(&self) -> StructuredCase {
        let shrink = |l: usize| l.div_ceil(64);
        let (structure, len) = match self.structure {
            Structure::Window(left) => (Structure::Window(shrink(left)), None),
            Structure::Segments(_) => (Structure::Segments(TINY_PACKED), Some(64)),
            Structure::OneByOne(_) => (Structure::OneByOne(TINY_PACKED), Some(64)),
            s => (s, None),
        };
        let heads = self.heads.min(4);
        StructuredCase {
            heads,
            kv_heads: if self.kv_heads == self.heads {
                heads
            } else {
                2
            },
            q_len: len.unwrap_or(shrink(self.q_len)),
            kv_len: len.unwrap_or(shrink(self.kv_len)),
            structure,
            ..*self
        }
    }
}

/// Packed sequences of the tiny structured cases (summing to 64).
pub const TINY_PACKED: &[usize] = &[4, 16, 6, 12, 8, 5, 7, 6];

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// One forward of the multi-head attention layer (issue 14): `inputs [1, len, features]`,
/// self-attention, no mask.
#[derive(Clone, Copy, Debug)]
pub struct LayerCase {
    /// Name shared with bench/grid.py.
    pub name: &'static str,
    /// Features `E` (in and out).
    pub features: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Depth per head.
    pub head_dim: usize,
    /// Tokens of the forward (`Forward`) or cached tokens before the step (`Decode`).
    pub len: usize,
    /// Parameters, inputs and computation dtype.
    pub dtype: Dtype,
    /// Forward pass, or one decode step over `len` cached tokens.
    pub decode: bool,
}

impl std::fmt::Display for LayerCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

const fn layer(name: &'static str, e: usize, h: usize, l: usize, dtype: Dtype) -> LayerCase {
    LayerCase {
        name,
        features: e,
        heads: h,
        kv_heads: h,
        head_dim: e / h,
        len: l,
        dtype,
        decode: false,
    }
}

const fn decode_step(name: &'static str, dtype: Dtype) -> LayerCase {
    LayerCase {
        name,
        features: 1024,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        len: 4096,
        dtype,
        decode: true,
    }
}

/// The cases of issue 14's performance item (bench/grid.py `LAYER` mirrors them).
pub const LAYER: &[LayerCase] = &[
    layer("mha_e768_h12_l512", 768, 12, 512, Dtype::F32),
    layer("mha_e768_h12_l512_bf16", 768, 12, 512, Dtype::Bf16),
    layer("mha_e768_h12_l2048", 768, 12, 2048, Dtype::F32),
    layer("mha_e768_h12_l2048_bf16", 768, 12, 2048, Dtype::Bf16),
    decode_step("decode_gqa_e1024_h32_k8_d128_kv4096", Dtype::F32),
    decode_step("decode_gqa_e1024_h32_k8_d128_kv4096_bf16", Dtype::Bf16),
];

impl LayerCase {
    /// Bytes of the cached keys and values a decode step reads (`len + 1` slots: the cache
    /// and the new token).
    pub fn cache_bytes(&self) -> f64 {
        (2 * (self.len + 1) * self.kv_heads * self.head_dim * self.dtype.size()) as f64
    }

    /// Bytes of the four projection kernels (read once by a decode step).
    pub fn param_bytes(&self) -> f64 {
        let (e, q, kv) = (
            self.features,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        );
        ((2 * e * q + 2 * e * kv) * self.dtype.size()) as f64
    }

    /// The same kind of case at E=32, 4 heads (2 key/value heads for GQA), 8 dims per head,
    /// 16 tokens (for the CI smoke test).
    pub fn tiny(&self) -> LayerCase {
        LayerCase {
            features: 32,
            heads: 4,
            kv_heads: if self.kv_heads == self.heads { 4 } else { 2 },
            head_dim: 8,
            len: 16,
            ..*self
        }
    }
}

/// Forward and backward of the output path (issue 16) in one place: the output of
/// `attn::dot_product_attention_fwd` and the gradients of `attn::dot_product_attention_bwd` for
/// `cotangent` (f32 `[batch, len, heads, depth]` arrays; causal top-left when `causal`).
pub fn forward_backward(
    query: &attn::Array,
    key: &attn::Array,
    value: &attn::Array,
    cotangent: &attn::Array,
    causal: bool,
    pool: &rayon::ThreadPool,
) -> Result<(attn::Array, attn::AttentionGrads), AttnError> {
    let args = || {
        let a = attn::FlaxArgs::new().deterministic(true).pool(pool);
        if causal {
            a.causal(attn::kernel::Align::TopLeft)
        } else {
            a
        }
    };
    // A training step: the forward keeps its residuals, the backward reads them.
    let (output, saved) = attn::dot_product_attention_fwd(query, key, value, args())?;
    let grads =
        attn::dot_product_attention_bwd(query, key, value, &output, &saved, cotangent, args())?;
    Ok((output, grads))
}

/// f32 arrays `query, key, value, cotangent` of a grid case, for [`forward_backward`].
pub fn fwd_bwd_inputs(case: &Case) -> Result<[attn::Array; 4], AttnError> {
    let q = vec![case.batch, case.q_len, case.heads, case.depth];
    let kv = vec![case.batch, case.kv_len, case.heads, case.depth];
    let n = |s: &[usize]| s.iter().product::<usize>();
    Ok([
        attn::Array::new(values(n(&q), 1), q.clone())?,
        attn::Array::new(values(n(&kv), 2), kv.clone())?,
        attn::Array::new(values(n(&kv), 3), kv)?,
        attn::Array::new(values(n(&q), 4), q)?,
    ])
}
