//! What every upstream test needs, whatever the wire: a provider of the wire's kind
//! built from config and pointed at the mock upstream, a one-message request, and a
//! [`Summary`] of what a stream added up to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use genstream_engine::provider::{
    ChatMessage, ModelRequest, Provider, ProviderError, ProviderEvent, Role,
};
use genstream_engine::usage::UsageRecord;
use genstream_mock_upstream::{MockUpstream, RecordedRequest};
use genstream_providers::{ModelOptions, ProviderConfig, build, kind_of};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub type Item = Result<ProviderEvent, ProviderError>;

/// One wire protocol under test: how to configure its provider, how to read its
/// recordings, and the recordings and answers each shared behaviour expects of it
/// (see `suite.rs`).
pub struct Wire {
    /// The provider kind in the config: `openai` or `anthropic`.
    pub kind: &'static str,
    /// The `[providers]` key the tests configure; usage records name it.
    pub name: &'static str,
    /// Whether the wire has signed and redacted reasoning blocks (Messages) — on a wire
    /// without them such an event is a bug.
    pub signed_reasoning: bool,
    /// The concatenation of the string field `field` of every delta over a fixture,
    /// computed straight from the file.
    pub fixture_deltas: fn(path: &str, field: &str) -> String,
    /// The delta field that carries answer text.
    pub text_field: &'static str,
    /// Text and usage from a recorded stream.
    pub text: TextCase,
    /// Recorded streams with reasoning before the text.
    pub reasoning: &'static [ReasoningCase],
    /// One tool call whose arguments come in fragments that split keys and values.
    pub split_call: ToolCase,
    /// Several tool calls in one turn.
    pub parallel_calls: ToolCase,
    /// Reasoning, then a tool call.
    pub reasoning_then_call: ToolCase,
    /// An error the upstream reports inside a 200 stream, after some text.
    pub in_stream_error: InStreamErrorCase,
    /// Statuses that carry `Retry-After: 1`, each with what the error message quotes.
    pub retry_after_statuses: &'static [(u16, &'static str)],
    /// What the error message of a 400 quotes.
    pub status_400_says: &'static str,
    /// What the error message of an unknown model's 404 quotes.
    pub unknown_model_says: &'static str,
    /// What the `Truncated` error of a stream without its terminator names.
    pub truncated_names: &'static str,
    /// The environment variable the missing-key test names (unset).
    pub unset_key_var: &'static str,
    /// The variable the key test's child process gets, and its value.
    pub key_var: (&'static str, &'static str),
    /// Checks the auth headers of a request sent with the key of `key_var`.
    pub check_key_headers: fn(&RecordedRequest),
}

/// A text answer from a recorded stream.
pub struct TextCase {
    pub path: &'static str,
    /// Strings the recording holds, which make the test worth its name.
    pub fixture_holds: &'static [&'static str],
    pub starts_with: &'static str,
    pub finish: &'static str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub input_includes_cache: bool,
}

/// Reasoning then text from a recorded stream.
pub struct ReasoningCase {
    pub path: &'static str,
    /// The delta field that carries reasoning in this recording.
    pub reasoning_field: &'static str,
    /// Checks the call's usage.
    pub check_usage: fn(&UsageRecord),
}

/// Tool calls from a recorded stream.
pub struct ToolCase {
    pub path: &'static str,
    /// How the recording ends, when that is what the test is about.
    pub fixture_ends_with: Option<&'static str>,
    pub order: &'static str,
    pub text: &'static str,
    pub finish: &'static str,
    /// `(index, id, name, arguments as JSON)`, in index order.
    pub calls: &'static [(u32, &'static str, &'static str, &'static str)],
    /// `(input, output)` tokens, when the test checks them.
    pub tokens: Option<(u64, u64)>,
}

/// An error inside a 200 stream, after some text.
pub struct InStreamErrorCase {
    pub model: &'static str,
    pub text: &'static str,
    pub status: Option<u16>,
    pub says: &'static str,
}

impl Wire {
    /// A provider of this wire on `base_url` (written with a trailing slash, as users
    /// write it) with the model options `options`, reading its key from `api_key_env`.
    pub fn provider(
        &self,
        base_url: &str,
        options: Value,
        api_key_env: Option<&str>,
    ) -> Arc<dyn Provider> {
        let mut config = json!({"kind": self.kind, "base_url": format!("{base_url}/")});
        if let Some(env) = api_key_env {
            config["api_key_env"] = json!(env);
        }
        self.build(config, options)
    }

    /// A provider for upstream model `model` on `mock`, no key.
    pub fn for_model(&self, mock: &MockUpstream, model: &str) -> Arc<dyn Provider> {
        self.provider(&mock.base_url(), json!({"model": model}), None)
    }

    /// A provider on `mock` with short first-byte and idle timeouts (400 ms each).
    pub fn impatient(&self, mock: &MockUpstream, model: &str) -> Arc<dyn Provider> {
        self.build(
            json!({
                "kind": self.kind,
                "base_url": mock.base_url(),
                "timeouts": {"connect": "1s", "first_byte": "400ms", "idle": "400ms"},
            }),
            json!({"model": model}),
        )
    }

    /// A provider from its `[providers.NAME]` section and model options, both written
    /// as the config file would have them.
    fn build(&self, config: Value, options: Value) -> Arc<dyn Provider> {
        let config: ProviderConfig = serde_json::from_value(config).unwrap();
        let providers = BTreeMap::from([(self.name.to_owned(), config)]);
        let kind = kind_of(self.name, &providers).unwrap();
        let options = ModelOptions::deserialize_for(kind, options).unwrap();
        build(self.name, &providers, &options).unwrap()
    }

    /// Runs one attempt against upstream model `model` and collects everything.
    pub async fn run(&self, mock: &MockUpstream, model: &str) -> Result<Vec<Item>, ProviderError> {
        let stream = self
            .for_model(mock, model)
            .stream(request("hello"), CancellationToken::new())
            .await?;
        Ok(
            tokio::time::timeout(Duration::from_secs(20), stream.collect())
                .await
                .unwrap(),
        )
    }

    /// Replays fixture `path` and sums it up.
    pub async fn fixture_run(&self, mock: &MockUpstream, path: &str) -> Summary {
        self.summarize(self.run(mock, &format!("fixture:{path}")).await.unwrap())
    }

    /// What `items` added up to; panics on an item after the end, on usage reported
    /// twice, and on a signed or redacted reasoning block on a wire without them.
    pub fn summarize(&self, items: Vec<Item>) -> Summary {
        let mut s = Summary::default();
        let push = |order: &mut String, c: char| {
            if !order.ends_with(c) {
                order.push(c);
            }
        };
        for item in items {
            assert!(
                s.error.is_none() && s.finish.is_none(),
                "item after the end: {item:?}"
            );
            match item {
                Ok(ProviderEvent::Text(t)) => {
                    s.text.push_str(&t);
                    push(&mut s.order, 't');
                }
                Ok(ProviderEvent::Reasoning(t)) => {
                    s.reasoning.push_str(&t);
                    push(&mut s.order, 'r');
                }
                Ok(
                    other @ (ProviderEvent::ReasoningSignature(_)
                    | ProviderEvent::RedactedReasoning(_)),
                ) if !self.signed_reasoning => {
                    panic!("not a {} event: {other:?}", self.kind)
                }
                Ok(ProviderEvent::ReasoningSignature(sig)) => s.signatures.push(sig),
                Ok(ProviderEvent::RedactedReasoning(data)) => s.redacted.push(data),
                Ok(ProviderEvent::ToolCall {
                    index,
                    id,
                    name,
                    args,
                }) => {
                    let call = s.tools.entry(index).or_default();
                    if let Some(id) = id {
                        call.0 = id;
                    }
                    if let Some(name) = name {
                        call.1 = name;
                    }
                    call.2.push_str(&args);
                    push(&mut s.order, 'c');
                }
                Ok(ProviderEvent::Usage(u)) => {
                    assert!(s.usage.is_none(), "usage reported twice");
                    s.usage = Some(u);
                    push(&mut s.order, 'u');
                }
                Ok(ProviderEvent::Finish(f)) => {
                    s.finish = Some(f);
                    push(&mut s.order, 'f');
                }
                Err(e) => {
                    s.error = Some(e);
                    push(&mut s.order, 'e');
                }
            }
        }
        s
    }
}

/// A user message.
pub fn user(text: &str) -> ChatMessage {
    ChatMessage {
        role: Role::User,
        text: text.into(),
        tool_calls: vec![],
        tool_call_id: None,
        reasoning: vec![],
    }
}

/// A request of one user message, for model `configured-name`.
pub fn request(text: &str) -> ModelRequest {
    ModelRequest {
        model: "configured-name".into(),
        system_prompt: None,
        messages: vec![user(text)],
        tools: vec![],
        call_index: 0,
    }
}

/// What a stream added up to.
#[derive(Debug, Default)]
pub struct Summary {
    pub text: String,
    pub reasoning: String,
    pub signatures: Vec<String>,
    pub redacted: Vec<String>,
    /// index → (id, name, args)
    pub tools: BTreeMap<u32, (String, String, String)>,
    pub usage: Option<UsageRecord>,
    pub finish: Option<String>,
    pub error: Option<ProviderError>,
    /// One letter per run of events of a kind: r(easoning) t(ext) c(all) u(sage)
    /// f(inish) e(rror).
    pub order: String,
}
