//! The one way a job ends, whoever ends it: its own task (complete, aborted, error,
//! stalled, shutdown) or a reaper on any replica (`replica_lost`,
//! `store_unavailable`). Both hold the job's end claim first, then call
//! [`conclude`]: spend the log's usage, build the response message from the log's
//! [`Aggregate`], save it into its conversation, and get the terminal event to append.
//! The usage of a call cut off before the upstream reported any is estimated by
//! [`estimate_usage`], also for both.

use super::*;

/// Told when a job has ended: implemented outside the engine (the server's webhook
/// client), set with [`JobManager::set_end_hook`].
///
/// Called exactly once per job, by the replica whose end claim won (the job's owner or
/// the reaper that ended an orphan), right after the terminal event (`final` or
/// `error`, docs/protocol.md §2) is in the log, from [`announce_end`]. It must not
/// block: the job's task (or the reaper) calls it inline, so any slow work (an HTTP
/// delivery) is to be spawned.
pub trait EndHook: Send + Sync {
    /// `meta`: the job (its `status` still `running`); `end`: its terminal event.
    fn job_ended(&self, meta: &JobMeta, end: &EventBody);
}

/// The one place a job's end is announced to the [`EndHook`], called by both ending
/// paths (the job's own task and the reaper) once their terminal event is appended.
pub(super) fn announce_end(ctx: &JobContext, meta: &JobMeta, end: &EventBody) {
    if let Some(hook) = ctx.end_hook.get() {
        hook.job_ended(meta, end);
    }
}

/// How a job ends, with what its terminal event says.
#[derive(Clone, Debug)]
pub(super) enum Ending {
    /// `final` `complete`; `Some(reason)` when the tool loop hit its cap.
    Complete { reason: Option<&'static str> },
    /// `final` `aborted` (`reason: "aborted"` or `"shutdown"`).
    Aborted { shutdown: bool },
    /// `error` from the job's own task: `stalled`, `upstream_error`, `log_full`,
    /// `internal`.
    Error { code: &'static str, message: String },
    /// `error` from a reaper, for a job nobody generates: `replica_lost`,
    /// `store_unavailable`.
    Orphaned { code: &'static str, message: String },
}

impl Ending {
    /// Why the usage is spent (the ledger's `context`).
    fn spend_context(&self) -> SpendContext {
        match self {
            Ending::Complete { .. } => SpendContext::Message,
            Ending::Aborted { .. } => SpendContext::Abort,
            Ending::Error { .. } => SpendContext::Error,
            Ending::Orphaned { .. } => SpendContext::ReplicaLost,
        }
    }
}

/// The response message of a job whose log folds to `aggregate`, as saved and as sent
/// in its terminal event: the aggregate's content, with every tool call that has no
/// result given `{"error":"cancelled"}`. A job that ends while a call is open (abort,
/// log full, a store or database failure, a dead owner) would otherwise persist a call
/// without a result, and every later turn built on it would be refused upstream
/// (docs/lessons.md: grimoire's 400s). `unfinished` for every ending but a complete
/// one, whose open calls are client tool calls and stay open; `error` for the `error`
/// endings.
pub(super) fn response_message(
    meta: &JobMeta,
    aggregate: &Aggregate,
    unfinished: bool,
    error: bool,
) -> Message {
    let mut content = aggregate.content();
    for part in &mut content {
        // A completed answer's calls without a result are the client's to run
        // (`client_tools.rs`): every server tool call of a completed job has one.
        if let crate::event::ContentPart::ToolCall { tool_call } = part
            && tool_call.output.is_none()
            && unfinished
        {
            tool_call.output = Some(crate::tools::cancelled_result());
        }
    }
    Message {
        message_id: meta.response_message_id.clone(),
        conversation_id: meta.conversation_id.clone(),
        parent_message_id: Some(meta.user_message_id.clone()),
        sender: meta.model.clone(),
        text: text_of(&content),
        content,
        is_created_by_user: false,
        model: Some(meta.model.clone()),
        unfinished,
        error,
        created_at: now_rfc3339(),
    }
}

/// Ends a job whose end claim the caller holds: spends every usage record of the log
/// (exactly once, by the ledger's unique key), builds the response message
/// ([`response_message`]), saves it into its conversation (which also bumps the
/// conversation's `updatedAt`), and returns the terminal event to append, in the
/// order docs/protocol.md §4 requires (saved before the terminal event). `title` is
/// the conversation's, for `final.conversation`.
///
/// A conversation deleted while the job ran gets nothing written
/// ([`Persistence::add_message`] refuses), and the job ends with `error`
/// `conversation_deleted` instead.
///
/// Errors: database failures (the spend is retried for `store_outage_grace` first).
pub(super) async fn conclude(
    ctx: &JobContext,
    meta: &JobMeta,
    title: &str,
    pricing: Option<&crate::billing::Pricing>,
    aggregate: &Aggregate,
    ending: Ending,
) -> Result<EventBody, EngineError> {
    let usage = ctx
        .spend_usage(meta, pricing, aggregate.usage(), ending.spend_context())
        .await?;
    let (unfinished, error) = match &ending {
        Ending::Complete { .. } => (false, false),
        Ending::Aborted { .. } => (true, false),
        Ending::Error { .. } | Ending::Orphaned { .. } => (true, true),
    };
    let msg = response_message(meta, aggregate, unfinished, error);
    if !ctx.db.add_message(&msg).await? {
        tracing::warn!(stream_id = %meta.stream_id, conversation_id = %meta.conversation_id,
            "the conversation was deleted while its job ran; nothing saved");
        return Ok(EventBody::Error(ErrorEvent {
            code: "conversation_deleted".into(),
            message: format!(
                "conversation {} was deleted while this answer was generated; nothing was saved",
                meta.conversation_id
            ),
            response_message: None,
        }));
    }
    let conversation = ConversationRef {
        conversation_id: meta.conversation_id.clone(),
        title: title.to_string(),
    };
    Ok(match ending {
        Ending::Complete { reason } => EventBody::Final(Final {
            status: FinalStatus::Complete,
            response_message: msg,
            conversation,
            usage,
            reason: reason.map(str::to_string),
        }),
        Ending::Aborted { shutdown } => EventBody::Final(Final {
            status: FinalStatus::Aborted,
            response_message: msg,
            conversation,
            usage,
            reason: Some(if shutdown { "shutdown" } else { "aborted" }.into()),
        }),
        Ending::Error { code, message } | Ending::Orphaned { code, message } => {
            EventBody::Error(ErrorEvent {
                code: code.into(),
                message,
                response_message: Some(msg),
            })
        }
    })
}

/// An estimate (tiktoken, with the upstream model's encoding or `o200k_base`) of a
/// model call the upstream reported no usage for, marked `estimated`: input = the
/// system prompt (when known) and every turn of `prompt` (text, tool arguments and
/// results), output = what the call streamed. `model` is the job's model name;
/// `entry` its configuration on this replica, if it has one (for the encoding and the
/// provider's name).
pub(super) async fn estimate_usage(
    model: &str,
    entry: Option<&ModelEntry>,
    call_index: u32,
    system_prompt: Option<&str>,
    prompt: &[ChatMessage],
    output: String,
) -> UsageRecord {
    let mut input = String::new();
    if let Some(s) = system_prompt {
        input.push_str(s);
    }
    for m in prompt {
        input.push_str(&m.text);
        for c in &m.tool_calls {
            input.push_str(&c.args);
            input.push_str(c.output.as_deref().unwrap_or(""));
        }
    }
    let upstream = entry.and_then(|m| m.provider.upstream_model());
    UsageRecord {
        call_index,
        model: model.to_string(),
        provider: entry
            .map(|m| m.provider.name().to_string())
            .unwrap_or_default(),
        input_tokens: crate::usage::count_tokens(upstream, input).await,
        output_tokens: crate::usage::count_tokens(upstream, output).await,
        estimated: true,
        ..UsageRecord::default()
    }
}
