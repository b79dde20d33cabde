use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        broadcast_dropout: 1,
        force_fp32_for_softmax: yes,
        sow: true,
        scale: 0,
        value: causal,
    }
}

fn main() {}
