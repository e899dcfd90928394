"""POST /v1/completions: the OpenAI completions protocol (the `openai` client works against it; GET /v1/models
is with the server's other info routes).

The request is the subset of OpenAI's completions request that makes sense for one small model
(schemas.CompletionRequest); the answer is `choices[0].text` and `usage`, or streamed `data:` chunks ending
with `data: [DONE]`. `model` is only a label, echoed back.
"""

# no `from __future__ import annotations`: FastAPI resolves the route signatures' annotations at runtime
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from tinystories.inference.engine import SHUTTING_DOWN
from tinystories.inference.routes import ERROR_RESPONSES, Api, error, event_stream, invalid, sse
from tinystories.inference.sampling import SamplingParams
from tinystories.inference.schemas import MAX_PROMPT_CHARS, MAX_STOPS, CompletionRequest


def openai_router(api: Api) -> APIRouter:
    """POST /v1/completions: the OpenAI completions protocol."""
    router = APIRouter()

    @router.post("/v1/completions", tags=["openai"], responses=ERROR_RESPONSES)
    async def completions(req: CompletionRequest, request: Request):
        """OpenAI-compatible text completion (`choices[0].text`, `usage`, streaming `data:` chunks and
        `data: [DONE]`). `model` is only a label."""
        prompt, stops = _prompt_and_stops(req)
        prompt, _, (bias,) = api.ask(req, prompt)
        ids, max_new = api.prepare(prompt, req.max_tokens or 16, "max_tokens")
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                                top_k=None, top_p=req.top_p, repetition_penalty=1.0, seed=req.seed)
        job, refused = await api.start(request, ids, params, 0, stops, openai=True, bias=bias)
        if refused:
            return refused
        chunk = _chunker(api.name)
        if not req.stream:
            await api.result(request, job)
            if job.error:
                return error(500, f"generation failed: {job.error}", True, "server_error", "error")
            if job.finish_reason == "shutdown":  # OpenAI's finish reasons have no word for it
                return error(503, _shutdown_message(job), True, "server_error", "shutdown")
            return {**chunk(job.text, _finish(job)), "usage": _usage(job)}
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return event_stream(_stream(job, chunk, include_usage))

    return router


async def _stream(job, chunk, include_usage: bool) -> AsyncIterator[bytes]:
    """The streamed answer: a chunk per text piece, then the finish reason (and usage when asked), or an error
    chunk; then [DONE]."""
    try:
        async for ev in job.events():
            if ev.get("text"):
                yield sse(chunk(ev["text"], None))
        if job.error:
            yield sse({"error": {"message": f"generation failed: {job.error}", "type": "server_error"}})
        elif job.finish_reason == "shutdown":
            yield sse({"error": {"message": _shutdown_message(job), "type": "server_error", "code": "shutdown"}})
        else:
            yield sse(chunk("", _finish(job)))
            if include_usage:
                yield sse({**chunk("", None), "choices": [], "usage": _usage(job)})
        yield sse("[DONE]")
    finally:
        job.cancel()  # the client went away (or we finished): leave the batch before the next step


def _prompt_and_stops(req: CompletionRequest) -> tuple[str, list[str]]:
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise invalid("prompt", "give one prompt (a string, or a list holding one string)")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"the prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop strings")
    return prompt, stops


def _chunker(name: str):
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, reason: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}

    return chunk


def _shutdown_message(job) -> str:
    return f"{SHUTTING_DOWN} (the generation was stopped after {len(job.token_ids)} token(s))"


def _finish(job) -> str:
    return "stop" if job.finish_reason == "stop" else "length"


def _usage(job) -> dict:
    n = len(job.token_ids)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": n, "total_tokens": job.prompt_tokens + n}
