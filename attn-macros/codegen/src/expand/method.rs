//! The methods of a layer: `weights` and `forward` (Flax's two functions), and for training
//! `forward_with_residuals`, `backward` and `weights_backward`. Each method checks the
//! run-time dims its arguments share, builds the kernel's `Geometry`, allocates its results
//! and calls one kernel entry.

use proc_macro2::{Ident, Literal, TokenStream};
use quote::{format_ident, quote};

use super::method_docs::method_docs;
use super::{dims_module_name, dtype_tokens, element_of, mask_tokens, respan};
use crate::ir::{Axis, Layer, Operand};

/// One generated method.
#[derive(Clone, Copy)]
pub(super) enum Method<'a> {
    /// `weights`: Flax's `dot_product_attention_weights`.
    Weights,
    /// `forward`: Flax's `dot_product_attention`, with the layer's `value`.
    Forward(&'a Operand),
    /// `forward_with_residuals`: `forward` that also returns what `backward` needs.
    ForwardWithResiduals(&'a Operand),
    /// `backward`: the gradients of `forward` from its output, residuals and `d_output`.
    Backward(&'a Operand),
    /// `weights_backward`: the gradients of `weights` from `d_weights`.
    WeightsBackward,
}

impl<'a> Method<'a> {
    /// The methods of `layer`, in the order of its impl.
    pub(super) fn all(layer: &'a Layer) -> Vec<Method<'a>> {
        let mut all = vec![Method::Weights];
        if let Some(value) = &layer.value {
            all.extend([
                Method::Forward(value),
                Method::ForwardWithResiduals(value),
                Method::Backward(value),
            ]);
        }
        all.push(Method::WeightsBackward);
        all
    }

    /// The method's name.
    pub(super) fn name(self) -> &'static str {
        match self {
            Method::Weights => "weights",
            Method::Forward(_) => "forward",
            Method::ForwardWithResiduals(_) => "forward_with_residuals",
            Method::Backward(_) => "backward",
            Method::WeightsBackward => "weights_backward",
        }
    }

    /// The `value` argument, for the methods that take one.
    fn value(self) -> Option<&'a Operand> {
        match self {
            Method::Forward(value)
            | Method::ForwardWithResiduals(value)
            | Method::Backward(value) => Some(value),
            Method::Weights | Method::WeightsBackward => None,
        }
    }

    /// Whether the method computes or differentiates the weights (else the output).
    pub(super) fn of_weights(self) -> bool {
        matches!(self, Method::Weights | Method::WeightsBackward)
    }

    /// Whether the method returns gradients.
    pub(super) fn is_backward(self) -> bool {
        matches!(self, Method::Backward(_) | Method::WeightsBackward)
    }
}

/// The type of one axis in a signature: a dim's type parameter, or `Const<N>` for a literal.
fn axis_type(axis: &Axis) -> TokenStream {
    match axis {
        Axis::Named(name) => quote!(#name),
        Axis::Size(size) => {
            let size = Literal::usize_unsuffixed(*size);
            quote!(::attn::__private::Const<#size>)
        }
    }
}

fn shape_type<'a>(axes: impl IntoIterator<Item = &'a Axis>) -> TokenStream {
    let axes: Vec<TokenStream> = axes.into_iter().map(axis_type).collect();
    quote!((#(#axes,)*))
}

/// `[B, T, 12, D]`: a shape as the docs write it.
pub(super) fn shape_text<'a>(axes: impl IntoIterator<Item = &'a Axis>) -> String {
    let axes: Vec<String> = axes
        .into_iter()
        .map(|axis| match axis {
            Axis::Named(name) => name.to_string(),
            Axis::Size(size) => size.to_string(),
        })
        .collect();
    format!("[{}]", axes.join(", "))
}

fn shape_var(operand: &Operand) -> Ident {
    format_ident!("{}_shape", operand.name)
}

/// `query_shape.2`
fn axis_value(operand: &Operand, index: usize) -> TokenStream {
    let var = shape_var(operand);
    let index = syn::Index::from(index);
    quote!(#var.#index)
}

/// The axes of the weights `[batch.., heads, q_len, kv_len]` or of the output
/// `[batch.., q_len, heads, v_depth]`, each named by the input and index it comes from.
fn result_axes<'a>(layer: &'a Layer, which: Method<'a>) -> Vec<(&'a Operand, usize)> {
    let (query, key) = (&layer.query, &layer.key);
    let (q, k) = (query.axes.len(), key.axes.len());
    let batch = (0..layer.batch_rank()).map(|i| (query, i));
    match which.value() {
        Some(value) if !which.of_weights() => batch
            .chain([
                (query, q - 3),
                (query, q - 2),
                (value, value.axes.len() - 1),
            ])
            .collect(),
        _ => batch
            .chain([(query, q - 2), (query, q - 3), (key, k - 3)])
            .collect(),
    }
}

/// The arguments a backward method takes besides the forward's: the primal `output` and the
/// cotangent `d_output` of `backward`, or the cotangent `d_weights` of `weights_backward`;
/// each has the shape of the forward's result, so its run-time dims are checked like the
/// inputs'.
fn cotangent_operands(layer: &Layer, which: Method, result: &[(&Operand, usize)]) -> Vec<Operand> {
    let names: &[&'static str] = match which {
        Method::Backward(_) => &["output", "d_output"],
        Method::WeightsBackward => &["d_weights"],
        _ => &[],
    };
    let axes: Vec<Axis> = result.iter().map(|(op, i)| op.axes[*i].clone()).collect();
    names
        .iter()
        .map(|&name| Operand {
            name,
            written: shape_text(&axes),
            axes: axes.clone(),
            line: 0,
            docs: Vec::new(),
            span: layer.ident.span(),
        })
        .collect()
}

pub(super) fn method(layer: &Layer, which: Method) -> TokenStream {
    let query = &layer.query;
    let key = &layer.key;
    let result = result_axes(layer, which);
    let cotangents = cotangent_operands(layer, which, &result);
    let mut inputs = vec![query, key];
    inputs.extend(which.value());
    inputs.extend(&layer.bias);
    inputs.extend(&layer.mask.explicit);
    inputs.extend(layer.mask.index_operands());
    let primal_inputs = inputs.len();
    inputs.extend(&cotangents);

    let q = query.axes.len();
    let k = key.axes.len();

    // Generic parameters: the named dims these inputs use, in declaration order.
    let used = |name: &Ident| inputs.iter().any(|op| op.uses(name));
    let module = dims_module_name(&layer.ident);
    let mut params = Vec::new();
    let mut bounds = Vec::new();
    for dim in layer.dims.iter().filter(|d| used(&d.name)) {
        let name = &dim.name;
        params.push(name.clone());
        let bound = match dim.size {
            None => quote!(#name: ::attn::__private::Dim),
            Some(size) => {
                let size = Literal::usize_unsuffixed(size);
                quote!(#name: ::attn::__private::Declared<#module::#name, ::attn::__private::Const<#size>>)
            }
        };
        // The compiler's "required by this bound" note then points at the dim's declaration.
        bounds.push(respan(bound, dim.span));
    }

    let element = dtype_tokens(layer.options.dtype);
    let mut args = Vec::new();
    for operand in &inputs {
        let name = format_ident!("{}", operand.name);
        let shape = shape_type(&operand.axes);
        let element = element_of(layer, operand);
        // Spanned at the entry, so that the compiler's notes about this argument point at
        // the declaration line rather than at the whole macro call.
        args.push(respan(
            quote!(#name: ::attn::__private::TensorView<'_, #element, #shape>),
            operand.span,
        ));
        if operand.name == "output" {
            args.push(quote!(residuals: &::attn::__private::Residuals));
        }
    }
    let result_type = {
        let primal = dtype_tokens(if which.of_weights() {
            layer.weights_dtype()
        } else {
            layer.output_dtype()
        });
        let shape = shape_type(result.iter().map(|(op, i)| &op.axes[*i]));
        quote!(::attn::__private::Tensor<#primal, #shape>)
    };
    let grad_type = |operand: Option<&Operand>| match operand {
        Some(operand) => {
            let shape = shape_type(&operand.axes);
            quote!(::attn::__private::Tensor<#element, #shape>)
        }
        None => quote!(()),
    };
    let return_type = match which {
        Method::Weights | Method::Forward(_) => result_type,
        Method::ForwardWithResiduals(_) => quote!((#result_type, ::attn::__private::Residuals)),
        Method::Backward(_) | Method::WeightsBackward => {
            let (query, key) = (grad_type(Some(query)), grad_type(Some(key)));
            let value = grad_type(which.value());
            let bias = grad_type(layer.bias.as_ref());
            quote!(::attn::__private::Gradients<#query, #key, #value, #bias>)
        }
    };

    // Run-time dims that share a name: compare every later use with the first one.
    let mut checks = Vec::new();
    for dim in layer.dims.iter().filter(|d| d.size.is_none()) {
        let mut uses = inputs.iter().flat_map(|operand| {
            operand
                .axes
                .iter()
                .enumerate()
                .filter(|(_, axis)| matches!(axis, Axis::Named(n) if *n == dim.name))
                .map(move |(i, _)| (*operand, i))
        });
        let Some((first, first_index)) = uses.next() else {
            continue;
        };
        let first_value = axis_value(first, first_index);
        let first_name = first.name;
        let dim_name = dim.name.to_string();
        for (other, index) in uses {
            let other_value = axis_value(other, index);
            let other_name = other.name;
            checks.push(quote! {
                ::attn::__private::same_dim(#dim_name, (#first_name, #first_value), (#other_name, #other_value))?;
            });
        }
    }

    // Grouped-query heads chosen at run time: one check that they divide the query heads (a
    // static pair that does not divide is a compile error).
    let heads_axis = &query.axes[q - 2];
    let kv_heads_axis = &key.axes[k - 2];
    let is_static = |axis: &Axis| match axis {
        Axis::Named(name) => layer.static_size(name).is_some(),
        Axis::Size(_) => true,
    };
    if layer.grouped() && !(is_static(heads_axis) && is_static(kv_heads_axis)) {
        let dim_name = |axis: &Axis| shape_text([axis]).trim_matches(['[', ']']).to_owned();
        let (heads_name, kv_heads_name) = (dim_name(heads_axis), dim_name(kv_heads_axis));
        let (heads_value, kv_heads_value) = (axis_value(query, q - 2), axis_value(key, k - 2));
        checks.push(quote! {
            ::attn::__private::kv_heads_divide((#heads_name, #heads_value), (#kv_heads_name, #kv_heads_value))?;
        });
    }

    let shape_vars = inputs.iter().map(|operand| {
        let var = shape_var(operand);
        let name = format_ident!("{}", operand.name);
        quote!(let #var = #name.shape();)
    });
    let batch_sizes = (0..layer.batch_rank()).map(|i| {
        let value = axis_value(query, i);
        quote!(#value.size())
    });
    let q_len = axis_value(query, q - 3);
    let kv_len = axis_value(key, k - 3);
    let heads = axis_value(query, q - 2);
    let qk_depth = axis_value(query, q - 1);
    let v_depth = match which.value() {
        Some(value) => axis_value(value, value.axes.len() - 1),
        None => quote!(::attn::__private::Const::<0>),
    };
    // The same heads as the query's unless grouped (then a divisor, checked by the validator
    // when static and at entry when chosen at run time).
    let kv_heads = if layer.grouped() {
        axis_value(key, k - 2)
    } else {
        heads.clone()
    };

    let bias = match &layer.bias {
        Some(_) => quote! {
            ::core::option::Option::Some(&::attn::__private::Broadcast::new(
                "bias",
                bias.as_slice(),
                &bias_shape.dims(),
            )?)
        },
        None => quote!(::core::option::Option::None::<&::attn::__private::Broadcast<'_, #element>>),
    };
    let mask = mask_tokens(layer);
    // The backward sows nothing; without a sink it takes the tiled path.
    let ctx = if layer.options.sow && !which.is_backward() {
        quote!(ctx)
    } else {
        quote!(&mut ::attn::__private::without_sow(ctx))
    };
    let value_arg = which.value().map(|_| quote!(value.as_slice(),));
    let operands = quote! {
        &geometry,
        query.as_slice(),
        key.as_slice(),
        #value_arg
        #bias,
        &#mask,
        &Self::OPTIONS,
        #ctx,
    };
    let result_value = result.iter().map(|(op, i)| axis_value(op, *i));
    let allocate_result = |var: TokenStream| quote!(let mut #var = ::attn::__private::Tensor::zeros((#(#result_value,)*))?;);
    let call = match which {
        Method::Weights => {
            let allocate = allocate_result(quote!(weights));
            quote! {
                #allocate
                ::attn::__private::kernel::attention_weights(#operands weights.as_mut_slice())?;
                ::core::result::Result::Ok(weights)
            }
        }
        Method::Forward(_) => {
            let allocate = allocate_result(quote!(output));
            quote! {
                #allocate
                ::attn::__private::kernel::attention(#operands output.as_mut_slice())?;
                ::core::result::Result::Ok(output)
            }
        }
        Method::ForwardWithResiduals(_) => {
            let allocate = allocate_result(quote!(output));
            quote! {
                #allocate
                let residuals = ::attn::__private::kernel::attention_fwd(#operands output.as_mut_slice())?;
                ::core::result::Result::Ok((output, residuals))
            }
        }
        Method::Backward(_) | Method::WeightsBackward => backward_call(layer, which, &operands),
    };

    let name = format_ident!("{}", which.name());
    let doc = method_docs(layer, which, &inputs, primal_inputs, &result);
    // `self`, the tensors and `ctx`: more than clippy's default limit of 7 is what the
    // declaration asks for, so the user's clippy should not flag it.
    let allow_many = (args.len() + 2 > 7).then(|| quote!(#[allow(clippy::too_many_arguments)]));
    quote! {
        #doc
        #allow_many
        pub fn #name<#(#params),*>(
            &self,
            #(#args,)*
            ctx: &mut ::attn::__private::Context<'_>,
        ) -> ::core::result::Result<#return_type, ::attn::__private::AttnError>
        where
            #(#bounds,)*
        {
            use ::attn::__private::{Dim as _, Shape as _};
            #(#shape_vars)*
            #(#checks)*
            let geometry = ::attn::__private::Geometry {
                batch_shape: &[#(#batch_sizes),*],
                q_len: #q_len.size(),
                kv_len: #kv_len.size(),
                heads: #heads,
                kv_heads: #kv_heads,
                qk_depth: #qk_depth,
                v_depth: #v_depth,
            };
            #call
        }
    }
}

/// The body of `backward` / `weights_backward` after the geometry: one zeroed gradient per
/// differentiable input, of its input's shape, then the kernel's backward.
fn backward_call(layer: &Layer, which: Method, operands: &TokenStream) -> TokenStream {
    let allocate = |name: &str| {
        let grad = format_ident!("{name}_grad");
        let shape = format_ident!("{name}_shape");
        quote!(let mut #grad = ::attn::__private::Tensor::zeros(#shape)?;)
    };
    let mut allocations = vec![allocate("query"), allocate("key")];
    allocations.extend(which.value().map(|_| allocate("value")));
    allocations.extend(layer.bias.as_ref().map(|_| allocate("bias")));
    let (value_slice, value_grad) = match which.value() {
        Some(_) => (quote!(value_grad.as_mut_slice()), quote!(value_grad)),
        None => (quote!(&mut []), quote!(())),
    };
    let (bias_slice, bias_grad) = match layer.bias {
        Some(_) => (
            quote!(::core::option::Option::Some(bias_grad.as_mut_slice())),
            quote!(bias_grad),
        ),
        None => (quote!(::core::option::Option::None), quote!(())),
    };
    let grads = quote! {
        ::attn::__private::kernel::Grads {
            query: query_grad.as_mut_slice(),
            key: key_grad.as_mut_slice(),
            value: #value_slice,
            bias: #bias_slice,
        }
    };
    let kernel = match which {
        Method::Backward(_) => quote! {
            ::attn::__private::kernel::attention_bwd(
                #operands
                output.as_slice(),
                residuals,
                d_output.as_slice(),
                #grads,
            )?;
        },
        _ => quote! {
            ::attn::__private::kernel::attention_weights_backward(
                #operands
                d_weights.as_slice(),
                #grads,
            )?;
        },
    };
    quote! {
        #(#allocations)*
        #kernel
        ::core::result::Result::Ok(::attn::__private::Gradients {
            query: query_grad,
            key: key_grad,
            value: #value_grad,
            bias: #bias_grad,
        })
    }
}
