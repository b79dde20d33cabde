//! `flax.linen.MultiHeadDotProductAttention` as a Rust layer: the configuration, the parameters
//! (Flax's initializers, or loaded from a Flax msgpack or safetensors checkpoint), the forward
//! pass, and KV-cache decoding ([`KvCache`]). See `docs/layer.md`.
//!
//! Files: `params.rs` (config, sizes, parameter tree), `checkpoint.rs` (msgpack / safetensors
//! readers), `projection.rs` (the GEMM projections and the QK LayerNorm), `cache.rs` (the KV
//! cache and decoding), `backward.rs` (the gradients: [`MultiHeadDotProductAttention::vjp`]),
//! `view.rs` (borrowed inputs, `ndarray` interop).
//!
//! ```
//! use attn_runtime::layer::{InFeatures, MhaConfig, MultiHeadDotProductAttention};
//! use attn_runtime::{Array, Context};
//!
//! let layer = MultiHeadDotProductAttention::init(MhaConfig::new(4), InFeatures::same(32), 0)?;
//! let x = Array::new(vec![0.25f32; 2 * 5 * 32], [2, 5, 32])?;
//! let y = layer.forward(&x, None, None, None, &mut Context::deterministic())?;
//! assert_eq!(y.shape(), &[2, 5, 32]);
//! # Ok::<(), attn_runtime::AttnError>(())
//! ```

mod backward;
mod cache;
mod checkpoint;
mod params;
mod projection;
mod view;

pub use backward::{LayerGradients, MhaGrads, MhaPullback};
pub use cache::KvCache;
pub use checkpoint::{msgpack_subtree, safetensors_subtree};
pub use params::{Dense, Dims, InFeatures, MhaConfig, MhaParams};
#[cfg(feature = "ndarray")]
pub use view::into_ndarray;
pub use view::{ArrayRef, Floats, LayerElement};

use std::collections::BTreeMap;

use crate::array::Array;
use crate::context::Context;
use crate::element::DType;
use crate::error::AttnError;
use crate::flax::{FlaxArgs, dot_product_attention};
use crate::kernel::Align;
use projection::{dense, dense_dtype, floats_of, layer_norm};

/// The attention's inputs of one call, projected.
struct Projected {
    /// The query and key before their LayerNorm (`normalize_qk` only).
    q_pre: Option<Array>,
    k_pre: Option<Array>,
    q: Array,
    k: Array,
    v: Array,
}

/// Flax's `MultiHeadDotProductAttention` with its parameters.
#[derive(Clone, Debug)]
pub struct MultiHeadDotProductAttention {
    config: MhaConfig,
    dims: Dims,
    params: MhaParams,
}

impl MultiHeadDotProductAttention {
    /// A layer with the given parameters, checked against the configuration (every parameter
    /// present, of its shape and of `param_dtype`).
    pub fn new(
        config: MhaConfig,
        features: InFeatures,
        params: MhaParams,
    ) -> Result<Self, AttnError> {
        let dims = Dims::new(&config, features)?;
        let map: BTreeMap<String, Array> = params
            .named()
            .into_iter()
            .map(|(n, a)| (n.to_owned(), a.clone()))
            .collect();
        let params = MhaParams::from_map("params", &config, &dims, map)?;
        Ok(MultiHeadDotProductAttention {
            config,
            dims,
            params,
        })
    }

    /// A layer with Flax's initial parameters drawn from `seed` ([`MhaParams::init`]).
    pub fn init(config: MhaConfig, features: InFeatures, seed: u64) -> Result<Self, AttnError> {
        let dims = Dims::new(&config, features)?;
        let params = MhaParams::init(&config, &dims, seed)?;
        Ok(MultiHeadDotProductAttention {
            config,
            dims,
            params,
        })
    }

    /// Loads the parameters from the bytes of a `flax.serialization.to_bytes` file, at `path`
    /// in its tree (e.g. `"params"` for a saved `{'params': ...}` of this layer, or
    /// `"params/encoder/layers_0/attention"`).
    pub fn from_msgpack(
        config: MhaConfig,
        features: InFeatures,
        bytes: &[u8],
        path: &str,
    ) -> Result<Self, AttnError> {
        let dims = Dims::new(&config, features)?;
        let map = msgpack_subtree(bytes, path)?;
        let params = MhaParams::from_map(path.trim_matches('/'), &config, &dims, map)?;
        Ok(MultiHeadDotProductAttention {
            config,
            dims,
            params,
        })
    }

    /// Loads the parameters from the bytes of a safetensors file whose keys are the tree paths
    /// joined by `/` or `.`, at `path` (`/`-separated, e.g. `"params"`).
    pub fn from_safetensors(
        config: MhaConfig,
        features: InFeatures,
        bytes: &[u8],
        path: &str,
    ) -> Result<Self, AttnError> {
        let dims = Dims::new(&config, features)?;
        let map = safetensors_subtree(bytes, path)?;
        let params = MhaParams::from_map(path.trim_matches('/'), &config, &dims, map)?;
        Ok(MultiHeadDotProductAttention {
            config,
            dims,
            params,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MhaConfig {
        &self.config
    }

    /// The sizes.
    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    /// The parameters.
    pub fn params(&self) -> &MhaParams {
        &self.params
    }

    /// Flax's `__call__(inputs_q, inputs_k, inputs_v, mask=mask)`: `inputs_q [batch.., Lq,
    /// Eq]`, `inputs_k [batch.., Lkv, Ek]` (default `inputs_q`), `inputs_v [batch.., Lkv, Ev]`
    /// (default `inputs_k`) -> `[batch.., Lq, out_features]`. `mask` broadcasts to `[batch..,
    /// heads, Lq, Lkv]`. `ctx.sow` receives the attention weights (Flax's `sow_weights`);
    /// `ctx.deterministic` is the call's `deterministic` when the config leaves it `None`.
    pub fn forward(
        &self,
        inputs_q: &Array,
        inputs_k: Option<&Array>,
        inputs_v: Option<&Array>,
        mask: Option<&Array>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        let q = ArrayRef::from_array("inputs_q", inputs_q)?;
        let k = inputs_k
            .map(|k| ArrayRef::from_array("inputs_k", k))
            .transpose()?;
        let v = inputs_v
            .map(|v| ArrayRef::from_array("inputs_v", v))
            .transpose()?;
        self.forward_views(q, k, v, mask, ctx)
    }

    /// [`forward`](Self::forward) over borrowed inputs (slices, `ndarray` views).
    pub fn forward_views(
        &self,
        inputs_q: ArrayRef<'_>,
        inputs_k: Option<ArrayRef<'_>>,
        inputs_v: Option<ArrayRef<'_>>,
        mask: Option<&Array>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        self.forward_causal_views(inputs_q, inputs_k, inputs_v, mask, None, ctx)
    }

    /// [`forward_views`](Self::forward_views) with a causal term AND-ed with `mask`: key `j`
    /// is visible to query `i` iff `j <= pos(i)` (`causal`'s alignment, e.g. `Align::TopLeft`
    /// for Flax's `make_causal_mask`). The kernels skip the hidden keys; no mask is built.
    pub fn forward_causal_views(
        &self,
        inputs_q: ArrayRef<'_>,
        inputs_k: Option<ArrayRef<'_>>,
        inputs_v: Option<ArrayRef<'_>>,
        mask: Option<&Array>,
        causal: Option<Align>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        let p = self.projected(&inputs_q, inputs_k.as_ref(), inputs_v.as_ref())?;
        let o = dot_product_attention(
            &p.q,
            &p.k,
            &p.v,
            self.attention_args(mask, causal, ctx, true),
        )?;
        self.project_out(&o)
    }

    /// Checks the inputs and projects them to the attention's query, key and value (after
    /// the LayerNorms), keeping the query and key before their LayerNorm when there is one.
    fn projected(
        &self,
        inputs_q: &ArrayRef<'_>,
        inputs_k: Option<&ArrayRef<'_>>,
        inputs_v: Option<&ArrayRef<'_>>,
    ) -> Result<Projected, AttnError> {
        if inputs_k.is_none() && inputs_v.is_some() {
            return Err(AttnError::InvalidArgument {
                argument: "inputs_v",
                reason: "given without inputs_k (Flax: `inputs_k` cannot be None if `inputs_v` \
                         is not None)"
                    .into(),
            });
        }
        let f = self.dims.features;
        let (batch, lq) = self.check_input("inputs_q", inputs_q, f.q, None)?;
        let k_in = inputs_k.unwrap_or(inputs_q);
        let v_in = inputs_v.unwrap_or(k_in);
        let (_, lk) = self.check_input("inputs_k", k_in, f.k, Some(&batch))?;
        let (_, lv) = self.check_input("inputs_v", v_in, f.v, Some(&batch))?;
        if lk != lv {
            return Err(AttnError::Axis {
                tensor: "inputs_v",
                axis: "length (axis -2)".into(),
                expected: format!("{lk}, the length of inputs_k"),
                found: lv,
            });
        }
        let p = &self.params;
        let (heads, kv_heads) = (self.dims.heads, self.dims.kv_heads);
        let q_pre = self.project("query", inputs_q, &batch, lq, &p.query, heads)?;
        let k_pre = self.project("key", k_in, &batch, lk, &p.key, kv_heads)?;
        let v = self.project("value", v_in, &batch, lk, &p.value, kv_heads)?;
        let d = self.dims.head_dim;
        let norm = |x: Array, scale: &Option<Array>| match scale {
            Some(scale) => Ok((layer_norm(&x, d, scale, self.config.dtype)?, Some(x))),
            None => Ok::<_, AttnError>((x, None)),
        };
        let (q, q_pre) = norm(q_pre, &p.query_ln)?;
        let (k, k_pre) = norm(k_pre, &p.key_ln)?;
        Ok(Projected {
            q_pre,
            k_pre,
            q,
            k,
            v,
        })
    }

    /// Checks `[batch.., len, features]` (and the batch dims against `batch`).
    fn check_input(
        &self,
        name: &'static str,
        x: &ArrayRef<'_>,
        features: usize,
        batch: Option<&[usize]>,
    ) -> Result<(Vec<usize>, usize), AttnError> {
        let s = x.shape();
        if s.len() < 2 {
            return Err(AttnError::Rank {
                tensor: name,
                expected: "at least 2: [batch..., length, features]".into(),
                found: s.to_vec(),
            });
        }
        let r = s.len();
        if s[r - 1] != features {
            return Err(AttnError::Axis {
                tensor: name,
                axis: "features (axis -1)".into(),
                expected: format!("{features}, the layer's input features"),
                found: s[r - 1],
            });
        }
        if let Some(b) = batch
            && b != &s[..r - 2]
        {
            return Err(AttnError::Rank {
                tensor: name,
                expected: format!("batch dims {b:?} as in inputs_q, then [length, features]"),
                found: s.to_vec(),
            });
        }
        Ok((s[..r - 2].to_vec(), s[r - 2]))
    }

    /// `DenseGeneral(features=(heads, D))` of `x [batch.., len, E]` -> `[batch.., len, heads,
    /// D]` (before any LayerNorm).
    fn project(
        &self,
        name: &'static str,
        x: &ArrayRef<'_>,
        batch: &[usize],
        len: usize,
        p: &Dense,
        heads: usize,
    ) -> Result<Array, AttnError> {
        let e = *x.shape().last().unwrap_or(&0);
        let m = x.data().len().checked_div(e).unwrap_or(0);
        let d = self.dims.head_dim;
        let comp = dense_dtype(x.dtype(), &p.kernel, p.bias.as_ref(), self.config.dtype);
        let data = dense(
            name,
            x.data(),
            m,
            e,
            &p.kernel,
            p.bias.as_ref(),
            heads * d,
            comp,
        )?;
        let mut shape = batch.to_vec();
        shape.extend_from_slice(&[len, heads, d]);
        Array::from_data(data, shape)
    }

    /// The arguments of Flax's `dot_product_attention` with the layer's options (no bias);
    /// `sow`: hand `ctx`'s sink to it (the forward's weights), else none (the backward).
    /// GQA key/value `[.., K, D]` go to the kernel as they are (query head `n` reads
    /// key/value head `n / (H / K)`): no head is repeated or copied.
    fn attention_args<'a>(
        &self,
        mask: Option<&'a Array>,
        causal: Option<Align>,
        ctx: &'a mut Context<'_>,
        sow: bool,
    ) -> FlaxArgs<'a> {
        let c = &self.config;
        // Flax's merge_param: only consulted when dropout can happen.
        let deterministic = c.dropout_rate <= 0.0 || c.deterministic.unwrap_or(ctx.deterministic);
        let mut args = FlaxArgs {
            mask,
            broadcast_dropout: c.broadcast_dropout,
            dropout_rng: ctx.dropout_rng,
            dropout_rate: c.dropout_rate,
            deterministic,
            dtype: c.dtype,
            precision: c.precision,
            module: None,
            force_fp32_for_softmax: c.force_fp32_for_softmax,
            pool: ctx.pool,
            bias: None,
            causal,
            ..FlaxArgs::default()
        };
        if sow && let Some(s) = &mut ctx.sow {
            args.module = Some(&mut **s);
        }
        args
    }

    /// `DenseGeneral(features=F, axis=(-2, -1))` of `o [batch.., len, heads, D]`.
    fn project_out(&self, o: &Array) -> Result<Array, AttnError> {
        let s = o.shape();
        let r = s.len();
        let hd = self.dims.heads * self.dims.head_dim;
        let m = o.len().checked_div(hd).unwrap_or(0);
        let p = &self.params.out;
        let comp = dense_dtype(o.dtype(), &p.kernel, p.bias.as_ref(), self.config.dtype);
        let f = self.dims.out_features;
        let data = dense(
            "out",
            &floats_of(o),
            m,
            hd,
            &p.kernel,
            p.bias.as_ref(),
            f,
            comp,
        )?;
        let mut shape = s[..r - 2].to_vec();
        shape.push(f);
        Array::from_data(data, shape)
    }

    /// The dtype the projected keys (and so a KV cache) have for inputs of `input` dtype.
    pub fn key_dtype(&self, input: DType) -> DType {
        let p = &self.params.key;
        let d = dense_dtype(input, &p.kernel, p.bias.as_ref(), self.config.dtype);
        match (&self.params.key_ln, self.config.dtype) {
            (Some(scale), None) => d.promote(scale.dtype()),
            _ => d,
        }
    }
}
