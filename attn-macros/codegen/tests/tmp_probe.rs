use std::str::FromStr;
#[test]
fn probe() {
    for src in [
        "struct L { query: [T, H, D], key: [S, H, D], mask: window(1,, 2) }",
        "struct L { query: [T, H, D], key: [S, H, D], mask: causal + window(,) + causal() }",
        "struct L { query: [T, H, D] | key: [S, H, D] . value: [S, H, D] }",
        "struct L { query: [T; H; D], key: [S | H | D], value: (S, H, D), dtype: torch.bfloat16 }",
        "struct L { query: [T, H, D], key: [S, H, D], mask: causal & kv_lengths + query_lengths(B) + segment_ids[B, T] + causal[bottom_right] }",
        "struct L { query: [T, H, D], key: [S, H, D], mask: causal(bottom_right) window(3, 0) }",
        "struct L { query: [T, H, D], key: [S, H, D], mask: causal, window(3, 0), [T, S], dtype: f32 }",
        "struct L { query: [B, T, H = 32, D], key: [B, S, G = 6, D], value: [B, S, G, D] }",
        "struct L { query: [B, T, H = 32, D], key: [B, S, G, D], value: [B, S, G, D], mask: causal(bottom_right) + window(7, 0) + kv_lengths + segment_ids }",
    ] {
        let tokens = proc_macro2::TokenStream::from_str(src).unwrap();
        println!("{src}");
        match attn_codegen::try_attention(tokens) {
            Ok(t) => println!("OK {}", t.to_string().len()),
            Err(e) => {
                for e in e {
                    let r = e.span().byte_range();
                    println!("   {:?} {:?}: {e}", r, &src.get(r.clone()));
                }
            }
        }
    }
}
