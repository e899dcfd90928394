"""`tinystories serve`: a small HTTP server and a browser playground for one checkpoint.

    POST /v1/generate      our API: JSON, or a server-sent-event stream of text pieces (optionally with each
                           token's top-5 alternatives) ending with an event that carries token counts and timing
    POST /v1/completions   the OpenAI completions protocol (the `openai` client works against it)
    GET  /v1/models        the OpenAI model list (one model)
    GET  /v1/model         architecture, parameter count, tokenizer, training step, validation bits per byte
    GET  /health           liveness, and requests active, queued, served (and cancelled, rejected, timed out)
    GET  /                 the playground page (static files, no build step, works offline)
    GET  /openapi.json     the schema (interactive docs at /docs: Swagger UI, whose scripts FastAPI loads from a CDN)

The model is loaded once, into an `inference.engine.Engine`: requests wait in a bounded FIFO queue (--max-queue;
429 with Retry-After only when it is full, 503 after --queue-timeout in it) and one decoding loop steps up to
--max-batch of them together, one batched forward per token (continuous batching: requests join and leave
between steps). The two routers below only translate HTTP to `engine.submit(...)` and the job's events; a client
that goes away is dropped from the queue at once, or from the batch before the next decoding step. On shutdown
(SIGTERM, Ctrl-C) the engine is closed first: running requests end after the current step with finish_reason
"shutdown" (a stream's final event; in the OpenAI protocol an error chunk, or 503 when not streaming), queued ones
get 503, and then the process exits. Guards:
validation with clear 422s (prompt length in tokens vs the context, parameter ranges), a request body limit
(413), CORS closed unless --cors-origin is given, and no request field names a file: the checkpoint is fixed at
start-up.
"""

# no `from __future__ import annotations`: FastAPI resolves the route signatures' annotations at runtime
import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from tinystories.core.defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE
from tinystories.core.errors import UserError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024  # a prompt never needs more: the context is a few hundred tokens
MAX_PROMPT_CHARS = 32_000
MAX_ALTERNATIVES = 5
RETRY_AFTER_S = 1


def model_name(path: Path) -> str:
    path = Path(path)
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


# ------------------------------------------------------------------------------------------------ schemas


def _schemas():
    from pydantic import BaseModel, ConfigDict, Field

    from tinystories.inference.sampling import SamplingParams

    default = SamplingParams()  # the sampling defaults of every command

    class GenerateRequest(BaseModel):
        """Continue a story. No field names a file: the server's checkpoint is fixed when it starts."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="the start of the story (may be empty)")
        max_new_tokens: int = Field(200, ge=1, description="at most this many tokens; capped by the context")
        temperature: float = Field(default.temperature, ge=0.0, le=5.0, description="0 = greedy")
        top_k: int | None = Field(default.top_k, ge=0, le=1_000_000, description="0 or null = off")
        top_p: float | None = Field(default.top_p, gt=0.0, le=1.0, description="nucleus sampling; 1 or null = off")
        repetition_penalty: float = Field(default.repetition_penalty, gt=0.0, le=10.0, description="1 = off")
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description="null = a fresh random seed")
        stream: bool = Field(False, description="server-sent events, one per token, then a final 'done' event")
        top_alternatives: int = Field(0, ge=0, le=MAX_ALTERNATIVES,
                                      description="with each token, its most likely alternatives and probabilities")
        stop: list[str] = Field(default_factory=list, max_length=4, description="stop at any of these strings")

    class CompletionRequest(BaseModel):
        """The OpenAI completions request (the subset that makes sense for one small model)."""

        model_config = ConfigDict(extra="forbid")
        model: str | None = Field(None, max_length=200, description="a label only, echoed back; never a path")
        prompt: str | list[str] = Field("", description="a string (or a list holding one string)")
        max_tokens: int | None = Field(16, ge=1)
        temperature: float | None = Field(1.0, ge=0.0, le=2.0)
        top_p: float | None = Field(1.0, gt=0.0, le=1.0)
        n: int = Field(1, ge=1, le=1, description="only 1")
        stream: bool = False
        stream_options: dict | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(None, ge=0, le=2**63 - 1)
        user: str | None = Field(None, max_length=200)
        echo: bool = Field(False, description="only false")
        logprobs: int | None = Field(None, ge=0, le=0, description="not supported (null or 0)")
        presence_penalty: float | None = Field(0.0, ge=0.0, le=0.0, description="not supported (0 only)")
        frequency_penalty: float | None = Field(0.0, ge=0.0, le=0.0, description="not supported (0 only)")

    return GenerateRequest, CompletionRequest


# ------------------------------------------------------------------------------------------------ app


class _BodyLimit:
    """Pure ASGI middleware: a request body over `limit` bytes gets 413 (Content-Length or counted)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away while sending
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                return await self._reject(send)
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        payload = json.dumps({"detail": f"request body too large (limit {self.limit:,} bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _sse(data: dict | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ((f"event: {event}\n" if event else "") + f"data: {body}\n\n").encode()


class _Api:
    """What the routers share: the engine, the checkpoint's description, and the request/response rules."""

    def __init__(self, engine, info: dict):
        self.engine, self.info, self.name = engine, info, info["name"]

    def prepare(self, prompt: str, max_new_tokens: int, field_name: str) -> tuple[list[int], int]:
        from tinystories.inference.sampling import prompt_ids

        ctx = self.engine.context
        ids = prompt_ids(self.engine.tok, prompt)
        if len(ids) >= ctx:
            raise _invalid("prompt", f"the prompt is {len(ids)} tokens (with the start-of-story token); the model's "
                           f"context is {ctx}, so a prompt may have at most {ctx - 1}")
        if max_new_tokens > ctx:
            raise _invalid(field_name, f"{field_name}={max_new_tokens} exceeds the model's context of {ctx} tokens",
                           max_new_tokens)
        return ids, min(max_new_tokens, ctx - len(ids))  # prompt + output fit in the context

    async def start(self, request, ids, params, top_alternatives: int, stop: list[str], openai: bool):
        """(job, None) once the request has a row in the batch, else (None, the error response): 429 when the
        queue is full, 503 when it waited past --queue-timeout or the server is shutting down; a client that
        leaves while queued is dropped."""
        from tinystories.inference.engine import EngineClosed, QueueFull, QueueTimeout

        try:
            job = self.engine.submit(ids, params, top_alternatives, stop)
        except QueueFull as e:
            return None, _error(429, f"{e}; retry in {RETRY_AFTER_S}s", openai, "rate_limit_error", "busy")
        except EngineClosed as e:
            return None, _error(503, str(e), openai, "server_error", "shutdown")
        try:
            await _unless_disconnected(request, job, job.admitted())
        except QueueTimeout as e:
            return None, _error(503, str(e), openai, "server_error", "queue_timeout")
        except EngineClosed as e:
            return None, _error(503, str(e), openai, "server_error", "shutdown")
        if job.finish_reason == "cancelled":  # the client left while queued: nobody reads this
            return None, _error(499, "client closed the request", openai, "server_error", "cancelled")
        return job, None

    async def result(self, request, job):
        await _unless_disconnected(request, job, job.result())
        return job

    def final(self, job) -> dict:
        out = {"finish_reason": job.finish_reason, "prompt_tokens": job.prompt_tokens,
               "completion_tokens": len(job.token_ids), "max_new_tokens": job.max_new_tokens,
               "timing": job.timing(), "model": self.name}
        if job.error:
            out["error"] = job.error
        return out


def _invalid(field_name: str, msg: str, value=None):
    from fastapi.exceptions import RequestValidationError

    return RequestValidationError([{"type": "value_error", "loc": ("body", field_name), "msg": msg, "input": value}])


def _error(status: int, msg: str, openai: bool, kind: str, code: str):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": msg, "type": kind, "code": code}} if openai else {"detail": msg}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _event_stream(chunks: AsyncIterator[bytes]):
    from fastapi.responses import StreamingResponse

    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _unless_disconnected(request, job, awaitable):
    """Await `awaitable` (the job's admission or result); cancel the job if the client disconnects first or
    this handler is cancelled. The disconnect is seen at once: a task waits on the ASGI receive channel."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            job.cancel()
        return await task
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        gone.cancel()


async def _disconnect(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def native_router(api: _Api, GenerateRequest):
    """POST /v1/generate: our API."""
    from fastapi import APIRouter, Request
    from fastapi.responses import JSONResponse

    from tinystories.inference.sampling import SamplingParams

    router = APIRouter()

    @router.post("/v1/generate", tags=["generate"], responses=ERROR_RESPONSES)
    async def generate(req: GenerateRequest, request: Request):
        """Continue `prompt`. JSON by default; with `stream`, server-sent events:
        `event: token` (text piece, token id, alternatives when asked) ... then `event: done`
        (finish_reason, token counts, timing)."""
        ids, max_new = api.prepare(req.prompt, req.max_new_tokens, "max_new_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
        job, refused = await api.start(request, ids, params, req.top_alternatives, req.stop, openai=False)
        if refused:
            return refused
        if not req.stream:
            await api.result(request, job)
            if job.error:
                return JSONResponse({"detail": f"generation failed: {job.error}"}, status_code=500)
            return {"text": job.text, "prompt": req.prompt, "tokens": len(job.token_ids),
                    "token_ids": job.token_ids, **api.final(job)}

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse({"type": "start", "prompt_tokens": job.prompt_tokens, "max_new_tokens": max_new,
                            "model": api.name}, "start")
                async for ev in job.events():
                    yield _sse(ev, "token")
                yield _sse({"type": "done", **api.final(job)}, "error" if job.error else "done")
            finally:
                job.cancel()  # the client went away (or we finished): leave the batch before the next step

        return _event_stream(events())

    return router


def openai_router(api: _Api, CompletionRequest):
    """POST /v1/completions: the OpenAI completions protocol."""
    from fastapi import APIRouter, Request

    from tinystories.inference.sampling import SamplingParams

    router = APIRouter()

    @router.post("/v1/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI-compatible text completion (`choices[0].text`, `usage`, streaming `data:` chunks and
        `data: [DONE]`). `model` is only a label."""
        prompt, stops = _openai_prompt_and_stops(req)
        ids, max_new = api.prepare(prompt, req.max_tokens or 16, "max_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                                top_k=None, top_p=req.top_p, repetition_penalty=1.0, seed=req.seed)
        job, refused = await api.start(request, ids, params, 0, stops, openai=True)
        if refused:
            return refused
        chunk = _openai_chunker(api.name)
        if not req.stream:
            await api.result(request, job)
            if job.error:
                return _error(500, f"generation failed: {job.error}", True, "server_error", "error")
            if job.finish_reason == "shutdown":  # OpenAI's finish reasons have no word for it
                return _error(503, _shutdown_message(job), True, "server_error", "shutdown")
            return {**chunk(job.text, _openai_finish(job)), "usage": _openai_usage(job)}
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            try:
                async for ev in job.events():
                    if ev.get("text"):
                        yield _sse(chunk(ev["text"], None))
                if job.error:
                    yield _sse({"error": {"message": f"generation failed: {job.error}", "type": "server_error"}})
                elif job.finish_reason == "shutdown":
                    yield _sse({"error": {"message": _shutdown_message(job), "type": "server_error",
                                          "code": "shutdown"}})
                else:
                    yield _sse(chunk("", _openai_finish(job)))
                    if include_usage:
                        yield _sse({**chunk("", None), "choices": [], "usage": _openai_usage(job)})
                yield _sse("[DONE]")
            finally:
                job.cancel()

        return _event_stream(events())

    return router


def _openai_prompt_and_stops(req) -> tuple[str, list[str]]:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise _invalid("prompt", "give one prompt (a string, or a list holding one string)")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _invalid("prompt", f"the prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise _invalid("stop", "at most 4 stop strings")
    return prompt, stops


def _openai_chunker(name: str):
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, reason: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}

    return chunk


def _shutdown_message(job) -> str:
    from tinystories.inference.engine import SHUTTING_DOWN

    return f"{SHUTTING_DOWN} (the generation was stopped after {len(job.token_ids)} token(s))"


def _openai_finish(job) -> str:
    return "stop" if job.finish_reason == "stop" else "length"


def _openai_usage(job) -> dict:
    n = len(job.token_ids)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}


ERROR_RESPONSES = {429: {"description": "the queue is full (--max-queue): retry after Retry-After seconds"},
                   503: {"description": "waited in the queue past --queue-timeout, or the server is shutting down"},
                   413: {"description": "request body too large"}}


def create_app(model, ck, max_batch: int = DEFAULT_MAX_BATCH, timeout_s: float = 60.0,
               cors_origins: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout_s: float = 60.0):
    """The FastAPI app serving `model` (loaded from checkpoint `ck`): an Engine, the two routers, middleware."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    from tinystories.inference.engine import Engine

    GenerateRequest, CompletionRequest = _schemas()
    engine = Engine(model, ck.tokenizer, max_batch, max_queue, timeout_s, queue_timeout_s)
    name = model_name(ck.path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn sends this only after the open requests ended (serve() closes the engine before that, so that
        # they do); for other ASGI servers and test clients, this is where the engine stops
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="tinystories", version="1", summary=f"Story generation with {name}", description=__doc__,
                  lifespan=lifespan)
    app.state.engine = engine
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"], max_age=600)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    info = {
        "name": name,
        "architecture": ck.cfg.model.model_dump(),
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "context": engine.context,
        "tokenizer": {"kind": ck.tokenizer.kind, "vocab_size": ck.tokenizer.vocab_size,
                      "file": ck.tokenizer.path.name},
        "step": ck.step,
        "val_bpb": _val_bpb(ck.state),
        "metrics": _finite(ck.state.get("metrics")),
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "limits": {"max_concurrent": max_batch, "max_batch": max_batch, "max_queue": max_queue,
                   "timeout_s": timeout_s, "queue_timeout_s": queue_timeout_s, "max_body_bytes": max_body_bytes,
                   "max_alternatives": MAX_ALTERNATIVES},
    }
    api = _Api(engine, info)
    app.include_router(native_router(api, GenerateRequest))
    app.include_router(openai_router(api, CompletionRequest))

    @app.get("/health", tags=["info"])
    async def health():
        return {"status": "ok", "model": name, "max_concurrent": max_batch, **engine.describe()}

    @app.get("/v1/model", tags=["info"])
    async def model_info():
        return {**info, "load": engine.describe()}

    @app.get("/v1/models", tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tinystories"}]}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _finite(value):
    """JSON-safe metrics: NaN and infinities (a run stopped before its first logged loss) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _val_bpb(state: dict) -> float | None:
    metrics = state.get("metrics") or {}
    if not isinstance(metrics, dict):
        return None
    for key in ("val_bpb", "val/bpb", "val_bits_per_byte", "bpb"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    val = metrics.get("val")
    if isinstance(val, dict) and isinstance(val.get("bpb"), (int, float)):
        return float(val["bpb"])
    return None


# ------------------------------------------------------------------------------------------------ CLI


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
          timeout_s: float = 60.0, cors_origins: list[str] | None = None, device: str = "cpu",
          log_level: str = "info", threads: int | None = None, compile_decoding: bool = True,
          max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout_s: float = 60.0,
          batch_flag: str = "--max-batch") -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'tinystories[serve]'") from None
    import uvicorn

    from tinystories.model.checkpoint import load_model

    if max_batch < 1:
        raise UserError(f"{batch_flag} {max_batch}: must be at least 1")
    if max_queue < 0:
        raise UserError(f"--max-queue {max_queue}: must be at least 0 (0 = no queue: 429 when every row is busy)")
    if timeout_s <= 0:
        raise UserError(f"--timeout {timeout_s}: must be positive (seconds)")
    if queue_timeout_s <= 0:
        raise UserError(f"--queue-timeout {queue_timeout_s}: must be positive (seconds)")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be in 0..65535")
    for origin in cors_origins or []:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise UserError(f"--cors-origin {origin!r}: give an origin like http://localhost:3000 (or '*')")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    # take the port before the (possibly slow) model load and compile: a port in use fails at once, in one line
    sockets = bind_sockets(host, port)
    port = sockets[0].getsockname()[1]  # --port 0: the port the system picked
    import torch

    if threads or str(device).startswith("cpu"):
        # one torch thread for the decoding loop: the event loop (HTTP, server-sent events) needs the other core
        torch.set_num_threads(threads or 1)
    from tinystories.model.device import pick_device

    model, ck = load_model(checkpoint, pick_device(device))
    app = create_app(model, ck, max_batch, timeout_s, cors_origins, max_queue=max_queue,
                     queue_timeout_s=queue_timeout_s)
    if compile_decoding:  # before listening: no request waits on the compile
        t0 = time.perf_counter()
        print("compiling the decoding step (torch.compile)...", flush=True)
        model.compile_decoding()
        app.state.engine.warm_up()  # the batched step, for one row and for several
        if model.decoding_is_compiled:  # else decode() printed why and stays eager
            print(f"compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    shown = f"[{host}]" if ":" in host else host
    ready = [f"serving {ck.path} ({model.num_params():,} parameters, context {ck.cfg.model.max_seq_len}) "
             f"on http://{shown}:{port}/  (API schema: /openapi.json, docs: /docs)"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        ready.append(f"warning: listening on {host}, reachable from other machines; the server has no authentication")
    # timeout_graceful_shutdown bounds the wait for requests the engine does not end (none of ours: closing it
    # ends them all within a decoding step)
    server = _uvicorn_server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=2), app.state.engine, ready)
    try:
        server.run(sockets=sockets)
    except OSError as e:  # listen() on a socket another process bound meanwhile
        raise UserError(_bind_error(host, port, e)) from None
    finally:
        app.state.engine.close()
        for sock in sockets:
            sock.close()


def _uvicorn_server(config, engine, ready: list[str]):
    """A uvicorn.Server that prints `ready` once it listens (a script may connect as soon as it reads it) and, on
    shutdown (SIGTERM, Ctrl-C), closes the engine before waiting for the open connections: the running requests
    then end after the current decoding step with finish_reason "shutdown" and the queued ones get 503, instead
    of running on until uvicorn's graceful-shutdown timeout cancels them without an answer."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:  # listening (startup failed otherwise)
                print("\n".join(ready), flush=True)

        async def shutdown(self, sockets=None):
            await asyncio.to_thread(engine.close)  # the jobs' endings reach this event loop meanwhile
            await super().shutdown(sockets=sockets)

    return Server(config)


def _bind_error(host: str, port: int, e: OSError) -> str:
    import errno

    if e.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {host}: pick another --port"
    if e.errno == errno.EACCES:
        return f"--port {port}: permission denied (ports below 1024 need privileges): pick another --port"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine (use 127.0.0.1, or 0.0.0.0 for all interfaces)"
    return f"cannot listen on {host}:{port} ({e.strerror or e}): check --host and --port"


def bind_sockets(host: str, port: int) -> list:
    """Bound (not yet listening) TCP sockets for host:port, one per address the host resolves to, as asyncio's
    create_server would make them (SO_REUSEADDR, IPv6 sockets IPv6-only). A UserError when one cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror}); use an address such as 127.0.0.1") from None
    addrs: list = []
    for family, type_, proto, _, addr in infos:
        if (family, type_, proto, addr) not in addrs:
            addrs.append((family, type_, proto, addr))
    sockets: list = []
    try:
        for family, type_, proto, addr in addrs:
            if port == 0 and sockets:  # --port 0: every address on the one port the system picked first
                addr = (addr[0], sockets[0].getsockname()[1], *addr[2:])
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == getattr(socket, "AF_INET6", None) and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                raise UserError(_bind_error(host, port, e)) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _cmd_serve(args) -> int:
    if args.max_batch is not None and args.max_concurrent is not None and args.max_batch != args.max_concurrent:
        raise UserError(f"--max-batch {args.max_batch} and --max-concurrent {args.max_concurrent}: --max-concurrent "
                        "is the old name of --max-batch; give one of them")
    flag = "--max-concurrent" if args.max_concurrent is not None else "--max-batch"
    max_batch = next((v for v in (args.max_batch, args.max_concurrent) if v is not None), DEFAULT_MAX_BATCH)
    serve(args.checkpoint, args.host, args.port, max_batch, args.timeout, args.cors_origin, args.device,
          args.log_level, args.threads, args.compile, args.max_queue, args.queue_timeout, flag)
    return 0
