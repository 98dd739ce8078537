"""serve under abuse: requests over a limit are refused at once, in OpenAI's error shape,
without the server's memory growing (a client that leaves: test_serve_batching.py)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import pytest
from conftest import post, running_server

from instructlm.serve import schema as api
from instructlm.serve.app import create_app
from instructlm.serve.settings import ServeSettings

SETTINGS = ServeSettings(max_tokens=24, max_prompt_tokens=200, body_timeout_s=0.5)


@pytest.fixture(scope="module")
def url(tiny_models):
    with running_server(create_app(tiny_models, SETTINGS)) as address:
        yield address


def rss_mb() -> float:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def raw_request(url: str, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[int, dict]:
    """Send `head` and `body` over a socket as they are; (status, JSON) of the answer."""
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=wait) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status = int(received.split(b" ", 2)[1])
    return status, json.loads(received.split(b"\r\n\r\n", 1)[1])


def test_a_long_stop_text_is_refused_at_once(url):
    for stop in ("x" * (api.MAX_STOP_CHARS + 1), ["a", "x" * 100_000]):
        started = time.monotonic()
        status, reply = post(url, "/v1/completions", {"prompt": "Say hello.", "stop": stop})
        assert status == 400 and reply["error"]["param"].startswith("stop")
        assert time.monotonic() - started < 1


def test_too_many_stop_texts_are_refused_with_the_limit(url):
    stops = ["a"] * (api.MAX_STOPS + 1)
    status, reply = post(url, "/v1/completions", {"prompt": "Say hello.", "stop": stops})
    assert status == 400 and reply["error"]["param"] == "stop"
    assert f"at most {api.MAX_STOPS} items" in reply["error"]["message"]


def test_stop_texts_cut_a_whole_answer_as_they_cut_a_streamed_one(url):
    request = {"model": "facts", "prompt": "Name three fruits.", "stop": [", "]}
    status, reply = post(url, "/v1/completions", request)
    assert status == 200
    assert reply["choices"][0] == {"index": 0, "text": "Apple", "logprobs": None,
                                   "finish_reason": "stop"}
    assert reply["usage"]["completion_tokens"] < 6  # decoding ended at the stop text


def test_a_body_over_the_limit_gets_413_before_it_is_read(url):
    # 22 MB of empty chat messages, announced by Content-Length; made before the memory is
    # measured, so that the measure is the server's (it shares this process)
    body = json.dumps({"messages": [{"role": "user", "content": ""}] * 660_000}).encode()
    # the same without a length: sent in chunks, to be read until it is too large
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                       for part in (body[i:i + 65536] for i in range(0, 2 * api.MAX_BODY_BYTES,
                                                                      65536)))
    before = rss_mb()
    started = time.monotonic()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\n")
    status, reply = raw_request(url, head, body[:65536])
    assert status == 413 and "larger than this server accepts" in reply["error"]["message"]
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            "\r\nTransfer-Encoding: chunked\r\n")
    status, reply = raw_request(url, head, chunked + b"0\r\n\r\n")
    assert status == 413
    assert time.monotonic() - started < 5
    assert rss_mb() - before < 50


def test_many_messages_within_the_body_limit_are_refused(url):
    messages = [{"role": "user", "content": ""}] * (api.MAX_MESSAGES + 1)
    status, reply = post(url, "/v1/chat/completions", {"messages": messages})
    assert status == 400 and reply["error"]["param"] == "messages"


def test_a_body_that_never_arrives_whole_times_out(url):
    started = time.monotonic()
    head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n")
    status, reply = raw_request(url, head, b'{"prompt": ')
    assert status == 408 and "did not arrive" in reply["error"]["message"]
    assert time.monotonic() - started < 5


def test_an_empty_model_name_is_refused(url):
    status, reply = post(url, "/v1/completions", {"model": "", "prompt": "Say hello."})
    assert status == 400 and reply["error"]["param"] == "model"
