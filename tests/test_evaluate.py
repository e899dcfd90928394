"""`tinystories eval`: bits per byte against a hand computation, story statistics, the judge client against a
local OpenAI-compatible server (good, flaky, garbage and down), and bad input as one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import TRAIN_HEAD, VALID_HEAD, run_cli
from tinystories.evaluation.judge import chat_url, judge_stories, parse_judge_reply

GOOD = {"grammar": 7, "creativity": 5, "consistency": 8, "plot": 6}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def small_text(stories300) -> Path:
    return stories300


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, random_checkpoint, tok4k, small_text) -> Path:
    """random_checkpoint whose state.json points at a token cache of small_text (as a trained run's does)."""
    from tinystories.data.cache import prepare
    from tinystories.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("evalrun")
    cache, _ = prepare(load_tokenizer(tok4k), small_text, root / "cache", val_fraction=0.1)
    ck = root / "ck"
    shutil.copytree(random_checkpoint, ck)
    (ck / "state.json").write_text(json.dumps({"step": 10, "total_steps": 10, "cache_dir": str(cache)}))
    return ck


class _Judge(BaseHTTPRequestHandler):
    mode = "good"
    calls = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert "***" in body["messages"][-1]["content"] and body["model"] == "m"
        type(self).calls += 1
        if self.mode == "good":
            content = "Here is my grade:\n```json\n" + json.dumps(GOOD) + "\n```\nThe plot is simple."
        elif self.mode == "flaky":  # garbage on every other request: each story succeeds on its retry
            content = "I cannot grade this." if type(self).calls % 2 else json.dumps(GOOD)
        elif self.mode == "error500":
            self.send_response(500)
            self.end_headers()
            return
        else:
            content = "lorem ipsum {not json} grammar is fine"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def judge_server():
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_Judge,), {"mode": mode, "calls": 0})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", handler

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


SAMPLES = [{"prompt": "Once upon a time", "text": "Once upon a time, a cat sat."},
           {"prompt": "One day,", "text": "One day, Tom ran home."},
           {"prompt": "Lily and Ben", "text": "Lily and Ben played."}]


# ------------------------------------------------------------------------------------------------ judge


@pytest.mark.parametrize("reply", [
    json.dumps(GOOD),
    "```json\n" + json.dumps(GOOD) + "\n```",
    "Sure! Here are the grades: " + json.dumps(GOOD) + " Hope this helps.",
    json.dumps({"scores": GOOD, "age": "3-4"}),
    json.dumps({"Grammar": "7/10", "Creativity": 5, "Consistency": 8.0, "Plot": {"score": 6}}),
    "Grammar: 7/10\nCreativity: 5/10\nConsistency: 8\nPlot - 6",
])
def test_parse_good_replies(reply):
    assert parse_judge_reply(reply) == {k: float(v) for k, v in GOOD.items()}


@pytest.mark.parametrize("reply", [
    "", "lorem ipsum", "{not json}", json.dumps({"grammar": 7, "creativity": 5, "consistency": 8}),
    json.dumps({**GOOD, "plot": 11}), json.dumps({**GOOD, "plot": "good"}), None, "[1, 2, 3]",
])
def test_parse_malformed_replies(reply):
    assert parse_judge_reply(reply) is None


def test_chat_url():
    assert chat_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_judge_good(judge_server):
    url, h = judge_server("good")
    r = judge_stories(SAMPLES, url, "m", timeout=5)
    assert r["skipped"] is None and r["judged"] == 3 and r["malformed"] == 0 and h.calls == 3
    assert r["means"] == {k: float(v) for k, v in GOOD.items()}


def test_judge_retries_then_succeeds(judge_server):
    url, h = judge_server("flaky")
    r = judge_stories(SAMPLES, url, "m", timeout=5)
    assert r["judged"] == 3 and r["malformed"] == 0 and h.calls == 6


@pytest.mark.parametrize("mode", ["garbage", "error500"])
def test_judge_garbage_counted(judge_server, mode):
    url, h = judge_server(mode)
    r = judge_stories(SAMPLES, url, "m", timeout=5)
    assert r["skipped"] is None and r["judged"] == 0 and r["malformed"] == 3
    assert h.calls == 9  # one try and two retries per story
    assert r["means"]["grammar"] is None


def test_judge_down_is_a_skip():
    r = judge_stories(SAMPLES, _closed_port_url(), "m", timeout=5)
    assert r["skipped"].startswith("judge skipped: cannot reach") and r["judged"] == 0


# ------------------------------------------------------------------------------------------------ eval


def _hand_bpb(ck: Path, text: Path) -> tuple[float, int]:
    """Bits per byte by hand: model forward + cross entropy over non-overlapping context windows."""
    import torch
    import torch.nn.functional as F

    from tinystories.data.text import iter_documents
    from tinystories.model.checkpoint import load_model

    model, c = load_model(ck)
    tok = c.tokenizer
    docs = list(iter_documents([text]))
    ids: list[int] = []
    for d in docs:
        ids += [tok.doc_start_id] + tok.encode(d)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    ctx = model.cfg.max_seq_len
    t = torch.tensor(ids)
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, ctx):
            e = min(s + ctx, len(ids) - 1)
            logits, _ = model(t[s:e][None])
            nats += F.cross_entropy(logits[0].double(), t[s + 1 : e + 1], reduction="sum").item()
    return nats / math.log(2) / n_bytes, len(ids) - 1


def test_eval_text_bpb_matches_hand_computation(random_checkpoint, tmp_path, judge_server):
    from tinystories.data.text import iter_documents

    text = tmp_path / "three.txt"
    text.write_text("".join(d + "\n<|endoftext|>\n" for d in iter_documents([TRAIN_HEAD], 3)), encoding="utf-8")
    url, _ = judge_server("good")
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", random_checkpoint, "--text", text, "--num-stories", "3",
                "--max-new-tokens", "16", "--json", out, "--judge-url", url, "--judge-model", "m")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    bpb, n = _hand_bpb(random_checkpoint, text)
    assert n > 128  # more than one window
    assert res["tokens"] == n
    assert res["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    assert res["loss_per_token"] == pytest.approx(bpb * math.log(2) * res["bytes"] / n, rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss_per_token"]), rel=1e-6)
    for key in ("bits_per_byte", "loss_per_token", "perplexity", "tokens", "stories", "samples", "judge"):
        assert key in res
    assert (len(res["samples"]) == 3
            and [s["prompt"] for s in res["samples"]] == ["Once upon a time", "One day,", "Lily and Ben"])
    assert res["stories"]["model"]["stories"] == 3 and res["stories"]["reference"]["stories"] == 3
    assert res["judge"]["judged"] == 3 and res["judge"]["means"]["plot"] == 6.0
    assert "bits per byte" in r.stdout and "articles per 100 words" in r.stdout and "means (1-10)" in r.stdout


def test_eval_run_cache_and_reference(run_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", run_checkpoint, "--num-stories", "2", "--max-new-tokens", "12",
                "--json", out, "--judge-url", _closed_port_url(), "--judge-model", "m")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    state = json.loads((run_checkpoint / "state.json").read_text())
    assert res["text"].startswith(state["cache_dir"]) and res["tokens"] > 0
    st = res["stories"]
    assert st["reference"]["stories"] == 30  # the cache's validation split: every 10th of 300 stories
    assert st["reference"]["invented_words"] == 0.0  # real stories: every word is in the training text
    assert st["model"]["invented_words"] is not None and st["train_vocabulary"]["words"] > 1000
    assert "judge skipped: cannot reach" in r.stdout and "Traceback" not in r.stderr


def test_eval_same_seed_same_samples(random_checkpoint, tmp_path):
    from tinystories.evaluation.evaluate import evaluate
    from tinystories.inference.sampling import SamplingParams

    args = dict(text=str(VALID_HEAD), max_tokens=300, num_stories=2, reference=None, train_text=None,
                sampling=SamplingParams(seed=7, max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.95),
                judge_url=None, judge_model=None, judge_timeout=5.0, device="cpu")
    a, b = evaluate(random_checkpoint, **args, log=None), evaluate(random_checkpoint, **args, log=None)
    assert [s["text"] for s in a["samples"]] == [s["text"] for s in b["samples"]]
    assert a["tokens"] == 300
    # the one-paragraph-per-line valid file is one document, its lines the reference stories
    assert a["stories"]["reference"]["stories"] > 100


def _one_line_error(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-stories", "-2"], "--num-stories"),
    (["--judge-url", "http://x"], "--judge-model"),
    (["--text", "/nonexistent/file.txt"], "--text"),
    (["--max-tokens", "0"], "--max-tokens 0"),
    (["--max-tokens", "-5"], "--max-tokens -5"),
    (["--reference", "/nonexistent/ref.txt"], "--reference /nonexistent/ref.txt"),
    (["--train-text", "/nonexistent/train.txt"], "--train-text /nonexistent/train.txt"),
])
def test_eval_bad_options(random_checkpoint, extra, needle):
    line = _one_line_error(run_cli("eval", "--checkpoint", random_checkpoint, *extra))
    assert needle in line and "--from" not in line


def test_eval_missing_and_foreign_checkpoint(tmp_path):
    assert "no such" in _one_line_error(run_cli("eval", "--checkpoint", tmp_path / "nope"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "pytorch_model.bin").write_bytes(b"\0" * 10)
    assert "not a checkpoint" in _one_line_error(run_cli("eval", "--checkpoint", tmp_path / "foreign"))


def test_eval_without_cache_says_how_to_pass_text(random_checkpoint):
    assert "--text" in _one_line_error(run_cli("eval", "--checkpoint", random_checkpoint, "--num-stories", "0"))


EVAL_N = 3001  # validation tokens of short_run's evaluations: the cut ends inside a story


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tok4k, small_text) -> Path:
    """A real 3-step training run (tiny model) whose evaluations score EVAL_N validation tokens."""
    from conftest import REPO
    from tinystories.core.config import load_config
    from tinystories.training.loop import train

    root = tmp_path_factory.mktemp("short-run")
    cfg = load_config(REPO / "configs" / "cpu.yaml", [
        "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.dropout=0",
        "train.batch_size=4", "train.max_steps=3", "train.max_minutes=null", "train.eval_interval=1000",
        f"train.eval_tokens={EVAL_N}", "train.sample_tokens=4", "train.dtype=float32", "train.compile=false",
        "data.val_fraction=0.1", f"tokenizer.path={tok4k}", f"data.source={small_text}",
        f"data.data_dir={root / 'data'}"])
    cfg.out_dir = str(root / "run")
    train(cfg)
    return root / "run"


def test_training_validation_is_evals_max_tokens_cut(short_run, tmp_path):
    """The training run's final validation loss is `eval --max-tokens N` of the same checkpoint with N =
    train.eval_tokens: both score the same text (the run's subset once ran on to a story end, up to 2x N; eval's
    stopped at the story end before N, down to N/2)."""
    ck = short_run / "checkpoints" / "latest"
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == 3
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", ck, "--max-tokens", EVAL_N, "--num-stories", "0", "--device", "cpu",
                "--json", out)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["tokens"] == EVAL_N
    assert res["loss_per_token"] == pytest.approx(state["metrics"]["val_loss"], abs=1e-5)
    assert res["bits_per_byte"] == pytest.approx(state["metrics"]["val_bpb"], abs=1e-5)


def test_skip_tokens_scores_the_text_the_selection_never_saw(short_run, tmp_path):
    """`eval --skip-tokens N` of a run whose evaluations scored N tokens: the rest of the validation split, and
    together with `--max-tokens N` (the selection) it is the whole split's likelihood, token for token."""
    ck = short_run / "checkpoints" / "latest"
    reports = {}
    for name, flags in (("rest", ["--skip-tokens", EVAL_N]), ("selection", ["--max-tokens", EVAL_N]),
                        ("whole", [])):
        out = tmp_path / f"{name}.json"
        r = run_cli("eval", "--checkpoint", ck, *flags, "--num-stories", "0", "--device", "cpu", "--json", out)
        assert r.returncode == 0, r.stderr[-2000:]
        reports[name] = json.loads(out.read_text())
    rest, sel, whole = reports["rest"], reports["selection"], reports["whole"]
    assert "text the selection never saw" in rest["text"] and f"first {EVAL_N:,} tokens" in rest["text"]
    assert rest["tokens"] + sel["tokens"] == whole["tokens"] and rest["bytes"] + sel["bytes"] == whole["bytes"]
    line = _one_line_error(run_cli("eval", "--checkpoint", ck, "--skip-tokens", EVAL_N, "--text", VALID_HEAD))
    assert "--skip-tokens" in line and "--text" in line
    line = _one_line_error(run_cli("eval", "--checkpoint", ck, "--skip-tokens", 10**9, "--num-stories", "0"))
    assert line.startswith(f"error: --skip-tokens {10**9}:") and "no text after" in line


def test_validation_cut_has_exactly_the_documented_size(short_run):
    """likelihood.cut_split: the first N predicted tokens (N + 1 of the stream), or the whole split when shorter;
    bytes: the whole stories' from the index, plus the decoded part of the story the cut ends in."""
    import numpy as np

    from tinystories.data.cache import TokenCache
    from tinystories.model.checkpoint import read_checkpoint
    from tinystories.model.likelihood import cut_split
    from tinystories.training.batches import validation_subset

    ck = read_checkpoint(short_run, prefer="latest")
    tok, cache = ck.tokenizer, TokenCache.open(ck.state["cache_dir"])
    split = cache.split("val")
    whole, docs = np.asarray(split.stream()), np.asarray(split.docs)
    starts = docs[:, 0]
    assert len(docs) > 6 and len(whole) > EVAL_N + 1

    # inside a story: N + 1 tokens, the stories before it whole, then its decoded part
    s, b = cut_split(split, tok, EVAL_N)
    assert np.array_equal(s, whole[: EVAL_N + 1])
    k = int(np.searchsorted(starts, EVAL_N + 1)) - 1  # the story the cut ends in
    assert starts[k] + 1 < EVAL_N + 1 < (starts[k + 1] if k + 1 < len(starts) else len(whole))
    part = whole[starts[k] + 1 : EVAL_N + 1].tolist()
    assert b == int(docs[:k, 1].sum()) + len(tok.decode(part).encode("utf-8"))

    # at a story boundary: whole stories, their bytes from the index
    s, b = cut_split(split, tok, int(starts[5]) - 1)
    assert np.array_equal(s, whole[: starts[5]]) and b == int(docs[:5, 1].sum())

    # the whole split: asked for more than there is, or for everything
    for n in (len(whole) - 1, len(whole) + 100, None):
        s, b = cut_split(split, tok, n)
        assert np.array_equal(s, whole) and b == split.bytes

    # one cut: the training run's subset is this one
    other = validation_subset(cache, tok, EVAL_N)
    assert np.array_equal(other[0], whole[: EVAL_N + 1]) and other[1] == cut_split(split, tok, EVAL_N)[1]

    # skip_tokens: what follows the selection's N predicted tokens (token N is context), with the bytes left
    seen = cut_split(split, tok, EVAL_N)[1]
    s, b = cut_split(split, tok, None, skip_tokens=EVAL_N)
    assert np.array_equal(s, whole[EVAL_N:]) and b == split.bytes - seen
    s, b = cut_split(split, tok, 100, skip_tokens=EVAL_N)  # then cut again: the next 100 predicted tokens
    assert np.array_equal(s, whole[EVAL_N : EVAL_N + 101]) and b == cut_split(split, tok, EVAL_N + 100)[1] - seen
    assert len(cut_split(split, tok, None, skip_tokens=len(whole))[0]) == 0  # nothing after it


# ------------------------------------------------------------------------------------ held-out prompts and grammar rows




@pytest.mark.slow
def test_eval_held_out_prompts_and_grammar_rows(s260, tmp_path, judge_server):
    from tinystories.core.defaults import OPENINGS
    from tinystories.data.text import iter_documents
    from tinystories.evaluation.grammar import find_parser
    from tinystories.evaluation.judge import judge_messages
    from tinystories.evaluation.stories import held_out_prompts

    docs = list(iter_documents([TRAIN_HEAD], 12))
    text = tmp_path / "twelve.txt"
    text.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    url, _ = judge_server("good")
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", s260, "--text", text, "--num-stories", "3", "--max-new-tokens", "64",
                "--prompts", "held-out", "--show-grammar-errors", "2", "--json", out, "--judge-url", url,
                "--judge-model", "m")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    prompts = [s["prompt"] for s in res["samples"]]
    assert prompts == held_out_prompts(docs, 3) and res["sampling"]["prompts"] == "held-out"
    assert all(any(d.startswith(p) for d in docs) for p in prompts) and not set(prompts) & set(OPENINGS)
    assert res["judge"]["judged"] == 3  # the judge grades completions of the same held-out beginnings
    assert prompts[0] + "***" in judge_messages(prompts[0], res["samples"][0]["text"])[-1]["content"]
    if find_parser() is None:
        pytest.fail("link-parser is not installed: apt-get install link-grammar", pytrace=False)
    model, ref = res["stories"]["model"], res["stories"]["reference"]
    assert model["grammar_sentences"] > 0 and ref["grammar_sentences"] > 50
    for st in (model, ref):
        assert st["grammar_measured"] is True
        for key in ("grammatical_sentences", "grammatical_stories", "grammatical_timed_out"):
            assert 0.0 <= st[key] <= 1.0
        assert 0.0 <= st["grammar_score_mean"] <= 10.0
    assert ref["grammatical_sentences"] > 0.85
    assert "grammatical sentences (parser)" in r.stdout and "grammar score /10 (mean)" in r.stdout
    if model["grammar_rejected"]:
        assert "sentences link-parser rejects in the generated stories" in r.stdout and "    x " in r.stdout
    else:
        assert "link-parser rejects no sentence of the generated stories" in r.stdout
    assert f"prompts: 3 beginnings of {text}" in r.stdout


@pytest.mark.slow
def test_eval_held_out_prompts_fall_back_to_openings(random_checkpoint, tmp_path):
    ref = tmp_path / "short.txt"
    ref.write_text("Hi.\n<|endoftext|>\nThe end. Bye.\n<|endoftext|>\n", encoding="utf-8")  # nothing to complete
    out = tmp_path / "eval.json"
    r = run_cli("eval", "--checkpoint", random_checkpoint, "--text", VALID_HEAD, "--max-tokens", "100",
                "--reference", ref, "--num-stories", "2", "--max-new-tokens", "8", "--prompts", "held-out",
                "--no-grammar", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [s["prompt"] for s in res["samples"]] == ["Once upon a time", "One day,"]
    assert "no held-out stories: the fixed openings were used" in r.stdout
    assert "grammar_measured" not in res["stories"]["model"] and "grammatical sentences" not in r.stdout


def test_eval_bad_grammar_options(random_checkpoint):
    assert "--show-grammar-errors -1" in _one_line_error(
        run_cli("eval", "--checkpoint", random_checkpoint, "--show-grammar-errors", "-1"))
    assert "--prompts" in _one_line_error(run_cli("eval", "--checkpoint", random_checkpoint, "--prompts", "random"))
