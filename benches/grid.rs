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

/// The shapes of issue 4 (f32, self-attention unless noted), the decode case and a bf16 shape.
pub const GRID: &[Case] = &[
    case("b1_h8_l128_d64", 1, 8, 128, 128, 64),
    case("b4_h8_l512_d64", 4, 8, 512, 512, 64),
    causal(case("b4_h8_l512_d64_causal", 4, 8, 512, 512, 64)),
    case("b1_h16_l2048_d64", 1, 16, 2048, 2048, 64),
    causal(case("b1_h16_l2048_d64_causal", 1, 16, 2048, 2048, 64)),
    case("b2_h12_l1024_d128", 2, 12, 1024, 1024, 128),
    case("decode_b8_h8_q1_kv4096_d128", 8, 8, 1, 4096, 128),
    Case {
        dtype: Dtype::Bf16,
        ..case("b4_h8_l512_d64_bf16", 4, 8, 512, 512, 64)
    },
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
