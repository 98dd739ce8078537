"""serve with many clients at once: their answers decode in one batch and come out as each
would alone; the queue is bounded, a client that leaves frees its row, and /health and
/metrics answer while the model is busy."""

from __future__ import annotations

import copy
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import pytest
from conftest import running_server

from instructlm.answering.answerer import Answerer
from instructlm.serve.app import create_app
from instructlm.serve.settings import ServeSettings

SHORT = "Say hello."
LONG = "Name three fruits, " + "and then again three fruits, " * 6 + "please."
SYSTEM = {"role": "system", "content": "You answer in few words."}


def slowed(answerer: Answerer, delay: float = 0.0, endless: bool = False) -> Answerer:
    """A copy of `answerer` whose model sleeps `delay` s a call (so that requests overlap)
    and, if `endless`, never chooses an end token."""
    import torch

    model = copy.deepcopy(answerer.model)
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    if endless:
        ends = answerer.end_ids()

        def ban(module: Any, args: Any, output: Any) -> None:
            output.logits[..., ends] = -torch.inf
        model.register_forward_hook(ban)
    return Answerer(model, answerer.tokenizer, answerer.template, answerer.name)


def request(url: str, path: str, body: dict, headers: dict | None = None,
            timeout: float = 60) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON or the raw text of a stream) of one request."""
    address = urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        connection.request("POST" if body is not None else "GET", path,
                           json.dumps(body) if body is not None else None,
                           {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read().decode()
        kind = response.getheader("Content-Type", "")
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                json.loads(raw) if kind.startswith("application/json") else raw)
    finally:
        connection.close()


def chat(url: str, content: str, system: bool = False, **options: Any) -> tuple[str, str]:
    messages = ([SYSTEM] if system else []) + [{"role": "user", "content": content}]
    status, _, reply = request(url, "/v1/chat/completions",
                               {"model": "chat", "messages": messages, **options})
    assert status == 200, reply
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def streamed_text(raw: str) -> str:
    events = [json.loads(line[6:]) for line in raw.splitlines()
              if line.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


@pytest.fixture(scope="module")
def chat_model(tiny_tokenizer) -> Answerer:
    """A tiny random model with its tokenizer's chat template (so the system prompt reaches
    it), its weights drawn wide enough that each prompt gets its own answer."""
    import torch
    from conftest import make_tiny_model

    from instructlm.data.templates import choose_template

    model = make_tiny_model(tiny_tokenizer)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    return Answerer(model, tiny_tokenizer, choose_template(None, tiny_tokenizer), "chat")


def test_answers_decoded_together_are_the_answers_each_gets_alone(chat_model, tiny_models):
    """Greedy answers, short and long prompts, with and without a shared system prompt,
    asked one after another and then all at once."""
    models = {"chat": slowed(chat_model, delay=0.004), "facts": tiny_models["facts"]}
    settings = ServeSettings(max_tokens=40, max_prompt_tokens=400)
    app = create_app(models, settings)
    # Answers of 3 to 40 tokens: rows leave the batch at different steps.
    asked = [(text, system, length) for text, system in [
        (SHORT, False), (LONG, False), (SHORT, True), (LONG, True), ("Tell me a spell.", True),
        ("Name three fruits.", False)] for length in (3, 17, 40)]
    with running_server(app) as url:
        alone = [chat(url, text, system, max_tokens=n) for text, system, n in asked]
        with ThreadPoolExecutor(len(asked)) as pool:
            together = list(pool.map(lambda a: chat(url, a[0], a[1], max_tokens=a[2]), asked))
        metrics = app.state.served.metrics.registry
    assert together == alone
    # The openings, with and without the system prompt, were computed once and kept.
    assert len(app.state.served.batchers["chat"].openings) == 2
    assert len({answer for answer, _ in alone}) > len(asked) // 2  # not one answer for all
    steps = metrics.get_sample_value("instructlm_decode_step_rows_count", {"model": "chat"})
    alone_steps = metrics.get_sample_value("instructlm_decode_step_rows_bucket",
                                           {"model": "chat", "le": "1.0"})
    assert steps > alone_steps  # some steps decoded several answers at once


def test_the_prompt_opening_is_what_comes_before_the_instruction(chat_model, tiny_models):
    from instructlm.data.formats import Example

    for answerer in (chat_model, tiny_models["facts"]):  # chat template, seed-en
        history = ({"role": "system", "content": "Be brief."},) \
            if answerer.template.name == "chat" else ()
        asked = Example("Tell me a spell.", "", history=history)
        ids = answerer.prompt_ids(asked)
        opening = answerer.opening_length(asked, ids)
        other = answerer.prompt_ids(Example("Say hello.", "", history=history))
        assert 0 < opening < len(ids) and ids[:opening] == other[:opening]
        rest = answerer.tokenizer.decode(ids[opening:])
        assert rest.lstrip().startswith("Tell me a spell."), rest
        if history:
            assert "Be brief." in answerer.tokenizer.decode(ids[:opening])


def test_streamed_and_whole_answers_mix_in_one_batch(chat_model):
    app = create_app({"chat": slowed(chat_model, delay=0.004)},
                     ServeSettings(max_tokens=30, max_prompt_tokens=400))
    with running_server(app) as url:
        alone = chat(url, LONG)[0]

        def ask(i: int) -> str:
            body = {"messages": [{"role": "user", "content": LONG}], "stream": bool(i % 2)}
            status, _, reply = request(url, "/v1/chat/completions", body)
            assert status == 200
            return streamed_text(reply) if i % 2 else reply["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, range(6))) == [alone] * 6


def test_a_sampled_answer_with_a_seed_is_the_same_however_it_is_batched(chat_model):
    app = create_app({"chat": slowed(chat_model, delay=0.004)},
                     ServeSettings(max_tokens=20, max_prompt_tokens=400))
    with running_server(app) as url:
        def ask(seed: int) -> str:
            return chat(url, SHORT, temperature=1.0, seed=seed)[0]

        alone = [ask(seed) for seed in range(6)]
        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(ask, range(6))) == alone
    assert len(set(alone)) > 1  # the seeds matter


def busy(url: str, pool: ThreadPoolExecutor, stream: bool = False) -> Any:
    """A request to the endless model, answered (after max_tokens) in the background."""
    body = {"model": "endless", "prompt": SHORT, "stream": stream}
    return pool.submit(request, url, "/v1/completions", body)


def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def endless_app(tiny_models):
    """One answer at a time, one request waiting at most, answers that run on."""
    def make(**settings: Any) -> Any:
        values = dict(max_tokens=200, max_prompt_tokens=200, max_batch=1, max_queue=1)
        values.update(settings)
        endless = slowed(tiny_models["facts:base"], delay=0.01, endless=True)
        return create_app({"endless": endless}, ServeSettings(**values))
    return make


def test_a_full_queue_is_refused_at_once_with_429_and_retry_after(endless_app):
    app = endless_app()
    batcher = app.state.served.batchers["endless"]
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        first = busy(url, pool)
        until(lambda: batcher.decoding == 1)
        second = busy(url, pool)
        until(lambda: batcher.queued_requests() == 1)
        started = time.monotonic()
        status, headers, reply = request(url, "/v1/completions",
                                         {"model": "endless", "prompt": SHORT})
        assert time.monotonic() - started < 1
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert reply["error"]["code"] == "queue_full" and "--max-queue" in \
            reply["error"]["message"]
        for waiting in (first, second):  # those already in are answered
            assert waiting.result()[0] == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_waiting_past_the_queue_timeout_gets_503(endless_app, stream):
    app = endless_app(queue_timeout_s=0.3)
    batcher = app.state.served.batchers["endless"]
    with running_server(app) as url, ThreadPoolExecutor(1) as pool:
        first = busy(url, pool)
        until(lambda: batcher.decoding == 1)
        started = time.monotonic()
        status, headers, reply = request(url, "/v1/completions",
                                         {"model": "endless", "prompt": SHORT, "stream": stream})
        assert 0.3 <= time.monotonic() - started < 1.5
        assert status == 503 and headers["retry-after"]
        assert reply["error"]["code"] == "queue_timeout"
        assert "--queue-timeout" in reply["error"]["message"]
        assert first.result()[0] == 200


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_client_that_leaves_frees_its_row_and_the_server_goes_on(endless_app, stream):
    app = endless_app(max_batch=4, max_queue=4)
    batcher = app.state.served.batchers["endless"]
    with running_server(app) as url:
        address = urlparse(url)
        for _ in range(3):
            connection = http.client.HTTPConnection(address.hostname, address.port)
            connection.request("POST", "/v1/completions", json.dumps(
                {"model": "endless", "prompt": SHORT, "stream": stream}),
                {"Content-Type": "application/json"})
            if stream:
                response = connection.getresponse()
                assert response.status == 200 and response.readline().startswith(b"data: ")
            else:
                until(lambda: batcher.decoding >= 1)
            connection.close()  # the client goes away mid-answer
        # 200 tokens at 10 ms a step would take 2 s: the rows leave well before.
        until(lambda: batcher.decoding == 0 and not batcher.waiting, timeout=1.5)
        status, _, reply = request(url, "/v1/completions",
                                   {"model": "endless", "prompt": SHORT, "max_tokens": 3})
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"


def test_health_answers_at_once_while_busy_and_metrics_need_the_key(endless_app):
    app = endless_app(api_key="sesame")
    batcher = app.state.served.batchers["endless"]
    key = {"Authorization": "Bearer sesame"}
    with running_server(app) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(request, url, "/v1/completions",
                            {"model": "endless", "prompt": SHORT}, key)
        until(lambda: batcher.decoding == 1)
        started = time.monotonic()
        status, _, reply = request(url, "/health", None)  # no key
        assert time.monotonic() - started < 0.5
        assert status == 200 and reply == {"status": "ok"}
        assert request(url, "/metrics", None)[0] == 401
        assert request(url, "/v1/completions", {"prompt": SHORT})[0] == 401
        assert first.result()[0] == 200
        status, headers, text = request(url, "/metrics", None, key)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['instructlm_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert samples['instructlm_requests_total{endpoint="/v1/completions",status="401"}'] == 1
    assert samples['instructlm_requests_total{endpoint="/health",status="200"}'] == 1
    assert samples['instructlm_generated_tokens_total{model="endless"}'] == 200
    assert samples['instructlm_queue_depth{model="endless"}'] == 0
    assert samples['instructlm_batch_size{model="endless"}'] == 0
    assert samples['instructlm_time_to_first_token_seconds_count{model="endless"}'] == 1
    assert samples['instructlm_request_duration_seconds_count{model="endless"}'] == 1
    assert samples['instructlm_request_duration_seconds_sum{model="endless"}'] >= 2.0


def test_the_load_benchmark_runs_on_the_tiny_run(tiny_run):
    """benchmarks/serve_load.py end to end, small, so that it cannot rot."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import serve_load

    results = serve_load.load_test(str(tiny_run), 6, [1, 3], disconnects=4, max_tokens=8,
                                   timeout=300, flags=["--max-batch", "4"])
    for key in ("clients_1", "clients_3"):
        assert results[key]["statuses"] == [200] and results[key]["same_answers"] == 6
        assert results[key]["requests_per_s"] > 0
        assert 0 < results[key]["first_token_p50_s"] <= results[key]["latency_p95_s"]
    assert results["clients_3"]["speedup"] > 0
    assert results["disconnects"]["then_answered"]
    assert 200 in results["disconnects"]["statuses"]
    assert results["memory_end"]["peak_rss_mb"] >= results["memory_start"]["rss_mb"] > 0
    serve_load.print_table(results)
    mixed = serve_load.mixed_memory(str(tiny_run), ["--max-batch", "4"], max_tokens=4,
                                    timeout=300, repeats=3, settle_s=0.1)
    assert [r["statuses"] for r in mixed["mixed"]["rounds"]] == [[200], [200]]
    assert mixed["peak_over_alone"] > 0 and mixed["idle_after_over_before"] > 0
    serve_load.print_mixed(mixed)
    counts = serve_load.burst(str(tiny_run), ["--max-batch", "2", "--max-queue", "1"], 3,
                              max_tokens=4, timeout=300)
    assert sum(counts.values()) == 3 and set(counts) <= {"200", "429"}


def test_a_family_that_cannot_join_a_batch_answers_one_at_a_time(tiny_tokenizer):
    """GPT-2 takes no explicit positions (architectures.py): its rows are answered alone,
    from the same queue, streamed or whole, as they would be with nobody else asking."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from instructlm.data.templates import parse_template

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=64, n_layer=2,
                                       n_head=4, n_positions=256,
                                       eos_token_id=tiny_tokenizer.eos_token_id))
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.3)
    answerer = Answerer(model, tiny_tokenizer, parse_template("seed-en"), "gpt2")
    app = create_app({"chat": answerer}, ServeSettings(max_tokens=12, max_prompt_tokens=200))
    assert app.state.served.batchers["chat"].max_batch == 1
    with running_server(app) as url:
        asked = [SHORT, LONG, "Tell me a spell."]
        alone = [chat(url, text)[0] for text in asked]
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda text: chat(url, text)[0], asked)) == alone
        status, _, raw = request(url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": LONG}], "stream": True})
        assert status == 200 and streamed_text(raw) == alone[1]
    assert len(set(alone)) == 3


def test_a_request_that_fails_to_hear_its_answer_does_not_stop_the_loop(chat_model):
    """One request's failure stays its own: the loop goes on answering the others."""
    import threading

    from instructlm.answering.answerer import DecodeSettings
    from instructlm.data.formats import Example
    from instructlm.serve.batcher import Batcher, Row

    class Listener:
        def __init__(self, fail: bool) -> None:
            self.fail, self.done = fail, threading.Event()

        def admitted(self, row: Row) -> None:
            pass

        def token(self, row: Row, token: int) -> bool:
            if self.fail:
                raise RuntimeError("this request's handler is broken")
            return False

        def ended(self, row: Row) -> None:
            self.done.set()
            if self.fail:
                raise RuntimeError("and cannot hear its end either")

    batcher = Batcher(chat_model, 4, 4, 30.0, threading.Lock())
    try:
        example = Example(SHORT, "")
        prompt = chat_model.prompt_ids(example)
        broken, fine = Listener(fail=True), Listener(fail=False)
        rows = [Row(prompt, 0, example, DecodeSettings(max_new_tokens=5), listener, i)
                for i, listener in enumerate((broken, fine))]
        batcher.submit(rows)  # taken into the batch together
        assert broken.done.wait(10) and fine.done.wait(10)
        later = Listener(fail=False)
        batcher.submit([Row(prompt, 0, example, DecodeSettings(max_new_tokens=5), later, 2)])
        assert later.done.wait(10)
    finally:
        batcher.close()
    assert isinstance(rows[0].error, RuntimeError)
    assert rows[1].error is None and rows[1].finish_reason in ("stop", "length")


def test_a_burst_fills_the_batch_before_the_queue_counts(tiny_models):
    """With room for 8 answers and 2 waiting, a burst of 20 requests gets 10 in, even while
    the loop has not yet taken any of them: the queue counts only what waits for a place."""
    import threading

    from instructlm.answering.answerer import DecodeSettings
    from instructlm.data.formats import Example
    from instructlm.serve.batcher import Batcher, QueueFull, Row

    class Quiet:
        def admitted(self, row: Row) -> None: ...
        def token(self, row: Row, token: int) -> bool: return False
        def ended(self, row: Row) -> None: ...

    answerer = tiny_models["facts"]
    lock = threading.Lock()
    batcher = Batcher(answerer, max_batch=8, max_queue=2, queue_timeout_s=60, lock=lock)
    prompt = answerer.tokenizer("Say hello.")["input_ids"]
    accepted = 0
    with lock:  # the model is busy: the loop cannot prefill what it takes
        for request_id in range(20):
            try:
                batcher.submit([Row(prompt, 0, Example("Say hello.", ""),
                                    DecodeSettings(max_new_tokens=2), Quiet(), request_id)])
                accepted += 1
            except QueueFull:
                pass
    batcher.close()
    assert accepted == 8 + 2


def test_rows_join_the_batch_only_within_its_token_budget(tiny_models):
    """The padded cache holds rows x the widest row's reach (prompt and answer): a long
    prompt does not join short ones beyond the budget, and none passes a row that waits."""
    import threading
    from collections import deque

    from instructlm.answering.answerer import DecodeSettings
    from instructlm.data.formats import Example
    from instructlm.serve.batcher import Batcher, Row

    batcher = Batcher(tiny_models["facts"], max_batch=8, max_queue=8, queue_timeout_s=60,
                      lock=threading.Lock(), max_batch_tokens=100)
    batcher.close()  # its loop ends: _take_ready is called here alone

    def row(prompt_length: int, request: int) -> Row:
        return Row([1] * prompt_length, 0, Example("x", ""), DecodeSettings(max_new_tokens=10),
                   None, request, submitted=time.monotonic())

    shorts = [row(5, i) for i in range(5)]  # each may reach 15 positions
    long = row(60, 9)  # may reach 70
    batcher.waiting = deque([*shorts, long])
    assert batcher._take_ready(None) == shorts  # 6 x 70 would pass 100
    batcher.waiting = deque([long, *shorts])
    assert batcher._take_ready(None) == [long]  # alone it always may; then the shorts wait
    assert list(batcher.waiting) == shorts
