//! How the mock cuts what it streams: answer text into words, tool-call arguments into
//! fragments of a few characters (so fragments split keys and string values).

/// `text` as word pieces: `["one", " two", " three"]`.
pub(crate) fn word_pieces(text: &str) -> Vec<String> {
    text.split_whitespace()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect()
}

/// `text` in pieces of `n` characters.
pub(crate) fn pieces_of(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}
