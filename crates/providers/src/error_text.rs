//! How provider errors quote what went wrong: an error with its chain of sources, and
//! upstream text cut to a bounded length. Shared by the request side ([`crate::http`]),
//! the body reader ([`crate::sse`]) and each provider's stream parser.

/// An error and its sources, `outer: inner: …` (reqwest's own message alone is just
/// "error sending request for url (…)").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// At most `max` chars of `s`, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}
