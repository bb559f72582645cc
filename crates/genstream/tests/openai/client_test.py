"""The official `openai` Python client against a running genstream (driven by
crates/genstream/tests/openai.rs, which starts the server and passes its address and
API keys in the environment). The client's own parsers and types judge the shapes.

Each check prints `ok <name>`; the first failure raises (non-zero exit).
"""

import os
import time

import openai
from openai import OpenAI

URL = os.environ["GENSTREAM_URL"] + "/v1"
KEY = os.environ["GENSTREAM_KEY"]
REVOKED_KEY = os.environ["GENSTREAM_REVOKED_KEY"]
TOOLS_MODEL = os.environ["GENSTREAM_TOOLS_MODEL"]

client = OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


def check(name):
    def wrap(f):
        f()
        print(f"ok {name}", flush=True)
        return f

    return wrap


def deadline_loop(seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield
        time.sleep(0.05)
    raise AssertionError("deadline passed")


@check("models")
def _():
    ids = [m.id for m in client.models.list()]
    assert "demo" in ids and TOOLS_MODEL in ids, ids


@check("chat completion, not streamed, and retrieved")
def _():
    raw = client.chat.completions.with_raw_response.create(
        model="demo",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ],
    )
    assert raw.headers.get("x-genstream-stream-id"), raw.headers
    c = raw.parse()
    assert c.object == "chat.completion"
    assert c.choices[0].finish_reason == "stop"
    assert c.choices[0].message.content
    assert c.usage.completion_tokens > 0
    stored = client.chat.completions.retrieve(c.id)
    assert stored.choices[0].message.content == c.choices[0].message.content


@check("chat completion, streamed with usage")
def _():
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, cid = "", None, None, None
    for chunk in stream:
        cid = chunk.id
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text and finish == "stop" and usage and usage.total_tokens > 0
    assert client.chat.completions.retrieve(cid).choices[0].message.content == text


@check("chat completion, client tool round trip")
def _():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    messages = [{"role": "user", "content": "weather and sums"}]
    first = client.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    second = client.chat.completions.create(model=TOOLS_MODEL, messages=messages, tools=tools)
    assert second.choices[0].message.content == "The tools said: sunny.", second


@check("responses, client tool round trip with previous_response_id")
def _():
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    first = client.responses.create(model=TOOLS_MODEL, input="weather and sums", tools=tools)
    assert first.status == "completed", first
    calls = [i for i in first.output if i.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"], first.output
    ran = [i for i in first.output if i.type == "mcp_call"]
    assert ran and ran[0].output, first.output
    second = client.responses.create(
        model=TOOLS_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}],
        tools=tools,
    )
    assert second.output_text == f"The tools said: {ran[0].output}; sunny.", second.output_text
    items = client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"], items


@check("responses, background, poll, stream resumed with starting_after")
def _():
    r = client.responses.create(model="demo", input="tell me", background=True)
    assert r.status in ("queued", "in_progress"), r.status
    assert client.responses.retrieve(r.id).status in ("queued", "in_progress", "completed")
    # Read a few events, drop the connection, resume after the last one seen.
    seen = []
    with client.responses.retrieve(r.id, stream=True) as stream:
        for event in stream:
            seen.append(event)
            if len(seen) == 6:
                break
    rest = list(client.responses.retrieve(r.id, stream=True, starting_after=seen[-1].sequence_number))
    full = list(client.responses.retrieve(r.id, stream=True))
    assert [e.model_dump() for e in seen + rest] == [e.model_dump() for e in full]
    assert [e.sequence_number for e in full] == list(range(len(full)))
    assert full[-1].type == "response.completed", full[-1].type
    text = "".join(e.delta for e in full if e.type == "response.output_text.delta")
    for _ in deadline_loop():
        done = client.responses.retrieve(r.id)
        if done.status == "completed":
            break
    assert done.output_text == text
    try:
        client.responses.retrieve(r.id, stream=True, starting_after=len(full) + 10)
        raise AssertionError("a position beyond the stream was accepted")
    except openai.BadRequestError as e:
        assert e.param == "starting_after", e.body


@check("responses, cancel keeps the partial output")
def _():
    r = client.responses.create(model="slow", input="a long answer", background=True)
    for _ in deadline_loop():
        if client.responses.retrieve(r.id).output_text:
            break
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled", cancelled.status
    assert cancelled.output_text
    again = client.responses.cancel(r.id)
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    polled = client.responses.retrieve(r.id)
    assert polled.status == "cancelled" and polled.output_text == cancelled.output_text
    client.responses.delete(r.id)
    try:
        client.responses.retrieve(r.id)
        raise AssertionError("a deleted response was found")
    except openai.NotFoundError:
        pass


@check("errors: bad parameter, unknown id, revoked key")
def _():
    try:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], n=2
        )
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert e.param == "n", e.body
    try:
        client.responses.retrieve("resp_0190f5e67a1b7c2d8e3f0000000000c1")
        raise AssertionError("an unknown response was found")
    except openai.NotFoundError:
        pass
    revoked = OpenAI(base_url=URL, api_key=REVOKED_KEY, max_retries=0)
    try:
        revoked.models.list()
        raise AssertionError("a revoked key was accepted")
    except openai.AuthenticationError:
        pass
