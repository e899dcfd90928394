"""`tinystories serve`: a small HTTP server and a browser playground for one checkpoint.

    POST /v1/generate      our API: JSON, or a server-sent-event stream of text pieces (optionally with each
                           token's top-5 alternatives) ending with an event that carries token counts and timing
    POST /v1/completions   the OpenAI completions protocol (the `openai` client works against it)
    GET  /v1/models        the OpenAI model list (one model)
    GET  /v1/model         architecture, parameter count, tokenizer, training step, validation bits per byte
    GET  /health           liveness and the number of generations running
    GET  /                 the playground page (static files, no build step, works offline)
    GET  /openapi.json     the schema (interactive docs at /docs: Swagger UI, whose scripts FastAPI loads from a CDN)

The model is loaded once. Each generation runs `sampling.sample` (the one sampling implementation) in a worker
thread, so the event loop keeps serving; it stops at the next token when the client goes away or the request's
time limit passes. Guards: validation with clear 422s (prompt length in tokens vs the context, parameter ranges),
at most --max-concurrent generations (more get 429 with Retry-After), a request body limit (413), CORS closed
unless --cors-origin is given, and no request field names a file: the checkpoint is fixed at start-up.
"""

# no `from __future__ import annotations`: FastAPI resolves the route signatures' annotations at runtime
import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinystories.errors import UserError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024  # a prompt never needs more: the context is a few hundred tokens
MAX_PROMPT_CHARS = 32_000
MAX_ALTERNATIVES = 5
RETRY_AFTER_S = 1


# ------------------------------------------------------------------------------------------------ engine


@dataclass
class Generation:
    """The state of one request's generation, filled in by the worker thread."""

    prompt_tokens: int
    max_new_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end of story or a stop string), "length", "timeout", "cancelled"
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    ended_at: float | None = None
    error: str | None = None

    def timing(self) -> dict:
        end = self.ended_at or time.perf_counter()
        total = end - self.started
        n = len(self.token_ids)
        ttft = (self.first_token_at - self.started) if self.first_token_at else None
        decode = (end - self.first_token_at) if self.first_token_at else 0.0
        return {
            "total_s": round(total, 4),
            "time_to_first_token_s": round(ttft, 4) if ttft is not None else None,
            "tokens_per_s": round(n / total, 2) if total > 0 and n else 0.0,
            "decode_tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
        }


class Engine:
    """The loaded model, the tokenizer and the concurrency limit; runs generations in worker threads."""

    def __init__(self, model, ck, max_concurrent: int = 4, timeout_s: float = 60.0):
        self.model, self.ck, self.tok = model, ck, ck.tokenizer
        self.context = ck.cfg.model.max_seq_len
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.active = 0
        self.served = 0
        self.name = model_name(ck.path)

    def try_acquire(self) -> bool:
        with self._lock:
            if self.active >= self.max_concurrent:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1
            self.served += 1

    def token_text(self, i: int) -> str:
        """How one token reads on its own (for the alternatives list)."""
        if i in self.tok.special_ids:
            return "<end of story>" if i in self.tok.stop_ids else "<start>"
        if self.tok.kind == "sentencepiece":
            piece = self.tok.id_to_piece(i)
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
                b = int(piece[3:5], 16)
                return chr(b) if b < 128 else piece
            return piece.replace("\u2581", " ")
        return self.tok.decode([i])

    def run(self, gen: Generation, ids: list[int], params, top_alternatives: int, stop_strings: list[str],
            cancel: threading.Event, emit) -> None:
        """Worker thread body: sample, decode pieces, call emit(event_dict) for each token, then a final event.

        Always releases the concurrency slot it was started with."""
        from tinystories.sampling import StreamDecoder, sample

        deadline = gen.started + self.timeout_s
        timed_out = False

        def should_stop() -> bool:
            nonlocal timed_out
            if cancel.is_set():
                return True
            if time.perf_counter() > deadline:
                timed_out = True
                return True
            return False

        decoder = StreamDecoder(self.tok, ids)
        held = ""  # text held back because it could be the start of a stop string
        try:
            for step in sample(self.model, [ids], params, self.tok.stop_ids, top_alternatives=top_alternatives,
                               should_stop=should_stop):
                t = int(step.tokens[0])
                if gen.first_token_at is None:
                    gen.first_token_at = time.perf_counter()
                if t in self.tok.stop_ids:
                    gen.finish_reason = "stop"
                    break
                gen.token_ids.append(t)
                piece = decoder.push(t)
                event: dict[str, Any] = {"type": "token", "id": t, "token": self.token_text(t)}
                if step.top_ids is not None:
                    event["top"] = [
                        {"id": int(a), "token": self.token_text(int(a)), "prob": round(float(p), 5)}
                        for a, p in zip(step.top_ids[0].tolist(), step.top_probs[0].tolist())
                    ]
                if stop_strings:
                    piece, held, hit = _apply_stop(held + piece, stop_strings)
                    gen.text += piece
                    event["text"] = piece
                    emit(event)
                    if hit:
                        gen.finish_reason = "stop"
                        break
                else:
                    gen.text += piece
                    event["text"] = piece
                    emit(event)
            if gen.finish_reason is None:
                if timed_out:
                    gen.finish_reason = "timeout"
                elif cancel.is_set():
                    gen.finish_reason = "cancelled"
                else:
                    gen.finish_reason = "length"
            if held and gen.finish_reason != "stop":
                gen.text += held
                emit({"type": "token", "id": None, "token": "", "text": held})
        except Exception as e:  # a bug or an out-of-memory: report it to the client instead of hanging
            gen.error = f"{type(e).__name__}: {e}"
            gen.finish_reason = "error"
        finally:
            gen.ended_at = time.perf_counter()
            self.release()
            emit(None)


def _apply_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """Split `text` into (safe to emit, held back, stop string found)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0
    for s in stops:  # the longest tail of text that begins some stop string
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                hold = max(hold, k)
                break
    return (text[:-hold], text[-hold:], False) if hold else (text, "", False)


def model_name(path: Path) -> str:
    path = Path(path)
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


# ------------------------------------------------------------------------------------------------ schemas


def _schemas():
    from pydantic import BaseModel, ConfigDict, Field

    class GenerateRequest(BaseModel):
        """Continue a story. No field names a file: the server's checkpoint is fixed when it starts."""

        model_config = ConfigDict(extra="forbid")
        prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="the start of the story (may be empty)")
        max_new_tokens: int = Field(200, ge=1, description="at most this many tokens; capped by the context")
        temperature: float = Field(0.8, ge=0.0, le=5.0, description="0 = greedy")
        top_k: int | None = Field(50, ge=0, le=1_000_000, description="0 or null = off")
        top_p: float | None = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling; 1 or null = off")
        repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 = off")
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


def create_app(model, ck, max_concurrent: int = 4, timeout_s: float = 60.0, cors_origins: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app serving `model` (loaded from checkpoint `ck`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    from tinystories.sampling import SamplingParams, prompt_ids

    GenerateRequest, CompletionRequest = _schemas()
    engine = Engine(model, ck, max_concurrent, timeout_s)
    app = FastAPI(title="tinystories", version="1", summary=f"Story generation with {engine.name}",
                  description=__doc__)
    app.state.engine = engine
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"], max_age=600)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    n_params = model.num_params()
    info = {
        "name": engine.name,
        "architecture": ck.cfg.model.model_dump(),
        "parameters": n_params,
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "context": engine.context,
        "tokenizer": {"kind": ck.tokenizer.kind, "vocab_size": ck.tokenizer.vocab_size,
                      "file": ck.tokenizer.path.name},
        "step": ck.step,
        "val_bpb": _val_bpb(ck.state),
        "metrics": ck.state.get("metrics"),
        "device": str(next(model.parameters()).device),
        "limits": {"max_concurrent": max_concurrent, "timeout_s": timeout_s, "max_body_bytes": max_body_bytes,
                   "max_alternatives": MAX_ALTERNATIVES},
    }

    def invalid(field_name: str, msg: str, value=None):
        return RequestValidationError([{"type": "value_error", "loc": ("body", field_name), "msg": msg,
                                        "input": value}])

    def prepare(prompt: str, max_new_tokens: int, field_name: str) -> tuple[list[int], int]:
        ids = prompt_ids(engine.tok, prompt)
        if len(ids) >= engine.context:
            raise invalid("prompt", f"the prompt is {len(ids)} tokens (with the start-of-story token); the model's "
                          f"context is {engine.context}, so a prompt may have at most {engine.context - 1}")
        if max_new_tokens > engine.context:
            raise invalid(field_name, f"{field_name}={max_new_tokens} exceeds the model's context of "
                          f"{engine.context} tokens", max_new_tokens)
        return ids, min(max_new_tokens, engine.context - len(ids))  # prompt + output fit in the context

    def busy(openai: bool):
        msg = (f"the server is busy: {engine.max_concurrent} generation(s) running (--max-concurrent); "
               f"retry in {RETRY_AFTER_S}s")
        body = {"error": {"message": msg, "type": "rate_limit_error", "code": "busy"}} if openai else {"detail": msg}
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})

    def start(ids, params, top_alternatives, stop_strings, loop) -> tuple[Generation, asyncio.Queue, threading.Event]:
        gen = Generation(prompt_tokens=len(ids), max_new_tokens=params.max_new_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(ev):
            loop.call_soon_threadsafe(queue.put_nowait, ev)

        threading.Thread(target=engine.run, args=(gen, ids, params, top_alternatives, stop_strings, cancel, emit),
                         daemon=True, name="tinystories-generate").start()
        return gen, queue, cancel

    async def wait_done(request: Request, queue: asyncio.Queue, cancel: threading.Event) -> None:
        """Drain the queue until the worker's end marker; cancel the worker if the client goes away
        (or if this request handler itself is cancelled)."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancel.set()
                    continue
                if ev is None:
                    return
        except asyncio.CancelledError:
            cancel.set()
            raise

    # ------------------------------------------------------------------ routes

    @app.get("/health", tags=["info"])
    async def health():
        return {"status": "ok", "model": engine.name, "active": engine.active,
                "max_concurrent": engine.max_concurrent, "served": engine.served}

    @app.get("/v1/model", tags=["info"])
    async def model_info():
        return info

    @app.get("/v1/models", tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                            "owned_by": "tinystories"}]}

    @app.post("/v1/generate", tags=["generate"], responses={429: {"description": "too many generations running"},
                                                             413: {"description": "request body too large"}})
    async def generate(req: GenerateRequest, request: Request):
        """Continue `prompt`. JSON by default; with `stream`, server-sent events:
        `event: token` (text piece, token id, alternatives when asked) ... then `event: done`
        (finish_reason, token counts, timing)."""
        ids, max_new = prepare(req.prompt, req.max_new_tokens, "max_new_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
        if not engine.try_acquire():
            return busy(False)
        gen, queue, cancel = start(ids, params, req.top_alternatives, [s for s in req.stop if s],
                                   asyncio.get_running_loop())

        def final() -> dict:
            out = {"finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
                   "completion_tokens": len(gen.token_ids), "max_new_tokens": max_new, "timing": gen.timing(),
                   "model": engine.name}
            if gen.error:
                out["error"] = gen.error
            return out

        if not req.stream:
            await wait_done(request, queue, cancel)
            if gen.error:
                return JSONResponse({"detail": f"generation failed: {gen.error}"}, status_code=500)
            return {"text": gen.text, "prompt": req.prompt, "tokens": len(gen.token_ids), "token_ids": gen.token_ids,
                    **final()}

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse({"type": "start", "prompt_tokens": gen.prompt_tokens, "max_new_tokens": max_new,
                            "model": engine.name}, "start")
                while True:
                    ev = await queue.get()
                    if ev is None:
                        break
                    yield _sse(ev, "token")
                yield _sse({"type": "done", **final()}, "error" if gen.error else "done")
            finally:
                cancel.set()  # the client went away (or we finished): stop at the next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", tags=["openai"], responses={429: {"description": "too many generations running"}})
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI-compatible text completion (`choices[0].text`, `usage`, streaming `data:` chunks and
        `data: [DONE]`). `model` is only a label."""
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise invalid("prompt", "give one prompt (a string, or a list holding one string)")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        if len(prompt) > MAX_PROMPT_CHARS:
            raise invalid("prompt", f"the prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise invalid("stop", "at most 4 stop strings")
        ids, max_new = prepare(prompt, req.max_tokens or 16, "max_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                                top_k=None, top_p=req.top_p, repetition_penalty=1.0, seed=req.seed)
        if not engine.try_acquire():
            return busy(True)
        gen, queue, cancel = start(ids, params, 0, [s for s in stops if s], asyncio.get_running_loop())
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def finish_reason() -> str:
            return "stop" if gen.finish_reason == "stop" else "length"

        def usage() -> dict:
            n = len(gen.token_ids)
            return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}

        def chunk(text: str, reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": engine.name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}

        if not req.stream:
            await wait_done(request, queue, cancel)
            if gen.error:
                return JSONResponse({"error": {"message": f"generation failed: {gen.error}", "type": "server_error"}},
                                    status_code=500)
            return {**chunk(gen.text, finish_reason()), "usage": usage()}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            try:
                while True:
                    ev = await queue.get()
                    if ev is None:
                        break
                    if ev.get("text"):
                        yield _sse(chunk(ev["text"], None))
                if gen.error:
                    yield _sse({"error": {"message": f"generation failed: {gen.error}", "type": "server_error"}})
                else:
                    yield _sse(chunk("", finish_reason()))
                    if include_usage:
                        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": engine.name,
                                    "choices": [], "usage": usage()})
                yield _sse("[DONE]")
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


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


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_concurrent: int = 4,
          timeout_s: float = 60.0, cors_origins: list[str] | None = None, device: str = "cpu",
          log_level: str = "info", threads: int | None = None, compile_decoding: bool = True) -> None:
    try:
        import uvicorn  # noqa: F401
        import fastapi  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'tinystories[serve]'") from None
    import uvicorn

    from tinystories.checkpoint import load_model

    if max_concurrent < 1:
        raise UserError(f"--max-concurrent {max_concurrent}: must be at least 1")
    if timeout_s <= 0:
        raise UserError(f"--timeout {timeout_s}: must be positive (seconds)")
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
        # one thread per generation: requests already run in parallel, and intra-op threads only contend
        # (a 260K-parameter model decodes ~5x faster with 1 thread than with 2 on a 2-core machine)
        torch.set_num_threads(threads or 1)
    model, ck = load_model(checkpoint, device)
    if compile_decoding:  # before listening: no request waits on the compile
        from tinystories.sampling import compile_decoding_now

        compile_decoding_now(model, ck.tokenizer.doc_start_id, lambda line: print(line, flush=True))
    app = create_app(model, ck, max_concurrent, timeout_s, cors_origins)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {ck.path} ({model.num_params():,} parameters, context {ck.cfg.model.max_seq_len}) "
          f"on http://{shown}:{port}/  (API schema: /openapi.json, docs: /docs)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}, reachable from other machines; the server has no authentication",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                          timeout_graceful_shutdown=2))
    try:
        server.run(sockets=sockets)
    except OSError as e:  # listen() on a socket another process bound meanwhile
        raise UserError(_bind_error(host, port, e)) from None
    finally:
        for sock in sockets:
            sock.close()


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
    serve(args.checkpoint, args.host, args.port, args.max_concurrent, args.timeout, args.cors_origin, args.device,
          args.log_level, args.threads, args.compile)
    return 0


def register_cli(sub) -> None:
    from tinystories.cli import add_command

    p = add_command(
        sub, "serve", "Serve a checkpoint over HTTP: a JSON/streaming API, an OpenAI-compatible endpoint and a "
                      "browser playground.",
        "  tinystories serve --checkpoint runs/tiny            # then open http://127.0.0.1:8000/\n"
        "  tinystories serve --checkpoint ck/ --port 8080 --max-concurrent 8 --timeout 30\n"
        "  tinystories serve --checkpoint ck/ --cors-origin http://localhost:3000\n"
        "  curl -N -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\\n"
        "       -d '{\"prompt\": \"Once upon a time\", \"stream\": true}'\n",
        _cmd_serve,
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory (its best checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-concurrent", type=int, default=4,
                   help="generations allowed at once; more get 429 with Retry-After (default: 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="time limit per generation in seconds (default: 60)")
    p.add_argument("--cors-origin", nargs="+", default=[], metavar="ORIGIN",
                   help="allow browser pages from these origins to call the API (default: none, CORS closed)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 on CPU; generations run in parallel threads)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the one-token decoding step at startup (torch.compile; a few seconds, falls back to "
                        "eager if it cannot): ~2x the tokens/s under load on CPU (default: on; --no-compile to skip)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
