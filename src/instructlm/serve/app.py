"""`instructlm serve`: a run behind OpenAI's HTTP API, and a web page to try it in a browser.

This module is the HTTP side: routes, the API key, errors in OpenAI's shape, server-sent
events and the page. What is asked of the models, and how, is in planner.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from instructlm import __version__
from instructlm.answering.answerer import Answer, Answerer
from instructlm.data.formats import Example
from instructlm.errors import InstructlmError
from instructlm.serve import schema as api
from instructlm.serve.body_limit import BodyLimit
from instructlm.serve.metrics import CountRequests, Metrics
from instructlm.serve.planner import Answering, Models, Plan, chat_example, completion_examples
from instructlm.serve.schema import ApiError
from instructlm.serve.settings import SHUTDOWN_GRACE_S, ServeSettings


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    detail = api.ErrorDetail(message=message, type=kind, param=param, code=code)
    return JSONResponse(api.ErrorBody(error=detail).model_dump(), status_code=status)


# --- the application ------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": api.ErrorBody} for status in (400, 401, 404, 408, 413, 429, 503)}
STREAM = {200: {"content": {"text/event-stream": {}}}}


def create_app(models: dict[str, Answerer], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The HTTP application serving `models`; the first one is the default model."""
    metrics = Metrics()
    served = Models(models, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        served.close()  # the decoding loops end with the server

    app = FastAPI(title="instructlm", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=api.MAX_BODY_BYTES,
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: it sees every status
    app.state.served = served
    _add_error_handlers(app)
    check_key = _key_check(settings)
    app.include_router(_api_routes(served, check_key))
    app.include_router(_page_routes(served, settings, metrics, check_key))
    return app


def _key_check(settings: ServeSettings) -> Callable[[Request], None]:
    """The dependency that refuses a request without the API key, when one is set."""
    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        # 'Bearer KEY'; the scheme's name is case-insensitive (RFC 7235), and needed.
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                given.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", kind="authentication_error")
    return check_key


def _api_routes(served: Models, check_key: Callable[[Request], None]) -> APIRouter:
    """OpenAI's routes under /v1: the models, completions and chat completions."""
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
    async def completions(request: api.CompletionRequest, client: Request) -> Any:
        return await _answer(served, request, completion_examples(request), "prompt",
                             _completion_chunks, _completion, client)

    @v1.post("/chat/completions", response_model=api.ChatCompletion, responses=STREAM)
    async def chat_completions(request: api.ChatRequest, client: Request) -> Any:
        if request.max_completion_tokens is not None:
            request.max_tokens = request.max_completion_tokens
        answerer = served.models.get(request.model or served.default)
        examples = [chat_example(request, answerer)] if answerer else []  # else a 404
        return await _answer(served, request, examples, "messages", _chat_chunks,
                             _chat_completion, client)

    return v1


async def _answer(served: Models, request: api.Sampling, examples: list[Example], param: str,
                  chunks: Any, whole: Any, client: Request) -> Any:
    """Check the request, queue its answers, then answer as a stream of events (once every
    answer has its place in the batch) or in one response."""
    plan = await run_in_threadpool(served.plan, request, examples, param)
    answering = served.start(plan, request.stream)
    watch = asyncio.create_task(_watch_disconnect(client, answering))
    try:
        if request.stream:
            await answering.until_placed()
            return _event_stream(chunks(served, answering, request))
        answers = await answering.whole()
    finally:
        watch.cancel()
    served.answered(answering)
    return whole(plan, answers)


def _page_routes(served: Models, settings: ServeSettings, metrics: Metrics,
                 check_key: Callable[[Request], None]) -> APIRouter:
    """The page, the health check and the metrics."""
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(_playground_page(served, settings))

    @router.get("/health", response_model=api.Health)
    async def health() -> api.Health:
        """200 while the server runs, at once even while the models are busy; no key needed,
        and nothing told."""
        return api.Health(status="ok")

    @router.get("/metrics", dependencies=[Depends(check_key)], response_class=Response,
                responses={200: {"content": {"text/plain": {}}}, 401: {"model": api.ErrorBody}})
    async def prometheus_metrics() -> Response:
        """Requests, tokens, queue depth, batch size and latencies, as Prometheus reads
        them."""
        body, media_type = metrics.text()
        return Response(body, media_type=media_type)

    return router


async def _watch_disconnect(client: Request, answering: Answering) -> None:
    """Cancel the request's answers once its client has hung up (checked every 0.1 s)."""
    while not await client.is_disconnected():
        await asyncio.sleep(0.1)
    answering.cancel()


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; a bad request is a 400, never a 5xx (which OpenAI's
    clients would retry)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        response = error_response(err.status, str(err), err.kind, err.param, err.code)
        response.headers.update(err.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        # Of a union's branches (a text, or a list of texts), the one whose type fit names
        # the real limit: "at most 4 items", not "should be a valid string".
        first = min(problems, key=lambda p: str(p.get("type", "")).endswith("_type")
                    ) if problems else {"loc": (), "msg": "invalid request"}
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


def _completion(plan: Plan, answers: list[Answer]) -> api.Completion:
    return api.Completion(
        id=_new_id("cmpl"), created=int(time.time()), model=plan.model,
        choices=[api.CompletionChoice(index=job.index, text=a.response,
                                      finish_reason=a.finish_reason)
                 for job, a in zip(plan.jobs, answers, strict=True)],
        usage=_usage(plan, sum(a.new_tokens for a in answers)))


def _chat_completion(plan: Plan, answers: list[Answer]) -> api.ChatCompletion:
    return api.ChatCompletion(
        id=_new_id("chatcmpl"), created=int(time.time()), model=plan.model,
        choices=[api.ChatChoice(index=job.index, message=api.AssistantMessage(content=a.response),
                                finish_reason=a.finish_reason)
                 for job, a in zip(plan.jobs, answers, strict=True)],
        usage=_usage(plan, sum(a.new_tokens for a in answers)))


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(plan: Plan, new_tokens: int) -> api.Usage:
    return api.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=new_tokens,
                     total_tokens=plan.prompt_tokens + new_tokens)


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


def _chunks(served: Models, answering: Answering, request: api.Sampling, prefix: str,
            envelope: Callable[..., Any], choices_of: Callable[[Any, bool], list[Any]]
            ) -> AsyncIterator[str]:
    """A streamed answer as server-sent events: each piece of text becomes chunks
    (`choices_of(piece, first of its choice)` gives their choices, one list a chunk), then
    the usage if the client asked for it."""
    cid, created, plan = _new_id(prefix), int(time.time()), answering.plan

    def chunk(choices: list[Any], usage: api.Usage | None = None) -> str:
        return _sse(envelope(id=cid, created=created, model=plan.model, choices=choices,
                             usage=usage))

    async def chunks() -> AsyncIterator[str]:
        new_tokens, opened = 0, set()
        async for piece in answering.pieces():
            new_tokens += piece.new_tokens
            first = piece.job.index not in opened
            opened.add(piece.job.index)
            for choices in choices_of(piece, first):
                yield chunk(choices)
        served.answered(answering)
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _usage(plan, new_tokens))

    return _guarded(chunks())


def _completion_choices(piece: Any, first: bool) -> list[list[api.CompletionChoice]]:
    if not (piece.text or piece.finish_reason):
        return []
    return [[api.CompletionChoice(index=piece.job.index, text=piece.text,
                                  finish_reason=piece.finish_reason)]]


def _chat_choices(piece: Any, first: bool) -> list[list[api.ChunkChoice]]:
    index, out = piece.job.index, []
    if first:  # OpenAI opens each choice with the role alone
        out.append([api.ChunkChoice(index=index, delta=api.Delta(role="assistant", content=""))])
    if piece.text:
        out.append([api.ChunkChoice(index=index, delta=api.Delta(content=piece.text))])
    if piece.finish_reason:
        out.append([api.ChunkChoice(index=index, delta=api.Delta(),
                                    finish_reason=piece.finish_reason)])
    return out


def _completion_chunks(served: Models, answering: Answering,
                       request: api.Sampling) -> AsyncIterator[str]:
    return _chunks(served, answering, request, "cmpl", api.Completion, _completion_choices)


def _chat_chunks(served: Models, answering: Answering,
                 request: api.Sampling) -> AsyncIterator[str]:
    return _chunks(served, answering, request, "chatcmpl", api.ChatCompletionChunk,
                   _chat_choices)


# --- the web page ---------------------------------------------------------------------------

def _playground_page(served: Models, settings: ServeSettings) -> str:
    """The page, with what it needs to know about this server written into it."""
    config = {"models": [{"id": name, "label": a.name} for name, a in served.models.items()],
              "needs_key": settings.api_key is not None,
              "max_tokens": settings.max_tokens}
    page = resources.files(__package__).joinpath("playground.html").read_text("utf-8")
    # '<' escaped so that no text in the config can close the script element.
    return page.replace("{{CONFIG}}", json.dumps(config).replace("<", "\\u003c"))


# --- running it -----------------------------------------------------------------------------

def serve(spec: str, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
          compare_base: bool = False, trust_remote_code: bool = False,
          report: Callable[[str], None] = print, device: str = "auto") -> None:
    """Load the run (and with `compare_base` its untuned base) and serve until interrupted."""
    from instructlm.answering.answerer import load_answerer, load_untuned_base
    from instructlm.runs import is_run

    if compare_base and not is_run(spec):
        raise InstructlmError(f"{spec} is not a trained run: --compare-base shows a run "
                              "beside its untuned base model")
    settings.check()
    sock = listen(host, port)  # before the models load, so that a busy port fails at once
    tuned = load_answerer(spec, None, trust_remote_code, device)
    models = {tuned.name: tuned}
    if compare_base:
        models[f"{tuned.name}:base"] = load_untuned_base(spec, trust_remote_code, device)
    app = create_app(models, settings)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    report(f"Serving {', '.join(models)}: the web page at {url}/ and OpenAI's API at {url}/v1"
           + (" (API key required)" if settings.api_key else ""))
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        report(f"warning: listening on {host} without an API key: anyone who can reach this "
               "machine can use the model (set --api-key)")
    run_server(app, sock)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a clear error when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise InstructlmError(f"cannot listen on {host}:{port}: {err.strerror or err}",
                              hint="another program may be using the port; choose one "
                                   "with --port") from None


def run_server(app: FastAPI, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    uvicorn.Server(config).run(sockets=[sock])
