"""`tinystories serve`: a small HTTP server and a browser playground for one checkpoint.

    POST /v1/generate      our API: JSON, or a server-sent-event stream of text pieces (optionally with each
                           token's top-5 alternatives) ending with an event that carries token counts and timing
    POST /v1/completions   the OpenAI completions protocol (the `openai` client works against it)
    GET  /v1/models        the OpenAI model list (one model)
    GET  /v1/model         architecture, parameter count, tokenizer, training step, validation bits per byte
    GET  /health           liveness, and requests active, queued, served (and cancelled, rejected, timed out)
    GET  /                 the playground page (static files, no build step, works offline)
    GET  /openapi.json     the schema (interactive docs at /docs: Swagger UI, whose scripts FastAPI loads from a CDN)

The model is loaded once, into an `inference.frontend.Engine` (the asyncio front of `inference.engine.EngineCore`):
requests wait in a bounded FIFO queue (--max-queue; 429 with Retry-After only when it is full, 503 after
--queue-timeout in it) and one decoding loop steps up to --max-batch of them together, one batched forward per
token (continuous batching: requests join and leave between steps). The two routers (inference/routes.py,
inference/openai_api.py) only translate HTTP to `engine.submit(...)` and the job's events; a client that goes
away is dropped from the queue at once, or from the batch before the next decoding step. On shutdown (SIGTERM,
Ctrl-C) the engine is closed first: running requests end after the current step with finish_reason "shutdown"
(a stream's final event; in the OpenAI protocol an error chunk, or 503 when not streaming), queued ones get 503,
and then the process exits. Guards: validation with clear 422s (prompt length in tokens vs the context, parameter
ranges, finite numbers, valid Unicode), a request body limit (413), a body that is not UTF-8 (400), an optional
API key (--api-key or $TINYSTORIES_API_KEY: 401 on the API without `Authorization: Bearer KEY`), CORS closed
unless --cors-origin is given, and no request field names a file: the checkpoint is fixed at start-up
(inference/guards.py holds the middleware).
"""

import asyncio
import contextlib
import math
from pathlib import Path

from tinystories.core.defaults import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE
from tinystories.core.errors import UserError

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY_BYTES = 64 * 1024  # a prompt never needs more: the context is a few hundred tokens


# ------------------------------------------------------------------------------------------------ app


def create_app(model, ck, max_batch: int = DEFAULT_MAX_BATCH, timeout_s: float = 60.0,
               cors_origins: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_queue: int = DEFAULT_MAX_QUEUE, queue_timeout_s: float = 60.0, api_key: str | None = None):
    """The FastAPI app serving `model` (loaded from checkpoint `ck`): an Engine, the routers, middleware (with
    `api_key`, the API needs `Authorization: Bearer API_KEY`: inference/guards.py)."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from tinystories.core.runs import run_name
    from tinystories.inference.frontend import Engine
    from tinystories.inference.guards import ApiKey, BodyGuard, document_api_key, install_error_handlers
    from tinystories.inference.openai_api import openai_router
    from tinystories.inference.routes import Api, native_router

    engine = Engine(model, ck.tokenizer, max_batch, max_queue, timeout_s, queue_timeout_s)
    name = run_name(ck.path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn sends this only after the open requests ended (serve() closes the engine before that, so that
        # they do); for other ASGI servers and test clients, this is where the engine stops
        await asyncio.to_thread(engine.close)

    app = FastAPI(title="tinystories", version="1", summary=f"Story generation with {name}", description=__doc__,
                  lifespan=lifespan)
    app.state.engine = engine
    install_error_handlers(app)
    # the last added runs first: CORS (so that 401s and 413s carry its headers), then the key, then the body
    app.add_middleware(BodyGuard, limit=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["content-type", "authorization"], max_age=600)
    limits = {"max_concurrent": max_batch, "max_batch": max_batch, "max_queue": max_queue, "timeout_s": timeout_s,
              "queue_timeout_s": queue_timeout_s, "max_body_bytes": max_body_bytes}
    api = Api(engine, _model_info(name, model, ck, engine.context, limits))
    app.include_router(native_router(api))
    app.include_router(openai_router(api))
    app.include_router(_info_router(api, max_batch, bool(api_key)))
    _schema_with_context(app, engine.context)
    if api_key:
        document_api_key(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _schema_with_context(app, context: int) -> None:
    """/openapi.json says what the server enforces: at most `context` new tokens (the model's context)."""
    build = app.openapi

    def openapi():
        schema = build()
        for name, field in (("GenerateRequest", "max_new_tokens"), ("CompletionRequest", "max_tokens")):
            prop = schema["components"]["schemas"][name]["properties"][field]
            for option in prop.get("anyOf", [prop]):  # max_tokens may be null
                if option.get("type") == "integer":
                    option["maximum"] = context
        return schema

    app.openapi = openapi


def _model_info(name: str, model, ck, context: int, limits: dict) -> dict:
    """GET /v1/model: the checkpoint, its architecture and training, where it runs and the server's limits."""
    from tinystories.inference.schemas import MAX_ALTERNATIVES

    return {
        "name": name,
        "architecture": ck.cfg.model.model_dump(),
        "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "context": context,
        "tokenizer": {"kind": ck.tokenizer.kind, "vocab_size": ck.tokenizer.vocab_size,
                      "file": ck.tokenizer.path.name},
        "step": ck.step,
        "val_bpb": _val_bpb(ck.state),
        "metrics": _finite(ck.state.get("metrics")),
        "device": str(next(model.parameters()).device),
        "dtype": model.precision_name or str(next(model.parameters()).dtype).removeprefix("torch."),
        "limits": {**limits, "max_alternatives": MAX_ALTERNATIVES},
        "text_format": ck.cfg.data.format,  # "instruct": it takes words, features and a summary (docs/instruct.md)
    }


def _info_router(api, max_batch: int, api_key_required: bool):
    """GET /health (open, also with --api-key: it says whether the API needs a key), /v1/model, /v1/models
    (OpenAI's model list) and / (the playground page)."""
    from fastapi import APIRouter
    from fastapi.responses import FileResponse

    router, engine, name = APIRouter(), api.engine, api.name

    @router.get("/health", tags=["info"])
    async def health():
        return {"status": "ok", "model": name, "max_concurrent": max_batch, "api_key_required": api_key_required,
                **engine.describe()}

    @router.get("/v1/model", tags=["info"])
    async def model_info():
        return {**api.info, "load": engine.describe()}

    @router.get("/v1/models", tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "tinystories"}]}

    @router.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return router


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
          batch_flag: str = "--max-batch", api_key: str | None = None, dtype: str = "float32") -> None:
    _check_options(port, max_batch, max_queue, timeout_s, queue_timeout_s, cors_origins, threads, batch_flag)
    import uvicorn

    from tinystories.inference.guards import exposure_warning
    from tinystories.inference.sampling import compile_decoding_now

    # take the port before the (possibly slow) model load and compile: a port in use fails at once, in one line
    sockets = bind_sockets(host, port)
    port = sockets[0].getsockname()[1]  # --port 0: the port the system picked
    model, ck = _load(checkpoint, device, threads, dtype)
    app = create_app(model, ck, max_batch, timeout_s, cors_origins, max_queue=max_queue,
                     queue_timeout_s=queue_timeout_s, api_key=api_key)
    if compile_decoding:  # before listening: no request waits on the compile; warmed up for one row and several
        compile_decoding_now(model, ck.tokenizer.doc_start_id, lambda line: print(line, flush=True),
                             app.state.engine.warm_up)
    shown = f"[{host}]" if ":" in host else host
    ready = [f"serving {ck.path} ({model.num_params():,} parameters, context {ck.cfg.model.max_seq_len}) "
             f"on http://{shown}:{port}/  (API schema: /openapi.json, docs: /docs)"]
    if api_key:
        ready.append("the API needs the key: 'Authorization: Bearer KEY' (the playground asks for it once)")
    warning = exposure_warning(host, port, api_key)
    if warning:
        ready.append(warning)
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


def _check_options(port: int, max_batch: int, max_queue: int, timeout_s: float, queue_timeout_s: float,
                   cors_origins: list[str] | None, threads: int | None, batch_flag: str) -> None:
    """FastAPI and uvicorn are installed and the options make sense, else a UserError naming the flag."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise UserError("the server needs FastAPI and uvicorn: pip install 'tinystories[serve]'") from None
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


def _load(checkpoint: str, device: str, threads: int | None, dtype: str = "float32"):
    """(model, checkpoint) on the device, weights in precision `dtype` (said on stdout); on a CPU, the decoding
    loop gets one torch thread unless --threads."""
    import torch

    from tinystories.model.checkpoint import load_model
    from tinystories.model.device import pick_device
    from tinystories.model.precision import inference_precision

    if threads or str(device).startswith("cpu"):
        # one torch thread for the decoding loop: the event loop (HTTP, server-sent events) needs the other core
        torch.set_num_threads(threads or 1)
    dev = pick_device(device)
    model, ck = load_model(checkpoint, dev)
    print(inference_precision(model, dev, dtype).describe(), flush=True)
    return model, ck


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
    import os

    from tinystories.inference.guards import resolve_api_key

    if args.max_batch is not None and args.max_concurrent is not None and args.max_batch != args.max_concurrent:
        raise UserError(f"--max-batch {args.max_batch} and --max-concurrent {args.max_concurrent}: --max-concurrent "
                        "is the old name of --max-batch; give one of them")
    flag = "--max-concurrent" if args.max_concurrent is not None else "--max-batch"
    max_batch = next((v for v in (args.max_batch, args.max_concurrent) if v is not None), DEFAULT_MAX_BATCH)
    api_key = resolve_api_key(getattr(args, "api_key", None), os.environ)
    serve(args.checkpoint, args.host, args.port, max_batch, args.timeout, args.cors_origin, args.device,
          args.log_level, args.threads, args.compile, args.max_queue, args.queue_timeout, flag, api_key, args.dtype)
    return 0
