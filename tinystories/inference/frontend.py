"""The asyncio front of the engine core, for the HTTP server: the decoding thread and each request's futures.

    engine = Engine(model, tokenizer, max_batch=16, max_queue=256)
    job = engine.submit(prompt_ids, SamplingParams(...), stop=["The end"])   # on the event loop; QueueFull
    await job.admitted()                                                   # out of the queue
    async for event in job.events(): ...                                   # token events, as they come
    await job.result()                                                     # the finished Job
    engine.describe()                                                      # active / queued / served counts

One daemon thread loops `EngineCore.step()` (inference/engine.py) while a request is queued or running, and
sleeps otherwise. Each step's events go to the requests' event loops in one `call_soon_threadsafe` per loop:
a token into the job's asyncio queue, "admitted" and the end resolving its futures. Cancellation is therefore
noticed between two decoding steps, and a queued request that is cancelled leaves the queue at once. `close()`
(the server shutting down) ends every request: queued ones at once (EngineClosed: HTTP 503), running ones
after the current decoding step, with finish_reason "shutdown".
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tinystories.data.tokenizer import TextTokenizer
from tinystories.inference.engine import (  # noqa: F401 (QueueFull, SHUTTING_DOWN: `tinystories.engine` is this module)
    SHUTTING_DOWN,
    EngineClosed,
    EngineCore,
    Event,
    QueueFull,
    QueueTimeout,
    Request,
)
from tinystories.inference.sampling import SamplingParams
from tinystories.model.transformer import Transformer


@dataclass(eq=False)
class Job(Request):
    """A Request with its event loop's side: a queue of token events and futures for admission and the end.
    Created by Engine.submit, on the event loop."""

    def __post_init__(self):
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._admitted = self._loop.create_future()
        self._done = self._loop.create_future()
        self._engine: Engine | None = None

    def cancel(self) -> None:
        """Stop this request: out of the queue at once, or out of the batch before the next decoding step."""
        if self._engine is not None:
            _dispatch(self._engine.core.cancel(self))

    async def admitted(self) -> None:
        """Wait until the request leaves the queue; QueueTimeout if it waited past --queue-timeout, EngineClosed
        if the engine was closed while it waited."""
        await asyncio.shield(self._admitted)
        self._raise_if_never_admitted()

    def _raise_if_never_admitted(self) -> None:
        if self.finish_reason == "queue_timeout":
            raise QueueTimeout(self.error)
        if self.finish_reason == "shutdown" and self.admitted_at is None:
            raise EngineClosed(self.error)

    async def events(self) -> AsyncIterator[dict]:
        """Token events ({"type": "token", "id", "token", "text"[, "top"]}) until the request ends."""
        while True:
            ev = await self._events.get()
            if ev is None:
                return
            yield ev

    async def result(self) -> "Job":
        """The finished job (QueueTimeout or EngineClosed if it never left the queue)."""
        await asyncio.shield(self._done)
        self._raise_if_never_admitted()
        return self


class Engine:
    """An EngineCore and the thread that steps it (a daemon, started on creation)."""

    def __init__(self, model: Transformer, tok: TextTokenizer, max_batch: int = 16, max_queue: int = 256,
                 timeout_s: float = 60.0, queue_timeout_s: float = 60.0):
        self.core = EngineCore(model, tok, max_batch, max_queue, timeout_s, queue_timeout_s)
        self.model, self.tok, self.context = model, tok, self.core.context
        self.max_batch, self.max_queue = max_batch, max_queue
        self._wake = threading.Condition()  # the thread sleeps on it while the core has no work
        self._thread = threading.Thread(target=self._run, daemon=True, name="tinystories-engine")
        self._thread.start()

    def submit(self, ids: list[int], params: SamplingParams, top_alternatives: int = 0,
               stop: list[str] | None = None, bias=None, logprobs: bool = False) -> Job:
        """Queue a request (call it on the event loop). QueueFull when the queue is full and every row busy.
        `bias`: a sampling.WordBias steering this request toward requested words; `logprobs`: record each token's
        log-probability under the model alone (job.logprobs)."""
        job = Job(ids, params, top_alternatives, list(stop or []))
        job.bias = bias
        job.logprobs = [] if logprobs else None
        job._engine = self
        with self._wake:
            self.core.submit(job)
            self._wake.notify()
        return job

    def describe(self) -> dict:
        """Counts and limits, for /health and /v1/model."""
        return self.core.describe()

    def close(self, timeout: float = 30.0) -> None:
        """Stop serving (the server is shutting down). Every request ends: queued ones at once (their admitted() and
        result() raise EngineClosed), active ones after the current decoding step, with finish_reason "shutdown"
        and the tokens they have; later submit() calls raise EngineClosed. Then the loop ends; this waits for it
        (at most `timeout` seconds). Safe to call more than once, from any thread."""
        with self._wake:
            events = self.core.close()
            self._wake.notify()
        _dispatch(events)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    def warm_up(self, log: Callable[[str], None] | None = None) -> None:
        """Run the batched decoding step for 1 and 2 rows, so that a compiled step is compiled now rather than
        inside the first requests (call it before serving)."""
        self.core.warm_up()

    def _run(self) -> None:
        import torch

        # the thread count set on the main thread (serve --threads) is a per-thread OpenMP setting: without this,
        # this thread's parallel regions would use every core, the server's event loop's among them
        torch.set_num_threads(torch.get_num_threads())
        while True:
            with self._wake:
                while not self.core.busy and not self.core.closed:
                    self._wake.wait()
            _dispatch(self.core.step())
            if self.core.closed and not self.core.busy:  # the step ended the running requests ("shutdown")
                return


def _dispatch(events: list[Event]) -> None:
    """Hand events to their jobs' event loops: one call per loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Event]] = {}
    for ev in events:
        by_loop.setdefault(ev.request._loop, []).append(ev)
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop was closed (server shutting down)
            pass


def _deliver(events: list[Event]) -> None:
    """On the event loop: token events into the jobs' queues; "admitted" and the end resolve their futures."""
    for job, kind, data in events:
        if kind == "admitted":
            if not job._admitted.done():
                job._admitted.set_result(None)
        elif kind == "token":
            job._events.put_nowait(data)
        else:
            job._events.put_nowait(None)
            if not job._admitted.done():
                job._admitted.set_result(None)
            if not job._done.done():
                job._done.set_result(None)
