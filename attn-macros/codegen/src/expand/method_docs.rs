//! The doc comment of each generated method: what it computes, its arguments with their
//! declared shapes, the mask's meaning, what it returns and when it fails.

use proc_macro2::TokenStream;

use super::method::{Method, shape_text};
use super::{at_line, docs};
use crate::ir::{Align, Layer, Operand};

/// The docs of `which`; `inputs[..primal_inputs]` are the forward's inputs, the rest the
/// backward's `output` / `d_output` / `d_weights`.
pub(super) fn method_docs(
    layer: &Layer,
    which: Method,
    inputs: &[&Operand],
    primal_inputs: usize,
    result_axes: &[(&Operand, usize)],
) -> TokenStream {
    let mut lines = Vec::new();
    lines.push(
        match which {
            Method::Weights => {
                "The attention weights, as `flax.linen.dot_product_attention_weights` computes \
                 them: `softmax(scale * query · keyᵀ + bias)` over the keys, masked, then dropout."
            }
            Method::Forward(_) => {
                "The attention output, as `flax.linen.dot_product_attention` computes it: \
                 the weights of [`Self::weights`] applied to `value`."
            }
            Method::ForwardWithResiduals(_) => {
                "[`Self::forward`] for training: the output, and the \
                 [`Residuals`](::attn::Residuals) that [`Self::backward`] needs (each \
                 row's logsumexp and a fingerprint of the call), as `jax.custom_vjp`'s `fwd`."
            }
            Method::Backward(_) => {
                "The gradients of [`Self::forward`] (its vector–Jacobian product, \
                 `jax.custom_vjp`'s `bwd`): from the `output` and `residuals` of \
                 [`Self::forward_with_residuals`] and the output's cotangent `d_output` (the \
                 loss's gradient with respect to the output), the gradients of every input. \
                 Pass the forward's inputs and a `ctx` with its dropout RNG: the dropout mask \
                 is regenerated, never stored."
            }
            Method::WeightsBackward => {
                "The gradients of [`Self::weights`] (its vector–Jacobian product): from the \
                 weights' cotangent `d_weights`, the gradients of `query`, `key` and a bias. \
                 Pass the forward's inputs and a `ctx` with its dropout RNG: the dropout mask \
                 is regenerated, never stored."
            }
        }
        .to_owned(),
    );
    lines.push(String::new());
    lines.push("Arguments (shapes as declared):".to_owned());
    lines.push(String::new());
    for operand in inputs {
        let element = match operand.name {
            "mask" => "`bool` (`true` = attend)".to_owned(),
            "query_lengths" => "`i32`, each batch element's query length (rows past it see no \
                                key)"
                .to_owned(),
            "kv_lengths" => "`i32`, each batch element's key/value length (keys past it are \
                             invisible)"
                .to_owned(),
            "query_segment_ids" | "kv_segment_ids" => {
                "`i32` (a query sees a key only within its own segment)".to_owned()
            }
            "output" => format!(
                "`{}`, the output of [`Self::forward_with_residuals`]",
                layer.output_dtype().rust_name()
            ),
            "d_output" => format!(
                "`{}`, the cotangent of the output",
                layer.output_dtype().rust_name()
            ),
            "d_weights" => format!(
                "`{}`, the cotangent of the weights",
                layer.weights_dtype().rust_name()
            ),
            _ => format!("`{}`", layer.options.dtype.rust_name()),
        };
        let mut line = format!(
            "- `{}`: `{}` of {element}{}",
            operand.name,
            operand.written,
            at_line(operand.line)
        );
        for doc in &operand.docs {
            line.push_str(" — ");
            line.push_str(doc);
        }
        lines.push(line);
        if operand.name == "output" {
            lines.push(
                "- `residuals`: what [`Self::forward_with_residuals`] returned with `output`"
                    .to_owned(),
            );
        }
    }
    lines.push(if which.is_backward() {
        "- `ctx`: the forward's `deterministic` and dropout RNG (nothing is sown)".to_owned()
    } else if layer.options.sow {
        "- `ctx`: `deterministic`, the dropout RNG, and the sow sink that receives the weights \
         (`sow: attention_weights`)"
            .to_owned()
    } else {
        "- `ctx`: `deterministic` and the dropout RNG (this layer does not `sow`, so a sink in \
         `ctx` receives nothing)"
            .to_owned()
    });
    lines.push(String::new());
    let position = |align: Align| match align {
        Align::TopLeft => "i".to_owned(),
        Align::BottomRight => "i + kv_len - q_len".to_owned(),
        Align::Offset(n) if n < 0 => format!("i - {}", n.unsigned_abs()),
        Align::Offset(n) => format!("i + {n}"),
    };
    if let Some(align) = layer.mask.causal {
        lines.push(format!(
            "The mask is causal: query `i` attends to keys `j <= {}`.",
            position(align)
        ));
        lines.push(String::new());
    }
    if let Some(window) = layer.mask.window {
        let p = position(window.align);
        let upper = if window.right == 0 {
            p.clone()
        } else {
            format!("{p} + {}", window.right)
        };
        lines.push(format!(
            "Sliding window: query `i` attends to keys `{p} - {} <= j <= {upper}`.",
            window.left,
        ));
        lines.push(String::new());
    }
    if layer.grouped() {
        let heads = &layer.query.axes[layer.query.axes.len() - 2];
        let kv_heads = &layer.key.axes[layer.key.axes.len() - 2];
        lines.push(format!(
            "Grouped-query attention: query head `n` reads key/value head `n / ({} / {})`.",
            shape_text([heads]).trim_matches(['[', ']']),
            shape_text([kv_heads]).trim_matches(['[', ']'])
        ));
        lines.push(String::new());
    }
    let result = shape_text(result_axes.iter().map(|(op, i)| &op.axes[*i]));
    lines.push(match which {
        Method::Weights => format!(
            "Returns the weights `{result}` of `{}`.",
            layer.weights_dtype().rust_name()
        ),
        Method::Forward(_) => format!(
            "Returns the output `{result}` of `{}`.",
            layer.output_dtype().rust_name()
        ),
        Method::ForwardWithResiduals(_) => format!(
            "Returns the output `{result}` of `{}` and the residuals.",
            layer.output_dtype().rust_name()
        ),
        Method::Backward(_) | Method::WeightsBackward => {
            let grads: Vec<String> = inputs[..primal_inputs]
                .iter()
                .filter(|op| matches!(op.name, "query" | "key" | "value" | "bias"))
                .map(|op| format!("`{}`", op.name))
                .collect();
            format!(
                "Returns the gradients of {} in [`Gradients`](::attn::Gradients), \
                 each of its input's shape and of `{}`; the gradient of a bias is summed over \
                 the axes along which it broadcasts, the gradients of a grouped key and value \
                 over their group's query heads.",
                grads.join(", "),
                layer.options.dtype.rust_name()
            )
        }
    });
    lines.push(String::new());
    lines.push("# Errors".to_owned());
    lines.push(String::new());
    let runtime: Vec<String> = layer
        .dims
        .iter()
        .filter(|d| d.size.is_none() && inputs.iter().any(|op| op.uses(&d.name)))
        .map(|d| format!("`{}`", d.name))
        .collect();
    if runtime.is_empty() {
        lines.push("`attn::AttnError` if the runtime rejects an input.".to_owned());
    } else {
        lines.push(format!(
            "`attn::AttnError` if the inputs disagree on a run-time dim ({}), \
             or if the runtime rejects an input.",
            runtime.join(", ")
        ));
    }
    if matches!(which, Method::Backward(_)) {
        lines.push(String::new());
        lines.push(
            "`residuals` of another call (other inputs, output, options or dropout RNG) are \
             `AttnError::InvalidArgument` naming `residuals`."
                .to_owned(),
        );
    }
    docs(&lines)
}
