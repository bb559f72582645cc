// The official `ai` package's DefaultChatTransport (what useChat uses) against a
// running genstream: GENSTREAM_URL and GENSTREAM_KEY (an API key). Prints `ok <name>`
// per check; exits non-zero on the first failure. Run by crates/genstream/tests/ai_sdk.rs.
import assert from 'node:assert/strict';
import { DefaultChatTransport } from 'ai';

const url = process.env.GENSTREAM_URL;
const headers = { Authorization: `Bearer ${process.env.GENSTREAM_KEY}` };
const transport = (model) =>
  new DefaultChatTransport({ api: `${url}/api/ai/chat`, headers, body: { model } });
const user = (text) => ({ id: 'u1', role: 'user', parts: [{ type: 'text', text }] });

/** Reads a stream of UIMessageChunks, at most `limit`, then cancels it. */
async function read(stream, limit = Infinity) {
  const chunks = [];
  const reader = stream.getReader();
  while (chunks.length < limit) {
    const { done, value } = await reader.read();
    if (done) return chunks;
    chunks.push(value);
  }
  await reader.cancel();
  return chunks;
}

const textOf = (chunks) =>
  chunks.filter((c) => c.type === 'text-delta').map((c) => c.delta).join('');

async function saved(chatId, messageId) {
  for (let i = 0; i < 500; i++) {
    const r = await fetch(`${url}/api/conversations/${chatId}/messages`, { headers });
    const body = await r.json();
    const all = Array.isArray(body) ? body : body.messages;
    const m = all.find((m) => m.messageId === messageId && !m.unfinished);
    if (m) return m;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`answer ${messageId} never saved`);
}

const chatId = `node-${Date.now()}`;

// 1. sendMessages: a whole answer, chunks the package accepted.
{
  const stream = await transport('demo').sendMessages({
    chatId, messages: [user('hello')], trigger: 'submit-message',
    messageId: undefined, abortSignal: undefined,
  });
  const chunks = await read(stream);
  assert.equal(chunks[0].type, 'start');
  assert.equal(chunks.at(-1).type, 'finish');
  assert.ok(chunks.some((c) => c.type === 'text-delta'));
  const m = await saved(chatId, chunks[0].messageId);
  assert.equal(textOf(chunks), m.text);
  console.log('ok sendMessages');
}

// 2. reconnectToStream with nothing running: null (the route's 204).
{
  assert.equal(await transport('demo').reconnectToStream({ chatId }), null);
  console.log('ok reconnect idle');
}

// 3. A dropped connection, then reconnectToStream: the whole answer from `start`.
{
  const t = transport('mid');
  const first = await read(
    await t.sendMessages({
      chatId, messages: [user('hello'), user('again')], trigger: 'submit-message',
      messageId: undefined, abortSignal: undefined,
    }),
    3,
  );
  assert.equal(first[0].type, 'start');
  const resumed = await t.reconnectToStream({ chatId });
  assert.ok(resumed, 'a running job is resumed');
  const chunks = await read(resumed);
  assert.equal(chunks[0].type, 'start');
  assert.equal(chunks[0].messageId, first[0].messageId);
  assert.equal(chunks.at(-1).type, 'finish');
  const m = await saved(chatId, chunks[0].messageId);
  assert.equal(textOf(chunks), m.text);
  console.log('ok reconnectToStream');
}
