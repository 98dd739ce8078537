"""serve: OpenAI's API on a tiny trained run, checked with the official openai client."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import post, running_server

from instructlm.answering.answerer import Answerer
from instructlm.cli import main
from instructlm.serve.app import create_app, listen
from instructlm.serve.settings import ServeSettings

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

LIMITS = ServeSettings(max_tokens=24, max_prompt_tokens=200)


@pytest.fixture(scope="module")
def run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def models(tiny_models) -> dict[str, Answerer]:
    return tiny_models


@pytest.fixture(scope="module")
def url(models) -> str:
    with running_server(create_app(models, LIMITS)) as address:
        yield address


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


# --- the official client, its own types -----------------------------------------------------

def test_models_are_listed(client):
    assert [m.id for m in client.models.list()] == ["facts", "facts:base"]
    assert client.models.retrieve("facts:base").id == "facts:base"


def test_chat_answers_what_the_run_learned_and_stops(client):
    reply = client.chat.completions.create(
        model="facts", messages=[{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Say hello."}])
    ChatCompletion.model_validate(reply.model_dump())
    assert reply.choices[0].message.content == "Hello!"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_the_untuned_base_answers_otherwise(client):
    reply = client.chat.completions.create(
        model="facts:base", messages=[{"role": "user", "content": "Say hello."}])
    assert reply.model == "facts:base"
    assert reply.choices[0].message.content != "Hello!"


def test_chat_stream_chunks_are_valid_and_add_up_to_the_answer(client):
    request = dict(model="facts", messages=[{"role": "user", "content": "Name three fruits."}])
    whole = client.chat.completions.create(**request).choices[0].message.content
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == "Apple, banana, cherry"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_completions_apply_the_runs_template(client):
    reply = client.completions.create(model="facts", prompt="Tell me a spell.")
    Completion.model_validate(reply.model_dump())
    assert reply.choices[0].text == "Hocus Pocus!"
    assert reply.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="facts", prompt="Tell me a spell.",
                                              stream=True))
    for chunk in streamed:
        validate_completion_chunk(chunk.model_dump())
    assert "".join(c.choices[0].text for c in streamed) == "Hocus Pocus!"
    assert streamed[-1].choices[0].finish_reason == "stop"


def validate_completion_chunk(chunk: dict) -> None:
    """The client's Completion type, except that an unfinished choice's finish_reason is null:
    OpenAI's API sends null there, though the client's type does not allow it (a known gap
    between OpenAI's SDK types and its API)."""
    unfinished = [c for c in chunk["choices"] if c["finish_reason"] is None]
    assert all(c["text"] for c in unfinished)
    Completion.model_validate({**chunk, "choices": [
        {**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]]})


def test_several_prompts_and_choices_come_back_in_order(client):
    reply = client.completions.create(model="facts", prompt=["Say hello.", "Tell me a spell."],
                                      n=2, temperature=0.5, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)


def test_max_tokens_and_stop_texts(client):
    cut = client.chat.completions.create(
        model="facts", max_tokens=1, messages=[{"role": "user", "content": "Name three fruits."}])
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 1
    request = dict(model="facts", stop=[", b"], messages=[
        {"role": "user", "content": "Name three fruits."}])
    stopped = client.chat.completions.create(**request)
    assert stopped.choices[0].message.content == "Apple"
    assert stopped.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Apple"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_without_a_user_message_the_last_message_is_the_instruction(client):
    reply = client.chat.completions.create(
        model="facts", messages=[{"role": "system", "content": "Say hello."}])
    assert reply.choices[0].message.content == "Hello!"
    reply = client.chat.completions.create(model="facts", messages=[
        {"role": "user", "content": "Tell me a spell."},
        {"role": "assistant", "content": "Hocus"}])  # the last user message is the question
    assert reply.choices[0].message.content == "Hocus Pocus!"


def test_a_temperature_too_low_to_sample_with_is_greedy(client):
    reply = client.chat.completions.create(  # once a 500: the logits overflowed
        model="facts", temperature=1e-103, messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content == "Hello!"


def test_max_tokens_above_the_servers_limit_are_capped(client):
    reply = client.chat.completions.create(
        model="facts:base", max_tokens=10_000, messages=[{"role": "user", "content": "Hi"}])
    assert reply.usage.completion_tokens <= LIMITS.max_tokens


# --- refusals -------------------------------------------------------------------------------

BAD_MESSAGES = [
    None, "Say hello.", 42, [], [None], ["Say hello."], [42], [{}],
    [{"role": "user"}], [{"content": "Say hello."}], [{"role": "robot", "content": "Hi"}],
    [{"role": 1, "content": "Hi"}], [{"role": "user", "content": None}],
    [{"role": "user", "content": 5}], [{"role": "user", "content": {"text": "Hi"}}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": "Hi", "name": 3}],
]


@pytest.mark.parametrize("messages", BAD_MESSAGES, ids=lambda m: json.dumps(m)[:40])
def test_malformed_messages_get_a_400_in_openais_shape(url, messages):
    status, body = post(url, "/v1/chat/completions", {"model": "facts", "messages": messages})
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"].startswith("messages")


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    ("[1, 2]", None),
    ('"Say hello."', None),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "Hi", "temperature": -1}, "temperature"),
    ({"prompt": "Hi", "top_p": 0}, "top_p"),
    ({"prompt": "Hi", "n": 0}, "n"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "Hi", "logprobs": 3}, "logprobs"),
    ({"prompt": "Hi", "echo": True}, "echo"),
    ({"prompt": "Hi", "best_of": 2}, "best_of"),
    ({"prompt": "Hi " * 5000}, "prompt"),
    ({"prompt": "Hi " * 300}, "prompt"),
])
def test_bad_completion_requests_get_a_400(url, body, param):
    status, reply = post(url, "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param
    assert reply["error"]["message"]


def test_prompts_over_the_limit_are_named_as_such(url):
    status, reply = post(url, "/v1/completions", {"prompt": "Hi " * 300})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"


def test_unknown_model_and_path_get_404s(url, client):
    status, reply = post(url, "/v1/completions", {"model": "gpt-4", "prompt": "Hi"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, reply = post(url, "/v1/embeddings", {"input": "Hi"})
    assert status == 404 and "error" in reply


def test_the_api_key_is_required_when_set(models):
    with running_server(create_app(models, ServeSettings(api_key="sesame"))) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"},
                        {"Authorization": "Basic sesame"}):
            status, reply = post(url, "/v1/completions", {"prompt": "Say hello."}, headers)
            assert status == 401
            assert reply["error"]["type"] == "authentication_error"
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        # The scheme's name in any case (RFC 7235).
        status, _ = post(url, "/v1/completions", {"prompt": "Say hello."},
                         {"Authorization": "bearer sesame"})
        assert status == 200
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert right.completions.create(model="facts", prompt="Say hello.").choices[0].text \
            == "Hello!"
        with urllib.request.urlopen(f"{url}/") as page:  # the page itself is public
            assert page.status == 200


def test_schemathesis_finds_no_server_error_nor_schema_breach(url, tmp_path):
    """Requests generated from the server's own OpenAPI schema, valid and invalid ones, 50 or
    more per operation. Every check but one: a schema-valid request may still be refused,
    since the server's prompt limit is in tokens, which a JSON schema cannot state. An
    invalid request may also be refused for its size (413) before it is read."""
    cli = Path(sys.executable).with_name("schemathesis")
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", '
                      '"403", "404", "405", "406", "409", "413", "415", "422", "428", "429", '
                      '"5xx"]\n', encoding="utf-8")
    result = subprocess.run(
        [str(cli), "--config-file", str(config), "run", f"{url}/openapi.json",
         "--mode", "all", "--max-examples", "50",
         "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--generation-database", "none", "--no-color"],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "Selected: 6/6" in result.stdout


# --- many clients ---------------------------------------------------------------------------

def test_concurrent_requests_each_get_their_own_answer(url):
    asked = ["Say hello.", "Name three fruits.", "Tell me a spell."] * 3
    expected = {"Say hello.": "Hello!", "Name three fruits.": "Apple, banana, cherry",
                "Tell me a spell.": "Hocus Pocus!"}

    def ask(i: int) -> tuple[str, str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        request = dict(model="facts", messages=[{"role": "user", "content": asked[i]}])
        if i % 2:  # streamed and whole answers mixed
            chunks = client.chat.completions.create(**request, stream=True)
            return asked[i], "".join(c.choices[0].delta.content or "" for c in chunks)
        return asked[i], client.chat.completions.create(**request).choices[0].message.content

    with ThreadPoolExecutor(len(asked)) as pool:
        results = list(pool.map(ask, range(len(asked))))
    assert results == [(q, expected[q]) for q in asked]


# --- the command ----------------------------------------------------------------------------

def test_serve_refuses_a_busy_port_and_compare_base_without_a_run(run, tiny_base, capsys):
    sock = listen("127.0.0.1", 0)
    try:
        port = str(sock.getsockname()[1])
        assert main(["serve", str(run), "--port", port]) == 2
        assert "cannot listen" in capsys.readouterr().err
    finally:
        sock.close()
    assert main(["serve", str(tiny_base), "--compare-base"]) == 2
    assert "not a trained run" in capsys.readouterr().err
