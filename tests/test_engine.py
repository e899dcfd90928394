"""The engine core driven in process, one step() at a time: a fake model with scripted tokens (so every token is
known) and a fake clock (so no test depends on speed), then the real stories260K against `sampling.sample`."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tinystories.core.config import ModelConfig
from tinystories.inference.engine import (
    EngineClosed,
    EngineCore,
    QueueFull,
    Request,
    StopStrings,
    split_at_stop,
)
from tinystories.inference.sampling import SamplingParams
from tinystories.model.transformer import Transformer

# ------------------------------------------------------------------------------------------------ fakes

PIECES = ["<s>", "</s>", "Once", " upon", " a", " time", "The", " e", "nd", "gg", ".", " cat", "A", "B", "C", "D",
          "E", "F"]
BOS, EOS = 0, 1
T = {p: i for i, p in enumerate(PIECES)}


class FakeTok:
    """Each token id reads as PIECES[id]; <s> starts a story, </s> ends it."""

    kind = "fake"
    doc_start_id = BOS
    stop_ids = frozenset({EOS})
    special_ids = {BOS, EOS}

    def decode(self, ids) -> str:
        return "".join(PIECES[i] for i in ids if i not in self.special_ids)


class FakeModel:
    """model.decode's interface with scripted logits. A prompt is [<s>, key]; the token after it is script[key][n]
    where n counts the tokens already generated, then </s>. The key and the count are read back from the KV cache
    (each fed token is written at its position), so a row that moved, or a position off by one, changes the output.
    `batches` records the rows of each batched step."""

    def __init__(self, scripts: dict[int, list[int]], max_seq_len: int = 64):
        self.cfg = ModelConfig(vocab_size=len(PIECES), dim=8, n_layers=1, n_heads=1, max_seq_len=max_seq_len)
        self.rope = torch.zeros(1)
        self.scripts = scripts
        self.batches: list[list[int]] = []  # the key of each row, per batched step
        self.fail = False

    def parameters(self):
        return iter([torch.zeros(1)])

    cache_dtype = torch.float32
    decoding_capacity = Transformer.decoding_capacity
    new_cache = Transformer.new_cache  # the engine's cache, as the real model makes it

    def _next(self, history: torch.Tensor) -> torch.Tensor:
        h = [int(x) for x in history]
        script = self.scripts[h[1]]
        n = len(h) - 2
        logits = torch.zeros(len(PIECES))
        logits[script[n] if n < len(script) else EOS] = 100.0
        return logits

    def decode(self, tokens: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("out of memory")
        k = cache.k[0]
        if hasattr(cache, "positions"):  # a SlotKVCache step: one token per row at its own position
            self.batches.append([int(k[b, 0, 1, 0]) for b in range(tokens.size(0))])
            out = []
            for b, pos in enumerate(cache.positions.tolist()):
                k[b, 0, pos, 0] = tokens[b, 0]
                out.append(self._next(k[b, 0, : pos + 1, 0]))
            return torch.stack(out)[:, None]
        start, n = cache.length, tokens.size(1)  # a prefill into one row
        k[0, 0, start : start + n, 0] = tokens[0]
        cache.length += n
        return self._next(k[0, 0, : start + n, 0])[None, None].expand(1, 1 if last_only else n, -1)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


GREEDY = SamplingParams(max_new_tokens=50, temperature=0.0)


def core_with(scripts: dict[str, list[str]], **kw) -> tuple[EngineCore, FakeModel]:
    model = FakeModel({T[key]: [T[p] for p in script] for key, script in scripts.items()})
    return EngineCore(model, FakeTok(), **kw), model


def req(key: str, max_new_tokens: int = 50, stop: list[str] | None = None) -> Request:
    return Request([BOS, T[key]], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), stop=stop or [])


def run(core: EngineCore, steps: int = 1000) -> list:
    events = []
    for _ in range(steps):
        if not core.busy:
            break
        events += core.step()
    return events


def texts(events, r: Request) -> list[str]:
    return [e.data["text"] for e in events if e.request is r and e.kind == "token"]


# ------------------------------------------------------------------------------------------------ stop strings


def test_split_at_stop():
    assert split_at_stop("Once upon", ["The end"]) == ("Once upon", "", False)
    assert split_at_stop("a time. The", ["The end"]) == ("a time. ", "The", False)
    assert split_at_stop("a. The end. B", ["The end"]) == ("a. ", "", True)
    assert split_at_stop("x Th", ["The end", "Thx"]) == ("x ", "Th", False)
    assert split_at_stop("ab", ["b", "ab"]) == ("", "", True)  # the earliest match wins


def test_stop_strings_hold_back_and_release():
    s = StopStrings(["The end"])
    assert s.push("Once") == ("Once", False)
    assert s.push(" The") == (" ", False) and s.held == "The"
    assert s.push(" e") == ("", False) and s.held == "The e"
    assert s.push("gg") == ("The egg", False) and s.held == ""  # the match failed: all of it goes out
    assert s.push(" The e") == (" ", False)
    assert s.push("nd.") == ("", True)
    s = StopStrings(["The end"])
    s.push("The")
    assert s.release() == "The" and s.held == ""
    assert StopStrings(["", ""]).push("The") == ("The", False)  # empty stop strings are ignored


def test_stop_string_over_three_tokens_is_never_emitted():
    core, _ = core_with({"A": ["Once", "The", " e", "nd", ".", " cat"]})
    r = core.submit(req("A", stop=["The end"]))
    events = run(core)
    assert texts(events, r) == ["Once", "", "", ""]  # "The" and " e" held, then the match: nothing of it
    assert r.text == "Once" and r.finish_reason == "stop"
    assert r.token_ids == [T[p] for p in ["Once", "The", " e", "nd"]]
    assert events[-1].request is r and events[-1].kind == "end"


def test_held_text_released_when_the_match_fails_or_the_request_ends():
    core, _ = core_with({"A": ["The", " e", "gg", "The"], "B": ["Once", "The"], "C": ["The"]})
    a = core.submit(req("A", stop=["The end"]))
    b = core.submit(req("B", max_new_tokens=2, stop=["The end"]))
    c = core.submit(req("C", stop=["The end"]))
    events = run(core)
    assert texts(events, a) == ["", "", "The egg", "", "The"]  # the last: held text at the end of story
    assert a.text == "The eggThe" and a.finish_reason == "stop"
    assert texts(events, b) == ["Once", "", "The"] and b.finish_reason == "length" and b.text == "OnceThe"
    released = [e.data for e in events if e.request is c and e.kind == "token"][-1]
    assert released == {"type": "token", "id": None, "token": "", "text": "The"} and c.text == "The"


# ------------------------------------------------------------------------------------------------ batching


def test_requests_join_and_leave_mid_batch():
    scripts = {"A": ["Once", " upon", " a"], "B": ["B"] * 8, "C": ["C", "D", "E", "F", "C", "D"]}
    core, model = core_with(scripts, max_batch=3)
    a, b = core.submit(req("A")), core.submit(req("B"))
    events = core.step()
    assert [(e.request, e.kind) for e in events] == [(a, "admitted"), (b, "admitted"), (a, "token"), (b, "token")]
    events += core.step()
    c = core.submit(req("C"))  # joins while A and B run
    events += core.step()
    assert core.running == [a, b, c] and a.finish_reason is None
    events += core.step()  # A's end of story: C moves from the last row into A's
    assert a.finish_reason == "stop" and core.running == [c, b]
    events += run(core)
    for r, key in ((a, "A"), (b, "B"), (c, "C")):
        assert r.token_ids == [T[p] for p in scripts[key]] and r.text == "".join(scripts[key])
        assert "".join(texts(events, r)) == r.text
    assert b.finish_reason == c.finish_reason == "stop"
    key = {T["A"]: "A", T["B"]: "B", T["C"]: "C"}
    assert [[key[k] for k in rows] for rows in model.batches[:4]] == [["A", "B"], ["A", "B"], ["A", "B", "C"],
                                                                       ["C", "B"]]
    assert core.describe()["served"] == 3 and core.describe()["active"] == 0


def test_length_limit_and_admission_into_freed_rows():
    core, _ = core_with({"A": ["B"] * 10, "B": ["C"] * 10}, max_batch=1)
    a = core.submit(req("A", max_new_tokens=3))
    b = core.submit(req("B", max_new_tokens=2))
    assert b.queue_position == 1
    run(core, steps=3)
    assert a.finish_reason == "length" and len(a.token_ids) == 3 and b.admitted_at is None
    run(core)
    assert b.finish_reason == "length" and b.token_ids == [T["C"]] * 2


def test_full_queue():
    core, _ = core_with({"A": ["B"] * 10}, max_batch=1, max_queue=1)
    core.submit(req("A"))
    core.step()  # A runs: no free row, one queue place
    core.submit(req("A"))
    with pytest.raises(QueueFull, match="--max-queue 1"):
        core.submit(req("A"))
    assert core.describe()["rejected"] == 1 and core.describe()["queued"] == 1


# ------------------------------------------------------------------------------------------------ cancel, time, close


def test_cancel_queued_leaves_at_once_and_running_before_the_next_step():
    core, model = core_with({"A": ["B"] * 20, "B": ["C"] * 20}, max_batch=1)
    a, b = core.submit(req("A")), core.submit(req("B"))
    core.step()
    events = core.cancel(b)
    assert [(e.request, e.kind) for e in events] == [(b, "admitted"), (b, "end")] and b.finish_reason == "cancelled"
    assert core.describe()["queued"] == 0 and core.cancel(b) == []
    n_tokens, n_steps = len(a.token_ids), len(model.batches)
    assert core.cancel(a) == []  # running: noticed by the next step
    events = core.step()
    assert [(e.request, e.kind) for e in events] == [(a, "end")] and a.finish_reason == "cancelled"
    assert len(a.token_ids) == n_tokens and len(model.batches) == n_steps  # no forward for it
    d = core.describe()
    assert d["cancelled"] == 2 and d["active"] == 0 and d["cancel_to_free_ms"]["n"] == 2


def test_queue_timeout_and_request_time_limit():
    clock = FakeClock()
    core, _ = core_with({"A": ["B"] * 40, "B": ["C"] * 40}, max_batch=1, timeout_s=10, queue_timeout_s=5,
                        clock=clock)
    a, b = core.submit(req("A")), core.submit(req("B"))
    core.step()
    clock.now += 4
    core.step()
    assert b.finish_reason is None
    clock.now += 2  # B has waited 6 s > 5
    events = core.step()
    assert [e.kind for e in events if e.request is b] == ["admitted", "end"] and b.finish_reason == "queue_timeout"
    assert "waited 6.0s in the queue" in b.error and b.admitted_at is None
    clock.now += 5  # A has run 11 s > 10: it ends with the tokens it has
    n = len(a.token_ids)
    events = core.step()
    assert a.finish_reason == "timeout" and len(a.token_ids) == n and [e.kind for e in events] == ["end"]
    assert a.timing()["total_s"] == 11.0 and b.timing()["queued_s"] == 6.0
    assert core.describe()["queue_timeouts"] == 1


def test_close_ends_queued_at_once_and_running_at_the_next_step():
    core, _ = core_with({"A": ["B"] * 40, "B": ["C"] * 40}, max_batch=1)
    a, b = core.submit(req("A")), core.submit(req("B"))
    core.step()
    events = core.close()
    assert [(e.request, e.kind) for e in events] == [(b, "admitted"), (b, "end")]
    assert b.finish_reason == "shutdown" and b.admitted_at is None
    with pytest.raises(EngineClosed):
        core.submit(req("A"))
    events = core.step()
    assert [(e.request, e.kind) for e in events] == [(a, "end")] and a.finish_reason == "shutdown"
    assert a.token_ids and not core.busy and core.close() == []


def test_a_failing_step_ends_the_running_requests_and_the_next_one_is_served():
    core, model = core_with({"A": ["B"] * 40}, max_batch=2)
    a = core.submit(req("A"))
    core.step()
    model.fail = True
    events = core.step()
    assert a.finish_reason == "error" and a.error == "RuntimeError: out of memory" and events[-1].kind == "end"
    model.fail = False
    b = core.submit(req("A", max_new_tokens=3))
    run(core)
    assert b.finish_reason == "length" and core.describe()["errors"] == 1


def test_frontend_delivers_events_to_the_event_loop():
    from tinystories.inference.frontend import Engine

    model = FakeModel({T["A"]: [T["Once"], T[" upon"], T[" a"], T[" time"]]})

    async def main():
        engine = Engine(model, FakeTok(), max_batch=2)
        job = engine.submit([BOS, T["A"]], GREEDY, stop=[" a time"])
        await job.admitted()
        pieces = [ev["text"] async for ev in job.events()]
        await job.result()
        engine.close()
        return job, pieces

    job, pieces = asyncio.run(main())
    assert pieces == ["Once", " upon", "", ""] and job.text == "Once upon" and job.finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ stories260K


@pytest.fixture
def one_thread():
    """One torch thread: a 260K-parameter model decodes faster so than with threads fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_batched_tokens_equal_sample_alone_on_stories260k(s260, one_thread):
    from tinystories.inference.sampling import decode_continuation, prompt_ids, sample
    from tinystories.model.checkpoint import load_model

    model, ck = load_model(s260)
    tok = ck.tokenizer
    asks = [("Once upon a time", SamplingParams(max_new_tokens=40, temperature=0.0)),
            ("Lily had a cat", SamplingParams(max_new_tokens=6, temperature=0.0)),  # leaves early
            ("Tom went to the park", SamplingParams(max_new_tokens=30, temperature=0.8, seed=7)),
            ("The sun", SamplingParams(max_new_tokens=30, temperature=0.0, repetition_penalty=1.3))]
    core = EngineCore(model, tok, max_batch=3)
    # with each token's log-probability under the model alone (what best-of-N in the server chooses by)
    reqs = [core.submit(Request(prompt_ids(tok, p), params, logprobs=[])) for p, params in asks[:2]]
    core.step()
    core.step()
    reqs += [core.submit(Request(prompt_ids(tok, p), params, logprobs=[])) for p, params in asks[2:]]  # join mid-batch
    core.step()
    assert core.running == reqs[:3] and core.describe()["queued"] == 1
    while reqs[1].finish_reason is None:
        core.step()
    assert core.running == [reqs[0], reqs[2]]  # Tom's row moved into Lily's; the queued one joins next step
    run(core)
    for (prompt, params), r in zip(asks, reqs):
        alone, logprobs = [], []
        for step in sample(model, [prompt_ids(tok, prompt)], params, tok.stop_ids, logprobs=True):
            logprobs.append(float(step.logprobs[0]))
            if int(step.tokens[0]) in tok.stop_ids:
                break
            alone.append(int(step.tokens[0]))
        assert r.token_ids == alone, prompt
        assert r.logprobs == pytest.approx(logprobs, abs=1e-4), prompt
        assert r.text == decode_continuation(tok, r.ids, r.token_ids)
        assert r.finish_reason == ("length" if len(alone) == params.max_new_tokens else "stop")
