//! The `decode_heatmap` example writes a PNG that decodes, with one panel per head, and its
//! pixels show the causal structure of the sown weights.

#[path = "../examples/decode_heatmap.rs"]
#[allow(dead_code)]
mod example;

#[test]
fn the_example_writes_a_png_that_decodes() {
    let out = std::env::temp_dir().join(format!("attn_decode_heatmap_{}.png", std::process::id()));
    let run = example::run(&example::default_checkpoint(), 5, &out).expect("the example runs");
    assert_eq!((run.heads, run.prompt, run.decoded), (2, 7, 5));
    assert_eq!(run.latencies.len(), 5);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a PNG header");
    let info = reader.info();
    // 2 panels of 12 slots x 12 px, a 12 px gap; 12 rows of 12 px.
    assert_eq!((info.width, info.height), (2 * 12 * 12 + 12, 12 * 12));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).expect("the image data");
    let px = |x: usize, y: usize| {
        let i = (y * frame.width as usize + x) * 3;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    // Row 0 (the first query) sees only slot 0: weight 1 there (the brightest colour), 0
    // after it (the darkest); the gap between the panels is white.
    assert_eq!(px(6, 6), [252, 255, 164]);
    assert_eq!(px(11 * 12 + 6, 6), [13, 8, 48]);
    assert_eq!(px(12 * 12 + 6, 6), [255, 255, 255]);
    std::fs::remove_file(&out).ok();
}
