// The web chat app: sign-in, the conversation list, one conversation's message tree
// with its running answer, and the composer. Views are Preact components written with
// htm (no build step); the state they show lives in the session manager (session.js),
// which follows running answers and hears about other tabs and devices.

import { h, render } from './vendor/preact.mjs';
import { useEffect, useMemo, useRef, useState, useCallback } from './vendor/preact-hooks.mjs';
import htm from './vendor/htm.mjs';
import { api, getToken, setToken, clearToken, onUnauthorized } from './api.js';
import { Session, SessionManager, usageByMessage } from './session.js';
import { renderMarkdown } from './markdown.js';

const html = htm.bind(h);

// ---------------------------------------------------------------- small helpers

/** Subscribes a component to a Store. */
function useStore(store) {
  const [, force] = useState(0);
  useEffect(() => (store ? store.subscribe(() => force((n) => n + 1)) : undefined), [store]);
  return store ? store.get() : undefined;
}

/** `/c/{id}` → that conversation; anything else → a new chat. */
function parseRoute(path) {
  const m = /^\/c\/([^/]+)\/?$/.exec(path);
  return m ? { name: 'conversation', id: decodeURIComponent(m[1]) } : { name: 'new' };
}

const route = {
  listeners: new Set(),
  current: parseRoute(location.pathname),
  go(path, { replace = false } = {}) {
    if (path === location.pathname) return;
    if (replace) history.replaceState(null, '', path);
    else history.pushState(null, '', path);
    this.update();
  },
  update() {
    this.current = parseRoute(location.pathname);
    for (const fn of this.listeners) fn(this.current);
  },
};
window.addEventListener('popstate', () => route.update());

function useRoute() {
  const [r, set] = useState(route.current);
  useEffect(() => {
    route.listeners.add(set);
    return () => route.listeners.delete(set);
  }, []);
  return r;
}

const MODEL_KEY = 'genstream.model';

/** Credits (1 credit = 1e-6 USD) as dollars: cents from $1 up, three digits below. */
function dollars(credits) {
  const usd = (credits || 0) / 1e6;
  if (usd === 0) return '$0';
  const opts =
    Math.abs(usd) >= 1 ? { minimumFractionDigits: 2, maximumFractionDigits: 2 } : { maximumSignificantDigits: 3 };
  return `$${usd.toLocaleString('en-US', opts)}`;
}

function plural(n, one, many) {
  return `${n.toLocaleString()} ${n === 1 ? one : many}`;
}

function messageStatus(m) {
  if (m.error) return 'error';
  if (m.unfinished) return 'unfinished';
  return 'complete';
}

// ---------------------------------------------------------------- sign-in

function SignIn({ message, onSignIn }) {
  const [value, setValue] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const input = useRef(null);
  useEffect(() => input.current?.focus(), []);

  async function submit(e) {
    e.preventDefault();
    const token = value.trim();
    if (!token) return;
    setBusy(true);
    setError(null);
    try {
      const res = await fetch('/api/models', { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
      if (res.status === 401) {
        setError('That token or API key was refused.');
        return;
      }
      onSignIn(token);
    } catch {
      setError('The server cannot be reached.');
    } finally {
      setBusy(false);
    }
  }

  return html`
    <main class="signin" id="main">
      <form class="signin-card" onSubmit=${submit} aria-labelledby="signin-title">
        <h1 id="signin-title">Sign in to genstream</h1>
        ${message && html`<p class="notice" role="status">${message}</p>`}
        <label for="token">Token or API key</label>
        <input
          id="token"
          ref=${input}
          type="password"
          autocomplete="off"
          spellcheck="false"
          value=${value}
          onInput=${(e) => setValue(e.currentTarget.value)}
          aria-describedby="token-help"
        />
        <p id="token-help" class="help">
          A JWT (<code>genstream token --user NAME</code>) or an API key. <code>genstream serve</code> prints a
          ready sign-in link for the user <code>dev</code>.
        </p>
        ${error && html`<p class="error" role="alert">${error}</p>`}
        <button type="submit" class="primary" disabled=${busy || !value.trim()}>Sign in</button>
      </form>
    </main>
  `;
}

// ---------------------------------------------------------------- the shell

function Shell({ manager, onSignOut }) {
  const r = useRoute();
  const convs = useStore(manager.conversations);
  const [models, setModels] = useState(null);
  const [model, setModel] = useState(() => localStorage.getItem(MODEL_KEY) || '');
  const [balance, setBalance] = useState(null);
  const [menuOpen, setMenuOpen] = useState(false);

  useEffect(() => {
    api('/api/models')
      .then(({ models }) => setModels(models))
      .catch(() => setModels([]));
    manager.refreshConversations();
    manager.startPolling();
  }, [manager]);

  const refreshBalance = useCallback(() => {
    api('/api/balance')
      .then((b) => setBalance(b.balance))
      .catch(() => {});
  }, []);
  useEffect(() => {
    refreshBalance();
    manager.onJobEnded = refreshBalance;
  }, [manager, refreshBalance]);

  // The chosen model, or the server's first when the stored one is gone.
  const modelNames = (models || []).map((m) => m.name);
  const current = modelNames.includes(model) ? model : modelNames[0] || '';
  const chooseModel = (name) => {
    setModel(name);
    localStorage.setItem(MODEL_KEY, name);
  };

  useEffect(() => setMenuOpen(false), [r]);
  // Escape closes the conversation list on a phone.
  useEffect(() => {
    if (!menuOpen) return undefined;
    const onKey = (e) => e.key === 'Escape' && setMenuOpen(false);
    window.addEventListener('keydown', onKey);
    return () => window.removeEventListener('keydown', onKey);
  }, [menuOpen]);

  const activeId = r.name === 'conversation' ? r.id : null;
  const title = activeId ? convs.list.find((c) => c.conversationId === activeId)?.title : null;
  useEffect(() => {
    document.title = title ? `${title} · genstream` : 'genstream';
  }, [title]);

  return html`
    <a class="skip" href="#composer-input">Skip to the message box</a>
    <div class=${`app ${menuOpen ? 'menu-open' : ''}`}>
      <header class="topbar">
        <button
          type="button"
          class="icon menu"
          aria-expanded=${menuOpen ? 'true' : 'false'}
          aria-controls="sidebar"
          onClick=${() => setMenuOpen(!menuOpen)}
        >
          <span aria-hidden="true">☰</span> Chats
        </button>
        <span class="brand topbar-title">${title || 'genstream'}</span>
      </header>
      <div class="sidebar" id="sidebar">
        <div class="sidebar-head">
          <span class="brand">genstream</span>
          <button type="button" class="new-chat" onClick=${() => route.go('/')}>New chat</button>
        </div>
        <nav aria-label="Conversations" class="conversations">
          ${convs.loaded && convs.list.length === 0 && html`<p class="empty">No conversations yet.</p>`}
          <ul>
            ${convs.list.map(
              (c) => html`
                <li key=${c.conversationId}>
                  <a
                    href=${`/c/${encodeURIComponent(c.conversationId)}`}
                    aria-current=${c.conversationId === activeId ? 'page' : undefined}
                    onClick=${(e) => {
                      if (e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
                      e.preventDefault();
                      route.go(`/c/${encodeURIComponent(c.conversationId)}`);
                    }}
                  >
                    ${manager.isActive(c.conversationId) &&
                    html`<span class="dot" title="answering"><span class="sr-only">answering: </span></span>`}
                    ${c.title || 'Untitled'}
                  </a>
                </li>
              `,
            )}
          </ul>
        </nav>
        <div class="account">
          ${balance !== null && balance !== undefined && html`<p class="balance">Balance <strong>${dollars(balance)}</strong></p>`}
          <button type="button" class="link" onClick=${() => onSignOut()}>Sign out</button>
        </div>
      </div>
      <div class="scrim" onClick=${() => setMenuOpen(false)} aria-hidden="true"></div>
      <main class="main" id="main">
        <${Conversation}
          key=${activeId || 'new'}
          manager=${manager}
          conversationId=${activeId}
          title=${title}
          models=${models}
          model=${current}
          onModel=${chooseModel}
        />
      </main>
    </div>
  `;
}

// ---------------------------------------------------------------- one conversation

/**
 * The messages of the displayed branch of the tree: from the root, at each level the
 * chosen sibling (the newest unless the user picked another).
 */
function branchPath(messages, live, chosen) {
  const all = [...messages];
  const ids = new Set(all.map((m) => m.messageId));
  if (live?.userMessage && !ids.has(live.userMessage.messageId)) {
    all.push(live.userMessage);
    ids.add(live.userMessage.messageId);
  }
  if (live && !ids.has(live.responseMessageId)) {
    all.push({
      messageId: live.responseMessageId || `live-${live.streamId}`,
      parentMessageId: live.userMessage?.messageId ?? null,
      isCreatedByUser: false,
      sender: live.model,
      model: live.model,
      text: live.text,
      content: live.content,
      createdAt: '\uffff', // newest
      live,
    });
  }
  const children = new Map();
  all.forEach((m, i) => {
    const p = m.parentMessageId ?? null;
    if (!children.has(p)) children.set(p, []);
    children.get(p).push({ m, i });
  });
  for (const kids of children.values()) {
    kids.sort((a, b) => (a.m.createdAt < b.m.createdAt ? -1 : a.m.createdAt > b.m.createdAt ? 1 : a.i - b.i));
  }
  const path = [];
  let parent = null;
  const seen = new Set();
  for (;;) {
    const kids = children.get(parent);
    if (!kids || kids.length === 0) break;
    const want = chosen[parent ?? ''];
    let index = kids.findIndex((k) => k.m.messageId === want);
    if (index < 0) index = kids.length - 1;
    const m = kids[index].m;
    if (seen.has(m.messageId)) break;
    seen.add(m.messageId);
    path.push({ message: m, siblings: kids.map((k) => k.m.messageId), index });
    parent = m.messageId;
  }
  return path;
}

/**
 * Whether an answer can be asked again: the question goes again as a new message beside
 * the old one, under the same parent. The first question of a conversation has none,
 * and the API gives a message without `parentMessageId` the latest one as parent, so
 * only later turns can be regenerated.
 */
function canRegenerate(path, answer) {
  const user = path.find((p) => p.message.messageId === answer.parentMessageId)?.message;
  return Boolean(user?.parentMessageId);
}

function Conversation({ manager, conversationId, title, models, model, onModel }) {
  const session = conversationId ? manager.session(conversationId) : null;
  const state = useStore(session?.store);
  const usage = useStore(usageByMessage);
  const [chosen, setChosen] = useState({});
  const [announce, setAnnounce] = useState('');
  const list = useRef(null);
  const stick = useRef(true);

  useEffect(() => {
    if (session && !session.state.loaded) session.load();
  }, [session]);

  const live = state?.live || null;
  const path = useMemo(
    () => (state ? branchPath(state.messages, live, chosen) : []),
    [state?.messages, live, chosen],
  );
  const busy = live?.status === 'streaming';
  const last = path.length ? path[path.length - 1].message : null;

  // Keep the newest text in view while the user has not scrolled up.
  useEffect(() => {
    const el = list.current;
    if (el && stick.current) el.scrollTop = el.scrollHeight;
  });
  const onScroll = () => {
    const el = list.current;
    if (el) stick.current = el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  };

  // What a screen reader hears: the answer's state changes, not every token.
  const lastStatus = last && !last.isCreatedByUser ? (last.live ? last.live.status : messageStatus(last)) : null;
  const connection = last?.live?.connection;
  const prev = useRef({ status: lastStatus, connection });
  useEffect(() => {
    const p = prev.current;
    if (p.status === 'streaming' && lastStatus !== 'streaming') {
      setAnnounce(
        lastStatus === 'complete' ? 'Answer complete.' : lastStatus === 'unfinished' ? 'Answer stopped.' : 'The answer failed.',
      );
    } else if (lastStatus === 'streaming' && p.status !== 'streaming') {
      setAnnounce('Answering…');
    } else if (connection === 'reconnecting' && p.connection !== 'reconnecting') {
      setAnnounce('Connection lost, reconnecting…');
    }
    prev.current = { status: lastStatus, connection };
  }, [lastStatus, connection]);

  async function send(text) {
    const r = await Session.start(manager, {
      text,
      conversationId,
      parentMessageId: conversationId ? last?.messageId || undefined : undefined,
      model,
    });
    stick.current = true;
    if (!conversationId) route.go(`/c/${encodeURIComponent(r.conversationId)}`);
  }

  async function regenerate(answer) {
    const user = path.find((p) => p.message.messageId === answer.parentMessageId)?.message;
    if (!user) return;
    setChosen((c) => ({ ...c, [user.parentMessageId ?? '']: undefined }));
    await Session.start(manager, { text: user.text, conversationId, parentMessageId: user.parentMessageId, model });
  }

  const heading = title || (path[0]?.message.text ?? '').slice(0, 50) || (conversationId ? 'Conversation' : 'New chat');

  return html`
    <div class="conversation">
      <header class="conv-header">
        <h1>${heading}</h1>
      </header>
      <section class="messages" aria-label="Messages" ref=${list} onScroll=${onScroll}>
        ${!conversationId && html`<div class="welcome">
          <h2>What shall we talk about?</h2>
          <p>Answers are durable: reload, close the tab or open another device — the answer keeps going and you find it where it is.</p>
        </div>`}
        ${state?.error && html`<p class="error" role="alert">${state.error}</p>`}
        ${conversationId && state && !state.loaded && html`<p class="loading">Loading…</p>`}
        ${path.map(
          (p) => html`<${Message}
            key=${p.message.messageId}
            message=${p.message}
            siblings=${p.siblings}
            index=${p.index}
            usage=${p.message.live?.usage || usage[p.message.messageId]}
            errorText=${state.errors?.[p.message.messageId]}
            onChoose=${(id) => setChosen((c) => ({ ...c, [p.message.parentMessageId ?? '']: id }))}
            onRegenerate=${!busy && p.message === last && !last.isCreatedByUser && !last.live && canRegenerate(path, last)
              ? () => regenerate(last)
              : null}
          />`,
        )}
      </section>
      <${Composer}
        busy=${busy}
        onSend=${send}
        onStop=${() => session?.stop()}
        models=${models}
        model=${model}
        onModel=${onModel}
      />
      <div class="sr-only" aria-live="polite" role="status">${announce}</div>
    </div>
  `;
}

function Message({ message, siblings, index, usage, errorText, onChoose, onRegenerate }) {
  const user = message.isCreatedByUser;
  const live = message.live;
  const status = user ? 'complete' : live ? live.status : messageStatus(message);
  const content = live ? live.content : message.content?.length ? message.content : [{ type: 'text', text: message.text }];
  return html`
    <article
      class=${`message ${user ? 'from-user' : 'from-assistant'}`}
      data-testid="message"
      data-author=${user ? 'user' : 'assistant'}
      data-status=${status}
      data-message-id=${message.messageId}
      aria-busy=${status === 'streaming' ? 'true' : 'false'}
    >
      <header class="message-meta">
        <span class="who">${user ? 'You' : message.model || message.sender || 'Assistant'}</span>
        ${siblings.length > 1 &&
        html`<span class="versions">
          <button type="button" class="icon" aria-label="Previous version" disabled=${index === 0} onClick=${() => onChoose(siblings[index - 1])}>‹</button>
          <span>${index + 1} / ${siblings.length}</span>
          <button type="button" class="icon" aria-label="Next version" disabled=${index === siblings.length - 1} onClick=${() => onChoose(siblings[index + 1])}>›</button>
        </span>`}
      </header>
      ${user
        ? html`<div class="user-text">${message.text}</div>`
        : html`<div class="parts">
            ${content.map((part, i) => html`<${Part} key=${i} part=${part} streaming=${status === 'streaming'} />`)}
            ${status === 'streaming' && !live?.text && !live?.retry && html`<span class="typing" aria-hidden="true"><i></i><i></i><i></i></span>`}
          </div>`}
      ${!user && html`<${MessageFooter} status=${status} live=${live} usage=${usage} errorText=${errorText} onRegenerate=${onRegenerate} />`}
    </article>
  `;
}

function Part({ part, streaming }) {
  switch (part.type) {
    case 'text':
      return html`<${Markdown} text=${part.text} />`;
    case 'think':
      return html`<details class="reasoning">
        <summary>${streaming ? 'Reasoning…' : 'Reasoning'}</summary>
        <div class="think">${part.think}</div>
      </details>`;
    case 'redacted_thinking':
      return html`<details class="reasoning"><summary>Reasoning (redacted by the provider)</summary></details>`;
    case 'tool_call':
      return html`<${ToolCall} call=${part.tool_call} />`;
    default:
      return null;
  }
}

const Markdown = ({ text }) => {
  const out = useMemo(() => renderMarkdown(text), [text]);
  return html`<div class="md" data-testid="message-text" dangerouslySetInnerHTML=${{ __html: out }}></div>`;
};

function pretty(json) {
  try {
    return JSON.stringify(JSON.parse(json), null, 2);
  } catch {
    return json;
  }
}

function ToolCall({ call }) {
  const done = call.output !== undefined && call.output !== null;
  return html`
    <div class="tool" data-testid="tool-call">
      <div class="tool-name"><span aria-hidden="true">⚙</span> Tool <code>${call.name || '…'}</code> ${!done && html`<span class="muted">running…</span>`}</div>
      <div class="tool-io">
        <div><div class="label">Arguments</div><pre>${pretty(call.args || '')}</pre></div>
        ${done && html`<div><div class="label">Result</div><pre data-testid="tool-result">${pretty(call.output)}</pre></div>`}
      </div>
    </div>
  `;
}

function Countdown({ until }) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 250);
    return () => clearInterval(t);
  }, []);
  return Math.max(0, Math.ceil((until - now) / 1000));
}

function MessageFooter({ status, live, usage, errorText, onRegenerate }) {
  const retry = live?.retry;
  return html`
    <footer class="message-foot">
      ${status === 'streaming' && live?.connection !== 'reconnecting' && !retry &&
      html`<span class="quiet"><span class="spinner" aria-hidden="true"></span> answering…</span>`}
      ${status === 'streaming' && live?.connection === 'reconnecting' &&
      html`<span class="quiet" data-testid="reconnecting"><span class="spinner" aria-hidden="true"></span> reconnecting…</span>`}
      ${status === 'streaming' && retry &&
      html`<span class="retry" data-testid="retry">
        retrying in <${Countdown} until=${retry.until} /> s (attempt ${retry.attempt} of ${retry.maxAttempts}):${' '}
        <span class="reason">${retry.error}</span>
      </span>`}
      ${status === 'unfinished' && html`<span class="badge">Unfinished — stopped</span>`}
      ${status === 'error' &&
      html`<span class="error-text" role="alert">${live?.error || errorText || 'The answer ended with an error; the partial answer is kept.'}</span>`}
      ${usage &&
      status !== 'streaming' &&
      html`<span class="usage" data-testid="usage">
        ${plural(usage.inputTokens || 0, 'token', 'tokens')} in · ${plural(usage.outputTokens || 0, 'token', 'tokens')} out
        ${usage.reasoningTokens ? ` (${usage.reasoningTokens.toLocaleString()} reasoning)` : ''} · ${dollars(usage.credits)}
      </span>`}
      ${onRegenerate && html`<button type="button" class="link" onClick=${onRegenerate}>Regenerate</button>`}
    </footer>
  `;
}

function Composer({ busy, onSend, onStop, models, model, onModel }) {
  const [text, setText] = useState('');
  const [error, setError] = useState(null);
  const [sending, setSending] = useState(false);
  const [stopping, setStopping] = useState(false);
  const input = useRef(null);
  useEffect(() => input.current?.focus(), []);
  useEffect(() => {
    if (!busy) setStopping(false);
  }, [busy]);

  async function submit(e) {
    e?.preventDefault();
    const t = text.trim();
    if (!t || busy || sending) return;
    setSending(true);
    setError(null);
    try {
      await onSend(t);
      setText('');
    } catch (err) {
      // The text stays in the box: nothing typed is lost.
      const wait = err.retryAfter ? ` Try again in ${err.retryAfter} s.` : '';
      setError(`${err.message || err}${wait}`);
    } finally {
      setSending(false);
      input.current?.focus();
    }
  }

  async function stop() {
    setStopping(true);
    try {
      await onStop();
    } catch (err) {
      setError(err.message || String(err));
      setStopping(false);
    }
  }

  function onKeyDown(e) {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  }

  return html`
    <form class="composer" onSubmit=${submit}>
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <label for="composer-input" class="sr-only">Message</label>
      <textarea
        id="composer-input"
        ref=${input}
        rows="1"
        placeholder="Message genstream…"
        value=${text}
        onInput=${(e) => setText(e.currentTarget.value)}
        onKeyDown=${onKeyDown}
        aria-describedby="composer-help"
      ></textarea>
      <div class="composer-bar">
        <label class="model">
          <span>Model</span>
          <select aria-label="Model" value=${model} onChange=${(e) => onModel(e.currentTarget.value)} disabled=${!models}>
            ${(models || []).map((m) => html`<option key=${m.name} value=${m.name}>${m.name}${m.free ? '' : ' · paid'}</option>`)}
          </select>
        </label>
        <span id="composer-help" class="help">Enter sends · Shift+Enter for a new line</span>
        ${busy && html`<button type="button" class="stop" onClick=${stop} disabled=${stopping}>Stop</button>`}
        <button type="submit" class="primary" disabled=${busy || sending || !text.trim()}>Send</button>
      </div>
    </form>
  `;
}

// ---------------------------------------------------------------- boot

function App() {
  const [token, setTok] = useState(getToken());
  const [message, setMessage] = useState(null);
  const manager = useMemo(() => (token ? new SessionManager() : null), [token]);

  useEffect(() => () => manager?.dispose(), [manager]);

  useEffect(() => {
    onUnauthorized(() => {
      clearToken();
      setMessage('Your token was refused or has expired. Sign in again.');
      setTok(null);
    });
    // Signing in or out in one tab does the same in the others.
    const onStorage = (e) => {
      if (e.key === 'genstream.token') {
        setTok(e.newValue);
        if (!e.newValue) setMessage('Signed out.');
      }
    };
    window.addEventListener('storage', onStorage);
    return () => window.removeEventListener('storage', onStorage);
  }, []);

  if (!token) {
    return html`<${SignIn}
      message=${message}
      onSignIn=${(t) => {
        setToken(t);
        setMessage(null);
        setTok(t);
      }}
    />`;
  }
  return html`<${Shell}
    manager=${manager}
    onSignOut=${() => {
      clearToken();
      setMessage('Signed out.');
      setTok(null);
    }}
  />`;
}

// `/#token=…` signs in with that token. The fragment never reaches the server, and it
// is removed from the address bar (and the history entry) at once.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get('token')) {
  setToken(fragment.get('token'));
  history.replaceState(null, '', location.pathname + location.search);
}

render(html`<${App} />`, document.getElementById('app'));
