"""An OpenAI-compatible HTTP server for one model (FastAPI; the `serve` extra).

A model's caches are its own, so generations run one at a time on a worker thread, in arrival
order; requests waiting for it form a bounded queue, past which they get HTTP 429. The event loop
only parses, queues and streams, so it keeps answering (`/health`, 429s, disconnects) meanwhile.
A client that goes away cancels its job, and the worker stops it before the next step.
"""
from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from dovetail_onnx.runtime.batch import BatchEngine, Sequence, batchable
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import Generator, GeneratorParams, Model
from dovetail_onnx.runtime.sampling import SamplingParams
from dovetail_onnx.runtime.tokenizer import StreamDecoder, Tokenizer
from dovetail_onnx.serve.metrics import Metrics

MAX_BODY_BYTES = 1 << 20
# How often a request waiting for its first token checks that its client is still there.
POLL_S = 0.25


class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields both endpoints share. Fields OpenAI has and we do not use are ignored, as its server does."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # up to 4 strings, each of any length
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens even past an end-of-turn token


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: str | list[int]


@dataclass
class Result:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.stats["cached_tokens"]}}


class StopText:
    """A reply's text as its tokens arrive, cut before the first stop string.

    Text that could still be the start of a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.tokenizer, self.stop, self.decoder = tokenizer, stop, StreamDecoder(tokenizer)
        self.text, self.sent, self.stopped = "", 0, False
        self.hold = max(map(len, stop), default=1) - 1

    def push(self, ids: list[int]) -> str:
        self.text += self.decoder.push(ids)
        return self._release(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest once generation ended: held-back text and any character the stream decoder waited on."""
        self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if self.stopped:
            return ""
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped, end = True, min(cuts)
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece


class Job:
    """One request's generation. It runs on the worker thread and sends events to its request's event loop:
    ("text", piece)…, then ("done", Result) or ("error", message)."""

    def __init__(self, prompt: list[int], params: GeneratorParams, stop: list[str]):
        self.prompt, self.params, self.stop = prompt, params, stop
        self.arrived = time.perf_counter()
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, kind: str, value: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancelled.set()

    def run(self, model: Model, metrics: Metrics) -> None:
        """The whole generation, alone on the model (Worker)."""
        if self.cancelled.is_set():
            return
        try:
            generator = Generator(model, self.params, self.prompt)
        except DovetailError as exc:
            self.send("error", str(exc))
            return
        self.begin(model)
        try:
            while not generator.is_done() and not self.text.stopped and not self.cancelled.is_set():
                self.push(generator.generate_next_token(), metrics)
            self.finish(model, metrics, generator.tokens, generator.params, generator.stats.as_dict())
        except Exception as exc:  # one line to the client; the server goes on
            self.send("error", f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            generator.close()

    def begin(self, model: Model) -> None:
        self.text, self.first = StopText(model.tokenizer, self.stop), True

    def push(self, tokens: list[int], metrics: Metrics) -> None:
        """Tokens a step added: their text, held back while it could still be a stop string's start."""
        self._text(self.text.push(tokens))
        if self.first and tokens:  # the prefill's token
            metrics.ttft.observe(time.perf_counter() - self.arrived)
            self.first = False

    def finish(self, model: Model, metrics: Metrics, tokens: list[int], params: GeneratorParams, stats: dict) -> None:
        self._text(self.text.finish())
        eos = bool(tokens) and params.stop_at_eos and tokens[-1] in params.eos_token_ids
        stats = {**stats, "target_provider": model.target.session.get_providers()[0],
                 "draft_provider": model.draft_provider, "mode": params.mode}
        reason = "stop" if self.text.stopped or eos else "length"
        metrics.finished(reason, stats, len(self.prompt))
        self.send("done", Result(reason, len(self.prompt), len(tokens), stats))

    def _text(self, piece: str) -> None:
        if piece:
            self.send("text", piece)


class Worker:
    """Runs jobs one at a time on a thread of its own, first come first served; at most `max_queue` wait."""

    slots = 1  # jobs generating at once

    def __init__(self, model: Model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.pending = 0  # submitted and not finished: the running job and those waiting
        self.running = 0
        self.metrics = Metrics(running=lambda: self.running, waiting=lambda: self.pending - self.running)
        self.count = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="dovetail-worker", daemon=True)

    def submit(self, job: Job) -> None:
        with self.count:
            if self.pending >= self.max_queue + self.slots:
                raise APIError(429, f"the server is busy: {self.pending - self.slots} requests are waiting already "
                                    f"(--max-queue {self.max_queue}); retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error")
            self.pending += 1
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.running = 1
            try:
                job.run(self.model, self.metrics)
            finally:
                with self.count:
                    self.pending -= 1
                    self.running = 0

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)


class BatchWorker(Worker):
    """Continuous batching (runtime/batch.py): up to `slots` jobs generate together, one target forward a step
    for all of them; a job that arrives meanwhile joins at the next step, first come first served, and one that
    finishes, stops or is cancelled leaves at once."""

    def __init__(self, model: Model, max_queue: int, slots: int):
        super().__init__(model, max_queue)
        self.slots = slots
        self.engine = BatchEngine(model)

    def _run(self) -> None:
        running: dict[Sequence, Job] = {}
        while True:
            while len(running) < self.slots:
                try:  # wait for work only when there is nothing to step
                    job = self.jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None:
                    self.engine.close()
                    return
                self._admit(job, running)
            self.running = len(running)
            if not running:
                continue
            try:
                for seq, tokens in self.engine.step().items():
                    running[seq].push(tokens, self.metrics)
            except Exception as exc:  # one line to each client; the server goes on
                for seq, job in list(running.items()):
                    job.send("error", f"generation failed: {type(exc).__name__}: {exc}")
                    self._leave(seq, running)
                continue
            for seq, job in list(running.items()):
                if seq.done or job.text.stopped or job.cancelled.is_set():
                    job.finish(self.model, self.metrics, seq.tokens, seq.params, seq.stats.as_dict())
                    self._leave(seq, running)

    def _admit(self, job: Job, running: dict[Sequence, Job]) -> None:
        if not job.cancelled.is_set():
            try:
                seq = self.engine.add(job.prompt, job.params)
            except DovetailError as exc:
                job.send("error", str(exc))
            else:
                job.begin(self.model)
                running[seq] = job
                return
        with self.count:
            self.pending -= 1

    def _leave(self, seq: Sequence, running: dict[Sequence, Job]) -> None:
        self.engine.remove(seq)
        del running[seq]
        with self.count:
            self.pending -= 1
            self.running = len(running)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before any of it is parsed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._too_large().message)
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body over {self.limit} bytes", code="request_too_large")


def create_app(model: Model, name: str, max_queue: int = 16, api_key: str | None = None,
               max_batch: int = 4) -> FastAPI:
    """The app serving `model` as `name`: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics.
    Up to `max_batch` requests generate together where the artifact batches exactly (runtime/batch.py), else one
    at a time."""
    batched = max_batch > 1 and batchable(model) is None
    worker = BatchWorker(model, max_queue, max_batch) if batched else Worker(model, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.thread.start()
        yield
        worker.stop()

    app = FastAPI(title="dovetail-onnx", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    _add_error_handlers(app)

    async def authorized(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if api_key and not secrets.compare_digest(given, f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    def check(body: Sampling, prompt: list[int], max_tokens: int | None) -> Job:
        """The request as a job, or the APIError that says what is wrong with it."""
        if body.model is not None and body.model != name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {name!r}", "model",
                           "model_not_found")
        if body.n > 1:
            raise APIError(400, f"n = {body.n}: this server returns one choice per request; send n = 1", "n")
        context = model.manifest.context_length
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(prompt) + (max_tokens or 1) > context:
            wanted = f" + max_tokens ({max_tokens})" if max_tokens else ""
            raise APIError(400, f"prompt ({len(prompt)} tokens){wanted} exceeds the model's context of {context} "
                                "tokens; shorten the prompt or lower max_tokens", "max_tokens" if max_tokens else "prompt",
                           "context_length_exceeded")
        sampling = SamplingParams(body.temperature, body.top_p, 0, body.seed)
        try:
            sampling.check()
        except DovetailError as exc:
            raise APIError(400, str(exc), "top_p" if not 0 < body.top_p <= 1 else "temperature") from None
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if "" in stop:
            raise APIError(400, "a stop string is empty", "stop")
        params = GeneratorParams(max_tokens or context - len(prompt), stop_at_eos=not body.ignore_eos,
                                 sampling=sampling)
        return Job(prompt, params, stop)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pending": worker.pending}

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> Response:
        body, content_type = worker.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        card = {"id": name, "object": "model", "created": int(model.manifest.folder.stat().st_mtime),
                "owned_by": "dovetail-onnx", "max_model_len": model.manifest.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        try:
            prompt = model.tokenizer.chat([m.model_dump() for m in body.messages])
        except (DovetailError, TemplateError) as exc:
            raise APIError(400, f"the chat template refused these messages: {exc}", "messages") from None
        job = check(body, prompt, body.max_completion_tokens or body.max_tokens)
        worker.submit(job)
        reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", name, chat=True)
        return await reply.respond(job, request, body)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = model.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        if any(not 0 <= t < model.manifest.target.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {model.manifest.target.vocab_size})", "prompt")
        job = check(body, prompt, body.max_tokens)
        worker.submit(job)
        reply = Reply(f"cmpl-{uuid.uuid4().hex}", "text_completion", name, chat=False)
        return await reply.respond(job, request, body)

    return app


@dataclass
class Reply:
    """Shapes a job's events as one OpenAI response object, or as its stream of chunks."""

    id: str
    object: str
    model: str
    chat: bool

    async def respond(self, job: Job, request: Request, body: Sampling):
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(_events(job, request), usage), media_type="text/event-stream")
        text = []
        async for kind, value in _events(job, request):
            if kind == "text":
                text.append(value)
            elif kind == "error":
                raise APIError(500, value, kind="server_error")
            else:
                return self._object([self._choice("".join(text), value.finish_reason)], value)
        raise APIError(499, "the client went away")

    async def _stream(self, events: AsyncIterator[tuple[str, object]], include_usage: bool) -> AsyncIterator[str]:
        object_name = f"{self.object}.chunk" if self.chat else self.object
        if self.chat:
            yield _sse(self._chunk(object_name, {"role": "assistant", "content": ""}, None))
        async for kind, value in events:
            if kind == "text":
                yield _sse(self._chunk(object_name, {"content": value} if self.chat else value, None))
            elif kind == "error":
                yield _sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
            else:
                yield _sse({**self._chunk(object_name, {} if self.chat else "", value.finish_reason),
                            "dovetail": value.stats})
                if include_usage:
                    yield _sse({**self._head(object_name), "choices": [], "usage": value.usage()})
        yield "data: [DONE]\n\n"

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": int(time.time()), "model": self.model}

    def _choice(self, text: str, finish_reason: str) -> dict:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _chunk(self, object_name: str, content: str | dict, finish_reason: str | None) -> dict:
        choice = ({"index": 0, "delta": content, "finish_reason": finish_reason} if self.chat
                  else {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason})
        return {**self._head(object_name), "choices": [choice]}

    def _object(self, choices: list[dict], result: Result) -> dict:
        return {**self._head(self.object), "choices": choices, "usage": result.usage(), "dovetail": result.stats}


async def _events(job: Job, request: Request) -> AsyncIterator[tuple[str, object]]:
    """The job's events until it ends or the client goes away; either way the job is cancelled when this ends.
    Whether the client is still there is asked every POLL_S at most: the question costs the event loop a task
    group, which a batch of requests streaming tokens would otherwise pay for every piece of text."""
    checked = time.monotonic()
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
                continue
            yield kind, value
            if kind != "text":
                return
            if time.monotonic() - checked >= POLL_S:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
    finally:
        job.cancelled.set()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-style JSON with one line of message; none is a traceback."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        if error["type"] == "json_invalid":
            return APIError(400, f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}").response()
        message = f"{where}: {error['msg']}" if where else error["msg"]
        return APIError(400, message, where or None).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()
