use attn::attention;

attention! {
    struct Pipes {
        query: [B, T, H, D] | key: [B, S, H, D]. value: [B | S | H | D];
        mask: causal,
    }
}

fn main() {}
