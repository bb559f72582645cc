// The page's session manager: one session per conversation, shared by every view of
// it, holding the saved messages and the state of the running answer, if any.
//
// A conversation's messages come from the API. A running answer is followed over SSE
// (follow.js) and folded into an Answer (aggregate.js); when its terminal event
// arrives the session reads the saved messages again, so what stays on screen is
// exactly what the server saved. The session notices a job it did not start in three
// ways, fastest first: a BroadcastChannel message from another tab of this browser,
// the `/api/chat/active` poll that every visible page runs (other devices, other
// replicas), and the conversation list's `updatedAt` (a job that began and ended
// between two polls). A page that opens a conversation asks
// `/api/chat/status/{conversationId}` and, when a job runs, joins it with a snapshot.

import { api } from './api.js';
import { Answer, textOf } from './aggregate.js';
import { follow } from './follow.js';

/** A tiny observable value: `get()`, `set(v)`, `subscribe(fn) → unsubscribe`. */
export class Store {
  constructor(value) {
    this.value = value;
    this.subs = new Set();
  }
  get() {
    return this.value;
  }
  set(value) {
    this.value = value;
    for (const fn of this.subs) fn(value);
  }
  update(fn) {
    this.set(fn(this.value));
  }
  subscribe(fn) {
    this.subs.add(fn);
    return () => this.subs.delete(fn);
  }
}

const USAGE_KEY = 'genstream.usage';
const USAGE_KEEP = 500;

/**
 * Usage per answer, by message id. The saved message carries no usage, so the page
 * keeps what `final` (or an abort) said, in this browser's storage, the newest
 * USAGE_KEEP answers.
 */
export const usageByMessage = new Store(loadUsage());

function loadUsage() {
  try {
    return JSON.parse(localStorage.getItem(USAGE_KEY) || '{}');
  } catch {
    return {};
  }
}

export function rememberUsage(messageId, usage) {
  if (!messageId || !usage) return;
  const all = { ...usageByMessage.get(), [messageId]: { ...usage, at: Date.now() } };
  const ids = Object.keys(all);
  if (ids.length > USAGE_KEEP) {
    ids.sort((a, b) => all[a].at - all[b].at);
    for (const id of ids.slice(0, ids.length - USAGE_KEEP)) delete all[id];
  }
  try {
    localStorage.setItem(USAGE_KEY, JSON.stringify(all));
  } catch {
    // storage full or off: keep it for this page only
  }
  usageByMessage.set(all);
}

/**
 * One conversation's state, as views read it:
 * `{conversationId, loaded, error, messages, live}`, where `live` is null or
 * `{streamId, userMessage, responseMessageId, model, content, text, connection,
 *   retry, status}`: the running (or just ended) answer.
 */
export class Session {
  constructor(manager, conversationId) {
    this.manager = manager;
    this.id = conversationId;
    this.store = new Store({
      conversationId,
      loaded: false,
      error: null,
      messages: [],
      live: null,
      errors: {}, // messageId → the error event's message, for answers that failed here
    });
    this.follower = null;
    this.answer = null;
    this.updatedAt = null;
    this.loading = null;
  }

  get state() {
    return this.store.get();
  }

  patch(p) {
    this.store.set({ ...this.store.get(), ...p });
  }

  patchLive(p) {
    const live = this.state.live;
    if (live) this.patch({ live: { ...live, ...p } });
  }

  /** Reads the conversation and joins its running job, if any. */
  load() {
    if (!this.loading) {
      this.loading = this.doLoad().finally(() => {
        this.loading = null;
      });
    }
    return this.loading;
  }

  async doLoad() {
    try {
      // Status first, messages second: a job that ends in between has saved its
      // answer before it ended, so the messages hold it.
      const status = await api(`/api/chat/status/${encodeURIComponent(this.id)}`);
      await this.refreshMessages();
      if (status.active && status.streamId) this.join(status.streamId, { resume: true });
    } catch (e) {
      if (e.status === 404) this.patch({ loaded: true, error: 'This conversation does not exist.' });
      else if (e.status === 403) this.patch({ loaded: true, error: 'This conversation belongs to another user.' });
      else if (e.status !== 401) this.patch({ loaded: true, error: e.message || String(e) });
    }
  }

  async refreshMessages() {
    const { messages } = await api(`/api/conversations/${encodeURIComponent(this.id)}/messages`);
    const live = this.state.live;
    // A finished live answer gives way to the saved message once the list holds it.
    const keepLive =
      live && !(live.status !== 'streaming' && messages.some((m) => m.messageId === live.responseMessageId));
    this.patch({ loaded: true, error: null, messages, live: keepLive ? live : null });
    if (!keepLive) this.answer = null;
  }

  /** True while an answer of this conversation streams. */
  get busy() {
    return this.state.live?.status === 'streaming';
  }

  /**
   * Follows job `streamId`: from its start (a job this page just started, or one it
   * heard about before reading any of it) or, with `resume`, from a snapshot.
   */
  join(streamId, { resume = false, userMessage = null, responseMessageId = null, model = null } = {}) {
    if (this.follower && this.state.live?.streamId === streamId) return;
    this.follower?.stop();
    this.answer = new Answer();
    this.patch({
      live: {
        streamId,
        userMessage,
        responseMessageId,
        model,
        content: [],
        text: '',
        connection: 'connecting',
        retry: null,
        status: 'streaming',
        error: null,
        usage: null,
      },
    });
    const f = follow(streamId, {
      resume,
      onEvent: (ev) => this.onEvent(ev),
      onConnection: (connection) => this.patchLive({ connection }),
    });
    this.follower = f;
    f.done.then((r) => {
      if (this.follower !== f) return;
      this.follower = null;
      if (r.end === 'terminal') this.onTerminal(r.event);
      else if (r.end === 'gone') this.finishGone();
    });
  }

  onEvent(ev) {
    const d = ev.data;
    switch (ev.event) {
      case 'sync': {
        const rs = d.resumeState || {};
        this.answer = Answer.fromSnapshot(rs);
        this.patchLive({
          userMessage: rs.userMessage || this.state.live?.userMessage,
          responseMessageId: rs.responseMessageId || this.state.live?.responseMessageId,
          model: rs.sender || this.state.live?.model,
          ...this.answerView(),
        });
        return;
      }
      case 'created':
        this.patchLive({
          userMessage: d.userMessage,
          responseMessageId: d.responseMessageId,
          model: d.model,
        });
        return;
      case 'retry':
        this.answer.apply(ev);
        this.patchLive({
          retry: {
            attempt: d.attempt,
            maxAttempts: d.maxAttempts,
            error: d.error,
            until: Date.now() + (d.delayMs || 0),
          },
          ...this.answerView(),
        });
        return;
      case 'usage':
        return;
      case 'final':
      case 'error':
        return; // handled when the follower returns
      default:
        this.answer.apply(ev);
        // The stream went on: a retry notice has done its job.
        this.patchLive({ retry: null, ...this.answerView() });
    }
  }

  answerView() {
    const content = this.answer.content();
    return { content, text: textOf(content) };
  }

  onTerminal(ev) {
    const d = ev.data || {};
    const streamId = this.state.live?.streamId;
    const saved = d.responseMessage;
    if (saved) {
      // The page folded the same events the server did; anything else is a bug worth
      // hearing about (the browser tests fail on console errors).
      const mine = this.answer ? this.answer.text() : null;
      if (mine !== null && mine !== saved.text) {
        console.error('genstream: the streamed answer differs from the saved message', {
          streamed: mine,
          saved: saved.text,
        });
      }
      rememberUsage(saved.messageId, d.usage);
    }
    const status =
      ev.event === 'error' ? 'error' : d.status === 'aborted' ? 'unfinished' : 'complete';
    this.patchLive({
      status,
      retry: null,
      connection: 'open',
      error: ev.event === 'error' ? d.message || d.code : null,
      usage: d.usage || null,
    });
    if (ev.event === 'error' && saved) {
      this.patch({ errors: { ...this.state.errors, [saved.messageId]: d.message || d.code } });
    }
    // Show the saved message at once, then read the list to be sure.
    if (saved) {
      const messages = this.state.messages.filter((m) => m.messageId !== saved.messageId);
      const user = this.state.live?.userMessage;
      if (user && !messages.some((m) => m.messageId === user.messageId)) messages.push(user);
      messages.push(saved);
      this.patch({ messages, live: null });
      this.answer = null;
    }
    this.manager.jobEnded(this.id, streamId);
    this.refreshMessages().catch(() => {});
  }

  finishGone() {
    this.patchLive({ status: 'complete' });
    this.refreshMessages().catch(() => {});
  }

  /**
   * Starts a turn: `POST /api/chat`. Resolves to the API's answer; the job is then
   * followed from seq 0.
   */
  static async start(manager, { text, conversationId, parentMessageId, model }) {
    const body = { text };
    if (conversationId) body.conversationId = conversationId;
    if (parentMessageId) body.parentMessageId = parentMessageId;
    if (model) body.model = model;
    const r = await api('/api/chat', { method: 'POST', body });
    const session = manager.session(r.conversationId);
    const userMessage = {
      messageId: r.userMessageId,
      conversationId: r.conversationId,
      parentMessageId: parentMessageId || null,
      sender: 'User',
      text,
      content: [],
      isCreatedByUser: true,
      createdAt: new Date().toISOString(),
    };
    session.join(r.streamId, { userMessage, responseMessageId: r.responseMessageId, model });
    if (!session.state.loaded && conversationId) session.load();
    else if (!conversationId) session.patch({ loaded: true });
    manager.jobStarted(r.conversationId, r.streamId, { local: true });
    return r;
  }

  /** Stops the running answer, from whichever tab or device: `POST /api/chat/abort`. */
  async stop() {
    const live = this.state.live;
    if (!live) return;
    try {
      const r = await api('/api/chat/abort', { method: 'POST', body: { streamId: live.streamId } });
      rememberUsage(r.responseMessage?.messageId, r.usage);
    } catch (e) {
      if (e.code !== 'job_finished') throw e;
    }
  }

  dispose() {
    this.follower?.stop();
    this.follower = null;
  }
}

/**
 * All sessions of the page, plus what ties the page to other tabs and devices: the
 * BroadcastChannel and the poll of the caller's running jobs.
 */
export class SessionManager {
  constructor() {
    this.sessions = new Map();
    this.conversations = new Store({ loaded: false, list: [] });
    this.active = new Map(); // streamId → conversationId, of the running jobs known
    this.ended = new Set(); // streamIds whose terminal event this page saw
    this.listeners = { jobs: new Set() };
    this.channel = 'BroadcastChannel' in window ? new BroadcastChannel('genstream') : null;
    this.channel?.addEventListener('message', (e) => this.onBroadcast(e.data));
    this.pollTimer = null;
    this.lastListRefresh = 0;
    this.stopped = false;
  }

  session(conversationId) {
    let s = this.sessions.get(conversationId);
    if (!s) {
      s = new Session(this, conversationId);
      this.sessions.set(conversationId, s);
    }
    return s;
  }

  broadcast(msg) {
    try {
      this.channel?.postMessage(msg);
    } catch {
      // a closed channel: other tabs will see it in their next poll
    }
  }

  onBroadcast(msg) {
    if (!msg || typeof msg !== 'object') return;
    if (msg.t === 'job') this.jobStarted(msg.conversationId, msg.streamId, { local: false });
    else if (msg.t === 'ended') this.refreshConversations();
    else if (msg.t === 'conversations') this.refreshConversations();
    else if (msg.t === 'auth') this.onAuth?.(msg);
  }

  /** A job began (here, in another tab, or seen by the poll). */
  jobStarted(conversationId, streamId, { local }) {
    // A poll that raced the job's end must not bring it back.
    if (this.ended.has(streamId)) return;
    this.active.set(streamId, conversationId);
    if (local) this.broadcast({ t: 'job', conversationId, streamId });
    const s = this.sessions.get(conversationId);
    // A conversation on screen (or kept) follows the new job from its start, so it
    // shows the new question too; one never opened reads it all when opened.
    if (s && s.state.loaded && s.state.live?.streamId !== streamId) s.join(streamId);
    this.refreshConversations();
  }

  jobEnded(conversationId, streamId) {
    this.ended.add(streamId);
    this.active.delete(streamId);
    this.broadcast({ t: 'ended', conversationId });
    this.refreshConversations();
    this.onJobEnded?.();
  }

  /** Whether a job of this conversation runs, as far as this page knows. */
  isActive(conversationId) {
    for (const c of this.active.values()) if (c === conversationId) return true;
    return false;
  }

  async refreshConversations() {
    this.lastListRefresh = Date.now();
    try {
      const { conversations } = await api('/api/conversations');
      for (const c of conversations) {
        const s = this.sessions.get(c.conversationId);
        // A turn that started and ended between two polls: its conversation moved.
        if (s && s.state.loaded && !s.follower && s.updatedAt && s.updatedAt !== c.updatedAt) {
          s.refreshMessages().catch(() => {});
        }
        if (s) s.updatedAt = c.updatedAt;
      }
      this.conversations.set({ loaded: true, list: conversations });
    } catch {
      // the next poll tries again
    }
  }

  /** Polls `/api/chat/active` every 500 ms while the page is visible, 5 s hidden; the conversation list
   * every 3 s, and at once when a job starts or ends. */
  startPolling() {
    const tick = async () => {
      if (this.stopped) return;
      const started = Date.now();
      try {
        const { jobs } = await api('/api/chat/active');
        const seen = new Set();
        for (const j of jobs) {
          seen.add(j.streamId);
          if (!this.active.has(j.streamId)) this.jobStarted(j.conversationId, j.streamId, { local: false });
        }
        let ended = false;
        for (const id of [...this.active.keys()]) {
          if (!seen.has(id)) {
            this.active.delete(id);
            ended = true;
          }
        }
        if (ended || Date.now() - this.lastListRefresh > 3000) this.refreshConversations();
      } catch {
        // offline or a 401 (which signs out): try again later
      }
      if (this.stopped) return;
      // Every 500 ms from the start of one poll to the next, however long it took.
      const period = document.visibilityState === 'visible' ? 500 : 5000;
      this.pollTimer = setTimeout(tick, Math.max(0, period - (Date.now() - started)));
    };
    this.onVisible = () => {
      if (document.visibilityState === 'visible') {
        clearTimeout(this.pollTimer);
        tick();
      }
    };
    document.addEventListener('visibilitychange', this.onVisible);
    tick();
  }

  dispose() {
    this.stopped = true;
    clearTimeout(this.pollTimer);
    document.removeEventListener('visibilitychange', this.onVisible);
    for (const s of this.sessions.values()) s.dispose();
    this.sessions.clear();
    this.channel?.close();
  }
}
