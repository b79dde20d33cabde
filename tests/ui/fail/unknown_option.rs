use attn::attention;

attention! {
    struct Layer {
        query: [T, H, D],
        key: [S, H, D],
        dropout: 0.1,
        broadcast_dropuot: false,
        num_heads: 8,
        deterministic: true,
        temperature: 2.0,
    }
}

fn main() {}
