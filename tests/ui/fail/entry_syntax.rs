use attn::attention;

attention! {
    #[derive(Debug)]
    struct Layer {
        query [T, H, D],
        key = [S, H, D],
        , dtype: f32,
        mask:,
    }
}

fn main() {}
