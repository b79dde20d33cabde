//! The calls of the structured (issue 13), layer (issue 14) and forward+backward (issue 16)
//! suites, on the cases of `benches/grid.rs`; shared by `benches/harness.rs` and
//! `tests/bench_smoke.rs`.

use attn::kernel::{Align, SegmentIds, Window, attention};
use attn::layer::{InFeatures, KvCache, MhaConfig, MultiHeadDotProductAttention};
use attn::{Array, AttnError, Broadcast, Context, DType, Element, Geometry, Mask, Options};
use half::bf16;

use crate::grid::{Case, Dtype, LayerCase, Structure, StructuredCase};

/// `n` deterministic pseudo-random values in [-1, 1) of type `T`.
fn values<T: Element>(n: usize, seed: u32) -> Vec<T> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            T::from_f64(((state >> 8) as f64 / (1u32 << 23) as f64 - 1.0) * 0.5)
        })
        .collect()
}

/// Inputs, masks and output of one structured case in element type `T`.
struct Typed<T> {
    query: Vec<T>,
    key: Vec<T>,
    value: Vec<T>,
    output: Vec<T>,
}

impl<T: Element> Typed<T> {
    fn new(c: &StructuredCase) -> Self {
        let q = c.q_len * c.heads * c.depth;
        let kv = c.kv_len * c.kv_heads * c.depth;
        Typed {
            query: values(q, 1),
            key: values(kv, 2),
            value: values(kv, 3),
            output: vec![T::from_f64(0.0); q],
        }
    }
}

/// The buffers of a structured case: inputs, segment ids, the bool causal tensor.
pub struct StructuredBuffers {
    case: StructuredCase,
    f32: Option<Typed<f32>>,
    bf16: Option<Typed<bf16>>,
    segment_ids: Vec<i32>,
    dense: Vec<bool>,
}

impl StructuredBuffers {
    /// Inputs of `case` (and its segment ids or bool causal tensor), zeroed output.
    pub fn new(case: &StructuredCase) -> StructuredBuffers {
        let segment_ids = match case.structure {
            Structure::Segments(lens) => lens
                .iter()
                .enumerate()
                .flat_map(|(s, &n)| std::iter::repeat_n(s as i32, n))
                .collect(),
            _ => Vec::new(),
        };
        let dense = match case.structure {
            Structure::CausalTensor => (0..case.q_len)
                .flat_map(|i| (0..case.kv_len).map(move |j| j <= i))
                .collect(),
            _ => Vec::new(),
        };
        StructuredBuffers {
            case: *case,
            f32: (case.dtype == Dtype::F32).then(|| Typed::new(case)),
            bf16: (case.dtype == Dtype::Bf16).then(|| Typed::new(case)),
            segment_ids,
            dense,
        }
    }

    /// One call through the kernel layer (several for `OneByOne`) on `pool`.
    pub fn run(&mut self, pool: &rayon::ThreadPool) -> Result<(), AttnError> {
        let (case, ids, dense) = (&self.case, &self.segment_ids, &self.dense);
        match (&mut self.f32, &mut self.bf16) {
            (Some(t), _) => run_typed(case, ids, dense, t, pool),
            (_, Some(t)) => run_typed(case, ids, dense, t, pool),
            _ => unreachable!("one dtype is allocated"),
        }
    }

    /// The output, widened to f32 (to check that a run produced numbers).
    pub fn output(&self) -> Vec<f32> {
        match (&self.f32, &self.bf16) {
            (Some(t), _) => t.output.clone(),
            (_, Some(t)) => t.output.iter().map(|x| x.to_f32()).collect(),
            _ => Vec::new(),
        }
    }
}

fn run_typed<T: Element>(
    c: &StructuredCase,
    ids: &[i32],
    dense: &[bool],
    t: &mut Typed<T>,
    pool: &rayon::ThreadPool,
) -> Result<(), AttnError> {
    let opts = Options::default();
    let geom = |q_len, kv_len| Geometry {
        batch_shape: &[1],
        q_len,
        kv_len,
        heads: c.heads,
        kv_heads: c.kv_heads,
        qk_depth: c.depth,
        v_depth: c.depth,
    };
    let call = |mask: &Mask<'_>, q: (usize, usize), kv: (usize, usize), out: &mut [T]| {
        let (qr, kr) = (c.heads * c.depth, c.kv_heads * c.depth);
        attention(
            &geom(q.1 - q.0, kv.1 - kv.0),
            &t.query[q.0 * qr..q.1 * qr],
            &t.key[kv.0 * kr..kv.1 * kr],
            &t.value[kv.0 * kr..kv.1 * kr],
            None::<&Broadcast<'_, T>>,
            mask,
            &opts,
            &mut Context::deterministic().pool(pool),
            out,
        )
    };
    let all = ((0, c.q_len), (0, c.kv_len));
    match c.structure {
        Structure::None => call(&Mask::none(), all.0, all.1, &mut t.output),
        Structure::Causal => call(&Mask::causal(), all.0, all.1, &mut t.output),
        Structure::Window(left) => {
            let window = Window {
                left,
                right: 0,
                align: Align::TopLeft,
            };
            let mask = Mask::causal().with_window(window);
            call(&mask, all.0, all.1, &mut t.output)
        }
        Structure::Segments(_) => {
            let mask = Mask::causal().with_segment_ids(SegmentIds {
                query: ids,
                key: ids,
            });
            call(&mask, all.0, all.1, &mut t.output)
        }
        Structure::CausalTensor => {
            let tensor = Broadcast::new("mask", dense, &[1, 1, c.q_len, c.kv_len])?;
            call(&Mask::dense(tensor), all.0, all.1, &mut t.output)
        }
        Structure::OneByOne(lens) => {
            let row = c.heads * c.depth;
            let mut output = std::mem::take(&mut t.output);
            let mut at = 0;
            let mut result = Ok(());
            for &n in lens {
                let out = &mut output[at * row..(at + n) * row];
                result = call(&Mask::causal(), (at, at + n), (at, at + n), out);
                if result.is_err() {
                    break;
                }
                at += n;
            }
            t.output = output;
            result
        }
    }
}

/// A layer, its input, and (decode cases) a cache filled with `len` tokens.
pub struct LayerBench {
    case: LayerCase,
    layer: MultiHeadDotProductAttention,
    inputs: Array,
    token: Array,
    cache: KvCache,
    /// A second cache of the same capacity, kept empty (the empty-cache step).
    empty: KvCache,
    /// The result of the last call.
    pub output: Option<Array>,
}

fn dtype(d: Dtype) -> DType {
    match d {
        Dtype::F32 => DType::F32,
        Dtype::Bf16 => DType::BF16,
    }
}

fn array(d: Dtype, shape: Vec<usize>, seed: u32) -> Result<Array, AttnError> {
    let n = shape.iter().product();
    match d {
        Dtype::F32 => Array::new(values::<f32>(n, seed), shape),
        Dtype::Bf16 => Array::new(values::<bf16>(n, seed), shape),
    }
}

impl LayerBench {
    /// The layer of `case` (Flax's initializers, parameters and computation in the case's
    /// dtype, biases on), its input `[1, len, E]`, and for decode cases a cache of capacity
    /// `len + 1` prefilled with `len` tokens (on `pool`).
    pub fn new(case: &LayerCase, pool: &rayon::ThreadPool) -> Result<LayerBench, AttnError> {
        let mut cfg = MhaConfig::new(case.heads);
        cfg.num_kv_heads = Some(case.kv_heads);
        cfg.qkv_features = Some(case.heads * case.head_dim);
        cfg.dtype = Some(dtype(case.dtype));
        cfg.param_dtype = dtype(case.dtype);
        let layer = MultiHeadDotProductAttention::init(cfg, InFeatures::same(case.features), 7)?;
        let inputs = array(case.dtype, vec![1, case.len, case.features], 1)?;
        let token = array(case.dtype, vec![1, 1, case.features], 2)?;
        let mut cache = KvCache::new(case.len + 1);
        if case.decode {
            let ctx = &mut Context::deterministic().pool(pool);
            layer.prefill(&mut cache, &inputs, None, ctx)?;
        }
        Ok(LayerBench {
            case: *case,
            layer,
            inputs,
            token,
            cache,
            empty: KvCache::new(case.len + 1),
            output: None,
        })
    }

    /// Forward cases: `layer.forward(inputs)`. Decode cases: one decode step over the
    /// `len` cached tokens (`empty_cache`: over none, in a second cache of the same capacity),
    /// then the cache is truncated back (`KvCache::truncate`, no copy).
    pub fn run(&mut self, pool: &rayon::ThreadPool, empty_cache: bool) -> Result<(), AttnError> {
        let ctx = &mut Context::deterministic().pool(pool);
        if !self.case.decode {
            self.output = Some(self.layer.forward(&self.inputs, None, None, None, ctx)?);
            return Ok(());
        }
        let (cache, keep) = if empty_cache {
            (&mut self.empty, 0)
        } else {
            (&mut self.cache, self.case.len)
        };
        cache.truncate(keep)?;
        self.output = Some(self.layer.decode(cache, &self.token, None, ctx)?);
        cache.truncate(keep)
    }
}

/// Inputs of a forward + backward case (f32 grid cases).
pub struct FwdBwd {
    causal: bool,
    inputs: [Array; 4],
    /// The output and the three gradients of the last call.
    pub results: Vec<Array>,
}

impl FwdBwd {
    /// Query, key, value and the output's cotangent of `case`.
    pub fn new(case: &Case) -> Result<FwdBwd, AttnError> {
        Ok(FwdBwd {
            causal: case.causal,
            inputs: crate::grid::fwd_bwd_inputs(case)?,
            results: Vec::new(),
        })
    }

    /// [`crate::grid::forward_backward`] on `pool`.
    pub fn run(&mut self, pool: &rayon::ThreadPool) -> Result<(), AttnError> {
        let [q, k, v, ct] = &self.inputs;
        let (o, g) = crate::grid::forward_backward(q, k, v, ct, self.causal, pool)?;
        self.results = [Some(o), Some(g.query), Some(g.key), g.value]
            .into_iter()
            .flatten()
            .collect();
        Ok(())
    }
}
