//! A job's appender: the job's events go to the store in order, but the job does not
//! wait for each one to land before it goes on. While one store call is in flight,
//! the job's later events queue; the next call sends everything queued (at most
//! [`MAX_APPEND_BATCH`] events) as one [`EventLogStore::append_batch`] with the seq it
//! expects first, so a retry after a lost reply stays exactly-once. An event waits at
//! most for the call in flight (one store round trip) before its own call is sent.
//!
//! The job's fold ([`Aggregate`]) only ever holds what landed: each landed batch comes
//! back to the job, which applies it ([`Appender::settle`], [`Appender::flush`]). The
//! first error of a call (the log ended or is full, the store stayed down past its
//! grace) reaches the job at its next emit or flush; the events queued behind the
//! failed one are dropped (none of them landed), and the next emit starts afresh from
//! the fold's next seq.
//!
//! A store whose append is local ([`EventLogStore::appends_locally`], the memory
//! store) gets no task: with nothing in flight the job calls the store inline and
//! applies what landed at once, so an event costs no task hop and no channel send.
//!
//! [`EventLogStore::append_batch`]: crate::store::EventLogStore::append_batch
//! [`EventLogStore::appends_locally`]: crate::store::EventLogStore::appends_locally

use tokio::sync::mpsc;

use super::*;
use crate::store::MAX_APPEND_BATCH;

/// Events that may queue behind the call in flight before an emit waits for room
/// (backpressure on a job whose store is slower than its model).
const QUEUE: usize = 1024;

/// One event on its way to the store, and when the job emitted it.
struct Queued {
    body: EventBody,
    at: Instant,
}

/// What the appender task tells the job: a batch landed (first seq, its events in
/// order), or the error that stopped it.
type Ack = Result<(u64, Vec<EventBody>), StoreError>;

/// The job's side of its appender task (see the module docs). One per job task.
pub(super) struct Appender {
    ctx: Arc<JobContext>,
    stream_id: String,
    /// The running task's queue and acknowledgements; `None` before the first emit
    /// and after an error (the task is gone).
    task: Option<(mpsc::Sender<Queued>, mpsc::UnboundedReceiver<Ack>)>,
    /// Events handed to the task and not yet acknowledged.
    pending: usize,
    /// The store appends in this process: append inline when nothing is in flight.
    inline: bool,
}

impl Appender {
    pub(super) fn new(ctx: Arc<JobContext>, stream_id: String) -> Self {
        let inline = ctx.store.appends_locally();
        Appender {
            ctx,
            stream_id,
            task: None,
            pending: 0,
            inline,
        }
    }

    /// Events emitted but not yet known to have landed.
    pub(super) fn pending(&self) -> usize {
        self.pending
    }

    /// Queues `body`, whose seq is to be `seq` (the fold's next seq plus what is
    /// pending), and applies whatever landed meanwhile to `landed`. Waits only when
    /// [`QUEUE`] events are already queued.
    ///
    /// Errors: the first error of a store call since the last emit or flush (that
    /// call's events and every one queued behind it, `body` too, did not land).
    pub(super) async fn push(
        &mut self,
        body: EventBody,
        seq: u64,
        landed: &mut (dyn FnMut(u64, &EventBody) + Send),
    ) -> Result<(), StoreError> {
        self.settle(landed)?;
        if self.inline && self.pending == 0 {
            return self.append_inline(body, seq, landed).await;
        }
        let (tx, _) = self.task.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (ack_tx, ack_rx) = mpsc::unbounded_channel();
            let task = run(self.ctx.clone(), self.stream_id.clone(), seq, rx, ack_tx);
            tokio::spawn(tracing::Instrument::in_current_span(task));
            (tx, ack_rx)
        });
        let queued = Queued {
            body,
            at: Instant::now(),
        };
        if tx.send(queued).await.is_err() {
            // The task stopped on an error: it is in the acknowledgements.
            self.flush(landed).await?;
            self.reset();
            return Err(StoreError::Inconsistent(format!(
                "the appender of job {} stopped without an error",
                self.stream_id
            )));
        }
        self.pending += 1;
        Ok(())
    }

    /// Appends `body` at `seq` with the job's own call, nothing being in flight (a
    /// local store: the call does no I/O), and applies it once it landed.
    ///
    /// Errors: as [`Appender::push`] (here the error of this very event).
    async fn append_inline(
        &mut self,
        body: EventBody,
        seq: u64,
        landed: &mut (dyn FnMut(u64, &EventBody) + Send),
    ) -> Result<(), StoreError> {
        let at = [Instant::now()];
        let bodies = std::slice::from_ref(&body);
        let a = self
            .ctx
            .append_batch(&self.stream_id, bodies, &at, seq)
            .await?;
        if a.count != 1 {
            return Err(StoreError::Inconsistent(format!(
                "the store landed {} of a batch of 1 event of job {}",
                a.count, self.stream_id
            )));
        }
        landed(a.first_seq, &body);
        Ok(())
    }

    /// Applies the batches that landed so far, without waiting.
    ///
    /// Errors: as [`Appender::push`].
    pub(super) fn settle(
        &mut self,
        landed: &mut (dyn FnMut(u64, &EventBody) + Send),
    ) -> Result<(), StoreError> {
        while let Some((_, acks)) = self.task.as_mut() {
            match acks.try_recv() {
                Ok(ack) => self.take(ack, landed)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Waits until every emitted event landed (or one failed) and applies them.
    ///
    /// Errors: as [`Appender::push`].
    pub(super) async fn flush(
        &mut self,
        landed: &mut (dyn FnMut(u64, &EventBody) + Send),
    ) -> Result<(), StoreError> {
        while self.pending > 0 {
            let Some((_, acks)) = self.task.as_mut() else {
                break;
            };
            match acks.recv().await {
                Some(ack) => self.take(ack, landed)?,
                None => {
                    // Cannot happen (the task sends its error before it stops);
                    // start afresh rather than wait forever.
                    self.reset();
                    return Err(StoreError::Inconsistent(format!(
                        "the appender of job {} stopped without a word",
                        self.stream_id
                    )));
                }
            }
        }
        Ok(())
    }

    fn take(
        &mut self,
        ack: Ack,
        landed: &mut (dyn FnMut(u64, &EventBody) + Send),
    ) -> Result<(), StoreError> {
        match ack {
            Ok((first, bodies)) => {
                self.pending -= bodies.len();
                for (i, body) in bodies.iter().enumerate() {
                    landed(first + i as u64, body);
                }
                Ok(())
            }
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        self.task = None;
        self.pending = 0;
    }
}

/// The appender task: sends what is queued, a batch at a time, each with the seq it
/// expects first; acknowledges each landed batch; stops at the first error (the
/// events still queued are dropped with the queue).
async fn run(
    ctx: Arc<JobContext>,
    stream_id: String,
    mut expected: u64,
    mut rx: mpsc::Receiver<Queued>,
    acks: mpsc::UnboundedSender<Ack>,
) {
    let mut bodies = Vec::with_capacity(MAX_APPEND_BATCH);
    let mut queued_at = Vec::with_capacity(MAX_APPEND_BATCH);
    while let Some(q) = rx.recv().await {
        bodies.push(q.body);
        queued_at.push(q.at);
        while bodies.len() < MAX_APPEND_BATCH
            && let Ok(q) = rx.try_recv()
        {
            bodies.push(q.body);
            queued_at.push(q.at);
        }
        // A call lands a prefix of the batch when an event cannot land (the log
        // ended or is full); sending the rest again then gets that error.
        while !bodies.is_empty() {
            let landed = ctx
                .append_batch(&stream_id, &bodies, &queued_at, expected)
                .await
                .and_then(|a| {
                    if a.count == 0 || a.count > bodies.len() {
                        return Err(StoreError::Inconsistent(format!(
                            "the store landed {} of a batch of {} events of job {stream_id}",
                            a.count,
                            bodies.len()
                        )));
                    }
                    Ok(a)
                });
            let a = match landed {
                Ok(a) => a,
                Err(e) => {
                    let _ = acks.send(Err(e));
                    return;
                }
            };
            let rest = bodies.split_off(a.count);
            queued_at.drain(..a.count);
            expected = a.first_seq + a.count as u64;
            if acks
                .send(Ok((a.first_seq, std::mem::replace(&mut bodies, rest))))
                .is_err()
            {
                return; // the job is gone
            }
        }
    }
}
