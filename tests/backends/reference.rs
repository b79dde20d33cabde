//! The public functions against a float64 reference written here, on one backend (the child
//! process's): every float dtype, both kernel paths (the tiled output path; the weights path,
//! through a sow sink and through `dot_product_attention_weights`), depths 8, 64, 80, 96 and
//! 128, lengths that are not a multiple of any block (1, 17, 33, 130, 200, 257), GQA and MQA,
//! no mask, a top-left causal mask (with rows that see no key when queries outnumber keys) and
//! a bottom-right one, with and without a bias.
//!
//! The reference computes Flax's definition in float64 on the inputs as rounded to the dtype:
//! `softmax(q·kᵀ / √d + bias, masked logits → finfo.min)`, a row without a visible key giving
//! uniform weights. Bounds, `|got − want| ≤ atol + rtol·|want|`: float64 `1e-12 + 1e-10·|want|`
//! and float32 `1e-6 + 1e-5·|want|` (rounding of the products and sums only); bf16 and f16
//! follow Flax, which rounds the scaled query, the logits, the weights and the output to the
//! dtype (FLAX_SEMANTICS.md), so their bound is a few units in the last place of that dtype on
//! logits of magnitude below 1 (inputs in [−1, 1]): bf16 `2⁻⁷ + 2⁻⁶·|want|` (8 bits of
//! precision), f16 `2⁻¹⁰ + 2⁻⁹·|want|` (11 bits). A kernel that reads a wrong element or
//! drops a block errs by the size of the values themselves, far outside every bound.

use attn::kernel::Align;
use attn::{
    Array, DType, FlaxArgs, Intermediates, dot_product_attention, dot_product_attention_weights,
};

/// One problem: `[b, q, h, d]` queries, `[b, kv, g, d]` keys and values.
#[derive(Clone, Copy, Debug)]
struct Problem {
    b: usize,
    q: usize,
    kv: usize,
    h: usize,
    g: usize,
    d: usize,
    causal: Option<Align>,
    bias: bool,
}

const SHAPES: [(usize, usize, usize, usize, usize, usize); 7] = [
    // (b, q, kv, h, g, d)
    (1, 1, 257, 4, 2, 128),
    (2, 17, 33, 2, 2, 8),
    (1, 130, 200, 4, 1, 64),
    (1, 200, 130, 2, 2, 80),
    (1, 96, 96, 3, 3, 96),
    (2, 64, 129, 4, 2, 128),
    (1, 257, 257, 2, 1, 64),
];

fn problems() -> Vec<Problem> {
    let mut all = Vec::new();
    for (n, &(b, q, kv, h, g, d)) in SHAPES.iter().enumerate() {
        for causal in [None, Some(Align::TopLeft), Some(Align::BottomRight)] {
            let bias = n % 2 == 0;
            all.push(Problem {
                b,
                q,
                kv,
                h,
                g,
                d,
                causal,
                bias,
            });
        }
    }
    all
}

/// Deterministic values in [−1, 1].
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

struct Inputs {
    query: Array,
    key: Array,
    value: Array,
    bias: Option<Array>,
}

fn inputs(p: &Problem, dtype: DType) -> Inputs {
    let arr = |shape: Vec<usize>, seed| {
        let n = shape.iter().product();
        Array::from_f64(dtype, &values(n, seed), shape).expect("a valid array")
    };
    Inputs {
        query: arr(vec![p.b, p.q, p.h, p.d], 1),
        key: arr(vec![p.b, p.kv, p.g, p.d], 2),
        value: arr(vec![p.b, p.kv, p.g, p.d], 3),
        bias: p.bias.then(|| arr(vec![p.h, 1, p.kv], 4)),
    }
}

/// Flax's weights `[b, h, q, kv]` and output `[b, q, h, d]` in float64.
fn reference(p: &Problem, x: &Inputs) -> (Vec<f64>, Vec<f64>) {
    let (q, k, v) = (
        x.query.to_f64_vec(),
        x.key.to_f64_vec(),
        x.value.to_f64_vec(),
    );
    let bias = x.bias.as_ref().map(Array::to_f64_vec);
    let group = p.h / p.g;
    let scale = 1.0 / (p.d as f64).sqrt();
    let mut weights = vec![0.0; p.b * p.h * p.q * p.kv];
    let mut output = vec![0.0; p.b * p.q * p.h * p.d];
    for b in 0..p.b {
        for h in 0..p.h {
            for i in 0..p.q {
                let visible = |j: usize| match p.causal {
                    None => true,
                    Some(align) => (j as i64) <= i as i64 + align.q_offset(p.q, p.kv),
                };
                let qrow = &q[((b * p.q + i) * p.h + h) * p.d..][..p.d];
                let logits: Vec<f64> = (0..p.kv)
                    .map(|j| {
                        if !visible(j) {
                            return f64::MIN;
                        }
                        let krow = &k[((b * p.kv + j) * p.g + h / group) * p.d..][..p.d];
                        let dot: f64 = qrow.iter().zip(krow).map(|(a, c)| a * scale * c).sum();
                        dot + bias.as_ref().map_or(0.0, |bias| bias[h * p.kv + j])
                    })
                    .collect();
                let max = logits.iter().copied().fold(f64::MIN, f64::max);
                let exps: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
                let sum: f64 = exps.iter().sum();
                let row = &mut weights[((b * p.h + h) * p.q + i) * p.kv..][..p.kv];
                for (w, e) in row.iter_mut().zip(&exps) {
                    *w = e / sum;
                }
                let out = &mut output[((b * p.q + i) * p.h + h) * p.d..][..p.d];
                for (j, w) in row.iter().enumerate() {
                    let vrow = &v[((b * p.kv + j) * p.g + h / group) * p.d..][..p.d];
                    for (o, value) in out.iter_mut().zip(vrow) {
                        *o += w * value;
                    }
                }
            }
        }
    }
    (weights, output)
}

/// `(atol, rtol)` for results of `dtype` (see the module docs).
fn bounds(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-12, 1e-10),
        DType::F32 => (1e-6, 1e-5),
        DType::BF16 => (2f64.powi(-7), 2f64.powi(-6)),
        _ => (2f64.powi(-10), 2f64.powi(-9)),
    }
}

/// The largest `|got − want| / (atol + rtol·|want|)`; an error if the lengths differ.
fn worst(got: &Array, want: &[f64], dtype: DType) -> Result<f64, String> {
    let got = got.to_f64_vec();
    if got.len() != want.len() {
        return Err(format!("{} elements, expected {}", got.len(), want.len()));
    }
    let (atol, rtol) = bounds(dtype);
    Ok(got.iter().zip(want).fold(0.0, |worst: f64, (g, w)| {
        let ratio = (g - w).abs() / (atol + rtol * w.abs());
        if ratio.is_nan() {
            f64::INFINITY
        } else {
            worst.max(ratio)
        }
    }))
}

/// Every problem, dtype and path; the report gives the worst error over bound per dtype.
pub fn check() -> Result<String, String> {
    let mut report = Vec::new();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        let mut worst_seen: f64 = 0.0;
        let mut runs = 0;
        for p in problems() {
            let x = inputs(&p, dtype);
            let (want_weights, want_output) = reference(&p, &x);
            let args = || {
                let args = FlaxArgs::new();
                let args = match &x.bias {
                    Some(bias) => args.bias(bias),
                    None => args,
                };
                match p.causal {
                    Some(align) => args.causal(align),
                    None => args,
                }
            };
            let fail = |what: &str, e: String| format!("{dtype} {p:?}, {what}: {e}");
            let tiled = dot_product_attention(&x.query, &x.key, &x.value, args())
                .map_err(|e| fail("output path", e.to_string()))?;
            let mut sink = Intermediates::new();
            let sown = dot_product_attention(&x.query, &x.key, &x.value, args().module(&mut sink))
                .map_err(|e| fail("weights path", e.to_string()))?;
            let weights = dot_product_attention_weights(&x.query, &x.key, args())
                .map_err(|e| fail("dot_product_attention_weights", e.to_string()))?;
            let [sown_weights] = sink.attention_weights() else {
                return Err(fail("weights path", "not one sown weights array".into()));
            };
            let results = [
                ("output path", &tiled, &want_output),
                ("weights path output", &sown, &want_output),
                ("sown weights", sown_weights, &want_weights),
                ("dot_product_attention_weights", &weights, &want_weights),
            ];
            for (what, got, want) in results {
                let ratio = worst(got, want, dtype).map_err(|e| fail(what, e))?;
                if ratio > 1.0 {
                    return Err(fail(what, format!("error {ratio:.2}× its bound")));
                }
                worst_seen = worst_seen.max(ratio);
                runs += 1;
            }
        }
        report.push(format!(
            "{dtype}: {runs} results within bounds, worst error {worst_seen:.3}× the bound"
        ));
    }
    Ok(report.join("\n"))
}
