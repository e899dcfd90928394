"""The serving engine: a bounded FIFO queue and one decoding loop that steps every active request together.

    engine = Engine(model, tokenizer, max_batch=16, max_queue=256)
    job = engine.submit(prompt_ids, SamplingParams(...), stop=["The end"])   # on the event loop; QueueFull
    async for event in job.events(): ...                                   # token events, as they come
    await job.result()                                                     # the finished Job
    engine.describe()                                                      # active / queued / served counts

Continuous batching (as vLLM and TGI do it, sized for small models): one thread runs the decoding loop. Each
iteration it admits queued requests into free rows (prefilling each prompt into its row of a `SlotKVCache`),
drops rows whose client went away or whose time ran out, samples the next token of every row (each with its
own sampling parameters and seeded generator: `sampling.next_tokens`), hands the tokens to the requests'
asyncio queues in one call, lets finished rows leave (the last row moves into the hole, so the active rows
stay 0..n-1), and runs one batched forward for the rest (`model.decode`: compiled when `compile_decoding()`
was called). Cancellation is therefore noticed between two decoding steps, and a queued request that is
cancelled leaves the queue at once. `close()` (the server shutting down) ends every request: queued ones at once
(EngineClosed: HTTP 503), active ones after the current decoding step, with finish_reason "shutdown".
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tinystories.data.tokenizer import TextTokenizer
from tinystories.inference.sampling import SamplingParams, StreamDecoder, next_tokens
from tinystories.model.transformer import SlotKVCache, Transformer


class QueueFull(Exception):
    """The queue holds --max-queue requests and every row is busy (HTTP 429)."""


class QueueTimeout(Exception):
    """A request waited in the queue past --queue-timeout (HTTP 503)."""


class EngineClosed(Exception):
    """The engine was closed (the server is shutting down) before the request left the queue (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One request: its inputs, the text so far, its finish reason and timing. Created by Engine.submit."""

    ids: list[int]
    params: SamplingParams
    top_alternatives: int = 0
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # "stop" (end of story or a stop string), "length", "timeout", "cancelled", "error", "shutdown" (the engine
    # was closed); "queue_timeout" when it never left the queue, and "shutdown" with admitted_at None
    finish_reason: str | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    ended_at: float | None = None
    queue_position: int = 0  # requests ahead of it when it was submitted

    def __post_init__(self):
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._admitted = self._loop.create_future()
        self._done = self._loop.create_future()
        self._cancel_at: float | None = None
        self._engine: Engine | None = None
        self._held = ""  # text held back: it could be the start of a stop string
        self._decoder: StreamDecoder | None = None
        self._gen: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def cancelled(self) -> bool:
        return self._cancel_at is not None

    def cancel(self) -> None:
        """Stop this request: out of the queue at once, or out of the batch before the next decoding step."""
        if self._cancel_at is None and self.finish_reason is None:
            self._cancel_at = time.perf_counter()
            if self._engine is not None:
                self._engine._cancel_queued(self)

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

    def timing(self) -> dict:
        end = self.ended_at or time.perf_counter()
        total = end - self.submitted
        n = len(self.token_ids)
        ttft = (self.first_token_at - self.submitted) if self.first_token_at else None
        decode = (end - self.first_token_at) if self.first_token_at else 0.0
        queued = ((self.admitted_at or end) - self.submitted)
        return {
            "total_s": round(total, 4),
            "time_to_first_token_s": round(ttft, 4) if ttft is not None else None,
            "tokens_per_s": round(n / total, 2) if total > 0 and n else 0.0,
            "decode_tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
            "queued_s": round(queued, 4),
        }


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


class Engine:
    """The model, a bounded FIFO queue and the decoding loop (a daemon thread, started on creation)."""

    def __init__(self, model: Transformer, tok: TextTokenizer, max_batch: int = 16, max_queue: int = 256,
                 timeout_s: float = 60.0, queue_timeout_s: float = 60.0):
        self.model, self.tok = model, tok
        self.context = model.cfg.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.timeout_s, self.queue_timeout_s = timeout_s, queue_timeout_s
        self.device = model.rope.device
        dtype = next(model.parameters()).dtype
        # one spare position, as in sampling.sample: the read part is then never the whole buffer
        self.cache = SlotKVCache.empty(model.cfg, max_batch, self.device, dtype, max_len=self.context + 1)
        self._logits = torch.zeros(max_batch, model.cfg.vocab_size, device=self.device)
        self._seen = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self._stop_ids = frozenset(tok.stop_ids)
        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._rows: list[Job] = []  # active requests; row b of the cache holds _rows[b]
        self._lengths: list[int] = []  # tokens in each row's cache
        self.served = self.cancelled = self.rejected = self.expired = self.errors = 0
        self._freed_after_cancel = collections.deque(maxlen=1000)  # seconds from cancel() to the row being free
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="tinystories-engine")
        self._thread.start()

    # ---------------------------------------------------------------------------------------- API

    def submit(self, ids: list[int], params: SamplingParams, top_alternatives: int = 0,
               stop: list[str] | None = None) -> Job:
        """Queue a request (call it on the event loop). QueueFull when the queue is full and every row busy."""
        job = Job(ids, params, top_alternatives, [s for s in (stop or []) if s])
        job._engine = self
        job._decoder = StreamDecoder(self.tok, ids)
        job._gen = torch.Generator(device=self.device)
        if params.seed is not None:
            job._gen.manual_seed(params.seed)
        else:
            job._gen.seed()
        with self._lock:
            if self._closed:
                raise EngineClosed(SHUTTING_DOWN)
            free = self.max_batch - len(self._rows)
            if len(self._queue) >= self.max_queue + free:
                self.rejected += 1
                raise QueueFull(self._busy_message())
            job.queue_position = len(self._queue)
            self._queue.append(job)
            self._lock.notify()
        return job

    def describe(self) -> dict:
        """Counts and limits, for /health and /v1/model."""
        with self._lock:
            freed = sorted(self._freed_after_cancel)
            out = {"active": len(self._rows), "queued": len(self._queue), "served": self.served,
                   "cancelled": self.cancelled, "rejected": self.rejected, "queue_timeouts": self.expired,
                   "errors": self.errors, "max_batch": self.max_batch, "max_queue": self.max_queue}
        out["cancel_to_free_ms"] = ({"p50": round(1000 * freed[len(freed) // 2], 2), "max": round(1000 * freed[-1], 2),
                                     "n": len(freed)} if freed else None)
        return out

    def close(self, timeout: float = 30.0) -> None:
        """Stop serving (the server is shutting down). Every request ends: queued ones at once (their admitted() and
        result() raise EngineClosed), active ones after the current decoding step, with finish_reason "shutdown"
        and the tokens they have; later submit() calls raise EngineClosed. Then the loop ends; this waits for it
        (at most `timeout` seconds). Safe to call more than once, from any thread."""
        with self._lock:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._lock.notify()
        out: list[tuple[Job, Any]] = []
        now = time.perf_counter()
        for job in queued:
            job.finish_reason, job.error, job.ended_at = "shutdown", SHUTTING_DOWN, now
            out += [(job, "admitted"), (job, None)]
        _dispatch(out)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    def warm_up(self, log: Callable[[str], None] | None = None) -> None:
        """Run the batched decoding step for 1 and 2 rows (masked and not), so that a compiled step is compiled
        now rather than inside the first requests."""
        with torch.inference_mode():
            start = self.tok.doc_start_id
            for n in (1, 2)[: self.max_batch]:
                for b in range(n):
                    self.model.decode(torch.tensor([[start, start]], device=self.device), self.cache.slot(b))
                for positions in ([2] * n, [2, 3][:n]):
                    self._step(torch.full((n, 1), start, device=self.device), positions)
            self.cache.positions = None

    def _busy_message(self) -> str:
        return (f"the server is busy: {len(self._rows)} generation(s) running (--max-batch {self.max_batch}) and "
                f"{len(self._queue)} waiting (--max-queue {self.max_queue}, full)")

    # ---------------------------------------------------------------------------------------- the loop

    def _cancel_queued(self, job: Job) -> None:
        """On cancel(): a queued job leaves the queue at once (an active one is dropped by the loop)."""
        with self._lock:
            try:
                self._queue.remove(job)
            except ValueError:
                return
            self.cancelled += 1
            self._freed_after_cancel.append(0.0)
        job.finish_reason = "cancelled"
        job.ended_at = time.perf_counter()
        job._loop.call_soon_threadsafe(_deliver, [(job, "admitted"), (job, None)])

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._rows and not self._queue and not self._closed:
                        self._lock.wait()
                    if self._closed:
                        break
                    now = time.perf_counter()
                    out: list[tuple[Job, Any]] = []
                    for job in [j for j in self._queue if now - j.submitted > self.queue_timeout_s]:
                        self._queue.remove(job)
                        self.expired += 1
                        job.finish_reason = "queue_timeout"
                        job.error = (f"waited {now - job.submitted:.1f}s in the queue without a free slot "
                                     f"(--queue-timeout {self.queue_timeout_s:g}; {len(self._rows)} generation(s) "
                                     f"running, --max-batch {self.max_batch}); retry later")
                        job.ended_at = now
                        out += [(job, "admitted"), (job, None)]
                    admit = [self._queue.popleft() for _ in range(min(len(self._queue),
                                                                      self.max_batch - len(self._rows)))]
                try:
                    self._iteration(admit, out)
                except Exception as e:  # a bug or out of memory: fail the active requests, keep serving
                    msg = f"{type(e).__name__}: {e}"
                    for job in [*self._rows, *[j for j in admit if j not in self._rows]]:
                        if job.finish_reason is None:
                            job.error = msg
                            self._finish(job, "error", out)
                    with self._lock:
                        self.errors += 1
                        self._rows.clear()
                        self._lengths.clear()
                if out:
                    _dispatch(out)
        # closed: the active requests end here, between two steps, with what they have (close() emptied the queue)
        out = []
        for job in self._rows:
            self._finish(job, "shutdown", out)
        with self._lock:
            self.served += len(self._rows)
            self._rows.clear()
            self._lengths.clear()
        _dispatch(out)

    def _iteration(self, admit: list[Job], out: list) -> None:
        now = time.perf_counter()
        for job in admit:  # prefill each new request into the next free row
            job.admitted_at = now
            out.append((job, "admitted"))
            if job.cancelled:
                self._finish(job, "cancelled", out)
                with self._lock:
                    self.served += 1
                    self.cancelled += 1
                    self._freed_after_cancel.append(time.perf_counter() - job._cancel_at)
                continue
            b = len(self._rows)
            with self._lock:
                self._rows.append(job)
                self._lengths.append(len(job.ids))
            ids = torch.tensor([job.ids], dtype=torch.long, device=self.device)
            self._logits[b] = self.model.decode(ids, self.cache.slot(b))[0, -1].float()
            if job.params.repetition_penalty != 1.0:
                self._seen[b].zero_()
                self._seen[b, ids[0]] = True
        # requests cancelled or out of time leave before the next token
        now = time.perf_counter()
        for b in reversed(range(len(self._rows))):
            job = self._rows[b]
            if job.cancelled or now - job.admitted_at > self.timeout_s:
                self._finish(job, "cancelled" if job.cancelled else "timeout", out)
                self._remove(b)
        n = len(self._rows)
        if n == 0:
            return
        tokens = self._sample(n).tolist()
        now = time.perf_counter()
        keep = [self._accept(job, tokens[b], now, out) for b, job in enumerate(self._rows)]
        _dispatch(out)  # the tokens go out before the next forward pass
        out.clear()
        for b in reversed(range(n)):
            if not keep[b]:
                self._remove(b)
        n = len(self._rows)
        if n == 0:
            return
        nxt = torch.tensor([[j.token_ids[-1]] for j in self._rows], dtype=torch.long, device=self.device)
        positions = list(self._lengths)
        self._logits[:n] = self._step(nxt, positions)
        for b in range(n):
            self._lengths[b] += 1

    def _step(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One batched forward: row b's token at position positions[b]. Logits (n, V) in float32."""
        self.cache.positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.cache.span = max(positions) + 1
        self.cache.uniform = len(positions) == 1  # a single row needs no mask (and decodes as sample() does)
        return self.model.decode(tokens, self.cache)[:, -1].float()

    def _sample(self, n: int) -> torch.Tensor:
        """The next token of rows 0..n-1; rows with the same sampling settings are sampled together."""
        groups: dict[tuple, list[int]] = {}
        for b, job in enumerate(self._rows):
            p = job.params
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty, job.top_alternatives),
                              []).append(b)
        tokens = torch.empty(n, dtype=torch.long, device=self.device)
        for rows in groups.values():
            job = self._rows[rows[0]]
            whole = len(rows) == n
            idx = None if whole else torch.tensor(rows, device=self.device)
            logits = self._logits[:n] if whole else self._logits[idx]
            seen = self._seen[:n] if whole else self._seen[idx]
            nxt, top_ids, top_probs = next_tokens(logits, job.params, [self._rows[b]._gen for b in rows], seen,
                                                  job.top_alternatives)
            if whole:
                tokens = nxt
            else:
                tokens[idx] = nxt
            if job.params.repetition_penalty != 1.0:
                self._seen[idx if idx is not None else torch.arange(n, device=self.device), nxt] = True
            if top_ids is not None:
                for k, b in enumerate(rows):
                    self._rows[b]._top = (top_ids[k].tolist(), top_probs[k].tolist())
        return tokens

    def _accept(self, job: Job, t: int, now: float, out: list) -> bool:
        """Give a request its new token t: events, stop strings, limits. False when the request is finished."""
        if job.first_token_at is None:
            job.first_token_at = now
        if t in self._stop_ids:
            self._finish(job, "stop", out)
            return False
        job.token_ids.append(t)
        piece = job._decoder.push(t)
        event: dict[str, Any] = {"type": "token", "id": t, "token": self.token_text(t)}
        if job.top_alternatives:
            ids, probs = job._top
            event["top"] = [{"id": a, "token": self.token_text(a), "prob": round(p, 5)} for a, p in zip(ids, probs)]
        hit = False
        if job.stop:
            piece, job._held, hit = _apply_stop(job._held + piece, job.stop)
        job.text += piece
        event["text"] = piece
        out.append((job, event))
        if hit:
            self._finish(job, "stop", out)
            return False
        if len(job.token_ids) >= job.params.max_new_tokens:
            self._finish(job, "length", out)
            return False
        return True

    def _finish(self, job: Job, reason: str, out: list) -> None:
        job.finish_reason = reason
        if job._held and reason != "stop":
            job.text += job._held
            out.append((job, {"type": "token", "id": None, "token": "", "text": job._held}))
        job._held = ""
        job.ended_at = time.perf_counter()
        out.append((job, None))

    def _remove(self, b: int) -> None:
        """Free row b: the last active row moves into it."""
        job = self._rows[b]
        last = len(self._rows) - 1
        if b != last:
            self.cache.move(last, b, self._lengths[last])
            self._logits[b] = self._logits[last]
            self._seen[b] = self._seen[last]
        with self._lock:
            self._rows[b], self._lengths[b] = self._rows[last], self._lengths[last]
            self._rows.pop()
            self._lengths.pop()
            self.served += 1
            if job.finish_reason == "cancelled":
                self.cancelled += 1
                self._freed_after_cancel.append(time.perf_counter() - job._cancel_at)

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


SHUTTING_DOWN = "the server is shutting down; retry later"


def _dispatch(out: list[tuple[Job, Any]]) -> None:
    """Hand events to their event loops: one call per loop for the whole batch."""
    by_loop: dict[Any, list] = {}
    for job, ev in out:
        by_loop.setdefault(job._loop, []).append((job, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # the loop was closed (server shutting down)
            pass


def _deliver(items: list[tuple[Job, Any]]) -> None:
    """On the event loop: events into the jobs' queues; "admitted" and the end (None) resolve their futures."""
    for job, ev in items:
        if ev == "admitted":
            if not job._admitted.done():
                job._admitted.set_result(None)
            continue
        job._events.put_nowait(ev)
        if ev is None:
            if not job._admitted.done():
                job._admitted.set_result(None)
            if not job._done.done():
                job._done.set_result(None)

