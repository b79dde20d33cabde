pub fn layer(query: [T, H, D]) {}
