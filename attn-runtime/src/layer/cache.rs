//! The KV cache and decoding: Flax's `decode=True` (`cached_key`, `cached_value`,
//! `cache_index`), extended to chunks of several tokens per call, and a sliding-window cache
//! kept as a ring buffer.
//!
//! A call with `n` tokens projects them, writes their keys and values into slots `index ..
//! index + n`, and attends with query `i` (position `index + i`) over all capacity slots,
//! slots `j <= index + i` visible (bottom-right causal over the filled part), AND-ed with the
//! user mask as Flax's `combine_masks` does. With `n = 1` this is exactly Flax's decode step,
//! including the uniform weights over all `max_length` slots of a fully masked row.

use super::MultiHeadDotProductAttention;
use super::view::ArrayRef;
use crate::array::{Array, ArrayData};
use crate::context::Context;
use crate::element::DType;
use crate::error::{AttnError, num_elements};
use crate::flax::dot_product_attention;
use crate::kernel::Align;

/// A key/value cache for [`MultiHeadDotProductAttention::decode`]: `cached_key` and
/// `cached_value` `[batch.., capacity, kv_heads, head_dim]` in the dtype of the projected keys
/// (after the key LayerNorm), and `cache_index`. GQA layers store only the key/value heads.
/// The arrays are allocated (zeros) by the first call, with its batch dims.
#[derive(Clone, Debug)]
pub struct KvCache {
    capacity: usize,
    sliding: bool,
    index: usize,
    key: Option<Array>,
    value: Option<Array>,
}

impl KvCache {
    /// A cache of `capacity` tokens (Flax's `max_length`). Writing past it is an error.
    pub fn new(capacity: usize) -> Self {
        KvCache {
            capacity,
            sliding: false,
            index: 0,
            key: None,
            value: None,
        }
    }

    /// A sliding-window cache that keeps the last `window` tokens in a ring buffer (token at
    /// position `p` in slot `p % window`); it never fills up. Query `p` sees the tokens `p -
    /// window + 1 ..= p`.
    pub fn sliding_window(window: usize) -> Self {
        KvCache {
            sliding: true,
            ..Self::new(window)
        }
    }

    /// The capacity (or window) in tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether this is a sliding-window (ring buffer) cache.
    pub fn is_sliding(&self) -> bool {
        self.sliding
    }

    /// Flax's `cache_index`: tokens written so far (for a sliding window, also those that
    /// have left it).
    pub fn cache_index(&self) -> usize {
        self.index
    }

    /// The cached keys `[batch.., capacity, kv_heads, head_dim]` (`None` before the first call).
    pub fn key(&self) -> Option<&Array> {
        self.key.as_ref()
    }

    /// The cached values (`None` before the first call).
    pub fn value(&self) -> Option<&Array> {
        self.value.as_ref()
    }

    /// Forgets the tokens after the first `len`: `cache_index` becomes `len`, and the next
    /// call writes its tokens from slot `len` on (the later slots are stale and no query sees
    /// them: a query at position `p` sees the slots `j <= p`). For re-running a decode step
    /// over the same prefix (benchmarks, speculative decoding) without copying the cache.
    /// `len` above `cache_index`, or a sliding-window cache (whose ring buffer has overwritten
    /// older tokens), is an error and leaves the cache unchanged.
    pub fn truncate(&mut self, len: usize) -> Result<(), AttnError> {
        if self.sliding {
            return Err(AttnError::InvalidArgument {
                argument: "cache",
                reason: "a sliding-window cache cannot be truncated (its ring buffer has \
                         overwritten older tokens)"
                    .into(),
            });
        }
        if len > self.index {
            return Err(AttnError::InvalidArgument {
                argument: "len",
                reason: format!(
                    "expected at most cache_index = {} tokens, found {len}",
                    self.index
                ),
            });
        }
        self.index = len;
        Ok(())
    }

    /// Empties the cache (keeps nothing; the next call allocates again).
    pub fn reset(&mut self) {
        self.index = 0;
        self.key = None;
        self.value = None;
    }
}

/// Copies rows of `[batch, len, row]` `src` into `[batch, capacity, row]` `dst` slots.
fn write_slots(
    dst: &mut ArrayData,
    src: &ArrayData,
    batch: usize,
    capacity: usize,
    len: usize,
    row: usize,
    slot: impl Fn(usize) -> usize,
) -> Result<(), AttnError> {
    macro_rules! copy {
        ($d:expr, $s:expr) => {{
            for b in 0..batch {
                for t in 0..len {
                    let to = (b * capacity + slot(t)) * row;
                    let from = (b * len + t) * row;
                    $d[to..to + row].copy_from_slice(&$s[from..from + row]);
                }
            }
            Ok(())
        }};
    }
    match (dst, src) {
        (ArrayData::F32(d), ArrayData::F32(s)) => copy!(d, s),
        (ArrayData::F64(d), ArrayData::F64(s)) => copy!(d, s),
        (ArrayData::BF16(d), ArrayData::BF16(s)) => copy!(d, s),
        (ArrayData::F16(d), ArrayData::F16(s)) => copy!(d, s),
        _ => Err(AttnError::InvalidArgument {
            argument: "cache",
            reason: "the cache and the projected keys differ in dtype".into(),
        }),
    }
}

fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Array, AttnError> {
    let n = num_elements("cache", &shape)?;
    let data = match dtype {
        DType::F64 => ArrayData::F64(crate::error::try_filled("cache", n, 0.0)?),
        DType::BF16 => ArrayData::BF16(crate::error::try_filled("cache", n, half::bf16::ZERO)?),
        DType::F16 => ArrayData::F16(crate::error::try_filled("cache", n, half::f16::ZERO)?),
        _ => ArrayData::F32(crate::error::try_filled("cache", n, 0.0f32)?),
    };
    Array::from_data(data, shape)
}

impl MultiHeadDotProductAttention {
    /// Decodes `inputs [batch.., n, Eq]` (n >= 1 tokens; a prompt chunk or the next tokens)
    /// with the cache: self-attention of each token over the cached tokens and the chunk's
    /// earlier tokens (bottom-right causal). `mask` (optional, rank `len(batch) + 3`, e.g.
    /// `[batch.., 1, 1, capacity]`) is AND-ed with the causal rule over the cache slots, as
    /// Flax's `combine_masks`. Returns `[batch.., n, out_features]`.
    ///
    /// One token per call is Flax's `decode=True` step. A full cache is an
    /// [`AttnError::CacheCapacity`] error and leaves the cache unchanged (so does any other
    /// error). A sliding-window cache runs a chunk token by token (each token one attention
    /// call, so a sow sink receives one weights array per token).
    pub fn decode(
        &self,
        cache: &mut KvCache,
        inputs: &Array,
        mask: Option<&Array>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        self.decode_views(cache, ArrayRef::from_array("inputs", inputs)?, mask, ctx)
    }

    /// Prefills the cache with a prompt chunk: [`decode`](Self::decode) with several tokens.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        prompt: &Array,
        mask: Option<&Array>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        self.decode(cache, prompt, mask, ctx)
    }

    /// [`decode`](Self::decode) over a borrowed input.
    pub fn decode_views(
        &self,
        cache: &mut KvCache,
        inputs: ArrayRef<'_>,
        mask: Option<&Array>,
        ctx: &mut Context<'_>,
    ) -> Result<Array, AttnError> {
        let (batch, n) = self.check_input("inputs", &inputs, self.dims.features.q, None)?;
        if n == 0 {
            return Err(AttnError::Axis {
                tensor: "inputs",
                axis: "length (axis -2)".into(),
                expected: "at least 1 token".into(),
                found: 0,
            });
        }
        if cache.capacity == 0 {
            return Err(AttnError::CacheCapacity {
                capacity: 0,
                filled: cache.index,
                requested: n,
            });
        }
        if !cache.sliding && cache.index.saturating_add(n) > cache.capacity {
            return Err(AttnError::CacheCapacity {
                capacity: cache.capacity,
                filled: cache.index,
                requested: n,
            });
        }
        if cache.sliding && n > cache.capacity {
            return Err(AttnError::Axis {
                tensor: "inputs",
                axis: "length (axis -2)".into(),
                expected: format!(
                    "at most {} tokens, the sliding window (prefill a longer prompt in chunks)",
                    cache.capacity
                ),
                found: n,
            });
        }
        if let Some(k) = &cache.key {
            let s = k.shape();
            if s[..s.len() - 3] != batch[..] {
                return Err(AttnError::Rank {
                    tensor: "inputs",
                    expected: format!(
                        "batch dims {:?} as in the cache, then [length, features]",
                        &s[..s.len() - 3]
                    ),
                    found: inputs.shape().to_vec(),
                });
            }
            let want = self.key_dtype(inputs.dtype());
            if k.dtype() != want {
                return Err(AttnError::DType {
                    tensor: "cache (the keys these inputs project to)",
                    expected: k.dtype(),
                    found: want,
                });
            }
        }
        if let Some(m) = mask
            && m.ndim() != batch.len() + 3
        {
            // Flax's `combine_masks` asserts equal ranks with the causal mask.
            return Err(AttnError::Rank {
                tensor: "mask",
                expected: format!(
                    "{}: [batch.., heads or 1, length or 1, capacity], as Flax's combine_masks \
                     requires in decode",
                    batch.len() + 3
                ),
                found: m.shape().to_vec(),
            });
        }
        if cache.sliding && n > 1 {
            // Token by token: a later token of the chunk may overwrite a slot an earlier one
            // still sees. On an error, the cache goes back to its state before the call.
            let saved = cache.clone();
            let e = self.dims.features.q;
            let mut outs = Vec::with_capacity(n);
            for t in 0..n {
                let token = token_of(&inputs, &batch, n, t, e)?;
                match self.decode_views(cache, token, mask, ctx) {
                    Ok(y) => outs.push(y),
                    Err(err) => {
                        *cache = saved;
                        return Err(err);
                    }
                }
            }
            return concat_tokens(&outs, &batch, self.dims.out_features);
        }
        let super::Projected { q, k, v, .. } = self.projected(&inputs, None, None)?;
        let cap = cache.capacity;
        let cur = cache.index;
        // Write into new zero arrays when the cache is new; otherwise write in place and undo
        // on error.
        let kv_row = self.dims.kv_heads * self.dims.head_dim;
        let nb = num_elements("inputs", &batch)?;
        let mut cache_shape = batch.clone();
        cache_shape.extend_from_slice(&[cap, self.dims.kv_heads, self.dims.head_dim]);
        let fresh = cache.key.is_none();
        let (mut ck, mut cv) = match (cache.key.take(), cache.value.take()) {
            (Some(a), Some(b)) => (a, b),
            _ => (
                zeros(k.dtype(), cache_shape.clone())?,
                zeros(v.dtype(), cache_shape)?,
            ),
        };
        let slot = |t: usize| (cur + t) % cap;
        // The slots' old contents, to restore on error.
        let old_k = read_slots(ck.data(), nb, cap, n, kv_row, slot);
        let old_v = read_slots(cv.data(), nb, cap, n, kv_row, slot);
        let mut run = || -> Result<Array, AttnError> {
            write_slots(ck.data_mut(), k.data(), nb, cap, n, kv_row, slot)?;
            write_slots(cv.data_mut(), v.data(), nb, cap, n, kv_row, slot)?;
            // The causal rule over the slots, as a structured term (no mask is built): query
            // `i` sits at position `cur + i` and sees the slots `j <= cur + i` (for a ring
            // buffer, every written slot once it has wrapped). The kernels skip the slots
            // after it, so a call costs what is filled, not the capacity, unless a row is
            // fully masked by the user mask (then it is uniform over all `capacity` slots,
            // as in Flax).
            let causal = Align::Offset(i64::try_from(cur).unwrap_or(i64::MAX));
            let args = self.attention_args(mask, Some(causal), ctx, true);
            let o = dot_product_attention(&q, &ck, &cv, args)?;
            self.project_out(&o)
        };
        match run() {
            Ok(y) => {
                cache.key = Some(ck);
                cache.value = Some(cv);
                cache.index = cur + n;
                Ok(y)
            }
            Err(e) => {
                if !fresh {
                    let _ = write_slots(ck.data_mut(), &old_k, nb, cap, n, kv_row, slot);
                    let _ = write_slots(cv.data_mut(), &old_v, nb, cap, n, kv_row, slot);
                    cache.key = Some(ck);
                    cache.value = Some(cv);
                }
                Err(e)
            }
        }
    }
}

/// The `[batch, n, row]` contents of the slots `slot(0..n)` of a `[batch, cap, row]` array.
fn read_slots(
    a: &ArrayData,
    batch: usize,
    cap: usize,
    n: usize,
    row: usize,
    slot: impl Fn(usize) -> usize,
) -> ArrayData {
    macro_rules! read {
        ($v:expr, $variant:ident) => {{
            let mut out = Vec::with_capacity(batch * n * row);
            for b in 0..batch {
                for t in 0..n {
                    let from = (b * cap + slot(t)) * row;
                    out.extend_from_slice(&$v[from..from + row]);
                }
            }
            ArrayData::$variant(out)
        }};
    }
    match a {
        ArrayData::F64(v) => read!(v, F64),
        ArrayData::BF16(v) => read!(v, BF16),
        ArrayData::F16(v) => read!(v, F16),
        ArrayData::F32(v) => read!(v, F32),
        other => other.clone(),
    }
}

/// Token `t` of `[batch.., n, e]` as `[batch.., 1, e]`.
fn token_of<'x>(
    x: &ArrayRef<'_>,
    batch: &[usize],
    n: usize,
    t: usize,
    e: usize,
) -> Result<ArrayRef<'x>, AttnError> {
    let nb = num_elements("inputs", batch)?;
    let d = x.data();
    let vals: Vec<f64> = (0..nb)
        .flat_map(|b| (0..e).map(move |i| d.get((b * n + t) * e + i)))
        .collect();
    let mut shape = batch.to_vec();
    shape.extend_from_slice(&[1, e]);
    let a = Array::from_f64(x.dtype(), &vals, shape.clone())?;
    let floats = match a.into_parts().0 {
        ArrayData::F32(v) => super::Floats::F32(v.into()),
        ArrayData::F64(v) => super::Floats::F64(v.into()),
        ArrayData::BF16(v) => super::Floats::BF16(v.into()),
        ArrayData::F16(v) => super::Floats::F16(v.into()),
        other => {
            return Err(AttnError::InvalidArgument {
                argument: "inputs",
                reason: format!("must be float, found {:?}", other),
            });
        }
    };
    ArrayRef::from_parts("inputs", floats, shape.into())
}

/// Concatenates `[batch.., 1, f]` outputs along the length axis.
fn concat_tokens(outs: &[Array], batch: &[usize], f: usize) -> Result<Array, AttnError> {
    let nb = num_elements("output", batch)?;
    let n = outs.len();
    let vals: Vec<Vec<f64>> = outs.iter().map(Array::to_f64_vec).collect();
    let mut data = Vec::with_capacity(nb * n * f);
    for b in 0..nb {
        for v in &vals {
            data.extend_from_slice(&v[b * f..(b + 1) * f]);
        }
    }
    let mut shape = batch.to_vec();
    shape.extend_from_slice(&[n, f]);
    let dtype = outs.first().map_or(DType::F32, Array::dtype);
    Array::from_f64(dtype, &data, shape)
}
