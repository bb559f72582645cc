//! A finished job's log rebuilt from its saved messages, for an `Idempotency-Key`
//! repeat that comes after the job's own log expired (`jobs.retention`): the repeat
//! gets the same ids and the saved answer in its route's shape, and nothing runs.

use super::*;
use crate::event::{ContentPart, StepDetails, StepType};

impl JobManager {
    /// The started job's metadata and log: the log itself while the store keeps it;
    /// after it expired, a finished log rebuilt from the saved user and response
    /// messages (`created`, one step per text or reasoning part of the answer,
    /// `final` with no usage: the job's spending was recorded when it ran; `error`
    /// `upstream_error` for an answer saved as failed). Tool calls of the answer are
    /// not replayed.
    ///
    /// Errors: `NotFound` when neither the log nor the saved answer exists (the
    /// conversation was deleted); `Forbidden` for another user's job.
    pub async fn started_job(
        &self,
        user_id: &str,
        started: &Started,
    ) -> Result<(JobMeta, Arc<EventLog>), EngineError> {
        match self.job_for(user_id, &started.stream_id).await {
            Err(EngineError::NotFound(_)) => self.replay(user_id, started).await,
            r => r,
        }
    }

    async fn replay(
        &self,
        user_id: &str,
        started: &Started,
    ) -> Result<(JobMeta, Arc<EventLog>), EngineError> {
        let not_found = || EngineError::NotFound(format!("stream {}", started.stream_id));
        let conversation = self
            .own_conversation(user_id, &started.conversation_id)
            .await?;
        let messages = self
            .inner
            .ctx
            .db
            .list_messages(&started.conversation_id)
            .await?;
        let find = |id: &str| messages.iter().find(|m| m.message_id == id).cloned();
        let user_message = find(&started.user_message_id).ok_or_else(not_found)?;
        let answer = find(&started.response_message_id).ok_or_else(not_found)?;
        let model = answer
            .model
            .clone()
            .unwrap_or_else(|| answer.sender.clone());
        let mut events = vec![EventBody::Created(Created {
            stream_id: started.stream_id.clone(),
            conversation_id: started.conversation_id.clone(),
            user_message: user_message.clone(),
            response_message_id: started.response_message_id.clone(),
            model: model.clone(),
            sender: answer.sender.clone(),
            created_at: user_message.created_at.clone(),
            client_tools: Vec::new(),
            protocol_options: None,
        })];
        for (index, part) in answer.content.iter().enumerate() {
            let id = format!("step_{index}");
            let delta = Delta {
                id: id.clone(),
                delta: DeltaContent {
                    content: vec![part.clone()],
                },
            };
            let delta = match part {
                ContentPart::Text { .. } => EventBody::MessageDelta(delta),
                ContentPart::Think { .. } => EventBody::ReasoningDelta(delta),
                _ => continue,
            };
            events.push(EventBody::RunStep(RunStep {
                id: id.clone(),
                run_id: format!("{}:0", started.stream_id),
                index: index as u32,
                step_type: StepType::MessageCreation,
                step_details: StepDetails::MessageCreation {
                    message_creation: MessageCreation {
                        message_id: started.response_message_id.clone(),
                    },
                },
            }));
            events.push(delta);
        }
        events.push(if answer.error {
            EventBody::Error(ErrorEvent {
                code: "upstream_error".into(),
                message: "the generation failed".into(),
                response_message: Some(answer.clone()),
            })
        } else {
            EventBody::Final(Final {
                status: if answer.unfinished {
                    FinalStatus::Aborted
                } else {
                    FinalStatus::Complete
                },
                response_message: answer.clone(),
                conversation: ConversationRef {
                    conversation_id: started.conversation_id.clone(),
                    title: conversation.title,
                },
                usage: UsageTotals::default(),
                reason: answer.unfinished.then(|| "aborted".to_string()),
            })
        });
        let log = Arc::new(EventLog::new(crate::log::LogLimits {
            max_events: events.len() + 1,
            max_bytes: usize::MAX,
        }));
        for e in &events {
            log.append(e)
                .map_err(|e| EngineError::internal("replay a saved answer", e))?;
        }
        let meta = JobMeta {
            stream_id: started.stream_id.clone(),
            user_id: user_id.to_string(),
            conversation_id: started.conversation_id.clone(),
            user_message_id: started.user_message_id.clone(),
            response_message_id: started.response_message_id.clone(),
            model,
            status: if answer.error {
                JobStatus::Error
            } else if answer.unfinished {
                JobStatus::Aborted
            } else {
                JobStatus::Complete
            },
            created_at: user_message.created_at,
            webhook_url: None,
        };
        Ok((meta, log))
    }
}
