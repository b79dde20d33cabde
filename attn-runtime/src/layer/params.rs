//! The layer's configuration (Flax's constructor fields), its derived sizes, and its parameter
//! tree: expected shapes, Flax's initializers, and validation of loaded parameters.

use std::collections::BTreeMap;

use rand_core::RngCore;

use crate::array::Array;
use crate::element::DType;
use crate::error::{AttnError, num_elements};
use crate::kernel::Precision;

/// The constructor fields of `flax.linen.MultiHeadDotProductAttention` (plus `num_kv_heads`
/// for grouped-query attention). [`MhaConfig::new`] has Flax's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct MhaConfig {
    /// `num_heads`: query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA; not a Flax field). `None` = `num_heads` (Flax's layer). Must
    /// divide `num_heads`; query head `n` reads key/value head `n / (num_heads / kv_heads)`.
    pub num_kv_heads: Option<usize>,
    /// `qkv_features` (`None` = the features of `inputs_q`).
    pub qkv_features: Option<usize>,
    /// `out_features` (`None` = the features of `inputs_q`).
    pub out_features: Option<usize>,
    /// `use_bias`: the four projection biases exist.
    pub use_bias: bool,
    /// `normalize_qk`: LayerNorm (no bias, epsilon 1e-6) on the projected query and key.
    pub normalize_qk: bool,
    /// `dtype`: the computation dtype (`None` = promotion of inputs and parameters).
    pub dtype: Option<DType>,
    /// `param_dtype`: the dtype the parameters are stored in (default float32).
    pub param_dtype: DType,
    /// `dropout_rate` on the attention weights.
    pub dropout_rate: f64,
    /// `broadcast_dropout`: one dropout mask shared by batch and heads.
    pub broadcast_dropout: bool,
    /// `deterministic` (`None` = taken from the call's [`Context`](crate::Context)).
    pub deterministic: Option<bool>,
    /// `precision` (no effect on the CPU).
    pub precision: Option<Precision>,
    /// `force_fp32_for_softmax`.
    pub force_fp32_for_softmax: bool,
}

impl MhaConfig {
    /// Flax's defaults with `num_heads` heads: no dtype, float32 parameters, biases on, no QK
    /// norm, no dropout.
    pub fn new(num_heads: usize) -> Self {
        MhaConfig {
            num_heads,
            num_kv_heads: None,
            qkv_features: None,
            out_features: None,
            use_bias: true,
            normalize_qk: false,
            dtype: None,
            param_dtype: DType::F32,
            dropout_rate: 0.0,
            broadcast_dropout: true,
            deterministic: None,
            precision: None,
            force_fp32_for_softmax: false,
        }
    }
}

/// The feature sizes of `inputs_q`, `inputs_k` and `inputs_v` (Flax infers them from the first
/// call; a loaded layer needs them to check the kernels' shapes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFeatures {
    /// Features of `inputs_q` (`Eq`; also the default `qkv_features` and `out_features`).
    pub q: usize,
    /// Features of `inputs_k` (`Ek`).
    pub k: usize,
    /// Features of `inputs_v` (`Ev`).
    pub v: usize,
}

impl InFeatures {
    /// Self-attention: all three inputs have `e` features.
    pub fn same(e: usize) -> Self {
        InFeatures { q: e, k: e, v: e }
    }
}

/// The sizes a configuration and input features give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Input features of query, key, value.
    pub features: InFeatures,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `K`.
    pub kv_heads: usize,
    /// `D = qkv_features / H`.
    pub head_dim: usize,
    /// Output features `F`.
    pub out_features: usize,
}

impl Dims {
    /// Checks Flax's assertion `qkv_features % num_heads == 0` and the GQA divisibility.
    pub fn new(config: &MhaConfig, features: InFeatures) -> Result<Self, AttnError> {
        let heads = config.num_heads;
        let qkv = config.qkv_features.unwrap_or(features.q);
        if heads == 0 || !qkv.is_multiple_of(heads) {
            return Err(AttnError::InvalidArgument {
                argument: "num_heads",
                reason: format!(
                    "qkv_features ({qkv}) must be divisible by num_heads ({heads}), which must be > 0"
                ),
            });
        }
        let kv_heads = config.num_kv_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(AttnError::InvalidArgument {
                argument: "num_kv_heads",
                reason: format!("must be > 0 and divide num_heads ({heads}), found {kv_heads}"),
            });
        }
        if !(0.0..=1.0).contains(&config.dropout_rate) {
            return Err(AttnError::DropoutRate {
                rate: config.dropout_rate,
            });
        }
        if !config.param_dtype.is_float() || config.dtype.is_some_and(|d| !d.is_float()) {
            return Err(AttnError::InvalidArgument {
                argument: "dtype",
                reason: format!(
                    "dtype and param_dtype must be float dtypes, found {:?} and {}",
                    config.dtype, config.param_dtype
                ),
            });
        }
        Ok(Dims {
            features,
            heads,
            kv_heads,
            head_dim: qkv / heads,
            out_features: config.out_features.unwrap_or(features.q),
        })
    }

    /// Every parameter of the layer with its shape, in Flax's creation order: names relative to
    /// the layer (`"query/kernel"`, ...).
    pub fn spec(&self, config: &MhaConfig) -> Vec<(&'static str, Vec<usize>)> {
        let (h, k, d) = (self.heads, self.kv_heads, self.head_dim);
        let f = self.features;
        let mut s = vec![("query/kernel", vec![f.q, h, d])];
        if config.use_bias {
            s.push(("query/bias", vec![h, d]));
        }
        s.push(("key/kernel", vec![f.k, k, d]));
        if config.use_bias {
            s.push(("key/bias", vec![k, d]));
        }
        s.push(("value/kernel", vec![f.v, k, d]));
        if config.use_bias {
            s.push(("value/bias", vec![k, d]));
        }
        if config.normalize_qk {
            s.push(("query_ln/scale", vec![d]));
            s.push(("key_ln/scale", vec![d]));
        }
        s.push(("out/kernel", vec![h, d, self.out_features]));
        if config.use_bias {
            s.push(("out/bias", vec![self.out_features]));
        }
        s
    }
}

/// One `DenseGeneral`: kernel and optional bias.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    /// `kernel`: `[E, heads, head_dim]` (query/key/value) or `[heads, head_dim, F]` (out).
    pub kernel: Array,
    /// `bias`: `[heads, head_dim]` or `[F]`; `None` when `use_bias` is false.
    pub bias: Option<Array>,
}

/// The parameters of the layer, as Flax's `params` tree.
#[derive(Clone, Debug, PartialEq)]
pub struct MhaParams {
    /// `query`
    pub query: Dense,
    /// `key`
    pub key: Dense,
    /// `value`
    pub value: Dense,
    /// `out`
    pub out: Dense,
    /// `query_ln/scale` `[head_dim]` (when `normalize_qk`).
    pub query_ln: Option<Array>,
    /// `key_ln/scale` `[head_dim]` (when `normalize_qk`).
    pub key_ln: Option<Array>,
}

impl MhaParams {
    /// Every parameter by its name relative to the layer (`"query/kernel"`, ...).
    pub fn named(&self) -> Vec<(&'static str, &Array)> {
        let mut v = vec![("query/kernel", &self.query.kernel)];
        v.extend(self.query.bias.as_ref().map(|b| ("query/bias", b)));
        v.push(("key/kernel", &self.key.kernel));
        v.extend(self.key.bias.as_ref().map(|b| ("key/bias", b)));
        v.push(("value/kernel", &self.value.kernel));
        v.extend(self.value.bias.as_ref().map(|b| ("value/bias", b)));
        v.extend(self.query_ln.as_ref().map(|s| ("query_ln/scale", s)));
        v.extend(self.key_ln.as_ref().map(|s| ("key_ln/scale", s)));
        v.push(("out/kernel", &self.out.kernel));
        v.extend(self.out.bias.as_ref().map(|b| ("out/bias", b)));
        v
    }

    /// Flax's initial values from `seed`: `lecun_normal` kernels (truncated normal, stddev
    /// `sqrt(1/fan_in) / 0.8796`, fan_in = `E`, or `H·D` for `out`), zero biases, LayerNorm
    /// scales 1. The random values cannot equal JAX's (its RNG is not reproduced); the
    /// distribution is the same.
    pub fn init(config: &MhaConfig, dims: &Dims, seed: u64) -> Result<Self, AttnError> {
        let mut rng = rand_pcg::Pcg32::new(seed, 0x2545_f491_4f6c_dd1d);
        let mut map = BTreeMap::new();
        for (name, shape) in dims.spec(config) {
            let n = num_elements("params", &shape)?;
            let values: Vec<f64> = if name.ends_with("/kernel") {
                let fan_in = if name == "out/kernel" {
                    shape[0] * shape[1]
                } else {
                    shape[0]
                };
                let std = (1.0 / fan_in.max(1) as f64).sqrt() / 0.879_625_661_034_239_8;
                (0..n).map(|_| std * truncated_normal(&mut rng)).collect()
            } else if name.ends_with("/scale") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            };
            map.insert(
                name.to_owned(),
                Array::from_f64(config.param_dtype, &values, shape)?,
            );
        }
        Self::from_map("params", config, dims, map)
    }

    /// Builds the parameters from a map of names relative to the layer (`"query/kernel"`) to
    /// arrays, checking every expected parameter (present, shape, dtype = `param_dtype`) and
    /// that there are no others. Errors name `prefix/<name>`.
    pub fn from_map(
        prefix: &str,
        config: &MhaConfig,
        dims: &Dims,
        mut map: BTreeMap<String, Array>,
    ) -> Result<Self, AttnError> {
        let full = |name: &str| {
            if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            }
        };
        let describe = |dtype: DType, shape: &[usize]| format!("{dtype} {shape:?}");
        let mut take = |name: &'static str, shape: Vec<usize>| -> Result<Array, AttnError> {
            let expected = describe(config.param_dtype, &shape);
            let a = map.remove(name).ok_or_else(|| AttnError::Checkpoint {
                path: full(name),
                expected: expected.clone(),
                found: "no such entry".into(),
            })?;
            if a.shape() != shape.as_slice() || a.dtype() != config.param_dtype {
                return Err(AttnError::Checkpoint {
                    path: full(name),
                    expected,
                    found: describe(a.dtype(), a.shape()),
                });
            }
            Ok(a)
        };
        let spec = dims.spec(config);
        let mut get = |name: &'static str| -> Result<Option<Array>, AttnError> {
            match spec.iter().find(|(n, _)| *n == name) {
                Some((_, shape)) => take(name, shape.clone()).map(Some),
                None => Ok(None),
            }
        };
        let mut dense = |kernel: &'static str, bias: &'static str| -> Result<Dense, AttnError> {
            Ok(Dense {
                kernel: get(kernel)?.ok_or_else(|| AttnError::Checkpoint {
                    path: kernel.into(),
                    expected: "a kernel in the layer's spec".into(),
                    found: "none".into(),
                })?,
                bias: get(bias)?,
            })
        };
        let query = dense("query/kernel", "query/bias")?;
        let key = dense("key/kernel", "key/bias")?;
        let value = dense("value/kernel", "value/bias")?;
        let out = dense("out/kernel", "out/bias")?;
        let query_ln = get("query_ln/scale")?;
        let key_ln = get("key_ln/scale")?;
        if let Some(extra) = map.keys().next() {
            return Err(AttnError::Checkpoint {
                path: full(extra),
                expected: format!(
                    "no such parameter (use_bias = {}, normalize_qk = {})",
                    config.use_bias, config.normalize_qk
                ),
                found: describe(map[extra].dtype(), map[extra].shape()),
            });
        }
        Ok(MhaParams {
            query,
            key,
            value,
            out,
            query_ln,
            key_ln,
        })
    }
}

/// A standard normal truncated to `[-2, 2]` (Box-Muller, rejection).
fn truncated_normal(rng: &mut impl RngCore) -> f64 {
    loop {
        let u1 = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let u2 = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            return z;
        }
    }
}
