//! The VJPs against central finite differences of the forward, in f64, on random calls: batch
//! ranks 0 to 2, GQA, broadcast biases of every lower rank and size-1 axes, dense masks,
//! causal terms with each alignment, sliding windows, dropout (the same seed in every forward
//! call), both functions and both backward paths. The expected gradient of each input element
//! is `(L(x + h) - L(x - h)) / 2h` with `L = sum(cotangent ⊙ forward)`: computed from the
//! forward alone, never from the backward.

use attn::kernel::{Align, Window};
use attn::{
    Array, DType, DropoutRng, FlaxArgs, Intermediates, dot_product_attention,
    dot_product_attention_vjp, dot_product_attention_weights, dot_product_attention_weights_vjp,
};
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// A small deterministic generator for the tensors of a case (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal_ish(&mut self) -> f64 {
        (self.next() + self.next() + self.next() - 1.5) * 2.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal_ish()).collect()
    }
}

#[derive(Clone, Debug)]
struct Spec {
    batch: Vec<usize>,
    q: usize,
    kv: usize,
    kv_heads: usize,
    group: usize,
    dk: usize,
    dv: usize,
    /// Per logits axis: whether the bias keeps it (else size 1), and how many leading axes it
    /// drops.
    bias: Option<(Vec<bool>, usize)>,
    mask: Option<(Vec<bool>, usize)>,
    causal: Option<Align>,
    window: Option<Window>,
    dropout: Option<bool>,
    weights_fn: bool,
    sink: bool,
    seed: u64,
}

fn align() -> impl Strategy<Value = Align> {
    prop_oneof![
        Just(Align::TopLeft),
        Just(Align::BottomRight),
        (-2i64..3).prop_map(Align::Offset)
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    let sizes = (
        prop::collection::vec(1usize..3, 0..3),
        1usize..5,
        1usize..6,
        1usize..3,
        1usize..3,
        1usize..4,
        1usize..4,
    );
    let operand = || prop::option::of((prop::collection::vec(any::<bool>(), 7), 0usize..4));
    let structure = (
        prop::option::of(align()),
        prop::option::of((0usize..3, 0usize..3, align())),
        prop::option::of(any::<bool>()),
    );
    (
        sizes,
        operand(),
        operand(),
        structure,
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(
                (batch, q, kv, kv_heads, group, dk, dv),
                bias,
                mask,
                (causal, window, dropout),
                weights_fn,
                sink,
                seed,
            )| Spec {
                batch,
                q,
                kv,
                kv_heads,
                group,
                dk,
                dv,
                bias,
                mask,
                causal,
                window: window.map(|(left, right, align)| Window { left, right, align }),
                dropout,
                weights_fn,
                sink,
                seed,
            },
        )
}

/// The shape of a broadcast operand: the logits shape with the dropped axes set to 1 and
/// `lead` leading axes removed.
fn operand_shape(logits: &[usize], keep: &[bool], lead: usize) -> Vec<usize> {
    let s: Vec<usize> = logits
        .iter()
        .zip(keep)
        .map(|(&n, &k)| if k { n } else { 1 })
        .collect();
    s[lead.min(s.len())..].to_vec()
}

struct Inputs {
    q: Array,
    k: Array,
    v: Array,
    bias: Option<Array>,
    mask: Option<Array>,
}

fn arr(data: Vec<f64>, shape: Vec<usize>) -> Array {
    Array::new(data, shape).unwrap()
}

fn args<'a>(spec: &Spec, inputs: &'a Inputs) -> FlaxArgs<'a> {
    let mut a = FlaxArgs::new().deterministic(spec.dropout.is_none());
    if let Some(broadcast) = spec.dropout {
        a = a
            .dropout_rate(0.3)
            .broadcast_dropout(broadcast)
            .dropout_rng(DropoutRng::new(spec.seed ^ 0x5eed));
    }
    if let Some(b) = &inputs.bias {
        a = a.bias(b);
    }
    if let Some(m) = &inputs.mask {
        a = a.mask(m);
    }
    if let Some(c) = spec.causal {
        a = a.causal(c);
    }
    if let Some(w) = spec.window {
        a = a.window(w);
    }
    a
}

/// `sum(cotangent ⊙ forward(inputs))`.
fn loss(spec: &Spec, inputs: &Inputs, cot: &[f64]) -> f64 {
    let out = if spec.weights_fn {
        dot_product_attention_weights(&inputs.q, &inputs.k, args(spec, inputs))
    } else {
        dot_product_attention(&inputs.q, &inputs.k, &inputs.v, args(spec, inputs))
    }
    .unwrap();
    out.to_f64_vec().iter().zip(cot).map(|(x, c)| x * c).sum()
}

/// The central difference of `loss` along every element of the input `which` selects.
fn finite_difference(
    spec: &Spec,
    inputs: &mut Inputs,
    cot: &[f64],
    which: fn(&mut Inputs) -> &mut Array,
) -> Vec<f64> {
    const H: f64 = 1e-5;
    let base = which(inputs).clone();
    let data = base.to_f64_vec();
    let mut grads = Vec::with_capacity(data.len());
    for n in 0..data.len() {
        let mut at = |x: f64| {
            let mut d = data.clone();
            d[n] = x;
            *which(inputs) = arr(d, base.shape().to_vec());
            loss(spec, inputs, cot)
        };
        let g = (at(data[n] + H) - at(data[n] - H)) / (2.0 * H);
        grads.push(g);
    }
    *which(inputs) = base;
    grads
}

/// Gradient elements compared with a finite difference, over all cases.
static COMPARED: AtomicUsize = AtomicUsize::new(0);

fn close(name: &str, got: &Array, want: &[f64]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.dtype(), DType::F64, "{} dtype", name);
    prop_assert_eq!(got.len(), want.len(), "{} length", name);
    COMPARED.fetch_add(want.len(), Ordering::Relaxed);
    for (n, (g, w)) in got.to_f64_vec().iter().zip(want).enumerate() {
        prop_assert!(
            (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "{} element {}: vjp {} vs finite difference {}",
            name,
            n,
            g,
            w
        );
    }
    Ok(())
}

fn check(spec: &Spec) -> Result<(), TestCaseError> {
    let mut rng = Rng(spec.seed | 1);
    let heads = spec.kv_heads * spec.group;
    let shape = |len: usize, h: usize, d: usize| {
        let mut s = spec.batch.clone();
        s.extend_from_slice(&[len, h, d]);
        s
    };
    let n = |s: &[usize]| s.iter().product::<usize>();
    let (qs, ks, vs) = (
        shape(spec.q, heads, spec.dk),
        shape(spec.kv, spec.kv_heads, spec.dk),
        shape(spec.kv, spec.kv_heads, spec.dv),
    );
    let mut logits = spec.batch.clone();
    logits.extend_from_slice(&[heads, spec.q, spec.kv]);
    let bias = spec.bias.as_ref().map(|(keep, lead)| {
        let s = operand_shape(&logits, &keep[..logits.len()], *lead);
        arr(rng.vec(n(&s)), s)
    });
    let mask = spec.mask.as_ref().map(|(keep, lead)| {
        let s = operand_shape(&logits, &keep[7 - logits.len()..], *lead);
        let bits: Vec<bool> = (0..n(&s)).map(|_| rng.next() < 0.75).collect();
        Array::new(bits, s).unwrap()
    });
    let mut inputs = Inputs {
        q: arr(rng.vec(n(&qs)), qs),
        k: arr(rng.vec(n(&ks)), ks),
        v: arr(rng.vec(n(&vs)), vs.clone()),
        bias,
        mask,
    };
    let out_shape = if spec.weights_fn {
        logits.clone()
    } else {
        shape(spec.q, heads, spec.dv)
    };
    let cot = rng.vec(n(&out_shape));
    let cot_array = arr(cot.clone(), out_shape);
    let mut sink = Intermediates::new();
    let grads = {
        let a = args(spec, &inputs);
        let a = if spec.sink { a.module(&mut sink) } else { a };
        if spec.weights_fn {
            dot_product_attention_weights_vjp(&inputs.q, &inputs.k, &cot_array, a)
        } else {
            dot_product_attention_vjp(&inputs.q, &inputs.k, &inputs.v, &cot_array, a)
        }
    }
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let fd_q = finite_difference(spec, &mut inputs, &cot, |i| &mut i.q);
    close("query", &grads.query, &fd_q)?;
    let fd_k = finite_difference(spec, &mut inputs, &cot, |i| &mut i.k);
    close("key", &grads.key, &fd_k)?;
    if spec.weights_fn {
        prop_assert!(grads.value.is_none());
    } else {
        let fd_v = finite_difference(spec, &mut inputs, &cot, |i| &mut i.v);
        close("value", grads.value.as_ref().unwrap(), &fd_v)?;
    }
    if inputs.bias.is_some() {
        let fd_b = finite_difference(spec, &mut inputs, &cot, |i| {
            i.bias.as_mut().expect("a bias")
        });
        let got = grads.bias.as_ref().expect("a bias gradient");
        prop_assert_eq!(got.shape(), inputs.bias.as_ref().unwrap().shape());
        close("bias", got, &fd_b)?;
    } else {
        prop_assert!(grads.bias.is_none());
    }
    Ok(())
}

#[test]
fn vjp_matches_central_differences() {
    let mut runner = TestRunner::new(Config {
        cases: 256,
        ..Config::default()
    });
    runner.run(&spec(), |spec| check(&spec)).unwrap();
    let n = COMPARED.load(Ordering::Relaxed);
    println!("256 random calls, {n} gradient elements checked against central differences");
    assert!(n > 1000, "only {n} elements compared");
}
