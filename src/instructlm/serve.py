"""`instructlm serve`: a run behind OpenAI's HTTP API, and a web page to try it in a browser.

One model call runs at a time (a lock): answers cannot mix, and two decodings would only
share the same CPU cores. A streamed answer is decoded in a worker thread that hands its
text to the response as it comes; when the client goes away, decoding stops at the next
token and the next request is served.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import __version__
from . import openai_api as api
from .errors import InstructlmError
from .formats import Example
from .generate import Answer, Answerer, DecodeSettings
from .textcut import TextCutter


@dataclass(frozen=True)
class ServeSettings:
    max_tokens: int = 256  # the most new tokens of one answer, and the default
    max_prompt_tokens: int = 2048
    api_key: str | None = None


class ApiError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    detail = api.ErrorDetail(message=message, type=kind, param=param, code=code)
    return JSONResponse(api.ErrorBody(error=detail).model_dump(), status_code=status)


@dataclass(frozen=True)
class Job:
    """One answer to produce: its choice index and what is asked."""

    index: int
    example: Example


@dataclass(frozen=True)
class Plan:
    """A checked request: which model, the answers to produce, how to decode them."""

    model: str
    answerer: Answerer
    jobs: list[Job]
    decode: DecodeSettings
    prompt_tokens: int  # each distinct prompt counted once, as OpenAI does


@dataclass(frozen=True)
class Piece:
    """Streamed text of one job; the last piece of a job carries its finish reason."""

    job: Job
    text: str
    finish_reason: str | None = None
    new_tokens: int = 0


class Models:
    """The served models, the limits on what a request may ask, and the one model lock."""

    def __init__(self, models: dict[str, Answerer], settings: ServeSettings) -> None:
        self.models = models
        self.default = next(iter(models))
        self.settings = settings
        self.lock = threading.Lock()
        self.created = int(time.time())

    def cards(self) -> list[api.ModelCard]:
        return [api.ModelCard(id=name, created=self.created) for name in self.models]

    def plan(self, request: api.Sampling, examples: list[Example], param: str) -> Plan:
        name = request.model or self.default
        if name not in self.models:
            raise ApiError(404, f"The model '{name}' does not exist; this server has "
                                f"{', '.join(self.models)}", "model", "model_not_found")
        answerer = self.models[name]
        lengths = [self._prompt_length(answerer, ex, param) for ex in examples]
        room = _context_size(answerer) - max(lengths)
        limit = min(request.max_tokens or self.settings.max_tokens, self.settings.max_tokens,
                    room)
        if limit < 1:
            raise ApiError(400, f"the prompt leaves no room for an answer in the model's "
                                f"{_context_size(answerer)} positions", param,
                           "context_length_exceeded")
        # Below this, sampling is greedy decoding in all but name, and dividing the logits
        # by the temperature would overflow.
        temperature = request.temperature if (request.temperature or 0) >= 1e-3 else 0.0
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        decode = DecodeSettings(max_new_tokens=limit, sample=temperature > 0,
                                temperature=temperature or 1.0, top_p=request.top_p or 1.0,
                                stop=request.stops(), seed=seed % 2**32)
        jobs = [Job(i * request.n + j, ex) for i, ex in enumerate(examples)
                for j in range(request.n)]
        return Plan(name, answerer, jobs, decode, sum(lengths))

    def _prompt_length(self, answerer: Answerer, example: Example, param: str) -> int:
        limit = self.settings.max_prompt_tokens
        too_long = ApiError(400, f"the prompt is longer than this server accepts ({limit} "
                                 "tokens, set by serve --max-prompt-tokens)", param,
                            "context_length_exceeded")
        text = example.instruction + "".join(m["content"] for m in example.history)
        if len(text) > 16 * limit:  # refused before spending time tokenizing it
            raise too_long
        try:
            n = len(answerer.prompt_ids(example))
        except InstructlmError as err:
            raise ApiError(400, err.message, param) from None
        except Exception as err:  # the tokenizer's chat template refused the messages
            raise ApiError(400, f"the model's chat template refused the messages: {err}",
                           param) from None
        if n > limit:
            raise too_long
        return n

    def answer_all(self, plan: Plan) -> list[Answer]:
        with self.lock:
            return list(plan.answerer.answer([job.example for job in plan.jobs], plan.decode,
                                             batch_size=len(plan.jobs)))

    async def stream(self, plan: Plan) -> AsyncIterator[Piece]:
        """Pieces of text as they are decoded, job after job, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()
        gone = threading.Event()

        def put(item: Piece | BaseException | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                with self.lock:
                    for job in plan.jobs:
                        if gone.is_set():
                            return
                        self._stream_job(plan, job, put, gone)
            except Exception as err:  # reported in the stream, not lost in a thread
                put(err)
            finally:
                put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gone.set()  # the client went away, or the stream ended: stop decoding

    @staticmethod
    def _stream_job(plan: Plan, job: Job, put: Any, gone: threading.Event) -> None:
        cutter = TextCutter(plan.decode.stop)

        def on_text(text: str) -> None:
            if piece := cutter.feed(text):
                put(Piece(job, piece))

        # Stop texts are cut here, where streamed text can be held back; each choice gets
        # its own seed so that sampled choices differ.
        decode = replace(plan.decode, stop=(), seed=(plan.decode.seed + job.index) % 2**32)
        answer = plan.answerer.answer_streaming(
            job.example, decode, on_text, should_stop=lambda: gone.is_set() or cutter.stopped)
        put(Piece(job, cutter.finish(), "stop" if cutter.stopped else answer.finish_reason,
                  answer.new_tokens))


def _context_size(answerer: Answerer) -> int:
    config = answerer.model.config
    return int(getattr(config, "max_position_embeddings", None)
               or getattr(config, "n_positions", None) or 2048)


# --- requests -> examples -------------------------------------------------------------------

def completion_examples(request: api.CompletionRequest) -> list[Example]:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    return [Example(p, "") for p in prompts]


def chat_example(request: api.ChatRequest, answerer: Answerer) -> Example:
    """The instruction is the last user message (the last message, if none is the user's).
    A run taught with the chat template also sees the conversation before it; any other run
    sees the instruction alone, which is how it was taught."""
    messages = request.messages
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    last = users[-1] if users else len(messages) - 1
    history = ()
    if answerer.template.name == "chat":
        history = tuple({"role": "system" if m.role == "developer" else m.role,
                         "content": m.text()} for m in messages[:last])
    return Example(messages[last].text(), "", history=history)


# --- the application ------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorBody} for status in (400, 401, 404)}
STREAM = {200: {"content": {"text/event-stream": {}}}}


def create_app(models: dict[str, Answerer], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The HTTP application serving `models`; the first one is the default model."""
    served = Models(models, settings)
    app = FastAPI(title="instructlm", version=__version__, docs_url=None, redoc_url=None)
    _add_error_handlers(app)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)], responses=ERRORS)

    @v1.get("/models", response_model=api.ModelList)
    async def list_models() -> api.ModelList:
        return api.ModelList(data=served.cards())

    @v1.get("/models/{model_id:path}", response_model=api.ModelCard)
    async def get_model(model_id: str) -> api.ModelCard:
        for card in served.cards():
            if card.id == model_id:
                return card
        raise ApiError(404, f"The model '{model_id}' does not exist", "model",
                       "model_not_found")

    @v1.post("/completions", response_model=api.Completion, responses=STREAM)
    async def completions(request: api.CompletionRequest) -> Any:
        examples = completion_examples(request)
        plan = await run_in_threadpool(served.plan, request, examples, "prompt")
        if request.stream:
            return _event_stream(_completion_chunks(served, plan, request))
        answers = await run_in_threadpool(served.answer_all, plan)
        return api.Completion(
            id=_new_id("cmpl"), created=int(time.time()), model=plan.model,
            choices=[api.CompletionChoice(index=job.index, text=a.response,
                                          finish_reason=a.finish_reason)
                     for job, a in zip(plan.jobs, answers, strict=True)],
            usage=_usage(plan, answers))

    @v1.post("/chat/completions", response_model=api.ChatCompletion, responses=STREAM)
    async def chat_completions(request: api.ChatRequest) -> Any:
        if request.max_completion_tokens is not None:
            request.max_tokens = request.max_completion_tokens
        name = request.model or served.default
        answerer = served.models.get(name)
        examples = [chat_example(request, answerer)] if answerer else []
        plan = await run_in_threadpool(served.plan, request, examples, "messages")
        if request.stream:
            return _event_stream(_chat_chunks(served, plan, request))
        answers = await run_in_threadpool(served.answer_all, plan)
        return api.ChatCompletion(
            id=_new_id("chatcmpl"), created=int(time.time()), model=plan.model,
            choices=[api.ChatChoice(index=job.index,
                                    message=api.AssistantMessage(content=a.response),
                                    finish_reason=a.finish_reason)
                     for job, a in zip(plan.jobs, answers, strict=True)],
            usage=_usage(plan, answers))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_playground_page(served))

    app.include_router(v1)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a bad request is a 400, never a 5xx (which OpenAI's
    clients would retry)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, str(err), err.kind, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON: "
                                       f"{first.get('ctx', {}).get('error', first['msg'])}")
        param = _param(first.get("loc", ()))
        if param is None:
            return error_response(400, "the request body must be a JSON object "
                                       "(sent with Content-Type: application/json)")
        return error_response(400, f"{first['msg']} ({param})", param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        response = error_response(err.status_code, str(err.detail),
                                  code="not_found" if err.status_code == 404 else None)
        response.headers.update(err.headers or {})  # such as Allow, on a 405
        return response


TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param(loc: Any) -> str | None:
    """pydantic's error location as OpenAI names a parameter: messages[0].role."""
    parts = ""
    for item in list(loc)[1:] if loc and loc[0] == "body" else []:
        if isinstance(item, int):
            parts += f"[{item}]"
        elif isinstance(item, str) and item.isidentifier() and item not in TYPE_TAGS:
            parts += f".{item}" if parts else item
        else:  # a union member's tag, such as 'str' or 'list[str]': the parameter ends here
            break
    return parts or None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(plan: Plan, answers: list[Answer]) -> api.Usage:
    new = sum(a.new_tokens for a in answers)
    return api.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=new,
                     total_tokens=plan.prompt_tokens + new)


# --- streaming ------------------------------------------------------------------------------

def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _sse(data: Any) -> str:
    text = data.model_dump_json() if hasattr(data, "model_dump_json") else json.dumps(data)
    return f"data: {text}\n\n"


async def _guarded(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The stream's events, then [DONE]; an error after the headers went out is sent as an
    error event, since the status code can no longer change."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:
        yield _sse({"error": {"message": f"decoding failed: {err}", "type": "server_error",
                              "param": None, "code": None}})
    yield "data: [DONE]\n\n"


def _stream_usage(plan: Plan, new_tokens: int) -> api.Usage:
    return api.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=new_tokens,
                     total_tokens=plan.prompt_tokens + new_tokens)


def _completion_chunks(served: Models, plan: Plan,
                       request: api.CompletionRequest) -> AsyncIterator[str]:
    cid, created = _new_id("cmpl"), int(time.time())

    def chunk(choices: list[api.CompletionChoice], usage: api.Usage | None = None) -> str:
        return _sse(api.Completion(id=cid, created=created, model=plan.model,
                                   choices=choices, usage=usage))

    async def chunks() -> AsyncIterator[str]:
        new_tokens = 0
        async for piece in served.stream(plan):
            new_tokens += piece.new_tokens
            if piece.text or piece.finish_reason:
                yield chunk([api.CompletionChoice(index=piece.job.index, text=piece.text,
                                                  finish_reason=piece.finish_reason)])
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _stream_usage(plan, new_tokens))

    return _guarded(chunks())


def _chat_chunks(served: Models, plan: Plan, request: api.ChatRequest) -> AsyncIterator[str]:
    cid, created = _new_id("chatcmpl"), int(time.time())

    def chunk(choices: list[api.ChunkChoice], usage: api.Usage | None = None) -> str:
        return _sse(api.ChatCompletionChunk(id=cid, created=created, model=plan.model,
                                            choices=choices, usage=usage))

    async def chunks() -> AsyncIterator[str]:
        new_tokens, opened = 0, set()
        async for piece in served.stream(plan):
            index = piece.job.index
            if index not in opened:  # OpenAI opens each choice with the role alone
                opened.add(index)
                yield chunk([api.ChunkChoice(index=index,
                                             delta=api.Delta(role="assistant", content=""))])
            new_tokens += piece.new_tokens
            if piece.text:
                yield chunk([api.ChunkChoice(index=index, delta=api.Delta(content=piece.text))])
            if piece.finish_reason:
                yield chunk([api.ChunkChoice(index=index, delta=api.Delta(),
                                             finish_reason=piece.finish_reason)])
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _stream_usage(plan, new_tokens))

    return _guarded(chunks())


# --- the web page ---------------------------------------------------------------------------

def _playground_page(served: Models) -> str:
    """The page, with what it needs to know about this server written into it."""
    config = {"models": [{"id": name, "label": a.name} for name, a in served.models.items()],
              "needs_key": served.settings.api_key is not None,
              "max_tokens": served.settings.max_tokens}
    page = resources.files("instructlm").joinpath("playground.html").read_text("utf-8")
    # '<' escaped so that no text in the config can close the script element.
    return page.replace("{{CONFIG}}", json.dumps(config).replace("<", "\\u003c"))


# --- running it -----------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the models load so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise InstructlmError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                              hint="another program may be using the port; choose one "
                                   "with --port") from None


def run_server(app: FastAPI, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
