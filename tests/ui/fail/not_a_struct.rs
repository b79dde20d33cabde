use attn::attention;

attention! {
    pub fn layer(query: [T, H, D]) {}
}

fn main() {}
