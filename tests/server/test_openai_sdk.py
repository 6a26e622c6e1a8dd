"""The unmodified official `openai` SDK against a live server: models, completions, chat, streaming, errors."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import API_KEY, BASE_ID, MAX_TOKENS, PROMPTS, LiveServer


@pytest.fixture
def sdk(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)


def test_models_list(sdk: openai.OpenAI) -> None:
    ids = {m.id for m in sdk.models.list()}
    assert ids == {BASE_ID, "ft-0", "ft-1", "ft-2"}
    assert sdk.models.retrieve("ft-0").id == "ft-0"


def test_completions_plain_and_streamed(sdk: openai.OpenAI, references: dict[str, list[str]]) -> None:
    c = sdk.completions.create(model="ft-1", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0)
    assert c.choices[0].text == references["ft-1"][2]
    assert c.usage is not None and c.usage.completion_tokens >= 1
    stream = sdk.completions.create(
        model="ft-1", prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == references["ft-1"][2]
    assert chunks[-1].usage is not None


def test_chat_plain_and_streamed(sdk: openai.OpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "answer briefly"},
        {"role": "user", "content": "Hello world!"},
    ]
    plain = sdk.chat.completions.create(model="ft-0", messages=messages, max_tokens=10, temperature=0, seed=1)
    assert plain.choices[0].message.role == "assistant"
    text = plain.choices[0].message.content or ""
    stream = sdk.chat.completions.create(
        model="ft-0", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == text


def test_errors_map_to_the_sdks_exceptions(sdk: openai.OpenAI, live: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError):
        sdk.completions.create(model=BASE_ID, prompt="x", max_tokens=1, temperature=5)
