//! Every option, a bias and a combined mask, two batch dims, lowercase dim names, and several
//! layers in one invocation; the run checks a few facts that follow from the options.
use attn::{Const, Context, Intermediates, Shape, TensorView, attention};

attention! {
    /// Everything at once.
    pub(crate) struct Everything {
        /// Queries.
        query: [beam, batch, t, h = 2, d = 4],
        key: [beam, batch, s, h, d],
        value: [beam, batch, s, h, 3],
        bias: [batch, 1, t, s],
        mask: causal + [batch, 1, 1, s],
        dropout_rate: 0.5,
        broadcast_dropout: false,
        dtype: f64,
        precision: highest,
        force_fp32_for_softmax: false,
        sow: attention_weights,
        scale: 0.25,
    }

    /// Weights only: no `value`, so no `forward`.
    struct WeightsOnly {
        query: [T, 1, 2],
        key: [S, 1, 2],
    }
}

fn main() {
    let (beams, batch, t, s) = (2, 3, 4, 4);
    let q: Vec<f64> = (0..beams * batch * t * 2 * 4).map(|i| (i % 7) as f64 / 7.0).collect();
    let v: Vec<f64> = (0..beams * batch * s * 2 * 3).map(|i| (i % 5) as f64).collect();
    let bias = vec![0.0f64; batch * t * s];
    let keep: Vec<bool> = (0..batch * s).map(|i| i % s != 1).collect();
    let qk_shape = (beams, batch, t, Const::<2>, Const::<4>);
    let mut sink = Intermediates::new();
    let output = Everything
        .forward(
            TensorView::new(&q, qk_shape).unwrap(),
            TensorView::new(&q, qk_shape).unwrap(),
            TensorView::new(&v, (beams, batch, s, Const::<2>, Const::<3>)).unwrap(),
            TensorView::new(&bias, (batch, Const::<1>, t, s)).unwrap(),
            TensorView::new(&keep, (batch, Const::<1>, Const::<1>, s)).unwrap(),
            &mut Context::with_dropout(3).sow(&mut sink),
        )
        .unwrap();
    assert_eq!(output.shape().dims(), [2, 3, 4, 2, 3]);
    assert_eq!(Everything::OPTIONS.scale, Some(0.25));
    assert!(!Everything::OPTIONS.broadcast_dropout);
    // Sown before dropout: rows sum to 1, and key 1 (masked) and keys after the query
    // (causal) get nothing.
    let sown = sink.attention_weights()[0].to_f64_vec();
    for (row, weights) in sown.chunks(s).enumerate() {
        let i = row % t;
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12 || i == 1);
        assert!(weights.iter().enumerate().all(|(j, w)| (j <= i && j != 1) || *w == 0.0 || i == 1));
    }

    let data = [0.5f32; 3 * 2];
    let weights = WeightsOnly
        .weights(
            TensorView::new(&data, (3usize, Const::<1>, Const::<2>)).unwrap(),
            TensorView::new(&data, (3usize, Const::<1>, Const::<2>)).unwrap(),
            &mut Context::deterministic(),
        )
        .unwrap();
    assert_eq!(weights.as_slice(), &[1.0 / 3.0; 9]);
}
