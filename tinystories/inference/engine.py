"""The engine core: requests, a bounded FIFO queue and the batched decoding step. Synchronous: no thread, no asyncio.

    core = EngineCore(model, tokenizer, max_batch=16, max_queue=256)
    req = core.submit(Request(prompt_ids, SamplingParams(...), stop=["The end"]))   # QueueFull, EngineClosed
    events = core.step()   # every running request advances by one token: [Event(request, kind, data), ...]
    core.cancel(req)       # a queued request leaves at once (its events returned), a running one at the next step
    core.close()           # queued requests end now, running ones at the next step(), with finish_reason "shutdown"

Continuous batching (as vLLM and TGI do it, sized for small models). One `step()`:
  1. rows whose request was cancelled or ran past the time limit leave (the last row moves into the hole, so the
     active rows stay 0..n-1);
  2. one batched forward (`model.decode` on a SlotKVCache) feeds every other row the token it got last step;
  3. queued requests that waited past the queue timeout end; the next ones are admitted into the free rows,
     each prompt prefilled into its row;
  4. every row's next token is sampled (rows with the same settings together, each with its own seeded
     generator: `sampling.next_tokens`), detokenized (`StreamDecoder`) and checked against the end of story,
     the request's stop strings (`StopStrings` holds back text that could begin one) and its token limit;
     finished rows leave.
The events come back at the end of step 4, so a server hands the tokens out before the next forward.
inference/frontend.py runs this loop on a thread for the asyncio server. Submit, cancel, close and describe
may be called from other threads than the one calling step().
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from tinystories.data.tokenizer import TextTokenizer
from tinystories.inference.sampling import SamplingParams, StreamDecoder, WordBias, next_tokens, token_logprobs
from tinystories.model.transformer import Transformer

SHUTTING_DOWN = "the server is shutting down; retry later"


class QueueFull(Exception):
    """The queue holds --max-queue requests and every row is busy (HTTP 429)."""


class QueueTimeout(Exception):
    """A request waited in the queue past --queue-timeout (HTTP 503)."""


class EngineClosed(Exception):
    """The engine was closed (the server is shutting down) before the request left the queue (HTTP 503)."""


def split_at_stop(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """Split `text` into (safe to emit, held back, stop string found): text before the first stop string, or
    else all but the longest tail that begins some stop string."""
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


class StopStrings:
    """Stop strings over streamed text: `push(piece)` gives the text safe to emit (never a stop string, nor a
    tail that could begin one: that is held until the next pieces decide) and whether a stop string was found;
    `release()` gives the held text when the request ends otherwise."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        emit, self.held, hit = split_at_stop(self.held + piece, self.stops)
        return emit, hit

    def release(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass(eq=False)
class Request:
    """One request: its inputs, the text so far, its finish reason and timing (on the core's clock)."""

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
    submitted: float | None = None
    admitted_at: float | None = None
    first_token_at: float | None = None
    ended_at: float | None = None
    cancel_at: float | None = None
    queue_position: int = 0  # requests ahead of it when it was submitted
    # the core's state of the request, set by submit()
    decoder: StreamDecoder | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)
    stop_strings: StopStrings = field(default_factory=lambda: StopStrings([]), repr=False)
    top: tuple[list[int], list[float]] | None = field(default=None, repr=False)
    bias: WordBias | None = field(default=None, repr=False)  # steers the story toward requested words
    # when a list: each token's log-probability under the model alone (before bias, penalty and temperature), as
    # sampling.sample(logprobs=True) gives them; the best of several candidates is chosen by them
    logprobs: list[float] | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def cancelled(self) -> bool:
        return self.cancel_at is not None

    def timing(self, now: float | None = None) -> dict:
        """Seconds in all, to the first token and in the queue, and tokens/s; `now` (the core's clock, default
        time.perf_counter) only matters before the request ends."""
        end = self.ended_at if self.ended_at is not None else time.perf_counter() if now is None else now
        total = end - self.submitted
        n = len(self.token_ids)
        first = self.first_token_at
        ttft = (first - self.submitted) if first is not None else None
        decode = (end - first) if first is not None else 0.0
        queued = (self.admitted_at if self.admitted_at is not None else end) - self.submitted
        return {
            "total_s": round(total, 4),
            "time_to_first_token_s": round(ttft, 4) if ttft is not None else None,
            "tokens_per_s": round(n / total, 2) if total > 0 and n else 0.0,
            "decode_tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None,
            "queued_s": round(queued, 4),
        }


class Event(NamedTuple):
    """What a step did to one request: "admitted" (it left the queue), "token" (data: {"type": "token", "id",
    "token", "text"[, "top"]}; id None for held-back text released at the end) or "end" (see finish_reason)."""

    request: Request
    kind: str
    data: dict | None = None


class EngineCore:
    """The model, a SlotKVCache of `max_batch` rows, the FIFO queue and the decoding step. `clock` (seconds)
    times the requests and their limits: tests pass a fake one."""

    def __init__(self, model: Transformer, tok: TextTokenizer, max_batch: int = 16, max_queue: int = 256,
                 timeout_s: float = 60.0, queue_timeout_s: float = 60.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.model, self.tok, self.clock = model, tok, clock
        self.context = model.cfg.max_seq_len
        self.max_batch, self.max_queue = max_batch, max_queue
        self.timeout_s, self.queue_timeout_s = timeout_s, queue_timeout_s
        self.device = model.rope.device
        self.cache = model.new_cache(max_batch, slots=True)
        self._logits = torch.zeros(max_batch, model.cfg.vocab_size, device=self.device)
        self._seen = torch.zeros(max_batch, model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        self._stop_ids = frozenset(tok.stop_ids)
        self._lock = threading.Lock()  # the queue, the rows and the counters
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: list[Request] = []  # running requests; row b of the cache holds _rows[b]
        self._lengths: list[int] = []  # tokens in each row's cache
        self.served = self.cancelled = self.rejected = self.expired = self.errors = 0
        self._freed_after_cancel = collections.deque(maxlen=1000)  # seconds from cancel() to the row being free
        self.closed = False

    # ---------------------------------------------------------------------------------------- API

    @property
    def busy(self) -> bool:
        """A request is queued or running: step() has work."""
        return bool(self._rows or self._queue)

    @property
    def running(self) -> list[Request]:
        """The running requests, by row."""
        return list(self._rows)

    def submit(self, req: Request) -> Request:
        """Queue a request. QueueFull when the queue is full and every row busy; EngineClosed after close()."""
        req.stop_strings = StopStrings(req.stop)
        req.decoder = StreamDecoder(self.tok, req.ids)
        req.generator = torch.Generator(device=self.device)
        if req.params.seed is not None:
            req.generator.manual_seed(req.params.seed)
        else:
            req.generator.seed()
        with self._lock:
            if self.closed:
                raise EngineClosed(SHUTTING_DOWN)
            free = self.max_batch - len(self._rows)
            if len(self._queue) >= self.max_queue + free:
                self.rejected += 1
                raise QueueFull(self._busy_message())
            req.submitted = self.clock()
            req.queue_position = len(self._queue)
            self._queue.append(req)
        return req

    def cancel(self, req: Request) -> list[Event]:
        """Stop a request: a queued one leaves the queue at once (its events are returned), a running one leaves
        its row at the start of the next step()."""
        if req.cancel_at is not None or req.finish_reason is not None:
            return []
        req.cancel_at = self.clock()
        with self._lock:
            try:
                self._queue.remove(req)
            except ValueError:
                return []
            self.cancelled += 1
            self._freed_after_cancel.append(0.0)
        out: list[Event] = []
        self._never_admitted(req, "cancelled", None, self.clock(), out)
        return out

    def close(self) -> list[Event]:
        """Stop serving: queued requests end now (finish_reason "shutdown", never admitted: their events are
        returned), running ones at the next step(); later submit() calls raise EngineClosed. Safe to repeat."""
        with self._lock:
            self.closed = True
            queued = list(self._queue)
            self._queue.clear()
        out: list[Event] = []
        now = self.clock()
        for req in queued:
            self._never_admitted(req, "shutdown", SHUTTING_DOWN, now, out)
        return out

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

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Advance every running request by one token (admitting queued ones into free rows first). Returns the
        events, in order. An exception (a bug, out of memory) fails the running requests and is not raised: the
        next step serves on. After close(), ends the running requests ("shutdown")."""
        out: list[Event] = []
        if self.closed:
            self._end_running("shutdown", out)
            return out
        admitted: list[Request] = []
        try:
            self._drop_leaving(out)
            self._forward()
            self._admit(admitted, out)
            self._sample_and_accept(out)
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}", admitted, out)
        return out

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the batched decoding step for 1 and 2 rows (masked and not), so that a compiled step is compiled
        now rather than inside the first requests. Call it while no request runs."""
        start = self.tok.doc_start_id
        for n in (1, 2)[: self.max_batch]:
            for b in range(n):
                self.model.decode(torch.tensor([[start, start]], device=self.device), self.cache.slot(b))
            for positions in ([2] * n, [2, 3][:n]):
                self._decode_rows(torch.full((n, 1), start, device=self.device), positions)
        self.cache.positions = None

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

    def _busy_message(self) -> str:
        return (f"the server is busy: {len(self._rows)} generation(s) running (--max-batch {self.max_batch}) and "
                f"{len(self._queue)} waiting (--max-queue {self.max_queue}, full)")

    # ---------------------------------------------------------------------------------------- the step

    def _drop_leaving(self, out: list[Event]) -> None:
        """Requests cancelled or out of time leave their rows before the next forward."""
        now = self.clock()
        for b in reversed(range(len(self._rows))):
            req = self._rows[b]
            if req.cancelled or now - req.admitted_at > self.timeout_s:
                self._finish(req, "cancelled" if req.cancelled else "timeout", out)
                self._remove(b)

    def _forward(self) -> None:
        """Feed every row the token it got last step: one batched forward; the logits of the next tokens."""
        n = len(self._rows)
        if n == 0:
            return
        last = torch.tensor([[r.token_ids[-1]] for r in self._rows], dtype=torch.long, device=self.device)
        self._logits[:n] = self._decode_rows(last, list(self._lengths))
        for b in range(n):
            self._lengths[b] += 1

    def _decode_rows(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One batched forward: row b's token at position positions[b]. Logits (n, V) in float32."""
        self.cache.positions = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.cache.span = max(positions) + 1
        self.cache.uniform = len(positions) == 1  # a single row needs no mask (and decodes as sample() does)
        return self.model.decode(tokens, self.cache)[:, -1].float()

    def _admit(self, admitted: list[Request], out: list[Event]) -> None:
        """End the requests that waited past the queue timeout; prefill the next ones (into `admitted`) into the
        free rows."""
        now = self.clock()
        with self._lock:
            for req in [r for r in self._queue if now - r.submitted > self.queue_timeout_s]:
                self._queue.remove(req)
                self.expired += 1
                error = (f"waited {now - req.submitted:.1f}s in the queue without a free slot "
                         f"(--queue-timeout {self.queue_timeout_s:g}; {len(self._rows)} generation(s) "
                         f"running, --max-batch {self.max_batch}); retry later")
                self._never_admitted(req, "queue_timeout", error, now, out)
            admitted += [self._queue.popleft()
                         for _ in range(min(len(self._queue), self.max_batch - len(self._rows)))]
        for req in admitted:
            req.admitted_at = now
            out.append(Event(req, "admitted"))
            if req.cancelled:
                self._finish(req, "cancelled", out)
                with self._lock:
                    self.served += 1
                    self.cancelled += 1
                    self._freed_after_cancel.append(self.clock() - req.cancel_at)
            else:
                self._prefill(req)

    def _prefill(self, req: Request) -> None:
        """The prompt into the next free row; its logits are the first token's."""
        b = len(self._rows)
        with self._lock:
            self._rows.append(req)
            self._lengths.append(len(req.ids))
        ids = torch.tensor([req.ids], dtype=torch.long, device=self.device)
        self._logits[b] = self.model.decode(ids, self.cache.slot(b), last_only=True)[0, -1].float()
        if req.params.repetition_penalty != 1.0:
            self._seen[b].zero_()
            self._seen[b, ids[0]] = True

    def _sample_and_accept(self, out: list[Event]) -> None:
        n = len(self._rows)
        if n == 0:
            return
        tokens = self._sample(n).tolist()
        now = self.clock()
        keep = [self._accept(req, tokens[b], now, out) for b, req in enumerate(self._rows)]
        for b in reversed(range(n)):
            if not keep[b]:
                self._remove(b)

    def _sample(self, n: int) -> torch.Tensor:
        """The next token of rows 0..n-1; rows with the same sampling settings are sampled together."""
        groups: dict[tuple, list[int]] = {}
        for b, req in enumerate(self._rows):
            p = req.params
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.repetition_penalty, req.top_alternatives),
                              []).append(b)
        tokens = torch.empty(n, dtype=torch.long, device=self.device)
        for rows in groups.values():
            req = self._rows[rows[0]]
            whole = len(rows) == n
            idx = None if whole else torch.tensor(rows, device=self.device)
            logits = self._logits[:n] if whole else self._logits[idx]
            seen = self._seen[:n] if whole else self._seen[idx]
            nxt, top_ids, top_probs = next_tokens(logits, req.params, [self._rows[b].generator for b in rows], seen,
                                                  req.top_alternatives, [self._rows[b].bias for b in rows])
            if whole:
                tokens = nxt
            else:
                tokens[idx] = nxt
            if req.params.repetition_penalty != 1.0:
                self._seen[idx if idx is not None else torch.arange(n, device=self.device), nxt] = True
            if top_ids is not None:
                for k, b in enumerate(rows):
                    self._rows[b].top = (top_ids[k].tolist(), top_probs[k].tolist())
            if any(self._rows[b].logprobs is not None for b in rows):
                lp = token_logprobs(logits, nxt).tolist()
                for k, b in enumerate(rows):
                    if self._rows[b].logprobs is not None:
                        self._rows[b].logprobs.append(lp[k])
        return tokens

    def _accept(self, req: Request, t: int, now: float, out: list[Event]) -> bool:
        """Give a request its new token t: events, stop strings, limits. False when the request is finished."""
        if req.first_token_at is None:
            req.first_token_at = now
        if t in self._stop_ids:
            self._finish(req, "stop", out)
            return False
        req.token_ids.append(t)
        if req.bias is not None:
            req.bias.push(t)
        event: dict[str, Any] = {"type": "token", "id": t, "token": self.token_text(t)}
        if req.top_alternatives:
            ids, probs = req.top
            event["top"] = [{"id": a, "token": self.token_text(a), "prob": round(p, 5)} for a, p in zip(ids, probs)]
        piece, hit = req.stop_strings.push(req.decoder.push(t))
        req.text += piece
        event["text"] = piece
        out.append(Event(req, "token", event))
        if hit:
            self._finish(req, "stop", out)
            return False
        if len(req.token_ids) >= req.params.max_new_tokens:
            self._finish(req, "length", out)
            return False
        return True

    # ---------------------------------------------------------------------------------------- endings

    def _finish(self, req: Request, reason: str, out: list[Event]) -> None:
        """End a request that left the queue; text held back for a stop string that never came goes out."""
        req.finish_reason = reason
        held = req.stop_strings.release()
        if held:
            req.text += held
            out.append(Event(req, "token", {"type": "token", "id": None, "token": "", "text": held}))
        req.ended_at = self.clock()
        out.append(Event(req, "end"))

    def _never_admitted(self, req: Request, reason: str, error: str | None, now: float, out: list[Event]) -> None:
        req.finish_reason, req.error, req.ended_at = reason, error, now
        out += [Event(req, "admitted"), Event(req, "end")]

    def _remove(self, b: int) -> None:
        """Free row b: the last active row moves into it."""
        req = self._rows[b]
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
            if req.finish_reason == "cancelled":
                self.cancelled += 1
                self._freed_after_cancel.append(self.clock() - req.cancel_at)

    def _end_running(self, reason: str, out: list[Event]) -> None:
        for req in self._rows:
            self._finish(req, reason, out)
        with self._lock:
            self.served += len(self._rows)
            self._rows.clear()
            self._lengths.clear()

    def _fail(self, msg: str, admitted: list[Request], out: list[Event]) -> None:
        """A step raised: the running requests (and those just admitted) end with finish_reason "error"."""
        for req in [*self._rows, *[r for r in admitted if r not in self._rows]]:
            if req.finish_reason is None:
                req.error = msg
                self._finish(req, "error", out)
        with self._lock:
            self.errors += 1
            self._rows.clear()
            self._lengths.clear()
