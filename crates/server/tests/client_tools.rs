//! Client tools in the engine (`StartRequest::client_tools`, `tool_results`, `prior`),
//! against the mock upstream with the real OpenAI and Anthropic providers: a model call
//! that asks for a client tool runs the server tools of the same call, then ends the job
//! `final` `complete` with the client's calls saved without output; the next job, whose
//! input is the client's results, sends a history the mock validates (every call
//! followed by its result) and answers with the results.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use genstream_engine::event::{ContentPart, EventBody, Final, FinalStatus, Message};
use genstream_engine::manager::{PriorTurn, StartRequest, ToolResult};
use genstream_engine::provider::ToolSpec;
use genstream_server::{AppState, Config};
use serde_json::json;

#[derive(Clone, Copy, Debug)]
enum Kind {
    OpenAi,
    Anthropic,
}

const MODEL: &str = "tools?calls=1";

async fn state(kind: Kind, base_url: &str) -> AppState {
    let kind = match kind {
        Kind::OpenAi => "openai",
        Kind::Anthropic => "anthropic",
    };
    let config = json!({
        "bind": "127.0.0.1:0",
        "store": "memory",
        "database": "sqlite::memory:",
        "auth": {"jwt_secret": "client-tools-test-secret-0123456789abcdef"},
        "limits": {"concurrent_per_user": 0, "messages_per_user_per_minute": 0,
            "messages_per_ip_per_minute": 0},
        "providers": {"mock": {"kind": kind, "base_url": base_url,
            "retry": {"max_retries": 0},
            "timeouts": {"connect": "5s", "first_byte": "20s", "idle": "20s"}}},
        "models": [{"name": MODEL, "provider": "mock", "tools": ["calculator"],
            "options": {"model": MODEL}}],
    });
    let config: Config = serde_json::from_value(config).expect("config");
    genstream_server::serve::build_state(&config)
        .await
        .expect("build_state")
        .0
}

fn weather() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: "The weather in a city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}),
    }
}

/// The job's `final` event, once its log has ended.
async fn final_of(state: &AppState, stream_id: &str) -> Final {
    let (_, log) = state.manager.job_for("alice", stream_id).await.unwrap();
    let mut rx = log.watch();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            rx.borrow_and_update();
            if log.terminal().is_some() {
                break;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the job ends");
    match log.terminal_event().unwrap().body {
        EventBody::Final(f) => f,
        other => panic!("not a final event: {other:?}"),
    }
}

fn calls_of(m: &Message) -> Vec<(String, String, Option<String>)> {
    m.content
        .iter()
        .filter_map(|p| match p {
            ContentPart::ToolCall { tool_call } => Some((
                tool_call.id.clone(),
                tool_call.name.clone(),
                tool_call.output.clone(),
            )),
            _ => None,
        })
        .collect()
}

async fn round_trip(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let state = state(kind, &mock.base_url()).await;
    let started = state
        .manager
        .start(StartRequest {
            user_id: "alice".into(),
            text: "weather and sums".into(),
            model: Some(MODEL.into()),
            client_tools: vec![weather()],
            ..Default::default()
        })
        .await
        .unwrap();
    let fin = final_of(&state, &started.stream_id).await;
    assert_eq!(fin.status, FinalStatus::Complete, "{fin:?}");
    assert_eq!(fin.reason, None);
    // One model call: the server's calculator ran, the client's call is handed over.
    let calls = calls_of(&fin.response_message);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (calc_id, calc_name, calc_out) = &calls[0];
    assert_eq!(calc_name, "calculator");
    let calc_out = calc_out.clone().expect("the server tool ran");
    let (client_id, client_name, client_out) = &calls[1];
    assert_eq!(
        (client_name.as_str(), client_out),
        ("get_weather", &None),
        "{kind:?}"
    );
    assert_ne!(calc_id, client_id);
    assert_eq!(mock.requests_for(MODEL).len(), 1, "no second model call");
    let saved = state
        .manager
        .db()
        .get_message(&started.response_message_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(calls_of(&saved), calls, "saved as sent");

    // The client's result continues the conversation.
    let next = state
        .manager
        .start(StartRequest {
            user_id: "alice".into(),
            conversation_id: Some(started.conversation_id.clone()),
            parent_message_id: Some(started.response_message_id.clone()),
            model: Some(MODEL.into()),
            client_tools: vec![weather()],
            tool_results: vec![ToolResult {
                call_id: client_id.clone(),
                output: "sunny".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let fin = final_of(&state, &next.stream_id).await;
    assert_eq!(fin.status, FinalStatus::Complete, "{fin:?}");
    assert_eq!(
        fin.response_message.text,
        format!("The tools said: {calc_out}; sunny."),
        "{kind:?}"
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let user = state
        .manager
        .db()
        .get_message(&next.user_message_id)
        .await
        .unwrap()
        .unwrap();
    assert!(user.is_created_by_user && user.text.is_empty());
    assert_eq!(
        user.parent_message_id.as_deref(),
        Some(started.response_message_id.as_str())
    );

    // The same turns carried by the request itself (Chat Completions style) in a new
    // conversation give the same upstream history and answer.
    let carried = state
        .manager
        .start(StartRequest {
            user_id: "alice".into(),
            model: Some(MODEL.into()),
            client_tools: vec![weather()],
            prior: vec![
                PriorTurn::User("weather and sums".into()),
                PriorTurn::Assistant {
                    text: String::new(),
                    tool_calls: fin_calls(&saved),
                },
            ],
            tool_results: vec![ToolResult {
                call_id: client_id.clone(),
                output: "rainy".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let fin = final_of(&state, &carried.stream_id).await;
    assert_eq!(
        fin.response_message.text,
        format!("The tools said: {calc_out}; rainy.")
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
    let all = state
        .manager
        .db()
        .list_messages(&carried.conversation_id)
        .await
        .unwrap();
    assert_eq!(all.len(), 4, "user, assistant, results, answer");
}

fn fin_calls(m: &Message) -> Vec<genstream_engine::event::ToolCall> {
    m.content
        .iter()
        .filter_map(|p| match p {
            ContentPart::ToolCall { tool_call } => Some(tool_call.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn client_tools_round_trip_openai() {
    round_trip(Kind::OpenAi).await;
}

#[tokio::test]
async fn client_tools_round_trip_anthropic() {
    round_trip(Kind::Anthropic).await;
}

/// A client tool named like a server tool is refused: the model could not tell them
/// apart.
#[tokio::test]
async fn a_client_tool_may_not_shadow_a_server_tool() {
    let mock = genstream_mock_upstream::spawn().await;
    let state = state(Kind::OpenAi, &mock.base_url()).await;
    let err = state
        .manager
        .start(StartRequest {
            user_id: "alice".into(),
            text: "hi".into(),
            model: Some(MODEL.into()),
            client_tools: vec![ToolSpec {
                name: "calculator".into(),
                ..weather()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("calculator"), "{err}");
}

/// The same round trip through both `/v1` APIs: the client gets its call (Chat
/// Completions `finish_reason: "tool_calls"`, a Responses `function_call` item), sends
/// the result, and the model's answer quotes it.
async fn v1_round_trip(kind: Kind) {
    let mock = genstream_mock_upstream::spawn().await;
    let state = state(kind, &mock.base_url()).await;
    let token = state.auth.mint("alice", Duration::from_secs(600)).unwrap();
    let served =
        genstream_test_support::Served::start(genstream_server::app(state.clone(), 1 << 20)).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        let req = http
            .post(format!("{}{path}", served.url))
            .bearer_auth(&token)
            .json(&body);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let chat_tool = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "The weather in a city", "parameters": weather().parameters}}]);

    // Chat Completions.
    let user = json!({"role": "user", "content": "weather and sums"});
    let first = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [user], "tools": chat_tool}),
    )
    .await;
    let choice = &first["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{kind:?} {first}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "only the client's call: {first}");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    let call_id = calls[0]["id"].as_str().unwrap();
    let second = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "tools": chat_tool, "messages": [user, choice["message"],
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"}]}),
    )
    .await;
    assert_eq!(second["choices"][0]["finish_reason"], "stop");
    // The server's calculator call is not the client's to see, so its history holds
    // only the client's call and result.
    assert_eq!(
        second["choices"][0]["message"]["content"],
        "The tools said: sunny."
    );

    // Responses, continued with previous_response_id.
    let first = post(
        "/v1/responses",
        json!({"model": MODEL, "input": "weather and sums", "tools": [{"type": "function",
            "name": "get_weather", "parameters": weather().parameters}]}),
    )
    .await;
    assert_eq!(first["status"], "completed", "{first}");
    let output = first["output"].as_array().unwrap();
    let mcp = output.iter().find(|i| i["type"] == "mcp_call").unwrap();
    assert_eq!(mcp["name"], "calculator");
    let calc_out = mcp["output"].as_str().unwrap();
    let call = output
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap();
    assert_eq!(call["name"], "get_weather");
    let second = post(
        "/v1/responses",
        json!({"model": MODEL, "previous_response_id": first["id"], "input": [
            {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]}),
    )
    .await;
    assert_eq!(second["status"], "completed", "{second}");
    assert_eq!(
        second["output"][0]["content"][0]["text"],
        format!("The tools said: {calc_out}; sunny.").as_str()
    );
    assert!(mock.rejected().is_empty(), "{:?}", mock.rejected());
}

#[tokio::test]
async fn v1_client_tools_round_trip_openai() {
    v1_round_trip(Kind::OpenAi).await;
}

#[tokio::test]
async fn v1_client_tools_round_trip_anthropic() {
    v1_round_trip(Kind::Anthropic).await;
}
