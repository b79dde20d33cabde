use attn::attention;

attention! {
    struct Empty {
        query: [B, T, H = 0, D = 64],
        key: [B, S, H, 0],
    }
}

fn main() {}
