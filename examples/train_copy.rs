//! Trains a one-layer attention model end to end in plain Rust with attn's backward pass: it
//! learns to **reverse** a sequence of 8 random tokens (position i must output the token at
//! position 7 - i, so each query has to find one key by position and copy its content).
//!
//! Model: `x = token_embedding[t] + position_embedding[i]` (`[B, L, E]`), `q, k, v = x·Wq,
//! x·Wk, x·Wv` (`[B, L, H, D]`), `o = dot_product_attention(q, k, v)`, `logits = o·Wo`,
//! softmax cross-entropy against the reversed sequence. Gradients: the cross-entropy's by hand,
//! attention's by `dot_product_attention_vjp`, the projections' by hand; Adam updates.
//!
//! `cargo run --release --example train_copy` prints the loss and accuracy as they improve
//! (a few seconds on two cores).

use attn::{Array, FlaxArgs, dot_product_attention, dot_product_attention_vjp};

const VOCAB: usize = 10;
const LEN: usize = 8;
const EMBED: usize = 32;
const HEADS: usize = 2;
const DEPTH: usize = 16;
const BATCH: usize = 32;
const STEPS: usize = 600;

/// xorshift64* for data and initial weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn init(&mut self, n: usize, fan_in: usize) -> Vec<f32> {
        let s = (3.0 / fan_in as f32).sqrt();
        (0..n).map(|_| (self.uniform() * 2.0 - 1.0) * s).collect()
    }
}

/// A parameter with its Adam moments.
struct Param {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(w: Vec<f32>) -> Self {
        let n = w.len();
        Param {
            w,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
    fn adam(&mut self, g: &[f32], step: usize, lr: f32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let c1 = 1.0 - b1.powi(step as i32);
        let c2 = 1.0 - b2.powi(step as i32);
        let moments = self.m.iter_mut().zip(self.v.iter_mut());
        for ((w, (m, v)), &g) in self.w.iter_mut().zip(moments).zip(g) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
        }
    }
}

/// `c[m×n] = a[m×k] · b[k×n]` (row-major).
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for l in 0..k {
            let x = a[i * k + l];
            for j in 0..n {
                c[i * n + j] += x * b[l * n + j];
            }
        }
    }
    c
}

/// `aᵀ · b` for `a[m×k]`, `b[m×n]` -> `[k×n]`.
fn matmul_tn(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; k * n];
    for i in 0..m {
        for l in 0..k {
            let x = a[i * k + l];
            for j in 0..n {
                c[l * n + j] += x * b[i * n + j];
            }
        }
    }
    c
}

/// `a · bᵀ` for `a[m×n]`, `b[k×n]` -> `[m×k]`.
fn matmul_nt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * k];
    for i in 0..m {
        for l in 0..k {
            c[i * k + l] = (0..n).map(|j| a[i * n + j] * b[l * n + j]).sum();
        }
    }
    c
}

fn main() -> Result<(), attn::AttnError> {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let hd = HEADS * DEPTH;
    let mut tok = Param::new(rng.init(VOCAB * EMBED, 1));
    let mut pos = Param::new(rng.init(LEN * EMBED, 1));
    let mut wq = Param::new(rng.init(EMBED * hd, EMBED));
    let mut wk = Param::new(rng.init(EMBED * hd, EMBED));
    let mut wv = Param::new(rng.init(EMBED * hd, EMBED));
    let mut wo = Param::new(rng.init(hd * VOCAB, hd));
    let rows = BATCH * LEN;
    let start = std::time::Instant::now();
    for step in 1..=STEPS {
        let tokens: Vec<usize> = (0..rows)
            .map(|_| (rng.next() % VOCAB as u64) as usize)
            .collect();
        // Forward.
        let mut x = vec![0.0f32; rows * EMBED];
        for (r, &t) in tokens.iter().enumerate() {
            for e in 0..EMBED {
                x[r * EMBED + e] = tok.w[t * EMBED + e] + pos.w[(r % LEN) * EMBED + e];
            }
        }
        let shape = vec![BATCH, LEN, HEADS, DEPTH];
        let q = Array::new(matmul(&x, &wq.w, rows, EMBED, hd), shape.clone())?;
        let k = Array::new(matmul(&x, &wk.w, rows, EMBED, hd), shape.clone())?;
        let v = Array::new(matmul(&x, &wv.w, rows, EMBED, hd), shape.clone())?;
        let o = dot_product_attention(&q, &k, &v, FlaxArgs::new())?;
        let o = o.as_slice::<f32>().expect("f32 output").to_vec();
        let logits = matmul(&o, &wo.w, rows, hd, VOCAB);
        // Cross-entropy against the reversed sequence, and its gradient.
        let (mut loss, mut correct) = (0.0f32, 0usize);
        let mut dlogits = vec![0.0f32; rows * VOCAB];
        for r in 0..rows {
            let (b, i) = (r / LEN, r % LEN);
            let target = tokens[b * LEN + LEN - 1 - i];
            let row = &logits[r * VOCAB..(r + 1) * VOCAB];
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = row.iter().map(|z| (z - max).exp()).sum();
            loss += (sum.ln() + max - row[target]) / rows as f32;
            let best = (0..VOCAB).max_by(|&a, &c| row[a].total_cmp(&row[c]));
            correct += usize::from(best == Some(target));
            for c in 0..VOCAB {
                let p = (row[c] - max).exp() / sum;
                let onehot = if c == target { 1.0 } else { 0.0 };
                dlogits[r * VOCAB + c] = (p - onehot) / rows as f32;
            }
        }
        // Backward: the output projection, attention (attn's VJP), the input projections.
        let g_wo = matmul_tn(&o, &dlogits, rows, hd, VOCAB);
        let d_o = Array::new(matmul_nt(&dlogits, &wo.w, rows, VOCAB, hd), shape)?;
        let g = dot_product_attention_vjp(&q, &k, &v, &d_o, FlaxArgs::new())?;
        let f32s = |a: &Array| a.as_slice::<f32>().expect("f32 gradient").to_vec();
        let (dq, dk) = (f32s(&g.query), f32s(&g.key));
        let dv = f32s(g.value.as_ref().expect("a value gradient"));
        let g_wq = matmul_tn(&x, &dq, rows, EMBED, hd);
        let g_wk = matmul_tn(&x, &dk, rows, EMBED, hd);
        let g_wv = matmul_tn(&x, &dv, rows, EMBED, hd);
        let mut dx = matmul_nt(&dq, &wq.w, rows, hd, EMBED);
        for (d, w) in [(&dk, &wk.w), (&dv, &wv.w)] {
            for (a, b) in dx.iter_mut().zip(matmul_nt(d, w, rows, hd, EMBED)) {
                *a += b;
            }
        }
        let (mut g_tok, mut g_pos) = (vec![0.0f32; VOCAB * EMBED], vec![0.0f32; LEN * EMBED]);
        for (r, &t) in tokens.iter().enumerate() {
            for e in 0..EMBED {
                g_tok[t * EMBED + e] += dx[r * EMBED + e];
                g_pos[(r % LEN) * EMBED + e] += dx[r * EMBED + e];
            }
        }
        let lr = 0.01;
        for (p, g) in [
            (&mut tok, &g_tok),
            (&mut pos, &g_pos),
            (&mut wq, &g_wq),
            (&mut wk, &g_wk),
            (&mut wv, &g_wv),
            (&mut wo, &g_wo),
        ] {
            p.adam(g, step, lr);
        }
        if step == 1 || step % 50 == 0 {
            println!(
                "step {step:4}  loss {loss:.4}  accuracy {:5.1}%",
                100.0 * correct as f32 / rows as f32
            );
        }
    }
    println!("trained in {:.1} s", start.elapsed().as_secs_f32());
    Ok(())
}
