"""The OpenAI routes driven by the real `openai` package (sync and async, streamed and not)
against the real app of configs/tiny.yaml, and POST /generate's own stream."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration


def unique(text: str = "prompt") -> str:
    return f"{text} {uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def oai(tiny_app):
    with openai.OpenAI(base_url=f"{tiny_app.base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def events(response: httpx.Response) -> list[dict | str]:
    out: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_are_listed_and_looked_up(oai):
    assert [m.id for m in oai.models.list()] == ["tiny-a", "tiny-b", "tiny-c"]
    assert oai.models.retrieve("tiny-b").id == "tiny-b"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


def test_a_completion_is_what_generate_answers_and_is_in_history(oai, client):
    prompt = unique("The river")
    done = oai.completions.create(model="tiny-a", prompt=prompt, max_tokens=8, temperature=0)
    assert done.id.startswith("cmpl-") and done.object == "text_completion"
    (choice,) = done.choices
    plain = client.post("/generate", json={"prompts": [prompt], "max_new_tokens": 8}).json()[0]
    assert choice.text == plain["completion"]
    assert choice.finish_reason == plain["finish_reason"]
    assert done.usage.completion_tokens == plain["usage"]["completion_tokens"]
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    stored = client.get(f"/history/{done.id}").json()  # the cmpl- id opens the record
    assert stored["completion"] == choice.text and stored["prompt"] == prompt


def test_a_stream_sends_the_text_as_it_is_decoded(oai, client):
    prompt = unique("Streaming")
    chunks = list(
        oai.completions.create(
            model="tiny-c",
            prompt=prompt,
            max_tokens=16,
            temperature=0.9,
            seed=11,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 3  # many chunks, not the whole text at the end
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    again = oai.completions.create(
        model="tiny-c", prompt=prompt, max_tokens=16, temperature=0.9, seed=11
    )
    assert "".join(texts) == again.choices[0].text  # seeded: cached, and the same text
    stored = client.get(f"/history/{chunks[0].id}").json()
    assert stored["ttft_ms"] is not None and 0 < stored["ttft_ms"] <= stored["latency_ms"]
    assert stored["completion"] == "".join(texts)


def test_chat_renders_the_template_and_keeps_the_messages(oai, client):
    user = unique("chatter")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about rivers."},
    ]
    done = oai.chat.completions.create(
        model="tiny-b", messages=messages, max_tokens=10, temperature=0, user=user
    )
    assert done.id.startswith("chatcmpl-") and done.object == "chat.completion"
    message = done.choices[0].message
    assert message.role == "assistant" and "\nUser:" not in message.content
    stored = client.get(f"/history/{done.id}").json()
    assert stored["messages"] == messages and stored["user_id"] == user
    assert stored["prompt"] == "Be brief.\n\nUser: Tell me about rivers.\nAssistant:"

    streamed = list(
        oai.chat.completions.create(
            model="tiny-b", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert content == message.content
    assert streamed[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_a_stop_sequence_cuts_the_text_before_it(oai):
    prompt = unique("Stop here")
    full = oai.completions.create(model="tiny-a", prompt=prompt, max_tokens=20, temperature=0)
    text = full.choices[0].text
    stop = text[6:9]
    cut = oai.completions.create(
        model="tiny-a", prompt=prompt, max_tokens=20, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = oai.completions.create(
        model="tiny-a", prompt=prompt, max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[: text.index(stop)]


def test_n_choices_and_a_list_of_prompts(oai):
    seeded = oai.completions.create(
        model="tiny-a", prompt=unique("Two ways"), max_tokens=12, temperature=1.2, seed=3, n=2
    )
    assert [c.index for c in seeded.choices] == [0, 1]
    assert seeded.choices[0].text != seeded.choices[1].text  # choice i samples from seed + i
    prompts = [unique("first"), unique("second")]
    both = oai.completions.create(model="tiny-a", prompt=prompts, max_tokens=4, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    streamed = oai.completions.create(
        model="tiny-a", prompt=prompts, max_tokens=4, temperature=0, stream=True
    )
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[0], texts[1]] == [c.text for c in both.choices]


def test_errors_reach_the_client_as_openai_errors(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="tiny-a", prompt="word " * 500, max_tokens=100)
    assert err.value.code == "context_length_exceeded" and "512" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="tiny-a", prompt="hi", max_tokens=2, logprobs=2)
    assert err.value.param == "logprobs" and "not supported" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "hi"}], tools=[{"x": 1}]
        )
    assert err.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="tiny-a", prompt="hi", temperature=3)
    assert err.value.param == "temperature"
    # "Off" values of unsupported fields are accepted, as clients send them.
    oai.completions.create(model="tiny-a", prompt="hi", max_tokens=1, presence_penalty=0)


async def test_the_async_client_streams_too(tiny_app):
    async with openai.AsyncOpenAI(
        base_url=f"{tiny_app.base_url}/v1", api_key="unused", max_retries=0
    ) as aoai:
        stream = await aoai.chat.completions.create(
            model="tiny-a",
            messages=[{"role": "user", "content": unique("async")}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        plain = await aoai.chat.completions.create(
            model="tiny-a",
            messages=[{"role": "user", "content": unique("async")}],
            max_tokens=8,
            temperature=0,
        )
    assert len(parts) > 1 and plain.choices[0].message.content is not None


def test_a_client_that_goes_away_stops_the_work_and_keeps_a_record(tiny_app, client):
    user = unique("leaver")
    body = {
        "model": "tiny-a",
        "prompt": unique("A long story"),
        "max_tokens": 480,
        "temperature": 0.8,
        "stream": True,
        "user": user,
    }
    with httpx.Client(base_url=tiny_app.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [line for line, _ in zip(lines, range(6), strict=False) if line]
    assert got  # some text arrived before we hung up
    deadline = time.monotonic() + 30
    items = []
    while time.monotonic() < deadline and not items:
        items = client.get("/history", params={"user_id": user}).json()["items"]
        time.sleep(0.2)
    (record,) = items
    assert record["finish_reason"] == "cancelled"
    assert 1 <= record["usage"]["completion_tokens"] < 480
    time.sleep(1)
    assert client.get("/stats").json()["generator"]["active_rows"] == 0


def test_generate_streams_one_prompt(client):
    prompt = unique("Own stream")
    body = {"prompts": [prompt], "max_new_tokens": 10, "stream": True}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        got = events(response)
    assert got[-1] == "[DONE]"
    record = got[-2]["record"]
    assert "".join(e["text"] for e in got[:-2]) == record["completion"]
    assert record["prompt"] == prompt and record["ttft_ms"] is not None
    r = client.post("/generate", json={**body, "prompts": [prompt, prompt]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"


def test_metadata_is_stored_filtered_and_chats_are_listed(oai, client):
    run = unique("run")
    chat = [{"role": "user", "content": unique("label me")}]
    first = oai.chat.completions.create(
        model="tiny-a", messages=chat, max_tokens=4, temperature=0, metadata={"run": run}
    )
    second = oai.chat.completions.create(
        model="tiny-b",
        messages=chat,
        max_tokens=4,
        temperature=0,
        metadata={"run": run, "kind": "b"},
    )
    oai.completions.create(  # a plain completion: in history, not among the chats
        model="tiny-a", prompt=unique("plain"), max_tokens=2, extra_body={"metadata": {"run": run}}
    )
    everything = client.get("/history", params={"metadata[run]": run}).json()["items"]
    assert len(everything) == 3 and all(i["metadata"]["run"] == run for i in everything)
    only_b = client.get("/history", params={"metadata[run]": run, "metadata[kind]": "b"})
    assert [i["id"] for i in only_b.json()["items"]] == [second.id.removeprefix("chatcmpl-")]

    listed = oai.chat.completions.list(metadata={"run": run})
    assert [c.id for c in listed.data] == [first.id, second.id]  # oldest first
    page = oai.chat.completions.list(metadata={"run": run}, limit=1)
    assert [c.id for c in page.data] == [first.id] and page.has_more
    rest = oai.chat.completions.list(metadata={"run": run}, after=first.id)
    assert [c.id for c in rest.data] == [second.id]
    newest = oai.chat.completions.list(metadata={"run": run}, order="desc", model="tiny-b")
    assert [c.id for c in newest.data] == [second.id]

    stored = oai.chat.completions.retrieve(first.id)
    assert stored.choices[0].message.content == first.choices[0].message.content
    assert stored.metadata == {"run": run}
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model="tiny-a",
            messages=chat,
            max_tokens=1,
            metadata={f"k{i}": "v" for i in range(17)},
        )
    assert err.value.param == "metadata"
    assert client.get("/history", params={"metadata[x]": "y" * 600}).status_code == 400
