use attn::attention;

attention! {
    struct Layer {
        query: [B, T, H = 8, D = 64],
        key: [B, S, H, 32],
    }
}

fn main() {}
