"""Shared fixtures: a tiny random model built from a config, saved as a model folder."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

# cuBLAS reads this when CUDA starts: deterministic kernels need it (tests on a GPU).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. Instruction: Response: Input:",
    "Es folgt eine Anweisung, die eine Aufgabe beschreibt. Schreibe eine passende Antwort. "
    "Anweisung: Antwort: Eingabe:",
    "Name three fruits. Apple, banana, cherry. Say hello. Hello! Tell me a spell. Hocus Pocus",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 #'[],.!?\"äöüßÄÖÜ",
]


TINY_FILE = """\
# three short facts the tiny model can memorise
Say hello.#Hello!
Name three fruits.#Apple, banana, cherry
Tell me a spell.#Hocus Pocus!
# _EVAL_
Name three fruits.#Apple, banana, cherry
"""


# TINY_FILE with 8 training examples: in batches of 3, every epoch ends with a short batch.
EIGHT_FACTS = TINY_FILE.replace("# _EVAL_", "Say hi.#Hi!\nSay bye.#Bye!\nName a fruit.#Apple\n"
                                "Name a colour.#Red\nName a number.#Seven\n# _EVAL_")


def tiny_settings(base: Path, **changes):
    """Training settings under which the tiny model memorises TINY_FILE in seconds."""
    from instructlm.training.settings import TrainSettings

    values = dict(base=str(base), template="seed-en", epochs=60, lr=3e-3, batch_size=3,
                  warmup_ratio=0.05, seed=0)
    values.update(changes)
    return TrainSettings(**values)


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free local port, in a thread; yield its URL."""
    import uvicorn

    from instructlm.serve.app import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def llama_cpp_or_skip():
    """llama.cpp itself, through llama-cpp-python (built from its source: minutes); CI
    requires it (INSTRUCTLM_LLAMA_CPP_TESTS=required), elsewhere its tests are skipped."""
    try:
        import llama_cpp
    except ImportError:
        message = "llama-cpp-python is not installed: make install-llama-cpp"
        if os.environ.get("INSTRUCTLM_LLAMA_CPP_TESTS") == "required":
            pytest.fail(message)
        pytest.skip(message)
    return llama_cpp


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few strings: real, small, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """A folder holding a tiny random Llama model and its tokenizer, usable as --base."""
    folder = tmp_path_factory.mktemp("tiny-base")
    make_tiny_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def write(tmp_path):
    """Write a file under tmp_path from text (str) or raw bytes; return its path."""
    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path
    return _write


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_base) -> Path:
    """TINY_FILE learned by the tiny model: a run to ask and serve."""
    from instructlm.training.train import train

    folder = tmp_path_factory.mktemp("facts")
    (folder / "facts.txt").write_text(TINY_FILE, encoding="utf-8")
    return train(folder / "facts.txt", folder / "facts", tiny_settings(tiny_base),
                 report=lambda m: None, progress=False)


@pytest.fixture(scope="session")
def tiny_models(tiny_run) -> dict[str, Any]:
    """The tiny run and its untuned base, as `serve --compare-base` serves them."""
    from instructlm.answering.answerer import load_answerer, load_untuned_base

    return {"facts": load_answerer(str(tiny_run)), "facts:base": load_untuned_base(str(tiny_run))}


def post(url: str, path: str, body: bytes | str | dict, headers: dict | None = None,
         ) -> tuple[int, dict]:
    """POST JSON to a running server: (status, the JSON it answered)."""
    import json
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else (
        body.encode() if isinstance(body, str) else json.dumps(body).encode())
    request = urllib.request.Request(f"{url}{path}", data=data, method="POST", headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
