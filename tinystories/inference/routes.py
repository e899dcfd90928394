"""The HTTP side of a request, shared by the routers: `Api` (validation against the context, submitting to the
engine, the 429/503 refusals, the final summary), server-sent events, error bodies, disconnect handling; and our
own API, POST /v1/generate (the OpenAI one is in inference/openai_api.py).
"""

# no `from __future__ import annotations`: FastAPI resolves the route signatures' annotations at runtime
import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from tinystories.inference.engine import EngineClosed, QueueFull, QueueTimeout
from tinystories.inference.frontend import Engine
from tinystories.inference.sampling import SamplingParams, prompt_ids
from tinystories.inference.schemas import GenerateRequest

RETRY_AFTER_S = 1
ERROR_RESPONSES = {429: {"description": "the queue is full (--max-queue): retry after Retry-After seconds"},
                   503: {"description": "waited in the queue past --queue-timeout, or the server is shutting down"},
                   413: {"description": "request body too large"},
                   400: {"description": "the request body is not UTF-8"},
                   # with "stream": true, the answer is server-sent events (each: an optional name, JSON data)
                   200: {"content": {"text/event-stream": {"schema": {
                       "type": "object", "required": ["data"],
                       "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}}}}}


class Api:
    """What the routers share: the engine, the checkpoint's description, and the request/response rules."""

    def __init__(self, engine: Engine, info: dict):
        self.engine, self.info, self.name = engine, info, info["name"]

    def ask(self, req, prompt: str, candidates: int = 1):
        """(the prompt with the request's lines in front, the data/requests.Request or None, a WordBias or None for
        each of `candidates` stories) for a body's words, features and summary; a 400 when this model was not
        trained on requests or a feature is unknown."""
        from tinystories.core.errors import UserError
        from tinystories.data.requests import ask, request_lines
        from tinystories.inference.sampling import request_bias

        try:
            asked = ask(self.info.get("text_format", "plain"), req.words, req.features, req.summary,
                        where=f"the model {self.name}")
        except UserError as e:
            raise invalid("words" if "word" in str(e) else "features", str(e)) from None
        if asked is None:
            return prompt, None, [None] * candidates
        biases = [request_bias(self.engine.tok, asked, req.word_bias, candidates) for _ in range(candidates)]
        return request_lines(asked) + prompt, asked, biases

    def prepare(self, prompt: str, max_new_tokens: int, field_name: str) -> tuple[list[int], int]:
        ctx = self.engine.context
        ids = prompt_ids(self.engine.tok, prompt)
        if len(ids) >= ctx:
            raise invalid("prompt", f"the prompt is {len(ids)} tokens (with the start-of-story token); the model's "
                          f"context is {ctx}, so a prompt may have at most {ctx - 1}")
        if max_new_tokens > ctx:
            raise invalid(field_name, f"{field_name}={max_new_tokens} exceeds the model's context of {ctx} tokens",
                          max_new_tokens)
        return ids, min(max_new_tokens, ctx - len(ids))  # prompt + output fit in the context

    async def start(self, request, ids, params, top_alternatives: int, stop: list[str], openai: bool, bias=None,
                    logprobs: bool = False):
        """(job, None) once the request has a row in the batch, else (None, the error response): 429 when the
        queue is full, 503 when it waited past --queue-timeout or the server is shutting down; a client that
        leaves while queued is dropped."""
        try:
            job = self.engine.submit(ids, params, top_alternatives, stop, bias, logprobs)
        except QueueFull as e:
            return None, error(429, f"{e}; retry in {RETRY_AFTER_S}s", openai, "rate_limit_error", "busy")
        except EngineClosed as e:
            return None, error(503, str(e), openai, "server_error", "shutdown")
        try:
            await unless_disconnected(request, job, job.admitted())
        except QueueTimeout as e:
            return None, error(503, str(e), openai, "server_error", "queue_timeout")
        except EngineClosed as e:
            return None, error(503, str(e), openai, "server_error", "shutdown")
        if job.finish_reason == "cancelled":  # the client left while queued: nobody reads this
            return None, error(499, "client closed the request", openai, "server_error", "cancelled")
        return job, None

    async def result(self, request, job):
        await unless_disconnected(request, job, job.result())
        return job

    def final(self, job) -> dict:
        out = {"finish_reason": job.finish_reason, "prompt_tokens": job.prompt_tokens,
               "completion_tokens": len(job.token_ids), "max_new_tokens": job.max_new_tokens,
               "timing": job.timing(), "model": self.name}
        if job.error:
            out["error"] = job.error
        return out


def sse(data: dict | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ((f"event: {event}\n" if event else "") + f"data: {body}\n\n").encode()


def invalid(field_name: str, msg: str, value=None) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field_name), "msg": msg, "input": value}])


def error(status: int, msg: str, openai: bool, kind: str, code: str) -> JSONResponse:
    body = {"error": {"message": msg, "type": kind, "code": code}} if openai else {"detail": msg}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def unless_disconnected(request, job, awaitable):
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


def native_router(api: Api) -> APIRouter:
    """POST /v1/generate: our API."""
    router = APIRouter()

    @router.post("/v1/generate", tags=["generate"], responses=ERROR_RESPONSES)
    async def generate(req: GenerateRequest, request: Request):
        """Continue `prompt`. JSON by default; with `stream`, server-sent events:
        `event: token` (text piece, token id, alternatives when asked) ... then `event: done`
        (finish_reason, token counts, timing)."""
        if req.candidates > 1 and req.stream:
            raise invalid("candidates", "candidates > 1 needs stream: false (the best story is known only once "
                          "every candidate has ended)", req.candidates)
        prompt, asked, biases = api.ask(req, req.prompt, req.candidates)
        ids, max_new = api.prepare(prompt, req.max_new_tokens, "max_new_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k or None,
                                top_p=req.top_p, repetition_penalty=req.repetition_penalty, seed=req.seed)
        if asked is not None and req.candidates > 1:
            job, refused = await best_of(api, request, ids, params, req, prompt, asked, biases)
        else:
            job, refused = await api.start(request, ids, params, req.top_alternatives, req.stop, openai=False,
                                           bias=biases[0])
        if refused:
            return refused
        if not req.stream:
            await api.result(request, job)
            if job.error:
                return JSONResponse({"detail": f"generation failed: {job.error}"}, status_code=500)
            return {"text": job.text, "prompt": prompt, "tokens": len(job.token_ids),
                    "token_ids": job.token_ids, **api.final(job), "candidates": len(biases) if asked else 1}

        async def events() -> AsyncIterator[bytes]:
            try:
                yield sse({"type": "start", "prompt_tokens": job.prompt_tokens, "max_new_tokens": max_new,
                           "model": api.name, "prompt": prompt}, "start")
                async for ev in job.events():
                    yield sse(ev, "token")
                yield sse({"type": "done", **api.final(job)}, "error" if job.error else "done")
            finally:
                job.cancel()  # the client went away (or we finished): leave the batch before the next step

        return event_stream(events())

    return router


async def best_of(api: Api, request, ids, params, req, prompt: str, asked, biases) -> tuple:
    """(the finished job of the best of len(biases) stories, None), as `generate --candidates` chooses
    (sampling.pick_candidate), or (None, the refusal). Candidate i is seeded seed + i; they share the batch."""
    from dataclasses import replace

    from tinystories.inference.sampling import naturalness, pick_candidate

    jobs = []
    for i, bias in enumerate(biases):
        seeded = replace(params, seed=None if params.seed is None else params.seed + i)
        job, refused = await api.start(request, ids, seeded, req.top_alternatives, req.stop, openai=False,
                                       bias=bias, logprobs=True)
        if refused:
            for other in jobs:
                other.cancel()
            return None, refused
        jobs.append(job)
    # one watcher for the client's disconnect (the ASGI receive channel has one reader), cancelling every candidate
    group = SimpleNamespace(cancel=lambda: [job.cancel() for job in jobs])
    await unless_disconnected(request, group, asyncio.gather(*(job.result() for job in jobs)))
    failed = [job for job in jobs if job.error]
    if failed:
        return failed[0], None
    stories = [{"text": prompt + job.text, "job": job,
                "logprob": naturalness(job.logprobs, bias.pushed if bias is not None else [])}
               for job, bias in zip(jobs, biases)]
    return pick_candidate(stories, asked)["job"], None
