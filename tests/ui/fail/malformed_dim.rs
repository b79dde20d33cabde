use attn::attention;

attention! {
    struct Layer {
        query: [B, T + 1, H = 12.5, D = N],
        key: [B, , H, 1.5],
        value: [B, S, H, -4],
    }
}

fn main() {}
