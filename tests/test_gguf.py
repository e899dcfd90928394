"""`export --format gguf`, proven in llama.cpp itself through llama-cpp-python: the same token ids as our tokenizer,
the same greedy story as `tinystories generate --temperature 0`, f32 logits within a stated tolerance, and a q8_0
file whose greedy first sentence is f32's; for the stories260K import (SentencePiece) and a BPE model trained here.

Every call into llama.cpp runs in a child process (tests/llama_cpp_child.py): native code that dies by a signal
(SIGILL from a build for another CPU) fails the one test, naming the signal and the stage, instead of killing pytest.
This process never imports llama_cpp; it does our side (exports, our tokenizer and model, the CLI) and compares."""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LLAMA2_TOKENIZER, VALID_HEAD, one_line_error, run_cli

INSTALL = ("llama-cpp-python is not installed: .ci/llama_cpp.sh builds it portably into .venv "
           "(llama.cpp from source: ~6 CPU-minutes)")
gguf = pytest.importorskip("gguf", reason="gguf is not installed: pip install 'tinystories[gguf]'")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason=INSTALL)

from tinystories.inference.sampling import SamplingParams, prompt_ids, sample  # noqa: E402
from tinystories.model.checkpoint import load_model  # noqa: E402

PROMPT = "Once upon a time"
F32_LOGIT_TOL = 1e-3  # max |logit difference| (llama.cpp f32 vs PyTorch f32); measured ~1e-5 (see docs/interop.md)
CHILD = Path(__file__).with_name("llama_cpp_child.py")
CHILD_TIMEOUT = 900


def last_stage(stderr: str | bytes | None) -> str:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    stages = re.findall(r"^stage: (.+)$", stderr or "", re.M)
    return stages[-1] if stages else "start-up"


def in_llama_cpp(tmp: Path, name: str, **request) -> dict:
    """Run one request in a llama.cpp child process (see tests/llama_cpp_child.py) and return its results, the
    logits as arrays; fail naming the signal and the stage if it dies."""
    req, out = tmp / f"llama-cpp-{name}.json", tmp / f"llama-cpp-{name}-out.json"
    req.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in request.items()}))
    try:
        r = subprocess.run([sys.executable, str(CHILD), str(req), str(out)], capture_output=True, text=True,
                           timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"llama.cpp timed out after {CHILD_TIMEOUT} s on the {last_stage(e.stderr)}", pytrace=False)
    if r.returncode < 0:
        sig = signal.Signals(-r.returncode).name
        pytest.fail(f"llama.cpp died with {sig} on the {last_stage(r.stderr)} (the other tests ran on; a llama.cpp "
                    f"built for another CPU? .ci/llama_cpp.sh builds a portable one)\n{r.stderr[-3000:]}",
                    pytrace=False)
    assert r.returncode == 0, f"llama.cpp exited {r.returncode} on the {last_stage(r.stderr)}:\n{r.stderr[-3000:]}"
    res = json.loads(out.read_text())
    res["scores"] = [np.load(p) for p in res.get("scores", [])]
    return res


def export(ck: Path, out: Path, *extra: str) -> str:
    r = run_cli("export", "--format", "gguf", "--checkpoint", ck, "--out", out, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ours_greedy(model, tok, prompt: str, n: int) -> tuple[list[int], bool]:
    ids = []
    for step in sample(model, [prompt_ids(tok, prompt)], SamplingParams(max_new_tokens=n, temperature=0), tok.stop_ids):
        t = int(step.tokens[0])
        if t in tok.stop_ids:
            return ids, True
        ids.append(t)
    return ids, False


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def check_in_llama_cpp(ck: Path, tmp: Path, n_new: int) -> dict:
    """Export f32 and q8_0 and compare llama.cpp with our model; returns the measurements."""
    model, info = load_model(ck)
    tok, cfg = info.tokenizer, info.cfg.model
    f32 = tmp / "model-f32.gguf"
    stdout = export(ck, f32)
    assert f'llama-cli -m {f32} -p "Once upon a time"' in stdout
    modelfile = (tmp / "model-f32.Modelfile").read_text()
    assert "FROM ./model-f32.gguf\n" in modelfile
    assert all(f'PARAMETER stop "{tok.id_to_piece(i)}"' in modelfile for i in tok.stop_ids)
    lines = VALID_HEAD.read_text(encoding="utf-8").splitlines()
    texts = lines[:300] + ["\n".join(lines[300:340])]  # line by line and a multi-line chunk of real text
    x = [tok.doc_start_id] + tok.encode("\n".join(lines[400:480]))[: cfg.max_seq_len - 1]  # a full context
    q8 = tmp / "model-q8_0.gguf"
    stdout = export(ck, q8, "--dtype", "q8_0")
    assert "Q8_0" in stdout
    assert q8.stat().st_size < f32.stat().st_size
    gen = {"prompt": PROMPT, "n_new": n_new}
    llm = in_llama_cpp(tmp, "f32", gguf=f32, label="f32", n_ctx=cfg.max_seq_len, metadata=True, tokenize=texts,
                       tokenize_bos=[PROMPT], eval=[x], greedy=gen, completion=gen)
    llm8 = in_llama_cpp(tmp, "q8_0", gguf=q8, label="q8_0", n_ctx=cfg.max_seq_len, completion=gen, eval=[x])
    # what llama.cpp read: the architecture, our hyperparameters, the vocabulary and its special tokens
    meta = llm["metadata"]
    assert meta["general.architecture"] == "llama"
    assert int(meta["llama.context_length"]) == cfg.max_seq_len and int(meta["llama.block_count"]) == cfg.n_layers
    assert int(meta["llama.attention.head_count"]) == cfg.n_heads
    assert int(meta["llama.attention.head_count_kv"]) == cfg.kv_heads
    assert float(meta["llama.rope.freq_base"]) == cfg.rope_theta
    assert float(meta["llama.attention.layer_norm_rms_epsilon"]) == pytest.approx(cfg.norm_eps)
    assert meta["tokenizer.ggml.model"] == ("gpt2" if tok.kind == "bpe" else "llama")
    assert int(meta["tokenizer.ggml.bos_token_id"]) == tok.doc_start_id == llm["token_bos"]
    assert llm["n_vocab"] == cfg.vocab_size and llm["n_ctx"] >= cfg.max_seq_len  # llama.cpp pads n_ctx to 256
    # tokenization
    for text, theirs in zip(texts, llm["tokenize"], strict=True):
        assert theirs == tok.encode(text), text[:80]
    assert llm["tokenize_bos"] == [prompt_ids(tok, PROMPT)]
    # logits at every position of a full context of real text
    theirs = llm["scores"][0]
    with torch.no_grad():
        mine = model(torch.tensor([x]))[0][0].numpy()
    diff = float(np.abs(theirs - mine).max())
    assert diff < F32_LOGIT_TOL, diff
    assert (theirs.argmax(-1) == mine.argmax(-1)).all()
    # greedy decoding: llama.cpp's greedy sampler, ours, and the real `tinystories generate --temperature 0`
    a, a_end = ours_greedy(model, tok, PROMPT, n_new)
    assert (llm["greedy"]["ids"], llm["greedy"]["end"]) == (a, a_end)
    r = run_cli("generate", "--checkpoint", ck, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", n_new)
    assert r.returncode == 0, r.stderr
    completion = llm["completion"]
    assert r.stdout == PROMPT + completion["text"] + "\n"
    assert completion["finish_reason"] == ("stop" if a_end else "length")
    # q8_0: llama.cpp runs it; its greedy first sentence is f32's
    c8 = llm8["completion"]["text"]
    assert first_sentence(PROMPT + c8) == first_sentence(PROMPT + completion["text"])
    q8_diff = float(np.abs(llm8["scores"][0] - mine).max())
    return {"f32_max_logit_diff": diff, "q8_max_logit_diff": q8_diff, "story": PROMPT + completion["text"],
            "f32_bytes": f32.stat().st_size, "q8_bytes": q8.stat().st_size}


def test_llama_cpp_crash_fails_one_test(tmp_path):
    """The crash handling itself (no llama_cpp needed): a child that dies by SIGILL on the q8_0 completion fails
    with a message naming both, and this process carries on to run another child."""
    with pytest.raises(pytest.fail.Exception) as e:
        in_llama_cpp(tmp_path, "crash", die={"stage": "q8_0 completion", "signal": "SIGILL"})
    assert str(e.value).startswith("llama.cpp died with SIGILL on the q8_0 completion"), str(e.value)
    assert in_llama_cpp(tmp_path, "after", die=None) == {"scores": []}


@pytest.mark.slow
@needs_llama_cpp
def test_stories260k_in_llama_cpp(s260, tmp_path):
    m = check_in_llama_cpp(s260, tmp_path, n_new=200)
    assert m["story"].startswith("Once upon a time, there was a little girl named Lily.")
    print(m)


@pytest.mark.slow
@needs_llama_cpp
def test_trained_bpe_model_in_llama_cpp(tiny_bpe_run, tmp_path):
    m = check_in_llama_cpp(tiny_bpe_run, tmp_path, n_new=120)
    print(m)


@pytest.mark.slow
def test_gguf_file_layout(s260, tiny_bpe_run, tmp_path):
    """What the file holds, read back with gguf's reader: the SentencePiece vocabulary with scores and types, the BPE
    one with merges, f16 storage, no separate output matrix for a tied model."""
    from gguf import GGUFReader

    out = tmp_path / "s.gguf"
    export(s260, out, "--dtype", "f16")
    r = GGUFReader(out)
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama" and field("general.file_type") == 1
    assert field("tokenizer.ggml.tokens")[:3] == ["<unk>", "<s>", "</s>"]
    assert field("tokenizer.ggml.token_type")[:4] == [2, 3, 3, 6]  # unknown, control, control, byte <0x00>
    assert len(field("tokenizer.ggml.scores")) == 512
    assert field("tokenizer.ggml.bos_token_id") == 1
    assert field("tokenizer.ggml.eos_token_id") == 1  # a llama2.c story ends where the next one's BOS starts
    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names and names["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert names["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    out = tmp_path / "b.gguf"
    export(tiny_bpe_run, out)
    r = GGUFReader(out)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    eot = tokens.index("<|endoftext|>")
    assert field("tokenizer.ggml.bos_token_id") == eot == field("tokenizer.ggml.eos_token_id")
    assert field("tokenizer.ggml.token_type")[eot] == 3 and field("tokenizer.ggml.add_bos_token") is True
    assert len(field("tokenizer.ggml.merges")) > 3000 and " " in field("tokenizer.ggml.merges")[0]


@pytest.mark.slow
def test_gguf_export_errors(s260, tmp_path):
    out = tmp_path / "m.gguf"
    export(s260, out)
    one_line_error(run_cli("export", "--format", "gguf", "--checkpoint", s260, "--out", out),
                   "already exists", "--force")
    export(s260, out, "--force", "--dtype", "q8_0")
    notes = tmp_path / "notes.gguf"
    notes.write_text("keep me")
    one_line_error(run_cli("export", "--format", "gguf", "--checkpoint", s260, "--out", notes, "--force"),
                   "is not a GGUF file")
    assert notes.read_text() == "keep me"
    one_line_error(run_cli("export", "--format", "gguf", "--checkpoint", s260, "--out", tmp_path / "m.bin"), ".gguf")
    hf = tmp_path / "hf"
    one_line_error(run_cli("export", "--format", "hf", "--checkpoint", s260, "--out", hf, "--dtype", "f16"),
                   "--dtype", "gguf")
    assert not (tmp_path / "hf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "notes.gguf"]  # no temp files


@pytest.mark.slow
@needs_llama_cpp
def test_llama2_tokenizer_in_llama_cpp(tmp_path):
    """Llama 2's 32K SentencePiece tokenizer as a `llama` vocabulary: llama.cpp encodes real text to our ids and
    computes our logits (a small random model carries it)."""
    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    tok = load_tokenizer(LLAMA2_TOKENIZER)
    cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 32, "n_layers": 1, "n_heads": 2,
                                              "max_seq_len": 256, "rope_theta": 500000.0, "norm_eps": 1e-6}})
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    write_checkpoint_dir(tmp_path / "ck", model, cfg, tok, {"step": 0})
    out = tmp_path / "l2.gguf"
    export(tmp_path / "ck", out)
    lines = VALID_HEAD.read_text(encoding="utf-8").splitlines()
    x = prompt_ids(tok, " ".join(lines[500:510]))[:256]
    llm = in_llama_cpp(tmp_path, "l2", gguf=out, label="f32", n_ctx=256, metadata=True, tokenize=lines[:300],
                       eval=[x])
    assert float(llm["metadata"]["llama.rope.freq_base"]) == 500000.0
    for text, theirs in zip(lines[:300], llm["tokenize"], strict=True):
        assert theirs == tok.encode(text), text[:80]
    with torch.no_grad():
        mine = model(torch.tensor([x]))[0][0].numpy()
    assert float(np.abs(llm["scores"][0] - mine).max()) < F32_LOGIT_TOL
