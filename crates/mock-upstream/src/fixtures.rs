//! The recorded streams the mock replays (`fixtures/`, see its README), compiled into
//! the crate so the binary works from any directory, and how each is cut into frames.
//!
//! A `.sse` file is served byte for byte, cut after each blank line so that a delay
//! falls between frames. A `.chunks.jsonl` file holds one JSON payload per line and is
//! framed in the dialect of the endpoint that replays it: `data: <line>` and a final
//! `data: [DONE]` on Chat Completions, `event: <type>` + `data: <line>` on Messages.

use serde_json::Value;

use crate::Dialect;

/// Declares the embedded fixture table from paths relative to `fixtures/`.
macro_rules! fixtures {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../fixtures/", $path)))),*]
    };
}

/// The recorded streams, as `(path relative to fixtures/, contents)`.
const FIXTURES: &[(&str, &str)] = fixtures![
    "openai/azure-chat-content-filter.chunks.jsonl",
    "openai/chat-finish-length.sse",
    "openai/chat-parallel-tool-calls-obfuscation.sse",
    "openai/chat-parallel-tool-calls.sse",
    "openai/chat-refusal.sse",
    "openai/chat-text-usage-obfuscation.chunks.jsonl",
    "openai/chat-text-usage.sse",
    "openai/chat-tool-call.sse",
    "openai-compatible/deepseek-reasoning-content.chunks.jsonl",
    "openai-compatible/deepseek-reasoning-tool-call.chunks.jsonl",
    "openai-compatible/groq-midstream-error-event.sse",
    "openai-compatible/openrouter-midstream-error.sse",
    "openai-compatible/openrouter-reasoning.sse",
    "openai-compatible/xai-grok3mini-reasoning-tool-call.chunks.jsonl",
    "anthropic/messages-cache-creation-and-read-server-tool.chunks.jsonl",
    "anthropic/messages-cache-read-compaction.sse",
    "anthropic/messages-redacted-thinking.sse",
    "anthropic/messages-text-parallel-tool-use.sse",
    "anthropic/messages-text-then-tool-use.sdk-fixture.sse",
    "anthropic/messages-text.chunks.jsonl",
    "anthropic/messages-text.sse",
    "anthropic/messages-thinking-text.chunks.jsonl",
    "anthropic/messages-thinking-text.sse",
    "anthropic/messages-thinking-tool-use.sse",
    "anthropic/messages-tool-use-empty-input.sse",
];

/// The contents of the embedded fixture at `path` (relative to `fixtures/`, e.g.
/// `openai/chat-text-usage.sse`), or `None` if there is no such fixture.
pub fn fixture(path: &str) -> Option<&'static str> {
    FIXTURES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, text)| *text)
}

/// The paths of all embedded fixtures, relative to `fixtures/`.
pub fn fixture_paths() -> impl Iterator<Item = &'static str> {
    FIXTURES.iter().map(|(p, _)| *p)
}

/// The frames of fixture `path` as served in `dialect`, each with its terminating
/// blank line (except a raw file's last frame if the file lacks it).
pub(crate) fn fixture_frames(path: &str, dialect: Dialect) -> Option<Vec<String>> {
    let text = fixture(path)?;
    if path.ends_with(".chunks.jsonl") {
        let lines = text.lines().filter(|line| !line.trim().is_empty());
        let frames = match dialect {
            Dialect::ChatCompletions => lines
                .map(|line| format!("data: {line}\n\n"))
                .chain(["data: [DONE]\n\n".to_owned()])
                .collect(),
            Dialect::Messages => lines
                .map(|line| {
                    let kind = serde_json::from_str::<Value>(line)
                        .ok()
                        .and_then(|v| v.get("type")?.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "message".to_owned());
                    format!("event: {kind}\ndata: {line}\n\n")
                })
                .collect(),
        };
        Some(frames)
    } else {
        // Raw SSE: cut after each blank line so that a delay falls between frames.
        Some(text.split_inclusive("\n\n").map(str::to_owned).collect())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::Dialect;

    #[test]
    fn every_fixture_has_frames_ending_in_blank_lines() {
        for path in fixture_paths() {
            let dialect = if path.starts_with("anthropic/") {
                Dialect::Messages
            } else {
                Dialect::ChatCompletions
            };
            let frames = fixture_frames(path, dialect).unwrap_or_default();
            assert!(!frames.is_empty(), "{path}");
            if path.ends_with(".jsonl") {
                let last = frames.last().map(String::as_str);
                match dialect {
                    Dialect::ChatCompletions => assert_eq!(last, Some("data: [DONE]\n\n")),
                    Dialect::Messages => assert_eq!(
                        last,
                        Some("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
                        "{path}"
                    ),
                }
            } else {
                // Raw files are sent byte for byte.
                assert_eq!(frames.concat(), fixture(path).unwrap_or_default(), "{path}");
            }
            assert!(frames.concat().len() >= fixture(path).unwrap_or_default().len());
        }
    }

    #[test]
    fn raw_sse_frames_concatenate_to_the_file() {
        let path = "openai/chat-text-usage.sse";
        let frames = fixture_frames(path, Dialect::ChatCompletions).unwrap_or_default();
        assert_eq!(frames.concat(), fixture(path).unwrap_or_default());
        assert!(frames.iter().all(|f| f.ends_with("\n\n")));
        // The SDK fixture has no blank line after its last frame: sent as it is.
        let path = "anthropic/messages-text-then-tool-use.sdk-fixture.sse";
        let frames = fixture_frames(path, Dialect::Messages).unwrap_or_default();
        assert_eq!(
            frames.last().map(String::as_str),
            Some("event: message_stop\ndata: {\"type\":\"message_stop\"}")
        );
    }

    #[test]
    fn messages_chunks_are_named_by_their_type() {
        let frames =
            fixture_frames("anthropic/messages-text.chunks.jsonl", Dialect::Messages).unwrap();
        assert!(frames[0].starts_with("event: message_start\ndata: {\"type\":\"message_start\""));
        assert!(
            frames
                .iter()
                .any(|f| f == "event: ping\ndata: {\"type\":\"ping\"}\n\n")
        );
        assert!(frames.iter().all(|f| !f.contains("[DONE]")));
    }
}
