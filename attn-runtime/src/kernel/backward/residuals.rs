//! What a forward keeps for its backward ([`Residuals`]), the forward that keeps it
//! ([`attention_fwd`]), and the check that a backward is handed the residuals of its own call.
//!
//! The pair [`attention_fwd`] / [`super::attention_bwd`] is what `jax.custom_vjp` calls `fwd`
//! and `bwd`: the forward returns the output and the residuals, the backward takes them with
//! the output's cotangent. The residuals are each row's logsumexp (`[batch..., q_len, heads]`,
//! f64) and a fingerprint of the call; the output itself is not copied: the backward takes it
//! as an argument (it reads `D_i = dO_i · O_i` from it).

use super::super::broadcast::Broadcast;
use super::super::call::Call;
use super::super::dispatch::{Path, choose_path, run, run_tiled};
use super::super::geometry::Geometry;
use super::super::options::Options;
use super::super::visibility::Mask;
use crate::context::Context;
use crate::dim::Dim;
use crate::element::Element;
use crate::error::{AttnError, try_filled};

/// What [`attention_fwd`] keeps for [`super::attention_bwd`].
///
/// Holds each row's logsumexp when the forward ran the tiled path (with a sow sink it ran the
/// materialized path and keeps none: the backward then recomputes the statistics), and a
/// fingerprint of the call: its sizes, dtypes, options, mask structure (causal, window,
/// lengths, segment ids), dropout generator, every bit of a mask tensor, and a checksum of
/// query, key, value, bias and output (every element up to 4,096 per tensor, else 4,096
/// elements spread evenly over it). A backward given the residuals of another call returns
/// [`AttnError::InvalidArgument`] with `argument: "residuals"`.
#[derive(Clone, Debug, PartialEq)]
pub struct Residuals {
    /// `[batch..., q_len, heads]`, or empty.
    lse: Vec<f64>,
    /// The shape of `lse` when it is kept.
    lse_shape: Vec<usize>,
    fingerprint: u64,
}

impl Residuals {
    /// Each row's `max + ln(sum)` of its masked logits, `[batch..., q_len, heads]`
    /// ([`Residuals::logsumexp_shape`]), or `None` when the forward ran the materialized path.
    pub fn logsumexp(&self) -> Option<&[f64]> {
        (!self.lse_shape.is_empty()).then_some(&self.lse[..])
    }

    /// The shape of [`Residuals::logsumexp`] (empty when there is none).
    pub fn logsumexp_shape(&self) -> &[usize] {
        &self.lse_shape
    }

    /// Checks that these residuals belong to `call` with this `output`.
    pub(super) fn check<E: Element, B: Element, O: Element>(
        &self,
        call: &Call<'_, E, B>,
        output: &[O],
    ) -> Result<(), AttnError> {
        if fingerprint(call, output) != self.fingerprint {
            return Err(AttnError::InvalidArgument {
                argument: "residuals",
                reason: "expected the residuals of this call (the same shapes, dtypes, options, \
                         dropout generator, query, key, value and output); these belong to \
                         another call"
                    .into(),
            });
        }
        if let Some(lse) = self.logsumexp() {
            call.check_len("residuals", lse.len(), &call.lse_shape())?;
        }
        Ok(())
    }
}

/// [`super::super::attention`] that also returns what [`super::attention_bwd`] needs: the
/// output goes into `out` (`[batch..., q_len, heads, v_depth]`, Flax's output dtype `O`), the
/// residuals are returned. Same arguments and errors as the forward.
#[allow(clippy::too_many_arguments)]
pub fn attention_fwd<E: Element, B: Element, O: Element, H: Dim, G: Dim, Dk: Dim, Dv: Dim>(
    geom: &Geometry<'_, H, G, Dk, Dv>,
    query: &[E],
    key: &[E],
    value: &[E],
    bias: Option<&Broadcast<'_, B>>,
    mask: &Mask<'_>,
    opts: &Options,
    ctx: &mut Context<'_>,
    out: &mut [O],
) -> Result<Residuals, AttnError> {
    let call = Call::new(geom, query, key, Some(value), bias, mask, opts, ctx)?;
    call.check_dtype::<O>("output", call.plan.output)?;
    call.check_len("output", out.len(), &call.output_shape())?;
    let tiled = ctx.sow.is_none() && choose_path(&call, false) == Path::Tiled;
    let (lse, lse_shape) = if tiled && !out.is_empty() {
        let shape = call.lse_shape();
        let mut lse = try_filled("residuals", call.batch * call.q_len * call.heads, 0.0)?;
        run_tiled(&call, out, Some(&mut lse), ctx)?;
        (lse, shape)
    } else {
        run(&call, None::<&mut [O]>, Some(&mut *out), ctx)?;
        (Vec::new(), Vec::new())
    };
    Ok(Residuals {
        lse,
        lse_shape,
        fingerprint: fingerprint(&call, out),
    })
}

/// A multiply-rotate hash over 64-bit words (the `FxHash` step: one multiply per word, not
/// FNV's eight; a fingerprint against mix-ups, not against an adversary).
struct Hasher(u64);

impl Hasher {
    fn word(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    /// Every element of `data` up to [`SAMPLES`], else [`SAMPLES`] evenly spread ones.
    fn sample<X: Element>(&mut self, data: &[X]) {
        self.word(data.len() as u64);
        let step = data.len().div_ceil(SAMPLES).max(1);
        for x in data.iter().step_by(step) {
            self.word(x.to_f64().to_bits());
        }
    }
}

/// Elements of a tensor that the fingerprint reads at most: the outputs of two different calls
/// differ almost everywhere, so 4096 evenly spread elements tell them apart, and reading them
/// costs microseconds (65,536 per tensor cost 5 ms of a 6 ms small call).
const SAMPLES: usize = 1 << 12;

fn fingerprint<E: Element, B: Element, O: Element>(call: &Call<'_, E, B>, output: &[O]) -> u64 {
    let mut h = Hasher(0xcbf2_9ce4_8422_2325);
    for &d in &call.batch_shape {
        h.word(d as u64);
    }
    for d in [
        call.heads,
        call.kv_heads,
        call.q_len,
        call.kv_len,
        call.qk_depth,
        call.v_depth,
    ] {
        h.word(d as u64);
    }
    for dtype in [E::DTYPE, B::DTYPE, O::DTYPE] {
        h.word(dtype as u64);
    }
    h.word(call.query_scale.to_bits());
    h.word(call.big_neg.to_bits());
    h.word(u64::from(call.bias.is_some()) | u64::from(call.mask.is_some()) << 1);
    for w in call.vis.words() {
        h.word(w);
    }
    if let Some((plan, rng)) = &call.dropout {
        h.word(plan.threshold);
        h.word(plan.multiplier.to_bits());
        h.word(u64::from(plan.broadcast));
        // The generator's state, read through two draws of a copy.
        let mut rng = rng.clone();
        h.word(u64::from(rand_core::RngCore::next_u32(&mut rng)));
        h.word(u64::from(rand_core::RngCore::next_u32(&mut rng)));
    }
    h.sample(call.query);
    h.sample(call.key);
    h.sample(call.value.unwrap_or(&[]));
    h.sample(output);
    // The bias like the inputs; the mask tensor bit by bit (64 to a word): two masks of one
    // shape may differ in a single element, which a sample would miss.
    h.sample(call.bias.as_ref().map_or(&[][..], |b| b.elements()));
    let mask = call.mask.as_ref().map_or(&[][..], |m| m.elements());
    h.word(mask.len() as u64);
    for chunk in mask.chunks(64) {
        h.word(chunk.iter().fold(0u64, |w, &bit| w << 1 | u64::from(bit)));
    }
    h.0
}
