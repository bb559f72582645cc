// The answer so far, folded from a job's events in seq order: the page's copy of the
// server's content aggregator (crates/engine/src/aggregate.rs), with the same rules,
// so that what the page shows while streaming is what the server will save.
//
// Each run step owns one content part, placed by the step's `index`: a
// `message_creation` step becomes a `text` or `think` part with its first delta, a
// `tool_calls` step a `tool_call` part whose arguments grow with `on_run_step_delta`
// and whose `output` arrives with `on_run_step_completed`. A `retry` event drops the
// steps it names (what the failed attempt streamed), so no text appears twice.

export class Answer {
  constructor() {
    /** @type {{id: string, index: number, part: object|null}[]} */
    this.steps = [];
  }

  /** Starts over from a `sync` snapshot (`resumeState`): its run steps and content. */
  static fromSnapshot(state) {
    const a = new Answer();
    // `aggregatedContent` is ordered by step index and holds only the steps that have
    // a part, so walk the steps in index order and give each the next part of its
    // kind. Only a message step opened a moment ago can still lack its part.
    const steps = [...(state.runSteps || [])].sort((x, y) => x.index - y.index);
    const parts = [...(state.aggregatedContent || [])];
    for (const s of steps) {
      const next = parts[0];
      const fits =
        next &&
        (s.type === 'tool_calls' ? next.type === 'tool_call' : next.type !== 'tool_call');
      a.steps.push({ id: s.id, index: s.index, part: fits ? clone(parts.shift()) : null });
    }
    return a;
  }

  /** Folds one event (`{seq, event, data}`) in. */
  apply(ev) {
    const d = ev.data;
    switch (ev.event) {
      case 'on_run_step': {
        const part =
          d.type === 'tool_calls'
            ? { type: 'tool_call', tool_call: { ...emptyCall(), ...(d.stepDetails?.tool_calls?.[0] || {}) } }
            : null;
        this.steps.push({ id: d.id, index: d.index, part });
        break;
      }
      case 'on_message_delta': {
        const s = this.step(d.id);
        if (!s) break;
        for (const c of d.delta?.content || []) {
          if (c.type !== 'text') continue;
          if (s.part?.type === 'text') s.part = { type: 'text', text: s.part.text + c.text };
          else s.part = { type: 'text', text: c.text };
        }
        break;
      }
      case 'on_reasoning_delta': {
        const s = this.step(d.id);
        if (!s) break;
        for (const c of d.delta?.content || []) {
          if (c.type === 'think' && s.part?.type === 'think') {
            s.part = { ...s.part, think: s.part.think + c.think };
          } else if (c.type === 'think' || c.type === 'redacted_thinking') {
            s.part = clone(c);
          }
        }
        break;
      }
      case 'on_run_step_delta': {
        const s = this.step(d.id);
        if (!s) break;
        const call = s.part?.type === 'tool_call' ? { ...s.part.tool_call } : emptyCall();
        for (const chunk of d.delta?.tool_calls || []) {
          if (chunk.id) call.id = chunk.id;
          if (chunk.name) call.name = chunk.name;
          call.args += chunk.args || '';
        }
        s.part = { type: 'tool_call', tool_call: call };
        break;
      }
      case 'on_run_step_completed': {
        const s = this.step(d.result?.id);
        if (s) s.part = { type: 'tool_call', tool_call: clone(d.result.tool_call) };
        break;
      }
      case 'retry': {
        const gone = new Set(d.discardStepIds || []);
        if (gone.size) this.steps = this.steps.filter((s) => !gone.has(s.id));
        break;
      }
      default:
        break;
    }
  }

  step(id) {
    for (let i = this.steps.length - 1; i >= 0; i--) if (this.steps[i].id === id) return this.steps[i];
    return null;
  }

  /** The content parts, ordered by step index. */
  content() {
    return this.steps
      .filter((s) => s.part)
      .sort((a, b) => a.index - b.index)
      .map((s) => s.part);
  }

  /** Every text part, concatenated: the message's `text` once saved. */
  text() {
    return textOf(this.content());
  }
}

/** Concatenates the text parts of a content array. */
export function textOf(content) {
  let s = '';
  for (const p of content || []) if (p.type === 'text') s += p.text;
  return s;
}

function emptyCall() {
  return { id: '', name: '', args: '' };
}

function clone(v) {
  return v === undefined ? v : JSON.parse(JSON.stringify(v));
}
