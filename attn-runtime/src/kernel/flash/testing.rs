//! What the unit tests of the output path share (compiled for tests only): a dense float64
//! reference with Flax's semantics, deterministic inputs, argument builders, a check that runs
//! every available instruction set, and the names the tests use. Each file's `mod tests`
//! imports it: the tests of the driver (`mod.rs`), of masks (`mask.rs`), of the online softmax
//! (`softmax.rs`), of the `bf16` tile products (`block.rs`) and of the decode path
//! (`decode.rs`).

use rand_core::RngCore;

pub(super) use super::super::isa::Isa;
pub(super) use super::super::visibility::Visibility;
pub(super) use super::args::FlashArgs;
pub(super) use super::dims::Dims;
pub(super) use super::flash_attention;
pub(super) use super::mask::FlashDropout;
pub(super) use crate::context::Threads;
pub(super) use half::{bf16, f16};
pub(super) use rand_pcg::Pcg32;

use super::super::broadcast::Resolved;
use super::mask::FlashMask;
use super::mask_blocks::MaskBlocks;
use crate::element::Element;

/// Dense float64 reference with Flax's semantics (FLAX_SEMANTICS.md §1–2).
pub(super) fn reference<E: Element>(args: &FlashArgs<'_, E>) -> Vec<f64> {
    let d = args.dims;
    let mut out = vec![0.0; d.batch * d.q_len * d.heads * d.v_depth];
    for b in 0..d.batch {
        for h in 0..d.heads {
            for i in 0..d.q_len {
                let mut logits = vec![0.0; d.kv_len];
                for (j, logit) in logits.iter_mut().enumerate() {
                    let q = ((b * d.q_len + i) * d.heads + h) * d.qk_depth;
                    let k = ((b * d.kv_len + j) * d.kv_heads + d.kv_head(h)) * d.qk_depth;
                    let mut x: f64 = (0..d.qk_depth)
                        .map(|t| {
                            args.query[q + t].to_f64() * args.query_scale * args.key[k + t].to_f64()
                        })
                        .sum();
                    if let Some(bias) = &args.bias {
                        let mut value = [x];
                        bias.add_f64((b, h, i), j, 1, &mut value, 1);
                        x = value[0];
                    }
                    let causal_keep = args.mask.vis.is_trivial() || args.mask.vis.keeps(b, i, j);
                    let explicit_keep = args
                        .mask
                        .explicit
                        .as_ref()
                        .is_none_or(|m| m.row(b, h, i).get(j));
                    *logit = if causal_keep && explicit_keep {
                        x
                    } else {
                        args.big_neg
                    };
                }
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let mut keep = vec![1.0; d.kv_len];
                if let Some(dropout) = &args.dropout {
                    let row = if dropout.broadcast {
                        i
                    } else {
                        (b * d.heads + h) * d.q_len + i
                    };
                    let mut rng = dropout.rng.clone();
                    rng.advance((row * d.kv_len) as u64);
                    for k in keep.iter_mut() {
                        let kept = u64::from(rng.next_u32()) < dropout.threshold;
                        *k = if kept { dropout.multiplier } else { 0.0 };
                    }
                }
                for j in 0..d.kv_len {
                    let w = weights[j] / sum * keep[j];
                    let v = ((b * d.kv_len + j) * d.kv_heads + d.kv_head(h)) * d.v_depth;
                    let o = ((b * d.q_len + i) * d.heads + h) * d.v_depth;
                    for t in 0..d.v_depth {
                        out[o + t] += w * args.value[v + t].to_f64();
                    }
                }
            }
        }
    }
    out
}

/// Deterministic pseudo-random values in [-scale, scale).
pub(super) fn data(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut rng = Pcg32::new(seed, 7);
    (0..n)
        .map(|_| (rng.next_u32() as f64 / 2f64.powi(32) * 2.0 - 1.0) * scale)
        .collect()
}

pub(super) fn dims(
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    d: usize,
    dv: usize,
) -> Dims {
    Dims {
        batch,
        q_len,
        kv_len,
        heads,
        kv_heads: heads,
        qk_depth: d,
        v_depth: dv,
    }
}

/// A top-left causal mask for `d`.
pub(super) fn causal(d: &Dims) -> Visibility<'static> {
    Visibility::new(
        &crate::kernel::visibility::Mask::causal(),
        d.batch,
        d.q_len,
        d.kv_len,
    )
    .unwrap()
}

/// `data` of `shape` broadcast to `[batch_shape..., heads, q_len, kv_len]`.
pub(super) fn resolved<'a, T: Copy>(
    data: &'a [T],
    shape: &[usize],
    batch_shape: &[usize],
    heads: usize,
    q_len: usize,
    kv_len: usize,
) -> Option<Resolved<'a, T>> {
    let op = crate::kernel::broadcast::Broadcast::new("operand", data, shape).ok()?;
    Resolved::new(&op, batch_shape, heads, q_len, kv_len).ok()
}

pub(super) struct Inputs<E> {
    pub(super) query: Vec<E>,
    pub(super) key: Vec<E>,
    pub(super) value: Vec<E>,
}

pub(super) fn inputs<E: Element>(d: &Dims, seed: u64) -> Inputs<E> {
    let make = |n, s| data(n, s, 2.0).into_iter().map(E::from_f64).collect();
    Inputs {
        query: make(d.batch * d.q_len * d.heads * d.qk_depth, seed),
        key: make(d.batch * d.kv_len * d.kv_heads * d.qk_depth, seed + 1),
        value: make(d.batch * d.kv_len * d.kv_heads * d.v_depth, seed + 2),
    }
}

pub(super) fn args<'a, E>(d: Dims, x: &'a Inputs<E>) -> FlashArgs<'a, E> {
    FlashArgs {
        dims: d,
        query: &x.query,
        key: &x.key,
        value: &x.value,
        query_scale: 1.0 / (d.qk_depth as f64).sqrt(),
        bias: None,
        mask: FlashMask::default(),
        big_neg: f32::MIN as f64,
        dropout: None,
        accumulate_f64: false,
        weights_bf16: false,
    }
}

/// Runs every available instruction set and checks `|got - want| <= atol + rtol·|want|`;
/// with a mask tensor, both without and with its block summary (as calls build it), and
/// checks that the two give the same bits.
pub(super) fn check<E: Element, O: Element>(args: &FlashArgs<'_, E>, atol: f64, rtol: f64) {
    let want = reference(args);
    let blocks = (args.mask.explicit.as_ref()).and_then(|mask| MaskBlocks::new(mask).unwrap());
    let summarized = blocks.map(|blocks| FlashArgs {
        mask: FlashMask {
            explicit_blocks: Some(blocks),
            ..args.mask.clone()
        },
        dropout: args.dropout.clone(),
        ..*args
    });
    for isa in Isa::available() {
        let mut got = vec![O::from_f64(0.0); want.len()];
        flash_attention(args, &mut got, None, isa, Threads(None)).unwrap();
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            let g = g.to_f64();
            assert!(
                (g - w).abs() <= atol + rtol * w.abs(),
                "{isa:?}: element {n}: got {g}, want {w}"
            );
        }
        if let Some(summarized) = &summarized {
            let mut again = vec![O::from_f64(0.0); want.len()];
            flash_attention(summarized, &mut again, None, isa, Threads(None)).unwrap();
            let bits = |v: &[O]| v.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&again), "{isa:?}: with the mask summary");
        }
    }
}
