//! The OpenAPI 3.1 document of the API (`GET /openapi.json`) and its browsable
//! reference (`GET /docs`, Scalar).
//!
//! The document is generated from the code: every handler carries a
//! `#[utoipa::path]` annotation, and [`crate::api_router`] registers handlers only
//! through utoipa-axum's `routes!`, which takes the path and the methods from that
//! annotation, so a route cannot be served without being described. The web app's
//! routes (`/`, `/c/{id}`, `/assets/…`, `ui.rs`) are left out on purpose: they answer
//! HTML and files, not the API. `GET /metrics` is described although it is added by
//! `serve.rs` (on the main port, or on `metrics_bind`).
//!
//! The answer types below are what the handlers serialize, so their schemas are
//! their wire shapes; where an answer holds an engine type (`Message`, `UsageTotals`,
//! `Pricing`, `JobStatus`: the engine knows nothing of HTTP, so they carry no schema)
//! the field names a schema-only twin here (`value_type`), and so do the answers built
//! elsewhere (the `/v1` objects from `genstream-protocols`, `POST /api/chat`'s). The
//! twins are kept honest by `crates/genstream/tests/fuzz.rs`, which checks every
//! answer of the real binary against this document.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use genstream_engine::{billing, event, store, usage};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, ToSchema};

/// The document's fixed parts: info, tags, security schemes. The paths come from the
/// router ([`document`]).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "genstream",
        description = "LLM chat generations as durable background jobs: start a chat, \
            follow its event stream from any replica, resume it exactly, abort it. \
            Native routes under `/api` (docs/protocol.md), OpenAI-compatible ones under \
            `/v1`, the Vercel AI SDK's under `/api/ai`. Errors are \
            `{\"error\": {\"code\", \"message\"}}` on `/api` and OpenAI's \
            `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` on `/v1`. \
            The web app's pages (`/`, `/c/{id}`, `/assets/…`) are not part of this document."
    ),
    modifiers(&Security),
    // The error shapes are referenced by `ApiErrors` and `OpenAiErrors`, which do not
    // register them.
    components(schemas(ErrorBody, ErrorDetail, OpenAiErrorBody, OpenAiErrorDetail)),
    security(("bearer" = [])),
    tags(
        (name = "chat", description = "genstream's native chat jobs and their event streams"),
        (name = "conversations", description = "Saved conversations and messages"),
        (name = "account", description = "Models, balance and usage of the caller"),
        (name = "openai", description = "OpenAI-compatible Chat Completions and Responses"),
        (name = "ai-sdk", description = "The Vercel AI SDK's `useChat` transport"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
pub struct ApiDoc;

/// The security schemes: `bearer` (a JWT, HS256 with the server's secret, or an API
/// key `gsk_…`), and `access_token` (the same token in the query, for the event
/// stream, since a browser's EventSource cannot set headers).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or gsk_ API key")
                    .description(Some(
                        "`Authorization: Bearer <token>`: a JWT (HS256, the user is its \
                         `sub`) or an API key (`gsk_` and 64 hex digits).",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "access_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "access_token",
                "The same token in the query, for `GET /api/chat/stream/{stream_id}` \
                 (an EventSource cannot send headers).",
            ))),
        );
    }
}

/// The whole document: [`ApiDoc`] with the paths of [`crate::api_router`] and of
/// `GET /metrics`. Built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        let mut doc = crate::api_router().into_openapi();
        doc.merge(crate::observe::metrics_openapi());
        doc
    });
    &DOC
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
        content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Response {
    static JSON: LazyLock<String> =
        LazyLock::new(|| serde_json::to_string(document()).unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], JSON.as_str()).into_response()
}

/// Scalar's page (utoipa-scalar's template) with its script pinned to one release and
/// checked by Subresource Integrity: the CDN cannot serve the reader another script.
/// The hash is SHA-384 of `dist/browser/standalone.js` in the npm package
/// `@scalar/api-reference@1.76.4` (what jsDelivr serves under that path).
const SCALAR_HTML: &str = r#"<!doctype html>
<html>
<head>
    <title>$title</title>
    <meta charset="utf-8"/>
    <meta name="viewport" content="width=device-width, initial-scale=1"/>
</head>
<body>
<script id="api-reference" type="application/json">
    $spec
</script>
<script src="https://cdn.jsdelivr.net/npm/@scalar/api-reference@1.76.4/dist/browser/standalone.js"
        integrity="sha384-hwB9WroDTpZaI38gr+u9CXA6ksz5gUYgD2GxXazKl/agT1L2GWUiRFWGJYNiFu4Q"
        crossorigin="anonymous"></script>
</body>
</html>
"#;

/// `GET /docs`: the reference, rendered by Scalar from the document (the page embeds
/// the document; the browser loads Scalar's script, pinned and integrity-checked, from
/// jsDelivr, so the page needs internet access in the reader's browser).
#[utoipa::path(get, path = "/docs", tag = "operations", security(()),
    responses((status = 200, description = "An HTML page rendering this document (Scalar)",
        content_type = "text/html", body = String)))]
pub async fn docs() -> Html<&'static str> {
    static HTML: LazyLock<String> = LazyLock::new(|| {
        utoipa_scalar::Scalar::new(document().clone())
            .custom_html(SCALAR_HTML)
            .title("genstream API")
            .to_html()
    });
    Html(HTML.as_str())
}

// --- request headers -----------------------------------------------------------------

/// The `Idempotency-Key` request header of the job-starting routes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Header)]
pub struct IdempotencyKey {
    /// Optional. A repeat with the same key and the same user within 24 h attaches to
    /// the same job instead of starting another; the same key with a different body
    /// is a 422.
    #[serde(rename = "Idempotency-Key")]
    #[allow(dead_code)]
    idempotency_key: Option<String>,
}

// --- errors ---------------------------------------------------------------------------

/// genstream's error answer on `/api` and the operations routes.
#[derive(ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `invalid_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `conversation_busy`, `job_finished`,
    /// `payload_too_large`, `cursor_out_of_range`, `rate_limited`,
    /// `too_many_concurrent`, `insufficient_balance`, `server_busy`, `shutting_down`,
    /// `store_unavailable`, `database_unavailable`, `upstream_error`, `internal`.
    pub code: String,
    /// What went wrong, naming the field of a 400.
    pub message: String,
    /// `too_many_concurrent`: the caller's limit of running jobs.
    pub limit: Option<u32>,
    /// `insufficient_balance`: the caller's balance, in credits.
    pub balance: Option<f64>,
}

/// OpenAI's error answer, on `/v1`.
#[derive(ToSchema)]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

/// The error itself, in OpenAI's shape.
#[derive(ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error` (400, 404, 409, 413, 422), `authentication_error`
    /// (401), `insufficient_quota` (402), `permission_error` (403),
    /// `rate_limit_error` (429), `server_error` (5xx).
    #[schema(rename = "type")]
    pub kind: String,
    /// The request parameter a 400 is about (`messages[2].content`), else null.
    pub param: Option<String>,
    /// genstream's code, as in [`ErrorDetail::code`].
    pub code: String,
}

/// The error answers of the `/api` routes (the status decides the code: error.rs).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ApiErrors {
    /// A body or parameter that is not valid: `invalid_request`, `cursor_out_of_range`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// No token, or a token that is expired, badly signed or unknown.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The balance is below what a chat needs: `insufficient_balance`.
    #[response(status = 402)]
    PaymentRequired(ErrorBody),
    /// Another user's conversation or job.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such job, conversation or route.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `conversation_busy` or `job_finished`.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A body over `http.max_body_bytes`.
    #[response(status = 413)]
    PayloadTooLarge(ErrorBody),
    /// The same `Idempotency-Key` with a different body.
    #[response(status = 422)]
    Unprocessable(ErrorBody),
    /// `rate_limited` (with `Retry-After`) or `too_many_concurrent`.
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// A bug.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// `server_busy`, `shutting_down`, `store_unavailable`, `database_unavailable`.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The error answers of the `/v1` routes, in OpenAI's shape.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum OpenAiErrors {
    /// A body or parameter that is not valid, or one genstream cannot honour.
    #[response(status = 400)]
    BadRequest(OpenAiErrorBody),
    /// No token, or a token that is expired, badly signed or unknown.
    #[response(status = 401)]
    Unauthorized(OpenAiErrorBody),
    /// The balance is below what a request needs.
    #[response(status = 402)]
    PaymentRequired(OpenAiErrorBody),
    /// Another user's response or completion.
    #[response(status = 403)]
    Forbidden(OpenAiErrorBody),
    /// No such model, response, completion or route.
    #[response(status = 404)]
    NotFound(OpenAiErrorBody),
    /// A conflict with the job's state.
    #[response(status = 409)]
    Conflict(OpenAiErrorBody),
    /// A body over `http.max_body_bytes`.
    #[response(status = 413)]
    PayloadTooLarge(OpenAiErrorBody),
    /// The same `Idempotency-Key` with a different body.
    #[response(status = 422)]
    Unprocessable(OpenAiErrorBody),
    /// `rate_limited` (with `Retry-After`) or `too_many_concurrent`.
    #[response(status = 429)]
    TooManyRequests(OpenAiErrorBody),
    /// A bug, or a job that failed other than upstream.
    #[response(status = 500)]
    Internal(OpenAiErrorBody),
    /// The job failed because its upstream did (non-streaming answers).
    #[response(status = 502)]
    BadGateway(OpenAiErrorBody),
    /// The server is busy, shutting down, or its store or database is unavailable.
    #[response(status = 503)]
    Unavailable(OpenAiErrorBody),
}

// --- native answers -------------------------------------------------------------------

/// A job's lifecycle.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum JobStatus {
    Running,
    Complete,
    Aborted,
    Error,
}

/// `POST /api/chat`: the started job.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct Started {
    /// The job's stream: `GET /api/chat/stream/{streamId}`.
    pub stream_id: String,
    pub conversation_id: String,
    pub user_message_id: String,
    /// The id the answer will be saved under.
    pub response_message_id: String,
    /// Always `started`.
    pub status: String,
}

/// `GET /api/chat/active`: the caller's running jobs.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(rename_all = "camelCase")]
pub struct ActiveJobs {
    pub active_job_ids: Vec<String>,
    pub jobs: Vec<ActiveJob>,
}

/// One running job.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActiveJob {
    pub stream_id: String,
    pub conversation_id: String,
    #[schema(value_type = JobStatus)]
    pub status: store::JobStatus,
    /// RFC 3339.
    pub created_at: String,
}

/// `GET /api/chat/status/{conversation_id}`: the conversation's latest job, if its
/// log is still kept (`{"active": false}` alone when there is none).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStatusAnswer {
    /// True while the job runs.
    pub active: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<JobStatus>)]
    pub status: Option<store::JobStatus>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The answer so far, folded from the log (docs/protocol.md §3: `runSteps`,
    /// `aggregatedContent`, `status`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub resume_state: Option<genstream_engine::aggregate::ResumeState>,
}

/// `POST /api/chat/abort`: the partial answer as saved and the usage spent.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Aborted {
    pub success: bool,
    /// The aborted job's stream id.
    pub aborted: String,
    #[schema(value_type = Message)]
    pub response_message: event::Message,
    #[schema(value_type = UsageTotals)]
    pub usage: usage::UsageTotals,
}

/// A saved message, the user's or the assistant's.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct Message {
    pub message_id: String,
    pub conversation_id: String,
    /// Null for the first message of a conversation.
    pub parent_message_id: Option<String>,
    /// `User` for the user, the model's name for the assistant.
    pub sender: String,
    pub text: String,
    /// The answer's parts: `{type: "text", text}`, `{type: "think", think}`,
    /// `{type: "tool_call", tool_call: {id, name, args, output}}`, …
    pub content: Vec<Object>,
    pub is_created_by_user: bool,
    #[schema(required = false)]
    pub model: Option<String>,
    /// A partial answer (aborted, stalled, failed mid-stream).
    pub unfinished: bool,
    /// The generation ended with an error.
    pub error: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// A job's usage, summed over its model calls.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct UsageTotals {
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_read_tokens: u64,
    pub reasoning_tokens: u64,
    /// Model calls summed.
    pub calls: u32,
    /// Credits spent (1 credit = 1e-6 USD).
    pub credits: f64,
}

/// `GET /api/conversations`: the caller's conversations, most recently updated first.
#[derive(ToSchema)]
pub struct Conversations {
    pub conversations: Vec<Conversation>,
}

/// A conversation.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct Conversation {
    pub conversation_id: String,
    /// The owner.
    pub user_id: String,
    /// The first 50 characters of the first message.
    pub title: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; bumped by every saved message.
    pub updated_at: String,
}

/// `GET /api/conversations/{id}/messages`: the saved messages, oldest first.
#[derive(ToSchema)]
pub struct Messages {
    pub messages: Vec<Message>,
}

/// `DELETE /api/conversations/{id}`.
#[derive(Serialize, ToSchema)]
pub struct Deleted {
    /// False when there was nothing to delete.
    pub deleted: bool,
}

/// `GET /api/models`: the configured models, the default first.
#[derive(Serialize, ToSchema)]
pub struct Models {
    pub models: Vec<Model>,
}

/// A configured model.
#[derive(Serialize, ToSchema)]
pub struct Model {
    pub name: String,
    /// The configured provider's name (`[providers.NAME]`, or `demo`).
    pub provider: String,
    /// The wire protocol the provider speaks.
    pub kind: String,
    /// The server-side tools the model may call.
    pub tools: Vec<String>,
    /// Null when the model costs nothing.
    #[schema(value_type = Option<Pricing>)]
    pub pricing: Option<billing::Pricing>,
    pub free: bool,
}

/// A model's prices, in USD per million tokens.
#[derive(ToSchema)]
pub struct Pricing {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_write_per_mtok: f64,
    pub cache_read_per_mtok: f64,
    /// Reasoning tokens at this rate instead of the output rate, when set.
    #[schema(required = false)]
    pub reasoning_per_mtok: Option<f64>,
}

/// `GET /api/balance`.
#[derive(Serialize, ToSchema)]
pub struct Balance {
    /// Credits (1 credit = 1e-6 USD); null when balances are off.
    pub balance: Option<f64>,
}

/// `GET /api/usage`.
#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    /// `conversation`, `day` or `month`.
    pub by: String,
    pub usage: Vec<UsageRow>,
}

/// The caller's usage in one conversation, day or month.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageRow {
    /// The conversation id, or the day's or month's start (RFC 3339 UTC,
    /// `2025-01-02T00:00:00.000Z`).
    pub key: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cache_write_tokens: i64,
    pub cache_read_tokens: i64,
    /// Model calls.
    pub calls: i64,
    /// Credits spent (1 credit = 1e-6 USD).
    pub credits: f64,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
}

/// `GET /readyz`: `ok`, or what failed, for each dependency.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub store: String,
    pub database: String,
}

// --- request bodies (read by hand: their schemas) --------------------------------------

/// `POST /api/ai/chat`: what the AI SDK's `DefaultChatTransport` sends. Unknown fields
/// are ignored.
#[derive(ToSchema)]
#[schema(rename_all = "camelCase")]
pub struct AiChatBody {
    /// The chat id, which is the conversation id: 1–128 characters of `[A-Za-z0-9_-]`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,128}$")]
    pub id: String,
    /// UI messages (`{id, role, parts: [{type: "text", text}]}`); the last user
    /// message's text parts are the prompt.
    pub messages: Vec<Object>,
    /// `submit-message` (default) or `regenerate-message`.
    #[schema(required = false, pattern = "^(submit-message|regenerate-message)$")]
    pub trigger: Option<String>,
    /// With `regenerate-message`: the answer to regenerate (default: the latest).
    #[schema(required = false)]
    pub message_id: Option<String>,
    /// The model (default: the first configured).
    #[schema(required = false)]
    pub model: Option<String>,
}

/// `POST /v1/chat/completions`. Unknown fields and sampling parameters are ignored;
/// `n` other than 1, `logprobs`, `top_logprobs`, `audio`, `prediction`, `modalities`
/// other than text, `response_format` other than text, `tool_choice` other than
/// `auto`/`none` and `parallel_tool_calls: false` are 400s naming them.
#[derive(ToSchema)]
pub struct ChatCompletionRequest {
    /// A configured model's name.
    pub model: String,
    /// The conversation: `{role: system|developer|user|assistant|tool, content, …}`.
    pub messages: Vec<Object>,
    #[schema(required = false)]
    pub stream: Option<bool>,
    /// `{include_usage: bool}`.
    #[schema(required = false)]
    pub stream_options: Option<Object>,
    /// Function tools the client runs: `{type: "function", function: {name, …}}`.
    #[schema(required = false)]
    pub tools: Option<Vec<Object>>,
    /// `auto` or `none`.
    #[schema(required = false)]
    pub tool_choice: Option<String>,
}

/// `POST /v1/responses`. Unknown fields are ignored; what genstream cannot honour is
/// a 400 naming it.
#[derive(ToSchema)]
pub struct ResponseRequest {
    /// A configured model's name.
    pub model: String,
    /// A string, or input items (`{role, content}` messages, `function_call_output`).
    pub input: Value,
    #[schema(required = false)]
    pub instructions: Option<String>,
    /// Continue after this response (its conversation).
    #[schema(required = false)]
    pub previous_response_id: Option<String>,
    #[schema(required = false)]
    pub stream: Option<bool>,
    /// Answer at once with `status: queued`/`in_progress`; poll or stream it later.
    #[schema(required = false)]
    pub background: Option<bool>,
    /// Function tools the client runs.
    #[schema(required = false)]
    pub tools: Option<Vec<Object>>,
    #[schema(required = false)]
    pub metadata: Option<Object>,
}

// --- /v1 answers ----------------------------------------------------------------------

/// `GET /v1/models`.
#[derive(ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelObject>,
}

/// A model, OpenAI's shape.
#[derive(ToSchema)]
pub struct ModelObject {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Always 0.
    pub created: i64,
    /// The configured provider's name.
    pub owned_by: String,
}

/// A `chat.completion` object (non-streaming answer and `GET
/// /v1/chat/completions/{id}`).
#[derive(ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-` and the stream id's 32 hex digits.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: i64,
    pub model: String,
    /// One choice: `{index, message: {role, content, refusal, tool_calls?}, logprobs,
    /// finish_reason}`.
    pub choices: Vec<Object>,
    /// `{prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details,
    /// completion_tokens_details}`.
    pub usage: Object,
}

/// A `response` object.
#[derive(ToSchema)]
pub struct ResponseObject {
    /// `resp_` and the stream id's 32 hex digits.
    pub id: String,
    /// Always `response`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    /// `queued`, `in_progress`, `completed`, `incomplete`, `failed`, `cancelled`.
    pub status: String,
    pub background: bool,
    pub completed_at: Option<i64>,
    /// `{code, message}` of a failed response.
    pub error: Option<Object>,
    pub incomplete_details: Option<Object>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    pub model: String,
    /// Output items: `message`, `reasoning`, `function_call`, `mcp_call`.
    pub output: Vec<Object>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub temperature: Option<f64>,
    pub tool_choice: Value,
    pub tools: Vec<Object>,
    pub top_p: Option<f64>,
    pub usage: Option<Object>,
    pub metadata: Object,
}

/// `DELETE /v1/responses/{id}`.
#[derive(ToSchema)]
pub struct DeletedResponse {
    pub id: String,
    /// Always `response`.
    pub object: String,
    pub deleted: bool,
}

/// `GET /v1/responses/{id}/input_items`.
#[derive(ToSchema)]
pub struct InputItemList {
    /// Always `list`.
    pub object: String,
    /// `message` and `function_call_output` items (the user's), `message` and
    /// `function_call` items (prior assistant turns the request carried).
    pub data: Vec<Object>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    /// Always false.
    pub has_more: bool,
}

/// Any JSON object.
pub type Object = serde_json::Map<String, Value>;

// --- the event streams -----------------------------------------------------------------

/// One server-sent event, as a client parses it from the stream (WHATWG HTML,
/// server-sent events): `event` (`message` when the block names none), `data` (the
/// JSON payload, or `[DONE]` at the end of an OpenAI or AI SDK stream), `id`, and
/// `retry` (ms) on the stream's first block. `: ping` comment lines are no events.
#[derive(ToSchema)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    #[schema(required = false)]
    pub id: Option<String>,
    /// Milliseconds an EventSource waits before it reconnects.
    #[schema(required = false)]
    pub retry: Option<u64>,
}

/// One event of the native stream: `id` is its seq, `event` its name, `data` the JSON
/// `{"seq", "event", "data"}` (docs/protocol.md §3).
#[derive(ToSchema)]
pub struct NativeEvent {
    pub event: NativeEventName,
    #[schema(content_media_type = "application/json")]
    pub data: String,
    /// The seq: what `cursor` and `Last-Event-ID` take.
    #[schema(pattern = "^[0-9]+$")]
    pub id: String,
    /// Milliseconds an EventSource waits before it reconnects.
    #[schema(required = false)]
    pub retry: Option<u64>,
}

/// The native events (docs/protocol.md §3); `final` (an aborted job's too) and `error`
/// are terminal; `sync` opens a `resume=true` stream.
#[derive(ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum NativeEventName {
    Created,
    OnRunStep,
    OnRunStepDelta,
    OnRunStepCompleted,
    OnMessageDelta,
    OnReasoningDelta,
    Usage,
    Retry,
    Sync,
    Final,
    Error,
}

/// The native event stream (docs/protocol.md §3).
pub const NATIVE_STREAM: &str = "The job's event log as server-sent events, from \
    after the cursor: opens with `retry: N`, then one block per event, `id: SEQ`, \
    `event: NAME` and `data: {\"seq\", \"event\", \"data\"}` (events `created`, `on_run_step`, \
    `on_message_delta`, `on_reasoning_delta`, `on_run_step_delta`, \
    `on_run_step_completed`, `usage`, `retry`, and one terminal event: `final` \
    (an aborted job's too) or `error`); with `resume=true` a `sync` event, data \
    `{\"sync\": true, \"seq\", \"resumeState\"}`, comes first. `: ping` comments while idle. Ends after the terminal event.";

/// The AI SDK's UI message stream.
pub const AI_SDK_STREAM: &str = "The Vercel AI SDK's UI message stream (header \
    `x-vercel-ai-ui-message-stream: v1`): `data: {\"type\": …}` blocks (`start`, \
    `text-start`, `text-delta`, …, `finish`), then `data: [DONE]`.";
