//! "Did you mean ..?" for misspelt names.

/// The candidate closest to `word` by edit distance (adjacent swaps count as one edit), if it is
/// close enough to be a plausible typo, or if one name is a prefix of the other (`dropout` for
/// `dropout_rate`).
pub fn nearest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word_lower = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for &candidate in candidates {
        let distance = edit_distance(&word_lower, candidate);
        let limit = (candidate.len().max(word.len()) / 3).max(1);
        let prefix = word_lower.len() >= 3
            && (candidate.starts_with(&word_lower) || word_lower.starts_with(candidate));
        if (distance <= limit || prefix) && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// adjacent characters each cost 1.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut table = vec![0usize; (a.len() + 1) * width];
    for (i, row) in table.chunks_mut(width).enumerate() {
        row[0] = i;
    }
    for (j, cell) in table.iter_mut().take(width).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (table[(i - 1) * width + j] + 1)
                .min(table[i * width + j - 1] + 1)
                .min(table[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(table[(i - 2) * width + j - 2] + 1);
            }
            table[i * width + j] = best;
        }
    }
    table[a.len() * width + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["dropout_rate", "broadcast_dropout", "dtype", "scale", "sow"];

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("dropuot", "dropout"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggests_typos_and_prefixes_only() {
        assert_eq!(nearest("dropout_rte", NAMES), Some("dropout_rate"));
        assert_eq!(nearest("dropout", NAMES), Some("dropout_rate"));
        assert_eq!(nearest("dtpye", NAMES), Some("dtype"));
        assert_eq!(nearest("Scale", NAMES), Some("scale"));
        assert_eq!(nearest("temperature", NAMES), None);
    }
}
